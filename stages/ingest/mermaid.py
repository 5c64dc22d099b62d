"""ingest@mermaid: the confirmed-annotations parquet and its PNGs -> samples, points, quarantine.

Input records (every one ends as exactly one output row; the runner checks the sums):
- `point`: the rows of `mermaid_confirmed_annotations.parquet` (one row per annotated point).
  Each becomes one POINTS row or one quarantine row.
- `image`: the distinct non-null `image_id`s of the parquet, plus any `<x>.png` in the raw folder
  that no row references (`no_annotation`). Each becomes one SAMPLES row or one quarantine row.

Reasons. Judged here, from the row alone, in this order: `bad_record` (null image_id / point_id /
attribute id, row or col not an integer), `duplicate_point` (a `point_id` already given by an
earlier row in (image_id, row, col, id) order), `unmapped_label` (benthic attribute id absent from
the taxonomy snapshot). An image_id that is not a plain `[A-Za-z0-9_-]` id (it would name a path
outside the raw folder) is a `bad_record` image, and its points `image_unusable`. Judged by the
runner against the image (stages/ingest/runner.py): the probe's reasons for the image
(`missing_image`, `empty_file`, `corrupt_image`, `image_too_large`, `unsupported_format`) with its
points as `image_unusable`; `point_outside_image`; `geometry_mismatch` (too many points outside);
`duplicate_point` for a repeated (row, col) in one image (the first in the order above stays).

Ids: `sample_id = make_sample_id("mermaid", image_id)`; `point_id = make_sample_id("mermaid",
point_id)`. The parquet's `point_id` (not its `id`) names the point: `id` is the annotation
(classification) row, which MERMAID replaces when a point is re-classified, while `point_id` is the
point's location in the image and survives a label correction, so a patch keeps its id (and
split) when only its label changes. An image with every point quarantined is still a sample
(`n_points = 0`): the image is fine, and dedup needs its hashes; pack skips it.

Group key: `region` = the parquet's `region_id` (a MEOW realm uuid, null for some images); there
is no project, site or transect id upstream. No capture date or location exists in the file.

`native_labels` (JSON, sorted keys), as upstream has it, for the image's kept points:
    {"image_id": str, "region_id": str | null, "region_name": str | null,
     "points": [{"id", "point_id", "row", "col", "benthic_attribute_id", "benthic_attribute_name",
                 "growth_form_id", "growth_form_name", "updated_on"}, ...]}
points in (row, col, point id) order; `growth_form_*` "None"/"" -> null; `updated_on` ISO 8601 text.

`labels` (JSON): `stages.ingest.common.point_cover_labels` over the kept points. Attribute names
come from the taxonomy snapshot; the top-level category through its parent chain.

Memory: the parquet is read as Arrow (strings dictionary-encoded), ordered with an Arrow sort, and
turned into Python values one image at a time.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.errors import UpstreamFormatError
from stages.ingest.context import IngestContext
from stages.ingest.probe import image_work
from stages.ingest.records import Point, Quarantine, Record, Report, Sample
from stages.schema import make_sample_id
from stages.taxonomy_index import Taxonomy

SOURCE = "mermaid"
DEFAULT_ANNOTATIONS = "mermaid_confirmed_annotations.parquet"
COLUMNS = (
    "id",
    "image_id",
    "point_id",
    "row",
    "col",
    "benthic_attribute_id",
    "benthic_attribute_name",
    "growth_form_id",
    "growth_form_name",
    "updated_on",
    "region_id",
    "region_name",
)
# Without these a point, its label or its group key would silently change; the other three are
# informational (names come from the taxonomy; updated_on only travels in native_labels).
REQUIRED = (
    "id",
    "image_id",
    "point_id",
    "row",
    "col",
    "benthic_attribute_id",
    "growth_form_id",
    "growth_form_name",
    "region_id",
)
# Repeated values (an image's id on each of its points, a handful of attributes): dictionary-encoded.
_DICTIONARY = (
    "image_id",
    "benthic_attribute_id",
    "benthic_attribute_name",
    "growth_form_id",
    "growth_form_name",
    "region_id",
    "region_name",
)
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]+$")
_NULL_GROWTH = ("", "None")
_NO_INT = -(1 << 62)


def read_annotations(path: Path) -> pa.Table:
    """The parquet's columns as Arrow (missing optional ones null); UpstreamFormatError when it is
    missing or reshaped."""
    try:
        schema = pq.read_schema(path)
    except FileNotFoundError as exc:
        raise UpstreamFormatError(path, "annotations parquet missing: run fetch@mermaid") from exc
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError variants for non-parquet bytes
        raise UpstreamFormatError(path, f"not a readable parquet file ({exc})") from exc
    found = list(schema.names)
    missing = [c for c in REQUIRED if c not in found]
    if missing:
        raise UpstreamFormatError(
            path,
            f"expected columns {', '.join(COLUMNS)} (required: {', '.join(REQUIRED)}); "
            f"missing {', '.join(missing)}; found {', '.join(found)}",
        )
    present = [c for c in COLUMNS if c in found]
    dictionary = [c for c in _DICTIONARY if c in present and pa.types.is_string(schema.field(c).type)]
    try:
        # In batches: the decoded table plus one batch, not every decoded page at once.
        reader = pq.ParquetFile(path, read_dictionary=dictionary)
        batches = list(reader.iter_batches(batch_size=65536, columns=present, use_threads=False))
        table = pa.Table.from_batches(
            batches, schema=pa.schema([reader.schema_arrow.field(c) for c in present])
        )
    except Exception as exc:
        raise UpstreamFormatError(path, f"not a readable parquet file ({exc})") from exc
    if table.num_rows == 0:
        # Every image would become `no_annotation`: a source that lost all its annotations is a
        # broken upstream, not an empty release.
        raise UpstreamFormatError(path, "the annotations parquet has no rows")
    for c in COLUMNS:
        if c not in present:
            table = table.append_column(c, pa.nulls(table.num_rows, pa.string()))
    return table


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text if text.strip() else None


def _growth(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return None if text in _NULL_GROWTH else str(value)


def _int(value: Any) -> int | None:
    """An integer pixel coordinate, tolerating integral floats and numeric text."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    if number != number or number in (float("inf"), float("-inf")) or not number.is_integer():
        return None
    return int(number)


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _coverage(mapped: int, total: int) -> dict[str, Any]:
    return {"mapped": mapped, "total": total, "ratio": round(mapped / total, 6) if total else None}


