"""Safe archive extraction: zips into a temp dir then moved into place, tar.gz read as a stream.

Archives are hostile input. Before a single byte is written, every zip member is checked:
no absolute paths, `..`, backslashes or drive letters, no links or device files, no duplicate
names and no path that is a file in one entry and a folder in another, no member larger than
`limits.max_member_bytes` or inflating more than `limits.max_compression_ratio` (every member,
however small), and no more than `limits.max_extract_bytes` in all. A tar.gz stream is held to
the same rules as it passes: its gzip layer is inflated here, so the ratio is measured on the
bytes actually produced, not on what the tar headers claim. A refused archive raises
UnsafeArchiveError naming the archive (its URL where the caller gives one) and the member.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from stages.errors import UnsafeArchiveError, UpstreamFormatError
from stages.fsutil import atomic_path
from stages.net import replace_tree

log = logging.getLogger(__name__)

COPY_CHUNK = 1 << 20
# A zip member's ratio is its size over the bytes it occupies in the archive: its compressed data
# plus its local header and central-directory entry (30 + 46 bytes, each with the name). A tiny
# file of zeros then passes, while a zip of many small bombs still cannot outgrow the ratio.
ZIP_ENTRY_OVERHEAD = 76
# The gzip layer of a tar.gz is checked over stretches of this many inflated bytes: short enough to
# stop a bomb after a few MiB, long enough that read-ahead does not blur the measurement.
RATIO_STRETCH_BYTES = 1 << 20
GZIP_READ = 1 << 16
GZIP_STEP = 16 << 10
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ArchiveLimits:
    """The archive bounds from `limits:` in params.yaml."""

    max_member_bytes: int = 4 << 30
    max_compression_ratio: float = 200.0
    max_extract_bytes: int = 256 << 30  # all members of one archive together

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ArchiveLimits:
        limits = params.get("limits") or {}
        return cls(
            max_member_bytes=int(limits.get("max_member_bytes", cls.max_member_bytes)),
            max_compression_ratio=float(limits.get("max_compression_ratio", cls.max_compression_ratio)),
            max_extract_bytes=int(limits.get("max_extract_bytes", cls.max_extract_bytes)),
        )


@dataclass(frozen=True)
class ExtractedFile:
    """One regular file written from an archive: its posix path relative to the target, size, md5."""

    name: str
    size: int
    md5: str


def safe_member_path(archive: str | Path, name: str) -> str:
    """The member's relative posix path, or UnsafeArchiveError if it could escape the target."""
    if "\x00" in name:
        raise UnsafeArchiveError(archive, name, "NUL byte in the name")
    if "\\" in name:
        raise UnsafeArchiveError(archive, name, "backslash in the name (a Windows path trick)")
    if name.startswith("/"):
        raise UnsafeArchiveError(archive, name, "absolute path")
    if _DRIVE.match(name):
        raise UnsafeArchiveError(archive, name, "drive letter in the name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafeArchiveError(archive, name, "'..' component escapes the target folder")
    if not parts:
        raise UnsafeArchiveError(archive, name, "empty name")
    return "/".join(parts)


def _zip_mode(info: zipfile.ZipInfo) -> int:
    # Unix permission and type bits live in the high half of external_attr when made on Unix.
    return (info.external_attr >> 16) & 0xFFFF if info.create_system == 3 else 0


def _check_zip_member(archive: str | Path, info: zipfile.ZipInfo, limits: ArchiveLimits) -> str | None:
    """Validate one member; return its safe relative path (None for a directory entry)."""
    name = safe_member_path(archive, info.filename)
    mode = _zip_mode(info)
    if stat.S_ISLNK(mode):
        raise UnsafeArchiveError(archive, info.filename, "symbolic link")
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise UnsafeArchiveError(archive, info.filename, "device or special file")
    if info.is_dir() or stat.S_ISDIR(mode):
        return None
    if info.flag_bits & 0x1:
        raise UnsafeArchiveError(archive, info.filename, "encrypted member")
    if info.file_size > limits.max_member_bytes:
        raise UnsafeArchiveError(
            archive,
            info.filename,
            f"{info.file_size} bytes exceeds max_member_bytes={limits.max_member_bytes}",
        )
    footprint = info.compress_size + ZIP_ENTRY_OVERHEAD + 2 * len(info.filename.encode("utf-8"))
    ratio = info.file_size / footprint
    if ratio > limits.max_compression_ratio:
        raise UnsafeArchiveError(
            archive,
            info.filename,
            f"compression ratio {ratio:.0f} exceeds max_compression_ratio={limits.max_compression_ratio:g}",
        )
    return name


def _copy_counted(
    src: IO[bytes], dest: Path, limit: int, archive: str | Path, member: str
) -> tuple[int, str]:
    """Copy a member stream to `dest` atomically, never writing more than `limit` bytes."""
    md5 = hashlib.md5(usedforsecurity=False)
    size = 0
    with atomic_path(dest) as tmp, open(tmp, "wb") as out:
        while chunk := src.read(COPY_CHUNK):
            size += len(chunk)
            if size > limit:
                raise UnsafeArchiveError(archive, member, f"inflates beyond {limit} bytes")
            md5.update(chunk)
            out.write(chunk)
    return size, md5.hexdigest()


class PathTree:
    """The paths an archive has written so far: refuses duplicates and file/folder clashes.

    Two entries for one path (or differing only in case, which is one file on macOS and
    Windows) would let the last one win; a path that is a file in one entry and a folder in
    another cannot be extracted at all. Both are refused naming both members.
    """

    def __init__(self, archive: str | Path) -> None:
        self.archive = archive
        self._files: dict[str, str] = {}  # casefolded path -> member name as written
        self._dirs: dict[str, str] = {}  # casefolded folder -> the member that made it one

    def _refuse(self, member: str, problem: str) -> None:
        raise UnsafeArchiveError(self.archive, member, problem)

    def add_dir(self, path: str, member: str) -> None:
        folded = path.casefold()
        if folded in self._files:
            self._refuse(member, f"is a folder, but member {self._files[folded]!r} is a file of that name")
        self._dirs.setdefault(folded, member)
        self._add_parents(path, member)

    def add_file(self, path: str, member: str) -> None:
        folded = path.casefold()
        if folded in self._files:
            self._refuse(member, f"duplicates member {self._files[folded]!r}")
        if folded in self._dirs:
            self._refuse(member, f"is a file, but member {self._dirs[folded]!r} makes it a folder")
        self._add_parents(path, member)
        self._files[folded] = member

    def _add_parents(self, path: str, member: str) -> None:
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i]).casefold()
            if parent in self._files:
                self._refuse(member, f"lies inside {self._files[parent]!r}, which is a file")
            self._dirs.setdefault(parent, member)


