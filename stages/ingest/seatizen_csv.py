"""Seatizen annotation CSVs, read as a stream: the Atlas's multilabel CSV and the authors' own
training tables (binary and probability variants, old label names, no final newline).

Layout: `FileName`, metadata columns (META_COLUMNS, any subset), then one column per class.

Records are physical lines: every data line is one input record. A record the csv module
cannot read (a field over its 128 KiB limit, a NUL byte) or one that spans several lines (a
quoted field holding a newline: an unbalanced quote swallows the lines after it) is refused,
each of its lines becoming one `bad_record` row that names the span, so `inputs` always equals
the file's data lines and a swallowed CSV cannot shrink silently. Blank lines are not records.

Values: every class cell is a number, -1 (not annotated) or in [0, 1]. The file's kind is decided
by all its values together: `binary` when every value is -1, 0 or 1 (`1.0` counts as 1 only
then), else `probability` (`0.87`; then 1 and 0 are probabilities too). A cell that is not such a
number makes its row a `bad_record`. Values are kept in one float64 array per file, names and
metadata as lists of strings: no Python object per cell.
"""

from __future__ import annotations

import csv
import math
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from stages.errors import UpstreamFormatError
from stages.ingest.common import CSV_FIELD_LIMIT, long_field
from stages.ingest.seatizen_names import nfc

