"""Seatizen masks: the COCO-style segmentation JSON (read as a stream) and raster masks, and the
one unit of work that probes an image and rasterises its mask.

COCO JSON (`*segmentation_annotations*.json`, 334 MB upstream): read with ijson in three
streaming passes (categories, images, then one annotation at a time), never whole. Each
annotation is checked and normalised against its image's size, then spilled as compact JSON to an
unnamed temporary file; only (offset, length) per annotation stays in memory, and each image's
instances are read back when its sample is made, so memory holds one window of images' instances.

Instances: polygons are filled with PIL (boundary included: may differ from pycocotools by about
one pixel on edges); RLE, both the uncompressed counts list and the compressed string, is decoded
here (column-major, runs starting with 0s). Where instances overlap, the smaller instance (fewer
pixels) wins, ties going to the higher annotation id: small objects usually lie on top of the
substrate around them. An instance of a category the crosswalk does not know is painted with 0
(unlabelled) in that order, so its pixels are never given the class of what lies under it.

What makes an image's mask unusable (the mask record becomes `bad_record`, the image stays a
sample without a mask): a polygon with a vertex more than one image size outside the image
(e.g. coordinates of +-1e300: that is not a slightly loose outline but garbage that would paint a
wrong mask), a polygon of non-numbers or an odd number of coordinates, an RLE whose size is not
the image's or whose runs do not sum to its pixels, a mask size that differs from the decoded
image. Polygons with fewer than three points are skipped and counted.

Raster masks (the-point-is-the-mask): one band of class ids, PNG mode L or (Geo)TIFF (L, I;16,
I or F), with a colour table `color.txt` (`value R G B A` per line, whitespace or commas; `nan`
allowed; alpha 0 = no data). Each id is mapped through its colour to a Seatizen class
(data/tables/seatizen/raster_classes.csv) and on to the product's mask value; no-data ids become 0.
An id in the mask that the colour table does not list makes the mask unusable.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import ijson
import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from stages.errors import UpstreamFormatError
from stages.imaging import ImageProblem, probe_image_bytes
from stages.ingest.probe import Cached, info_columns, read_input
from stages.ingest.records import WorkResult
from stages.ingest.seatizen_names import nfc

NAMESPACE = "ingest-seatizen-masked-image"
RASTER_EXTENSIONS = (".png", ".tif", ".tiff")
RASTER_PREFIX = "annotation_mask_"
COLOUR_TABLE = "color.txt"
FAR_OUTSIDE = 1.0  # vertices further than this many image sizes outside the image are garbage


# --- COCO RLE and polygons --------------------------------------------------------------------


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
    value: int  # class id in the mask; 0 for a category the crosswalk does not know
    encoding: str  # polygon | rle | compressed_rle
    data: tuple[Any, ...]  # polygons (tuples of floats) | run-length lists | compressed strings


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


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _array(values: Any, kinds: str) -> np.ndarray | None:
    """A flat list of JSON numbers as one numpy array (checked in C, not per value in Python);
    None when it is not a list, or holds anything but numbers of `kinds` (i: int, f: float)."""
    if not isinstance(values, list):
        return None
    if not values:
        return np.zeros(0)
    try:
        arr = np.array(values)
    except (ValueError, TypeError, OverflowError):
        return None  # ragged or nested
    if arr.ndim != 1 or arr.dtype.kind not in kinds:
        return None  # strings, booleans, objects, nested lists
    return arr


def normalise_segmentation(seg: Any, h: int, w: int) -> tuple[str, tuple[Any, ...]] | None:
    """(encoding, data) of one annotation's segmentation; None = degenerate; ValueError = unusable."""

    def rle(obj: dict[str, Any]) -> tuple[str, Any]:
        size, counts = obj.get("size"), obj.get("counts")
        if not (isinstance(size, list) and size == [h, w]):
            raise ValueError(f"RLE size {size!r} differs from the image's [height, width] = [{h}, {w}]")
        if isinstance(counts, str):
            return "compressed_rle", counts
        runs = _array(counts, "i")
        if runs is not None:
            if int(runs.sum()) != h * w or (runs < 0).any():
                raise ValueError(f"RLE runs sum to {int(runs.sum())}, expected {h}x{w} = {h * w}")
            return "rle", tuple(runs.tolist())
        raise ValueError("RLE counts are neither a list of integers nor a compressed string")

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
    if seg and _number(seg[0]):
        seg = [seg]  # one flat polygon, as some exporters write it
    polygons = []
    for poly in seg:
        arr = _array(poly, "if")
        if arr is None or not np.isfinite(arr).all():
            raise ValueError("polygon is not a list of finite numbers")
        if len(arr) % 2:
            raise ValueError(f"polygon has an odd number of coordinates ({len(arr)})")
        xs, ys = arr[0::2], arr[1::2]
        far = (xs < -FAR_OUTSIDE * w) | (xs > (1 + FAR_OUTSIDE) * w)
        far |= (ys < -FAR_OUTSIDE * h) | (ys > (1 + FAR_OUTSIDE) * h)
        if far.any():
            k = int(np.argmax(far))
            raise ValueError(f"polygon vertex ({xs[k]:g}, {ys[k]:g}) lies far outside the {w}x{h} image")
        if len(arr) >= 6:
            polygons.append(tuple(arr.astype(np.float64).tolist()))
    return ("polygon", tuple(polygons)) if polygons else None


