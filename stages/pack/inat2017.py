"""inat2017 product: one sample per image, the upstream JPEG bytes unchanged unless `resize` is set.

Members: `jpg` (the upstream file's bytes, verified against the sha256 ingest recorded; with
`resize: N` an image whose longer side exceeds N is decoded, shrunk and re-encoded with the
product's JPEG settings, and a file whose bytes are PNG (ingest's `image_format`) is re-encoded
as JPEG: a `jpg` member always holds a JPEG; the others keep their bytes), `cls` (the iNat 2017
category id, which is the `class_index` of the ingest labels: stable under growth, see
docs/ingest.md), `json`.

`json`: sample_id, image_id, source, split, official_split, category_id, category,
supercategory, class_index, bboxes (`[x, y, w, h]` in the pixels of the stored `jpg`: scaled when
the image was resized), location (upstream record), lat, lon, captured_at, observer, file_name,
rights_holder, image_license, license, attribution, image {width, height, original_width,
original_height, resized, reencoded, upstream_format}, labels and native_labels (the ingest JSON,
verbatim).

No JPEG is decoded unless it is resized: the bytes go through as they are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stages.errors import UpstreamFormatError
from stages.pack import (
    ImageSettings,
    PackContext,
    ProductPlan,
    SampleOut,
    SampleRow,
    Unit,
    UnitOut,
    check_key,
    decode_for_size,
    digest,
    encode_rgb,
    fit_max_side,
    guarded,
    manifest_facts,
    num,
    parse_json,
    sample_json,
    select_samples,
)
from stages.pack.codec import read_verified
from stages.pack.tarwriter import sample_bytes

COLUMNS = [
    "upstream_id",
    "image_path",
    "width",
    "height",
    "file_sha256",
    "license",
    "attribution",
    "native_labels",
    "official_split",
    "observer",
    "lat",
    "lon",
    "captured_at",
    "image_format",
    "site",
]


def _load_classes(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UpstreamFormatError(path, "class list missing: run ingest@inat2017") from exc
    except json.JSONDecodeError as exc:
        raise UpstreamFormatError(path, f"not valid JSON: {exc}") from exc
    if not isinstance(data, list) or not all(
        isinstance(c, dict) and {"category_id", "name", "supercategory"} <= set(c) for c in data
    ):
        raise UpstreamFormatError(path, "expected a list of {category_id, name, supercategory}")
    return sorted(data, key=lambda c: int(c["category_id"]))


def _scaled_boxes(boxes: list[dict[str, Any]], sx: float, sy: float) -> list[dict[str, Any]]:
    out = []
    for box in boxes:
        x, y, w, h = box["bbox"]
        out.append({**box, "bbox": [x * sx, y * sy, w * sx, h * sy]})
    return out


def plan(ctx: PackContext) -> ProductPlan:
    selected, skipped = select_samples(ctx, COLUMNS)
    classes = _load_classes(ctx.interim("inat2017") / "classes.json")
    max_side = ctx.settings.image.max_side
    rows = {sid: row for sid, row in zip(selected["sample_id"], selected.to_dict("records"))}
    keys: dict[str, list[str]] = {}
    for sid, split in zip(selected["sample_id"], selected["split"]):
        keys.setdefault(split, []).append(check_key(sid, f"inat2017 sample {sid}"))

    def make_unit(key: str, split: str) -> Unit:
        row = rows[key]
        where = f"data/interim/inat2017/samples.parquet sample {key}"
        labels = parse_json(row["labels"], where) or {}
        native = parse_json(row["native_labels"], where) or {}
        width, height = int(row["width"]), int(row["height"])
        out_w, out_h = fit_max_side(width, height, max_side)
        resized = (out_w, out_h) != (width, height)
        # iNat's folder holds some PNG files under .jpg names (ingest reads formats from the bytes);
        # the `jpg` member must be JPEG, so those are decoded and encoded with the product's settings.
        reencoded = resized or str(row["image_format"]) != "jpeg"
        boxes = native.get("bboxes") or []
        if resized:
            boxes = _scaled_boxes(boxes, out_w / width, out_h / height)
        cls = int(labels["class_index"])
        doc = {
            "sample_id": key,
            "image_id": row["upstream_id"],
            "source": row["source"],
            "split": split,
            "official_split": row["official_split"],
            "category_id": labels.get("category_id"),
            "category": labels.get("category"),
            "supercategory": labels.get("supercategory"),
            "class_index": cls,
            "bboxes": boxes,
            "location": native.get("location"),
            "lat": num(row["lat"]),
            "lon": num(row["lon"]),
            "captured_at": row["captured_at"],
            "observer": row["observer"],
            "file_name": native.get("file_name"),
            "rights_holder": native.get("rights_holder"),
            "image_license": native.get("license_name"),
            "license": row["license"],
            "attribution": row["attribution"],
            "image": {
                "width": out_w,
                "height": out_h,
                "original_width": width,
                "original_height": height,
                "resized": resized,
                "reencoded": reencoded,
                "upstream_format": row["image_format"],
            },
            "labels": labels,
            "native_labels": native,
        }
        meta = {
            "sample_id": key,
            "source": row["source"],
            "upstream_id": row["upstream_id"],
            "license": row["license"],
            "cls": cls,
            "label": labels.get("category"),
            "labels": row["labels"],
            **manifest_facts(row),
        }
        doc_bytes = sample_json(doc)
        payload = (
            str(ctx.path(row["image_path"])),
            row["file_sha256"],
            ((width, height), (out_w, out_h)) if reencoded else None,
            ctx.settings.image,
            doc_bytes,
            cls,
        )
        inputs = None
        if row["file_sha256"]:
            inputs = {"image": row["file_sha256"], "size": [out_w, out_h], "json": digest(doc_bytes)}
            inputs["cls"] = cls
        return Unit(key, split, payload, (SampleRow(key, meta, (cls,)),), inputs)

    return ProductPlan(
        keys=keys,
        make_unit=make_unit,
        encode=encode,
        classes={
            "task": "classification",
            "level": "category",
            "index": "the iNat 2017 category id (sparse; stable when images, categories or supercategories "
            "are added)",
            "num_classes": (max(int(c["category_id"]) for c in classes) + 1) if classes else 0,
            "classes": [
                {"index": int(c["category_id"]), "name": c["name"], "supercategory": c["supercategory"]}
                for c in classes
            ],
        },
        fields={
            "jpg": "the upstream JPEG bytes (re-encoded when `resize` shrinks the image or the upstream "
            "file is not a JPEG)",
            "cls": "iNat 2017 category id (classes.json)",
            "json": "category, supercategory, bboxes, location, licence and attribution, ingest labels",
        },
        skipped=skipped,
        chunksize=16,
    )


def _encode(unit: Unit) -> UnitOut:
    path_str, sha256, size, settings, doc, cls = unit.payload
    settings: ImageSettings
    path = Path(path_str)
    data = read_verified(path, sha256)
    decodes = 0
    if size is not None:
        original, out_size = size
        rgb = decode_for_size(path, settings.max_pixels, original, out_size)  # a reduced decode
        decodes = 1
        data = encode_rgb(
            rgb,
            ImageSettings(
                "jpg", settings.jpeg_quality, settings.png_compress_level, None, settings.max_pixels
            ),
        )
    members = {"jpg": data, "cls": b"%d" % cls, "json": doc}
    return UnitOut(
        unit.key,
        unit.split,
        (SampleOut(unit.key, sample_bytes(unit.key, members)),),
        decodes=decodes,
    )


def encode(unit: Unit) -> UnitOut:
    return guarded(_encode, unit)
