"""ingest@inat2017: the iNaturalist 2017 COCO JSONs and the fetched image subset, as records.

Raw layout (docs/architecture.md): `train2017.json`, `val2017.json` (images, categories,
annotations: one label per image), `train_2017_bboxes.json`, `val_2017_bboxes.json` (the same
with `bbox [x,y,w,h]`, `area`, `iscrowd`, possibly several boxes per image, only for some
supercategories), `train2017_locations.json`, `val2017_locations.json` (records `id, lat, lon,
user_id` and a date whose key is unverified), and `train_val_images/<supercategory>/<category>/
<hex>.jpg` for the configured supercategories only.

The JSONs (26 MB upstream) are read whole; each selected image becomes one small tuple (its id,
split, index and category) so that samples can be yielded in sample_id order, and Python values
for its row are made one image at a time.

Input records, two kinds (`inputs` in the metrics, by record_kind), each ending exactly once:
- `image`: every image record of train2017.json and val2017.json whose supercategory is in
  `sources.inat2017.supercategories` (the supercategory of its annotation's category; for an
  image without a usable annotation, the supercategory folder of its `file_name`) -> one sample,
  or one quarantine row: `bad_record` (an id that is not an integer, an id already listed,
  a missing or unsafe `file_name`, several categories, an unknown or mistyped category id, a
  name two files on disk share in NFC), `no_annotation`, `missing_image`, `not_a_regular_file`,
  `empty_file`, `corrupt_image`, `image_too_large`, `unsupported_bit_depth` (from the probe),
  `unsupported_format` (from the probe, or a decodable image that is neither JPEG nor PNG);
- `annotation_row`: an annotation whose image record is absent or whose `image_id` is not an
  integer, unless its category is a known one of another supercategory -> `missing_image` or
  `bad_record`.
Image records of other supercategories are not input records: they are counted under
`filtered_by_params` (the fetch did not download their files either).

Upstream ids are integers. An id of another type (`"0"`, `[0]`, `1.0`, `true`) is a bad record
named by file and index (`val2017.json images[3]: id "0" is a string, not an integer`), so `0`
and `"0"` never meet as one sample id; a file in which *no* id is an integer, or in which every
annotation's `category_id` is mistyped, is a changed format and fails naming the file. Category
records must have integer ids and string names. NaN and Infinity (which Python's JSON reader
accepts) never reach a table: lat/lon become null, a box holding one is dropped, any other value
in `native_labels` becomes null and is named in `native_labels.nulled_non_finite`; all are
counted under `non_finite_nulled`. A file with no images, annotations, boxes or location records
fails loudly: a source that lost them must not turn into a release of quarantine rows.

Image files: names are compared in Unicode NFC (a tar made on macOS stores NFD names), so a
`file_name` finds its file whichever form either side uses. Each image is probed once, through
the work cache (`probe.image_work`): full decode for the pixel hash, reduced JPEG decode for the
pHash. The bytes decide the format: JPEG (MPO camera files read as their first frame, which is
what every JPEG reader shows) and PNG are kept with `image_format` `jpeg` / `png`; any other
decodable format (TIFF, GIF, BMP, WebP) is `unsupported_format`: the product ships the upstream
bytes, and a multi-frame GIF or TIFF has no single picture to ship.

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
                 under the key "date" whatever the upstream key was),
     "nulled_non_finite": ["location.lat", ...]   (only when a value was NaN/Infinity)}
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
import os
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

from stages.errors import TidepoolError, UpstreamFormatError
from stages.fsutil import dumps_json
from stages.ingest.common import dumps_labels
from stages.ingest.context import IngestContext
from stages.ingest.probe import image_work
from stages.ingest.records import Quarantine, Record, Report, Sample, WorkResult
from stages.schema import make_sample_id

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
# What the bytes of an iNat image may be (the probe's `image_format`); see the module docstring.
ACCEPTED_FORMATS = ("jpeg", "png")


def _files(split: str) -> dict[str, str]:
    return {
        "coco": f"{split}2017.json",
        "bboxes": f"{split}_2017_bboxes.json",
        "locations": f"{split}2017_locations.json",
    }


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


# --- reading and checking the JSON files -----------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError as exc:
        raise UpstreamFormatError(path, "file not found (run fetch@inat2017)") from exc
    except IsADirectoryError as exc:
        raise UpstreamFormatError(path, "a folder, not a JSON file") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UpstreamFormatError(path, f"not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise UpstreamFormatError(path, "not valid JSON: nested too deeply") from exc


def int_id(value: Any) -> int | None:
    """An upstream id as iNat 2017 writes them (a JSON integer), or None for anything else."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, float):
        return "a number with a fraction" if math.isfinite(value) else "not a finite number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _show(value: Any) -> str:
    """An upstream value as JSON text, short: `"0"` and `0` must read differently in a message."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _mistyped(value: Any, what: str) -> str:
    return f"{what} {_show(value)} is {_kind(value)}, not an integer"


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


def _require_some_integers(path: Path, records: list[dict[str, Any]], key: str, field_: str) -> None:
    """A file where no record's `field_` is an integer changed its format: one error, not a
    quarantine row per record."""
    if records and not any(int_id(r[field_]) is not None for r in records):
        sample = records[0][field_]
        raise UpstreamFormatError(
            path,
            f"no {key} record has an integer {field_} ({key}[0]: {_mistyped(sample, field_)}); "
            "iNat 2017 ids are integers",
        )


def read_coco(path: Path, box_file: bool = False) -> dict[str, list[dict[str, Any]]]:
    doc = _read_json(path)
    wanted = ("annotations",) if box_file else COCO_KEYS
    if not isinstance(doc, dict) or any(k not in doc for k in wanted):
        found = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise UpstreamFormatError(path, f"expected top-level keys {list(wanted)}, found {found}")
    if box_file:
        boxes = _records(path, doc, "annotations", BBOX_KEYS)
        if not boxes:
            raise UpstreamFormatError(path, "no annotations: the file lost its boxes")
        _require_some_integers(path, boxes, "annotations", "image_id")
        return {"annotations": boxes}
    images = _records(path, doc, "images", IMAGE_KEYS)
    annotations = _records(path, doc, "annotations", ANNOTATION_KEYS)
    categories = _records(path, doc, "categories", CATEGORY_KEYS)
    if not images:
        raise UpstreamFormatError(path, "no images: the file lost its image records")
    if not categories:
        raise UpstreamFormatError(path, "no categories: every annotation would name an unknown one")
    if not annotations:
        # Every image would become `no_annotation` and the stage would exit 0 with no samples.
        raise UpstreamFormatError(
            path, f"lists {len(images)} images but no annotations: the file lost its labels"
        )
    _require_some_integers(path, images, "images", "id")
    _require_some_integers(path, annotations, "annotations", "image_id")
    if not any(int_id(a["category_id"]) is not None for a in annotations):
        raise UpstreamFormatError(
            path,
            f"every annotation's category_id is mistyped (annotations[0]: "
            f"{_mistyped(annotations[0]['category_id'], 'category_id')}); the categories' ids are integers",
        )
    return {
        "images": images,
        "categories": categories,
        "annotations": annotations,
        "licenses": doc.get("licenses") if isinstance(doc.get("licenses"), list) else [],
    }


def read_locations(path: Path) -> tuple[dict[int, dict[str, Any]], str | None, Counter[str]]:
    """id -> location record (date under "date"), the upstream date key that was found, and the
    records that could not be used (`mistyped_id`, `repeated_id`: the first record of an id wins)."""
    doc = _read_json(path)
    if isinstance(doc, dict) and isinstance(doc.get("locations"), list):
        doc = doc["locations"]
    if not isinstance(doc, list):
        raise UpstreamFormatError(
            path, "expected a JSON list of location records (id, lat, lon, user_id, date)"
        )
    records = _records(path, {"locations": doc}, "locations", LOCATION_KEYS)
    if not records:
        raise UpstreamFormatError(path, "no location records: the file lost them")
    _require_some_integers(path, records, "locations", "id")
    date_key = next((k for k in DATE_KEYS if any(k in r for r in records)), None)
    out: dict[int, dict[str, Any]] = {}
    unused: Counter[str] = Counter()
    for rec in records:
        rid = int_id(rec["id"])
        if rid is None:
            unused["mistyped_id"] += 1
        elif rid in out:
            unused["repeated_id"] += 1
        else:
            out[rid] = {
                "lat": rec.get("lat"),
                "lon": rec.get("lon"),
                "user_id": rec.get("user_id"),
                "date": rec.get(date_key) if date_key else None,
            }
    return out, date_key, unused


class Category(NamedTuple):
    name: str
    supercategory: str


def read_categories(docs: list[tuple[Path, list[dict[str, Any]]]]) -> dict[int, Category]:
    """The categories of all files; a mistyped record or two definitions of one id is an error."""
    categories: dict[int, Category] = {}
    where: dict[int, str] = {}
    for path, records in docs:
        for i, cat in enumerate(records):
            cid = int_id(cat["id"])
            if cid is None:
                raise UpstreamFormatError(
                    path,
                    f"categories[{i}]: {_mistyped(cat['id'], 'id')}; iNat 2017 category ids are integers",
                )
            name, sup = cat["name"], cat["supercategory"]
            if not isinstance(name, str) or not isinstance(sup, str) or not name or not sup:
                raise UpstreamFormatError(
                    path,
                    f"categories[{i}] (id {cid}): name and supercategory must be non-empty strings, "
                    f"found {_show(name)} and {_show(sup)}",
                )
            entry = Category(name, sup)
            if categories.setdefault(cid, entry) != entry:
                raise UpstreamFormatError(
                    path,
                    f"category {cid} is {dict(entry._asdict())}, {where[cid]} says "
                    f"{dict(categories[cid]._asdict())}",
                )
            where.setdefault(cid, path.name)
    return categories


def _licences(docs: list[dict[str, Any]]) -> dict[int, str]:
    out: dict[int, str] = {}
    for doc in docs:
        for lic in doc["licenses"]:
            if (
                isinstance(lic, dict)
                and int_id(lic.get("id")) is not None
                and isinstance(lic.get("name"), str)
            ):
                out.setdefault(lic["id"], lic["name"])
    return out


# --- values ---------------------------------------------------------------------------------------


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


def _id_key(value: Any) -> tuple[int, int, str]:
    """Sort key for upstream ids: integers numerically (COCO ids are ints), anything else after."""
    if int_id(value) is not None:
        return (0, value, "")
    return (1, 0, _show(value))


def _observer(user_id: Any) -> str | None:
    if isinstance(user_id, float) and math.isfinite(user_id) and user_id.is_integer():
        user_id = int(user_id)
    if int_id(user_id) is not None:
        return str(user_id)
    if isinstance(user_id, str) and user_id.strip():
        return user_id.strip()
    return None  # null, NaN, a list ...: no observer key rather than a made-up one


def _attribution(rights_holder: Any, licence_name: str | None, base: str | None) -> str:
    parts = []
    if isinstance(rights_holder, str) and rights_holder.strip():
        parts.append(
            f"{rights_holder.strip()} via iNaturalist" + (f" ({licence_name})" if licence_name else "")
        )
    if base:
        parts.append(base)
    return "; ".join(parts)


def finite_only(value: Any, path: str = "") -> tuple[Any, list[str]]:
    """`value` with every NaN/Infinity replaced by None, and the dotted paths that were replaced
    (list positions are not part of a path: `bboxes.area`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, [path]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        nulled: list[str] = []
        for k, v in value.items():
            out[k], sub = finite_only(v, f"{path}.{k}" if path else str(k))
            nulled += sub
        return out, nulled
    if isinstance(value, list):
        items, nulled = [], []
        for v in value:
            item, sub = finite_only(v, path)
            items.append(item)
            nulled += sub
        return items, nulled
    return value, []


def safe_image_path(file_name: Any) -> PurePosixPath | None:
    """`train_val_images/<sup>/<cat>/<hex>.jpg`, relative and without `..`, in NFC; None otherwise."""
    if not isinstance(file_name, str) or not file_name or "\\" in file_name or "\0" in file_name:
        return None
    path = PurePosixPath(_nfc(file_name))
    if path.is_absolute() or ".." in path.parts or len(path.parts) < 2 or path.parts[0] != IMAGES_DIR:
        return None
    return path


@dataclass
class DiskNames:
    """The names under `train_val_images/` as they are on disk, by their NFC form."""

    by_nfc: dict[str, str] = field(default_factory=dict)
    shared: set[str] = field(default_factory=set)  # NFC names two entries on disk share
    files: set[str] = field(default_factory=set)  # names of the non-folders, as on disk

    @classmethod
    def scan(cls, raw_dir: Path) -> DiskNames:
        names = cls()
        top = raw_dir / IMAGES_DIR
        # Symbolic links are listed, never followed: the probe refuses them by name.
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            base = Path(dirpath).relative_to(raw_dir).as_posix()
            names.files.update(f"{base}/{name}" for name in filenames)
            for name in sorted(dirnames + filenames):
                rel = f"{base}/{name}"
                key = _nfc(rel)
                if names.by_nfc.setdefault(key, rel) != rel:
                    names.shared.add(key)
        return names

    def find(self, path: PurePosixPath) -> str | None:
        """The on-disk name of `path` (itself when nothing on disk has it); None when ambiguous."""
        key = path.as_posix()
        if key in self.shared:
            return None
        return self.by_nfc.get(key, key)


# --- metrics of what was kept ------------------------------------------------------------------------


class Facts(NamedTuple):
    """What the metrics need to know about one sample, handed to its `build`."""

    record_id: str
    file: str
    category: str
    supercategory: str
    split: str
    boxes: int
    with_lat_lon: bool
    with_date: bool
    observer: str | None
    json_size: tuple[Any, Any]
    nulled: tuple[str, ...]


@dataclass
class Stats:
    filtered: Counter[str] = field(default_factory=Counter)
    boxes_dropped: int = 0
    date_key: str | None = None
    locations_unused: Counter[str] = field(default_factory=Counter)
    selected_categories: int = 0
    unreferenced_files: int = 0
    split: Counter[str] = field(default_factory=Counter)
    classes: Counter[str] = field(default_factory=Counter)
    supercategories: Counter[str] = field(default_factory=Counter)
    formats: Counter[str] = field(default_factory=Counter)
    nulled: Counter[str] = field(default_factory=Counter)
    images_with_boxes: int = 0
    boxes: int = 0
    with_lat_lon: int = 0
    with_date: int = 0
    with_observer: int = 0
    size_mismatch: int = 0
    observer_splits: dict[str, set[str]] = field(default_factory=dict)

    def keep(self, facts: Facts, columns: dict[str, Any]) -> None:
        self.split[facts.split] += 1
        self.classes[facts.category] += 1
        self.supercategories[facts.supercategory] += 1
        self.formats[str(columns.get("image_format"))] += 1
        self.nulled.update(facts.nulled)
        self.images_with_boxes += facts.boxes > 0
        self.boxes += facts.boxes
        self.with_lat_lon += facts.with_lat_lon
        self.with_date += facts.with_date
        self.with_observer += facts.observer is not None
        if facts.observer is not None:
            self.observer_splits.setdefault(facts.observer, set()).add(facts.split)
        self.size_mismatch += facts.json_size != (columns.get("width"), columns.get("height"))

    def metrics(self) -> dict[str, Any]:
        return {
            "filtered_by_params": {
                "images": self.filtered.total(),
                "supercategories": dict(sorted(self.filtered.items())),
            },
            "official_split": dict(sorted(self.split.items())),
            "classes": dict(sorted(self.classes.items())),
            "supercategories": dict(sorted(self.supercategories.items())),
            "selected_categories": self.selected_categories,
            "image_formats": dict(sorted(self.formats.items())),
            "bboxes": {
                "images_with_boxes": self.images_with_boxes,
                "boxes": self.boxes,
                "malformed_dropped": self.boxes_dropped,
            },
            "locations": {
                "date_key": self.date_key,
                "with_lat_lon": self.with_lat_lon,
                "with_date": self.with_date,
                "with_observer": self.with_observer,
                "records_mistyped_id": self.locations_unused["mistyped_id"],
                "records_repeated_id": self.locations_unused["repeated_id"],
            },
            "observers": {
                "total": len(self.observer_splits),
                "in_both_splits": sum(1 for s in self.observer_splits.values() if len(s) > 1),
            },
            "non_finite_nulled": dict(sorted(self.nulled.items())),
            "size_mismatch_json_vs_file": self.size_mismatch,
            "unreferenced_files": self.unreferenced_files,
        }


def _built(stats: Stats, facts: Facts, result: WorkResult) -> dict[str, Any] | Quarantine:
    """Main process, after the probe: the bytes decide whether this is an image we ship."""
    fmt = result.columns.get("image_format")
    if fmt not in ACCEPTED_FORMATS:
        return Quarantine(
            "image",
            facts.record_id,
            facts.file,
            "unsupported_format",
            f"the file is {str(fmt).upper()}; iNat images are kept as JPEG (an MPO's first frame) or PNG",
        )
    stats.keep(facts, result.columns)
    return {}


# --- the records --------------------------------------------------------------------------------------


@dataclass
class Scan:
    """What the pass over both JSONs shares: the lookups it reads and what it collects."""

    categories: dict[int, Category]
    selected: set[str]  # NFC
    disk: DiskNames
    stats: Stats
    seen: dict[int, str] = field(default_factory=dict)  # image id -> the JSON that listed it first
    referenced: set[str] = field(default_factory=set)  # files named by any image record, as on disk
    candidates: list[Candidate] = field(default_factory=list)


class Candidate(NamedTuple):
    """A selected image that passed the JSON checks: what is needed to build its sample later."""

    sample_id: str
    split: str
    index: int  # in its JSON's images
    category_id: int
    file: str  # relative to the raw folder, as named on disk


def _selected(ctx: IngestContext) -> set[str]:
    values = ctx.source_params.get("supercategories")
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        raise TidepoolError(
            "params.yaml: `sources.inat2017.supercategories` must be a non-empty list of names"
        )
    return {_nfc(v) for v in values}


def records(ctx: IngestContext, report: Report) -> Iterator[Record]:
    selected = _selected(ctx)
    raw = ctx.raw_dir
    coco = {split: read_coco(raw / _files(split)["coco"]) for split in SPLITS}
    box_docs = {split: read_coco(raw / _files(split)["bboxes"], box_file=True) for split in SPLITS}
    stats = Stats()
    locations: dict[str, dict[int, dict[str, Any]]] = {}
    date_keys: list[str | None] = []
    for split in SPLITS:
        locations[split], date_key, unused = read_locations(raw / _files(split)["locations"])
        date_keys.append(date_key)
        stats.locations_unused.update(unused)
    stats.date_key = next((k for k in date_keys if k), None)
    categories = read_categories([(raw / _files(s)["coco"], coco[s]["categories"]) for s in SPLITS])
    licences = _licences([coco[s] for s in SPLITS])

    boxes: dict[int, list[dict[str, Any]]] = {}
    for split in SPLITS:
        for ann in box_docs[split]["annotations"]:
            image_id, box = int_id(ann["image_id"]), _box(ann)
            if image_id is None or box is None:
                stats.boxes_dropped += 1
            else:
                boxes.setdefault(image_id, []).append(box)

    scan = Scan(categories, selected, DiskNames.scan(raw), stats)
    report.inputs["image"] += 0  # both kinds appear in the metrics, even when none occurred
    report.inputs["annotation_row"] += 0
    for split in SPLITS:
        yield from _split_records(ctx, report, split, coco[split], scan)
    stats.unreferenced_files = len(scan.disk.files - scan.referenced)

    class_list = sorted(
        (
            {"category_id": cid, "name": cat.name, "supercategory": cat.supercategory}
            for cid, cat in categories.items()
            if _nfc(cat.supercategory) in selected
        ),
        key=lambda c: c["category_id"],
    )
    stats.selected_categories = len(class_list)
    report.files["classes.json"] = dumps_json(class_list).encode("utf-8")
    report.on_finish.append(lambda: report.extra.update(stats.metrics()))

    params = ctx.source_params
    raw_rel = ctx.rel(raw)
    for c in sorted(scan.candidates):
        img = coco[c.split]["images"][c.index]
        image_id: int = img["id"]
        category = categories[c.category_id]
        other = SPLITS[1 - SPLITS.index(c.split)]
        loc = locations[c.split].get(image_id, locations[other].get(image_id))
        lat = _coord(loc.get("lat"), 90.0) if loc else None
        lon = _coord(loc.get("lon"), 180.0) if loc else None
        if lat is None or lon is None:
            lat = lon = None
        captured_at = iso_date(loc.get("date")) if loc else None
        observer = _observer(loc.get("user_id")) if loc else None
        lic_id = int_id(img.get("license"))
        licence_name = licences.get(lic_id) if lic_id is not None else None
        image_boxes = sorted(boxes.get(image_id, []), key=lambda b: _id_key(b["id"]))
        native, nulled = finite_only(
            {
                "category_id": c.category_id,
                "category": category.name,
                "supercategory": category.supercategory,
                "split": c.split,
                "file_name": img.get("file_name"),
                "license_id": img.get("license"),
                "license_name": licence_name,
                "rights_holder": img.get("rights_holder"),
                "bboxes": image_boxes,
                "location": loc,
            }
        )
        if nulled:
            native["nulled_non_finite"] = sorted(set(nulled))
        labels = {
            "category_id": c.category_id,
            "category": category.name,
            "supercategory": category.supercategory,
            "class_index": c.category_id,
        }
        file = f"{raw_rel}/{c.file}"
        facts = Facts(
            record_id=str(image_id),
            file=file,
            category=category.name,
            supercategory=category.supercategory,
            split=c.split,
            boxes=len(image_boxes),
            with_lat_lon=lat is not None,
            with_date=captured_at is not None,
            observer=observer,
            json_size=(img.get("width"), img.get("height")),
            nulled=tuple(sorted(set(nulled))),
        )
        yield Sample(
            sample_id=c.sample_id,
            upstream_id=str(image_id),
            work=image_work(ctx, raw / c.file),
            columns={
                "image_path": file,
                "observer": observer,
                "official_split": c.split,
                "captured_at": captured_at,
                "lat": lat,
                "lon": lon,
                "license": params.get("license"),
                "attribution": _attribution(
                    img.get("rights_holder"), licence_name, params.get("attribution")
                ),
                # Encoded here (strict JSON), so nothing can fail after `build` has counted the sample.
                "native_labels": dumps_labels(native),
                "labels": dumps_labels(labels),
            },
            record_kind="image",
            record_id=str(image_id),
            file=file,
            build=partial(_built, stats, facts),
        )


def _split_records(
    ctx: IngestContext,
    report: Report,
    split: str,
    doc: dict[str, list[dict[str, Any]]],
    scan: Scan,
) -> Iterator[Quarantine]:
    """The quarantine rows of one split's JSON, in file order; its usable images go to
    `scan.candidates`."""
    categories, selected, disk, seen = scan.categories, scan.selected, scan.disk, scan.seen
    coco_path = ctx.raw_dir / _files(split)["coco"]
    name, rel_json, raw_rel = coco_path.name, ctx.rel(coco_path), ctx.rel(ctx.raw_dir)
    image_ids = {i for img in doc["images"] if (i := int_id(img["id"])) is not None}

    # Per image: its category ids, or the description of a mistyped one (strings, never ints).
    labels: dict[int, list[int | str]] = {}
    for k, ann in enumerate(doc["annotations"]):
        image_id, cat_id = int_id(ann["image_id"]), int_id(ann["category_id"])
        if image_id is not None and image_id in image_ids:
            entry = (
                cat_id
                if cat_id is not None
                else f"{name} annotations[{k}]: " + _mistyped(ann["category_id"], "category_id")
            )
            found = labels.setdefault(image_id, [])
            if entry not in found:
                found.append(entry)
            continue
        category = categories.get(cat_id) if cat_id is not None else None
        if category is not None and _nfc(category.supercategory) not in selected:
            continue  # an annotation of a category the params leave out: not an input
        report.inputs["annotation_row"] += 1
        record_id = f"{split}:{_show(ann.get('id', ann['image_id']))}"
        if image_id is None:
            yield Quarantine(
                "annotation_row",
                record_id,
                rel_json,
                "bad_record",
                f"{name} annotations[{k}]: {_mistyped(ann['image_id'], 'image_id')}",
            )
        else:
            unknown = (
                ""
                if category is not None
                else f" (and its category_id {_show(ann['category_id'])} is unknown)"
            )
            yield Quarantine(
                "annotation_row",
                record_id,
                rel_json,
                "missing_image",
                f"annotation for image id {image_id}, which {name} does not list{unknown}",
            )

    for k, img in enumerate(doc["images"]):
        image_id = int_id(img["id"])
        path = safe_image_path(img.get("file_name"))
        found = labels.get(image_id, []) if image_id is not None else []
        cat_ids = sorted({c for c in found if isinstance(c, int)})
        known = [categories[c] for c in cat_ids if c in categories]
        if known:
            supercategory: str | None = known[0].supercategory
        else:
            supercategory = path.parts[1] if path is not None and len(path.parts) > 2 else None
        if supercategory is not None and _nfc(supercategory) not in selected:
            scan.stats.filtered[supercategory] += 1
            if path is not None:
                scan.referenced.add(disk.find(path) or path.as_posix())
            continue
        report.inputs["image"] += 1
        on_disk = disk.find(path) if path is not None else None
        if path is not None:
            scan.referenced.add(on_disk or path.as_posix())
        record_id = str(image_id) if image_id is not None else _show(img["id"])
        file_ref = f"{raw_rel}/{on_disk}" if on_disk is not None else rel_json
        where = f"{name} images[{k}]"
        mistyped = [c for c in found if isinstance(c, str)]
        problem: tuple[str, str] | None = None
        if image_id is None:
            problem = (
                "bad_record",
                f"{where}: {_mistyped(img['id'], 'id')}; iNat 2017 image ids are integers",
            )
        elif image_id in seen:
            problem = (
                "bad_record",
                f"{where}: image id {image_id} also listed in {seen[image_id]}; the first is kept",
            )
        elif path is None:
            problem = (
                "bad_record",
                f"{where}: file_name {_show(img.get('file_name'))} is missing or not under {IMAGES_DIR}/",
            )
        elif on_disk is None:
            problem = ("bad_record", f"{where}: two files on disk have the name {path} in Unicode NFC")
        elif not found:
            problem = ("no_annotation", f"no annotation in {name}")
        elif mistyped:
            problem = ("bad_record", f"{mistyped[0]}; the ids of the categories are integers")
        elif len(cat_ids) > 1:
            problem = ("bad_record", f"{where}: annotated with several categories {cat_ids}")
        elif not known:
            problem = ("bad_record", f"{where}: category id {cat_ids[0]} is not among the categories")
        if image_id is not None:
            seen.setdefault(image_id, name)
        if problem is not None:
            yield Quarantine("image", record_id, file_ref, *problem)
            continue
        assert image_id is not None and on_disk is not None
        scan.candidates.append(Candidate(make_sample_id(SOURCE, image_id), split, k, cat_ids[0], on_disk))
