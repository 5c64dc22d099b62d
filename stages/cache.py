"""Content-addressed results of per-item work, kept between builds so growth costs what grew.

A unit of per-item work (ingest's probe of one image, pack's encode of one unit) is a pure function
of its inputs' content, the settings that shape it and the code that computes it. Its *key* is the
sha256 of exactly those three things (`work_key`); an entry stored under the key is the unit's
result, so a rebuild takes it instead of recomputing. Nothing else may go into a result: a build
that takes every result from the cache must give the same bytes as one that computes every result.

Where it lives: `$TIDEPOOL_CACHE_DIR`, else `<repo>/.tidepool-cache/` (ignored by git and DVC: it is
a local accelerator, never an output and never pushed). `TIDEPOOL_CACHE=0` turns it off, which is how
the tests build the clean reference. A cold clone simply computes everything.

Trust: an entry is a file `<namespace>/<key[:2]>/<key>` holding a magic line, a JSON header (the
key, the namespace, the payload's length and sha256) and the payload. A read checks all of them; a
truncated, tampered or foreign entry (one whose header names another key, e.g. copied or renamed
by hand) is counted as `corrupt`, deleted and recomputed, never used. Writes are atomic (temp file +
rename), so an interrupted build leaves either a whole entry or none.

Payloads are strict JSON plus named binary blobs (no pickle: the cache directory is just files on
disk, and loading one must never run code).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from stages.fsutil import atomic_path, repo_root, write_json

if TYPE_CHECKING:
    from stages.executor import Executor

T = TypeVar("T")
R = TypeVar("R")

CACHE_DIR_ENV = "TIDEPOOL_CACHE_DIR"
CACHE_SWITCH_ENV = "TIDEPOOL_CACHE"
DEFAULT_DIR = ".tidepool-cache"
MAGIC = b"tidepool-cache-entry v1\n"
MAX_HEADER = 1 << 20


def canonical(obj: Any) -> bytes:
    """The bytes a key is computed over: sorted keys, fixed separators, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def library_versions(*names: str) -> dict[str, str]:
    """Versions of libraries whose output bytes a unit depends on (an encoder upgrade changes them)."""
    out: dict[str, str] = {"python": f"{sys.version_info[0]}.{sys.version_info[1]}"}
    for name in names:
        if name == "zlib":
            import zlib

            out["zlib"] = zlib.ZLIB_RUNTIME_VERSION
        elif name == "PIL":
            import PIL

            out["PIL"] = PIL.__version__
            try:
                from PIL import features

                # The codec libraries Pillow is linked against shape encoded bytes too.
                for codec in ("libjpeg_turbo", "libwebp", "zlib"):
                    version = features.version(codec)
                    if version:
                        out[f"PIL.{codec}"] = str(version)
            except Exception:  # noqa: BLE001 - feature probing is best effort; PIL's version stays
                pass
        else:
            module = __import__(name)
            out[name] = str(getattr(module, "__version__", "unknown"))
    return out


def code_version(*modules: str, libraries: Iterable[str] = ()) -> str:
    """A digest of the source of `modules` (dotted names) and the versions of `libraries`.

    Hashing the source, not a hand-bumped number, means any edit to the code that computes a unit
    invalidates its entries; an edit elsewhere does not. Conservative on purpose: a comment edit
    recomputes too, which costs time, never correctness.
    """
    import importlib.util

    h = hashlib.sha256()
    for name in sorted(set(modules)):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ValueError(f"code_version: no source for module {name!r}")
        h.update(name.encode() + b"\0" + Path(spec.origin).read_bytes() + b"\0")
    h.update(canonical(library_versions(*libraries)))
    return h.hexdigest()


def work_key(namespace: str, code: str, settings: Any, inputs: Any) -> str:
    """The key of one unit of work: sha256 over namespace, code version, settings and input digests."""
    return hashlib.sha256(
        canonical({"namespace": namespace, "code": code, "settings": settings, "inputs": inputs})
    ).hexdigest()


@dataclass(frozen=True)
class Entry:
    """A cached result: strict-JSON metadata plus named binary blobs."""

    meta: Any
    blobs: dict[str, bytes] = field(default_factory=dict)


