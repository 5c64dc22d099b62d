"""ingest@coralnet: CoralNet source exports (`data/raw/coralnet/s<id>/`) -> samples, points, quarantine.

One export per `sources.coralnet.exports` entry, laid out by fetch@coralnet as
`s<id>/annotations.csv`, the export's other top-level CSVs (its labelset, under its own name) and
`s<id>/images/...`. docs/ingest.md "CoralNet" is the user-facing description; this is the contract.

Input records (`report.inputs`; every one ends as exactly one output row, the runner checks):
- `export`: each configured export. Read (its records below), or, when it cannot be parsed and
  `ingest.on_bad_export` is `quarantine`, one `bad_export` row (default `fail`: the stage fails
  with the error, which names the file and the line).
- `point`: the data records of each `annotations.csv` (a quoted multi-line comment is part of one
  record). Each becomes one POINTS row or one quarantine row.
- `image`: per export, the distinct image keys (NFC) of the usable rows, plus the files directly
  in `images/` that no key resolves to (`no_annotation`).
- `file`: any other file of the export that no record uses (`unreferenced_file`): files in
  sub-folders of `images/` (no key can name them), CSVs that are neither the annotations nor the
  labelset in use.

Reading (two passes, `stages.ingest.coralnet_csv`). Pass 1 streams the CSV once and keeps per
record only compact arrays: image key index, byte span, first line, a verdict code. It refuses
the export (UpstreamFormatError naming the file and line) for: a missing file, a header without
`Name`/`Image ID`, `Row`, `Column` and one of `Label ID`, `Label code`, `Label` (the short code,
exports before December 2024 and CoralNet-Toolbox), an unbalanced quote (a record open for more
than 64 lines or at the end of the file, or a line break in a non-free-text column, or a
free-text cell holding the delimiters of whole rows; free text = the metadata columns before
`Row`), a header-only CSV, a CSV none of whose rows is usable for format reasons, a reshaped or
ambiguous labelset, and two image files whose names are equal after NFC when a row names them.
Pass 2 yields the images in sample_id order, reading each image's records again by their spans;
Python values exist for one image at a time.

Reasons, per data record, in the order tested: `encoding_error` (a byte that is not the export's
encoding, UTF-8 unless the entry says `encoding: latin-1`), `bad_record` (more cells than the
header, empty image key, a cell over 128 Ki characters, Row/Column not integers) ->
`unconfirmed_annotation` (`Annotator` `robot`, or a `Status` other than `Confirmed`; `Imported`
rows are kept) -> `bad_record` (no label, or a Label ID that is not an integer) ->
`duplicate_point` (an earlier kept row of the image has this (row, col); the detail says whether
the label differs) -> `unmapped_label` (a code the labelset does not resolve, naming the code and
the file; a Label ID without a usable mapping) / `ambiguous_mapping` (unless
`ingest.ambiguous_mapping: lowest_mapping_id`). Then the runner: `image_unusable` (its image was
quarantined), `geometry_mismatch` (more than `ingest.max_outside_share` of the image's points
outside it: the image and all its points), `point_outside_image`.
Images: `bad_record` (a Name that would leave `images/`, an Image ID that is not a plain id),
`missing_image` (also an Image ID without a file of that stem), the probe's `not_a_regular_file`
(a folder or a symlink where the image should be), `empty_file`, `corrupt_image`,
`image_too_large`, `unsupported_format`, `geometry_mismatch`, `no_annotation`.

Keys and ids. The image key is `Name` when the header has it, else `Image ID`; keys and file names
are compared in NFC. `Name` -> `images/<Name>`; `Image ID` -> `images/<id>.<ext>` (several
files with that stem: .jpg, .jpeg, .png, then others, then by name; the others are
`no_annotation`). `sample_id = make_sample_id("coralnet", "s<id>", key)` (injective: a key that
is not a plain id is slugged and suffixed with a hash of its exact text); `upstream_id =
"s<id>/<key>"`; `point_id = "<sample_id>-r<row>-c<col>"`, unique since duplicates are dropped
first. Quarantined rows: `-dup<k>` for the k-th repeat of a position, `<sample_id>-line<N>` when
Row/Column do not parse, `s<id>/line<N>` when the row has no usable key (N = physical line).

Group keys: `site` = `s<id>/` + the values of the site columns (`site_columns:` of the export's
entry, else `sources.coralnet.site_columns`), joined by `/`, from the image's first row; null when
the export lacks those columns or every value is empty. `captured_at` = `Date` when
`YYYY-MM-DD`; `lat`/`lon` = `Latitude`/`Longitude` when both parse in range.

`native_labels` (JSON, sorted keys):
    {"export": "s<id>",
     "image": {"Name": str} and/or {"Image ID": str},   # the key cells as written
     "metadata": {column: text},   # the columns before Row except the keys, exact text, empty
                                   # cells left out, from the image's first row
     "metadata_conflicts": [column, ...],             # only when rows of one image disagree
     "points": [{"point_id", "row", "col", "label_id", "label_code", "annotator",
                 "date_annotated", "status",
                 "machine_suggestions": [{"code", "confidence"}],  # confidence int when integral
                 "extra": {column: text}}, ...]}                   # unknown columns after Row
`points` lists the kept points in (row, col) order; keys whose cell is empty are left out.
`labels` (JSON): `stages.ingest.common.point_cover_labels` over the kept points (by the runner).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from stages.coralnet_format import KEY_COLUMNS, norm
from stages.errors import TidepoolError, UpstreamFormatError
from stages.ingest.context import IngestContext
from stages.ingest.coralnet_csv import MAX_FIELD_CHARS, parse_record
from stages.ingest.coralnet_labels import LOWEST_RULE, POLICIES, Crosswalk
from stages.ingest.coralnet_scan import (
    ANNOTATIONS,
    BAD_ENCODING,
    BAD_ROWCOL,
    IMAGES,
    LONG_FIELD,
    TOO_WIDE,
    ExportScan,
    export_specs,
    ingest_choice,
    nfc,
    parse_int,
    scan_export,
)
from stages.ingest.probe import image_work
from stages.ingest.records import Point, Quarantine, Record, Report, Sample
from stages.schema import make_sample_id
from stages.taxonomy_index import Taxonomy

SOURCE = "coralnet"
ON_BAD_EXPORT = ("fail", "quarantine")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


# --- pass 2: records --------------------------------------------------------------------------


@dataclass
class _Stats:
    """What the run accumulates across exports for the metrics."""

    unconfirmed: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)
    decided_points: Counter[str] = field(default_factory=Counter)
    exports: dict[str, dict[str, Any]] = field(default_factory=dict)
    bad_exports: dict[str, str] = field(default_factory=dict)


class _Rows:
    """Records of one export read again by their byte spans, one image's worth at a time."""

    def __init__(self, scan: ExportScan, fh: BinaryIO) -> None:
        self.scan, self.fh = scan, fh

    def read(self, idx: np.ndarray) -> list[tuple[int, int, list[str]]]:
        """(line, verdict, cells padded to the header) of records `idx` (in file order)."""
        scan = self.scan
        starts = [scan.start[i] for i in idx]
        ends = [scan.start[i] + scan.length[i] for i in idx]
        lo, hi = starts[0], max(ends)
        out = []
        if hi - lo <= 2 * sum(e - s for s, e in zip(starts, ends)) + 65536:
            self.fh.seek(lo)
            block = self.fh.read(hi - lo)
            chunks = [block[s - lo : e - lo] for s, e in zip(starts, ends)]
        else:  # an image's rows scattered over the file
            chunks = []
            for s, e in zip(starts, ends):
                self.fh.seek(s)
                chunks.append(self.fh.read(e - s))
        for i, data in zip(idx, chunks):
            cells, _bad = parse_record(data, scan.spec.encoding)
            out.append((scan.line[i], scan.verdict[i], cells + [""] * (scan.width - len(cells))))
        return out


