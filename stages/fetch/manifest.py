"""Bookkeeping shared by the fetchers: manifest.csv, archives.csv, the run report, mirroring.

`manifest.csv` (key,size,md5,etag,url,verified) lists every file of `data/raw/<source>/`, sorted
by key. `archives.csv` (key,size,md5,etag,url,selection,verified) remembers the archives a fetch
extracted and then deleted (Coast Train zips, the iNat JSON zips and tar.gz, Seatizen's
images.zip), so a re-run can tell that the upstream archive is unchanged without downloading it
again. `selection` records what was kept from an archive read only in part (the iNat
supercategories). Neither file lists itself or the other. `etag` is the upstream ETag without its
surrounding quotes. `verified` says what the bytes were checked against (`stages.net`):
`md5` (a checksum the source gave), `size` (only the announced size) or `none` (nothing; only
with `net.accept_unverified`); a file from an archive has its archive's value. Files written
before the column existed are read with an empty `verified`, which the next fetch fills in.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from stages.errors import UpstreamFormatError
from stages.fsutil import write_text

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
ARCHIVES_NAME = "archives.csv"
BOOKKEEPING = frozenset({MANIFEST_NAME, ARCHIVES_NAME})
MANIFEST_COLUMNS = ("key", "size", "md5", "etag", "url", "verified")
ARCHIVE_COLUMNS = ("key", "size", "md5", "etag", "url", "selection", "verified")
# The shapes before `verified`: still read, so an upgrade re-downloads nothing.
_LEGACY = {
    MANIFEST_COLUMNS: ("key", "size", "md5", "etag", "url"),
    ARCHIVE_COLUMNS: ("key", "size", "md5", "etag", "url", "selection"),
}


@dataclass(frozen=True)
class ManifestRow:
    key: str
    size: int
    md5: str
    etag: str
    url: str
    verified: str  # stages.net.VERIFIED_MD5 / VERIFIED_SIZE / UNVERIFIED ('' from a legacy file)


@dataclass(frozen=True)
class ArchiveRow:
    key: str
    size: int
    md5: str
    etag: str
    url: str
    verified: str
    selection: str = ""


def _read_rows(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    reader = csv.DictReader(io.StringIO(text))
    found = tuple(reader.fieldnames or ())
    if found == _LEGACY[columns]:
        return [{**r, "verified": ""} for r in reader]
    if found != columns:
        # Our own bookkeeping in an unknown shape: forget it, the fetch re-downloads what it must.
        log.warning("%s: unexpected columns %s; ignoring it", path, reader.fieldnames)
        return []
    return list(reader)


def _write_rows(path: Path, columns: tuple[str, ...], rows: Iterable[tuple[Any, ...]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(sorted(rows, key=lambda r: r[0]))
    write_text(path, buf.getvalue())


def read_manifest(out_dir: Path) -> dict[str, ManifestRow]:
    """The previous run's manifest of `out_dir` (empty if there is none or it is unreadable)."""
    rows: dict[str, ManifestRow] = {}
    for r in _read_rows(Path(out_dir) / MANIFEST_NAME, MANIFEST_COLUMNS):
        try:
            rows[r["key"]] = ManifestRow(
                r["key"], int(r["size"]), r["md5"], r["etag"], r["url"], r["verified"]
            )
        except (TypeError, ValueError):
            return {}
    return rows


def write_manifest(out_dir: Path, rows: Iterable[ManifestRow]) -> None:
    """Write manifest.csv atomically, sorted by key."""
    _write_rows(
        Path(out_dir) / MANIFEST_NAME,
        MANIFEST_COLUMNS,
        ((r.key, r.size, r.md5, r.etag, r.url, r.verified) for r in rows),
    )


def read_archives(out_dir: Path) -> dict[str, ArchiveRow]:
    rows: dict[str, ArchiveRow] = {}
    for r in _read_rows(Path(out_dir) / ARCHIVES_NAME, ARCHIVE_COLUMNS):
        try:
            rows[r["key"]] = ArchiveRow(
                r["key"], int(r["size"]), r["md5"], r["etag"], r["url"], r["verified"], r["selection"]
            )
        except (TypeError, ValueError):
            return {}
    return rows


