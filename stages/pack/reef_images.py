"""reef-images product: one sample per whole image (MERMAID, CoralNet, Seatizen), multilabel.

Members: `jpg`, `png` or `webp` (the image, RGB, its longer side bounded by `max_side`, product
encoder settings; metadata stripped; a JPEG that is shrunk is decoded at the smallest DCT scale
that covers the output, then resized with LANCZOS and `reducing_gap`, see codec.decode_for_size),
`seg.png` where the sample has a mask (Seatizen: PNG mode L,
resized with nearest neighbour exactly like the image; values as in
`data/interim/seatizen/mask_classes.json`, 0 = unlabelled, listed under `seg` in classes.json),
and `json`:

- `multilabel`: dense vectors over the class spaces of classes.json (reef_points.ReefClasses):
  `values` at the product's `label_level` and `top_level` over the 12 categories, each entry
  1 (present), 0 (absent) or -1 (not annotated).
  - MERMAID / CoralNet (point annotations): 1 for the classes some kept point carries, 0 for
    every other class (absent at the annotated points).
  - Seatizen: the crosswalked multilabel values (1/0/-1); every class the Seatizen classes do
    not reach is -1 (unknown, not absent).
  Presence is as labelled: a point labelled `Acropora` sets `Acropora`, not its parent
  `Hard coral` (the taxonomy's `parent` ids are in classes.json for a hierarchy-closed view).
- `cover` (point-annotated images): `n_points` and, per attribute and per top-level category
  present, `{index, id/name, count, cover}` with cover = count / n_points; null for Seatizen.
- `labels`, `native_labels`: the ingest JSON verbatim (the native multilabel for Seatizen,
  the points as upstream has them for MERMAID/CoralNet).
- sample_id, image_id, source, split, license, attribution, image {width, height,
  original_width, original_height, resized}, has_mask, region, session, lat, lon, captured_at.

No `cls`: a reef image has many labels.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from stages.errors import UpstreamFormatError
from stages.pack import (
    PackContext,
    ProductPlan,
    SampleOut,
    SampleRow,
    Unit,
    UnitOut,
    check_key,
    decode_for_size,
    digest,
    encode_mask,
    encode_rgb,
    fit_max_side,
    guarded,
    load_mask,
    manifest_facts,
    num,
    parse_json,
    resize_mask,
    sample_json,
    select_samples,
)
from stages.pack.reef_points import ReefClasses
from stages.pack.tarwriter import sample_bytes
from stages.taxonomy_index import TOP_LEVEL_CATEGORIES, Taxonomy

COLUMNS = [
    "upstream_id",
    "image_path",
    "file_sha256",
    "width",
    "height",
    "license",
    "attribution",
    "native_labels",
    "region",
    "session",
    "lat",
    "lon",
    "captured_at",
    "site",
]


def _vectors(
    labels: dict[str, Any], level_space: ReefClasses, top: ReefClasses, where: str
) -> dict[str, Any]:
    """(values at the product level, values over the top-level categories) for one image."""
    if "benthic_attributes" in labels:  # point cover (MERMAID, CoralNet)
        values = [0] * level_space.num_classes
        top_values = [0] * top.num_classes
        for attr_id, attr in (labels.get("benthic_attributes") or {}).items():
            if level_space.level == "attribute_growth_form":
                for gf in attr.get("growth_forms") or []:
                    values[level_space.index(attr_id, gf.get("id"), None, where)] = 1
            elif level_space.level == "attribute":
                values[level_space.index(attr_id, None, None, where)] = 1
        for name in labels.get("top_level_categories") or {}:
            top_values[top.index(None, None, name, where)] = 1
        if level_space.level == "top_level":
            values = list(top_values)
        return {"values": values, "top_level": top_values}
    # Seatizen multilabel, already crosswalked: unknown unless some class column reached it.
    values = [-1] * level_space.num_classes
    top_values = [-1] * top.num_classes
    for name, value in (labels.get("top_level") or {}).items():
        top_values[top.index(None, None, name, where)] = int(value)
    if level_space.level == "attribute":
        for item in labels.get("attribute") or []:
            values[level_space.index(item["id"], None, None, where)] = int(item["value"])
    elif level_space.level == "attribute_growth_form":
        for item in labels.get("attribute_growth_form") or []:
            values[level_space.index(item["id"], item.get("growth_form_id"), None, where)] = int(
                item["value"]
            )
    else:
        values = list(top_values)
    return {"values": values, "top_level": top_values}


def _cover(labels: dict[str, Any], attrs: ReefClasses, top: ReefClasses, where: str) -> dict[str, Any] | None:
    if "benthic_attributes" not in labels:
        return None
    return {
        "n_points": labels.get("n_points"),
        "attribute": [
            {
                "index": attrs.index(attr_id, None, None, where),
                "id": attr_id,
                "name": a.get("name"),
                "count": a.get("count"),
                "cover": a.get("cover"),
            }
            for attr_id, a in sorted((labels.get("benthic_attributes") or {}).items())
        ],
        "top_level": [
            {
                "index": top.index(None, None, name, where),
                "name": name,
                "count": c.get("count"),
                "cover": c.get("cover"),
            }
            for name, c in sorted((labels.get("top_level_categories") or {}).items())
        ],
    }


def _mask_classes(ctx: PackContext) -> Any:
    if "seatizen" not in ctx.product.sources:
        return None
    path = ctx.interim("seatizen") / "mask_classes.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UpstreamFormatError(path, f"not valid JSON: {exc}") from exc


def plan(ctx: PackContext) -> ProductPlan:
    selected, skipped = select_samples(ctx, COLUMNS)
    taxonomy = Taxonomy.load(ctx.taxonomy_dir)
    space = ReefClasses(taxonomy, ctx.settings.label_level)
    attrs = space if space.level == "attribute" else ReefClasses(taxonomy, "attribute")
    top = ReefClasses(taxonomy, "top_level")
    settings = ctx.settings.image
    rows = {sid: row for sid, row in zip(selected["sample_id"], selected.to_dict("records"))}
    keys: dict[str, list[str]] = {}
    for sid, split in zip(selected["sample_id"], selected["split"]):
        keys.setdefault(split, []).append(check_key(sid, f"reef-images sample {sid}"))
    masks = 0

    def make_unit(key: str, split: str) -> Unit:
        row = rows[key]
        where = f"data/interim/{row['source']}/samples.parquet sample {key}"
        labels = parse_json(row["labels"], where) or {}
        native = parse_json(row["native_labels"], where)
        width, height = int(row["width"]), int(row["height"])
        size = fit_max_side(width, height, settings.max_side)
        vectors = _vectors(labels, space, top, where)
        doc = {
            "sample_id": key,
            "image_id": row["upstream_id"],
            "source": row["source"],
            "split": split,
            "license": row["license"],
            "attribution": row["attribution"],
            "image": {
                "width": size[0],
                "height": size[1],
                "original_width": width,
                "original_height": height,
                "resized": size != (width, height),
            },
            "has_mask": row["mask_path"] is not None,
            "multilabel": {"level": space.level, **vectors},
            "cover": _cover(labels, attrs, top, where),
            "labels": labels,
            "native_labels": native,
            "region": row["region"],
            "session": row["session"],
            "lat": num(row["lat"]),
            "lon": num(row["lon"]),
            "captured_at": row["captured_at"],
        }
        positives = tuple(i for i, v in enumerate(vectors["values"]) if v == 1)
        meta = {
            "sample_id": key,
            "source": row["source"],
            "upstream_id": row["upstream_id"],
            "license": row["license"],
            "labels": row["labels"],
            **manifest_facts(row),
        }
        mask = str(ctx.path(row["mask_path"])) if row["mask_path"] is not None else None
        doc_bytes = sample_json(doc)
        payload = (str(ctx.path(row["image_path"])), (width, height), size, mask, settings, doc_bytes)
        inputs = None
        mask_digest = _file_digest(Path(mask)) if mask is not None else None
        if row["file_sha256"] and (mask is None or mask_digest is not None):
            inputs = {
                "image": row["file_sha256"],
                "mask": mask_digest,
                "size": [width, height, *size],
                "json": digest(doc_bytes),
            }
        return Unit(key, split, payload, (SampleRow(key, meta, positives),), inputs)

    classes = space.class_map()
    classes["task"] = "multilabel"
    classes["values"] = {"1": "present", "0": "absent", "-1": "not annotated"}
    classes["top_level"] = [{"index": i, "name": n} for i, n in enumerate(TOP_LEVEL_CATEGORIES)]
    seg = _mask_classes(ctx)
    if seg is not None:
        classes["seg"] = seg
    masks = sum(1 for r in rows.values() if r["mask_path"] is not None)
    fields = {
        settings.ext: f"the whole image, RGB, longer side at most {settings.max_side} px"
        if settings.max_side
        else "the whole image, RGB, original size",
        "json": "multilabel vectors (1/0/-1) in the MERMAID taxonomy, point cover, native and ingest labels",
    }
    if masks:
        fields["seg.png"] = "segmentation mask, PNG mode L, class ids (classes.json `seg`), where one exists"
    return ProductPlan(
        keys=keys,
        make_unit=make_unit,
        encode=encode,
        classes=classes,
        fields=fields,
        skipped=skipped,
        chunksize=2,
        extra_metrics={"masks": masks},
    )


def _file_digest(path: Path) -> str | None:
    """sha256 of a mask file (an ingest output: small), None when it cannot be read: the unit is
    then not cached and its encoder reports the problem."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _encode(unit: Unit) -> UnitOut:
    path_str, original, size, mask_path, settings, doc = unit.payload
    rgb = decode_for_size(Path(path_str), settings.max_pixels, original, size)
    members = {settings.ext: encode_rgb(rgb, settings), "json": doc}
    if mask_path is not None:
        mask = load_mask(Path(mask_path), original, settings.max_pixels)
        members["seg.png"] = encode_mask(resize_mask(mask, size), settings)
    return UnitOut(unit.key, unit.split, (SampleOut(unit.key, sample_bytes(unit.key, members)),), decodes=1)


def encode(unit: Unit) -> UnitOut:
    return guarded(_encode, unit)
