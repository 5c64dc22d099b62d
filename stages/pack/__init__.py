"""pack@<product>: reproducible, content-defined WebDataset shards for one product of params.yaml.

`python -m stages.pack <product>` reads the ingest tables of the product's sources
(`data/interim/<source>/`), the dedup clusters and the split assignments, and writes
`data/release/<product>/` (shards, one wids index per split, manifest.parquet, classes.json,
product.json; see stages/pack/index.py) and `metrics/pack/<product>.json`. docs/pack.md is the
user-facing description; in short:

- Membership is `stages.products` (the same rules the split stage counts with).
- One product module per kind turns a *work unit* into samples: reef-points (one unit = one
  image and all its points, so an image is decoded once however many patches it gives),
  reef-images, coast-seg and inat2017 (one unit = one sample).
- Units of a split are ordered by a hash of their key and cut into shards where a second hash
  says so, between a minimum and a maximum size (stages/pack/sharding.py). Optionally a ledger
  of generations puts the units of earlier releases first (see `load_generations`).
- Workers of `stages.executor.parallel_map` decode, crop/resize and encode units and return
  each sample already serialised as tar bytes; the main process appends them to the current
  shard in order and decides the cuts. Results come back in input order with a bounded number in
  flight, so memory stays flat and the bytes do not depend on scheduling.

Labels and class indices are computed here in the main process and travel to the workers as
ready JSON bytes: workers only do pixel work, and the JSON can't differ between backends.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from stages import products as prod
from stages.card import write_docs
from stages.config import require
from stages.errors import ConfigError, TidepoolError, UpstreamFormatError
from stages.executor import executor_settings, parallel_map
from stages.fsutil import atomic_path, write_json, write_parquet
from stages.pack import index as idx
from stages.pack.sharding import SALT, Cutter, ShardSizes, key_hashes
from stages.pack.tarwriter import TarWriter
from stages.progress import bar

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
KINDS = {
    "reef-points": "stages.pack.reef_points",
    "reef-images": "stages.pack.reef_images",
    "coast-seg": "stages.pack.coast_seg",
    "inat2017": "stages.pack.inat2017",
}
IMAGE_FORMATS = {"png": "png", "jpg": "jpg", "jpeg": "jpg"}
JPEG_SUBSAMPLING = 2  # 4:2:0, libjpeg's default, pinned so a Pillow default change can't move bytes
RESAMPLE = Image.Resampling.LANCZOS
LEDGER_SCHEMA = pa.schema([("key", pa.string()), ("generation", pa.int32())])


# --- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSettings:
    """How pixels become bytes. Fixed by params so two builds encode identically."""

    image_format: str  # png | jpg
    jpeg_quality: int
    png_compress_level: int
    max_side: int | None  # bound on the longer side; None keeps the original size
    max_pixels: int  # decompression-bomb bound (limits.max_image_pixels)

    @property
    def ext(self) -> str:
        return self.image_format


@dataclass(frozen=True)
class Settings:
    product: str
    kind: str
    label_level: str
    patch_size: int | None
    image: ImageSettings
    shard: ShardSizes
    ledger: str | None  # path of the generations ledger, relative to the repo root


def _int_param(
    spec: dict[str, Any], key: str, default: int | None, lo: int, hi: int, where: str
) -> int | None:
    value = spec.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"params.yaml: {where}.{key} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def product_settings(params: dict[str, Any], name: str) -> tuple[prod.Product, Settings]:
    """The product declared as `products.<name>`, validated, with its pack settings."""
    declared = {p.name: p for p in prod.products_from_params(params)}
    if name not in declared:
        raise ConfigError(f"params.yaml: no product {name!r}; declared: {sorted(declared)}")
    product = declared[name]
    spec = require(params, f"products.{name}")
    where = f"products.{name}"
    kind = spec.get("kind", name)
    if kind not in KINDS:
        raise ConfigError(f"params.yaml: {where}.kind must be one of {sorted(KINDS)} (default: the name)")
    fmt = spec.get("image_format", "png" if kind in ("reef-points", "coast-seg") else "jpg")
    if fmt not in IMAGE_FORMATS:
        raise ConfigError(f"params.yaml: {where}.image_format must be png or jpg, got {fmt!r}")
    # inat2017 calls its bound `resize` (null = upstream bytes unchanged); the others `max_side`.
    max_side = _int_param(spec, "max_side", None, 1, 1 << 20, where)
    if "resize" in spec:
        max_side = _int_param(spec, "resize", None, 1, 1 << 20, where)
    patch_size = _int_param(spec, "patch_size", 224, 1, 4096, where) if product.unit == "point" else None
    image = ImageSettings(
        image_format=IMAGE_FORMATS[fmt],
        jpeg_quality=_int_param(spec, "jpeg_quality", 90, 1, 100, where) or 90,
        png_compress_level=_int_param(spec, "png_compress_level", 6, 0, 9, where) or 0,
        max_side=max_side,
        max_pixels=int(require(params, "limits.max_image_pixels")),
    )
    ledger = spec.get("ledger")
    if ledger is not None and not isinstance(ledger, str):
        raise ConfigError(f"params.yaml: {where}.ledger must be a path or null")
    settings = Settings(
        product=name,
        kind=kind,
        label_level=product.label_level,
        patch_size=patch_size,
        image=image,
        shard=ShardSizes.from_spec(spec.get("shard"), where=f"{where}.shard"),
        ledger=ledger,
    )
    return product, settings


@dataclass(frozen=True)
class PackContext:
    params: dict[str, Any]
    product: prod.Product
    settings: Settings
    root: Path  # repo root: image_path / mask_path in the tables are relative to it

    @property
    def taxonomy_dir(self) -> Path:
        return self.root / "data" / "taxonomy"

    def interim(self, source: str) -> Path:
        return self.root / "data" / "interim" / source

    def path(self, rel: str) -> Path:
        return self.root / rel

    def source_params(self, source: str) -> dict[str, Any]:
        return dict(require(self.params, f"sources.{source}"))


# --- inputs ------------------------------------------------------------------------------------


def read_table(path: Path, columns: list[str] | None = None, what: str = "table") -> pd.DataFrame:
    """A parquet table as a DataFrame of plain Python objects (None for nulls, never NaN/NA)."""
    if not path.exists():
        raise TidepoolError(f"{path}: missing {what}; run the stage that writes it first")
    try:
        schema = pq.read_schema(path)
        if columns is not None:
            missing = [c for c in columns if c not in schema.names]
            if missing:
                raise UpstreamFormatError(path, f"{what} lacks columns {missing}")
        table = pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowInvalid) as exc:
        raise UpstreamFormatError(path, f"not a readable parquet file ({exc})") from exc
    return pd.DataFrame({c: pd.Series(table.column(c).to_pylist(), dtype=object) for c in table.column_names})


def load_samples(ctx: PackContext, columns: list[str]) -> pd.DataFrame:
    cols = sorted({"sample_id", "source", "labels", "mask_path", "n_points", "phash", *columns})
    frames = [
        read_table(ctx.interim(s) / "samples.parquet", cols, f"sample table of {s}")
        for s in ctx.product.sources
    ]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in cols})
    return pd.concat(frames, ignore_index=True)


def load_assignments(root: Path) -> dict[str, str]:
    path = root / "data" / "split" / "assignments.parquet"
    table = read_table(path, ["sample_id", "split"], "split assignments")
    bad = sorted(set(table["split"]) - set(SPLITS))
    if bad:
        raise UpstreamFormatError(path, f"unknown splits {bad}; expected {list(SPLITS)}")
    return dict(zip(table["sample_id"], table["split"]))


def load_clusters(root: Path) -> pd.DataFrame:
    path = root / "data" / "dedup" / "clusters.parquet"
    return read_table(path, ["sample_id", "cluster_id", "rank"], "dedup clusters")


def parse_json(value: Any, where: str) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except (TypeError, json.JSONDecodeError) as exc:
        raise UpstreamFormatError(where, f"not valid JSON: {exc}") from exc


def _skip_reason(labels: Any, has_mask: bool) -> str:
    """Why prod.usable() refused a sample (mirrors its rules, for the metrics)."""
    if not isinstance(labels, dict):
        return "no_labels"
    if "n_points" in labels:
        return "no_kept_points"
    if "pixels" in labels and "present" in labels and not has_mask:
        return "no_mask"
    return "unusable"


def select_samples(ctx: PackContext, columns: list[str]) -> tuple[pd.DataFrame, dict[str, int]]:
    """The product's samples (stages.products rules) with their `split`, and skip counts by reason."""
    samples = load_samples(ctx, columns)
    clusters = load_clusters(ctx.root)
    selected = prod.product_samples(ctx.product, samples, clusters)
    chosen = set(selected["sample_id"])
    usable = dict(zip(samples["sample_id"], prod.usable(samples)))
    skipped: Counter[str] = Counter()
    for sid, raw, mask in zip(samples["sample_id"], samples["labels"], samples["mask_path"]):
        if sid in chosen:
            continue
        if usable[sid]:
            skipped["duplicate_of_kept_copy"] += 1  # dedup: one, another member of its cluster stays
        else:
            try:
                labels = json.loads(raw) if raw is not None else None
            except json.JSONDecodeError:
                labels = None
            skipped[_skip_reason(labels, mask is not None)] += 1
    assignments = load_assignments(ctx.root)
    missing = [s for s in selected["sample_id"] if s not in assignments]
    if missing:
        raise TidepoolError(
            f"data/split/assignments.parquet has no split for {len(missing)} sample(s) of "
            f"{ctx.settings.product}, e.g. {missing[:3]}; rerun the split stage"
        )
    selected = selected.assign(split=[assignments[s] for s in selected["sample_id"]])
    return selected, dict(sorted(skipped.items()))


