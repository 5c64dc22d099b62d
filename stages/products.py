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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from stages.batches import Positions, iter_batches
from stages.config import require
from stages.errors import ConfigError

KEEP_POLICIES = ("one", "all", "cover")
LABEL_LEVELS = ("attribute", "attribute_growth_form", "top_level")
POINT_CLASS_COLUMNS = ("benthic_attribute_name", "growth_form_name", "top_level_category")


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


def label_usable(labels: dict[str, Any] | None, has_mask: bool) -> bool:
    """Can any product use a sample with these parsed `labels` (see the module docstring)."""
    if labels is None:
        return False
    if "n_points" in labels:
        return int(labels.get("n_points") or 0) > 0
    if "pixels" in labels and "present" in labels:
        return bool(has_mask)
    return True


def parse_labels(value: Any) -> dict[str, Any] | None:
    """A `labels` cell as a dict; None when null, not JSON, or not an object."""
    return _labels(value)


def usable(samples: pd.DataFrame) -> np.ndarray:
    """Per sample: can any product use it (see the module docstring)."""
    masks = (
        samples["mask_path"].notna().to_numpy() if "mask_path" in samples else np.zeros(len(samples), bool)
    )
    return np.array(
        [label_usable(_labels(raw), bool(m)) for raw, m in zip(samples["labels"].tolist(), masks)],
        dtype=bool,
    )


def product_samples(product: Product, samples: pd.DataFrame, clusters: pd.DataFrame) -> pd.DataFrame:
    """The rows of `samples` in `product` (keep policy applied), in sample_id order.

    `samples` needs sample_id, source, labels and mask_path (and phash for `cover`); `clusters`
    is the dedup cluster table (sample_id, cluster_id, rank). Adds `cluster_id` (null outside
    clusters). The rules are `select_samples`'s, so pack and the split metrics cannot disagree.
    """
    own = samples[samples["source"].isin(product.sources).to_numpy()]
    ids = own["sample_id"].astype(str).to_numpy(dtype=object)
    facts = facts_from_frame(own)
    members = ClusterMembers.from_frame(clusters, pd.Index(ids))
    mine = own[select_samples(product, facts, members)].copy()
    if not len(clusters):
        mine["cluster_id"] = None
    else:
        cluster_of = dict(zip(clusters["sample_id"].astype(str), clusters["cluster_id"].astype(str)))
        mine["cluster_id"] = [cluster_of.get(s) for s in mine["sample_id"].astype(str)]
    return mine.sort_values("sample_id", kind="stable").reset_index(drop=True)


# --- columnar membership and class counts (the split stage: arrays, no Python object per point) ---


@dataclass
class SampleFacts:
    """Per sample (one row each, in the caller's order), what membership and class counts need."""

    sources: list[str]  # source names; `source` holds indices into it
    source: np.ndarray  # int32 per sample
    usable: np.ndarray  # bool per sample (label_usable)
    phash: np.ndarray | None  # uint64 per sample (0 where missing); None when the table has none
    has_phash: np.ndarray | None  # bool per sample
    # label level -> (sample position, class code) pairs: the image classes of every sample
    classes: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)  # class code -> name


@dataclass
class ClusterMembers:
    """Dedup cluster members among the samples read: position, cluster code and rank arrays."""

    pos: np.ndarray  # sample position of each member
    cluster: np.ndarray  # cluster code (equal codes = one cluster)
    rank: np.ndarray  # survivor rank inside the cluster

    @classmethod
    def empty(cls) -> ClusterMembers:
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z.copy(), z.copy())

    @classmethod
    def from_frame(cls, clusters: pd.DataFrame, ids: pd.Index) -> ClusterMembers:
        """From the cluster table as a DataFrame; `ids` are the samples' ids in position order."""
        if not len(clusters):
            return cls.empty()
        pos = ids.get_indexer(clusters["sample_id"].astype(str).to_numpy(dtype=object))
        codes, _ = pd.factorize(clusters["cluster_id"].astype(str).to_numpy(dtype=object))
        rank = clusters["rank"].astype(int).to_numpy()
        known = pos >= 0  # a member of a source not read now: nothing to select
        return cls(pos[known].astype(np.int64), codes[known].astype(np.int64), rank[known].astype(np.int64))


