"""ingest@coralnet: CoralNet source exports (`data/raw/coralnet/s<id>/`) -> samples, points, quarantine.

One export per `sources.coralnet.exports` entry: `s<id>/annotations.csv`, `s<id>/labelset.csv`
(optional) and `s<id>/images/<file>`.

Input records (every one ends as exactly one output row):
- `annotation_rows`: the data rows of each `annotations.csv` (quoted multi-line cells are part of
  one row). Each becomes one POINTS row or one quarantine row with `record_kind = "annotation_row"`.
- `images`: per export, the distinct image keys of the CSV plus the files in `images/` that no
  key resolves to. Each becomes one SAMPLES row or one quarantine row with `record_kind = "image"`
  (an unreferenced file is `no_annotation`).
`metrics.inputs = {"images": n, "annotation_rows": n}` (and per export under `inputs_by_export`).

Reading the CSV tolerantly: UTF-8 (BOM allowed; latin-1 as a fallback, reported as `encoding`),
header names matched case- and space-insensitively, metadata columns before `Row`, any extra or
missing optional column, quoted multi-line values, empty cells, short rows padded with empty
cells. The image key is `Name` (file `images/<Name>`) when that column exists, else `Image ID`
(file `images/<Image ID>.<ext>`, the extension found in the folder; several candidates: jpg, jpeg,
png, then others, then by name). Labels are `Label ID` and/or `Label code`; a code alone is turned
into a Label ID through `labelset.csv` (`Label ID`, `Short Code`). Required: an image key, `Row`,
`Column`, and `Label ID` or `Label code`; otherwise UpstreamFormatError names the file and the
expected columns.

Reasons for an annotation row, in the order they are tested (the first that applies):
`bad_record` (more cells than the header, empty image key, Row/Column not integers) ->
`unconfirmed_annotation` (`Annotator` is `robot`, or a `Status` column whose value is not
`Confirmed`; `Imported` rows are confirmed human imports and kept) -> `bad_record` (a confirmed
row without a label, or a non-integer Label ID) -> `image_unusable` (its image was quarantined;
the detail names the image's reason) -> `point_outside_image` (not 0 <= row < H, 0 <= col < W) ->
`duplicate_point` ((row, col) of an earlier row of the same image that got this far; the first is
kept; the detail says whether the label differs) -> `unmapped_label` (code not in labelset.csv,
no labelmapping, or only a null-attribute mapping) / `ambiguous_mapping` (several targets, unless
`params.ingest.ambiguous_mapping == "lowest_mapping_id"`, which takes the mapping with the lowest
mapping id and reports every decision under `metrics.ambiguous_mapping`). Never last-wins.
Images: `bad_record` (a key that would name a path outside `images/`), `missing_image`,
`empty_file`, `corrupt_image`, `image_too_large`, `unsupported_format`, `no_annotation`.

Ids: `sample_id = make_sample_id("coralnet", "s<id>", key)`, plus `-<8 hex of sha256(key)>` when
the key has characters outside [A-Za-z0-9_-] (a Name always has its dot), so distinct names that
slug alike (`a b.jpg`, `a_b.jpg`) never collide; `upstream_id = "s<id>/<key>"`;
`point_id = "<sample_id>-r<row>-c<col>"`, unique because duplicates are collapsed first.
Quarantined rows are named the same way (`-dup<k>` for the k-th repeat of a position).
Images whose every row was quarantined remain samples with `n_points = 0` (pack skips them).

`captured_at` = the `Date` metadata when it is `YYYY-MM-DD`; `lat`/`lon` = `Latitude`/`Longitude`
when both parse as finite in-range numbers. No group key beyond the image exists upstream.

`native_labels` (JSON, sorted keys):
    {"export": "s<id>",
     "image": {"Name": str} and/or {"Image ID": str},          # the key cells as written
     "metadata": {column: text},   # every column before Row except the key columns, exact text
                                   # (multi-line comments intact), empty cells left out, taken
                                   # from the image's first row
     "metadata_conflicts": [column, ...],    # only present when rows of one image disagree
     "points": [{"point_id", "row", "col", "label_id", "label_code", "annotator",
                 "date_annotated", "status",
                 "machine_suggestions": [{"code", "confidence"}],  # confidence int when integral
                 "extra": {column: text}}, ...]}                   # unknown columns after Row
`points` lists the kept points in file order; keys whose cell is empty are left out.

`labels` (JSON): `stages.ingest.common.point_cover_labels` over the kept points: `n_points`, per
benthic attribute id {name, top_level_category, count, cover, growth_forms[{id, name, count}]},
per top-level category {count, cover}.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from stages.errors import ConfigError, UpstreamFormatError
from stages.imaging import ImageInfo, ImageProblem
from stages.ingest.common import (
    Tables,
    class_counts,
    dumps_labels,
    point_cover_labels,
    probe_images,
    sample_info_columns,
)
from stages.ingest.context import IngestContext
from stages.progress import bar
from stages.schema import make_sample_id
from stages.taxonomy_index import Mapping, Taxonomy, mapping_id_key

SOURCE = "coralnet"
PROVIDER = "CoralNet"
ANNOTATIONS = "annotations.csv"
LABELSET = "labelset.csv"
POLICIES = ("quarantine", "lowest_mapping_id")
LOWEST_RULE = "several mappings: take the one whose labelmapping id sorts lowest (numeric ids numerically)"
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_SUGGESTION = re.compile(r"^machine (suggestion|confidence) (\d+)$")
_EXT_PREFERENCE = (".jpg", ".jpeg", ".png")
# Per-row columns after Row that the adapter understands; anything else goes to a point's "extra".
_POINT_COLUMNS = ("row", "column", "label id", "label code", "annotator", "date annotated", "status")
_KEY_COLUMNS = ("name", "image id")
_CSV_FIELD_LIMIT = 16 * 1024 * 1024


def _norm(name: str) -> str:
    return " ".join(name.replace("\ufeff", "").split()).casefold()


@dataclass
class _Row:
    index: int  # 1-based data row number in the CSV
    cells: list[str]
    too_long: bool


@dataclass
class _Export:
    source_id: int
    folder: Path
    csv_path: Path
    header: list[str]
    col: dict[str, int]  # normalised name -> index, for the columns the adapter reads
    key_column: str  # "Name" | "Image ID" as written in the header
    metadata: list[tuple[str, int]]  # columns before Row, except the key columns
    extras: list[tuple[str, int]]  # unknown columns after Row
    suggestions: list[tuple[int, int | None]]  # (suggestion index, confidence index or None)
    rows: list[_Row]
    encoding: str
    labelset_ids: dict[str, str] = field(default_factory=dict)  # Short Code -> Label ID (unique codes)
    labelset_ambiguous: set[str] = field(default_factory=set)  # codes naming several Label IDs
    labelset_codes: dict[str, str] = field(default_factory=dict)  # Label ID -> Short Code
    has_labelset: bool = False

    @property
    def name(self) -> str:
        return f"s{self.source_id}"

    def cell(self, row: _Row, column: str) -> str:
        i = self.col.get(column)
        return row.cells[i] if i is not None else ""


def _exports(params: dict[str, Any]) -> list[int]:
    entries = params.get("exports")
    if not isinstance(entries, list):
        raise ConfigError("params.yaml: `sources.coralnet.exports` must be a list of {id, location}")
    ids: list[int] = []
    for entry in entries:
        try:
            ids.append(int(entry["id"]))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(
                f"params.yaml: bad CoralNet export entry {entry!r}; expected {{id, location}}"
            ) from None
    return ids


def _read_text(path: Path) -> tuple[str, str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise UpstreamFormatError(
            path, "missing: run fetch@coralnet (every export needs annotations.csv)"
        ) from exc
    try:
        return data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        # Exports re-saved by spreadsheet tools turn up in legacy 8-bit encodings; latin-1 decodes
        # every byte, so the text survives (cp1252 punctuation may be mis-read) and is reported.
        return data.decode("latin-1"), "latin-1"


def _read_csv(path: Path) -> tuple[list[list[str]], str]:
    text, encoding = _read_text(path)
    saved = csv.field_size_limit()
    csv.field_size_limit(_CSV_FIELD_LIMIT)  # long free-text comments; still bounded
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        rows = [r for r in reader if r]  # blank lines are not records
    except csv.Error as exc:
        raise UpstreamFormatError(path, f"not a readable CSV near line {reader.line_num}: {exc}") from exc
    finally:
        csv.field_size_limit(saved)
    return rows, encoding


def _load_export(folder: Path, source_id: int) -> _Export:
    csv_path = folder / ANNOTATIONS
    rows, encoding = _read_csv(csv_path)
    header = [h.replace("\ufeff", "").strip() for h in rows[0]] if rows else []
    norm = [_norm(h) for h in header]
    col: dict[str, int] = {}
    for i, n in enumerate(norm):
        col.setdefault(n, i)
    key = "name" if "name" in col else "image id" if "image id" in col else None
    missing = []
    if key is None:
        missing.append("Name or Image ID")
    for required in ("row", "column"):
        if required not in col:
            missing.append(required.capitalize())
    if "label id" not in col and "label code" not in col:
        missing.append("Label ID and/or Label code")
    if missing:
        raise UpstreamFormatError(
            csv_path,
            "expected a CoralNet annotations export with columns Name or Image ID, Row, Column, "
            f"Label ID and/or Label code; missing {', '.join(missing)}; "
            f"found {', '.join(header) or 'no header'}",
        )
    assert key is not None
    row_at = col["row"]
    metadata = [(header[i], i) for i in range(row_at) if norm[i] not in _KEY_COLUMNS]
    suggestion_at: dict[int, dict[str, int]] = {}
    extras: list[tuple[str, int]] = []
    for i in range(row_at + 1, len(header)):
        m = _SUGGESTION.match(norm[i])
        if m:
            suggestion_at.setdefault(int(m.group(2)), {}).setdefault(m.group(1), i)
        elif norm[i] not in _POINT_COLUMNS and norm[i] not in _KEY_COLUMNS:
            extras.append((header[i], i))
    suggestions = [
        (slots["suggestion"], slots.get("confidence"))
        for _k, slots in sorted(suggestion_at.items())
        if "suggestion" in slots
    ]
    width = len(header)
    data_rows = []
    for index, cells in enumerate(rows[1:], start=1):
        data_rows.append(_Row(index, cells + [""] * (width - len(cells)), len(cells) > width))
    export = _Export(
        source_id=source_id,
        folder=folder,
        csv_path=csv_path,
        header=header,
        col=col,
        key_column=header[col[key]],
        metadata=metadata,
        extras=extras,
        suggestions=suggestions,
        rows=data_rows,
        encoding=encoding,
    )
    _load_labelset(export, folder / LABELSET)
    return export


def _load_labelset(export: _Export, path: Path) -> None:
    if not path.exists():
        return
    rows, _encoding = _read_csv(path)
    header = [_norm(h) for h in rows[0]] if rows else []
    if "label id" not in header or "short code" not in header:
        raise UpstreamFormatError(
            path,
            "expected labelset columns Label ID, Name, Short Code; "
            f"found {', '.join(rows[0] if rows else []) or 'no header'}",
        )
    id_at, code_at = header.index("label id"), header.index("short code")
    by_code: dict[str, set[str]] = {}
    for cells in rows[1:]:
        if max(id_at, code_at) >= len(cells):
            continue
        label_id, code = cells[id_at].strip(), cells[code_at].strip()
        if not label_id or not code:
            continue
        by_code.setdefault(code, set()).add(label_id)
        export.labelset_codes.setdefault(label_id, code)
    export.labelset_ids = {c: next(iter(ids)) for c, ids in by_code.items() if len(ids) == 1}
    export.labelset_ambiguous = {c for c, ids in by_code.items() if len(ids) > 1}
    export.has_labelset = True


def _int(text: str) -> int | None:
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


def _float(text: str | None, bound: float) -> float | None:
    try:
        value = float((text or "").strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and -bound <= value <= bound else None


def _captured_at(text: str | None) -> str | None:
    text = (text or "").strip()
    if not _DATE.match(text):
        return None
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        return None


def image_sample_id(source_id: int, key: str) -> str:
    """`coralnet-s<id>-<key slug>`, with a short hash of the key when the slug loses characters."""
    sample_id = make_sample_id(SOURCE, f"s{source_id}", key)
    if not _SAFE_KEY.match(key):
        sample_id += "-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]
    return sample_id


def _list_images(folder: Path) -> list[str]:
    images = folder / "images"
    if not images.is_dir():
        return []
    return sorted(e.name for e in os.scandir(images) if e.is_file())


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


@dataclass
class _Resolved:
    mapping: Mapping | None
    reason: str | None = None
    detail: str = ""
    decided: bool = False  # picked by the lowest_mapping_id rule


class _Crosswalk:
    """Label ID -> one MERMAID target, per the ambiguity policy, resolved once per label."""

    def __init__(self, taxonomy: Taxonomy, policy: str) -> None:
        self.taxonomy = taxonomy
        self.policy = policy
        self._cache: dict[str, _Resolved] = {}
        self.ambiguous_labels: set[str] = set()
        self.decisions: dict[str, str | None] = {}
        # Label IDs with any labelmapping row, null-attribute rows included, to say which it is.
        self._listed = set(taxonomy.provider_ids(PROVIDER))

    def resolve(self, label_id: str) -> _Resolved:
        if label_id not in self._cache:
            self._cache[label_id] = self._resolve(label_id)
        return self._cache[label_id]

    def _resolve(self, label_id: str) -> _Resolved:
        targets = self.taxonomy.mappings(PROVIDER, label_id)
        if not targets:
            why = (
                "only labelmappings with a null benthic attribute"
                if label_id in self._listed
                else "no labelmapping"
            )
            return _Resolved(None, "unmapped_label", f"CoralNet Label ID {label_id} has {why}")
        # A target the snapshot lacks is dangling: it is not a candidate, and a label with only
        # dangling targets is unmapped.
        known = [t for t in targets if t.benthic_attribute_id in self.taxonomy.attributes]
        if not known:
            missing = ", ".join(sorted({t.benthic_attribute_id for t in targets}))
            return _Resolved(
                None,
                "unmapped_label",
                f"CoralNet Label ID {label_id} maps only to attributes missing from the taxonomy "
                f"snapshot ({missing})",
            )
        if len(known) == 1:
            return _Resolved(known[0])
        self.ambiguous_labels.add(label_id)
        ordered = sorted(known, key=lambda t: mapping_id_key(t.mapping_id))
        if self.policy == "lowest_mapping_id":
            self.decisions[label_id] = ordered[0].mapping_id
            return _Resolved(ordered[0], decided=True)
        described = "; ".join(
            f"{t.mapping_id}: {t.benthic_attribute_name}"
            + (f" / {t.growth_form_name}" if t.growth_form_name else "")
            for t in ordered
        )
        return _Resolved(
            None,
            "ambiguous_mapping",
            f"CoralNet Label ID {label_id} maps to {len(known)} targets ({described})",
        )


def _growth(value: str | None) -> str | None:
    return None if value is None or value.strip() in ("", "None") else value


def _point_native(
    export: _Export, row: _Row, point_id: str, r: int, c: int, label_id: str, code: str | None
) -> dict:
    native: dict[str, Any] = {"point_id": point_id, "row": r, "col": c, "label_id": label_id}
    if code:
        native["label_code"] = code
    for key, column in (
        ("annotator", "annotator"),
        ("date_annotated", "date annotated"),
        ("status", "status"),
    ):
        value = export.cell(row, column)
        if value != "":
            native[key] = value
    suggestions = []
    for s_at, c_at in export.suggestions:
        code_s = row.cells[s_at]
        if code_s == "":
            continue
        conf_text = row.cells[c_at] if c_at is not None else ""
        conf_int = _int(conf_text)
        suggestions.append(
            {"code": code_s, "confidence": conf_int if conf_int is not None else (conf_text or None)}
        )
    if suggestions:
        native["machine_suggestions"] = suggestions
    extra = {name: row.cells[i] for name, i in export.extras if row.cells[i] != ""}
    if extra:
        native["extra"] = extra
    return native


@dataclass(frozen=True)
class _Parsed:
    rid: str
    row: int
    col: int
    label_id: str | None  # Label ID as a canonical integer string, when the row has one
    code: str | None
    annotator: str

    @property
    def label_key(self) -> str:
        return self.label_id if self.label_id is not None else f"code {self.code}"


def _parse_row(
    export: _Export, row: _Row, sample_id: str, counts: Counter[str]
) -> _Parsed | tuple[str, str, str]:
    """The checks a row fails on its own: a `_Parsed` row, or (record id, reason, detail)."""
    row_text, col_text = export.cell(row, "row"), export.cell(row, "column")
    r, c = _int(row_text), _int(col_text)
    if r is None or c is None:
        return (
            f"{sample_id}-row{row.index}",
            "bad_record",
            f"Row/Column not integers ({row_text!r}, {col_text!r})",
        )
    rid = f"{sample_id}-r{r}-c{c}"
    annotator = export.cell(row, "annotator").strip()
    if annotator.casefold() == "robot":
        counts["robot"] += 1
        return rid, "unconfirmed_annotation", "Annotator robot: an unconfirmed machine label"
    if "status" in export.col:
        status = export.cell(row, "status").strip()
        if status.casefold() != "confirmed":
            counts[f"status {status or '(empty)'}"] += 1
            return rid, "unconfirmed_annotation", f"Status {status!r} is not Confirmed"
    label_text = export.cell(row, "label id").strip()
    code = export.cell(row, "label code").strip() or None
    label_id = _int(label_text)
    if label_text and label_id is None:
        return rid, "bad_record", f"Label ID {label_text!r} is not an integer"
    if label_id is None and code is None:
        return rid, "bad_record", "confirmed row without Label ID or Label code"
    return _Parsed(rid, r, c, None if label_id is None else str(label_id), code, annotator)


def _target(export: _Export, crosswalk: _Crosswalk, p: _Parsed) -> tuple[str, _Resolved]:
    """The row's Label ID (from the code through labelset.csv when needed) and its MERMAID target."""
    if p.label_id is not None:
        return p.label_id, crosswalk.resolve(p.label_id)
    if p.code in export.labelset_ids:
        label_id = export.labelset_ids[p.code]
        return label_id, crosswalk.resolve(label_id)
    if p.code in export.labelset_ambiguous:
        why = "names several Label IDs in labelset.csv"
    elif export.has_labelset:
        why = "is not in labelset.csv"
    else:
        why = "cannot be resolved: the export has no labelset.csv"
    return "", _Resolved(None, "unmapped_label", f"Label code {p.code!r} {why}")