# --- the segmentation JSON, streamed ----------------------------------------------------------


@dataclass
class SegImage:
    image_id: Any
    file_name: str  # NFC, last path component
    width: int
    height: int
    refs: list[tuple[int, int]] = field(default_factory=list)  # spilled instances: (offset, length)
    encodings: dict[str, int] = field(default_factory=dict)
    problem: str | None = None  # the first annotation that makes the mask unusable


@dataclass
class Segmentation:
    categories: list[dict[str, Any]]  # sorted by id: category_id, name, supercategory, class, value
    images: list[SegImage]  # in file order
    annotations: int
    degenerate: int
    spill: IO[bytes] | None = None

    def instances(self, entry: SegImage) -> bytes:
        """The image's instances as stored: a JSON list, in annotation order (the cache digests it)."""
        assert self.spill is not None or not entry.refs
        parts = []
        for offset, length in entry.refs:
            self.spill.seek(offset)  # type: ignore[union-attr]
            parts.append(self.spill.read(length))  # type: ignore[union-attr]
        return b"[" + b",".join(parts) + b"]"


def _one_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _items(path: Path, prefix: str) -> Any:
    """Objects at `prefix`, one at a time; UpstreamFormatError naming the file if it is not JSON."""
    try:
        with path.open("rb") as fh:
            yield from ijson.items(fh, prefix, use_float=True)
    except ijson.JSONError as exc:
        raise UpstreamFormatError(path, f"not valid JSON: {_one_line(exc)}") from None
    except UnicodeDecodeError as exc:
        raise UpstreamFormatError(path, f"not valid JSON: {exc}") from None


def _whole(path: Path, key: str) -> Any:
    found = list(_items(path, key))
    return found[0] if found else None