class ClassTable:
    """Collects (sample position, class code) pairs per label level, one sample at a time."""

    def __init__(self, levels: Iterable[str]) -> None:
        self.levels = sorted(set(levels))
        self.code: dict[str, int] = {}
        self._done: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {lv: [] for lv in self.levels}
        self._pending: dict[str, tuple[list[int], list[int]]] = {lv: ([], []) for lv in self.levels}

    def add(self, position: int, labels: dict[str, Any] | None) -> None:
        for level in self.levels:
            ps, cs = self._pending[level]
            for name in _image_classes(labels, level):
                ps.append(position)
                cs.append(self.code.setdefault(name, len(self.code)))
            if len(ps) >= 1 << 16:  # into numpy now and then: no Python int per pair kept
                self._flush(level)

    def _flush(self, level: str) -> None:
        ps, cs = self._pending[level]
        if ps:
            self._done[level].append((np.array(ps, dtype=np.int64), np.array(cs, dtype=np.int32)))
        self._pending[level] = ([], [])

    def arrays(self) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
        """(level -> (positions, class codes), class names by code)."""
        out = {}
        for level in self.levels:
            self._flush(level)
            parts = self._done[level]
            out[level] = (
                np.concatenate([p for p, _ in parts]) if parts else np.zeros(0, np.int64),
                np.concatenate([c for _, c in parts]) if parts else np.zeros(0, np.int32),
            )
        names = [""] * len(self.code)
        for name, k in self.code.items():
            names[k] = name
        return out, names


def facts_from_frame(
    samples: pd.DataFrame, levels: Iterable[str] = (), usable: np.ndarray | None = None
) -> SampleFacts:
    """SampleFacts of a sample DataFrame (rows in its order).

    `usable`: the per-sample flags where the caller has them already (pack reads the labels in
    batches and keeps only the flag); then no label is parsed, so no class can be counted.
    """
    sources = sorted({str(s) for s in samples["source"].tolist()})
    code = {s: k for k, s in enumerate(sources)}
    source = np.array([code[str(s)] for s in samples["source"].tolist()], dtype=np.int32)
    table = ClassTable(levels)
    if usable is not None:
        if table.levels:
            raise ValueError("facts_from_frame: class levels need the labels, not precomputed usable flags")
        ok = np.asarray(usable, dtype=bool)
    else:
        has_mask = "mask_path" in samples
        masks = samples["mask_path"].notna().to_numpy() if has_mask else np.zeros(len(samples), bool)
        ok = np.zeros(len(samples), dtype=bool)
        for k, raw in enumerate(samples["labels"].tolist()):
            labels = _labels(raw)
            ok[k] = label_usable(labels, bool(masks[k]))
            table.add(k, labels)
    phash = has = None
    if "phash" in samples:
        col = samples["phash"]
        has = col.notna().to_numpy()
        phash = np.zeros(len(samples), dtype=np.uint64)
        phash[has] = col[has].to_numpy(dtype=np.uint64)
    classes, names = table.arrays()
    return SampleFacts(sources, source, ok, phash, has, classes, names)


def select_samples(product: Product, facts: SampleFacts, members: ClusterMembers) -> np.ndarray:
    """Per sample: is it in `product` (its sources, usable, keep policy applied)."""
    wanted = [k for k, s in enumerate(facts.sources) if s in product.sources]
    keep = np.isin(facts.source, wanted) & facts.usable
    if product.keep == "all" or not len(members.pos):
        return keep
    if product.keep == "cover" and (facts.phash is None or facts.has_phash is None):
        raise ConfigError("dedup: cover needs the samples' phash column")
    mine = keep[members.pos]
    pos, cluster, rank = members.pos[mine], members.cluster[mine], members.rank[mine]
    order = np.lexsort((rank, cluster))
    pos, cluster = pos[order], cluster[order]
    keep[members.pos] = False  # cluster members stay only where the policy picks them below
    first = np.r_[True, cluster[1:] != cluster[:-1]] if len(cluster) else np.zeros(0, dtype=bool)
    if product.keep == "one":
        keep[pos[first]] = True
        return keep
    assert facts.phash is not None and facts.has_phash is not None
    # cover: per cluster, in rank order, keep a member unless it is within the radius of one
    # kept. A member without a pHash joined by an exact match (it is a copy of some member), so
    # it is kept only when nothing of its cluster is kept yet.
    chosen: list[int] = []
    for p, is_first in zip(pos.tolist(), first.tolist()):
        if is_first:
            chosen = []
        if not facts.has_phash[p]:
            if not chosen:
                keep[p] = True
                chosen.append(-1)
            continue
        h = int(facts.phash[p])
        if all(c < 0 or (h ^ c).bit_count() > product.radius for c in chosen):
            chosen.append(h)
            keep[p] = True
    return keep


@dataclass
class ClassCounts:
    """Per split totals and per class counts of one product (splits in the caller's order)."""

    totals: np.ndarray  # samples per split (points for a point product)
    names: list[str]  # classes with at least one sample, sorted
    counts: np.ndarray  # (len(names), splits)


