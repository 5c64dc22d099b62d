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
import json
import logging
import math
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages import products as prod
from stages.cache import open_cache, write_stats
from stages.card import write_docs
from stages.config import require
from stages.errors import ConfigError, TidepoolError, UpstreamFormatError
from stages.executor import Executor, executor_settings
from stages.fsutil import write_json, write_parquet
from stages.pack import index as idx
from stages.pack.codec import (  # noqa: F401 - re-exported: the product modules and bench import them here
    IMAGE_FORMATS,
    JPEG_SUBSAMPLING,
    RESAMPLE,
    ImageSettings,
    check_size,
    codec_versions,
    cut_patch,
    decode_for_size,
    encode_mask,
    encode_rgb,
    fit_max_side,
    load_mask,
    open_image,
    resize_mask,
    resize_rgb,
    rgb_array,
)
from stages.pack.reuse import (
    PREVIOUS_DIR,
    ShardStore,
    UnitCache,
    digest,  # noqa: F401 - re-exported for the product modules
    namespace,
    unit_code_version,
)
from stages.pack.sharding import SALT, ShardSizes, key_hashes
from stages.pack.units import (  # noqa: F401 - re-exported
    ProductPlan,
    SampleOut,
    SampleRow,
    Unit,
    UnitOut,
    guarded,
)
from stages.pack.writer import SPLITS, ClassCounts, write_shards

log = logging.getLogger(__name__)

KINDS = {
    "reef-points": "stages.pack.reef_points",
    "reef-images": "stages.pack.reef_images",
    "coast-seg": "stages.pack.coast_seg",
    "inat2017": "stages.pack.inat2017",
}
# The measured default (docs/pack.md "Patch codec"): lossless WebP at libwebp's fastest method is
# 2.5-7x faster than PNG level 6 on patches of real photos and 20-30% smaller.
DEFAULT_FORMAT = {"reef-points": "webp", "coast-seg": "webp", "reef-images": "jpg", "inat2017": "jpg"}
FORMATS_BY_KIND = {
    "reef-points": ("png", "webp", "jpg"),
    "coast-seg": ("png", "webp", "jpg"),
    "reef-images": ("png", "webp", "jpg"),
    "inat2017": ("jpg",),  # upstream JPEG bytes, re-encoded as JPEG only when resized
}
LAYOUTS = ("patches", "images")
LEDGER_SCHEMA = pa.schema([("key", pa.string()), ("generation", pa.int32())])


# --- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    product: str
    kind: str
    label_level: str
    patch_size: int | None
    image: ImageSettings
    shard: ShardSizes
    ledger: str | None  # path of the generations ledger, relative to the repo root
    layout: str = "patches"  # reef-points: patches (one sample per point) | images (one per image)


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
    fmt = spec.get("image_format", DEFAULT_FORMAT[kind])
    allowed = FORMATS_BY_KIND[kind]
    if fmt not in IMAGE_FORMATS or IMAGE_FORMATS[fmt] not in allowed:
        raise ConfigError(f"params.yaml: {where}.image_format must be one of {list(allowed)}, got {fmt!r}")
    layout = spec.get("layout", "patches")
    if layout not in LAYOUTS or (layout != "patches" and kind != "reef-points"):
        raise ConfigError(
            f"params.yaml: {where}.layout must be one of {list(LAYOUTS)} (reef-points only), got {layout!r}"
        )
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
        webp_method=_int_param(spec, "webp_method", 0, 0, 6, where) or 0,
        webp_quality=_int_param(spec, "webp_quality", 0, 0, 100, where) or 0,
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
        layout=layout,
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


def read_arrow(
    path: Path, columns: list[str], what: str = "table", dictionary: tuple[str, ...] = ()
) -> pa.Table:
    """A parquet table kept in Arrow, the `dictionary` columns dictionary-encoded (a repeated
    label costs 4 bytes a row instead of a string object); errors name the file."""
    if not path.exists():
        raise TidepoolError(f"{path}: missing {what}; run the stage that writes it first")
    try:
        schema = pq.read_schema(path)
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise UpstreamFormatError(path, f"{what} lacks columns {missing}")
        return pq.read_table(path, columns=columns, read_dictionary=[c for c in dictionary if c in columns])
    except (OSError, pa.ArrowInvalid) as exc:
        raise UpstreamFormatError(path, f"not a readable parquet file ({exc})") from exc


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


