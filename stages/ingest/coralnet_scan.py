"""Pass 1 of ingest@coralnet: one export's parameters, files and CSV, scanned into compact arrays.

`scan_export(ctx, spec)` streams the export's `annotations.csv` once (stages.ingest.coralnet_csv)
and keeps per data record only: the image key's index (keys are NFC text), the record's byte span,
its first physical line and a verdict code (`OK`, or the format problem that makes it unusable).
It also picks the labelset (stages.ingest.coralnet_labels), lists the export's files and resolves
each image key to its file. Everything that makes the export unreadable as a whole is an
UpstreamFormatError naming the file (and the line) here, before any record of the export is
yielded, so `ingest.on_bad_export: quarantine` can set the export aside cleanly. Pass 2 (the
records, stages.ingest.coralnet) reads each image's records again by their spans.
"""

from __future__ import annotations

import codecs
import math
import os
import re
import unicodedata
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.coralnet_format import KEY_COLUMNS, norm
from stages.errors import ConfigError, UpstreamFormatError
from stages.ingest.context import IngestContext
from stages.ingest.coralnet_csv import MAX_FIELD_CHARS, CsvFile, check_multiline
from stages.ingest.coralnet_labels import Labelset, find_labelset, read_labelset

ANNOTATIONS = "annotations.csv"
IMAGES = "images"
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_SUGGESTION = re.compile(r"^machine (suggestion|confidence) (\d+)$")
_EXT_PREFERENCE = (".jpg", ".jpeg", ".png")
# Per-row columns after Row that the adapter understands; anything else goes to a point's "extra".
_POINT_COLUMNS = ("row", "column", "label id", "label code", "label", "annotator", "date annotated", "status")

# Pass-1 verdicts of a data record. BAD_ROWCOL belongs to its image; the others have no key to trust.
OK, BAD_ROWCOL, BAD_ENCODING, TOO_WIDE, NO_KEY, LONG_FIELD = range(6)


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


# --- parameters --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSpec:
    """One `sources.coralnet.exports` entry, as ingest reads it."""

    source_id: int
    encoding: str = "utf-8"
    labelset: str | None = None
    site_columns: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"s{self.source_id}"


def _names(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"params.yaml: {what} must be a list of column names, got {value!r}")
    return tuple(value)