def image_class_counts(
    facts: SampleFacts, level: str, selected: np.ndarray, split: np.ndarray, n_splits: int
) -> ClassCounts:
    """Samples per split, and per class and split, of the selected samples (`split`: codes)."""
    totals = np.bincount(split[selected], minlength=n_splits).astype(np.int64)
    pos, cls = facts.classes.get(level, (np.zeros(0, np.int64), np.zeros(0, np.int32)))
    inc = selected[pos]
    grid = np.zeros((len(facts.class_names), n_splits), dtype=np.int64)
    np.add.at(grid, (cls[inc], split[pos[inc]]), 1)
    present = sorted(
        (k for k in range(len(facts.class_names)) if grid[k].any()), key=facts.class_names.__getitem__
    )
    return ClassCounts(totals, [facts.class_names[k] for k in present], grid[present])


def point_class_key(batch: pa.RecordBatch | pa.Table, level: str) -> pa.Array:
    """The class key of every point row at `level` (as `point_classes`, computed by Arrow).

    Dictionary-encoded columns stay encoded where the key is one column (attribute, top level).
    """
    if level == "top_level":
        return batch.column("top_level_category")
    name = batch.column("benthic_attribute_name")
    if level != "attribute_growth_form":
        return name
    name = pc.cast(name, pa.string())
    growth = pc.cast(batch.column("growth_form_name"), pa.string())
    return pc.if_else(pc.is_valid(growth), pc.binary_join_element_wise(name, growth, " / "), name)


def _grouped_counts(keys: pa.Array, rows: np.ndarray, split: np.ndarray) -> list[tuple[str | None, int, int]]:
    """(class, split, count) of the `rows` of `keys`, by Arrow's group-by (on the dictionary
    indices when `keys` is dictionary-encoded: no string per point is built)."""
    mask = pa.array(rows)
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    if pa.types.is_dictionary(keys.type):
        names = keys.dictionary.to_pylist()
        table = pa.table({"cls": pc.fill_null(keys.indices, -1).filter(mask), "split": split})
        grouped = table.group_by(["cls", "split"]).aggregate([([], "count_all")])
        classes = [names[c] if c >= 0 else None for c in grouped.column("cls").to_pylist()]
    else:
        table = pa.table({"cls": keys.filter(mask), "split": split})
        grouped = table.group_by(["cls", "split"]).aggregate([([], "count_all")])
        classes = grouped.column("cls").to_pylist()
    return list(zip(classes, grouped.column("split").to_pylist(), grouped.column("count_all").to_pylist()))


def point_class_counts(
    selections: dict[str, tuple[str, np.ndarray]],
    point_files: Iterable[Path],
    ids: pa.Array,
    split: np.ndarray,
    n_splits: int,
) -> dict[str, ClassCounts]:
    """Points per split, and per class and split, of the selected samples, for several products.

    `selections`: product name -> (label level, per-sample selected mask over `ids`). Points are
    read in record batches and counted with Arrow's group-by, so memory does not grow with the
    number of points. Points of samples not in `ids` are not counted (as `product_points`).
    """
    totals = {k: np.zeros(n_splits, dtype=np.int64) for k in selections}
    counts: dict[str, dict[str, np.ndarray]] = {k: {} for k in selections}
    columns = ["sample_id", *POINT_CLASS_COLUMNS]
    positions = Positions(ids)
    for path in point_files:
        for batch in iter_batches(path, columns, dictionary=columns):
            pos = positions(batch.column("sample_id"))
            known = pos >= 0
            for key, (level, selected) in selections.items():
                inc = known.copy()
                inc[known] = selected[pos[known]]
                if not inc.any():
                    continue
                point_split = split[pos[inc]].astype(np.int8)
                totals[key] += np.bincount(point_split, minlength=n_splits)
                for cls, s, n in _grouped_counts(point_class_key(batch, level), inc, point_split):
                    if cls is not None:  # a point without a class at this level counts in totals only
                        counts[key].setdefault(cls, np.zeros(n_splits, dtype=np.int64))[s] += n
    out = {}
    for key in selections:
        names = sorted(counts[key])
        grid = np.array([counts[key][c] for c in names], dtype=np.int64).reshape(len(names), n_splits)
        out[key] = ClassCounts(totals[key], names, grid)
    return out


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


def image_classes(labels: dict[str, Any] | None, level: str) -> list[str]:
    """The class keys of one image's parsed labels at `level`, sorted."""
    return _image_classes(labels, level)


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
