"""Pack costs what changed: per-unit work keys, references into earlier shards, whole-shard reuse.

A *unit* (reef-points: one image and its points; the other products: one sample) encodes to tar
bytes that are a pure function of

- the code that shapes them (`stages.pack.codec`, the product module, the tar writer, the
  bounded opener, plus Pillow/numpy/zlib and the codec libraries inside Pillow),
- the settings that shape them (format, quality/level/method, patch size, max_side, layout,
  the pixel bound), and
- the inputs' content: the sample table's `file_sha256` of the image, the mask file's sha256,
  and a digest of the unit's payload (its json members, class indices, points, sizes).

`work_key` hashes exactly those (stages/cache.py). The work cache then holds, per key, *where the
bytes already are* instead of the bytes: the md5 of the shard that holds them, their offset and
length, their sha256, the per-sample lengths and the decode count. The previous build's shards
are already on disk twice over in a DVC project (the workspace output and `.dvc/cache`), so a
second copy of every patch in the work cache would triple the footprint of the largest product;
a reference costs a few hundred bytes.

Where the referenced shards are looked up (`ShardStore`), by md5:

1. the shards of the previous build of this output folder, moved aside into a hidden
   `.pack-previous/` folder before the build starts (a direct `python -m stages.pack` run writes
   over them, and a later unit may still need an earlier shard's bytes);
2. the product's default release folder (`data/release/<product>/`, via its wids indexes), when
   the build writes elsewhere;
3. DVC's cache, `files/md5/<2>/<30>` under `.dvc/cache` (or the `cache.dir` of `.dvc/config`):
   `dvc repro` deletes a stage's outputs before it runs, but every committed shard is there.

Trust: bytes read through a reference must match its sha256, or the unit is encoded again; a
missing or unreadable shard is the same. A whole shard is reused only when its unit list is
exactly the one this build plans (the references tile the old file from offset 0 to its end),
and it is copied with its md5 checked. So a cached build cannot differ from a clean one unless
sha256 or md5 collide.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from stages.cache import Cache, Entry, canonical, code_version, work_key
from stages.pack import codec
from stages.pack import index as idx
from stages.pack.tarwriter import end_of_archive

PREVIOUS_DIR = ".pack-previous"
CHUNK = 1 << 20


def namespace(kind: str) -> str:
    return f"pack-{kind}"


def unit_code_version(kind_module: str, extra_modules: tuple[str, ...] = ()) -> str:
    """The code version of one product kind's units: the modules that shape their bytes."""
    modules = ("stages.pack.codec", "stages.pack.tarwriter", "stages.imaging", kind_module, *extra_modules)
    return code_version(*modules, libraries=("PIL", "numpy", "zlib"))


def digest(*parts: Any) -> str:
    """sha256 over bytes and JSON-able parts, each length-prefixed so parts cannot run together."""
    h = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else canonical(part)
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


@dataclass(frozen=True)
class Ref:
    """Where the bytes of one unit are: a span of a shard, known by the shard's md5."""

    shard_md5: str
    shard_size: int
    offset: int
    length: int
    sha256: str
    lengths: tuple[int, ...]  # per sample, in shard order
    keys: tuple[str, ...]  # sample keys, checked against the plan
    decodes: int

    def to_meta(self) -> dict[str, Any]:
        return {
            "shard_md5": self.shard_md5,
            "shard_size": self.shard_size,
            "offset": self.offset,
            "length": self.length,
            "sha256": self.sha256,
            "lengths": list(self.lengths),
            "keys": list(self.keys),
            "decodes": self.decodes,
        }

    @classmethod
    def from_entry(cls, entry: Entry) -> Ref:
        m = entry.meta
        ref = cls(
            str(m["shard_md5"]),
            int(m["shard_size"]),
            int(m["offset"]),
            int(m["length"]),
            str(m["sha256"]),
            tuple(int(n) for n in m["lengths"]),
            tuple(str(k) for k in m["keys"]),
            int(m["decodes"]),
        )
        if sum(ref.lengths) != ref.length or len(ref.keys) != len(ref.lengths) or not ref.keys:
            raise ValueError("inconsistent unit reference")
        return ref


def _dvc_cache_dir(root: Path) -> Path | None:
    """DVC's cache folder for the project at `root`: `cache.dir` of .dvc/config(.local), else
    .dvc/cache. Read with configparser (DVC's config is INI-shaped) to keep DVC out of the stage."""
    dvc_dir = root / ".dvc"
    if not dvc_dir.is_dir():
        return None
    configured: str | None = None
    for name in ("config", "config.local"):
        path = dvc_dir / name
        if not path.is_file():
            continue
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        if parser.has_option("cache", "dir"):
            configured = parser.get("cache", "dir").strip().strip("'\"")
    if configured:
        base = Path(configured)
        return base if base.is_absolute() else (dvc_dir / base)
    return dvc_dir / "cache"