def write_archives(out_dir: Path, rows: Iterable[ArchiveRow]) -> None:
    _write_rows(
        Path(out_dir) / ARCHIVES_NAME,
        ARCHIVE_COLUMNS,
        ((r.key, r.size, r.md5, r.etag, r.url, r.selection, r.verified) for r in rows),
    )


def with_url(row: ManifestRow, url: str, verified: str | None = None) -> ManifestRow:
    """A reused row with the URL of this run's endpoint (outputs must not depend on history),
    and `verified` when given (a legacy row has none; the caller knows what applies)."""
    verified = row.verified if verified is None else verified
    return row if (row.url, row.verified) == (url, verified) else replace(row, url=url, verified=verified)


def local_size(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def rows_present(out_dir: Path, rows: Iterable[ManifestRow]) -> bool:
    """True when every row's file exists under `out_dir` with the recorded size."""
    return all(local_size(Path(out_dir) / r.key) == r.size for r in rows)


def safe_key(key: str, where: str) -> str:
    """A relative posix path that stays inside the output folder, else UpstreamFormatError."""
    parts = key.split("/")
    if (
        not key
        or key.startswith("/")
        or "\\" in key
        or "\x00" in key
        or any(p in ("", ".", "..") for p in parts)
        or (len(parts[0]) >= 2 and parts[0][1] == ":")
    ):
        raise UpstreamFormatError(where, f"unsafe file name {key!r} (would leave the output folder)")
    return key


def prune(out_dir: Path, keep: set[str]) -> list[str]:
    """Delete files under `out_dir` not in `keep` (mirror semantics); returns the removed keys.

    Bookkeeping files at the top level stay. Empty folders left behind are removed too.
    """
    out_dir = Path(out_dir)
    removed: list[str] = []
    if not out_dir.is_dir():
        return removed
    for root, dirs, files in os.walk(out_dir, topdown=False):
        rel_root = Path(root).relative_to(out_dir)
        for name in files:
            key = (rel_root / name).as_posix()
            if key in keep or (rel_root == Path(".") and name in BOOKKEEPING):
                continue
            (Path(root) / name).unlink()
            removed.append(key)
        for name in dirs:
            path = Path(root) / name
            if path.is_symlink():
                path.unlink()
                removed.append((rel_root / name).as_posix())
            elif not any(path.iterdir()):
                path.rmdir()
    removed.sort()
    if removed:
        log.info("%s: removed %d file(s) no longer upstream", out_dir, len(removed))
    return removed


@dataclass
class FetchReport:
    """What one fetch did; printed to stderr, never written to outputs."""

    source: str
    downloaded: int = 0  # files (or archives) transferred in this run
    bytes_downloaded: int = 0
    unchanged: int = 0  # upstream files (or archives) already present and unchanged
    removed: int = 0  # local files deleted because upstream no longer has them
    extracted: int = 0  # archive members written
    missing: int = 0  # referenced upstream but absent (logged; downstream quarantines)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (
            f"fetch {self.source}: {self.downloaded} downloaded ({_human(self.bytes_downloaded)}), "
            f"{self.unchanged} unchanged, {self.removed} removed"
        )
        if self.extracted:
            text += f", {self.extracted} extracted"
        if self.missing:
            text += f", {self.missing} missing upstream"
        return text


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def archive_unchanged(
    prev: ArchiveRow | None,
    size: int | None,
    etag: str,
    md5: str | None,
    selection: str = "",
) -> bool:
    """Does the remembered archive match what upstream offers now?

    Size must match; ETag and md5 must match wherever both sides know one. With neither a size
    nor an ETag nor an md5 from upstream there is no way to tell, so the answer is no.
    """
    if prev is None or prev.selection != selection:
        return False
    if size is None and not etag and not md5:
        return False
    if size is not None and prev.size != size:
        return False
    if etag and prev.etag and prev.etag != etag:
        return False
    return not (md5 and prev.md5 and prev.md5 != md5.lower())
