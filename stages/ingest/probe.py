"""Per-image work of ingest as cacheable units, and the image probe every image source uses.

A unit runs in a worker as `fn(task, cached)`. It reads its input bytes once, digests them, and
asks `cached.lookup(inputs)`; only on a miss does it decode, then `cached.store(inputs, result)`.
The digest is of the bytes actually read, so a rebuild decodes only what is new or changed, and a
file edited in place (same name, same size) is never taken for its old self. The key is
`work_key(namespace, code, settings, inputs)` (stages/cache.py): `code` is the source of the
modules that compute the unit plus the versions of the libraries that shape its result.

`image_work(ctx, path)` is the probe of a plain image file: decode once, hash (file sha256,
pixel sha256, pHash), size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from stages.cache import Cache, Entry, canonical, code_version, work_key
from stages.imaging import ImageInfo, ImageProblem, probe_image_bytes
from stages.ingest.context import IngestContext
from stages.ingest.records import Work, WorkResult

IMAGE_NAMESPACE = "ingest-probe-image"


def to_entry(result: WorkResult) -> Entry | None:
    meta = {"columns": result.columns, "data": result.data, "problem": list(result.problem or []) or None}
    try:
        canonical(meta)  # strict JSON or nothing: a result that cannot be stored is just not cached
    except (TypeError, ValueError):
        return None
    return Entry(meta, dict(result.files))


def from_entry(entry: Entry) -> WorkResult:
    meta = entry.meta
    if not isinstance(meta, dict) or not isinstance(meta.get("columns"), dict):
        raise ValueError("not a work result")
    problem = meta.get("problem")
    if problem is not None and (not isinstance(problem, list) or len(problem) != 2):
        raise ValueError("bad problem")
    return WorkResult(
        columns=dict(meta["columns"]),
        data=dict(meta.get("data") or {}),
        files=dict(entry.blobs),
        problem=(str(problem[0]), str(problem[1])) if problem else None,
    )


@dataclass
class Cached:
    """The cache as one unit of work sees it (picklable: it travels to the worker with the task).

    `outcome` says what happened, for the stage's counters: `reused`, `computed` (stored or not),
    `uncached` (the unit never looked: its inputs could not be read).
    """

    root: Path | None
    namespace: str
    code: str
    settings: Any
    outcome: str = "uncached"
    corrupt: int = 0
    _key: str | None = field(default=None, repr=False)

    def lookup(self, inputs: Any) -> WorkResult | None:
        self._key = work_key(self.namespace, self.code, self.settings, inputs)
        self.outcome = "computed"
        cache = Cache(self.root, self.namespace)
        entry = cache.get(self._key)
        self.corrupt += cache.stats["corrupt"]
        if entry is None:
            return None
        try:
            result = from_entry(entry)
        except (ValueError, KeyError, TypeError):
            self.corrupt += 1
            return None
        self.outcome = "reused"
        return result

    def store(self, inputs: Any, result: WorkResult) -> None:
        key = work_key(self.namespace, self.code, self.settings, inputs)
        entry = to_entry(result)
        if entry is not None:
            Cache(self.root, self.namespace).put(key, entry)


def info_columns(info: ImageInfo) -> dict[str, Any]:
    """The sample-table columns a probe gives."""
    return {
        "image_format": info.format,
        "width": info.width,
        "height": info.height,
        "file_size": info.file_size,
        "file_sha256": info.file_sha256,
        "pixel_sha256": info.pixel_sha256,
        "phash": info.phash,
    }


@dataclass(frozen=True)
class ImageTask:
    path: str
    max_pixels: int
    lossless_pixel_hash: bool = True


def read_input(path: str | Path) -> bytes:
    """An input file's bytes: ImageProblem("missing_image") when there is none,
    ("not_a_regular_file") for a folder, a symlink or a device where a file is expected."""
    path = Path(path)
    if path.is_symlink():
        # Fetch never writes links; one in data/raw points wherever its maker chose, and its
        # target's bytes would travel into the tables and the shards.
        raise ImageProblem("not_a_regular_file", "a symbolic link, not a file")
    try:
        if path.exists() and not path.is_file():
            raise ImageProblem("not_a_regular_file", "a folder or special file, not a regular file")
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ImageProblem("missing_image", "file not found") from exc
    except OSError as exc:
        raise ImageProblem("missing_image", f"cannot read the file: {exc.strerror or exc}") from exc


def probe_image(task: ImageTask, cached: Cached) -> WorkResult:
    """Module level: runs in a worker. A bad image is a result with a problem, not an exception."""
    try:
        data = read_input(task.path)
    except ImageProblem as problem:
        return WorkResult(problem=(problem.reason, problem.detail))
    inputs = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    hit = cached.lookup(inputs)
    if hit is not None:
        return hit
    try:
        info = probe_image_bytes(data, task.max_pixels, lossless_pixel_hash=task.lossless_pixel_hash)
        result = WorkResult(columns=info_columns(info))
    except ImageProblem as problem:
        result = WorkResult(problem=(problem.reason, problem.detail))
    cached.store(inputs, result)
    return result


@cache
def _image_code() -> str:
    return code_version("stages.imaging", "stages.ingest.probe", libraries=("PIL", "numpy"))


def image_work(ctx: IngestContext, path: Path, *, lossless_pixel_hash: bool = True) -> Work:
    return Work(
        fn=probe_image,
        task=ImageTask(str(path), ctx.max_pixels, lossless_pixel_hash),
        namespace=IMAGE_NAMESPACE,
        code=_image_code(),
        settings={"max_pixels": ctx.max_pixels, "lossless_pixel_hash": lossless_pixel_hash},
    )
