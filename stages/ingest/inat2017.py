"""ingest@inat2017: the iNaturalist 2017 COCO JSONs and the fetched image subset into the sample table.

Raw layout (docs/architecture.md): `train2017.json`, `val2017.json` (images, categories,
annotations: one label per image), `train_2017_bboxes.json`, `val_2017_bboxes.json` (the same
with `bbox [x,y,w,h]`, `area`, `iscrowd`, possibly several boxes per image, only for some
supercategories), `train2017_locations.json`, `val2017_locations.json` (records `id, lat, lon,
user_id` and a date whose key is unverified), and `train_val_images/<supercategory>/<category>/
<hex>.jpg` for the configured supercategories only.

Input records, two kinds, each ending exactly once (`inputs` in the metrics):
- `images`: every image record of train2017.json and val2017.json whose supercategory is in
  `sources.inat2017.supercategories` (the supercategory of its annotation's category; for an
  image without annotation, the supercategory folder of its `file_name`) -> one sample, or one
  quarantine row with record_kind `image`: `missing_image`, `corrupt_image`, `empty_file`,
  `image_too_large`, `unsupported_format` (from the probe), `no_annotation`, `bad_record`
  (missing or unsafe `file_name`, an image id already seen, several categories, an unknown
  category id);
- `orphan_annotations`: annotations of a selected category whose `image_id` has no image record
  -> one quarantine row `missing_image` (record_kind `annotation_row`).
Image records of other supercategories are not input records: they are counted under
`filtered_by_params` in the metrics (the fetch did not download their files either).
So `inputs.images == samples + quarantined images` and `inputs.orphan_annotations ==
quarantined annotation rows`.

Every input image is decoded once, in parallel (`probe_images`: reduced JPEG decode, pHash).

Columns: sample_id = `inat2017-<image id>`, upstream_id = the image id, official_split
`train`/`val` (the JSON the image is listed in), observer = the location record's `user_id` (null
when unknown: no observer key), lat/lon and captured_at from the location record (date key
`date`, else the first of DATE_KEYS present; nulls allowed), license = `sources.inat2017.license`,
attribution = `<rights_holder> via iNaturalist (<image licence name>); <sources.inat2017.attribution>`.

`native_labels` (JSON, sorted keys):
    {"category_id": int, "category": str, "supercategory": str, "split": "train"|"val",
     "file_name": str, "license_id": int|null, "license_name": str|null, "rights_holder": str|null,
     "bboxes": [{"id": int|null, "bbox": [x, y, w, h], "area": float|null, "iscrowd": int|null}, ...]
               (sorted by annotation id; [] when the image has none),
     "location": {"lat", "lon", "user_id", "date"} | null   (the record as upstream has it, date
                 under the key "date" whatever the upstream key was)}
`labels` (JSON, sorted keys):
    {"category_id": int, "category": str, "supercategory": str, "class_index": int}

class_index is the iNat 2017 category id itself, not a rank of the categories that happen to be
present: the competition's own label (comparable with published models), unchanged when images
are added, when an image is quarantined, when categories are added (new ids never renumber old
ones) and when `supercategories` grows (adding Aves does not renumber fish). The index space is
sparse (0..5088 upstream); `classes.json` beside the tables lists the selected categories
(`category_id, name, supercategory`) so a trainer can size or compact its output layer.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from stages import schema
from stages.errors import TidepoolError, UpstreamFormatError
from stages.fsutil import write_json
from stages.imaging import ImageInfo
from stages.ingest.common import Tables, class_counts, dumps_labels, probe_images, sample_info_columns
from stages.ingest.context import IngestContext

SOURCE = "inat2017"
SPLITS = ("train", "val")
IMAGES_DIR = "train_val_images"
COCO_KEYS = ("images", "categories", "annotations")
IMAGE_KEYS = ("id",)  # file_name is checked per record: its absence is a bad record, not a new format
CATEGORY_KEYS = ("id", "name", "supercategory")
ANNOTATION_KEYS = ("image_id", "category_id")
BBOX_KEYS = ("image_id", "bbox")
LOCATION_KEYS = ("id",)
# The date key of the location files is unverified (SOURCES §5): `date` first, then plausible names.
DATE_KEYS = (
    "date",
    "datetime",
    "date_time",
    "observed_on",
    "observation_date",
    "time_observed_at",
    "timestamp",
)


def _files(split: str) -> dict[str, str]:
    return {
        "coco": f"{split}2017.json",
        "bboxes": f"{split}_2017_bboxes.json",
        "locations": f"{split}2017_locations.json",
    }


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError as exc:
        raise UpstreamFormatError(path, "file not found (run fetch@inat2017)") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UpstreamFormatError(path, f"not valid JSON: {exc}") from exc


def _records(path: Path, doc: Any, key: str, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """doc[key] as a list of objects that all carry `required`; anything else is a format change."""
    records = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(records, list):
        raise UpstreamFormatError(path, f"expected a list under {key!r}")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or any(k not in rec for k in required):
            found = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise UpstreamFormatError(path, f"{key}[{i}]: expected keys {list(required)}, found {found}")
    return records


def read_coco(path: Path, box_file: bool = False) -> dict[str, list[dict[str, Any]]]:
    doc = _read_json(path)
    wanted = ("annotations",) if box_file else COCO_KEYS
    if not isinstance(doc, dict) or any(k not in doc for k in wanted):
        found = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise UpstreamFormatError(path, f"expected top-level keys {list(wanted)}, found {found}")
    if box_file:
        return {"annotations": _records(path, doc, "annotations", BBOX_KEYS)}
    return {
        "images": _records(path, doc, "images", IMAGE_KEYS),
        "categories": _records(path, doc, "categories", CATEGORY_KEYS),
        "annotations": _records(path, doc, "annotations", ANNOTATION_KEYS),
        "licenses": doc.get("licenses") if isinstance(doc.get("licenses"), list) else [],
    }


def read_locations(path: Path) -> tuple[dict[Any, dict[str, Any]], str | None]:
    """id -> location record (date under "date"), and the upstream date key that was found."""
    doc = _read_json(path)
    if isinstance(doc, dict) and isinstance(doc.get("locations"), list):
        doc = doc["locations"]
    if not isinstance(doc, list):
        raise UpstreamFormatError(
            path, "expected a JSON list of location records (id, lat, lon, user_id, date)"
        )
    records = _records(path, {"locations": doc}, "locations", LOCATION_KEYS)
    date_key = next((k for k in DATE_KEYS if any(k in r for r in records)), None)
    out: dict[Any, dict[str, Any]] = {}
    for rec in records:
        out.setdefault(
            rec["id"],
            {
                "lat": rec.get("lat"),
                "lon": rec.get("lon"),
                "user_id": rec.get("user_id"),
                "date": rec.get(date_key) if date_key else None,
            },
        )
    return out, date_key


def _coord(value: Any, bound: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and abs(number) <= bound else None


def iso_date(value: Any) -> str | None:
    """An upstream date or date-time as ISO 8601; None when absent or unreadable."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).isoformat()
    except ValueError:
        pass
    try:
        return dt.date.fromisoformat(text[:10]).isoformat()
    except ValueError:
        return None


