"""ingest@mermaid: the confirmed-annotations parquet and its PNGs -> samples, points, quarantine.

Input records (every one ends as exactly one output row):
- `points`: the rows of `mermaid_confirmed_annotations.parquet` (one row per annotated point).
  Each becomes one POINTS row or one quarantine row with `record_kind = "point"`.
- `images`: the distinct non-null `image_id`s of the parquet, plus any `<x>.png` in the raw folder
  that no row references. Each becomes one SAMPLES row or one quarantine row with
  `record_kind = "image"` (an unreferenced PNG is `no_annotation`).
`metrics.inputs = {"images": n, "points": n}`, so `images == samples + quarantined images` and
`points == points + quarantined points`.

Reasons, in the order they are tested (a record gets the first that applies):
- point: `bad_record` (null image_id / point_id / attribute id, row or col not an integer) ->
  `image_unusable` (its image was quarantined; the detail names the image's reason) ->
  `point_outside_image` (not 0 <= row < H, 0 <= col < W) -> `duplicate_point` (a `point_id` or
  an in-image (row, col) already kept; the first in (image_id, row, col, id) order is kept) ->
  `unmapped_label` (benthic attribute id absent from the taxonomy snapshot).
- image: `bad_record` (an image_id that is not a plain [A-Za-z0-9_-] id: it would name a path
  outside the raw folder), `missing_image`, `empty_file`, `corrupt_image`, `image_too_large`,
  `unsupported_format` (from the one probe of `<image_id>.png`), `no_annotation`.

Ids: `sample_id = "mermaid-<image_id>"`; `point_id = "mermaid-<point_id>"`. The parquet's
`point_id` (not its `id`) names the point: `id` is the annotation (classification) row, which
MERMAID replaces when a point is re-classified, while `point_id` is the point's location in the
image and survives a label correction, so a patch keeps its id (and split) when only its label
changes. An image with every point quarantined is still a sample (`n_points = 0`): the image is
fine, and dedup needs its hashes; pack skips samples whose `labels.n_points` is 0.

Group key: `region` = the parquet's `region_id` (a MEOW realm uuid, null for some images); there
is no project, site or transect id upstream. No capture date or location exists in the file.

`native_labels` (JSON, sorted keys), as upstream has it, for the image's kept points:
    {"image_id": str, "region_id": str | null, "region_name": str | null,
     "points": [{"id", "point_id", "row", "col", "benthic_attribute_id", "benthic_attribute_name",
                 "growth_form_id", "growth_form_name", "updated_on"}, ...]}
points in (row, col) order; `growth_form_*` "None"/"" -> null; `updated_on` ISO 8601 text.

`labels` (JSON): `stages.ingest.common.point_cover_labels` over the kept points: `n_points`, per
benthic attribute id {name, top_level_category, count, cover, growth_forms[{id, name, count}]},
per top-level category {count, cover}. Attribute names come from the taxonomy snapshot; the
top-level category through its parent chain.
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from stages.errors import UpstreamFormatError
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
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]+$")
_NULL_GROWTH = ("", "None")


def read_annotations(path: Path) -> dict[str, list[Any]]:
    """The parquet's columns as Python lists; UpstreamFormatError when it is missing or reshaped."""
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
    try:
        table = pq.read_table(path, columns=present)
    except Exception as exc:
        raise UpstreamFormatError(path, f"not a readable parquet file ({exc})") from exc
    out = {c: table.column(c).to_pylist() for c in present}
    for c in COLUMNS:
        out.setdefault(c, [None] * table.num_rows)
    return out


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


