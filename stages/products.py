"""Which samples and points make up each product, and the class keys used to count them.

Shared by the split stage (per-product, per-class split metrics) and the pack stage (what goes
into the shards), so both apply the same rules:

- A product takes the samples of its `sources` that are usable for it: a point-annotated image
  needs at least one kept point (ingest keeps images whose points were all quarantined, because
  dedup needs their hashes), a segmentation sample (labels with `pixels`/`present`) needs its
  mask, and every sample needs a `labels` value.
- `dedup: all` keeps every copy of a duplicate cluster. `dedup: one` keeps, per cluster, the
  best-ranked usable member among the product's own sources (the `rank` of
  data/dedup/clusters.parquet, i.e. the survivor rule); so a cluster whose overall survivor is
  from another source, or unusable, still contributes exactly one sample. `dedup: cover` walks a
  cluster in rank order and keeps a member only if its pHash is farther than `dedup.radius` from
  every member already kept: union-find chains consecutive video frames into one cluster whose
  ends are different scenes, and `cover` keeps those while still dropping true near-copies.
  Every policy keeps a whole cluster in one split (the split stage sees all members).
- A product is point-based when it has a `patch_size` (one sample = one point's patch), otherwise
  image-based.

Class keys (per point for point products, a list per image otherwise):
- points: `benthic_attribute_name` (label_level `attribute`), `<attribute> / <growth form>`
  (`attribute_growth_form`, growth form omitted when null) or `top_level_category` (`top_level`);
- images with point-cover labels (MERMAID, CoralNet): the attributes present, at the same levels;
- Seatizen labels: the MERMAID attributes / categories whose value is 1;
- Coast Train: the common classes `present`; iNat 2017: the `category`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from stages.config import require
from stages.errors import ConfigError

KEEP_POLICIES = ("one", "all", "cover")
LABEL_LEVELS = ("attribute", "attribute_growth_form", "top_level")


@dataclass(frozen=True)
class Product:
    name: str
    sources: tuple[str, ...]
    keep: str  # one | all
    unit: str  # point | image
    label_level: str  # attribute | attribute_growth_form | top_level (for reef labels)
    radius: int = 0  # dedup.radius: what `cover` treats as a near copy


def products_from_params(params: dict[str, Any]) -> list[Product]:
    """The products of params.yaml, in the order declared, validated."""
    declared = require(params, "products")
    known_sources = set(require(params, "sources"))
    radius = int((params.get("dedup") or {}).get("radius", 0))
    if not isinstance(declared, dict) or not declared:
        raise ConfigError("params.yaml: `products` must map product names to their settings")
    out = []
    for name, spec in declared.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"params.yaml: products.{name} must be a mapping")
        sources = spec.get("sources")
        if not isinstance(sources, list) or not sources:
            raise ConfigError(f"params.yaml: products.{name}.sources must be a non-empty list")
        unknown = sorted(set(sources) - known_sources)
        if unknown:
            raise ConfigError(f"params.yaml: products.{name}.sources names unknown sources {unknown}")
        keep = spec.get("dedup", "one")
        if keep not in KEEP_POLICIES:
            raise ConfigError(
                f"params.yaml: products.{name}.dedup must be one of {KEEP_POLICIES}, got {keep!r}"
            )
        level = spec.get("label_level", "attribute")
        if level not in LABEL_LEVELS:
            raise ConfigError(
                f"params.yaml: products.{name}.label_level must be one of {LABEL_LEVELS}, got {level!r}"
            )
        unit = "point" if "patch_size" in spec else "image"
        out.append(Product(str(name), tuple(str(s) for s in sources), keep, unit, level, radius))
    return out


def _labels(value: Any) -> dict[str, Any] | None:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    try:
        parsed = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def usable(samples: pd.DataFrame) -> np.ndarray:
    """Per sample: can any product use it (see the module docstring)."""
    out = np.zeros(len(samples), dtype=bool)
    masks = (
        samples["mask_path"].notna().to_numpy() if "mask_path" in samples else np.zeros(len(samples), bool)
    )
    for k, raw in enumerate(samples["labels"].tolist()):
        labels = _labels(raw)
        if labels is None:
            continue
        if "n_points" in labels:
            out[k] = int(labels.get("n_points") or 0) > 0
        elif "pixels" in labels and "present" in labels:
            out[k] = bool(masks[k])
        else:
            out[k] = True
    return out


def product_samples(product: Product, samples: pd.DataFrame, clusters: pd.DataFrame) -> pd.DataFrame:
    """The rows of `samples` in `product` (keep policy applied), in sample_id order.

    `samples` needs sample_id, source, labels and mask_path (and phash for `cover`); `clusters`
    is the dedup cluster table (sample_id, cluster_id, rank). Adds `cluster_id` (null outside
    clusters).
    """
    mine = samples[samples["source"].isin(product.sources).to_numpy()].copy()
    mine = mine[usable(mine)]
    info = clusters[["sample_id", "cluster_id", "rank"]] if len(clusters) else None
    if info is None:
        mine["cluster_id"] = None
        return mine.sort_values("sample_id", kind="stable").reset_index(drop=True)
    ids = mine["sample_id"].astype(str)
    cluster_of = dict(zip(info["sample_id"].astype(str), info["cluster_id"].astype(str)))
    rank_of = dict(zip(info["sample_id"].astype(str), info["rank"].astype(int)))
    mine["cluster_id"] = [cluster_of.get(s) for s in ids]
    if product.keep == "one":
        in_cluster = mine["cluster_id"].notna().to_numpy()
        ranked = mine[in_cluster].assign(_rank=[rank_of[s] for s in ids[in_cluster]])
        best = ranked.sort_values(["cluster_id", "_rank"], kind="stable").drop_duplicates("cluster_id")
        keep_ids = set(best["sample_id"].astype(str))
        mine = mine[~in_cluster | ids.isin(keep_ids).to_numpy()]
    elif product.keep == "cover":
        in_cluster = mine["cluster_id"].notna().to_numpy()
        ranked = mine[in_cluster].assign(_rank=[rank_of[s] for s in ids[in_cluster]])
        keep_ids = _cover(ranked.sort_values(["cluster_id", "_rank"], kind="stable"), product.radius)
        mine = mine[~in_cluster | ids.isin(keep_ids).to_numpy()]
    return mine.sort_values("sample_id", kind="stable").reset_index(drop=True)


def _cover(ranked: pd.DataFrame, radius: int) -> set[str]:
    """Per cluster, in rank order: keep a member unless it is within `radius` of one kept."""
    if "phash" not in ranked:
        raise ConfigError("dedup: cover needs the samples' phash column")
    kept: set[str] = set()
    for _, members in ranked.groupby("cluster_id", sort=True):
        chosen: list[int] = []
        for sid, h in zip(members["sample_id"].astype(str), members["phash"]):
            h = int(h)
            if all((h ^ c).bit_count() > radius for c in chosen):
                chosen.append(h)
                kept.add(sid)
    return kept


def product_points(product: Product, points: pd.DataFrame, selected: pd.DataFrame) -> pd.DataFrame:
    """Points of the selected samples (point products), in (sample_id, point_id) order."""
    keep = points["sample_id"].isin(set(selected["sample_id"].astype(str))).to_numpy()
    out = points[keep]
    return out.sort_values(["sample_id", "point_id"], kind="stable").reset_index(drop=True)


def _attr_key(name: Any, growth_form: Any, level: str, top: Any) -> str | None:
    if level == "top_level":
        return None if top is None or top is pd.NA else str(top)
    if name is None or name is pd.NA:
        return None
    if level == "attribute_growth_form" and growth_form is not None and growth_form is not pd.NA:
        return f"{name} / {growth_form}"
    return str(name)


def point_classes(product: Product, points: pd.DataFrame) -> list[str | None]:
    """The class key of every point row, at the product's label level."""
    return [
        _attr_key(a, g, product.label_level, t)
        for a, g, t in zip(
            points["benthic_attribute_name"].tolist(),
            points["growth_form_name"].tolist(),
            points["top_level_category"].tolist(),
        )
    ]