def _box(ann: dict[str, Any]) -> dict[str, Any] | None:
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        return None
    return {"id": ann.get("id"), "bbox": bbox, "area": ann.get("area"), "iscrowd": ann.get("iscrowd")}


def _safe_image_path(file_name: Any) -> PurePosixPath | None:
    """`train_val_images/<sup>/<cat>/<hex>.jpg`, relative and without `..`; None otherwise."""
    if not isinstance(file_name, str) or not file_name or "\\" in file_name or "\0" in file_name:
        return None
    path = PurePosixPath(file_name)
    if path.is_absolute() or ".." in path.parts or len(path.parts) < 2 or path.parts[0] != IMAGES_DIR:
        return None
    return path


def _id_key(value: Any) -> tuple[int, int, str]:
    """Sort key for upstream ids: integers numerically (COCO ids are ints), anything else after."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, str(value))


def _observer(user_id: Any) -> str | None:
    if user_id is None or isinstance(user_id, bool):
        return None
    if isinstance(user_id, float) and user_id.is_integer():
        user_id = int(user_id)
    text = str(user_id).strip()
    return text or None


def _attribution(rights_holder: Any, licence_name: str | None, base: str | None) -> str:
    parts = []
    if isinstance(rights_holder, str) and rights_holder.strip():
        parts.append(
            f"{rights_holder.strip()} via iNaturalist" + (f" ({licence_name})" if licence_name else "")
        )
    if base:
        parts.append(base)
    return "; ".join(parts)


def _selected(ctx: IngestContext) -> set[str]:
    values = ctx.source_params.get("supercategories")
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        raise TidepoolError(
            "params.yaml: `sources.inat2017.supercategories` must be a non-empty list of names"
        )
    return set(values)


def _categories(ctx: IngestContext, docs: Iterable[tuple[Path, list[dict[str, Any]]]]) -> dict[Any, dict]:
    categories: dict[Any, dict[str, Any]] = {}
    for path, records in docs:
        for cat in records:
            entry = {"name": cat["name"], "supercategory": cat["supercategory"]}
            if categories.setdefault(cat["id"], entry) != entry:
                raise UpstreamFormatError(
                    path, f"category {cat['id']} is {entry}, another file says {categories[cat['id']]}"
                )
    return categories


def ingest(ctx: IngestContext) -> tuple[Tables, dict[str, Any]]:
    tables = Tables(SOURCE)
    selected = _selected(ctx)
    license_, base_attribution = ctx.source_params.get("license"), ctx.source_params.get("attribution")

    coco = {split: read_coco(ctx.raw_dir / _files(split)["coco"]) for split in SPLITS}
    boxes_docs = {split: read_coco(ctx.raw_dir / _files(split)["bboxes"], box_file=True) for split in SPLITS}
    locations: dict[str, dict[Any, dict[str, Any]]] = {}
    date_keys: dict[str, str | None] = {}
    for split in SPLITS:
        locations[split], date_keys[split] = read_locations(ctx.raw_dir / _files(split)["locations"])
    categories = _categories(ctx, ((ctx.raw_dir / _files(s)["coco"], coco[s]["categories"]) for s in SPLITS))
    licences = {
        lic.get("id"): lic.get("name")
        for split in SPLITS
        for lic in coco[split]["licenses"]
        if isinstance(lic, dict)
    }

    boxes: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    boxes_dropped = 0
    for split in SPLITS:
        for ann in boxes_docs[split]["annotations"]:
            box = _box(ann)
            if box is None:
                boxes_dropped += 1
            else:
                boxes[ann["image_id"]].append(box)

    # Pass 1: decide, for every image record, whether it is an input and whether it can be probed.
    candidates: list[dict[str, Any]] = []  # input images that reach the probe
    seen_ids: dict[Any, str] = {}
    filtered: Counter[str] = Counter()
    inputs_images = orphan_annotations = 0
    for split in SPLITS:
        coco_path = ctx.raw_dir / _files(split)["coco"]
        rel_json = ctx.rel(coco_path)
        image_ids = {img["id"] for img in coco[split]["images"]}
        by_image: dict[Any, set[Any]] = defaultdict(set)
        for ann in coco[split]["annotations"]:
            by_image[ann["image_id"]].add(ann["category_id"])
            if ann["image_id"] not in image_ids:
                cat = categories.get(ann["category_id"])
                if cat is not None and cat["supercategory"] in selected:
                    orphan_annotations += 1
                    tables.reject(
                        "annotation_row",
                        f"{split}:{ann.get('id', ann['image_id'])}",
                        rel_json,
                        "missing_image",
                        f"annotation for image id {ann['image_id']}, which {coco_path.name} does not list",
                    )
        for img in coco[split]["images"]:
            image_id = img["id"]
            path = _safe_image_path(img.get("file_name"))
            cat_ids = sorted(by_image.get(image_id, ()), key=str)
            cats = [categories.get(c) for c in cat_ids]
            if cats and cats[0] is not None:
                supercategory = cats[0]["supercategory"]
            else:
                supercategory = path.parts[1] if path is not None and len(path.parts) > 2 else None
            if supercategory is not None and supercategory not in selected:
                filtered[supercategory] += 1
                continue
            inputs_images += 1
            record_id = str(image_id)
            file_ref = ctx.rel(ctx.raw_dir / path) if path is not None else rel_json

            def reject(
                reason: str, detail: str, record_id: str = record_id, file_ref: str = file_ref
            ) -> None:
                tables.reject("image", record_id, file_ref, reason, detail)

            if image_id in seen_ids:
                reject(
                    "bad_record", f"image id also listed in {seen_ids[image_id]}2017.json; the first is kept"
                )
            elif path is None:
                reject(
                    "bad_record", f"file_name {img.get('file_name')!r} is missing or not under {IMAGES_DIR}/"
                )
            elif not cat_ids:
                reject("no_annotation", f"no annotation in {coco_path.name}")
            elif len(cat_ids) > 1:
                reject("bad_record", f"annotated with several categories {cat_ids}")
            elif cats[0] is None:
                reject("bad_record", f"category id {cat_ids[0]} is not among the categories")
            else:
                candidates.append({"img": img, "split": split, "path": path, "category_id": cat_ids[0]})
            seen_ids.setdefault(image_id, split)

    # Pass 2: one decode per image, in parallel.
    probe_paths = sorted({str(ctx.raw_dir / c["path"]) for c in candidates})
    probes = probe_images(
        probe_paths, ctx.max_pixels, jobs=ctx.jobs, scheduler=ctx.scheduler, desc="inat2017"
    )

    size_mismatch = 0
    with_location = with_date = with_observer = 0
    split_counts: Counter[str] = Counter()
    observer_splits: dict[str, set[str]] = defaultdict(set)
    for c in candidates:
        img, split, path = c["img"], c["split"], c["path"]
        file_path = ctx.raw_dir / path
        probe = probes[str(file_path)]
        if not isinstance(probe, ImageInfo):
            tables.reject("image", str(img["id"]), ctx.rel(file_path), probe.reason, probe.detail)
            continue
        info: ImageInfo = probe
        if (img.get("width"), img.get("height")) != (info.width, info.height):
            size_mismatch += 1
        category = categories[c["category_id"]]
        other = SPLITS[1 - SPLITS.index(split)]
        loc = locations[split].get(img["id"], locations[other].get(img["id"]))
        lat = _coord(loc.get("lat"), 90.0) if loc else None
        lon = _coord(loc.get("lon"), 180.0) if loc else None
        if lat is None or lon is None:
            lat = lon = None
        captured_at = iso_date(loc.get("date")) if loc else None
        observer = _observer(loc.get("user_id")) if loc else None
        with_location += lat is not None
        with_date += captured_at is not None
        with_observer += observer is not None
        if observer is not None:
            observer_splits[observer].add(split)
        split_counts[split] += 1
        licence_name = licences.get(img.get("license"))
        native = {
            "category_id": c["category_id"],
            "category": category["name"],
            "supercategory": category["supercategory"],
            "split": split,
            "file_name": img.get("file_name"),
            "license_id": img.get("license"),
            "license_name": licence_name,
            "rights_holder": img.get("rights_holder"),
            "bboxes": sorted(boxes.get(img["id"], []), key=lambda b: _id_key(b["id"])),
            "location": loc,
        }
        labels = {
            "category_id": c["category_id"],
            "category": category["name"],
            "supercategory": category["supercategory"],
            "class_index": c["category_id"],
        }
        tables.add_sample(
            {
                "sample_id": schema.make_sample_id(SOURCE, img["id"]),
                "upstream_id": str(img["id"]),
                "image_path": ctx.rel(file_path),
                "image_format": info.format,
                **sample_info_columns(info),
                "observer": observer,
                "official_split": split,
                "captured_at": captured_at,
                "lat": lat,
                "lon": lon,
                "license": license_,
                "attribution": _attribution(img.get("rights_holder"), licence_name, base_attribution),
                "native_labels": dumps_labels(native),
                "labels": dumps_labels(labels),
            }
        )

    class_list = sorted(
        (
            {"category_id": cid, "name": cat["name"], "supercategory": cat["supercategory"]}
            for cid, cat in categories.items()
            if cat["supercategory"] in selected
        ),
        key=lambda c: _id_key(c["category_id"]),
    )
    write_json(ctx.out_dir / "classes.json", class_list)

    samples_labels = [json.loads(s["labels"]) for s in tables.samples]
    extra = {
        "inputs": {"images": inputs_images, "orphan_annotations": orphan_annotations},
        "filtered_by_params": {"images": filtered.total(), "supercategories": dict(sorted(filtered.items()))},
        "official_split": dict(sorted(split_counts.items())),
        "classes": class_counts(lbl["category"] for lbl in samples_labels),
        "supercategories": class_counts(lbl["supercategory"] for lbl in samples_labels),
        "selected_categories": len(class_list),
        "bboxes": {
            "images_with_boxes": sum(1 for s in tables.samples if json.loads(s["native_labels"])["bboxes"]),
            "boxes": sum(len(json.loads(s["native_labels"])["bboxes"]) for s in tables.samples),
            "malformed_dropped": boxes_dropped,
        },
        "locations": {
            "date_key": date_keys["train"] or date_keys["val"],
            "with_lat_lon": with_location,
            "with_date": with_date,
            "with_observer": with_observer,
        },
        "observers": {
            "total": len(observer_splits),
            "in_both_splits": sum(1 for s in observer_splits.values() if len(s) > 1),
        },
        "size_mismatch_json_vs_file": size_mismatch,
    }
    return tables, extra