def _int_column(column: pa.ChunkedArray) -> np.ndarray:
    """row/col as int64 with _NO_INT where the value is not an integer (sorted first, then refused)."""
    if pa.types.is_integer(column.type):
        return pc.fill_null(column.cast(pa.int64()), _NO_INT).to_numpy()
    return np.array([_NO_INT if (v := _int(x)) is None else v for x in column.to_pylist()], dtype=np.int64)


def _order(table: pa.Table, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Row indices in (image_id, row, col, id) order, so "first" never depends on upstream order."""
    keys = pa.table(
        {
            "image_id": pc.fill_null(table.column("image_id").cast(pa.string()), ""),
            "row": rows,
            "col": cols,
            "id": pc.fill_null(table.column("id").cast(pa.string()), ""),
        }
    )
    return pc.sort_indices(
        keys,
        sort_keys=[
            ("image_id", "ascending"),
            ("row", "ascending"),
            ("col", "ascending"),
            ("id", "ascending"),
        ],
    ).to_numpy()


def records(ctx: IngestContext, report: Report) -> Iterator[Record]:
    params = ctx.source_params
    parquet = ctx.raw_dir / str(params.get("annotations") or DEFAULT_ANNOTATIONS)
    parquet_rel = ctx.rel(parquet)
    table = read_annotations(parquet)
    taxonomy = Taxonomy.load(ctx.taxonomy_dir)
    n_rows = table.num_rows
    report.inputs["point"] += n_rows

    row_ix = _int_column(table.column("row"))
    col_ix = _int_column(table.column("col"))
    order = _order(table, row_ix, col_ix)
    # Runs of one image in the sorted order, found on dictionary codes (no Python str per point);
    # null/empty image ids sort first and are bad records.
    sorted_ids = pc.fill_null(table.column("image_id").cast(pa.string()).take(pa.array(order)), "")
    encoded = pc.dictionary_encode(sorted_ids).combine_chunks()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    names = encoded.dictionary.to_pylist()  # one per distinct image id
    del sorted_ids, encoded
    bounds = np.flatnonzero(np.diff(codes)) + 1 if n_rows else np.array([], dtype=np.int64)
    starts = np.concatenate([[0], bounds]) if n_rows else bounds
    ends = np.concatenate([bounds, [n_rows]]) if n_rows else bounds
    runs: dict[str, tuple[int, int]] = {}
    bad_image_rows: list[int] = []
    for start, end in zip(starts.tolist(), ends.tolist()):
        image_id = names[codes[start]]
        if _text(image_id) is None:
            bad_image_rows.extend(range(start, end))
        else:
            runs[str(image_id)] = (start, end)
    del codes, names

    # The few point ids given twice; the first in order keeps its id.
    counts = pc.value_counts(pc.drop_null(table.column("point_id").cast(pa.string())))
    repeated = set(counts.filter(pc.greater(counts.field("counts"), 1)).field("values").to_pylist())
    del counts
    seen_repeated: dict[str, str] = {}

    growth = pc.utf8_trim_whitespace(table.column("growth_form_id").cast(pa.string()))
    growth_null_rows = int(
        pc.sum(
            pc.or_kleene(pc.is_null(growth), pc.is_in(growth, pa.array(_NULL_GROWTH))).cast(pa.int64())
        ).as_py()
        or 0
    )
    del growth
    columns = [c for c in COLUMNS if c not in ("row", "col")]
    crosswalk = Counter()
    regions: Counter[str] = Counter()

    for k in bad_image_rows:
        i = int(order[k])
        rec = table.slice(i, 1).to_pylist()[0]
        record = _text(rec["point_id"]) or _text(rec["id"]) or f"row{i}"
        yield Quarantine("point", record, parquet_rel, "bad_record", "image_id is null or empty")

    orphans = sorted(
        p for p in ctx.raw_dir.glob("*.png") if not p.name.endswith("_thumbnail.png") and p.stem not in runs
    )
    report.inputs["image"] += len(runs) + len(orphans)
    for p in orphans:
        yield Quarantine("image", p.stem, ctx.rel(p), "no_annotation", "no parquet row references this image")

    # One contiguous copy of the columns a point needs: `take` on a chunked table (a parquet read,
    # one chunk per row group) concatenates every chunk on each call, which made this loop
    # quadratic (52 ms per image at 5M points, against 17 us on one chunk).
    selected = table.select(columns).combine_chunks()
    for sample_id, image_id in sorted((make_sample_id(SOURCE, i), i) for i in runs):
        start, end = runs[image_id]
        idx = pa.array(order[start:end])
        rows = selected.take(idx).to_pylist()
        rr, cc = row_ix[order[start:end]], col_ix[order[start:end]]
        regions[_text(rows[0]["region_id"]) or "null"] += 1
        safe = bool(_SAFE_ID.match(image_id))
        path = ctx.raw_dir / f"{image_id}.png"
        points: list[Point] = []
        unusable: list[str] = []
        for rec, r, c, k in zip(rows, rr.tolist(), cc.tolist(), range(start, end)):
            point_id = _text(rec["point_id"])
            record = point_id or _text(rec["id"]) or f"{image_id}-row{int(order[k])}"
            attr_id = _text(rec["benthic_attribute_id"])
            bad = []
            if point_id is None:
                bad.append("point_id is null")
            if r == _NO_INT or c == _NO_INT:
                raw = table.column("row")[int(order[k])].as_py(), table.column("col")[int(order[k])].as_py()
                bad.append(f"row/col not integers ({raw[0]!r}, {raw[1]!r})")
            if attr_id is None:
                bad.append("benthic_attribute_id is null")
            if bad:
                yield Quarantine("point", record, parquet_rel, "bad_record", "; ".join(bad))
                continue
            assert point_id is not None and attr_id is not None
            if point_id in repeated:
                first = seen_repeated.setdefault(point_id, f"{image_id} ({r}, {c})")
                if first != f"{image_id} ({r}, {c})":
                    yield Quarantine(
                        "point", record, parquet_rel, "duplicate_point", f"point_id already given at {first}"
                    )
                    continue
            if not safe:
                unusable.append(record)
                continue
            crosswalk["total"] += 1
            attr = taxonomy.attributes.get(attr_id)
            if attr is None:
                yield Quarantine(
                    "point",
                    record,
                    parquet_rel,
                    "unmapped_label",
                    f"benthic attribute {attr_id} ({rec['benthic_attribute_name']!r}) "
                    "is not in the taxonomy snapshot",
                )
                continue
            crosswalk["mapped"] += 1
            gf_id, gf_name = _growth(rec["growth_form_id"]), _growth(rec["growth_form_name"])
            points.append(
                Point(
                    point_id=make_sample_id(SOURCE, point_id),
                    row=r,
                    col=c,
                    record_id=record,
                    labels={
                        "source_label_id": attr_id,
                        "source_label": _text(rec["benthic_attribute_name"]),
                        "benthic_attribute_id": attr_id,
                        "benthic_attribute_name": attr["name"],
                        "growth_form_id": gf_id,
                        "growth_form_name": taxonomy.growth_forms.get(gf_id, gf_name) if gf_id else gf_name,
                        "top_level_category": taxonomy.top_level(attr_id),
                    },
                    native={
                        "id": _text(rec["id"]),
                        "point_id": point_id,
                        "row": r,
                        "col": c,
                        "benthic_attribute_id": attr_id,
                        "benthic_attribute_name": _text(rec["benthic_attribute_name"]),
                        "growth_form_id": gf_id,
                        "growth_form_name": gf_name,
                        "updated_on": _iso(rec["updated_on"]),
                    },
                )
            )
        if not safe:
            detail = f"image_id {image_id!r} is not a plain id"
            yield Quarantine("image", image_id, parquet_rel, "bad_record", detail)
            for record in unusable:
                yield Quarantine(
                    "point", record, parquet_rel, "image_unusable", f"image {image_id}: bad_record ({detail})"
                )
            continue
        first = rows[0]
        yield Sample(
            sample_id=sample_id,
            upstream_id=image_id,
            work=image_work(ctx, path),
            columns={
                "image_path": ctx.rel(path),
                "region": _text(first["region_id"]),
                "license": params.get("license"),
                "attribution": params.get("attribution"),
                "native_labels": {
                    "image_id": image_id,
                    "region_id": _text(first["region_id"]),
                    "region_name": _text(first["region_name"]),
                },
            },
            file=ctx.rel(path),
            points=points,
            points_file=parquet_rel,
            native_points_key="points",
        )

    report.extra.update(
        {
            "crosswalk": _coverage(crosswalk["mapped"], crosswalk["total"]),
            "growth_form_null_rows": growth_null_rows,
            "regions": dict(sorted(regions.items())),
        }
    )
