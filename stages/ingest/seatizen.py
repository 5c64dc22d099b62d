"""ingest@seatizen: the Seatizen Atlas record (Zenodo 13951614) into the sample table, with masks.

Raw input (`data/raw/seatizen/`, SOURCES.md §6): one `*multilabel_annotations*.csv`, at most one
`*segmentation_annotations*.json` (COCO-style instance masks), `gbif_class_mapping.csv` (not
read: the crosswalk table carries what it says) and the images under `2024_dataset/`.

Input records, and where each one ends (`inputs` in the metrics counts them per kind; for every
kind, inputs = samples/masks + quarantine rows of that `record_kind`):

- `csv_rows` (record_kind `annotation_row`): every data line of the multilabel CSV. Becomes the
  sample of its image, or is quarantined: `bad_record` (wrong field count, empty FileName, a
  repeated FileName - the first row wins; the repeat's record id is `<FileName> (line N)` -, a file
  name that does not parse, a class value other than 1/0/-1), `missing_image` (no
  `2024_dataset/<FileName>`), `image_unusable` (its image was quarantined as corrupt, empty, too
  large or unsupported).
- `images` (record_kind `image`): every file under `2024_dataset/` (recursively; the record id is
  the path relative to that folder). Becomes the sample of its CSV row, or is quarantined:
  `no_annotation` (no CSV row names it), `bad_record` (its CSV row is a bad record), or the probe's
  reason (`corrupt_image`, `empty_file`, `image_too_large`, `unsupported_format`).
- `segmentation_images` (record_kind `mask`): every entry of the segmentation JSON's `images`.
  Becomes the mask of one sample (`mask_path`), or is quarantined: `missing_image` (no CSV row and
  no image file of that name), `image_unusable` (the row or image of that name was quarantined),
  `bad_record` (a second entry for the same file name, or a width/height that differs from the
  decoded image).

A sample is one image with its CSV row. The file name is the upstream id: sample_id =
`seatizen-<stem>_<ext>` (the extension stays in, so `x.jpg` and `x.JPG` cannot collide), with
`-<8 hex of sha256(file name)>` appended when the stem holds characters outside [A-Za-z0-9_-],
so that two names that slug alike keep distinct ids without depending on each other.

File names are `YYYYMMDD_<CCC>-<Place>_<platform>[-NN]_<video>_<frame>.<ext>`
(`20210618_ATF-Europa_ASV-00_GX024250_004.jpeg`): `session` = the name without `_<frame>.<ext>`
(consecutive frames of one transect video are near-duplicates and must share a split),
`captured_at` = the date. A name that does not parse is a `bad_record`; if more than half of the
CSV rows fail to parse, the naming convention has changed and the ingest fails (UpstreamFormatError
naming the CSV) instead of quarantining the whole source one row at a time. `region` and
`spatial_block` stay null: the country code and place go into native_labels, since the `region`
column holds MEOW realms for MERMAID and a country code is another vocabulary.

`native_labels` (JSON):
    {"file_name": str,
     "csv": {<every non-class CSV column present, e.g. frame_doi, relative_file_path,
             annotation_date>: str},
     "name": {"date": "YYYY-MM-DD", "country": "ATF", "place": "Europa", "platform": "ASV",
              "platform_number": "00" | null, "video": "GX024250", "frame": "004"},
     "multilabel": {<class column>: 1 | 0 | -1},     # exactly as upstream: -1 = not annotated
     "segmentation": null | {"image_id": int, "instances": [{"annotation_id", "category_id",
                     "category", "encoding": "polygon" | "rle" | "compressed_rle"}]}}

`labels` (JSON), the multilabel vector crosswalked through data/tables/seatizen/crosswalk.csv
into the MERMAID taxonomy. Rule for every target T: the values of all class columns mapped to T
combine as 1 if any is 1, else -1 if any is -1 (some evidence is missing), else 0.
    {"attribute": [{"id", "name", "top_level", "value"}],            # growth form ignored
     "attribute_growth_form": [{"id", "name", "growth_form_id", "growth_form_name",
                                "top_level", "value"}],              # growth_form_* may be null
     "top_level": {<category>: value},  # only the categories some class column reaches; a
                                        # category reached by none is unknown, not absent
     "non_benthic": {<class>: value},   # Fish, Turtle, Homo_Sapiens, Human_Object, Waste, Trample
     "image_quality": {<class>: value}, # Blurred, Useless
     "coverage": {"present": n, "mapped": n, "ratio": x | null}}
Lists are sorted by (name, growth_form_name, id). Top-level categories are the root attributes of
the taxonomy, so a class crosswalked to "Hard coral" appears in `attribute` as the attribute named
"Hard coral". `coverage` counts the benthic classes marked 1 in this image and how many of them
the crosswalk maps (kind `unmapped` rows are benthic classes with no MERMAID target).
0 at category level means "none of Seatizen's classes for it was seen": Seatizen's class list is
not exhaustive for every category (e.g. Other invertebrates).

Masks: each segmentation image with a sample becomes `data/interim/seatizen/masks/<sample_id>.png`
(PNG mode L, the image's size). 0 = unlabelled; 1..N = the segmentation categories sorted by
category id (`mask_classes.json` beside the tables lists them with their crosswalk). Polygons are
filled with PIL (boundary included: may differ from pycocotools by about one pixel on edges);
RLE, both the uncompressed counts list and the compressed string, is decoded here (column-major,
runs starting with 0s). Where instances overlap, the smaller instance (fewer pixels) wins, ties
going to the higher annotation id: small objects usually lie on top of the substrate around them.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from stages.errors import UpstreamFormatError
from stages.executor import parallel_map
from stages.fsutil import write_bytes, write_json
from stages.imaging import ImageInfo, ImageProblem
from stages.ingest.common import Tables, class_counts, dumps_labels, probe_images, sample_info_columns
from stages.ingest.context import IngestContext
from stages.progress import bar
from stages.schema import make_sample_id
from stages.taxonomy_index import TOP_LEVEL_CATEGORIES, Taxonomy

SOURCE = "seatizen"
IMAGE_DIR = "2024_dataset"
CSV_GLOB = "*multilabel_annotations*.csv"
SEGMENTATION_GLOB = "*segmentation_annotations*.json"
CROSSWALK = Path(SOURCE) / "crosswalk.csv"
MASK_DIR = "masks"
MASK_CLASSES = "mask_classes.json"

# Non-class columns the multilabel CSV has or may have (the authors' exporter writes the GPS and
# DOI ones into its sibling CSVs). Every other column is a class and must be crosswalked.
META_COLUMNS = (
    "FileName",
    "OriginalFileName",
    "frame_doi",
    "frames_doi",
    "version_doi",
    "prediction_doi",
    "relative_file_path",
    "annotation_date",
    "GPSLatitude",
    "GPSLongitude",
    "GPSAltitude",
    "GPSRoll",
    "GPSPitch",
    "GPSTrack",
    "GPSDatetime",
)
CROSSWALK_COLUMNS = ("seatizen_class", "kind", "mermaid_target", "growth_form", "note")
BENTHIC_KINDS = ("benthic attribute", "top-level category", "unmapped")
KINDS = (*BENTHIC_KINDS, "non_benthic", "image_quality")
VALUES = {"1": 1, "0": 0, "-1": -1, "1.0": 1, "0.0": 0, "-1.0": -1}

NAME_PATTERN = "YYYYMMDD_<CCC>-<Place>_<platform>[-NN]_<video>_<frame>.<ext>"
NAME_RE = re.compile(
    r"^(?P<session>(?P<date>\d{8})_(?P<country>[A-Z]{3})-(?P<place>[^_/]+)_"
    r"(?P<platform>[A-Za-z]+)(?:-(?P<number>\d+))?_(?P<video>[^/]+?))"
    r"_(?P<frame>\d+)\.(?P<ext>[A-Za-z0-9]+)$"
)


def combine(values: list[int]) -> int:
    """Presence of one target from its classes: 1 if any is 1, else -1 if any is -1, else 0."""
    if 1 in values:
        return 1
    if -1 in values:
        return -1
    return 0


# --- the crosswalk table --------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A point in the MERMAID label space: attribute (maybe a top-level root) and growth form."""

    attribute_id: str
    attribute_name: str
    growth_form_id: str | None
    growth_form_name: str | None
    top_level: str


