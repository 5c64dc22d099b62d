"""ingest@coasttrain: USGS Coast Train npz files and metadata CSVs into the sample table.

Raw layout (docs/architecture.md): `data/raw/coasttrain/<Record>/` holds exactly one metadata CSV
at its root and the record's `.npz` files (Doodler output, SOURCES §4), normally under `npz/`.

Input records, two kinds, each ending exactly once (`inputs` in the metrics):
- `npz`: every `*.npz` file under a record folder -> one sample, or one quarantine row with
  record_kind `image` (`npz_needs_pickle`, `unreadable_npz`, `image_too_large`, `unknown_class`,
  `bad_record` for a second npz with the same file name in one record).
- `csv_rows`: every data row of a record's metadata CSV -> joined to exactly one sample
  (`csv_rows_joined`), or one quarantine row with record_kind `annotation_row`: `missing_image`
  (its npz is not in the record), `image_unusable` (its npz was quarantined), `bad_record` (empty
  file column, or a second row for the same npz).
So `inputs.npz == samples + quarantined images` and `inputs.csv_rows == csv_rows_joined +
quarantined annotation rows`. An npz without a CSV row is still a sample, with null metadata.

Per npz (one read, in a worker process, `parallel_map` with `ctx.jobs`):
- every member's .npy header is checked before anything is loaded: an object dtype means the file
  only loads with pickle (`npz_needs_pickle`); arrays are then read with `allow_pickle=False`;
- only the unprefixed keys count (`label`, `image`, ...): `0label`, `00label` are earlier
  doodling passes that Doodler keeps for history;
- image = `orig_image[..., :3]` when present, else `image` (see `load_coasttrain_image`);
- label = argmax over the one-hot last axis (K = highest class present + 1, may be < len(classes));
  a pixel whose one-hot is all zero has no label (255);
- each class name is remapped through `data/tables/coasttrain/remap.csv` to the 7 common classes
  (ids in COMMON_CLASSES order; `ignore` -> 255). A class that labels pixels but is not in the
  table quarantines the npz as `unknown_class` (never silently "other"); a listed class that labels
  no pixel does not matter;
- the remapped mask is written as PNG mode L to `data/interim/coasttrain/masks/<sample_id>.png`;
  the image is not copied (pack reads it from the npz through `load_coasttrain_image`).

Group keys:
- `spatial_block` = `lat<i>_lon<j>`, the cell of a grid of `ingest.coasttrain_block_degrees`
  degrees holding the tile centre (floor division), so neighbouring tiles of one orthomosaic, and
  tiles of one footprint on other dates or from other sensors, share a block;
- `session` = `<Record>/<scene key>`: the npz stem with tile numbers (`chunk<n>_`, `_<row>_<col>_`)
  and dates/times removed, i.e. the orthomosaic, NAIP quad or satellite footprint the tile was cut
  from. It ties tiles of one scene together even where the scene straddles a block edge;
- an npz without metadata takes the smallest `spatial_block` of the tiles of its scene that have
  one (its neighbours); when none has, `scene-<Record>-<scene key>`, which still keeps every
  metadata-less tile of that scene in one group.

Columns: sample_id = `coasttrain-<Record>-<npz stem>` (slugged; a stem the slug changes gets a
short hash of the exact stem appended so two stems can never collide), upstream_id =
`<Record>/<npz path in the record>`, image_path = the npz, image_format `npz`, file_size and
file_sha256 of the npz file, pixel_sha256/phash of the RGB image, lat/lon = centre of
LatMin..LatMax / LonMin..LonMax, captured_at = ISO date-time from year..second.

`native_labels` (JSON, sorted keys):
    {"record": "<Record>", "npz": "<path in record>", "classes": [npz `classes`, in index order],
     "classes_present": [class names that label at least one pixel, index order],
     "label_channels": K, "csv": "<metadata CSV name>" | null,
     "geo": {"epsg": int|null, "crs": str|null, "px_size_m": float|null, "lat_min", "lat_max",
             "lon_min", "lon_max": float|null} | null}     (null when the npz has no CSV row)
`labels` (JSON, sorted keys), in the 7-class space:
    {"classes": [the 7 names, id order], "ignore_index": 255,
     "pixels": {name: count for the 7 names and "ignore"},
     "fractions": {name: count / all pixels, rounded to 6 places, same keys},
     "present": [common classes with at least one pixel, id order]}
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import math
import re
import unicodedata
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from stages import schema
from stages.errors import TidepoolError, UpstreamFormatError
from stages.executor import parallel_map, resolve_jobs
from stages.fsutil import write_bytes
from stages.imaging import ImageProblem, probe_array
from stages.ingest.common import Tables, dumps_labels
from stages.ingest.context import IngestContext
from stages.progress import bar

SOURCE = "coasttrain"
# The authors' `super_classes` order (remap_coast_train_classes_*.json): mask value = position.
COMMON_CLASSES = ("water", "whitewater", "sediment", "developed", "vegetation", "natural_terrain", "other")
IGNORE = 255
REMAP_TABLE = Path("coasttrain") / "remap.csv"
REMAP_COLUMNS = ("class_name", "superclass")
DEFAULT_BLOCK_DEGREES = 0.05

FILE_COLUMN = "annotation_image_filename"
# Columns the join and the metadata need (the class list comes from each npz, not the CSV);
# the real CSVs order them differently, all have them.
REQUIRED_COLUMNS = (
    FILE_COLUMN,
    "year",
    "month",
    "day",
    "LonMin",
    "LonMax",
    "LatMin",
    "LatMax",
    "px_size_m",
    "epsg",
    "CRS",
)
_NULL_CELLS = {"", "n/a", "na", "nan", "none", "null"}
# PNG settings fixed so a mask's bytes depend on its pixels only.
_PNG_OPTIONS = {"format": "PNG", "compress_level": 6, "optimize": False}


# --- the remap table ---------------------------------------------------------------------------


def load_remap(tables_dir: Path) -> dict[str, int]:
    """class name -> common class id (0..6) or IGNORE, from data/tables/coasttrain/remap.csv."""
    path = Path(tables_dir) / REMAP_TABLE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise TidepoolError(f"{path}: Coast Train remap table not found") from exc
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in REMAP_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise TidepoolError(f"{path}: expected columns {list(REMAP_COLUMNS)}, found {reader.fieldnames}")
    ids = {name: i for i, name in enumerate(COMMON_CLASSES)}
    remap: dict[str, int] = {}
    for line, row in enumerate(reader, start=2):
        name, superclass = (row["class_name"] or "").strip(), (row["superclass"] or "").strip()
        if not name:
            raise TidepoolError(f"{path}:{line}: empty class_name")
        if superclass == "ignore":
            value = IGNORE
        elif superclass in ids:
            value = ids[superclass]
        else:
            raise TidepoolError(
                f"{path}:{line}: superclass {superclass!r} of {name!r} is not one of "
                f"{[*COMMON_CLASSES, 'ignore']}"
            )
        if name in remap and remap[name] != value:
            raise TidepoolError(f"{path}:{line}: class {name!r} listed twice with different superclasses")
        remap[name] = value
    return remap


# --- reading one npz ----------------------------------------------------------------------------


def _member_headers(zf: zipfile.ZipFile) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """key -> (dtype, shape) from each .npy header, without reading any array data.

    Reading headers first means a file is judged (pickle, sizes) before a byte of a possibly huge
    or hostile array is inflated.
    """
    headers: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    for info in zf.infolist():
        if not info.filename.endswith(".npy"):
            continue
        key = info.filename[: -len(".npy")]
        try:
            with zf.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                elif version in ((2, 0), (3, 0)):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                else:
                    raise ValueError(f"unsupported .npy version {version}")
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise ImageProblem("unreadable_npz", f"member {info.filename!r}: bad .npy header: {exc}") from exc
        headers[key] = (dtype, tuple(int(d) for d in shape))
    return headers


def _image_key(keys: set[str] | dict[str, Any]) -> str | None:
    # orig_image keeps the original bands (4 for NAIP); `image` is what Doodler displayed.
    if "orig_image" in keys:
        return "orig_image"
    if "image" in keys:
        return "image"
    return None


def _check_image_header(key: str, dtype: np.dtype, shape: tuple[int, ...], max_pixels: int) -> None:
    if dtype != np.uint8 or len(shape) != 3 or shape[2] < 3:
        raise ImageProblem(
            "unreadable_npz", f"`{key}` must be uint8 HxWx3 (or more bands), found {dtype} {shape}"
        )
    if shape[0] * shape[1] > max_pixels:
        raise ImageProblem(
            "image_too_large", f"`{key}` is {shape[1]}x{shape[0]}, over limits.max_image_pixels={max_pixels}"
        )


def _load(zf_bytes: bytes, keys: list[str]) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(zf_bytes), allow_pickle=False) as npz:
            return {k: npz[k] for k in keys}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise ImageProblem("npz_needs_pickle", f"an array only loads with pickle: {exc}") from exc
        raise ImageProblem("unreadable_npz", f"array data malformed: {exc}") from exc
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ImageProblem("unreadable_npz", f"array data malformed: {exc}") from exc


def _open_zip(data: bytes) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ImageProblem("unreadable_npz", f"not an npz (zip) file: {exc}") from exc


def _rgb_from(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array[..., :3])


def load_coasttrain_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """The RGB image of one Coast Train npz (uint8 HxWx3), chosen exactly as ingest chose it:
    `orig_image[..., :3]` when present, else `image`; loaded without pickle."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UpstreamFormatError(path, f"cannot read npz: {exc}") from exc
    try:
        with _open_zip(data) as zf:
            headers = _member_headers(zf)
        key = _image_key(headers)
        if key is None:
            raise ImageProblem(
                "unreadable_npz", f"expected key `orig_image` or `image`, found {sorted(headers)}"
            )
        _check_image_header(key, *headers[key], max_pixels if max_pixels is not None else 2**62)
        return _rgb_from(_load(data, [key])[key])
    except ImageProblem as problem:
        raise UpstreamFormatError(path, f"{problem.reason}: {problem.detail}") from problem


