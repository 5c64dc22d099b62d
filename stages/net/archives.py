"""Safe archive extraction: zips into a temp dir then moved into place, tar.gz read as a stream.

Archives are hostile input. Before a single byte is written, every zip member is checked:
no absolute paths, `..`, backslashes or drive letters, no links or device files, no member
larger than `limits.max_member_bytes` or inflating more than `limits.max_compression_ratio`.
A refused archive raises UnsafeArchiveError and leaves nothing half-extracted.
"""

from __future__ import annotations

import hashlib
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

# Small members may legitimately compress very well (a mask of zeros); below this size a high
# ratio cannot hurt, so only larger members are held to `max_compression_ratio`.
RATIO_FLOOR_BYTES = 1 << 20
COPY_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ArchiveLimits:
    """The archive bounds from `limits:` in params.yaml."""

    max_member_bytes: int = 4 << 30
    max_compression_ratio: float = 200.0

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ArchiveLimits:
        limits = params.get("limits") or {}
        return cls(
            max_member_bytes=int(limits.get("max_member_bytes", cls.max_member_bytes)),
            max_compression_ratio=float(limits.get("max_compression_ratio", cls.max_compression_ratio)),
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


def _check_zip_member(archive: Path, info: zipfile.ZipInfo, limits: ArchiveLimits) -> str | None:
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
    if info.file_size >= RATIO_FLOOR_BYTES:
        ratio = info.file_size / info.compress_size if info.compress_size else float("inf")
        if ratio > limits.max_compression_ratio:
            raise UnsafeArchiveError(
                archive,
                info.filename,
                f"compression ratio {ratio:.0f} exceeds "
                f"max_compression_ratio={limits.max_compression_ratio:g}",
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


def check_zip(archive: str | Path, limits: ArchiveLimits) -> list[tuple[zipfile.ZipInfo, str | None]]:
    """Validate every member of a zip without extracting; returns (info, safe path or None for dirs)."""
    archive = Path(archive)
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise UpstreamFormatError(archive, f"not a readable zip archive: {exc}") from None
    checked: list[tuple[zipfile.ZipInfo, str | None]] = []
    seen: dict[str, str] = {}
    for info in infos:
        name = _check_zip_member(archive, info, limits)
        if name is not None:
            # Two entries for one path (or differing only in case) would let one overwrite the other.
            folded = name.casefold()
            if folded in seen:
                raise UnsafeArchiveError(archive, info.filename, f"duplicates member {seen[folded]!r}")
            seen[folded] = info.filename
        checked.append((info, name))
    return checked


def safe_extract_zip(
    archive: str | Path,
    dest: str | Path,
    limits: ArchiveLimits,
    *,
    replace: bool = True,
    tmp_parent: str | Path | None = None,
) -> list[ExtractedFile]:
    """Extract a zip safely; returns the files written, sorted by name.

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
    checked = check_zip(archive, limits)
    parent = Path(tmp_parent) if tmp_parent else (dest.parent if replace else dest)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=parent))
    extracted: list[ExtractedFile] = []
    try:
        with zipfile.ZipFile(archive) as zf:
            for info, name in checked:
                if name is None:
                    (tmp / safe_member_path(archive, info.filename)).mkdir(parents=True, exist_ok=True)
                    continue
                target = tmp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src:
                    size, md5 = _copy_counted(src, target, info.file_size, archive, info.filename)
                extracted.append(ExtractedFile(name, size, md5))
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
        raise UpstreamFormatError(archive, f"corrupt zip archive: {exc}") from None
    except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
        raise UnsafeArchiveError(archive, str(exc.filename or ""), f"conflicting paths: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    extracted.sort(key=lambda f: f.name)
    return extracted


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
    wherever they appear); kept members are written atomically. The caller stages `dest` and
    moves it into place after verifying the stream's checksum. `on_member` sees every path.
    """
    dest = Path(dest)
    extracted: list[ExtractedFile] = []
    try:
        with tarfile.open(fileobj=fileobj, mode="r|gz") as tf:
            for member in tf:
                name = safe_member_path(archive, member.name)
                if member.issym() or member.islnk():
                    raise UnsafeArchiveError(archive, member.name, f"link to {member.linkname!r}")
                if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
                    raise UnsafeArchiveError(archive, member.name, "device or special file")
                if member.isdir():
                    continue
                if not member.isreg():
                    raise UnsafeArchiveError(archive, member.name, "unsupported member type")
                if on_member is not None:
                    on_member(name)
                if not keep(name):
                    continue
                if member.size > limits.max_member_bytes:
                    raise UnsafeArchiveError(
                        archive,
                        member.name,
                        f"{member.size} bytes exceeds max_member_bytes={limits.max_member_bytes}",
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