def _encode(namespace: str, key: str, entry: Entry) -> bytes:
    names = sorted(entry.blobs)
    payload = canonical({"meta": entry.meta, "blobs": [[n, len(entry.blobs[n])] for n in names]})
    body = b"".join([len(payload).to_bytes(8, "big"), payload, *(entry.blobs[n] for n in names)])
    header = canonical(
        {"key": key, "namespace": namespace, "length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    )
    return MAGIC + len(header).to_bytes(4, "big") + header + body


class CorruptEntry(Exception):
    """An entry that fails verification (internal: turned into a miss)."""


def _decode(namespace: str, key: str, data: bytes) -> Entry:
    if not data.startswith(MAGIC):
        raise CorruptEntry("bad magic")
    pos = len(MAGIC)
    n = int.from_bytes(data[pos : pos + 4], "big")
    pos += 4
    if not 0 < n <= MAX_HEADER or pos + n > len(data):
        raise CorruptEntry("bad header length")
    try:
        header = json.loads(data[pos : pos + n])
    except ValueError as exc:
        raise CorruptEntry("header is not JSON") from exc
    pos += n
    if not isinstance(header, dict) or header.get("key") != key or header.get("namespace") != namespace:
        raise CorruptEntry("entry belongs to another key")
    body = data[pos:]
    if len(body) != header.get("length") or hashlib.sha256(body).hexdigest() != header.get("sha256"):
        raise CorruptEntry("payload does not match its checksum")
    m = int.from_bytes(body[:8], "big")
    try:
        payload = json.loads(body[8 : 8 + m])
        blobs: dict[str, bytes] = {}
        offset = 8 + m
        for name, length in payload["blobs"]:
            blobs[str(name)] = body[offset : offset + int(length)]
            offset += int(length)
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptEntry("payload does not parse") from exc
    if offset != len(body):
        raise CorruptEntry("payload length mismatch")
    return Entry(payload["meta"], blobs)


class Cache:
    """One namespace of the work cache (e.g. `probe`, `pack-reef-points`), with hit/miss counters."""

    def __init__(self, root: Path | None, namespace: str) -> None:
        self.root = root  # None: disabled (every get misses, put does nothing)
        self.namespace = namespace
        self.stats: Counter[str] = Counter()

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / self.namespace / key[:2] / key

    def get(self, key: str) -> Entry | None:
        if self.root is None:
            return None
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            self.stats["corrupt"] += 1
            return None
        try:
            entry = _decode(self.namespace, key, data)
        except CorruptEntry:
            self.stats["corrupt"] += 1
            path.unlink(missing_ok=True)
            return None
        self.stats["hits"] += 1
        return entry

    def put(self, key: str, entry: Entry) -> None:
        if self.root is None:
            return
        path = self.path(key)
        try:
            with atomic_path(path) as tmp:
                tmp.write_bytes(_encode(self.namespace, key, entry))
            self.stats["stored"] += 1
        except OSError:
            # A full or read-only cache disk slows the next build down; it must not fail this one.
            self.stats["store_failed"] += 1

    def count(self, what: str, n: int = 1) -> None:
        self.stats[what] += n


def cache_root(root: Path | None = None) -> Path | None:
    """The cache directory in force, or None when `TIDEPOOL_CACHE=0` turns the cache off."""
    if os.environ.get(CACHE_SWITCH_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured)
    return (root or repo_root()) / DEFAULT_DIR


def open_cache(namespace: str, root: Path | None = None) -> Cache:
    return Cache(cache_root(root), namespace)


def write_stats(stage: str, caches: Iterable[Cache], root: Path | None = None, **extra: Any) -> Path | None:
    """Record what the last run of `stage` computed and reused, beside the cache.

    Deliberately outside the DVC outputs: a cached and a clean build must write identical outputs,
    and these counts are the one thing that differs between them. Tests and `make bench` read them.
    """
    caches = list(caches)
    base = cache_root(root)
    if base is None:
        base = (root or repo_root()) / DEFAULT_DIR
    stats = {c.namespace: dict(sorted(c.stats.items())) for c in caches}
    doc = {"stage": stage, "cache_enabled": any(c.enabled for c in caches), "namespaces": stats, **extra}
    path = base / "stats" / f"{stage.replace('/', '_')}.json"
    try:
        write_json(path, doc)
    except OSError:
        return None
    return path


_MISS = object()


def cached_map(
    executor: Executor,
    fn: Callable[[T], R],
    items: Iterable[T],
    cache: Cache,
    key: Callable[[T], str | None],
    store: Callable[[R], Entry | None],
    load: Callable[[Entry, T], R],
    window: int = 256,
    chunksize: int = 16,
) -> Iterator[tuple[T, R]]:
    """`(item, fn(item))` in input order, taking results from `cache` where the key has one.

    Items are taken in windows of `window`: the hits of a window are loaded here, its misses run on
    `executor` (one pool for the whole stage), and each computed result is stored under its key
    (`store` returns None for a result that must not be cached, e.g. a transient failure). `key`
    returns None for an item that is never cached. `load(entry, item)` rebuilds the result; if it
    raises CorruptEntry, ValueError, KeyError or TypeError the entry is treated as corrupt and the
    item recomputed. Counters: `computed`, `reused`, `corrupt`, `stored`.
    """
    from stages.executor import _chunks

    for batch in _chunks(items, max(1, window)):
        keys = [key(item) for item in batch]
        results: list[Any] = [_MISS] * len(batch)
        for i, (item, k) in enumerate(zip(batch, keys)):
            entry = cache.get(k) if k is not None else None
            if entry is None:
                continue
            try:
                results[i] = load(entry, item)
            except (CorruptEntry, ValueError, KeyError, TypeError):
                cache.count("corrupt")
                continue
            cache.count("reused")
        misses = [i for i, r in enumerate(results) if r is _MISS]
        computed = executor.map(fn, [batch[i] for i in misses], chunksize=chunksize)
        for i, result in zip(misses, computed):
            results[i] = result
            cache.count("computed")
            k = keys[i]
            if k is not None:
                entry = store(result)
                if entry is not None:
                    cache.put(k, entry)
        yield from zip(batch, results)