@dataclass(frozen=True)
class NpzTask:
    path: str
    mask_path: str
    max_pixels: int
    remap: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class NpzProblem:
    """A quarantine verdict for one npz, returned (not raised) from the worker."""

    reason: str
    detail: str
    unknown_classes: tuple[str, ...] = ()


class _UnknownClass(ImageProblem):
    def __init__(self, names: list[str]) -> None:
        self.names = tuple(names)
        super().__init__(
            "unknown_class",
            f"class {', '.join(repr(c) for c in names)} labels pixels but is not in "
            f"data/tables/{REMAP_TABLE.as_posix()}",
        )


@dataclass(frozen=True)
class NpzResult:
    width: int
    height: int
    file_size: int
    file_sha256: str
    pixel_sha256: str
    phash: int
    classes: tuple[str, ...]
    present: tuple[int, ...]  # indices into `classes` that label at least one pixel
    channels: int
    pixels: tuple[int, ...]  # pixel count per common class id, then the ignore count


def _classes_of(array: np.ndarray) -> tuple[str, ...]:
    flat = np.asarray(array).reshape(-1)
    if flat.dtype.kind == "U":
        return tuple(unicodedata.normalize("NFC", str(c)).strip() for c in flat)
    if flat.dtype.kind == "S":
        return tuple(unicodedata.normalize("NFC", c.decode("utf-8", "replace")).strip() for c in flat)
    raise ImageProblem("unreadable_npz", f"`classes` must be a string array, found {flat.dtype}")