def release_memory() -> None:
    """Hand freed memory back to the OS after a planning phase.

    Arrow's allocator keeps freed buffers for reuse, and glibc keeps the pages of freed strings
    (the labels JSON of a batch) when live objects sit between them. Neither is a leak, but both
    stack up under the next phase's peak: measured at 1M points, 250 MiB -> 166 MiB after the
    membership pass. Best effort: a no-op where there is no glibc.
    """
    pa.default_memory_pool().release_unused()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


BATCH_ROWS = 1024  # labels parsed a batch at a time: a parsed labels dict is ~6x its JSON


def _membership(ctx: PackContext) -> tuple[pd.DataFrame, dict[str, int]]:
    """sample_id, source, mask_path, phash of every sample of the product's sources with a `usable`
    flag (stages.products rules), read in record batches so that the labels JSON, the largest column,
    is never held for the whole table; and the skip reasons of the unusable ones."""
    parts: list[pd.DataFrame] = []
    skipped: Counter[str] = Counter()
    base = ["sample_id", "source", "labels", "mask_path", "phash"]
    for source in ctx.product.sources:
        path = ctx.interim(source) / "samples.parquet"
        read_arrow(path, base, f"sample table of {source}").schema  # noqa: B018 - checks file and columns
        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=base)
            for batch in batches:
                frame = pd.DataFrame({c: pd.Series(batch.column(c).to_pylist(), dtype=object) for c in base})
                ok = prod.usable(frame)
                for raw, mask in zip(frame["labels"][~ok], frame["mask_path"][~ok]):
                    try:
                        labels = json.loads(raw) if raw is not None else None
                    except json.JSONDecodeError:
                        labels = None
                    skipped[_skip_reason(labels, mask is not None)] += 1
                parts.append(frame.drop(columns=["labels"]).assign(usable=ok))
        except (OSError, pa.ArrowInvalid) as exc:
            raise UpstreamFormatError(path, f"not a readable parquet file ({exc})") from exc
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in [*base[:2], *base[3:], "usable"]}), {}
    return pd.concat(parts, ignore_index=True), dict(skipped)


def _members(ctx: PackContext, light: pd.DataFrame, clusters: pd.DataFrame) -> list[str]:
    """The sample ids in the product, sorted: stages.products.select_samples (the rule the split
    stage counts with: sources, usable, keep policy) over the light columns."""
    ids = light["sample_id"].astype(str).to_numpy(dtype=object)
    facts = prod.facts_from_frame(light, usable=light["usable"].to_numpy(dtype=bool))
    members = prod.ClusterMembers.from_frame(clusters, pd.Index(ids))
    return sorted(ids[prod.select_samples(ctx.product, facts, members)].tolist())