@dataclass
class _Run:
    """What one ingest run accumulates across exports and images."""

    ctx: IngestContext
    taxonomy: Taxonomy
    crosswalk: _Crosswalk
    tables: Tables = field(default_factory=lambda: Tables(SOURCE))
    counts: Counter[str] = field(default_factory=Counter)
    unconfirmed: Counter[str] = field(default_factory=Counter)
    decided_points: Counter[str] = field(default_factory=Counter)
    kept_attrs: list[str] = field(default_factory=list)
    kept_tops: list[str] = field(default_factory=list)


@dataclass
class _Plan:
    """One export with its rows grouped by image key and each key resolved to a file (or a problem)."""

    export: _Export
    by_key: dict[str, list[_Row]]
    where: dict[str, Path | ImageProblem]
    orphans: list[str]  # files in images/ that no key names
    unkeyed: list[_Row]  # rows with no usable image key


def _plan(export: _Export) -> _Plan:
    by_key: dict[str, list[_Row]] = {}
    unkeyed: list[_Row] = []
    key_column = _norm(export.key_column)
    for row in export.rows:
        key = export.cell(row, key_column)
        if key.strip() and not row.too_long:
            by_key.setdefault(key, []).append(row)
        else:
            unkeyed.append(row)
    files = _list_images(export.folder)
    by_id = key_column == "image id"
    stems = _by_stem(files) if by_id else {}
    where: dict[str, Path | ImageProblem] = {}
    for key in sorted(by_key):
        if by_id and not _SAFE_KEY.match(key):
            where[key] = ImageProblem("bad_record", f"Image ID {key!r} is not a plain id")
        elif by_id:
            found = stems.get(key)
            where[key] = (
                export.folder / "images" / found
                if found
                else ImageProblem("missing_image", f"no images/{key}.<ext> file")
            )
        elif not _safe_name(key):
            where[key] = ImageProblem("bad_record", f"Name {key!r} would name a path outside images/")
        else:
            where[key] = export.folder / "images" / key
    claimed = {p.name for p in where.values() if isinstance(p, Path)}
    return _Plan(export, by_key, where, [f for f in files if f not in claimed], unkeyed)