def decode_label(onehot: np.ndarray) -> np.ndarray:
    """Class index per pixel (argmax over the one-hot axis); 255 where the one-hot is all zero."""
    index = onehot.argmax(axis=-1).astype(np.uint8)
    index[~onehot.any(axis=-1)] = IGNORE
    return index


def encode_mask_png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L").save(buf, **_PNG_OPTIONS)
    return buf.getvalue()


def _process(task: NpzTask) -> NpzResult | NpzProblem:
    """Read, check, decode, remap and hash one npz; write its mask. Module level: it runs in a
    worker process, and returns problems rather than raising so they cross back as data."""
    try:
        return _process_checked(task)
    except _UnknownClass as problem:
        return NpzProblem(problem.reason, problem.detail, problem.names)
    except ImageProblem as problem:
        return NpzProblem(problem.reason, problem.detail)


def _process_checked(task: NpzTask) -> NpzResult:
    try:
        data = Path(task.path).read_bytes()
    except OSError as exc:
        raise ImageProblem("unreadable_npz", f"cannot read the file: {exc}") from exc
    if not data:
        raise ImageProblem("unreadable_npz", "zero-byte npz")
    with _open_zip(data) as zf:
        headers = _member_headers(zf)
    pickled = sorted(k for k, (dtype, _) in headers.items() if dtype.hasobject)
    if pickled:
        raise ImageProblem("npz_needs_pickle", f"object arrays (need pickle): {pickled}")
    image_key = _image_key(headers)
    missing = [k for k in ("label", "classes") if k not in headers] + (
        [] if image_key else ["orig_image|image"]
    )
    if missing:
        raise ImageProblem(
            "unreadable_npz",
            f"expected keys `label`, `classes` and `orig_image` or `image`; missing {missing}, "
            f"found {sorted(headers)}",
        )
    assert image_key is not None
    _check_image_header(image_key, *headers[image_key], task.max_pixels)
    label_dtype, label_shape = headers["label"]
    height, width = headers[image_key][1][:2]
    if label_dtype != np.uint8 or len(label_shape) != 3 or label_shape[:2] != (height, width):
        raise ImageProblem(
            "unreadable_npz",
            f"`label` must be a uint8 one-hot {height}x{width}xK matching `{image_key}`, "
            f"found {label_dtype} {label_shape}",
        )
    if not 1 <= label_shape[2] < IGNORE:
        raise ImageProblem("unreadable_npz", f"`label` has {label_shape[2]} one-hot channels")

    arrays = _load(data, [image_key, "label", "classes"])
    classes = _classes_of(arrays["classes"])
    index = decode_label(arrays["label"])
    present = tuple(int(v) for v in np.unique(index) if v != IGNORE)
    beyond = [k for k in present if k >= len(classes)]
    if beyond:
        raise ImageProblem(
            "unreadable_npz",
            f"label channels {beyond} label pixels but `classes` lists only {len(classes)} names",
        )
    remap = dict(task.remap)
    unknown = sorted({classes[k] for k in present if classes[k] not in remap})
    if unknown:
        raise _UnknownClass(unknown)
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for k in present:
        lut[k] = remap[classes[k]]
    mask = lut[index]
    counts = np.bincount(mask.reshape(-1), minlength=256)
    pixels = tuple(int(counts[i]) for i in range(len(COMMON_CLASSES))) + (int(counts[IGNORE]),)

    info = probe_array(_rgb_from(arrays[image_key]))
    write_bytes(task.mask_path, encode_mask_png(mask))
    return NpzResult(
        width=info.width,
        height=info.height,
        file_size=len(data),
        file_sha256=hashlib.sha256(data).hexdigest(),
        pixel_sha256=info.pixel_sha256 or "",
        phash=info.phash,
        classes=classes,
        present=present,
        channels=int(label_shape[2]),
        pixels=pixels,
    )