def read_segmentation(path: Path, resolve: Callable[[str], str | None], spill: IO[bytes]) -> Segmentation:
    """Stream the COCO JSON: categories and images (small) whole, annotations one at a time.

    `resolve(category name)` gives the crosswalk class of a category, or None for one the
    crosswalk does not know: its instances are then painted 0. The known categories, sorted by
    id, get the mask values 1..K. Structural faults (not JSON,
    missing lists, repeated or unknown ids) fail naming the file; a bad annotation makes only its
    image's mask unusable (`SegImage.problem`)."""
    keys = ("images", "annotations", "categories")
    categories_raw = _whole(path, "categories")
    images_raw = _whole(path, "images")
    if not isinstance(categories_raw, list) or not isinstance(images_raw, list):
        raise UpstreamFormatError(path, f"expected a COCO object with lists {', '.join(keys)}")

    def field_(obj: Any, name: str, kinds: type | tuple[type, ...], where: str) -> Any:
        value = obj.get(name) if isinstance(obj, dict) else None
        if value is None or isinstance(value, bool) or not isinstance(value, kinds):
            raise UpstreamFormatError(path, f"{where}: expected key {name!r} ({kinds}), found {obj!r:.200}")
        return value

    categories: dict[Any, dict[str, Any]] = {}
    for i, cat in enumerate(categories_raw):
        cid = field_(cat, "id", int, f"categories[{i}]")
        if cid in categories:
            raise UpstreamFormatError(path, f"categories[{i}]: category id {cid} repeated")
        name = nfc(str(field_(cat, "name", str, f"categories[{i}]")))
        categories[cid] = {
            "category_id": cid,
            "name": name,
            "supercategory": cat.get("supercategory"),
            "class": resolve(name),
            "value": None,
            "instances": 0,
        }
    ordered = [categories[c] for c in sorted(categories)]
    known = [c for c in ordered if c["class"] is not None]
    if len(known) > 255:
        raise UpstreamFormatError(path, f"{len(known)} categories do not fit a mode-L mask (max 255)")
    for value, cat in enumerate(known, start=1):
        cat["value"] = value

    images: dict[Any, SegImage] = {}
    order: list[SegImage] = []
    for i, img in enumerate(images_raw):
        iid = field_(img, "id", (int, str), f"images[{i}]")
        if iid in images:
            raise UpstreamFormatError(path, f"images[{i}]: image id {iid} repeated")
        name = nfc(field_(img, "file_name", str, f"images[{i}]")).rsplit("/", 1)[-1]
        width, height = field_(img, "width", int, f"images[{i}]"), field_(img, "height", int, f"images[{i}]")
        if width <= 0 or height <= 0:
            raise UpstreamFormatError(path, f"images[{i}] ({name}): size {width}x{height}")
        entry = SegImage(iid, name, width, height)
        images[iid] = entry
        order.append(entry)
    del images_raw

    degenerate = annotations = 0
    for i, ann in enumerate(_items(path, "annotations.item")):
        annotations += 1
        where = f"annotations[{i}]"
        iid = field_(ann, "image_id", (int, str), where)
        cid = field_(ann, "category_id", int, where)
        if iid not in images:
            raise UpstreamFormatError(path, f"{where}: image_id {iid} is not in images")
        if cid not in categories:
            raise UpstreamFormatError(path, f"{where}: category_id {cid} is not in categories")
        if "segmentation" not in ann:
            raise UpstreamFormatError(path, f"{where}: no 'segmentation' key")
        img = images[iid]
        if img.problem is not None:
            continue
        ann_id = ann.get("id", i)
        if not isinstance(ann_id, int) or isinstance(ann_id, bool):
            ann_id = i
        try:
            shape = normalise_segmentation(ann["segmentation"], img.height, img.width)
        except ValueError as exc:
            img.problem = f"annotation {ann_id} ({where}): {exc}"
            img.refs.clear()
            continue
        if shape is None:
            degenerate += 1
            continue
        categories[cid]["instances"] += 1
        value = categories[cid]["value"] or 0
        blob = json.dumps(
            [ann_id, cid, value, shape[0], shape[1]], separators=(",", ":"), allow_nan=False
        ).encode()
        offset = spill.seek(0, io.SEEK_END)
        spill.write(blob)
        img.refs.append((offset, len(blob)))
        img.encodings[shape[0]] = img.encodings.get(shape[0], 0) + 1
    if annotations == 0 and not isinstance(_whole(path, "annotations"), list):
        raise UpstreamFormatError(path, f"expected a COCO object with lists {', '.join(keys)}")
    return Segmentation(ordered, order, annotations, degenerate, spill)


def instances_from_blob(blob: bytes) -> tuple[Instance, ...]:
    out = []
    for ann_id, _category, value, encoding, data in json.loads(blob):
        if encoding == "polygon":
            data = tuple(tuple(p) for p in data)
        elif encoding == "rle":
            data = tuple(tuple(p) for p in data)
        else:
            data = tuple(data)
        out.append(Instance(int(ann_id), int(value), str(encoding), data))
    return tuple(out)


# --- raster masks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ColourRow:
    raw: float  # the id in the mask (nan allowed)
    rgba: tuple[int, int, int, int]


def read_colour_table(path: Path) -> list[ColourRow]:
    """`value R G B A` lines (whitespace or commas; `#` comments and QGIS's INTERPOLATION line
    skipped); UpstreamFormatError naming the file and line otherwise."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UpstreamFormatError(path, f"colour table unreadable: {exc}") from None
    rows: list[ColourRow] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#") or line.upper().startswith("INTERPOLATION"):
            continue
        parts = line.replace(",", " ").split()
        try:
            raw = float(parts[0])
            rgba = tuple(int(p) for p in parts[1:5])
        except (ValueError, IndexError):
            raise UpstreamFormatError(
                path, f"line {number}: expected `value R G B A`, found {line!r}"
            ) from None
        if len(rgba) != 4 or not all(0 <= v <= 255 for v in rgba):
            raise UpstreamFormatError(
                path, f"line {number}: expected `value R G B A` (0..255), found {line!r}"
            )
        if math.isinf(raw) or (not math.isnan(raw) and raw != int(raw)):
            raise UpstreamFormatError(path, f"line {number}: value {parts[0]!r} is not an integer class id")
        key = "nan" if math.isnan(raw) else str(int(raw))
        if key in seen:
            raise UpstreamFormatError(path, f"line {number}: value {parts[0]} listed twice")
        seen.add(key)
        rows.append(ColourRow(raw, rgba))  # type: ignore[arg-type]
    if not rows:
        raise UpstreamFormatError(path, "colour table has no rows")
    return rows


def _raster_ids(data: bytes, max_pixels: int) -> np.ndarray:
    """The mask's ids as float64 (nan kept); ValueError with the reason when it cannot be one."""
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a readable raster ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ValueError(f"raster header does not parse ({exc})") from None
    if w * h > max_pixels:
        raise ValueError(f"{w}x{h} exceeds limits.max_image_pixels={max_pixels}")
    if img.mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I", "F"):
        raise ValueError(f"mode {img.mode} is not one band of class ids (expected L, I;16, I or F)")
    try:
        img.load()
        return np.asarray(img).astype(np.float64)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"raster does not decode ({exc})") from None


