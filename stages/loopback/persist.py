"""Keep the loopback's DVC remote bucket on disk, so a pushed release outlives the server.

moto (5.2, pinned) keeps S3 in memory. What it offers towards persistence is its recorder
(`MOTO_ENABLE_RECORDING`): an append-only log of every request with its body in base64, replayed
request by request through HTTP. For a DVC remote that log grows with every push (a third larger
than the data, failed and deleted uploads included), holds request signatures, and replays one
HTTP request per object at start. So the store here is a plain mirror instead:

    <store>/<bucket>/<key>          the object's bytes, one file per key
    <store>/<bucket>.index.json     {"objects": {key: etag}} of what the folder holds

`restore()` loads the folder into moto's backend when the server starts (direct inserts, as the
upstream seeding does: milliseconds, not one signed PUT per object); `dump()` writes what changed
when it stops (or whenever called): new or changed ETags are written, keys gone from the bucket are
deleted, so the folder is exactly the bucket and `dvc gc -c` is kept too. Only the DVC remote
bucket is kept: the upstream buckets are re-seeded from `build/upstream/` on every start anyway.

A key that would leave the folder (absolute, `..`, empty segments) is not stored: it is reported
in `DumpResult.skipped` and logged, never written outside `<store>`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.errors import TidepoolError
from stages.fsutil import dumps_json, write_bytes, write_text
from stages.progress import bar

log = logging.getLogger(__name__)

INDEX_SUFFIX = ".index.json"


@dataclass
class DumpResult:
    """What one dump did; key lists are sorted."""

    written: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: int = 0
    skipped: list[str] = field(default_factory=list)  # keys that cannot be a path inside the store


def safe_key(key: str) -> bool:
    """True when `key` maps to a file strictly inside the bucket folder, and to no other key's file
    (`a//b` and `a/./b` are other S3 keys than `a/b`, but the same path)."""
    if not key or "\\" in key or "\0" in key:
        return False
    return all(part not in ("", ".", "..") for part in key.split("/"))


class BucketStore:
    """The on-disk mirror of one bucket of the loopback S3 (see the module docstring)."""

    def __init__(self, root: str | Path, bucket: str) -> None:
        self.root = Path(root).resolve()
        self.bucket = bucket
        self.folder = self.root / bucket
        self.index_path = self.root / f"{bucket}{INDEX_SUFFIX}"

    def _index(self) -> dict[str, str]:
        if not self.index_path.exists():
            return {}
        try:
            data = json.loads(self.index_path.read_text(encoding="utf-8"))
            objects = data["objects"]
        except (ValueError, KeyError, TypeError) as exc:
            raise TidepoolError(
                f"{self.index_path}: not a loopback store index ({exc}); delete {self.root} to start empty"
            ) from exc
        if not isinstance(objects, dict):
            raise TidepoolError(f"{self.index_path}: `objects` must map keys to ETags")
        return {str(k): str(v) for k, v in objects.items()}

    def keys(self) -> list[str]:
        """Every key the store holds, sorted."""
        if not self.folder.is_dir():
            return []
        return sorted(
            p.relative_to(self.folder).as_posix()
            for p in self.folder.rglob("*")
            if p.is_file() and not _temp_file(p)
        )

    def restore(self, put: Callable[[str, bytes], None]) -> int:
        """Load every stored object through `put(key, data)`; returns how many."""
        keys = self.keys()
        with bar(total=len(keys), desc=f"restoring s3://{self.bucket}", unit="obj") as progress:
            for key in keys:
                try:
                    data = (self.folder / key).read_bytes()
                    put(key, data)
                except OSError as exc:
                    raise TidepoolError(
                        f"{self.folder / key}: cannot restore it into s3://{self.bucket}: {exc}"
                    ) from exc
                progress.update(1)
        return len(keys)

    def dump(self, objects: dict[str, tuple[str, Callable[[], bytes]]]) -> DumpResult:
        """Make the folder hold exactly `objects` (key -> (etag, read bytes)); write only changes."""
        index = self._index()
        on_disk = set(self.keys())
        result = DumpResult()
        kept: dict[str, str] = {}
        todo = []
        for key in sorted(objects):
            etag, _ = objects[key]
            if not safe_key(key):
                result.skipped.append(key)
                continue
            if index.get(key) == etag and key in on_disk:
                result.unchanged += 1
                kept[key] = etag
            else:
                todo.append(key)
        with bar(total=len(todo), desc=f"saving s3://{self.bucket}", unit="obj") as progress:
            for key in todo:
                etag, read = objects[key]
                try:
                    write_bytes(self.folder / key, read())
                except OSError as exc:
                    raise TidepoolError(
                        f"{self.folder / key}: cannot save s3://{self.bucket}/{key}: {exc}"
                    ) from exc
                kept[key] = etag
                result.written.append(key)
                progress.update(1)
        for key in sorted(on_disk - set(kept)):
            path = self.folder / key
            path.unlink(missing_ok=True)
            result.deleted.append(key)
            _prune_empty(path.parent, self.folder)
        write_text(self.index_path, dumps_json({"bucket": self.bucket, "objects": kept}))
        for key in result.skipped:
            log.warning("loopback store: s3://%s/%s not saved: not a safe file path", self.bucket, key)
        return result


def _temp_file(path: Path) -> bool:
    """A half-written file of an interrupted dump (fsutil.atomic_path's temp name)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def _prune_empty(folder: Path, stop: Path) -> None:
    """Remove empty folders from `folder` up to (not including) `stop`."""
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def moto_objects(backend: Any, bucket: str) -> dict[str, tuple[str, Callable[[], bytes]]]:
    """key -> (etag, reader) of the current version of every object in moto's `bucket`."""
    from moto.s3.models import FakeKey

    out: dict[str, tuple[str, Callable[[], bytes]]] = {}
    for key, obj in backend.get_bucket(bucket).keys.items():
        if isinstance(obj, FakeKey):  # delete markers of versioned buckets hold no data
            out[key] = (obj.etag, lambda obj=obj: obj.value)
    return out


def describe(store: BucketStore) -> str:
    """One line for people: where the store is and how much it holds."""
    keys = store.keys()
    size = float(sum((store.folder / k).stat().st_size for k in keys))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            break
        size /= 1024
    amount = f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
    return f"{store.folder}: {len(keys)} object(s), {amount}"