def _ingest_image(
    run: _Run, export: _Export, key: str, rows: list[_Row], probe: ImageInfo | ImageProblem, image_rel: str
) -> int:
    """Points and sample of one image; returns how many points reached the crosswalk."""
    tables, ctx = run.tables, run.ctx
    csv_rel = ctx.rel(export.csv_path)
    sample_id = image_sample_id(export.source_id, key)
    problem = probe if isinstance(probe, ImageProblem) else None
    info = probe if isinstance(probe, ImageInfo) else None
    if problem is not None:
        tables.reject("image", f"{export.name}/{key}", image_rel, problem.reason, problem.detail)

    kept: list[dict[str, Any]] = []
    natives: list[dict[str, Any]] = []
    first_at: dict[tuple[int, int], _Parsed] = {}
    repeats: Counter[tuple[int, int]] = Counter()
    reached = 0
    for row in rows:
        parsed = _parse_row(export, row, sample_id, run.unconfirmed)
        if isinstance(parsed, tuple):
            rid, reason, detail = parsed
            tables.reject("annotation_row", rid, csv_rel, reason, detail)
            continue
        p = parsed
        if info is None:
            assert problem is not None  # no ImageInfo means the probe returned a problem
            detail = f"image {export.name} {export.key_column} {key!r}: {problem.reason}"
            if problem.detail:
                detail += f" ({problem.detail})"
            tables.reject("annotation_row", p.rid, csv_rel, "image_unusable", detail)
            continue
        if not (0 <= p.row < info.height and 0 <= p.col < info.width):
            detail = f"(row, col) = ({p.row}, {p.col}) outside {info.width}x{info.height} image {key}"
            tables.reject("annotation_row", p.rid, csv_rel, "point_outside_image", detail)
            continue
        first = first_at.get((p.row, p.col))
        if first is not None:
            repeats[(p.row, p.col)] += 1
            same = first.label_key == p.label_key
            run.counts["duplicate_same_label" if same else "duplicate_different_label"] += 1
            detail = (
                f"(row, col) = ({p.row}, {p.col}) already annotated in {key} (kept {first.rid}, label "
                f"{first.label_key}); "
                + ("same label" if same else f"different label: this row {p.label_key}")
            )
            tables.reject(
                "annotation_row", f"{p.rid}-dup{repeats[(p.row, p.col)]}", csv_rel, "duplicate_point", detail
            )
            continue
        first_at[(p.row, p.col)] = p
        reached += 1
        label_id, resolved = _target(export, run.crosswalk, p)
        if resolved.mapping is None:
            assert resolved.reason is not None
            tables.reject("annotation_row", p.rid, csv_rel, resolved.reason, resolved.detail)
            continue
        if resolved.decided:
            run.decided_points[label_id] += 1
        if p.annotator.casefold() == "imported":
            run.counts["imported_rows_kept"] += 1
        m = resolved.mapping
        top = run.taxonomy.top_level(m.benthic_attribute_id)
        code = p.code or export.labelset_codes.get(label_id)
        point = {
            "point_id": p.rid,
            "sample_id": sample_id,
            "row": p.row,
            "col": p.col,
            "source_label_id": label_id,
            "source_label": code,
            "benthic_attribute_id": m.benthic_attribute_id,
            "benthic_attribute_name": run.taxonomy.attributes[m.benthic_attribute_id]["name"],
            "growth_form_id": _growth(m.growth_form_id),
            "growth_form_name": _growth(m.growth_form_name),
            "top_level_category": top,
        }
        tables.add_point(point)
        kept.append(point)
        run.kept_attrs.append(point["benthic_attribute_name"])
        run.kept_tops.append(top)
        natives.append(_point_native(export, row, p.rid, p.row, p.col, label_id, code))
    if info is None:
        return reached

    head = rows[0]
    metadata = {name: head.cells[i] for name, i in export.metadata if head.cells[i] != ""}
    conflicts = sorted({name for name, i in export.metadata for row in rows if row.cells[i] != head.cells[i]})
    image_cells = {
        h: head.cells[i] for i, h in enumerate(export.header) if _norm(h) in _KEY_COLUMNS and head.cells[i]
    }
    native: dict[str, Any] = {
        "export": export.name,
        "image": image_cells,
        "metadata": metadata,
        "points": natives,
    }
    if conflicts:
        native["metadata_conflicts"] = conflicts
    lat = _float(_meta(metadata, "latitude"), 90.0)
    lon = _float(_meta(metadata, "longitude"), 180.0)
    both = lat is not None and lon is not None
    params = ctx.source_params
    tables.add_sample(
        {
            "sample_id": sample_id,
            "upstream_id": f"{export.name}/{key}",
            "image_path": image_rel,
            "image_format": info.format,
            **sample_info_columns(info),
            "captured_at": _captured_at(_meta(metadata, "date")),
            "lat": lat if both else None,
            "lon": lon if both else None,
            "license": params.get("license"),
            "attribution": params.get("attribution"),
            "native_labels": dumps_labels(native),
            "labels": dumps_labels(point_cover_labels(kept)),
            "n_points": len(kept),
        }
    )
    return reached