def _indexed_shards(folder: Path) -> dict[str, Path]:
    """md5 -> shard file, from the wids indexes of an output folder (missing files skipped)."""
    out: dict[str, Path] = {}
    if not folder.is_dir():
        return out
    for split in ("train", "val", "test"):
        path = folder / idx.index_name(split)
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            entries = index["shardlist"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        for entry in entries if isinstance(entries, list) else []:
            try:
                shard = folder / str(entry["url"])
                md5 = str(entry["md5sum"])
            except (KeyError, TypeError):
                continue
            if "/" not in str(entry["url"]) and shard.is_file():
                out[md5] = shard
    return out


class ShardStore:
    """Finds earlier shards by md5 and reads spans of them, keeping a few files open."""

    def __init__(self, out_dir: Path, root: Path, product: str) -> None:
        self.out_dir = out_dir
        self.previous_dir = out_dir / PREVIOUS_DIR
        self.known: dict[str, Path] = {}
        default = root / "data" / "release" / product
        if default.resolve() != out_dir.resolve():
            self.known.update(_indexed_shards(default))
        self.dvc_cache = _dvc_cache_dir(root)
        self._open: OrderedDict[Path, BinaryIO] = OrderedDict()

    def set_aside(self) -> int:
        """Move the shards of the build this one replaces into `.pack-previous/<md5>.tar`, so that
        writing the new shards over their names cannot destroy bytes a later unit still needs.
        Returns how many shards were moved."""
        moved = 0
        current = _indexed_shards(self.out_dir)
        if current:
            self.previous_dir.mkdir(exist_ok=True)
        for md5, path in sorted(current.items()):
            target = self.previous_dir / f"{md5}.tar"
            try:
                if target.exists():
                    path.unlink()
                else:
                    os.replace(path, target)
                moved += 1
            except OSError:
                continue
        if self.previous_dir.is_dir():  # also what an interrupted build left
            for path in self.previous_dir.glob("*.tar"):
                self.known[path.stem] = path
        return moved

    def path(self, md5: str) -> Path | None:
        found = self.known.get(md5)
        if found is not None and found.is_file():
            return found
        if self.dvc_cache is not None and len(md5) == 32:
            candidate = self.dvc_cache / "files" / "md5" / md5[:2] / md5[2:]
            if candidate.is_file():
                return candidate
        return None

    def _handle(self, path: Path) -> BinaryIO:
        fh = self._open.get(path)
        if fh is None:
            fh = open(path, "rb")  # noqa: SIM115 - kept open across units, closed in close()
            self._open[path] = fh
            while len(self._open) > 8:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(path)
        return fh

    def read(self, ref: Ref) -> bytes | None:
        """The unit's bytes, verified against the reference's sha256; None when unavailable."""
        path = self.path(ref.shard_md5)
        if path is None:
            return None
        try:
            fh = self._handle(path)
            fh.seek(ref.offset)
            data = fh.read(ref.length)
        except OSError:
            return None
        if len(data) != ref.length or hashlib.sha256(data).hexdigest() != ref.sha256:
            return None
        return data

    def copy_shard(self, md5: str, size: int, dest: Path) -> bool:
        """Copy the shard with md5 `md5` to `dest` (atomically), checking md5 and size on the way.
        A reflink is tried first (a copy-on-write clone on btrfs/XFS costs no data blocks); the
        bytes are still read once for the md5."""
        src = self.path(md5)
        if src is None:
            return False
        tmp = dest.with_name(f".{dest.name}.reuse.tmp")
        try:
            got = _md5_of(tmp) if _reflink(src, tmp) else _copy_hashing(src, tmp)
            if tmp.stat().st_size != size or got != md5:
                tmp.unlink(missing_ok=True)
                return False
            os.chmod(tmp, 0o644)  # DVC cache files are read-only; the workspace copy is not
            os.replace(tmp, dest)
            return True
        except OSError:
            tmp.unlink(missing_ok=True)
            return False

    def close(self) -> None:
        for fh in self._open.values():
            fh.close()
        self._open.clear()

    def discard_previous(self) -> None:
        """After a successful build: the set-aside shards are no longer anyone's output."""
        self.close()
        if self.previous_dir.is_dir():
            shutil.rmtree(self.previous_dir, ignore_errors=True)


def _reflink(src: Path, dest: Path) -> bool:
    try:
        import fcntl

        ficlone = 0x40049409  # linux/fs.h FICLONE
        with open(src, "rb") as s, open(dest, "wb") as d:
            fcntl.ioctl(d.fileno(), ficlone, s.fileno())
        return True
    except (OSError, ImportError, AttributeError):
        dest.unlink(missing_ok=True)
        return False


def _copy_hashing(src: Path, dest: Path) -> str:
    """Copy `src` to `dest`, returning the md5 of the bytes written."""
    h = hashlib.md5()
    with open(src, "rb") as s, open(dest, "wb") as d:
        while chunk := s.read(CHUNK):
            h.update(chunk)
            d.write(chunk)
    return h.hexdigest()


def _md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tiles_whole_shard(refs: list[Ref]) -> bool:
    """Do `refs`, in order, cover one earlier shard exactly (same units, same order, nothing else)?
    Then that shard's file is this shard's bytes: the tar is the units' bytes plus the end blocks."""
    if not refs:
        return False
    md5, size = refs[0].shard_md5, refs[0].shard_size
    offset = 0
    for ref in refs:
        if ref.shard_md5 != md5 or ref.offset != offset:
            return False
        offset += ref.length
    return offset + len(end_of_archive(offset)) == size


class UnitCache:
    """Work keys and references of one product's units."""

    def __init__(self, cache: Cache, kind: str, code: str, settings: dict[str, Any]) -> None:
        self.cache = cache
        self.kind = kind
        self.code = code
        self.settings = {**settings, "codecs": codec.codec_versions()}

    @property
    def enabled(self) -> bool:
        return self.cache.enabled

    def key(self, inputs: Any) -> str:
        return work_key(namespace(self.kind), self.code, self.settings, inputs)

    def lookup(self, key: str) -> Ref | None:
        entry = self.cache.get(key)
        if entry is None:
            return None
        try:
            return Ref.from_entry(entry)
        except (ValueError, KeyError, TypeError):
            self.cache.count("corrupt")
            return None

    def store(self, key: str, ref: Ref) -> None:
        self.cache.put(key, Entry(ref.to_meta()))

    def count(self, what: str, n: int = 1) -> None:
        self.cache.count(what, n)
