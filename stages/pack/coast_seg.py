"""coast-seg product: Coast Train image plus its mask in the 7 common classes.

Members: `webp`, `png` or `jpg` (the RGB image of the npz, chosen as ingest chose it:
`stages.ingest.coasttrain.load_coasttrain_image`), `seg.png` (PNG mode L: 0 water,
1 whitewater, 2 sediment, 3 developed, 4 vegetation, 5 natural_terrain, 6 other, 255 ignore; the
mask ingest wrote, checked to be mode L at the image's size), `json`: sample_id, upstream_id
(`<Record>/<npz path>`), source, split, license, attribution, image {width, height, ...},
classes, ignore_index, present, fractions, lat, lon, captured_at, spatial_block, session, labels
and native_labels (the ingest JSON verbatim: record, npz, original class list, geo).

With `max_side` set, the image is shrunk with LANCZOS and the mask with nearest neighbour to the
same size (the `fractions` in `labels` then describe the original mask). No `cls`: a tile has
many classes; classes.json counts, per split, the tiles where each class is present.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from stages.errors import UpstreamFormatError
from stages.ingest.coasttrain import load_coasttrain_image
from stages.pack import (
    PackContext,
    ProductPlan,
    SampleOut,
    SampleRow,
    Unit,
    UnitOut,
    check_key,
    check_size,
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
    resize_rgb,
    sample_json,
    select_samples,
)
from stages.pack.tarwriter import sample_bytes

COLUMNS = [
    "upstream_id",
    "image_path",
    "file_sha256",
    "width",
    "height",
    "license",
    "attribution",
    "native_labels",
    "lat",
    "lon",
    "captured_at",
    "spatial_block",
    "session",
    "site",
]


def plan(ctx: PackContext) -> ProductPlan:
    selected, skipped = select_samples(ctx, COLUMNS)
    settings = ctx.settings.image
    rows = {sid: row for sid, row in zip(selected["sample_id"], selected.to_dict("records"))}
    keys: dict[str, list[str]] = {}
    class_lists: dict[tuple[str, ...], str] = {}
    ignore = 255
    for sid, split in zip(selected["sample_id"], selected["split"]):
        keys.setdefault(split, []).append(check_key(sid, f"coast-seg sample {sid}"))
        labels = parse_json(rows[sid]["labels"], f"coast-seg sample {sid}") or {}
        class_lists.setdefault(tuple(labels.get("classes") or ()), sid)
        ignore = int(labels.get("ignore_index", ignore))
    if len(class_lists) > 1:
        # Mask ids index the class list, so one product needs one list.
        raise UpstreamFormatError(
            "data/interim/coasttrain/samples.parquet",
            f"samples disagree on the common class list: {sorted(class_lists.items())[:2]}",
        )
    common: list[str] = list(next(iter(class_lists), ()))
    class_id = {name: i for i, name in enumerate(common)}

    def make_unit(key: str, split: str) -> Unit:
        row = rows[key]
        where = f"data/interim/coasttrain/samples.parquet sample {key}"
        labels = parse_json(row["labels"], where) or {}
        native = parse_json(row["native_labels"], where)
        width, height = int(row["width"]), int(row["height"])
        size = fit_max_side(width, height, settings.max_side)
        present = [class_id[c] for c in labels.get("present") or [] if c in class_id]
        doc = {
            "sample_id": key,
            "upstream_id": row["upstream_id"],
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
            "classes": labels.get("classes"),
            "ignore_index": labels.get("ignore_index", ignore),
            "present": labels.get("present"),
            "fractions": labels.get("fractions"),
            "lat": num(row["lat"]),
            "lon": num(row["lon"]),
            "captured_at": row["captured_at"],
            "spatial_block": row["spatial_block"],
            "session": row["session"],
            "labels": labels,
            "native_labels": native,
        }
        meta = {
            "sample_id": key,
            "source": row["source"],
            "upstream_id": row["upstream_id"],
            "license": row["license"],
            "labels": row["labels"],
            **manifest_facts(row),
        }
        doc_bytes = sample_json(doc)
        mask_path = ctx.path(row["mask_path"])
        image_path = str(ctx.path(row["image_path"]))
        payload = (image_path, str(mask_path), (width, height), size, settings, doc_bytes)
        inputs = None
        try:
            mask_digest = hashlib.sha256(mask_path.read_bytes()).hexdigest()
        except OSError:
            mask_digest = None  # not cached: the encoder reports the missing mask
        if row["file_sha256"] and mask_digest:
            inputs = {
                "npz": row["file_sha256"],
                "mask": mask_digest,
                "size": [width, height, *size],
                "json": digest(doc_bytes),
            }
        return Unit(key, split, payload, (SampleRow(key, meta, tuple(present)),), inputs)

    classes: dict[str, Any] = {
        "task": "segmentation",
        "level": "coast-train common classes",
        "index": "mask value; the Coast Train authors' super_classes order",
        "num_classes": len(common),
        "ignore_index": ignore,
        "classes": [{"index": i, "name": n} for i, n in enumerate(common)],
    }
    return ProductPlan(
        keys=keys,
        make_unit=make_unit,
        encode=encode,
        classes=classes,
        fields={
            settings.ext: "the RGB image of the npz (orig_image[..., :3], else image)",
            "seg.png": f"mask, PNG mode L, class ids 0..{len(common) - 1} (classes.json), {ignore} = ignore",
            "json": "classes, fractions, location and date, record metadata, licence",
        },
        skipped=skipped,
        chunksize=4,
        code_modules=("stages.ingest.coasttrain",),  # load_coasttrain_image picks the pixels
    )


def _encode(unit: Unit) -> UnitOut:
    npz, mask_path, original, size, settings, doc = unit.payload
    rgb = load_coasttrain_image(npz, settings.max_pixels)
    check_size(rgb, original, npz)
    mask = load_mask(Path(mask_path), original, settings.max_pixels)
    members = {
        settings.ext: encode_rgb(resize_rgb(rgb, size), settings),
        "seg.png": encode_mask(resize_mask(mask, size), settings),
        "json": doc,
    }
    return UnitOut(
        unit.key,
        unit.split,
        (SampleOut(unit.key, sample_bytes(unit.key, members)),),
        decodes=1,
    )


def encode(unit: Unit) -> UnitOut:
    return guarded(_encode, unit)