def _unkeyed_detail(scan: ExportScan, line: int, verdict: int, data: bytes) -> tuple[str, str]:
    cells, bad = parse_record(data, scan.spec.encoding)
    if verdict == BAD_ENCODING and bad is not None:
        k, offset, byte = bad
        return "encoding_error", (
            f"line {line + k}: byte 0x{byte:02X} at byte {offset + 1} of the line is not "
            f"{scan.spec.encoding} (if the whole export is in another encoding, say so with "
            "`encoding:` in its sources.coralnet.exports entry)"
        )
    if verdict == TOO_WIDE:
        return "bad_record", f"line {line}: {len(cells)} cells for a {scan.width}-column header"
    if verdict == LONG_FIELD:
        long = [
            (scan.header[i] if i < scan.width else f"cell {i + 1}", len(c))
            for i, c in enumerate(cells)
            if len(c) > MAX_FIELD_CHARS
        ]
        what = ", ".join(f"{name!r} ({n} characters)" for name, n in long)
        return "bad_record", f"line {line}: cell {what} over the {MAX_FIELD_CHARS}-character bound"
    return "bad_record", f"line {line}: empty {scan.key_column}"


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


def _meta(metadata: dict[str, str], name: str) -> str | None:
    for column, value in metadata.items():
        if norm(column) == name:
            return value
    return None