def raster_mask(data: bytes, lut: tuple[tuple[float, int], ...], max_pixels: int) -> np.ndarray:
    """The product mask (uint8) of a raster of ids, through `lut` (id -> value; nan allowed)."""
    ids = _raster_ids(data, max_pixels)
    out = np.zeros(ids.shape, dtype=np.uint8)
    nan_value = next((v for raw, v in lut if math.isnan(raw)), None)
    nan = np.isnan(ids)
    if nan.any():
        if nan_value is None:
            raise ValueError(f"{int(nan.sum())} pixels are nan, which the colour table does not list")
        out[nan] = nan_value
    known = {raw: v for raw, v in lut if not math.isnan(raw)}
    values, inverse = np.unique(np.where(nan, -np.inf, ids), return_inverse=True)
    mapped = np.zeros(len(values), dtype=np.uint8)
    for k, raw in enumerate(values.tolist()):
        if raw == -math.inf:
            continue
        if raw not in known:
            n = int((inverse == k).sum())
            raise ValueError(f"value {raw:g} ({n} pixels) is not in the colour table")
        mapped[k] = known[raw]
    flat = mapped[inverse.reshape(-1)].reshape(ids.shape)
    return np.where(nan, out, flat).astype(np.uint8)


# --- the unit of work: probe one image and make its mask ---------------------------------------


@dataclass(frozen=True)
class MaskedImageTask:
    path: str
    max_pixels: int
    out_name: str  # the mask's file under the source's interim folder
    instances: bytes | None = None  # COCO instances (Segmentation.instances)
    raster_path: str | None = None  # a raster mask file
    lut: tuple[tuple[float, int], ...] = ()  # raster id -> product value
    size: tuple[int, int] | None = None  # (width, height) the COCO entry gives the image


def probe_with_mask(task: MaskedImageTask, cached: Cached) -> WorkResult:
    """Module level: runs in a worker. The image's probe columns plus its mask PNG in `files`;
    a mask that cannot be made is `data["mask_problem"]` (the image itself stays usable)."""
    try:
        data = read_input(task.path)
    except ImageProblem as problem:
        return WorkResult(problem=(problem.reason, problem.detail))
    raster: bytes | None = None
    raster_problem = None
    if task.raster_path is not None:
        try:
            raster = read_input(task.raster_path)
        except ImageProblem as problem:
            raster_problem = f"mask file: {problem.detail}"
    mask_source = task.instances if task.instances is not None else raster or b""
    inputs = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "mask": hashlib.sha256(mask_source).hexdigest(),
        "kind": "instances" if task.instances is not None else "raster",
        "lut": [[("nan" if math.isnan(r) else r), v] for r, v in task.lut],
        "out": task.out_name,
        "mask_size": list(task.size) if task.size else None,
    }
    if raster_problem is not None:
        return _probe(data, task, None, raster_problem)
    hit = cached.lookup(inputs)
    if hit is not None:
        return hit
    result = _probe(data, task, raster, None)
    cached.store(inputs, result)
    return result


def _probe(data: bytes, task: MaskedImageTask, raster: bytes | None, problem: str | None) -> WorkResult:
    try:
        info = probe_image_bytes(data, task.max_pixels)
    except ImageProblem as exc:
        return WorkResult(problem=(exc.reason, exc.detail))
    columns = info_columns(info)
    if problem is not None:
        return WorkResult(columns=columns, data={"mask_problem": problem})
    try:
        if task.instances is not None:
            if task.size is not None and task.size != (info.width, info.height):
                raise ValueError(
                    f"mask {task.size[0]}x{task.size[1]} differs from the image {info.width}x{info.height}"
                )
            mask = rasterise(instances_from_blob(task.instances), info.height, info.width)
        else:
            mask = raster_mask(raster or b"", task.lut, task.max_pixels)
            if mask.shape != (info.height, info.width):
                raise ValueError(
                    f"mask {mask.shape[1]}x{mask.shape[0]} differs from the image {info.width}x{info.height}"
                )
    except ValueError as exc:
        return WorkResult(columns=columns, data={"mask_problem": str(exc)})
    return WorkResult(
        columns=columns, data={"mask_pixels": int((mask != 0).sum())}, files={task.out_name: png_bytes(mask)}
    )
