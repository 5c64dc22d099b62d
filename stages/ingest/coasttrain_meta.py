"""A Coast Train record's metadata CSV, read as data that may be damaged, and the group keys.

Encoding: the release's CSVs are latin-1 (SOURCES §4; every byte is a latin-1 character, so the
file always decodes). A file that is valid UTF-8 (a re-export; a UTF-8 BOM is dropped) is read as
UTF-8 instead: latin-1 text with non-ASCII letters is practically never valid UTF-8, and reading a
UTF-8 `año` as latin-1 would turn it into `aÃ±o` and break the join with the npz names. The check
streams the file (an incremental strict UTF-8 decoder), it is not held twice.

Rows: the header must name the REQUIRED_COLUMNS (any order; a name given twice is a format
change). A header without any data row is a record that lost its metadata: the stage fails rather
than ingest every npz without it. Each data record (its physical start line is its id) becomes a
`Row`: a row the csv module cannot parse (a field over its 128 KiB limit, a NUL byte) or with
another number of fields than the header (past trailing empty ones) is kept as a `problem`, to be
quarantined as `bad_record`; the reader carries on at the next line.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import datetime as dt
import math
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from stages.errors import UpstreamFormatError
from stages.ingest.common import long_field

FILE_COLUMN = "annotation_image_filename"
# Columns the join and the metadata need (the class list comes from each npz, not the CSV);
# the real CSVs order them differently, all have them.
REQUIRED_COLUMNS = (
    FILE_COLUMN,
    "year",
    "month",
    "day",
    "LonMin",
    "LonMax",
    "LatMin",
    "LatMax",
    "px_size_m",
    "epsg",
    "CRS",
)
_NULL_CELLS = {"", "n/a", "na", "nan", "none", "null"}
_CHUNK = 1 << 20


def csv_encoding(path: Path) -> str:
    """`utf-8-sig` when the whole file is valid UTF-8, else `latin-1` (module docstring)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    with open(path, "rb") as fh:
        try:
            while chunk := fh.read(_CHUNK):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return "latin-1"
    return "utf-8-sig"


def npz_key(cell: str) -> str:
    """`npz/x.npz`, `/npz/x.npz`, `x.npz` (any slashes) -> `x.npz`, NFC-normalised."""
    name = PurePosixPath(cell.strip().replace("\\", "/")).name
    return unicodedata.normalize("NFC", name)


@dataclass(frozen=True)
class Metadata:
    csv_name: str
    lat: float | None
    lon: float | None
    captured_at: str | None
    geo: dict[str, Any]


@dataclass(frozen=True)
class Row:
    line: int  # physical line the record starts on
    key: str  # npz_key of the file cell ("" when empty or unparsed)
    cell: str
    metadata: Metadata | None
    problem: str | None = None


@dataclass(frozen=True)
class MetadataCsv:
    path: Path
    encoding: str
    rows: list[Row]


def _records(path: Path, encoding: str) -> Iterator[tuple[int, list[str] | None, str | None]]:
    """(start line, fields or None, error) per record; blank lines are not records."""
    with open(path, encoding=encoding, newline="") as fh:
        reader = csv.reader(fh)
        while True:
            start = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                # The reader starts over at the next line: one bad record, not a lost file.
                yield start, None, str(exc)
                continue
            if fields:
                too_long = long_field(fields)
                yield (start, None, too_long) if too_long else (start, fields, None)


def read_metadata_csv(path: Path) -> MetadataCsv:
    """The rows of one record's metadata CSV; a reshaped or empty CSV is an UpstreamFormatError."""
    encoding = csv_encoding(path)
    try:
        with contextlib.closing(_records(path, encoding)) as records:
            first = next(records, None)
            if first is None:
                raise UpstreamFormatError(
                    path, f"empty metadata CSV: expected a header with {list(REQUIRED_COLUMNS)}"
                )
            _, header, error = first
            if header is None:
                raise UpstreamFormatError(path, f"line 1: the header does not parse: {error}")
            fields = [f.strip() for f in header]
            missing = [c for c in REQUIRED_COLUMNS if c not in fields]
            if missing:
                raise UpstreamFormatError(
                    path,
                    f"expected columns {list(REQUIRED_COLUMNS)} (any order); missing {missing}, "
                    f"found {fields}",
                )
            twice = sorted({f for f in fields if fields.count(f) > 1})
            if twice:
                raise UpstreamFormatError(path, f"columns {twice} appear more than once in the header")
            rows = [_row(path.name, fields, line, values, error) for line, values, error in records]
    except UnicodeDecodeError as exc:
        # Only if the file changed between the encoding check and this read: never read leniently.
        raise UpstreamFormatError(path, f"not {encoding}: {exc}") from exc
    if not rows:
        raise UpstreamFormatError(
            path, "the metadata CSV has a header but no data rows: the record lost its metadata"
        )
    return MetadataCsv(path, encoding, rows)