def export_specs(params: dict[str, Any]) -> list[ExportSpec]:
    """The exports in the order their sample ids sort (`coralnet-s10-...` before `coralnet-s100-...`)."""
    entries = params.get("exports")
    if not isinstance(entries, list):
        raise ConfigError("params.yaml: `sources.coralnet.exports` must be a list of {id, location}")
    default_sites = _names(params.get("site_columns"), "sources.coralnet.site_columns")
    specs: dict[int, ExportSpec] = {}
    for entry in entries:
        try:
            source_id = int(entry["id"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(
                f"params.yaml: bad CoralNet export entry {entry!r}; expected {{id, location}}"
            ) from None
        if source_id in specs:
            raise ConfigError(f"params.yaml: CoralNet export s{source_id} is listed twice")
        encoding = str(entry.get("encoding") or "utf-8")
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ConfigError(
                f"params.yaml: CoralNet export s{source_id}: unknown encoding {encoding!r}"
            ) from None
        labelset = entry.get("labelset")
        if labelset is not None and (
            not isinstance(labelset, str) or "/" in labelset or not labelset.strip()
        ):
            raise ConfigError(f"params.yaml: CoralNet export s{source_id}: labelset must be a file name")
        sites = entry.get("site_columns")
        specs[source_id] = ExportSpec(
            source_id,
            encoding,
            labelset,
            default_sites if sites is None else _names(sites, f"CoralNet export s{source_id} site_columns"),
        )
    return sorted(specs.values(), key=lambda s: f"{s.name}-")


def ingest_choice(params: dict[str, Any], key: str, allowed: tuple[str, ...]) -> str:
    value = str((params.get("ingest") or {}).get(key, allowed[0]))
    if value not in allowed:
        raise ConfigError(f"params.yaml: ingest.{key} must be one of {', '.join(allowed)}, not {value!r}")
    return value


# --- pass 1: one export's CSV into compact arrays ----------------------------------------------


@dataclass
class ExportScan:
    spec: ExportSpec
    folder: Path
    csv_path: Path
    csv: CsvFile
    labelset: Labelset
    header: list[str]
    col: dict[str, int]  # normalised name -> first index
    key_column: str  # as written in the header
    metadata: list[tuple[str, int]]  # columns before Row, except the key columns
    extras: list[tuple[str, int]]  # unknown columns after Row
    suggestions: list[tuple[int, int | None]]  # (suggestion index, confidence index or None)
    site_at: list[int]
    site_missing: list[str]
    keys: list[str] = field(default_factory=list)  # image keys (NFC), by index
    key_ix: array = field(default_factory=lambda: array("i"))  # per record: key index or -1
    start: array = field(default_factory=lambda: array("q"))  # per record: byte span
    length: array = field(default_factory=lambda: array("i"))
    line: array = field(default_factory=lambda: array("i"))  # per record: first physical line
    verdict: array = field(default_factory=lambda: array("b"))
    images: dict[str, str] = field(default_factory=dict)  # NFC name -> name, files directly in images/
    collisions: dict[str, list[str]] = field(default_factory=dict)  # NFC name -> names, when several
    other_files: list[str] = field(default_factory=list)  # every other file, relative to the folder
    where: list[str | tuple[str, str]] = field(default_factory=list)  # per key: file in images/ or problem
    unreferenced: list[str] = field(default_factory=list)  # files directly in images/ no key names
    stat: tuple[int, int] = (0, 0)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def width(self) -> int:
        return len(self.header)

    @property
    def by_id(self) -> bool:
        return norm(self.key_column) == "image id"

    def cell(self, cells: list[str], column: str) -> str:
        i = self.col.get(column)
        return cells[i] if i is not None and i < len(cells) else ""


def parse_int(text: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if math.isfinite(number) and number.is_integer() else None


def _header(csv_path: Path, header: list[str], spec: ExportSpec) -> dict[str, Any]:
    norms = [norm(h) for h in header]
    col: dict[str, int] = {}
    for i, n in enumerate(norms):
        col.setdefault(n, i)
    key = "name" if "name" in col else "image id" if "image id" in col else None
    missing = []
    if key is None:
        missing.append("Name or Image ID")
    missing += [c.capitalize() for c in ("row", "column") if c not in col]
    if not {"label id", "label code", "label"} & set(col):
        missing.append("Label ID, Label code or Label")
    if missing:
        raise UpstreamFormatError(
            csv_path,
            "expected a CoralNet annotations export with columns Name or Image ID, Row, Column and "
            f"Label ID, Label code or Label; missing {', '.join(missing)}; "
            f"found {', '.join(header) or 'no header'}",
        )
    assert key is not None
    row_at = col["row"]
    suggestion_at: dict[int, dict[str, int]] = {}
    extras: list[tuple[str, int]] = []
    for i in range(row_at + 1, len(header)):
        m = _SUGGESTION.match(norms[i])
        if m:
            suggestion_at.setdefault(int(m.group(2)), {}).setdefault(m.group(1), i)
        elif norms[i] not in _POINT_COLUMNS and norms[i] not in KEY_COLUMNS:
            extras.append((header[i], i))
    site_at = [col[norm(c)] for c in spec.site_columns if norm(c) in col]
    return {
        "col": col,
        "key_column": header[col[key]],
        "metadata": [(header[i], i) for i in range(row_at) if norms[i] not in KEY_COLUMNS],
        "extras": extras,
        "suggestions": [
            (slots["suggestion"], slots.get("confidence"))
            for _k, slots in sorted(suggestion_at.items())
            if "suggestion" in slots
        ],
        "site_at": site_at,
        "site_missing": [c for c in spec.site_columns if norm(c) not in col],
    }


def _list_files(scan: ExportScan) -> None:
    """Every file of the export folder: the ones directly in images/ by NFC name, the others listed."""
    skip = {ANNOTATIONS}
    if scan.labelset.path is not None:
        skip.add(scan.labelset.path.name)
    names: dict[str, list[str]] = {}
    for root, dirs, files in os.walk(scan.folder):
        dirs.sort()
        rel_root = Path(root).relative_to(scan.folder).as_posix()
        for name in sorted(files):
            rel = name if rel_root == "." else f"{rel_root}/{name}"
            if rel_root == IMAGES:
                names.setdefault(nfc(name), []).append(name)
            elif rel not in skip:
                scan.other_files.append(rel)
    for key, found in sorted(names.items()):
        scan.images[key] = found[0]
        if len(found) > 1:
            scan.collisions[key] = found
    scan.other_files.sort()


def scan_export(ctx: IngestContext, spec: ExportSpec) -> ExportScan:
    """Pass 1 (see the module docstring): UpstreamFormatError when the export cannot be parsed."""
    folder = ctx.raw_dir / spec.name
    csv_path = folder / ANNOTATIONS
    if not csv_path.is_file():
        raise UpstreamFormatError(
            csv_path, "missing: run fetch@coralnet (every export needs annotations.csv)"
        )
    labelset = read_labelset(find_labelset(folder, spec.labelset), spec.encoding)
    csv_file = CsvFile(csv_path, spec.encoding)
    records = csv_file.records()
    first = next(records, None)
    if first is None:
        raise UpstreamFormatError(csv_path, "empty file: no header and no rows")
    if first.bad_byte is not None:
        raise UpstreamFormatError(
            csv_path, f"the header is not {spec.encoding} (set `encoding:` in this export's entry)"
        )
    header = [h.strip() for h in first.cells]
    if first.lines > 1:
        raise UpstreamFormatError(
            csv_path, f"line 1: the header runs to line {first.last_line} (an unbalanced quote)"
        )
    scan = ExportScan(spec, folder, csv_path, csv_file, labelset, header, **_header(csv_path, header, spec))
    stat = csv_path.stat()
    scan.stat = (stat.st_size, stat.st_mtime_ns)
    free_text = {i for _name, i in scan.metadata}
    key_at, row_at, col_at = scan.col[norm(scan.key_column)], scan.col["row"], scan.col["column"]
    index: dict[str, int] = {}
    for record in records:
        if record.lines > 1:
            check_multiline(csv_path, record, header, free_text)
        cells = record.cells
        ix = -1
        if record.bad_byte is not None:
            verdict = BAD_ENCODING
        elif len(cells) > scan.width:
            verdict = TOO_WIDE
        elif cells and max(map(len, cells)) > MAX_FIELD_CHARS:
            verdict = LONG_FIELD
        else:
            key = nfc(cells[key_at]) if key_at < len(cells) else ""
            if not key.strip():
                verdict = NO_KEY
            else:
                ix = index.setdefault(key, len(index))
                row = cells[row_at] if row_at < len(cells) else ""
                column = cells[col_at] if col_at < len(cells) else ""
                verdict = OK if parse_int(row) is not None and parse_int(column) is not None else BAD_ROWCOL
        scan.key_ix.append(ix)
        scan.start.append(record.start)
        scan.length.append(record.end - record.start)
        scan.line.append(record.first_line)
        scan.verdict.append(verdict)
    scan.keys = list(index)
    if not scan.verdict:
        raise UpstreamFormatError(
            csv_path,
            "no data rows, only a header: a source that lost its annotations is not an empty release",
        )
    if OK not in scan.verdict:
        counts = Counter(_VERDICT_NAMES[v] for v in scan.verdict)
        described = ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))
        raise UpstreamFormatError(
            csv_path,
            f"none of the {len(scan.verdict)} data rows is usable ({described}): the format changed?",
        )
    _list_files(scan)
    stems = _by_stem(sorted(scan.images.values())) if scan.by_id else {}
    scan.where = [_where(scan, key, stems) for key in scan.keys]
    claimed = {w for w in scan.where if isinstance(w, str)}
    scan.unreferenced = [name for name in sorted(scan.images.values()) if name not in claimed]
    return scan


_VERDICT_NAMES = {
    BAD_ROWCOL: "with Row/Column not integers",
    BAD_ENCODING: "not in the export's encoding",
    TOO_WIDE: "with more cells than the header",
    NO_KEY: "without an image key",
    LONG_FIELD: f"with a cell over {MAX_FIELD_CHARS} characters",
}


def _by_stem(files: list[str]) -> dict[str, str]:
    """Image ID -> file name; several files with one stem: jpg, jpeg, png, then others, by name."""
    groups: dict[str, list[str]] = {}
    for name in files:
        stem, dot, _ext = name.rpartition(".")
        if dot:
            groups.setdefault(stem, []).append(name)

    def rank(name: str) -> tuple[int, str]:
        ext = name[name.rfind(".") :].lower()
        return (_EXT_PREFERENCE.index(ext) if ext in _EXT_PREFERENCE else len(_EXT_PREFERENCE), name)

    return {stem: min(names, key=rank) for stem, names in groups.items()}


def _safe_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(ch in name for ch in "/\\\0")


def _where(scan: ExportScan, key: str, stems: dict[str, str]) -> str | tuple[str, str]:
    """The file (name in images/) an image key names, or (reason, detail) for its quarantine row."""
    if scan.by_id:
        if not _SAFE_KEY.match(key):
            return "bad_record", f"Image ID {key!r} is not a plain id"
        found = stems.get(key)
        return found if found else ("missing_image", f"no images/{key}.<ext> file")
    if not _safe_name(key):
        return "bad_record", f"Name {key!r} would name a path outside images/"
    if key in scan.collisions:
        names = " and ".join(repr(n) for n in scan.collisions[key])
        raise UpstreamFormatError(
            scan.folder / IMAGES,
            f"files {names} have the same name in NFC; {scan.key_column} {key!r} names both",
        )
    return scan.images.get(key, key)  # absent: the probe says missing_image
