"""The split stage's inputs as columns: sample tables read by record batch, dedup cluster members.

Nothing here keeps a Python object per sample or per point: ids and group keys stay Arrow
arrays, codes and flags numpy arrays. `labels` JSON is parsed one batch at a time into the
compact facts products need (usable, image classes per label level as code pairs) and dropped;
Coast Train footprints come from `native_labels.geo` the same way, for sources grouped by
`spatial_block`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages import products as prod
from stages.batches import iter_batches
from stages.errors import ConfigError, TidepoolError, UpstreamFormatError
from stages.spatial import bounds_from_geo

SPLITS = ("train", "val", "test")
# Group keys a source may be split by (`split.group_by`). `site` is optional in the tables (older
# ones lack it): a missing column groups nothing.
GROUP_KEYS = ("region", "session", "spatial_block", "observer", "site")
OPTIONAL_KEYS = ("site",)
# Group keys whose values identify people (iNat user ids): never written to public outputs.
PERSONAL_KEYS = ("observer",)
REQUIRED_COLUMNS = (
    "sample_id", "source", "official_split", "mask_path", "labels", "phash",
    *(k for k in GROUP_KEYS if k not in OPTIONAL_KEYS),
)  # fmt: skip


def samples_path(root: Path, source: str) -> Path:
    return root / "data" / "interim" / source / "samples.parquet"


def split_codes(values: pa.Array | pa.ChunkedArray, what: str) -> np.ndarray:
    """int8 codes of split names (train 0, val 1, test 2, null -1); anything else is an error."""
    codes = pc.index_in(values, value_set=pa.array(SPLITS))
    bad = pc.and_(pc.is_valid(values), pc.is_null(codes))
    if pc.any(bad).as_py():
        found = sorted(set(pc.filter(values, bad).to_pylist()))
        raise TidepoolError(f"{what}: official_split values {found} are not one of {list(SPLITS)}")
    return pc.fill_null(codes, -1).to_numpy().astype(np.int8)


@dataclass
class SplitInputs:
    """Every sample of every source, sorted by sample_id, as columns."""

    ids: pa.Array  # sample ids, sorted, unique
    official: np.ndarray  # int8 split codes, -1 = none
    groups: dict[str, pa.Array]  # group kind -> per-sample value (null unless the source groups by it)
    boxes: np.ndarray  # (n, 4) lat_min, lat_max, lon_min, lon_max (NaN where unknown)
    has_box: np.ndarray  # bool: the sample's footprint takes part in the spatial join
    facts: prod.SampleFacts

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def source_names(self) -> pa.Array:
        """Per sample, its source name (Arrow strings; built when asked, not kept)."""
        return pa.array(self.facts.sources, pa.string()).take(pa.array(self.facts.source))


class _Columns:
    """Chunks of the per-sample columns as batches arrive, before the global sort."""

    def __init__(self, levels: Iterable[str]) -> None:
        self.ids: list[pa.Array] = []
        self.official: list[np.ndarray] = []
        self.groups: dict[str, list[pa.Array]] = {k: [] for k in GROUP_KEYS}
        self.boxes: list[np.ndarray] = []
        self.has_box: list[np.ndarray] = []
        self.source: list[np.ndarray] = []
        self.usable: list[np.ndarray] = []
        self.phash: list[np.ndarray] = []
        self.has_phash: list[np.ndarray] = []
        self.classes = prod.ClassTable(levels)
        self.sources: list[str] = []
        self.n = 0

    def source_code(self, name: str) -> int:
        if name not in self.sources:
            self.sources.append(name)
        return self.sources.index(name)

    def add(self, batch: pa.RecordBatch, group_by: dict[str, tuple[str, ...]], what: str) -> None:
        n = batch.num_rows
        batch = _typed(batch)
        ids = batch.column("sample_id")
        if ids.null_count:
            raise UpstreamFormatError(what, "a sample has no sample_id")
        self.ids.append(ids)
        self.official.append(split_codes(batch.column("official_split"), "sample tables"))
        source = batch.column("source")
        if source.null_count:
            raise UpstreamFormatError(what, "a sample has no source")
        distinct = [str(s) for s in pc.unique(source).to_pylist()]
        codes = np.zeros(n, dtype=np.int32)
        for name in distinct:
            codes[pc.equal(source, name).to_numpy(zero_copy_only=False)] = self.source_code(name)
        self.source.append(codes)
        for kind in GROUP_KEYS:
            grouped = [s for s in distinct if kind in group_by.get(s, ())]
            if kind in batch.schema.names and grouped:
                value = batch.column(kind)
                mask = pc.is_in(source, value_set=pa.array(grouped))
                self.groups[kind].append(pc.if_else(mask, value, pa.scalar(None, pa.string())))
            else:
                self.groups[kind].append(pa.nulls(n, pa.string()))
        spatial = [s for s in distinct if "spatial_block" in group_by.get(s, ())]
        boxes = np.full((n, 4), np.nan)
        has_box = np.zeros(n, dtype=bool)
        if spatial and "native_labels" in batch.schema.names:
            wanted = pc.is_in(source, value_set=pa.array(spatial)).to_numpy(zero_copy_only=False)
            for k, raw in enumerate(batch.column("native_labels").to_pylist()):
                if wanted[k] and raw:
                    b = bounds_from_geo(_geo(raw))
                    if b is not None:
                        boxes[k] = b
                        has_box[k] = True
        self.boxes.append(boxes)
        self.has_box.append(has_box)
        masks = pc.is_valid(batch.column("mask_path")).to_numpy(zero_copy_only=False)
        ok = np.zeros(n, dtype=bool)
        for k, raw in enumerate(batch.column("labels").to_pylist()):
            labels = prod.parse_labels(raw)
            ok[k] = prod.label_usable(labels, bool(masks[k]))
            self.classes.add(self.n + k, labels)
        self.usable.append(ok)
        ph = batch.column("phash")
        self.has_phash.append(pc.is_valid(ph).to_numpy(zero_copy_only=False))
        self.phash.append(pc.fill_null(ph, 0).to_numpy().astype(np.uint64))
        self.n += n

    def finish(self) -> SplitInputs:
        ids = pa.concat_arrays(self.ids) if self.ids else pa.array([], pa.string())
        order = pc.sort_indices(ids).to_numpy()
        ids = ids.take(pa.array(order))
        if len(ids) > 1:
            dup = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1)).to_numpy(zero_copy_only=False)
            if dup.any():
                dupes = sorted(set(ids.slice(1).filter(pa.array(dup)).to_pylist()))
                raise TidepoolError(f"sample ids occur in two sample tables: {dupes[:5]}")
        inverse = np.empty(len(order), dtype=np.int64)
        inverse[order] = np.arange(len(order))
        classes, class_names = self.classes.arrays()
        classes = {lv: (inverse[p], c) for lv, (p, c) in classes.items()}
        # Source codes by name, so they do not depend on the order tables were read in.
        names = sorted(self.sources)
        remap = np.array([names.index(s) for s in self.sources], dtype=np.int32)

        def cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
            return (np.concatenate(parts) if parts else np.zeros(0, dtype=dtype))[order]

        source = remap[cat(self.source, np.int32)] if len(remap) else np.zeros(0, np.int32)
        facts = prod.SampleFacts(
            sources=names,
            source=source,
            usable=cat(self.usable, bool),
            phash=cat(self.phash, np.uint64),
            has_phash=cat(self.has_phash, bool),
            classes=classes,
            class_names=class_names,
        )
        groups = {
            k: pa.concat_arrays(v).take(pa.array(order)) if v else pa.nulls(0, pa.string())
            for k, v in self.groups.items()
        }
        boxes = np.concatenate(self.boxes)[order] if self.boxes else np.zeros((0, 4))
        return SplitInputs(ids, cat(self.official, np.int8), groups, boxes, cat(self.has_box, bool), facts)


_TYPES = {
    **{c: pa.string() for c in ("sample_id", "source", "official_split", "native_labels", *GROUP_KEYS)},
    "phash": pa.uint64(),
}


def _typed(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch with the columns used here in their schema types (an all-null column read from
    pandas arrives as type null)."""
    arrays = [
        pc.cast(col, _TYPES[name]) if name in _TYPES and col.type != _TYPES[name] else col
        for name, col in zip(batch.schema.names, batch.columns)
    ]
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)