def _row(csv_name: str, fields: list[str], line: int, values: list[str] | None, error: str | None) -> Row:
    if values is None:
        return Row(line, "", "", None, f"line {line}: does not parse as CSV: {error}")
    if len(values) > len(fields) and not any(v.strip() for v in values[len(fields) :]):
        values = values[: len(fields)]
    if len(values) != len(fields):
        return Row(
            line, "", "", None, f"line {line}: {len(values)} fields where the header has {len(fields)}"
        )
    cells = dict(zip(fields, values))
    cell = cells[FILE_COLUMN]
    return Row(line, npz_key(cell) if cell.strip() else "", cell, metadata(csv_name, cells))


# --- cells ---------------------------------------------------------------------------------------


def _float(cell: str | None) -> float | None:
    if cell is None or cell.strip().strip('"').lower() in _NULL_CELLS:
        return None
    try:
        value = float(cell.strip().strip('"'))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _int(cell: str | None) -> int | None:
    value = _float(cell)
    return int(value) if value is not None and value.is_integer() else None


def _text(cell: str | None) -> str | None:
    # NAIP's CRS cell carries literal quotes ('"NAD83 / UTM zone 17N"').
    value = (cell or "").strip().strip('"').strip()
    return None if value.lower() in _NULL_CELLS else value


def _centre(lo: float | None, hi: float | None, bound: float) -> float | None:
    if lo is None or hi is None or abs(lo) > bound or abs(hi) > bound:
        return None
    return (lo + hi) / 2


def _captured_at(row: dict[str, str]) -> str | None:
    year, month, day = _int(row.get("year")), _int(row.get("month")), _int(row.get("day"))
    if year is None or month is None or day is None:
        return None
    hms = [_int(row.get(k)) for k in ("hour", "minute", "second")]
    try:
        if any(v is None for v in hms):
            return dt.date(year, month, day).isoformat()
        return dt.datetime(year, month, day, *hms).isoformat()  # type: ignore[misc]
    except (ValueError, OverflowError):
        return None


def metadata(csv_name: str, row: dict[str, str]) -> Metadata:
    lat_min, lat_max = _float(row.get("LatMin")), _float(row.get("LatMax"))
    lon_min, lon_max = _float(row.get("LonMin")), _float(row.get("LonMax"))
    geo = {
        "epsg": _int(row.get("epsg")),
        "crs": _text(row.get("CRS")),
        "px_size_m": _float(row.get("px_size_m")),
        "lat_min": lat_min,
        "lat_max": lat_max,
        "lon_min": lon_min,
        "lon_max": lon_max,
    }
    return Metadata(
        csv_name=csv_name,
        lat=_centre(lat_min, lat_max, 90.0),
        lon=_centre(lon_min, lon_max, 180.0),
        captured_at=_captured_at(row),
        geo=geo,
    )


# --- group keys ----------------------------------------------------------------------------------


def spatial_block(lat: float, lon: float, degrees: float) -> str:
    return f"lat{math.floor(lat / degrees)}_lon{math.floor(lon / degrees)}"


_CHUNK_NO = re.compile(r"^chunk\d+_", re.IGNORECASE)  # NAIP / Sentinel-2 tile number
_DATES = (
    re.compile(r"\d{4}-\d{2}-\d{2}-\d{2}-\d{2}-\d{2}"),  # Landsat date-time
    re.compile(r"\d{8}T\d{6}"),  # Sentinel-2 sensing times
    re.compile(r"\d{4}-\d{2}-\d{2}"),
    re.compile(r"(?<![0-9])(?:19|20)\d{6}(?![0-9])"),  # yyyymmdd
    re.compile(r"(?<![0-9])(?:19|20)\d{2}-\d{2}(?![0-9])"),  # yyyy-mm
    re.compile(r"(?<=_)(?:19|20)\d{2}(?=_)"),  # a bare survey year (quadrangles)
)
_TILE_RC = re.compile(r"_\d{1,3}_\d{1,3}(?=_ID\d+$)")  # ortho tile row/col before the _ID suffix


def scene_key(stem: str) -> str:
    """The scene an npz was cut from: its stem without tile numbers, dates and times."""
    key = _CHUNK_NO.sub("", stem)
    for pattern in _DATES:
        key = pattern.sub("D", key)
    return _TILE_RC.sub("", key)


# Doodler names a session's output folder `results<YYYY-MM-DD-HH-MM>` (seconds optional).
_SESSION_TIME = re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})-(\d{2})-(\d{2})(?:-(\d{2}))?(?!\d)")


def session_time(member: str) -> tuple[str, dt.datetime] | None:
    """(folder, time) of the deepest folder of `member` (a path in the record) whose name holds a
    Doodler session timestamp; None when no folder has one. The file's own name is not looked at:
    Coast Train stems carry the image's acquisition date, which says nothing about the labelling."""
    for folder in reversed(PurePosixPath(member).parts[:-1]):
        m = _SESSION_TIME.search(folder)
        if m is None:
            continue
        try:
            when = dt.datetime(*(int(g) for g in m.groups() if g is not None))  # type: ignore[misc]
        except ValueError:
            continue
        return folder, when
    return None