def _growth(value: str | None) -> str | None:
    return None if value is None or value.strip() in ("", "None") else value


def _coverage(mapped: int, total: int) -> dict[str, Any]:
    return {"mapped": mapped, "total": total, "ratio": round(mapped / total, 6) if total else None}


def _point_native(
    scan: ExportScan, cells: list[str], point_id: str, r: int, c: int, label_id: str, code: str | None
) -> dict[str, Any]:
    native: dict[str, Any] = {"point_id": point_id, "row": r, "col": c, "label_id": label_id}
    if code:
        native["label_code"] = code
    for key, column in (
        ("annotator", "annotator"),
        ("date_annotated", "date annotated"),
        ("status", "status"),
    ):
        value = scan.cell(cells, column)
        if value != "":
            native[key] = value
    suggestions = []
    for s_at, c_at in scan.suggestions:
        code_s = cells[s_at]
        if code_s == "":
            continue
        conf_text = cells[c_at] if c_at is not None else ""
        conf_int = parse_int(conf_text)
        suggestions.append(
            {"code": code_s, "confidence": conf_int if conf_int is not None else (conf_text or None)}
        )
    if suggestions:
        native["machine_suggestions"] = suggestions
    extra = {name: cells[i] for name, i in scan.extras if cells[i] != ""}
    if extra:
        native["extra"] = extra
    return native


@dataclass
class _Image:
    """One image's rows judged by the adapter: quarantine rows to yield, candidate points."""

    rejected: list[Quarantine] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    reached: int = 0  # points that reached the crosswalk


def _judge_rows(
    scan: ExportScan,
    rows: list[tuple[int, int, list[str]]],
    sample_id: str,
    csv_rel: str,
    crosswalk: Crosswalk,
    stats: _Stats,
) -> _Image:
    image = _Image()
    first_at: dict[tuple[int, int], tuple[str, str]] = {}
    repeats: Counter[tuple[int, int]] = Counter()
    code_column = "label code" if "label code" in scan.col else "label"

    def reject(record_id: str, reason: str, detail: str) -> None:
        image.rejected.append(Quarantine("point", record_id, csv_rel, reason, detail))

    for line, verdict, cells in rows:
        row_text, col_text = scan.cell(cells, "row"), scan.cell(cells, "column")
        if verdict == BAD_ROWCOL:
            reject(
                f"{sample_id}-line{line}",
                "bad_record",
                f"line {line}: Row/Column not integers ({row_text!r}, {col_text!r})",
            )
            continue
        r, c = parse_int(row_text), parse_int(col_text)
        assert r is not None and c is not None  # pass 1 said so
        rid = f"{sample_id}-r{r}-c{c}"
        annotator = scan.cell(cells, "annotator").strip()
        if annotator.casefold() == "robot":
            stats.unconfirmed["robot"] += 1
            reject(
                rid, "unconfirmed_annotation", f"line {line}: Annotator robot: an unconfirmed machine label"
            )
            continue
        if "status" in scan.col:
            status = scan.cell(cells, "status").strip()
            if status.casefold() != "confirmed":
                stats.unconfirmed[f"status {status or '(empty)'}"] += 1
                reject(rid, "unconfirmed_annotation", f"line {line}: Status {status!r} is not Confirmed")
                continue
        label_text = scan.cell(cells, "label id").strip()
        code = nfc(scan.cell(cells, code_column).strip()) or None
        label_int = parse_int(label_text)
        if label_text and label_int is None:
            reject(rid, "bad_record", f"line {line}: Label ID {label_text!r} is not an integer")
            continue
        if label_int is None and code is None:
            reject(rid, "bad_record", f"line {line}: a confirmed row without a label")
            continue
        label_key = str(label_int) if label_int is not None else f"code {code}"
        first = first_at.get((r, c))
        if first is not None:
            repeats[(r, c)] += 1
            same = first[1] == label_key
            stats.counts["duplicate_same_label" if same else "duplicate_different_label"] += 1
            detail = (
                f"line {line}: (row, col) = ({r}, {c}) already annotated "
                f"(kept {first[0]}, label {first[1]}); "
                + ("same label" if same else f"different label: this row {label_key}")
            )
            reject(f"{rid}-dup{repeats[(r, c)]}", "duplicate_point", detail)
            continue
        first_at[(r, c)] = (rid, label_key)
        image.reached += 1
        if label_int is not None:
            label_id = str(label_int)
        else:
            assert code is not None
            resolved_id, why = scan.labelset.resolve(code)
            if resolved_id is None:
                reject(rid, "unmapped_label", f"line {line}: Label code {code!r} {why}")
                continue
            label_id = resolved_id
        resolved = crosswalk.resolve(label_id)
        if resolved.mapping is None:
            assert resolved.reason is not None
            reject(rid, resolved.reason, f"line {line}: {resolved.detail}")
            continue
        if resolved.decided:
            stats.decided_points[label_id] += 1
        if annotator.casefold() == "imported":
            stats.counts["imported_rows_kept"] += 1
        m = resolved.mapping
        taxonomy = crosswalk.taxonomy
        code = code or scan.labelset.codes.get(label_id)
        image.points.append(
            Point(
                point_id=rid,
                row=r,
                col=c,
                record_id=rid,
                labels={
                    "source_label_id": label_id,
                    "source_label": code,
                    "benthic_attribute_id": m.benthic_attribute_id,
                    "benthic_attribute_name": taxonomy.attributes[m.benthic_attribute_id]["name"],
                    "growth_form_id": _growth(m.growth_form_id),
                    "growth_form_name": _growth(m.growth_form_name),
                    "top_level_category": taxonomy.top_level(m.benthic_attribute_id),
                },
                native=_point_native(scan, cells, rid, r, c, label_id, code),
            )
        )
    return image