def _geo(raw: str) -> Any:
    try:
        native = json.loads(raw)
    except (json.JSONDecodeError, TypeError):
        return None
    return native.get("geo") if isinstance(native, dict) else None


def read_split_inputs(
    root: Path, sources: list[str], group_by: dict[str, tuple[str, ...]], levels: Iterable[str] = ()
) -> SplitInputs:
    """Every `data/interim/<source>/samples.parquet`, one record batch at a time."""
    if not sources:
        raise ConfigError("params.yaml: `sources` lists no source to split")
    cols = _Columns(levels)
    for source in sources:
        path = samples_path(root, source)
        if not path.exists():
            raise TidepoolError(f"{path}: missing; run `ingest@{source}` first")
        try:
            pf = pq.ParquetFile(path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise UpstreamFormatError(path, f"not a readable parquet file ({exc})") from exc
        names = pf.schema_arrow.names
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise UpstreamFormatError(path, f"sample table lacks columns {missing} (see stages/schema.py)")
        columns = [*REQUIRED_COLUMNS, *(k for k in OPTIONAL_KEYS if k in names)]
        if "spatial_block" in group_by.get(source, ()) and "native_labels" in names:
            columns.append("native_labels")
        try:
            for batch in iter_batches(pf, columns):
                cols.add(batch, group_by, str(path))
        except (OSError, pa.ArrowInvalid) as exc:
            raise UpstreamFormatError(path, f"not a readable parquet file ({exc})") from exc
    return cols.finish()


def inputs_from_frame(
    samples: pd.DataFrame, group_by: dict[str, tuple[str, ...]], levels: Iterable[str] = ()
) -> SplitInputs:
    """SplitInputs of a sample DataFrame (the sample table's columns; tests and callers in memory)."""
    names = [c for c in samples.columns if c in (*REQUIRED_COLUMNS, *OPTIONAL_KEYS, "native_labels")]
    table = pa.Table.from_pandas(samples[names], preserve_index=False)
    for column in ("official_split", "mask_path", "labels", *GROUP_KEYS):
        if column not in table.schema.names and column not in OPTIONAL_KEYS:
            table = table.append_column(column, pa.nulls(len(table), pa.string()))
    if "phash" not in table.schema.names:
        table = table.append_column("phash", pa.nulls(len(table), pa.uint64()))
    cols = _Columns(levels)
    for batch in table.to_batches(max_chunksize=1 << 12):
        cols.add(batch, group_by, "sample table")
    return cols.finish()


# --- clusters and ledger -----------------------------------------------------------------------


def read_cluster_members(path: Path, ids: pa.Array) -> prod.ClusterMembers:
    """data/dedup/clusters.parquet as member positions in `ids`, cluster codes and ranks."""
    if not path.exists():
        raise TidepoolError(f"{path}: missing; run the `dedup` stage first")
    try:
        names = pq.read_schema(path).names
    except (OSError, pa.ArrowInvalid) as exc:
        raise UpstreamFormatError(path, f"not a readable parquet file ({exc})") from exc
    missing = [c for c in ("sample_id", "cluster_id", "rank") if c not in names]
    if missing:
        raise UpstreamFormatError(path, f"cluster table lacks columns {missing}")
    table = pq.read_table(path, columns=["sample_id", "cluster_id", "rank"])
    return members_from_table(table, ids)


def members_from_table(table: pa.Table, ids: pa.Array) -> prod.ClusterMembers:
    if not table.num_rows:
        return prod.ClusterMembers.empty()
    pos = pc.fill_null(pc.index_in(table.column("sample_id"), value_set=ids), -1).to_numpy()
    cluster = pc.dictionary_encode(table.column("cluster_id")).combine_chunks().indices.to_numpy()
    rank = pc.fill_null(table.column("rank"), 0).to_numpy()
    known = pos >= 0  # a member of a source not read now: nothing to unite
    return prod.ClusterMembers(
        pos[known].astype(np.int64), cluster[known].astype(np.int64), rank[known].astype(np.int64)
    )