def ingest(ctx: IngestContext) -> tuple[Tables, dict[str, Any]]:
    policy = str((ctx.params.get("ingest") or {}).get("ambiguous_mapping", "quarantine"))
    if policy not in POLICIES:
        raise ConfigError(
            f"params.yaml: ingest.ambiguous_mapping must be one of {', '.join(POLICIES)}, not {policy!r}"
        )
    taxonomy = Taxonomy.load(ctx.taxonomy_dir)
    run = _Run(ctx, taxonomy, _Crosswalk(taxonomy, policy))
    tables = run.tables
    plans = [_plan(_load_export(ctx.raw_dir / f"s{sid}", sid)) for sid in _exports(ctx.source_params)]

    # Every image of every export in one parallel pass.
    to_probe = [str(p) for plan in plans for p in plan.where.values() if isinstance(p, Path)]
    probes = probe_images(to_probe, ctx.max_pixels, ctx.jobs, ctx.scheduler, desc="coralnet images")

    inputs_by_export: dict[str, dict[str, int]] = {}
    crosswalk_by_export: dict[str, dict[str, Any]] = {}
    with bar(
        total=sum(len(plan.export.rows) for plan in plans), desc="coralnet rows", unit="row"
    ) as progress:
        for plan in plans:
            export = plan.export
            csv_rel = ctx.rel(export.csv_path)
            inputs_by_export[export.name] = {
                "images": len(plan.by_key) + len(plan.orphans),
                "annotation_rows": len(export.rows),
            }
            for name in plan.orphans:
                path = ctx.rel(export.folder / "images" / name)
                tables.reject(
                    "image", f"{export.name}/{name}", path, "no_annotation", "no annotations.csv row names it"
                )
            for row in plan.unkeyed:
                why = (
                    f"{len(row.cells)} cells for a {len(export.header)}-column header"
                    if row.too_long
                    else f"empty {export.key_column}"
                )
                tables.reject("annotation_row", f"{export.name}/row{row.index}", csv_rel, "bad_record", why)
            progress.update(len(plan.unkeyed))
            points_before = len(tables.points)
            reached = 0
            for key in sorted(plan.by_key):
                target = plan.where[key]
                if isinstance(target, Path):
                    probe, image_rel = probes[str(target)], ctx.rel(target)
                else:
                    probe, image_rel = target, csv_rel  # no file to name: the record is the CSV's key
                reached += _ingest_image(run, export, key, plan.by_key[key], probe, image_rel)
                progress.update(len(plan.by_key[key]))
            crosswalk_by_export[export.name] = _coverage(len(tables.points) - points_before, reached)

    ambiguous = run.crosswalk
    extra: dict[str, Any] = {
        "inputs": {
            kind: sum(v[kind] for v in inputs_by_export.values()) for kind in ("images", "annotation_rows")
        },
        "inputs_by_export": inputs_by_export,
        "encoding_by_export": {plan.export.name: plan.export.encoding for plan in plans},
        "crosswalk": _coverage(len(tables.points), sum(v["total"] for v in crosswalk_by_export.values())),
        "crosswalk_by_export": crosswalk_by_export,
        "classes": {
            "benthic_attribute": class_counts(run.kept_attrs),
            "top_level_category": class_counts(run.kept_tops),
        },
        "unconfirmed": dict(sorted(run.unconfirmed.items())),
        "imported_rows_kept": run.counts["imported_rows_kept"],
        "duplicates": {
            "same_label": run.counts["duplicate_same_label"],
            "different_label": run.counts["duplicate_different_label"],
        },
        "ambiguous_mapping": {
            "policy": policy,
            "rule": LOWEST_RULE if policy == "lowest_mapping_id" else "quarantine every point of the label",
            "labels": len(ambiguous.ambiguous_labels),
            "labels_decided": len(ambiguous.decisions),
            "points_decided": sum(run.decided_points.values()),
            "decisions": dict(sorted(ambiguous.decisions.items())),
        },
    }
    return tables, extra


def _meta(metadata: dict[str, str], name: str) -> str | None:
    for column, value in metadata.items():
        if _norm(column) == name:
            return value
    return None


def _coverage(mapped: int, total: int) -> dict[str, Any]:
    return {"mapped": mapped, "total": total, "ratio": round(mapped / total, 6) if total else None}