# --- the metadata CSV ----------------------------------------------------------------------------


def _decode_csv(path: Path) -> str:
    raw = path.read_bytes()
    # The release CSVs are latin-1; a UTF-8 file (a re-export) must not turn into mojibake that
    # breaks the join on non-ASCII names, and latin-1 bytes beyond ASCII are rarely valid UTF-8.
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def npz_key(cell: str) -> str:
    """`npz/x.npz`, `/npz/x.npz`, `x.npz` (any slashes) -> `x.npz`, NFC-normalised."""
    name = PurePosixPath(cell.strip().replace("\\", "/")).name
    return unicodedata.normalize("NFC", name)


def read_metadata_csv(path: Path) -> list[dict[str, str]]:
    """Rows of one record's metadata CSV; a CSV without the needed columns is a format change."""
    text = _decode_csv(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = [f.strip() for f in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in fields]
    if missing:
        raise UpstreamFormatError(
            path, f"expected columns {list(REQUIRED_COLUMNS)} (any order); missing {missing}, found {fields}"
        )
    reader.fieldnames = fields
    return [{k: (v or "") for k, v in row.items() if k is not None} for row in reader]


def _float(cell: str | None) -> float | None:
    if cell is None or cell.strip().strip('"').lower() in _NULL_CELLS:
        return None
    try:
        value = float(cell.strip().strip('"'))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _int(cell: str | None) -> int | None:
    value = _float(cell)
    return int(value) if value is not None and value.is_integer() else None


def _text(cell: str | None) -> str | None:
    # NAIP's CRS cell carries literal quotes ('"NAD83 / UTM zone 17N"').
    value = (cell or "").strip().strip('"').strip()
    return None if value.lower() in _NULL_CELLS else value


def _centre(lo: float | None, hi: float | None, bound: float) -> float | None:
    if lo is None or hi is None or abs(lo) > bound or abs(hi) > bound:
        return None
    return (lo + hi) / 2


def _captured_at(row: dict[str, str]) -> str | None:
    year, month, day = _int(row.get("year")), _int(row.get("month")), _int(row.get("day"))
    if year is None or month is None or day is None:
        return None
    hms = [_int(row.get(k)) for k in ("hour", "minute", "second")]
    try:
        if any(v is None for v in hms):
            return dt.date(year, month, day).isoformat()
        return dt.datetime(year, month, day, *hms).isoformat()  # type: ignore[misc]
    except ValueError:
        return None


def spatial_block(lat: float, lon: float, degrees: float) -> str:
    return f"lat{math.floor(lat / degrees)}_lon{math.floor(lon / degrees)}"


@dataclass(frozen=True)
class Metadata:
    csv_name: str
    lat: float | None
    lon: float | None
    captured_at: str | None
    geo: dict[str, Any]


def _metadata(csv_name: str, row: dict[str, str]) -> Metadata:
    lat_min, lat_max = _float(row.get("LatMin")), _float(row.get("LatMax"))
    lon_min, lon_max = _float(row.get("LonMin")), _float(row.get("LonMax"))
    geo = {
        "epsg": _int(row.get("epsg")),
        "crs": _text(row.get("CRS")),
        "px_size_m": _float(row.get("px_size_m")),
        "lat_min": lat_min,
        "lat_max": lat_max,
        "lon_min": lon_min,
        "lon_max": lon_max,
    }
    return Metadata(
        csv_name=csv_name,
        lat=_centre(lat_min, lat_max, 90.0),
        lon=_centre(lon_min, lon_max, 180.0),
        captured_at=_captured_at(row),
        geo=geo,
    )


# --- scene keys ------------------------------------------------------------------------------------

_CHUNK = re.compile(r"^chunk\d+_", re.IGNORECASE)  # NAIP / Sentinel-2 tile number
_DATES = (
    re.compile(r"\d{4}-\d{2}-\d{2}-\d{2}-\d{2}-\d{2}"),  # Landsat date-time
    re.compile(r"\d{8}T\d{6}"),  # Sentinel-2 sensing times
    re.compile(r"\d{4}-\d{2}-\d{2}"),
    re.compile(r"(?<![0-9])(?:19|20)\d{6}(?![0-9])"),  # yyyymmdd
    re.compile(r"(?<![0-9])(?:19|20)\d{2}-\d{2}(?![0-9])"),  # yyyy-mm
    re.compile(r"(?<=_)(?:19|20)\d{2}(?=_)"),  # a bare survey year (quadrangles)
)
_TILE_RC = re.compile(r"_\d{1,3}_\d{1,3}(?=_ID\d+$)")  # ortho tile row/col before the _ID suffix


def scene_key(stem: str) -> str:
    """The scene an npz was cut from: its stem without tile numbers, dates and times."""
    key = _CHUNK.sub("", stem)
    for pattern in _DATES:
        key = pattern.sub("D", key)
    return _TILE_RC.sub("", key)


def sample_id_for(record: str, stem: str) -> str:
    sid = schema.make_sample_id(SOURCE, record, stem)
    if sid != f"{SOURCE}-{record}-{stem}":
        # The slug dropped characters (a dot, `ñ`): keep ids of distinct stems distinct.
        sid += "-" + hashlib.sha256(stem.encode("utf-8")).hexdigest()[:8]
    return sid


# --- the adapter ---------------------------------------------------------------------------------


@dataclass
class _Npz:
    record: str
    path: Path
    member: str  # path inside the record folder
    sample_id: str
    row: dict[str, str] | None = None
    row_id: str | None = None  # "<Record>/<csv name>:<line>" of the joined CSV row


def _record_csv(record_dir: Path) -> Path:
    csvs = sorted(p for p in record_dir.iterdir() if p.is_file() and p.suffix.lower() == ".csv")
    if len(csvs) != 1:
        raise UpstreamFormatError(
            record_dir,
            f"expected exactly one metadata CSV at the record root, found {[p.name for p in csvs]}",
        )
    return csvs[0]


def _records(ctx: IngestContext) -> list[str]:
    records = ctx.source_params.get("records") or []
    if not records:
        raise TidepoolError("params.yaml: `sources.coasttrain.records` is empty")
    missing = [r for r in records if not (ctx.raw_dir / r).is_dir()]
    if missing:
        raise UpstreamFormatError(ctx.raw_dir, f"record folders {missing} not fetched (run fetch@coasttrain)")
    return sorted(records)


def ingest(ctx: IngestContext) -> tuple[Tables, dict[str, Any]]:
    tables = Tables(SOURCE)
    remap = load_remap(ctx.tables_dir)
    degrees = float((ctx.params.get("ingest") or {}).get("coasttrain_block_degrees", DEFAULT_BLOCK_DEGREES))
    if not degrees > 0:
        raise TidepoolError(f"params.yaml: ingest.coasttrain_block_degrees must be > 0, got {degrees}")
    license_, attribution = ctx.source_params.get("license"), ctx.source_params.get("attribution")

    items: list[_Npz] = []
    npz_found = csv_rows = 0
    csv_paths: dict[str, Path] = {}
    for record in _records(ctx):
        record_dir = ctx.raw_dir / record
        csv_path = csv_paths[record] = _record_csv(record_dir)
        rows = read_metadata_csv(csv_path)
        csv_rows += len(rows)

        by_name: dict[str, _Npz] = {}
        for path in sorted(record_dir.rglob("*.npz")):
            npz_found += 1
            member = path.relative_to(record_dir).as_posix()
            name = unicodedata.normalize("NFC", path.name)
            if name in by_name:
                tables.reject(
                    "image",
                    f"{record}/{member}",
                    ctx.rel(path),
                    "bad_record",
                    f"second npz named {name!r} in {record} (first: {by_name[name].member})",
                )
                continue
            item = _Npz(record, path, member, sample_id_for(record, unicodedata.normalize("NFC", path.stem)))
            by_name[name] = item
            items.append(item)

        for line, row in enumerate(rows, start=2):
            row_id = f"{record}/{csv_path.name}:{line}"
            cell = row.get(FILE_COLUMN, "")
            key = npz_key(cell)
            target = by_name.get(key) if key else None
            if not key:
                tables.reject(
                    "annotation_row", row_id, ctx.rel(csv_path), "bad_record", f"empty {FILE_COLUMN}"
                )
            elif target is None:
                tables.reject(
                    "annotation_row",
                    row_id,
                    ctx.rel(csv_path),
                    "missing_image",
                    f"{FILE_COLUMN} {cell!r}: no such npz in {record}",
                )
            elif target.row is not None:
                tables.reject(
                    "annotation_row",
                    row_id,
                    ctx.rel(csv_path),
                    "bad_record",
                    f"second CSV row for {key!r} (first: {target.row_id})",
                )
            else:
                target.row, target.row_id = row, row_id

    mask_dir = ctx.out_dir / "masks"
    mask_dir.mkdir(parents=True, exist_ok=True)
    remap_items = tuple(sorted(remap.items()))
    tasks = [
        NpzTask(str(it.path), str(mask_dir / f"{it.sample_id}.png"), ctx.max_pixels, remap_items)
        for it in items
    ]
    # Small chunks: an npz is megabytes of work, and the demo has only tens of them per worker.
    chunksize = max(1, min(16, len(tasks) // (resolve_jobs(ctx.jobs) * 4)))
    results: list[NpzResult | NpzProblem] = []
    with bar(total=len(tasks), desc="coasttrain npz", unit="npz") as progress:
        for result in parallel_map(
            _process, tasks, jobs=ctx.jobs, chunksize=chunksize, scheduler=ctx.scheduler
        ):
            results.append(result)
            progress.update(1)

    written = {Path(t.mask_path).name for t, r in zip(tasks, results) if isinstance(r, NpzResult)}
    for stale in mask_dir.glob("*.png"):
        if stale.name not in written:
            stale.unlink()  # the mask of an npz that is gone, or quarantined now

    # Metadata before rows: an npz without a CSV row borrows the spatial block of its scene's tiles.
    metas = {it.sample_id: _metadata(csv_paths[it.record].name, it.row) if it.row else None for it in items}
    scene_blocks: dict[tuple[str, str], set[str]] = defaultdict(set)
    for it, result in zip(items, results):
        meta = metas[it.sample_id]
        if isinstance(result, NpzResult) and meta and meta.lat is not None and meta.lon is not None:
            scene_blocks[(it.record, scene_key(it.path.stem))].add(spatial_block(meta.lat, meta.lon, degrees))

    names = [*COMMON_CLASSES, "ignore"]
    class_images: Counter[str] = Counter()
    class_pixels: Counter[str] = Counter()
    unknown_classes: Counter[str] = Counter()
    per_record: dict[str, Counter[str]] = defaultdict(Counter)
    joined = without_row = 0
    for it, result in zip(items, results):
        upstream_id = f"{it.record}/{it.member}"
        per_record[it.record]["npz"] += 1
        if isinstance(result, NpzProblem):
            tables.reject("image", upstream_id, ctx.rel(it.path), result.reason, result.detail)
            per_record[it.record][f"quarantined_{result.reason}"] += 1
            unknown_classes.update(result.unknown_classes)
            if it.row_id is not None:
                tables.reject(
                    "annotation_row",
                    it.row_id,
                    ctx.rel(csv_paths[it.record]),
                    "image_unusable",
                    f"its npz {upstream_id} was quarantined: {result.reason}",
                )
            continue
        meta = metas[it.sample_id]
        scene = scene_key(it.path.stem)
        if meta is not None:
            joined += 1
        else:
            without_row += 1
        if meta is not None and meta.lat is not None and meta.lon is not None:
            block = spatial_block(meta.lat, meta.lon, degrees)
        elif scene_blocks.get((it.record, scene)):
            # min, not "most common": a fixed rule that reads only the scene's own tiles.
            block = min(scene_blocks[(it.record, scene)])
        else:
            block = schema.make_sample_id("scene", it.record, scene)
        total = max(1, sum(result.pixels))
        common_present = [c for c, n in zip(COMMON_CLASSES, result.pixels) if n > 0]
        labels = {
            "classes": list(COMMON_CLASSES),
            "ignore_index": IGNORE,
            "pixels": dict(zip(names, result.pixels)),
            "fractions": {n: round(count / total, 6) for n, count in zip(names, result.pixels)},
            "present": common_present,
        }
        native = {
            "record": it.record,
            "npz": it.member,
            "classes": list(result.classes),
            "classes_present": [result.classes[k] for k in result.present],
            "label_channels": result.channels,
            "csv": meta.csv_name if meta else None,
            "geo": meta.geo if meta else None,
        }
        tables.add_sample(
            {
                "sample_id": it.sample_id,
                "upstream_id": upstream_id,
                "image_path": ctx.rel(it.path),
                "image_format": "npz",
                "width": result.width,
                "height": result.height,
                "file_size": result.file_size,
                "file_sha256": result.file_sha256,
                "pixel_sha256": result.pixel_sha256,
                "phash": result.phash,
                "session": f"{it.record}/{scene}",
                "spatial_block": block,
                "captured_at": meta.captured_at if meta else None,
                "lat": meta.lat if meta else None,
                "lon": meta.lon if meta else None,
                "license": license_,
                "attribution": attribution,
                "native_labels": dumps_labels(native),
                "labels": dumps_labels(labels),
                "mask_path": ctx.out_rel(mask_dir / f"{it.sample_id}.png"),
            }
        )
        per_record[it.record]["samples"] += 1
        class_images.update(common_present)
        class_pixels.update(dict(zip(names, result.pixels)))

    samples = len(tables.samples)
    # Crosswalk coverage: of the npz whose label decoded, how many had every class in the table.
    labelled = samples + sum(1 for r in results if isinstance(r, NpzProblem) and r.reason == "unknown_class")
    extra = {
        "inputs": {"npz": npz_found, "csv_rows": csv_rows},
        "csv_rows_joined": joined,
        "npz_without_csv_row": without_row,
        "crosswalk": {
            "mapped": samples,
            "total": labelled,
            "ratio": round(samples / labelled, 6) if labelled else 1.0,
        },
        "unknown_classes": dict(sorted(unknown_classes.items())),
        "classes": dict(sorted(class_images.items())),
        "class_pixels": dict(sorted(class_pixels.items())),
        "records": {r: dict(sorted(c.items())) for r, c in sorted(per_record.items())},
        "block_degrees": degrees,
    }
    return tables, extra