def num(value: Any) -> float | int | None:
    """A JSON-safe number: None for null/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


# --- units and encoded samples -----------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One piece of work for a worker: everything it needs, nothing it must look up."""

    key: str  # orders the unit and draws its cut (the image's sample id)
    split: str
    payload: Any


@dataclass(frozen=True)
class SampleOut:
    """One sample as it goes into a shard."""

    key: str
    data: bytes  # the sample's members as tar bytes (tarwriter.sample_bytes)
    row: dict[str, Any]  # manifest fields known before the shard is (see index.MANIFEST_SCHEMA)
    counts: tuple[int, ...] = ()  # class indices this sample counts for in classes.json


@dataclass(frozen=True)
class UnitOut:
    key: str
    split: str
    samples: tuple[SampleOut, ...] = ()
    decodes: int = 0  # images decoded for this unit (the "decode once" bound is checked on it)
    error: str | None = None  # a TidepoolError message from the worker


def guarded(fn: Callable[[Unit], UnitOut], unit: Unit) -> UnitOut:
    """Run a product's encoder on `unit`, turning a TidepoolError into an error result.

    Our error classes take several constructor arguments and do not survive pickling back from a
    worker process; a plain message does, and the main process raises it naming the unit.
    """
    try:
        return fn(unit)
    except TidepoolError as exc:
        return UnitOut(unit.key, unit.split, error=str(exc))