def ingest(ctx: IngestContext) -> tuple[Tables, dict[str, Any]]:
    params = ctx.source_params
    parquet = ctx.raw_dir / str(params.get("annotations") or DEFAULT_ANNOTATIONS)
    parquet_rel = ctx.rel(parquet)
    cols = read_annotations(parquet)
    taxonomy = Taxonomy.load(ctx.taxonomy_dir)
    tables = Tables(SOURCE)
    n_rows = len(cols["image_id"])

    # Sorted by (image_id, row, col, id) ourselves, so "first kept" does not depend on how the
    # upstream happened to order the file.
    def order(i: int) -> tuple[str, int, int, str]:
        r, c = _int(cols["row"][i]), _int(cols["col"][i])
        return (
            str(cols["image_id"][i] or ""),
            r if r is not None else -(1 << 62),
            c if c is not None else -(1 << 62),
            str(cols["id"][i] or ""),
        )

    by_image: dict[str, list[int]] = {}
    for i in sorted(range(n_rows), key=order):
        image_id = _text(cols["image_id"][i])
        if image_id is None:
            record = _text(cols["point_id"][i]) or _text(cols["id"][i]) or f"row{i}"
            tables.reject("point", record, parquet_rel, "bad_record", "image_id is null or empty")
            continue
        by_image.setdefault(image_id, []).append(i)

    image_ids = sorted(by_image)
    paths = {iid: ctx.raw_dir / f"{iid}.png" for iid in image_ids if _SAFE_ID.match(iid)}
    probes = probe_images(
        [str(p) for p in paths.values()], ctx.max_pixels, ctx.jobs, ctx.scheduler, desc="mermaid images"
    )

    # PNGs nobody references (e.g. left by an earlier, larger snapshot) are inputs too.
    orphans = sorted(
        p
        for p in ctx.raw_dir.glob("*.png")
        if not p.name.endswith("_thumbnail.png") and p.stem not in by_image
    )
    for p in orphans:
        tables.reject("image", p.stem, ctx.rel(p), "no_annotation", "no parquet row references this image")

    seen_points: set[str] = set()
    kept_attrs: list[str] = []
    kept_tops: list[str] = []
    reached_crosswalk = 0
    growth_null_rows = sum(1 for v in cols["growth_form_id"] if _growth(v) is None)

    with bar(total=n_rows, desc="mermaid points", unit="pt") as progress:
        for image_id in image_ids:
            rows = by_image[image_id]
            progress.update(len(rows))
            path = paths.get(image_id)
            image_rel = ctx.rel(path) if path is not None else parquet_rel
            problem: ImageProblem | None
            info: ImageInfo | None = None
            if path is None:
                problem = ImageProblem("bad_record", f"image_id {image_id!r} is not a plain id")
            else:
                result = probes[str(path)]
                problem = result if isinstance(result, ImageProblem) else None
                info = result if isinstance(result, ImageInfo) else None
            if problem is not None:
                tables.reject("image", image_id, image_rel, problem.reason, problem.detail)

            kept: list[dict[str, Any]] = []
            native_points: list[dict[str, Any]] = []
            seen_rc: dict[tuple[int, int], str] = {}
            for i in rows:
                record = _text(cols["point_id"][i]) or _text(cols["id"][i]) or f"{image_id}-row{i}"
                point_id = _text(cols["point_id"][i])
                attr_id = _text(cols["benthic_attribute_id"][i])
                r, c = _int(cols["row"][i]), _int(cols["col"][i])
                bad = []
                if point_id is None:
                    bad.append("point_id is null")
                if r is None or c is None:
                    bad.append(f"row/col not integers ({cols['row'][i]!r}, {cols['col'][i]!r})")
                if attr_id is None:
                    bad.append("benthic_attribute_id is null")
                if bad:
                    tables.reject("point", record, parquet_rel, "bad_record", "; ".join(bad))
                    continue
                assert point_id is not None and r is not None and c is not None and attr_id is not None
                if problem is not None or info is None:
                    detail = f"image {image_id}.png: {problem.reason if problem else 'unknown'}"
                    if problem is not None and problem.detail:
                        detail += f" ({problem.detail})"
                    tables.reject("point", record, parquet_rel, "image_unusable", detail)
                    continue
                if not (0 <= r < info.height and 0 <= c < info.width):
                    tables.reject(
                        "point",
                        record,
                        parquet_rel,
                        "point_outside_image",
                        f"(row, col) = ({r}, {c}) outside {info.width}x{info.height} image {image_id}.png",
                    )
                    continue
                pid = make_sample_id(SOURCE, point_id)
                if pid in seen_points or (r, c) in seen_rc:
                    first = pid if pid in seen_points else seen_rc[(r, c)]
                    what = "point_id already kept" if pid in seen_points else f"(row, col) = ({r}, {c})"
                    tables.reject(
                        "point", record, parquet_rel, "duplicate_point", f"{what}: first kept as {first}"
                    )
                    continue
                seen_points.add(pid)
                seen_rc[(r, c)] = pid
                reached_crosswalk += 1
                attr = taxonomy.attributes.get(attr_id)
                if attr is None:
                    tables.reject(
                        "point",
                        record,
                        parquet_rel,
                        "unmapped_label",
                        f"benthic attribute {attr_id} ({cols['benthic_attribute_name'][i]!r}) "
                        "is not in the taxonomy snapshot",
                    )
                    continue
                top = taxonomy.top_level(attr_id)
                gf_id = _growth(cols["growth_form_id"][i])
                gf_name = _growth(cols["growth_form_name"][i])
                if gf_id is not None and gf_id in taxonomy.growth_forms:
                    gf_name = taxonomy.growth_forms[gf_id]
                point = {
                    "point_id": pid,
                    "sample_id": make_sample_id(SOURCE, image_id),
                    "row": r,
                    "col": c,
                    "source_label_id": attr_id,
                    "source_label": _text(cols["benthic_attribute_name"][i]),
                    "benthic_attribute_id": attr_id,
                    "benthic_attribute_name": attr["name"],
                    "growth_form_id": gf_id,
                    "growth_form_name": gf_name,
                    "top_level_category": top,
                }
                tables.add_point(point)
                kept.append(point)
                kept_attrs.append(attr["name"])
                kept_tops.append(top)
                native_points.append(
                    {
                        "id": _text(cols["id"][i]),
                        "point_id": point_id,
                        "row": r,
                        "col": c,
                        "benthic_attribute_id": attr_id,
                        "benthic_attribute_name": _text(cols["benthic_attribute_name"][i]),
                        "growth_form_id": _growth(cols["growth_form_id"][i]),
                        "growth_form_name": _growth(cols["growth_form_name"][i]),
                        "updated_on": _iso(cols["updated_on"][i]),
                    }
                )
            if problem is not None or info is None:
                continue
            first = rows[0]
            region_id = _text(cols["region_id"][first])
            native = {
                "image_id": image_id,
                "region_id": region_id,
                "region_name": _text(cols["region_name"][first]),
                "points": sorted(native_points, key=lambda p: (p["row"], p["col"], p["point_id"])),
            }
            tables.add_sample(
                {
                    "sample_id": make_sample_id(SOURCE, image_id),
                    "upstream_id": image_id,
                    "image_path": image_rel,
                    "image_format": info.format,
                    **sample_info_columns(info),
                    "region": region_id,
                    "license": params.get("license"),
                    "attribution": params.get("attribution"),
                    "native_labels": dumps_labels(native),
                    "labels": dumps_labels(point_cover_labels(kept)),
                    "n_points": len(kept),
                }
            )

    extra = {
        "inputs": {"images": len(image_ids) + len(orphans), "points": n_rows},
        "crosswalk": _coverage(len(tables.points), reached_crosswalk),
        "classes": {
            "benthic_attribute": class_counts(kept_attrs),
            "top_level_category": class_counts(kept_tops),
        },
        "growth_form_null_rows": growth_null_rows,
        "regions": dict(sorted(Counter(s["region"] or "null" for s in tables.samples).items())),
    }
    return tables, extra