def _image_columns(
    ctx: IngestContext, scan: ExportScan, rows: list[tuple[int, int, list[str]]]
) -> dict[str, Any]:
    head = rows[0][2]
    metadata = {name: head[i] for name, i in scan.metadata if head[i] != ""}
    conflicts = sorted({name for name, i in scan.metadata for _l, _v, cells in rows if cells[i] != head[i]})
    image_cells = {h: head[i] for i, h in enumerate(scan.header) if norm(h) in KEY_COLUMNS and head[i]}
    native: dict[str, Any] = {"export": scan.name, "image": image_cells, "metadata": metadata}
    if conflicts:
        native["metadata_conflicts"] = conflicts
    lat = _float(_meta(metadata, "latitude"), 90.0)
    lon = _float(_meta(metadata, "longitude"), 180.0)
    both = lat is not None and lon is not None
    site_values = [head[i] for i in scan.site_at]
    params = ctx.source_params
    return {
        "captured_at": _captured_at(_meta(metadata, "date")),
        "lat": lat if both else None,
        "lon": lon if both else None,
        "site": "/".join([scan.name, *site_values]) if any(v.strip() for v in site_values) else None,
        "license": params.get("license"),
        "attribution": params.get("attribution"),
        "native_labels": native,
    }


def _export_records(
    ctx: IngestContext, report: Report, scan: ExportScan, crosswalk: Crosswalk, stats: _Stats
) -> Iterator[Record]:
    raw_rel = ctx.rel(ctx.raw_dir)
    export_rel = f"{raw_rel}/{scan.name}"
    csv_rel = f"{export_rel}/{ANNOTATIONS}"
    keys = np.frombuffer(scan.key_ix, dtype=np.int32) if len(scan.key_ix) else np.zeros(0, np.int32)
    report.inputs["point"] += len(keys)

    unreferenced = scan.unreferenced
    report.inputs["image"] += len(scan.keys) + len(unreferenced)
    report.inputs["file"] += len(scan.other_files)

    with open(scan.csv_path, "rb") as fh:
        for i in np.flatnonzero(keys < 0):
            line, verdict = scan.line[i], scan.verdict[i]
            fh.seek(scan.start[i])
            reason, detail = _unkeyed_detail(scan, line, verdict, fh.read(scan.length[i]))
            yield Quarantine("point", f"{scan.name}/line{line}", csv_rel, reason, detail)
        for name in unreferenced:
            yield Quarantine(
                "image",
                f"{scan.name}/{name}",
                f"{export_rel}/{IMAGES}/{name}",
                "no_annotation",
                f"no {ANNOTATIONS} row names it",
            )
        for rel in scan.other_files:
            yield Quarantine(
                "file",
                f"{scan.name}/{rel}",
                f"{export_rel}/{rel}",
                "unreferenced_file",
                "no record of the export uses this file"
                + (" (a symbolic link)" if (scan.folder / rel).is_symlink() else ""),
            )

        order = np.argsort(keys, kind="stable")
        keyed = order[int(np.count_nonzero(keys < 0)) :]
        bounds = np.concatenate([[0], np.cumsum(np.bincount(keys[keyed], minlength=len(scan.keys)))])
        reader = _Rows(scan, fh)
        mapped = reached = 0
        for sample_id, k in sorted(
            (make_sample_id(SOURCE, scan.name, key), k) for k, key in enumerate(scan.keys)
        ):
            key = scan.keys[k]
            rows = reader.read(keyed[bounds[k] : bounds[k + 1]])
            image = _judge_rows(scan, rows, sample_id, csv_rel, crosswalk, stats)
            yield from image.rejected
            reached += image.reached
            mapped += len(image.points)
            upstream_id = f"{scan.name}/{key}"
            target = scan.where[k]
            if isinstance(target, tuple):
                reason, detail = target
                yield Quarantine("image", upstream_id, csv_rel, reason, detail)
                for p in image.points:
                    yield Quarantine(
                        "point",
                        p.record_id,
                        csv_rel,
                        "image_unusable",
                        f"image {upstream_id}: {reason} ({detail})",
                    )
                continue
            path = scan.folder / IMAGES / target
            image_rel = f"{export_rel}/{IMAGES}/{target}"
            yield Sample(
                sample_id=sample_id,
                upstream_id=upstream_id,
                work=image_work(ctx, path),
                columns={"image_path": image_rel, **_image_columns(ctx, scan, rows)},
                file=image_rel,
                points=image.points,
                points_file=csv_rel,
                native_points_key="points",
            )
    stat = scan.csv_path.stat()
    if (stat.st_size, stat.st_mtime_ns) != scan.stat:
        raise TidepoolError(f"{scan.csv_path}: changed while it was being read; run the ingest again")
    stats.exports[scan.name] = {
        "annotations": csv_rel,
        "labelset": f"{export_rel}/{scan.labelset.path.name}" if scan.labelset.path else None,
        "labelset_rows": scan.labelset.rows,
        "key_column": scan.key_column,
        "label_columns": [h for h in scan.header if norm(h) in ("label id", "label code", "label")],
        "encoding": scan.spec.encoding,
        "rows": len(keys),
        "physical_lines": scan.csv.physical_lines,
        "blank_lines": scan.csv.blank_lines,
        "multiline_records": scan.csv.multiline_records,
        "images": len(scan.keys),
        "unreferenced_files": len(unreferenced) + len(scan.other_files),
        "site_columns": [scan.header[i] for i in scan.site_at],
        "site_columns_missing": scan.site_missing,
        "crosswalk": _coverage(mapped, reached),
    }