@dataclass
class ProductPlan:
    """What a product module hands the writer."""

    keys: dict[str, list[str]]  # split -> unit keys, any order
    make_unit: Callable[[str, str], Unit]  # (key, split) -> Unit, built lazily in shard order
    encode: Callable[[Unit], UnitOut]  # module-level, picklable
    classes: dict[str, Any]  # classes.json; entries under "classes" get per-split counts
    fields: dict[str, str]  # member extension -> what it holds (product.json, docs)
    skipped: dict[str, int] = field(default_factory=dict)
    chunksize: int = 4
    extra_metrics: dict[str, Any] = field(default_factory=dict)


def sample_json(obj: Any) -> bytes:
    """The `json` member: canonical compact UTF-8 (sorted keys), so equal labels are equal bytes."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode()


def check_key(key: str, where: str) -> str:
    if not key or not key.isascii() or "." in key or "/" in key or any(c.isspace() for c in key):
        raise UpstreamFormatError(where, f"sample key {key!r} is not ASCII without dots, slashes or spaces")
    return key


# --- pixels ------------------------------------------------------------------------------------


def open_image(path: Path, max_pixels: int) -> Image.Image:
    """Decode an image file completely, bounded by `max_pixels`; errors name the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UpstreamFormatError(path, f"cannot read image: {exc}") from exc
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UpstreamFormatError(path, f"image over limits.max_image_pixels: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        # Ingest decoded this file; failing now means it changed or broke since.
        raise UpstreamFormatError(path, f"image does not decode: {exc}") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    return img


def rgb_array(img: Image.Image) -> np.ndarray:
    """HxWx3 uint8, as pyspacer gets it: `convert("RGB")` (palette expanded, alpha dropped, L
    replicated). No EXIF orientation is applied: points are given in stored-raster coordinates."""
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def check_size(rgb: np.ndarray, expected: tuple[int, int], path: Path | str) -> None:
    """Refuse pixels whose (width, height) differ from the sample table's: the file changed after
    ingest, and the points, masks and boxes recorded for it would land in the wrong place."""
    if (rgb.shape[1], rgb.shape[0]) != tuple(expected):
        raise UpstreamFormatError(
            path, f"image is {rgb.shape[1]}x{rgb.shape[0]}, the sample table says {expected[0]}x{expected[1]}"
        )


def fit_max_side(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(w, h) scaled so the longer side is at most `max_side`, integer rounding half up."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    if width >= height:
        return max_side, max(1, (2 * height * max_side + width) // (2 * width))
    return max(1, (2 * width * max_side + height) // (2 * height)), max_side


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (rgb.shape[1], rgb.shape[0]) == size:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize(size, RESAMPLE, reducing_gap=None))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour: class ids must stay class ids."""
    if (mask.shape[1], mask.shape[0]) == size:
        return mask
    return np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))


def encode_rgb(rgb: np.ndarray, settings: ImageSettings) -> bytes:
    """Encode pixels with the product's fixed settings. The image is rebuilt from the array, so
    no metadata of the source (EXIF, ICC profile, text chunks) reaches the shard."""
    img = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    buf = io.BytesIO()
    if settings.image_format == "png":
        img.save(buf, "PNG", compress_level=settings.png_compress_level, optimize=False)
    else:
        img.save(
            buf,
            "JPEG",
            quality=settings.jpeg_quality,
            subsampling=JPEG_SUBSAMPLING,
            optimize=False,
            progressive=False,
        )
    return buf.getvalue()


def encode_mask(mask: np.ndarray, settings: ImageSettings) -> bytes:
    """`seg.png`: PNG mode L holding the class ids."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), "L").save(
        buf, "PNG", compress_level=settings.png_compress_level, optimize=False
    )
    return buf.getvalue()


def load_mask(path: Path, size: tuple[int, int], max_pixels: int) -> np.ndarray:
    """A class-id mask (PNG mode L) that must match the image size (w, h)."""
    img = open_image(path, max_pixels)
    if img.mode != "L":
        raise UpstreamFormatError(path, f"mask must be PNG mode L (class ids), found mode {img.mode}")
    if img.size != size:
        raise UpstreamFormatError(path, f"mask is {img.size[0]}x{img.size[1]}, image is {size[0]}x{size[1]}")
    return np.asarray(img)


# --- generations ledger (optional) -------------------------------------------------------------


def load_generations(path: Path | None) -> dict[str, int]:
    """unit key -> generation from the ledger; {} without one.

    Hash order spreads new units over every shard, so with many samples per shard a 1% growth
    touches nearly all of them (docs/pack.md). With a ledger, units of earlier releases keep
    their generation and come first; new ones (generation max+1) follow in their own shards, so
    a release rewrites the tail shard of each split and adds new ones.
    """
    if path is None or not path.exists():
        return {}
    table = read_table(path, ["key", "generation"], "pack ledger")
    if table["key"].duplicated().any():
        raise UpstreamFormatError(path, "ledger lists a key twice")
    return {str(k): int(g) for k, g in zip(table["key"], table["generation"])}


def updated_generations(old: dict[str, int], keys: list[str]) -> pa.Table:
    """The ledger after this build: old entries kept, new keys at generation max+1."""
    new_gen = (max(old.values()) + 1) if old else 0
    merged = dict(old)
    for key in keys:
        merged.setdefault(key, new_gen)
    items = sorted(merged.items())
    return pa.table({"key": [k for k, _ in items], "generation": [g for _, g in items]}, schema=LEDGER_SCHEMA)


def record_generations(params: dict[str, Any], name: str, root: Path, out_dir: Path | None = None) -> Path:
    """Write the ledger of product `name` after a release: every unit of the built release's manifest
    keeps its generation, units new in this release get max+1. Returns the ledger's path.

    The order a build used for unrecorded units is already max+1, so recording does not change it:
    packing again with the updated ledger gives the same shards.
    """
    _, settings = product_settings(params, name)
    if not settings.ledger:
        raise ConfigError(f"params.yaml: products.{name}.ledger is not set; there is no ledger to update")
    out_dir = out_dir or root / "data" / "release" / name
    manifest = read_table(out_dir / idx.MANIFEST, ["split", "sample_id"], f"manifest of {name}")
    keys = list(dict.fromkeys(manifest["sample_id"]))  # unit keys (the image for reef-points), in order
    path = root / settings.ledger
    write_parquet(path, updated_generations(load_generations(path), keys))
    return path


def shard_order(keys: list[str], generations: dict[str, int]) -> list[str]:
    """Keys in shard order: (generation, order hash, key); without a ledger every generation is 0."""
    newest = (max(generations.values()) + 1) if generations else 0
    return sorted(keys, key=lambda k: (generations.get(k, newest), key_hashes(k)[0], k))


# --- the writer --------------------------------------------------------------------------------


class _Shard:
    def __init__(self, out_dir: Path, split: str, number: int) -> None:
        self.name = idx.shard_name(split, number)
        self._ctx = atomic_path(out_dir / self.name)
        self._fh = open(self._ctx.__enter__(), "wb")  # noqa: SIM115 - closed in finish/abort
        self.tar = TarWriter(self._fh)

    def finish(self) -> idx.ShardInfo:
        md5 = self.tar.close()
        self._fh.close()
        self._ctx.__exit__(None, None, None)
        return idx.ShardInfo(self.name, self.tar.samples, self.tar.size, md5)

    def abort(self, exc: BaseException) -> None:
        self._fh.close()
        self._ctx.__exit__(type(exc), exc, exc.__traceback__)


@dataclass
class WriteResult:
    shards: dict[str, list[idx.ShardInfo]]
    samples: dict[str, int]
    units: dict[str, int]
    decodes: int
    forced_cuts: int
    oversize_units: int
    counts: dict[str, Counter[int]]


def write_shards(
    plan: ProductPlan,
    order: dict[str, list[str]],
    out_dir: Path,
    sizes: ShardSizes,
    jobs: int | None,
    scheduler: str | None,
    desc: str,
) -> WriteResult:
    """Encode the units in parallel, in `order`, and append them to content-defined shards."""

    def units() -> Iterator[Unit]:
        for split in SPLITS:
            for key in order.get(split, []):
                yield plan.make_unit(key, split)

    total_units = sum(len(v) for v in order.values())
    result = WriteResult(
        {s: [] for s in SPLITS}, Counter(), Counter(), 0, 0, 0, {s: Counter() for s in SPLITS}
    )
    manifest = idx.ManifestWriter(out_dir / idx.MANIFEST)
    shard: _Shard | None = None
    split: str | None = None
    cutter = Cutter(sizes)
    number = 0
    try:
        with bar(total=total_units, desc=desc, unit="unit") as progress:
            results = parallel_map(
                plan.encode, units(), jobs=jobs, chunksize=plan.chunksize, scheduler=scheduler
            )
            for out in results:
                if out.error:
                    raise TidepoolError(f"{desc}: unit {out.key}: {out.error}")
                if out.split != split:
                    if shard is not None:
                        result.shards[split].append(shard.finish())  # type: ignore[index]
                        shard = None
                    result.forced_cuts += cutter.forced
                    split, cutter, number = out.split, Cutter(sizes), 0
                nbytes = sum(len(s.data) for s in out.samples)
                progress.update(1)
                result.units[split] += 1
                result.decodes += out.decodes
                if not out.samples:
                    continue
                if cutter.before(nbytes) and shard is not None:
                    result.shards[split].append(shard.finish())
                    shard = None
                if nbytes > sizes.max_bytes:
                    result.oversize_units += 1
                if shard is None:
                    shard = _Shard(out_dir, split, number)
                    number += 1
                for sample in out.samples:
                    position = shard.tar.samples
                    offset = shard.tar.write_sample(sample.data)
                    manifest.add(
                        {
                            **sample.row,
                            "key": sample.key,
                            "split": split,
                            "shard": shard.name,
                            "position": position,
                            "offset": offset,
                            "nbytes": len(sample.data),
                        }
                    )
                    result.samples[split] += 1
                    result.counts[split].update(sample.counts)
                if cutter.after(key_hashes(out.key)[1], nbytes):
                    result.shards[split].append(shard.finish())
                    shard = None
            result.forced_cuts += cutter.forced
        if shard is not None:
            result.shards[split].append(shard.finish())  # type: ignore[index]
            shard = None
        manifest.close()
    except BaseException as exc:
        if shard is not None:
            shard.abort(exc)
        manifest.abort(exc)
        raise
    return result


def _remove_stale(out_dir: Path, keep: set[str]) -> list[str]:
    """Delete shards, indexes and temp files of earlier runs that this run did not write."""
    removed = []
    for path in sorted(out_dir.iterdir()):
        name = path.name
        ours = (
            name.endswith(".tar")
            or name.endswith(".index.json")
            or (name.startswith(".") and name.endswith(".tmp"))
            or name in (idx.MANIFEST, idx.CLASSES, idx.PRODUCT)
        )
        if ours and name not in keep and path.is_file():
            path.unlink()
            removed.append(name)
    return removed


def _with_counts(classes: dict[str, Any], counts: dict[str, Counter[int]]) -> dict[str, Any]:
    out = dict(classes)
    entries = []
    for entry in classes.get("classes", []):
        i = entry["index"]
        entries.append({**entry, "count": {s: counts[s].get(i, 0) for s in SPLITS}})
    out["classes"] = entries
    return out


def licence_terms(ctx: PackContext) -> dict[str, Any]:
    sources = {}
    for source in ctx.product.sources:
        sp = ctx.source_params(source)
        sources[source] = {
            "license": sp.get("license"),
            "attribution": sp.get("attribution"),
            # A source is redistributable unless its params say otherwise (iNat 2017 does).
            "redistributable": bool(sp.get("redistributable", True)),
        }
    return sources


def pack_product(
    params: dict[str, Any],
    name: str,
    root: Path,
    out_dir: Path | None = None,
    metrics_path: Path | None = None,
    jobs: int | None = None,
    scheduler: str | None = None,
    plots_dir: Path | None = None,
) -> dict[str, Any]:
    """Build `data/release/<name>/` (shards, indexes, manifest, class map, product.json, then the
    card and Croissant file of stages.card), `metrics/pack/<name>.json` and the class-count plot
    data (`metrics/plots/classes/<name>.csv`); returns the metrics."""
    product, settings = product_settings(params, name)
    ctx = PackContext(params, product, settings, root)
    out_dir = out_dir or root / "data" / "release" / name
    metrics_path = metrics_path or root / "metrics" / "pack" / f"{name}.json"
    default_jobs, default_scheduler = executor_settings(params)
    jobs = jobs or default_jobs
    scheduler = scheduler if scheduler is not None else default_scheduler

    module = importlib.import_module(KINDS[settings.kind])
    plan: ProductPlan = module.plan(ctx)
    ledger_path = root / settings.ledger if settings.ledger else None
    generations = load_generations(ledger_path)
    order = {split: shard_order(plan.keys.get(split, []), generations) for split in SPLITS}

    out_dir.mkdir(parents=True, exist_ok=True)
    written = write_shards(plan, order, out_dir, settings.shard, jobs, scheduler, f"pack {name}")
    for split in SPLITS:
        idx.write_index(out_dir, name, split, written.shards[split])
    idx.write_classes(out_dir, _with_counts(plan.classes, written.counts))
    terms = licence_terms(ctx)
    redistributable = all(t["redistributable"] for t in terms.values())
    split_summary = {
        split: {
            "samples": written.samples[split],
            "units": written.units[split],
            "shards": len(written.shards[split]),
            "bytes": sum(s.filesize for s in written.shards[split]),
            "index": idx.index_name(split),
        }
        for split in SPLITS
    }
    spec = dict(require(params, f"products.{name}"))
    card = {
        "product": name,
        "kind": settings.kind,
        "sources": terms,
        "redistributable": redistributable,
        "licenses": sorted({str(t["license"]) for t in terms.values()}),
        "fields": plan.fields,
        "splits": split_summary,
        "params": spec,
        "encoding": {
            "image_format": settings.image.image_format,
            "jpeg_quality": settings.image.jpeg_quality,
            "jpeg_subsampling": "4:2:0",
            "png_compress_level": settings.image.png_compress_level,
            "max_side": settings.image.max_side,
            "patch_size": settings.patch_size,
            "pillow": Image.__version__,
        },
        "sharding": {
            # Describes the configuration, not the ledger's contents: recording a release in the
            # ledger leaves the order unchanged, so it must leave this file unchanged too.
            "order": "sha256(salt + unit key)[0:8]"
            + (", after the ledger's generation (units not yet in it last)" if settings.ledger else ""),
            "cut": "sha256(salt + unit key)[8:16] / 2^64 < unit bytes / (target_bytes - min_bytes), "
            "once the shard holds min_bytes; forced before max_bytes",
            "salt": SALT.rstrip(b"\0").decode(),
            "unit": "image (all points of an image together)" if product.unit == "point" else "sample",
            "min_bytes": settings.shard.min_bytes,
            "target_bytes": settings.shard.target_bytes,
            "max_bytes": settings.shard.max_bytes,
            "ledger": settings.ledger,
        },
        "format": "WebDataset: POSIX ustar (pax header for names over 100 bytes), members sorted per sample, "
        "mtime 0, uid/gid 0, mode 0644",
        "manifest": idx.MANIFEST,
        "class_map": idx.CLASSES,
    }
    idx.write_product(out_dir, card)
    keep = {s.name for shards in written.shards.values() for s in shards}
    keep |= {idx.index_name(s) for s in SPLITS} | {idx.MANIFEST, idx.CLASSES, idx.PRODUCT}
    removed = _remove_stale(out_dir, keep)
    if removed:
        log.info("%s: removed %d files of an earlier build", out_dir, len(removed))

    all_shards = [s for split in SPLITS for s in written.shards[split]]
    sizes = [s.filesize for s in all_shards]
    metrics = {
        "product": name,
        "samples": sum(written.samples.values()),
        "units": sum(written.units.values()),
        "images_decoded": written.decodes,
        "shards": len(all_shards),
        "bytes": sum(sizes),
        "by_split": {s: {k: v for k, v in split_summary[s].items() if k != "index"} for s in SPLITS},
        "shard_bytes": {
            "min": min(sizes) if sizes else 0,
            "mean": round(sum(sizes) / len(sizes)) if sizes else 0,
            "max": max(sizes) if sizes else 0,
        },
        "forced_cuts": written.forced_cuts,
        "oversize_units": written.oversize_units,
        "skipped": plan.skipped,
        "skipped_total": sum(plan.skipped.values()),
        "classes_present": len(set().union(*written.counts.values())),
        "redistributable": redistributable,
        **plan.extra_metrics,
    }
    write_json(metrics_path, metrics)
    # The dataset card and Croissant file sit beside the shards (stages/card/ reads only what
    # was just written, plus the quarantine and dedup tables), so `dvc import` of the product
    # brings them along.
    plots_dir = plots_dir or root / "metrics" / "plots" / "classes"
    write_docs(out_dir, root, params, metrics, plots_file=plots_dir / f"{name}.csv")
    return metrics