def _image_classes(labels: dict[str, Any] | None, level: str) -> list[str]:
    if not labels:
        return []
    out: set[str] = set()
    if "benthic_attributes" in labels:  # point-cover labels (MERMAID, CoralNet)
        if level == "top_level":
            out.update(labels.get("top_level_categories") or {})
        for attr in (labels.get("benthic_attributes") or {}).values():
            if level == "attribute_growth_form":
                for gf in attr.get("growth_forms") or []:
                    key = _attr_key(attr.get("name"), gf.get("name"), level, None)
                    if key:
                        out.add(key)
            elif level == "attribute":
                if attr.get("name"):
                    out.add(str(attr["name"]))
    elif "attribute" in labels and "top_level" in labels:  # Seatizen multilabel
        if level == "top_level":
            out.update(k for k, v in (labels.get("top_level") or {}).items() if v == 1)
        elif level == "attribute_growth_form":
            for item in labels.get("attribute_growth_form") or []:
                if item.get("value") == 1:
                    key = _attr_key(item.get("name"), item.get("growth_form_name"), level, None)
                    if key:
                        out.add(key)
        else:
            out.update(str(i["name"]) for i in labels.get("attribute") or [] if i.get("value") == 1)
    elif "present" in labels:  # Coast Train
        out.update(str(c) for c in labels.get("present") or [])
    elif "category" in labels:  # iNat 2017
        out.add(str(labels["category"]))
    return sorted(out)


def sample_classes(product: Product, samples: pd.DataFrame) -> list[list[str]]:
    """The class keys of every sample row (a multilabel image has several)."""
    return [_image_classes(_labels(raw), product.label_level) for raw in samples["labels"].tolist()]


def class_split_counts(
    classes: Iterable[Iterable[str] | str | None], splits: Iterable[str]
) -> dict[str, dict[str, int]]:
    """{class: {split: count}} over parallel sequences (a list of classes counts once per class)."""
    counts: dict[str, dict[str, int]] = {}
    for cls, split in zip(classes, splits):
        keys = [cls] if isinstance(cls, str) else list(cls or [])
        for key in keys:
            per = counts.setdefault(key, {})
            per[split] = per.get(split, 0) + 1
    return {k: dict(sorted(v.items())) for k, v in sorted(counts.items())}