def check_zip(
    archive: str | Path, limits: ArchiveLimits, *, name: str | None = None
) -> list[tuple[zipfile.ZipInfo, str | None]]:
    """Validate every member of a zip without extracting; returns (info, safe path or None for dirs).

    `name` is what errors call the archive (its URL, when `archive` is a scratch copy).
    """
    label = name or str(archive)
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise UpstreamFormatError(label, f"not a readable zip archive: {exc}") from None
    checked: list[tuple[zipfile.ZipInfo, str | None]] = []
    tree = PathTree(label)
    total = 0
    for info in infos:
        path = _check_zip_member(label, info, limits)
        if path is None:
            tree.add_dir(safe_member_path(label, info.filename), info.filename)
        else:
            tree.add_file(path, info.filename)
            total += info.file_size
            if total > limits.max_extract_bytes:
                raise UnsafeArchiveError(
                    label,
                    info.filename,
                    f"the members up to this one hold {total} bytes, over "
                    f"max_extract_bytes={limits.max_extract_bytes}",
                )
        checked.append((info, path))
    return checked


def safe_extract_zip(
    archive: str | Path,
    dest: str | Path,
    limits: ArchiveLimits,
    *,
    replace: bool = True,
    tmp_parent: str | Path | None = None,
    name: str | None = None,
) -> list[ExtractedFile]:
    """Extract a zip safely; returns the files written, sorted by name.

    `name` is what errors call the archive (its URL, when `archive` is a scratch copy).

    Everything is extracted into a temp dir first. With `replace=True`, `dest` then becomes
    exactly the archive's tree (what was there before is swapped out); with `replace=False`
    each top-level entry of the archive replaces the same-named entry in `dest` and other
    entries of `dest` stay. The temp dir lives in `tmp_parent` (default: beside `dest` when
    replacing, inside it when merging), so the final moves are renames on one filesystem and
    a run killed halfway leaves its debris inside the fetch's own output, where the next
    run's mirroring removes it.
    """
    archive = Path(archive)
    dest = Path(dest)
    label = name or str(archive)
    checked = check_zip(archive, limits, name=label)
    parent = Path(tmp_parent) if tmp_parent else (dest.parent if replace else dest)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=parent))
    extracted: list[ExtractedFile] = []
    try:
        with zipfile.ZipFile(archive) as zf:
            for info, path in checked:
                if path is None:
                    (tmp / safe_member_path(label, info.filename)).mkdir(parents=True, exist_ok=True)
                    continue
                target = tmp / path
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src:
                    size, md5 = _copy_counted(src, target, info.file_size, label, info.filename)
                extracted.append(ExtractedFile(path, size, md5))
        if replace:
            replace_tree(tmp, dest)
        else:
            dest.mkdir(parents=True, exist_ok=True)
            for entry in sorted(tmp.iterdir()):
                if entry.is_dir():
                    replace_tree(entry, dest / entry.name)
                else:
                    os.replace(entry, dest / entry.name)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise UpstreamFormatError(label, f"corrupt zip archive: {exc}") from None
    except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
        # PathTree refuses clashes up front; this is what is left (a case-insensitive disk).
        where = Path(str(exc.filename or "")).name
        raise UnsafeArchiveError(label, where, f"conflicting paths: {exc.strerror}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    extracted.sort(key=lambda f: f.name)
    return extracted


class GunzipGuard(io.RawIOBase):
    """The inflated bytes of a gzip stream, refused when they outgrow the compressed ones.

    tarfile's own gzip layer cannot be watched; this one feeds the inflater at most
    GZIP_STEP compressed bytes at a time (so one call yields at most ~1032 times that, which
    bounds memory) and compares, over each stretch of output, the bytes handed out with the
    compressed bytes consumed: a member of honest header size whose gzip data is a bomb is
    stopped a few MiB in. The reader sets `member` to name what is being read. Concatenated
    gzip members (pigz, appended archives) are read one after another.
    """

    def __init__(self, raw: IO[bytes], limits: ArchiveLimits, archive: str) -> None:
        super().__init__()
        self._raw = raw
        self._ratio = limits.max_compression_ratio
        self._archive = archive
        self._inflater = zlib.decompressobj(wbits=31)
        self._input = b""  # compressed bytes read, not yet fed
        self._out = b""
        self._out_pos = 0
        self._done = False
        self._stretch_in = 0
        self._stretch_out = 0
        self.member = "(gzip header)"

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while self._out_pos >= len(self._out):
            if self._done:
                return 0
            self._inflate_some()
        n = min(len(view), len(self._out) - self._out_pos)
        view[:n] = self._out[self._out_pos : self._out_pos + n]
        self._out_pos += n
        # Counted as handed out, not as inflated: by the time a stretch is judged, the reader has
        # parsed the header of the member it belongs to, so the error can name that member.
        self._count(0, n)
        return n

    def _inflate_some(self) -> None:
        if len(self._input) < 2:
            self._input += self._raw.read(GZIP_READ)
        if not self._input:
            if not self._inflater.eof:
                raise EOFError("the compressed stream ends inside a gzip member")
            self._done = True
            return
        if self._inflater.eof:
            if self._input[:2] != b"\x1f\x8b":
                self._done = True  # padding after the last gzip member
                return
            self._inflater = zlib.decompressobj(wbits=31)
        piece, self._input = self._input[:GZIP_STEP], self._input[GZIP_STEP:]
        out = self._inflater.decompress(piece)
        consumed = len(piece)
        if self._inflater.eof and self._inflater.unused_data:
            consumed -= len(self._inflater.unused_data)
            self._input = self._inflater.unused_data + self._input
        self._out, self._out_pos = out, 0
        self._count(consumed, 0)

    def _count(self, consumed: int, produced: int) -> None:
        self._stretch_in += consumed
        self._stretch_out += produced
        if self._stretch_out < RATIO_STRETCH_BYTES:
            return
        ratio = self._stretch_out / max(1, self._stretch_in)
        if ratio > self._ratio:
            raise UnsafeArchiveError(
                self._archive,
                self.member,
                f"gzip data inflates {ratio:.0f}:1, over max_compression_ratio={self._ratio:g}",
            )
        self._stretch_in = self._stretch_out = 0


def extract_tar_stream(
    fileobj: IO[bytes],
    dest: str | Path,
    keep: Callable[[str], bool],
    limits: ArchiveLimits,
    archive: str,
    on_member: Callable[[str], Any] | None = None,
) -> list[ExtractedFile]:
    """Read a tar.gz stream once, writing the regular files whose path passes `keep` under `dest`.

    Every member is checked as it passes (links, devices, absolute paths and `..` are refused
    wherever they appear; the gzip layer is held to `max_compression_ratio` on the bytes it
    really produces); kept members are written atomically, never two to one path or a file
    where a folder must be, and no more than `max_extract_bytes` in all. The caller stages
    `dest` and moves it into place after verifying the stream's checksum. `on_member` sees
    every path.
    """
    dest = Path(dest)
    extracted: list[ExtractedFile] = []
    tree = PathTree(archive)
    total = 0
    gunzip = GunzipGuard(fileobj, limits, archive)
    try:
        # No read-ahead buffer between: tarfile asks for one 10 KiB record at a time, so the
        # guard's stretches line up with the member tarfile is reading.
        with tarfile.open(fileobj=gunzip, mode="r|") as tf:
            for member in tf:
                gunzip.member = member.name
                name = safe_member_path(archive, member.name)
                if member.issym() or member.islnk():
                    raise UnsafeArchiveError(archive, member.name, f"link to {member.linkname!r}")
                if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
                    raise UnsafeArchiveError(archive, member.name, "device or special file")
                if member.isdir():
                    tree.add_dir(name, member.name)
                    continue
                if not member.isreg():
                    raise UnsafeArchiveError(archive, member.name, "unsupported member type")
                if on_member is not None:
                    on_member(name)
                if not keep(name):
                    continue
                tree.add_file(name, member.name)
                if member.size > limits.max_member_bytes:
                    raise UnsafeArchiveError(
                        archive,
                        member.name,
                        f"{member.size} bytes exceeds max_member_bytes={limits.max_member_bytes}",
                    )
                total += member.size
                if total > limits.max_extract_bytes:
                    raise UnsafeArchiveError(
                        archive,
                        member.name,
                        f"the kept members up to this one hold {total} bytes, over "
                        f"max_extract_bytes={limits.max_extract_bytes}",
                    )
                src = tf.extractfile(member)
                if src is None:
                    raise UnsafeArchiveError(archive, member.name, "unreadable member")
                size, md5 = _copy_counted(src, dest / name, member.size, archive, member.name)
                if size != member.size:
                    raise UpstreamFormatError(archive, f"member {member.name!r} truncated")
                extracted.append(ExtractedFile(name, size, md5))
    except (tarfile.TarError, zlib.error, EOFError) as exc:
        raise UpstreamFormatError(archive, f"not a readable tar.gz stream: {exc}") from None
    extracted.sort(key=lambda f: f.name)
    return extracted