def select_samples(
    ctx: PackContext, columns: list[str], labels: bool = True
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The product's samples (stages.products rules) with their `split`, and skip counts by reason.

    Membership is decided on light columns read batch by batch; only the selected rows of `columns`
    (plus sample_id, source, mask_path, n_points, phash, and `labels` unless `labels=False`) become
    Python objects, one dict per image at most: never one per point.
    """
    light, skipped_unusable = _membership(ctx)
    release_memory()
    clusters = load_clusters(ctx.root)
    chosen_ids = _members(ctx, light, clusters)
    chosen = set(chosen_ids)
    skipped: Counter[str] = Counter(skipped_unusable)
    skipped["duplicate_of_kept_copy"] += int(light["usable"].to_numpy(dtype=bool).sum()) - len(chosen)
    if not skipped["duplicate_of_kept_copy"]:
        del skipped["duplicate_of_kept_copy"]
    del light
    extra = ["labels"] if labels else []
    cols = sorted({"sample_id", "source", "mask_path", "n_points", "phash", *columns, *extra})
    wanted = pa.array(chosen_ids, pa.string())
    frames = []
    for source in ctx.product.sources:
        table = read_arrow(ctx.interim(source) / "samples.parquet", cols, f"sample table of {source}")
        table = table.filter(pc.is_in(table.column("sample_id"), value_set=wanted))
        if table.num_rows:
            columns_py = {c: pd.Series(table.column(c).to_pylist(), dtype=object) for c in cols}
            frames.append(pd.DataFrame(columns_py))
        del table
    release_memory()
    if frames:
        selected = pd.concat(frames, ignore_index=True).sort_values("sample_id", kind="stable")
        selected = selected.reset_index(drop=True)
    else:
        selected = pd.DataFrame({c: pd.Series(dtype=object) for c in cols})
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


def manifest_facts(row: dict[str, Any]) -> dict[str, Any]:
    """The manifest's typed columns every product takes from its sample-table row."""
    return {
        "attribution": row.get("attribution"),
        "width": int(row["width"]) if num(row.get("width")) is not None else None,
        "height": int(row["height"]) if num(row.get("height")) is not None else None,
        "lat": num(row.get("lat")),
        "lon": num(row.get("lon")),
        "captured_at": row.get("captured_at"),
        "site": row.get("site"),
    }


# --- samples ----------------------------------------------------------------------------------


def sample_json(obj: Any) -> bytes:
    """The `json` member: canonical compact UTF-8 (sorted keys), so equal labels are equal bytes."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode()


def check_key(key: str, where: str) -> str:
    if not key or not key.isascii() or "." in key or "/" in key or any(c.isspace() for c in key):
        raise UpstreamFormatError(where, f"sample key {key!r} is not ASCII without dots, slashes or spaces")
    return key


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


# --- outputs ------------------------------------------------------------------------------------


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


def _with_counts(classes: dict[str, Any], counts: ClassCounts) -> dict[str, Any]:
    out = dict(classes)
    entries = []
    for entry in classes.get("classes", []):
        i = entry["index"]
        entries.append({**entry, "count": {s: counts.get(s, i) for s in SPLITS}})
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


def unit_settings(settings: Settings) -> dict[str, Any]:
    """The settings that shape a unit's bytes (part of its work key), whatever the product."""
    return {
        "kind": settings.kind,
        "image": settings.image.describe(),
        "mask_png_compress_level": settings.image.png_compress_level,
        "max_pixels": settings.image.max_pixels,
        "patch_size": settings.patch_size,
        "layout": settings.layout,
        "label_level": settings.label_level,
    }


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
    if not plan.num_classes:
        plan.num_classes = int(plan.classes.get("num_classes") or 0)
    ledger_path = root / settings.ledger if settings.ledger else None
    generations = load_generations(ledger_path)
    order = {split: shard_order(plan.keys.get(split, []), generations) for split in SPLITS}

    out_dir.mkdir(parents=True, exist_ok=True)
    cache = open_cache(namespace(settings.kind), root)
    units = UnitCache(
        cache,
        settings.kind,
        unit_code_version(KINDS[settings.kind], plan.code_modules),
        {**unit_settings(settings), **plan.settings},
    )
    store = ShardStore(out_dir, root, name) if cache.enabled else None
    moved = store.set_aside() if store is not None else 0
    with Executor(jobs, scheduler) as executor:
        written = write_shards(
            plan, order, out_dir, settings.shard, executor, f"pack {name}", cache=units, store=store
        )
    for split in SPLITS:
        # An empty split gets no index: wids refuses an index with no shards ("No shards found"),
        # and a missing file says "no such split" to every reader alike.
        if written.shards[split]:
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
            "index": idx.index_name(split) if written.shards[split] else None,
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
            **settings.image.describe(),
            "lossless": settings.image.lossless,
            "patch_size": settings.patch_size,
            "layout": settings.layout if settings.kind == "reef-points" else None,
            "mask_png_compress_level": settings.image.png_compress_level,
            **{k: v for k, v in codec_versions().items() if v is not None},
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
        "format": "WebDataset: POSIX ustar (member names within the 100-byte name field: keys over 84 bytes "
        "shortened with a digest), members sorted per sample, "
        "mtime 0, uid/gid 0, mode 0644",
        "manifest": idx.MANIFEST,
        "class_map": idx.CLASSES,
    }
    idx.write_product(out_dir, card)
    keep = {s.name for shards in written.shards.values() for s in shards}
    keep |= {idx.index_name(s) for s in SPLITS if written.shards[s]}
    keep |= {idx.MANIFEST, idx.CLASSES, idx.PRODUCT}
    removed = _remove_stale(out_dir, keep)
    if removed:
        log.info("%s: removed %d files of an earlier build", out_dir, len(removed))
    if store is not None:
        store.discard_previous()
    elif (out_dir / PREVIOUS_DIR).is_dir():  # left by an interrupted cached build
        shutil.rmtree(out_dir / PREVIOUS_DIR, ignore_errors=True)
    stats = dict(sorted(written.stats.items()))
    write_stats(
        f"pack@{name}",
        [cache],
        root,
        **stats,
        units=sum(written.units.values()),
        shards=sum(len(v) for v in written.shards.values()),
        shards_set_aside=moved,
    )
    log.info("%s: %s", name, stats)

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
        "classes_present": written.counts.present(),
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