# Non-class columns the multilabel CSV has or may have (the authors' exporter writes the GPS and
# DOI ones into its sibling CSVs). Every other column is a class.
META_COLUMNS = (
    "FileName",
    "OriginalFileName",
    "frame_doi",
    "frames_doi",
    "version_doi",
    "prediction_doi",
    "relative_file_path",
    "annotation_date",
    "GPSLatitude",
    "GPSLongitude",
    "GPSAltitude",
    "GPSRoll",
    "GPSPitch",
    "GPSTrack",
    "GPSDatetime",
)
MULTI_LINE = "one record spans several lines (a quoted field holds a line break: an unbalanced quote?)"
SPLIT_TOKENS = {"train": "train", "val": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class BadRecord:
    line: int
    record_id: str  # `<FileName>`, or `line N` when the row gives no name
    detail: str
    name: str | None = None  # the row's FileName, when it has one


@dataclass
class AnnotationFile:
    path: Path
    header: list[str]
    meta: list[str]  # metadata columns present, FileName first
    classes: list[str]  # class columns, as upstream names them
    kind: str = "binary"  # binary | probability
    fractional_example: str | None = None  # where the first non-0/1/-1 value is
    official_split: str | None = None
    data_lines: int = 0  # input records: physical data lines
    lines: array = field(default_factory=lambda: array("i"))  # line of each good row
    names: list[str] = field(default_factory=list)  # FileName (NFC) of each good row
    meta_values: list[tuple[str, ...]] = field(default_factory=list)  # meta[1:] of each good row
    values: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # good rows x classes
    bad: list[BadRecord] = field(default_factory=list)  # in line order


def official_split(path: Path) -> str | None:
    """`train`/`val`/`test` when the file name has that token (DinoVdeau: `drone-train_df_binary`)."""
    tokens = {t.casefold() for t in re.split(r"[^A-Za-z0-9]+", path.stem) if t}
    found = {SPLIT_TOKENS[t] for t in tokens if t in SPLIT_TOKENS}
    return found.pop() if len(found) == 1 else None


def _lines(fh: BinaryIO, path: Path) -> Iterator[str]:
    """The file's lines, strictly UTF-8 (a BOM on the first is dropped), line ends kept for csv."""
    for number, raw in enumerate(fh, start=1):
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise UpstreamFormatError(
                path, f"line {number} is not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
        yield text


def _cell(text: str) -> float | None:
    t = text.strip()
    try:
        v = float(t)
    except ValueError:
        return None
    if not math.isfinite(v) or not (v == -1 or 0 <= v <= 1):
        return None
    return v


def read_annotation_file(path: Path) -> AnnotationFile:
    """Stream one annotation CSV into compact columns; UpstreamFormatError for a file-level fault."""
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise UpstreamFormatError(path, f"cannot open: {exc.strerror or exc}") from None
    with fh:
        reader = csv.reader(_lines(fh, path))
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise UpstreamFormatError(path, f"the header line does not parse as CSV: {exc}") from None
        if not header or "FileName" not in [h.strip() for h in header]:
            raise UpstreamFormatError(
                path,
                f"expected columns FileName[, {', '.join(META_COLUMNS[1:4])}], then one column per class; "
                f"found {', '.join(header or []) or 'no header'}",
            )
        header = [nfc(h.strip()) for h in header]
        dupes = sorted({c for c in header if header.count(c) > 1})
        if dupes:
            raise UpstreamFormatError(path, f"duplicate columns {', '.join(dupes)}")
        meta = ["FileName", *(c for c in header if c in META_COLUMNS and c != "FileName")]
        classes = [c for c in header if c not in META_COLUMNS]
        if not classes:
            raise UpstreamFormatError(path, "no class columns after FileName and the metadata columns")
        out = AnnotationFile(path, header, meta, classes, official_split=official_split(path))
        name_ix = header.index("FileName")
        meta_ix = [header.index(c) for c in meta[1:]]
        class_ix = [header.index(c) for c in classes]
        rows: list[np.ndarray] = []
        fractional: str | None = None
        last = reader.line_num
        while True:
            try:
                fields = next(reader)
                error = None
            except StopIteration:
                break
            except csv.Error as exc:
                fields, error = None, str(exc)
            if fields and (too_long := long_field(fields)):
                fields, error = None, too_long
            start, end = last + 1, reader.line_num
            last = end
            if fields == [] and start == end:
                continue  # a blank line is not a record
            if error is not None or end > start:
                why = error or MULTI_LINE
                if error and "field larger than field limit" in error:
                    why = f"a field is longer than the CSV field limit of {CSV_FIELD_LIMIT} chars"
                span = f"line {start}" if start == end else f"lines {start}-{end}"
                for line in range(start, end + 1):
                    out.bad.append(BadRecord(line, f"line {line}", f"{span}: {why}"))
                out.data_lines += end - start + 1
                continue
            assert fields is not None
            out.data_lines += 1
            if len(fields) != len(header):
                record = (
                    nfc(fields[name_ix].strip()) if len(fields) > name_ix and fields[name_ix].strip() else ""
                )
                detail = f"line {start}: {len(fields)} fields, header has {len(header)}"
                out.bad.append(BadRecord(start, record or f"line {start}", detail, record or None))
                continue
            name = nfc(fields[name_ix].strip())
            if not name:
                out.bad.append(BadRecord(start, f"line {start}", f"line {start}: empty FileName"))
                continue
            values = np.empty(len(classes), dtype=np.float64)
            problem = None
            for k, i in enumerate(class_ix):
                v = _cell(fields[i])
                if v is None:
                    problem = (
                        f"line {start}: class {classes[k]!r} has value {fields[i].strip()!r}, "
                        "expected -1 or a number in [0, 1]"
                    )
                    break
                if fractional is None and v not in (-1.0, 0.0, 1.0):
                    fractional = f"{fields[i].strip()!r} in column {classes[k]!r} at line {start}"
                values[k] = v
            if problem:
                out.bad.append(BadRecord(start, name, problem, name))
                continue
            out.lines.append(start)
            out.names.append(name)
            out.meta_values.append(tuple(fields[i] for i in meta_ix))
            rows.append(values)
    if out.data_lines == 0:
        # Every image would become `no_annotation`: a source that lost its annotations is a
        # broken upstream, not an empty release.
        raise UpstreamFormatError(path, "header only: the annotation CSV has no data rows")
    out.values = np.vstack(rows) if rows else np.zeros((0, len(classes)))
    if fractional is not None:
        out.kind, out.fractional_example = "probability", fractional
    return out