def records(ctx: IngestContext, report: Report) -> Iterator[Record]:
    policy = ingest_choice(ctx.params, "ambiguous_mapping", POLICIES)
    on_bad_export = ingest_choice(ctx.params, "on_bad_export", ON_BAD_EXPORT)
    specs = export_specs(ctx.source_params)
    taxonomy = Taxonomy.load(ctx.taxonomy_dir)
    crosswalk = Crosswalk(taxonomy, policy)
    stats = _Stats()
    for spec in specs:
        report.inputs["export"] += 1
        try:
            scan = scan_export(ctx, spec)
        except UpstreamFormatError as exc:
            if on_bad_export == "fail":
                raise UpstreamFormatError(
                    exc.path,
                    f"CoralNet export {spec.name}: {exc.problem} (to ingest the other exports without it, "
                    "set ingest.on_bad_export: quarantine)",
                ) from exc
            try:
                file = ctx.rel(Path(exc.path))
            except ValueError:
                file = f"{ctx.rel(ctx.raw_dir)}/{spec.name}"
            stats.bad_exports[spec.name] = f"{file}: {exc.problem}"  # repo-relative: metrics are stable
            yield Quarantine("export", spec.name, file, "bad_export", exc.problem)
            continue
        report.read["export"] += 1
        yield from _export_records(ctx, report, scan, crosswalk, stats)

    report.extra.update(
        {
            "exports": dict(sorted(stats.exports.items())),
            "bad_exports": dict(sorted(stats.bad_exports.items())),
            "crosswalk": _coverage(
                sum(e["crosswalk"]["mapped"] for e in stats.exports.values()),
                sum(e["crosswalk"]["total"] for e in stats.exports.values()),
            ),
            "unconfirmed": dict(sorted(stats.unconfirmed.items())),
            "imported_rows_kept": stats.counts["imported_rows_kept"],
            "duplicates": {
                "same_label": stats.counts["duplicate_same_label"],
                "different_label": stats.counts["duplicate_different_label"],
            },
            "ambiguous_mapping": {
                "policy": policy,
                "rule": LOWEST_RULE
                if policy == "lowest_mapping_id"
                else "quarantine every point of the label",
                "labels": len(crosswalk.ambiguous_labels),
                "labels_decided": len(crosswalk.decisions),
                "points_decided": sum(stats.decided_points.values()),
                "decisions": dict(sorted(crosswalk.decisions.items())),
            },
        }
    )