@dataclass(frozen=True)
class CrosswalkRow:
    seatizen_class: str
    kind: str
    target: Target | None
    note: str


@dataclass(frozen=True)
class _Plan:
    gf: list[Target]  # attribute_growth_form entries, in output order
    attrs: list[tuple[str, str, str]]  # (name, id, top level) of attribute entries, in output order
    tops: list[str]
    slots: list[tuple[str, int, int, int]]  # per class: kind, index in gf, attrs, tops (-1: none)


class Crosswalk:
    """data/tables/seatizen/crosswalk.csv resolved against the taxonomy snapshot."""

    def __init__(self, rows: dict[str, CrosswalkRow], path: Path) -> None:
        self.rows = rows
        self.path = path
        self._plans: dict[tuple[str, ...], _Plan] = {}

    @classmethod
    def load(cls, path: Path, taxonomy: Taxonomy) -> Crosswalk:
        """Read and resolve the table; UpstreamFormatError naming it for anything it cannot resolve."""
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise UpstreamFormatError(path, "crosswalk table missing") from None
        reader = csv.DictReader(io.StringIO(text))
        missing = [c for c in CROSSWALK_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UpstreamFormatError(
                path, f"expected columns {', '.join(CROSSWALK_COLUMNS)}; missing {', '.join(missing)}"
            )
        gf_by_name = {name.casefold(): (gid, name) for gid, name in taxonomy.growth_forms.items()}
        rows: dict[str, CrosswalkRow] = {}
        for line, rec in enumerate(reader, start=2):
            name = (rec["seatizen_class"] or "").strip()
            kind = (rec["kind"] or "").strip()
            target_name = (rec["mermaid_target"] or "").strip()
            gf_name = (rec["growth_form"] or "").strip()
            where = f"line {line} ({name or 'no class'})"
            if not name:
                raise UpstreamFormatError(path, f"{where}: empty seatizen_class")
            if name in rows:
                raise UpstreamFormatError(path, f"{where}: class listed twice")
            if kind not in KINDS:
                raise UpstreamFormatError(path, f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
            target = None
            if kind in ("benthic attribute", "top-level category"):
                if not target_name:
                    raise UpstreamFormatError(path, f"{where}: kind {kind!r} needs a mermaid_target")
                target = _resolve(taxonomy, path, where, kind, target_name, gf_name, gf_by_name)
            elif target_name or gf_name:
                raise UpstreamFormatError(path, f"{where}: kind {kind!r} takes no mermaid_target/growth_form")
            rows[name] = CrosswalkRow(name, kind, target, (rec.get("note") or "").strip())
        return cls(rows, path)

    def require(self, classes: list[str], where: Path, what: str = "class column") -> None:
        """Every upstream class must be crosswalked consciously: fail on one the table lacks."""
        unknown = [c for c in classes if c not in self.rows]
        if unknown:
            raise UpstreamFormatError(
                where,
                f"{what}(s) {', '.join(repr(c) for c in unknown)} not in the crosswalk table {self.path}: "
                "add a row for each (kind and MERMAID target) before ingesting",
            )

    def _plan(self, classes: tuple[str, ...]) -> _Plan:
        """Where each class's value goes, worked out once per class list (every row shares it)."""
        plan = self._plans.get(classes)
        if plan is not None:
            return plan
        targets = {self.rows[c].target for c in classes} - {None}
        gf = sorted(targets, key=lambda t: (t.attribute_name, t.growth_form_name or "", t.attribute_id))
        attrs = sorted({(t.attribute_name, t.attribute_id, t.top_level) for t in targets})
        tops = sorted({t.top_level for t in targets})
        slots = []
        for c in classes:
            t = self.rows[c].target
            if t is None:
                slots.append((self.rows[c].kind, -1, -1, -1))
            else:
                key = (t.attribute_name, t.attribute_id, t.top_level)
                slots.append((self.rows[c].kind, gf.index(t), attrs.index(key), tops.index(t.top_level)))
        plan = _Plan(gf, attrs, tops, slots)
        self._plans[classes] = plan
        return plan

    def labels(self, values: dict[str, int]) -> dict[str, Any]:
        """The `labels` JSON of one image from its multilabel values (see the module docstring)."""
        plan = self._plan(tuple(values))
        by_gf: list[list[int]] = [[] for _ in plan.gf]
        by_attr: list[list[int]] = [[] for _ in plan.attrs]
        by_top: list[list[int]] = [[] for _ in plan.tops]
        non_benthic: dict[str, int] = {}
        quality: dict[str, int] = {}
        present = mapped = 0
        for (cls, value), (kind, gi, ai, ti) in zip(values.items(), plan.slots):
            if kind == "non_benthic":
                non_benthic[cls] = value
            elif kind == "image_quality":
                quality[cls] = value
            else:
                present += value == 1
                if gi < 0:
                    continue
                mapped += value == 1
                by_gf[gi].append(value)
                by_attr[ai].append(value)
                by_top[ti].append(value)
        attribute = [
            {"id": aid, "name": name, "top_level": top, "value": combine(v)}
            for (name, aid, top), v in zip(plan.attrs, by_attr)
        ]
        attribute_gf = [
            {
                "id": t.attribute_id,
                "name": t.attribute_name,
                "growth_form_id": t.growth_form_id,
                "growth_form_name": t.growth_form_name,
                "top_level": t.top_level,
                "value": combine(v),
            }
            for t, v in zip(plan.gf, by_gf)
        ]
        return {
            "attribute": attribute,
            "attribute_growth_form": attribute_gf,
            "top_level": {k: combine(v) for k, v in zip(plan.tops, by_top)},
            "non_benthic": dict(sorted(non_benthic.items())),
            "image_quality": dict(sorted(quality.items())),
            "coverage": {
                "present": present,
                "mapped": mapped,
                "ratio": mapped / present if present else None,
            },
        }

    def coverage(self, classes: list[str]) -> dict[str, Any]:
        """Crosswalk coverage over the benthic classes among `classes`: mapped / total."""
        benthic = [c for c in classes if self.rows[c].kind in BENTHIC_KINDS]
        mapped = sum(self.rows[c].target is not None for c in benthic)
        return {"mapped": mapped, "total": len(benthic), "ratio": mapped / len(benthic) if benthic else None}

    def describe(self, cls: str) -> dict[str, Any]:
        row = self.rows[cls]
        t = row.target
        return {
            "kind": row.kind,
            "mermaid_attribute_id": t.attribute_id if t else None,
            "mermaid_attribute": t.attribute_name if t else None,
            "growth_form": t.growth_form_name if t else None,
            "top_level": t.top_level if t else None,
        }


def _resolve(
    taxonomy: Taxonomy,
    path: Path,
    where: str,
    kind: str,
    target_name: str,
    gf_name: str,
    gf_by_name: dict[str, tuple[str, str]],
) -> Target:
    ids = taxonomy.attribute_ids_named(target_name)
    if not ids:
        raise UpstreamFormatError(
            path, f"{where}: mermaid_target {target_name!r} is not in the taxonomy snapshot {taxonomy.where}"
        )
    if len(ids) > 1:
        raise UpstreamFormatError(
            path,
            f"{where}: mermaid_target {target_name!r} names {len(ids)} attributes ({', '.join(sorted(ids))})",
        )
    attr = taxonomy.attributes[ids[0]]
    if kind == "top-level category" and (target_name not in TOP_LEVEL_CATEGORIES or attr.get("parent")):
        raise UpstreamFormatError(
            path, f"{where}: {target_name!r} is not a top-level category ({', '.join(TOP_LEVEL_CATEGORIES)})"
        )
    gf_id = gf_label = None
    if gf_name:
        if gf_name.casefold() not in gf_by_name:
            raise UpstreamFormatError(
                path, f"{where}: growth_form {gf_name!r} is not in the taxonomy snapshot {taxonomy.where}"
            )
        gf_id, gf_label = gf_by_name[gf_name.casefold()]
    return Target(ids[0], attr["name"], gf_id, gf_label, taxonomy.top_level(ids[0]))


# --- file names -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameName:
    session: str
    date: str  # ISO
    country: str
    place: str
    platform: str
    platform_number: str | None
    video: str
    frame: str

    def native(self) -> dict[str, Any]:
        return {
            "date": self.date,
            "country": self.country,
            "place": self.place,
            "platform": self.platform,
            "platform_number": self.platform_number,
            "video": self.video,
            "frame": self.frame,
        }


def parse_frame_name(name: str) -> FrameName | None:
    """The parts of a Seatizen frame name, or None when it does not follow NAME_PATTERN."""
    m = NAME_RE.match(name)
    if not m:
        return None
    try:
        date = dt.datetime.strptime(m["date"], "%Y%m%d").date()
    except ValueError:
        return None
    return FrameName(
        session=m["session"],
        date=date.isoformat(),
        country=m["country"],
        place=m["place"],
        platform=m["platform"],
        platform_number=m["number"],
        video=m["video"],
        frame=m["frame"],
    )


# --- COCO RLE and mask rasterisation ------------------------------------------------------------


def rle_string_to_counts(s: str) -> list[int]:
    """Decode COCO's compressed RLE string (pycocotools rleFrString) into run lengths.

    Each count is LEB128-like in 6-bit chars offset by 48: 5 payload bits per char, bit 0x20 =
    more chars follow, bit 0x10 of the last char = sign. From the fourth count on, a count is
    stored as the difference to the count two places before (runs alternate 0s and 1s).
    """
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x = k = 0
        more = True
        while more:
            if p >= n:
                raise ValueError("compressed RLE string ends inside a count")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {s[p]!r} is outside the RLE alphabet")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_counts_to_mask(counts: list[int], height: int, width: int) -> np.ndarray:
    """Boolean HxW mask from COCO run lengths (column-major, first run = 0s)."""
    total = height * width
    if any(c < 0 for c in counts):
        raise ValueError("negative run length")
    if sum(counts) != total:
        raise ValueError(f"run lengths sum to {sum(counts)}, expected {height}x{width} = {total}")
    ends = np.cumsum(np.asarray(counts, dtype=np.int64))
    starts = ends - np.asarray(counts, dtype=np.int64)
    # +1 at the start and -1 at the end of every 1-run, then a running sum marks the covered pixels.
    delta = np.zeros(total + 1, dtype=np.int32)
    np.add.at(delta, starts[1::2], 1)
    np.add.at(delta, ends[1::2], -1)
    flat = np.cumsum(delta[:-1]) > 0
    return flat.reshape(width, height).T


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    img = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(img)
    for poly in polygons:
        draw.polygon([(poly[i], poly[i + 1]) for i in range(0, len(poly), 2)], fill=1, outline=1)
    return np.asarray(img, dtype=bool)


@dataclass(frozen=True)
class Instance:
    annotation_id: int
    value: int  # class id in the mask
    encoding: str  # polygon | rle | compressed_rle
    data: tuple[Any, ...]  # polygons (tuples of floats) | run-length lists | compressed strings


@dataclass(frozen=True)
class MaskTask:
    sample_id: str
    height: int
    width: int
    instances: tuple[Instance, ...]
    out_path: str


def instance_mask(inst: Instance, height: int, width: int) -> np.ndarray:
    if inst.encoding == "polygon":
        return polygons_to_mask([list(p) for p in inst.data], height, width)
    mask = np.zeros((height, width), dtype=bool)
    for part in inst.data:
        counts = rle_string_to_counts(part) if inst.encoding == "compressed_rle" else list(part)
        mask |= rle_counts_to_mask(counts, height, width)
    return mask


def rasterise(instances: tuple[Instance, ...], height: int, width: int) -> np.ndarray:
    """Class-id mask (uint8): larger instances painted first, so smaller ones stay on top."""
    masks = [(inst, instance_mask(inst, height, width)) for inst in instances]
    masks.sort(key=lambda im: (-int(im[1].sum()), im[0].annotation_id))
    out = np.zeros((height, width), dtype=np.uint8)
    for inst, m in masks:
        out[m] = inst.value
    return out


def png_bytes(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # Fixed encoder settings and no metadata chunks: equal masks give equal bytes.
    Image.fromarray(mask).save(buf, "PNG", compress_level=6)
    return buf.getvalue()


def _mask_job(task: MaskTask) -> tuple[str, str | None]:
    """Rasterise and write one mask; an error comes back as text (the file is named by the caller)."""
    try:
        mask = rasterise(task.instances, task.height, task.width)
    except ValueError as exc:
        return task.sample_id, str(exc)
    write_bytes(task.out_path, png_bytes(mask))
    return task.sample_id, None


# --- reading the upstream files ---------------------------------------------------------------


def _at_most_one(raw_dir: Path, pattern: str) -> Path | None:
    found = sorted(p for p in raw_dir.glob(pattern) if p.is_file())
    if len(found) > 1:
        raise UpstreamFormatError(
            raw_dir, f"expected one {pattern}, found {', '.join(p.name for p in found)}"
        )
    return found[0] if found else None


@dataclass
class Multilabel:
    header: list[str]
    meta: list[str]
    classes: list[str]
    rows: list[tuple[int, list[str]]]  # (line number, fields)


def read_multilabel(path: Path) -> Multilabel:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UpstreamFormatError(path, f"not UTF-8 text: {exc}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header or "FileName" not in header:
        raise UpstreamFormatError(
            path,
            f"expected columns FileName[, {', '.join(META_COLUMNS[1:4])}], then one column per class; "
            f"found {', '.join(header or []) or 'no header'}",
        )
    dupes = sorted(c for c, n in Counter(header).items() if n > 1)
    if dupes:
        raise UpstreamFormatError(path, f"duplicate columns {', '.join(dupes)}")
    meta = [c for c in header if c in META_COLUMNS]
    classes = [c for c in header if c not in META_COLUMNS]
    if not classes:
        raise UpstreamFormatError(path, "no class columns after FileName and the metadata columns")
    rows = [(reader.line_num, fields) for fields in reader if fields]
    return Multilabel(header, meta, classes, rows)


@dataclass
class SegImage:
    image_id: Any
    file_name: str
    width: int
    height: int
    instances: list[Instance]


def _normalise_segmentation(seg: Any, h: int, w: int) -> tuple[str, tuple[Any, ...]] | None:
    """(encoding, data) of one annotation's segmentation; None = degenerate; ValueError = unexpected."""

    def rle(obj: dict[str, Any]) -> tuple[str, Any]:
        size, counts = obj.get("size"), obj.get("counts")
        if not (isinstance(size, list) and size == [h, w]):
            raise ValueError(f"RLE size {size!r} differs from the image's [height, width] = [{h}, {w}]")
        if isinstance(counts, str):
            return "compressed_rle", counts
        if isinstance(counts, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            return "rle", tuple(counts)
        raise ValueError("RLE counts are neither a list of integers nor a compressed string")

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    if isinstance(seg, dict):
        enc, data = rle(seg)
        return enc, (data,)
    if not isinstance(seg, list):
        raise ValueError(f"segmentation is a {type(seg).__name__}, expected polygons or RLE")
    if seg and all(isinstance(p, dict) for p in seg):
        parts = [rle(p) for p in seg]
        encodings = {e for e, _ in parts}
        if len(encodings) > 1:
            raise ValueError("segmentation mixes compressed and uncompressed RLE")
        return encodings.pop(), tuple(d for _, d in parts)
    if seg and all(number(v) for v in seg):
        seg = [seg]  # one flat polygon, as some exporters write it
    polygons = []
    for poly in seg:
        if not isinstance(poly, list) or not all(number(v) for v in poly):
            raise ValueError("polygon is not a list of numbers")
        if len(poly) % 2:
            raise ValueError(f"polygon has an odd number of coordinates ({len(poly)})")
        if len(poly) >= 6:
            polygons.append(tuple(float(v) for v in poly))
    return ("polygon", tuple(polygons)) if polygons else None


@dataclass
class Segmentation:
    categories: list[dict[str, Any]]  # sorted by id, each with "value" (1..N)
    images: list[SegImage]  # in file order
    degenerate: int


def read_segmentation(path: Path) -> Segmentation:
    """COCO-style instance masks, read tolerantly; UpstreamFormatError naming the file otherwise."""
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UpstreamFormatError(path, f"not valid JSON: {exc}") from None
    keys = ("images", "annotations", "categories")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in keys):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise UpstreamFormatError(path, f"expected a COCO object with lists {', '.join(keys)}; found {found}")

    def field(obj: Any, name: str, kinds: type | tuple[type, ...], where: str) -> Any:
        if not isinstance(obj, dict) or name not in obj or not isinstance(obj[name], kinds):
            raise UpstreamFormatError(path, f"{where}: expected key {name!r} ({kinds}), found {obj!r:.200}")
        return obj[name]

    categories: dict[Any, dict[str, Any]] = {}
    for i, cat in enumerate(data["categories"]):
        cid = field(cat, "id", int, f"categories[{i}]")
        if cid in categories:
            raise UpstreamFormatError(path, f"categories[{i}]: category id {cid} repeated")
        categories[cid] = {
            "category_id": cid,
            "name": str(field(cat, "name", str, f"categories[{i}]")),
            "supercategory": cat.get("supercategory"),
        }
    ordered = [categories[c] for c in sorted(categories)]
    if len(ordered) > 255:
        raise UpstreamFormatError(path, f"{len(ordered)} categories do not fit a mode-L mask (max 255)")
    for value, cat in enumerate(ordered, start=1):
        cat["value"] = value

    images: dict[Any, SegImage] = {}
    order: list[SegImage] = []
    for i, img in enumerate(data["images"]):
        iid = field(img, "id", (int, str), f"images[{i}]")
        if iid in images:
            raise UpstreamFormatError(path, f"images[{i}]: image id {iid} repeated")
        name = field(img, "file_name", str, f"images[{i}]")
        entry = SegImage(
            iid,
            Path(name).name if "/" in name else name,
            field(img, "width", int, f"images[{i}]"),
            field(img, "height", int, f"images[{i}]"),
            [],
        )
        images[iid] = entry
        order.append(entry)

    degenerate = 0
    for i, ann in enumerate(data["annotations"]):
        where = f"annotations[{i}]"
        iid = field(ann, "image_id", (int, str), where)
        cid = field(ann, "category_id", int, where)
        if iid not in images:
            raise UpstreamFormatError(path, f"{where}: image_id {iid} is not in images")
        if cid not in categories:
            raise UpstreamFormatError(path, f"{where}: category_id {cid} is not in categories")
        if "segmentation" not in ann:
            raise UpstreamFormatError(path, f"{where}: no 'segmentation' key")
        img = images[iid]
        try:
            shape = _normalise_segmentation(ann["segmentation"], img.height, img.width)
        except ValueError as exc:
            raise UpstreamFormatError(path, f"{where} (image {img.file_name}): {exc}") from None
        if shape is None:
            degenerate += 1
            continue
        ann_id = ann.get("id", i)
        if not isinstance(ann_id, int):
            ann_id = i
        img.instances.append(Instance(ann_id, categories[cid]["value"], shape[0], shape[1]))
    return Segmentation(ordered, order, degenerate)


# --- the adapter ------------------------------------------------------------------------------


def sample_id_for(file_name: str) -> str:
    """`seatizen-<stem>_<ext>`; a hash suffix when slugging the stem would lose characters."""
    stem, _, ext = file_name.rpartition(".")
    sid = make_sample_id(SOURCE, file_name)
    if not (stem and re.fullmatch(r"[A-Za-z0-9_-]+", stem) and ext.isalnum() and ext.isascii()):
        sid += "-" + hashlib.sha256(file_name.encode("utf-8")).hexdigest()[:8]
    return sid


def _parse_values(fields: list[str], header: list[str], classes: list[str]) -> dict[str, int] | str:
    index = {c: i for i, c in enumerate(header)}
    values: dict[str, int] = {}
    for c in classes:
        raw = fields[index[c]].strip()
        if raw not in VALUES:
            return f"class {c!r} has value {raw!r}, expected 1, 0 or -1"
        values[c] = VALUES[raw]
    return values


def _float_or_none(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


@dataclass
class _Row:
    line: int
    file_name: str
    csv: dict[str, str]
    name: FrameName
    values: dict[str, int]


def ingest(ctx: IngestContext) -> tuple[Tables, dict[str, Any]]:
    """Read data/raw/seatizen into sample/quarantine rows and masks (see the module docstring)."""
    params = ctx.source_params
    tables = Tables(SOURCE)
    raw = ctx.raw_dir
    csv_path = _at_most_one(raw, CSV_GLOB)
    if csv_path is None:
        raise UpstreamFormatError(raw, f"expected a {CSV_GLOB} file, found none")
    seg_path = _at_most_one(raw, SEGMENTATION_GLOB)  # optional: a fetch may leave out the 334 MB JSON
    image_root = raw / IMAGE_DIR
    if not image_root.is_dir():
        raise UpstreamFormatError(raw, f"no {IMAGE_DIR}/ folder (the contents of images.zip)")
    csv_rel = ctx.rel(csv_path)
    images_rel = ctx.rel(image_root)

    taxonomy = Taxonomy.load(ctx.taxonomy_dir)
    crosswalk = Crosswalk.load(ctx.tables_dir / CROSSWALK, taxonomy)
    table = read_multilabel(csv_path)
    crosswalk.require(table.classes, csv_path)
    # Read before any image is decoded, so a changed JSON fails in seconds, not after the probe.
    seg = read_segmentation(seg_path) if seg_path else Segmentation([], [], 0)
    if seg_path:
        crosswalk.require([c["name"] for c in seg.categories], seg_path, "segmentation category")

    images = {p.relative_to(image_root).as_posix(): p for p in sorted(image_root.rglob("*")) if p.is_file()}

    # CSV rows: the first row of each FileName is that image's row; what fails is quarantined.
    good: dict[str, _Row] = {}
    bad_rows: dict[str, str] = {}  # FileName -> why its (first) row is bad: its image shares the fate
    seen: dict[str, int] = {}
    unparsed = 0
    for line, fields in table.rows:
        file_name = fields[table.header.index("FileName")].strip() if len(fields) == len(table.header) else ""
        record_id = file_name or f"line {line}"
        if len(fields) != len(table.header):
            tables.reject(
                "annotation_row",
                record_id,
                csv_rel,
                "bad_record",
                f"line {line}: {len(fields)} fields, header has {len(table.header)}",
            )
            continue
        if not file_name:
            tables.reject("annotation_row", record_id, csv_rel, "bad_record", f"line {line}: empty FileName")
            continue
        if file_name in seen:
            tables.reject(
                "annotation_row",
                f"{file_name} (line {line})",  # the first row of this name may be quarantined too
                csv_rel,
                "bad_record",
                f"line {line}: FileName repeats line {seen[file_name]}; the first row is used",
            )
            continue
        seen[file_name] = line
        name = parse_frame_name(file_name)
        values = _parse_values(fields, table.header, table.classes)
        problem = None
        if name is None:
            unparsed += 1
            problem = f"line {line}: file name does not follow {NAME_PATTERN}"
        elif isinstance(values, str):
            problem = f"line {line}: {values}"
        if problem:
            tables.reject("annotation_row", record_id, csv_rel, "bad_record", problem)
            bad_rows[file_name] = problem
            continue
        if file_name not in images:
            tables.reject(
                "annotation_row",
                record_id,
                csv_rel,
                "missing_image",
                f"line {line}: no {IMAGE_DIR}/{file_name}",
            )
            continue
        assert name is not None and not isinstance(values, str)
        csv_fields = {c: fields[table.header.index(c)] for c in table.meta if c != "FileName"}
        good[file_name] = _Row(line, file_name, csv_fields, name, values)
    if table.rows and unparsed * 2 > len(table.rows):
        raise UpstreamFormatError(
            csv_path,
            f"{unparsed} of {len(table.rows)} file names do not follow {NAME_PATTERN} "
            f"(e.g. 20210618_ATF-Europa_ASV-00_GX024250_004.jpeg): the naming convention changed",
        )

    # Images: only those with a usable row are decoded; the others need no pixels to be placed.
    for key in images:
        if key in good:
            continue
        if key in bad_rows:
            tables.reject(
                "image",
                key,
                f"{images_rel}/{key}",
                "bad_record",
                f"its CSV row is a bad record: {bad_rows[key]}",
            )
        else:
            tables.reject("image", key, f"{images_rel}/{key}", "no_annotation", f"no row in {csv_path.name}")
    paths = [str(images[k]) for k in good]
    probes = probe_images(paths, ctx.max_pixels, ctx.jobs, ctx.scheduler, desc="probe seatizen")
    infos: dict[str, ImageInfo] = {}
    for key, row in good.items():
        result = probes[str(images[key])]
        if isinstance(result, ImageProblem):
            tables.reject("image", key, f"{images_rel}/{key}", result.reason, result.detail)
            tables.reject(
                "annotation_row",
                key,
                csv_rel,
                "image_unusable",
                f"line {row.line}: its image is quarantined ({result.reason})",
            )
        else:
            infos[key] = result

    # Masks for the samples that have a segmentation entry.
    mask_dir = ctx.out_dir / MASK_DIR
    seg_rel = ctx.rel(seg_path) if seg_path else ""
    tasks: list[MaskTask] = []
    attached: dict[str, SegImage] = {}
    for entry in seg.images:
        rid = f"{entry.file_name} (image id {entry.image_id})"
        if entry.file_name in attached:
            tables.reject(
                "mask",
                rid,
                seg_rel,
                "bad_record",
                f"second entry for {entry.file_name}; image id {attached[entry.file_name].image_id} is used",
            )
        elif entry.file_name in infos:
            info = infos[entry.file_name]
            if (entry.width, entry.height) != (info.width, info.height):
                tables.reject(
                    "mask",
                    rid,
                    seg_rel,
                    "bad_record",
                    f"mask {entry.width}x{entry.height} differs from the image {info.width}x{info.height}",
                )
                continue
            attached[entry.file_name] = entry
            sid = sample_id_for(entry.file_name)
            tasks.append(
                MaskTask(sid, entry.height, entry.width, tuple(entry.instances), str(mask_dir / f"{sid}.png"))
            )
        elif entry.file_name in seen or entry.file_name in images:
            tables.reject(
                "mask", rid, seg_rel, "image_unusable", "the CSV row or image of this name is quarantined"
            )
        else:
            tables.reject(
                "mask", rid, seg_rel, "missing_image", f"no CSV row and no {IMAGE_DIR}/{entry.file_name}"
            )
    mask_dir.mkdir(parents=True, exist_ok=True)
    with bar(total=len(tasks), desc="seatizen masks", unit="mask") as progress:
        for sid, error in parallel_map(_mask_job, tasks, jobs=ctx.jobs, chunksize=4, scheduler=ctx.scheduler):
            if error:
                raise UpstreamFormatError(seg_path or raw, f"mask of {sid}: {error}")
            progress.update(1)
    written = {Path(t.out_path).name for t in tasks}
    for stale in mask_dir.glob("*.png"):  # masks of samples an earlier run had and this one has not
        if stale.name not in written:
            stale.unlink()
    cat_name = {c["value"]: c["name"] for c in seg.categories}
    write_json(
        ctx.out_dir / MASK_CLASSES,
        {
            "file": seg_rel or None,
            "order": "segmentation categories sorted by category id; value 0 = unlabelled",
            "overlap": "smaller instance (fewer pixels) wins; equal size: higher annotation id wins",
            "classes": [{"value": 0, "name": "unlabelled"}]
            + [{**c, **crosswalk.describe(c["name"])} for c in seg.categories],
        },
    )

    # Samples.
    masks_rel = ctx.out_rel(mask_dir)
    license_, attribution = params.get("license"), params.get("attribution")
    present_total = present_mapped = 0
    for key, info in infos.items():
        row = good[key]
        labels = crosswalk.labels(row.values)
        present_total += labels["coverage"]["present"]
        present_mapped += labels["coverage"]["mapped"]
        sid = sample_id_for(key)
        entry = attached.get(key)
        segmentation = None
        if entry is not None:
            segmentation = {
                "image_id": entry.image_id,
                "instances": [
                    {
                        "annotation_id": i.annotation_id,
                        "category_id": seg.categories[i.value - 1]["category_id"],
                        "category": cat_name[i.value],
                        "encoding": i.encoding,
                    }
                    for i in sorted(entry.instances, key=lambda i: i.annotation_id)
                ],
            }
        native = {
            "file_name": key,
            "csv": row.csv,
            "name": row.name.native(),
            "multilabel": row.values,
            "segmentation": segmentation,
        }
        tables.add_sample(
            {
                "sample_id": sid,
                "upstream_id": key,
                "image_path": f"{images_rel}/{key}",
                "image_format": info.format,
                **sample_info_columns(info),
                "session": row.name.session,
                "captured_at": row.name.date,
                "lat": _float_or_none(row.csv.get("GPSLatitude")),
                "lon": _float_or_none(row.csv.get("GPSLongitude")),
                "license": license_,
                "attribution": attribution,
                "native_labels": dumps_labels(native),
                "labels": dumps_labels(labels),
                "mask_path": f"{masks_rel}/{sid}.png" if entry is not None else None,
                "n_points": 0,
            }
        )

    samples = tables.samples
    extra: dict[str, Any] = {
        "inputs": {
            "csv_rows": len(table.rows),
            "images": len(images),
            "segmentation_images": len(seg.images),
        },
        "crosswalk": crosswalk.coverage(table.classes),
        "crosswalk_presences": {
            "mapped": present_mapped,
            "total": present_total,
            "ratio": present_mapped / present_total if present_total else None,
        },
        "classes": class_counts(c for k in infos for c, v in good[k].values.items() if v == 1),
        "top_level_categories": class_counts(
            c for s in samples for c, v in json.loads(s["labels"])["top_level"].items() if v == 1
        ),
        "not_annotated_values": sum(v == -1 for k in infos for v in good[k].values.values()),
        "sessions": len({s["session"] for s in samples}),
        "masks": {
            "written": len(tasks),
            "instances": sum(len(t.instances) for t in tasks),
            **dict(sorted(Counter(i.encoding for t in tasks for i in t.instances).items())),
            "degenerate_polygons_skipped": seg.degenerate,
            "categories": len(seg.categories),
        },
    }
    return tables, extra
