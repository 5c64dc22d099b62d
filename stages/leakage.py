"""The leakage check that does not trust the split stage: recomputed from the input tables.

`check_leakage` in stages/split.py checks the `component` column that the split stage built
itself; a bug in building components would pass it. This check takes only the assignments
(sample id -> split) and rebuilds every grouping straight from the inputs:

- every sample of every `data/interim/<source>/samples.parquet` has exactly one split, and no
  split names a sample no table holds; every point's image has a split (all points of an image
  are one sample, so they share it);
- dedup clusters from `data/dedup/clusters.parquet`;
- the `split.group_by` keys of each source (session, spatial block, observer, site, ...), read
  from the sample tables;
- footprints that overlap or touch (`native_labels.geo`, `split.spatial_buffer_m`).

Connectivity comes from scipy's `connected_components` (not the stage's union-find), and the
rule is the documented guarantee: official val/test samples sit on their official split; per
connected group, samples without an official val/test split share one split, and a group spans
several splits only where upstream's own official splits put its members there. A violation
fails with a `TidepoolError` naming the offending cluster, key or tile pair and its samples.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from stages.batches import Positions, iter_batches
from stages.errors import TidepoolError, UpstreamFormatError
from stages.spatial import bounds_from_geo, touching_pairs
from stages.split_inputs import PERSONAL_KEYS, SPLITS, samples_path, split_codes

PREFIX = "split leakage check (from the inputs)"
VAL = 1
SHOWN = 4  # samples named per split in a message


def _fail(message: str) -> TidepoolError:
    return TidepoolError(f"{PREFIX}: {message}")


class _Groups:
    """Memberships (sample position, group key), keys `<kind>:<source>:<value>` or `dup:<cluster>`."""

    def __init__(self) -> None:
        self.pos: list[np.ndarray] = []
        self.keys: list[pa.Array] = []

    def add(self, pos: np.ndarray, keys: pa.Array) -> None:
        if len(pos):
            self.pos.append(pos.astype(np.int64))
            self.keys.append(keys)

    def encode(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(positions, group codes, key per code): equal keys from any table or batch are one group."""
        if not self.pos:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, []
        encoded = pc.dictionary_encode(pa.concat_arrays(self.keys))
        return (
            np.concatenate(self.pos),
            encoded.indices.to_numpy().astype(np.int64),
            encoded.dictionary.to_pylist(),
        )


def _label(key: str) -> str:
    kind, _, rest = key.partition(":")
    if kind == "dup":
        return f"dedup cluster {rest!r}"
    source, _, value = rest.partition(":")
    if kind in PERSONAL_KEYS:
        # Messages end up in CI logs: a personal key is never printed.
        return f"one {kind} of {source} (id withheld)"
    return f"{kind} {value!r} of {source}"


def _geo(raw: Any) -> Any:
    try:
        native = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError:
        return None
    return native.get("geo") if isinstance(native, dict) else None


def verify_assignments(
    root: Path,
    sources: list[str],
    group_by: dict[str, tuple[str, ...]],
    buffer_m: float | None,
    assignments: pa.Table,
    point_files: Iterable[Path] = (),
) -> dict[str, Any]:
    """Check `assignments` (sample_id, split) against the inputs; fail naming the leak.

    Returns what was checked (samples, points, groups per kind, overlapping tile pairs).
    """
    ids = assignments.column("sample_id").combine_chunks()
    split = split_codes(assignments.column("split"), "split assignments")
    if (split < 0).any():
        k = int(np.flatnonzero(split < 0)[0])
        raise _fail(f"sample {ids[k].as_py()!r} has no split")
    counts = pc.value_counts(ids)
    dupes = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(dupes):
        raise _fail(f"samples assigned twice: {sorted(dupes.to_pylist())[:5]}")
    n = len(ids)
    seen = np.zeros(n, dtype=np.int64)
    official = np.full(n, -1, dtype=np.int8)
    boxes = np.full((n, 4), np.nan)
    has_box = np.zeros(n, dtype=bool)
    groups = _Groups()
    for source in sources:
        path = samples_path(root, source)
        try:
            pf = pq.ParquetFile(path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise UpstreamFormatError(path, f"not a readable parquet file ({exc})") from exc
        names = pf.schema_arrow.names
        kinds = [k for k in group_by.get(source, ()) if k in names]
        spatial = "spatial_block" in group_by.get(source, ()) and "native_labels" in names
        columns = ["sample_id", "official_split", *kinds] + (["native_labels"] if spatial else [])
        for batch in iter_batches(pf, columns):
            sid = batch.column("sample_id")
            at = pc.index_in(sid, value_set=ids)
            if at.null_count:
                missing = pc.filter(sid, pc.is_null(at)).to_pylist()[:5]
                raise _fail(f"{path}: samples {missing} have no split in data/split/assignments.parquet")
            pos = at.to_numpy().astype(np.int64)
            np.add.at(seen, pos, 1)
            official[pos] = split_codes(pc.cast(batch.column("official_split"), pa.string()), str(path))
            for kind in kinds:
                value = pc.cast(batch.column(kind), pa.string())
                valid = pc.is_valid(value)
                keys = pc.binary_join_element_wise(f"{kind}:{source}", value.filter(valid), ":")
                groups.add(pos[valid.to_numpy(zero_copy_only=False)], keys)
            if spatial:
                for k, raw in enumerate(batch.column("native_labels").to_pylist()):
                    b = bounds_from_geo(_geo(raw))
                    if b is not None:
                        boxes[pos[k]] = b
                        has_box[pos[k]] = True
    if (seen == 0).any():
        extra = ids.filter(pa.array(seen == 0)).to_pylist()[:5]
        raise _fail(f"data/split/assignments.parquet assigns samples no sample table holds: {extra}")
    if (seen > 1).any():
        twice = ids.filter(pa.array(seen > 1)).to_pylist()[:5]
        raise _fail(f"samples {twice} occur in two sample tables")

    clusters_path = root / "data" / "dedup" / "clusters.parquet"
    clusters = pq.read_table(clusters_path, columns=["sample_id", "cluster_id"])
    at = pc.index_in(clusters.column("sample_id"), value_set=ids)
    known = pc.is_valid(at)  # members of sources not read now are not split here
    cids = pc.cast(pc.filter(clusters.column("cluster_id"), known).combine_chunks(), pa.string())
    groups.add(
        pc.filter(at, known).to_numpy().astype(np.int64), pc.binary_join_element_wise("dup", cids, ":")
    )
    pair_a = pair_b = np.zeros(0, dtype=np.int64)
    if buffer_m is not None and has_box.sum() > 1:
        where = np.flatnonzero(has_box)
        a, b = touching_pairs(boxes[where], buffer_m)
        pair_a, pair_b = where[a], where[b]

    points = 0
    positions = Positions(ids)
    for path in point_files:
        for batch in iter_batches(path, ["point_id", "sample_id"], dictionary=["sample_id"]):
            missing = positions(batch.column("sample_id")) < 0
            if missing.any():
                k = int(np.flatnonzero(missing)[0])
                point = batch.column("point_id")[k].as_py()
                image = pc.cast(batch.column("sample_id"), pa.string())[k].as_py()
                raise _fail(f"{path}: point {point!r} belongs to image {image!r}, which has no split")
            points += batch.num_rows

    pinned = np.flatnonzero((official >= VAL) & (official != split))
    if len(pinned):
        k = int(pinned[0])
        raise _fail(
            f"sample {ids[k].as_py()!r} has the official split {SPLITS[official[k]]} but is in "
            f"{SPLITS[split[k]]}"
        )

    gpos, gcode, keys = groups.encode()
    size = n + len(keys)
    graph = coo_matrix(
        (
            np.ones(len(gpos) + len(pair_a), dtype=np.int8),
            (np.concatenate([gpos, pair_a]), np.concatenate([n + gcode, pair_b])),
        ),
        shape=(size, size),
    )
    _, label = connected_components(graph, directed=False)
    comp = label[:n]
    bit = (1 << split.astype(np.int64)).astype(np.uint8)
    spanned = np.zeros(size, dtype=np.uint8)
    np.bitwise_or.at(spanned, comp, bit)
    free = official < VAL
    free_bits = np.zeros(size, dtype=np.uint8)
    np.bitwise_or.at(free_bits, comp[free], bit[free])
    upstream = np.zeros(size, dtype=np.uint8)
    has_off = official >= 0
    np.bitwise_or.at(upstream, comp[has_off], (1 << official[has_off].astype(np.int64)).astype(np.uint8))
    bad = (np.bitwise_count(free_bits) > 1) | ((np.bitwise_count(spanned) > 1) & ((spanned & ~upstream) != 0))
    if bad.any():
        members = np.flatnonzero(bad[comp])
        first = int(members[0])  # the smallest sample position (ids are in assignment order)
        raise _fail(
            _describe(int(comp[first]), comp, ids, split, official, keys, gpos, gcode, pair_a, pair_b)
        )
    kinds_seen = Counter(k.partition(":")[0] for k in keys)
    return {
        "samples": n,
        "points": points,
        "groups": {("dedup_cluster" if k == "dup" else k): v for k, v in sorted(kinds_seen.items())},
        "overlapping_tile_pairs": int(len(pair_a)),
    }


def _by_split(positions: np.ndarray, ids: pa.Array, split: np.ndarray) -> str:
    parts = []
    for s, name in enumerate(SPLITS):
        here = positions[split[positions] == s]
        if len(here):
            shown = ", ".join(repr(x) for x in ids.take(pa.array(here[:SHOWN])).to_pylist())
            more = f" and {len(here) - SHOWN} more" if len(here) > SHOWN else ""
            parts.append(f"{name}: {shown}{more}")
    return "; ".join(parts)


def _describe(
    bad: int,
    comp: np.ndarray,
    ids: pa.Array,
    split: np.ndarray,
    official: np.ndarray,
    keys: list[str],
    gpos: np.ndarray,
    gcode: np.ndarray,
    pair_a: np.ndarray,
    pair_b: np.ndarray,
) -> str:
    """Which direct group of the leaky component breaks the rule, and its samples by split."""
    inside = comp[gpos] == bad
    spanning = []
    for code in sorted(set(gcode[inside].tolist()), key=keys.__getitem__):
        members = np.unique(gpos[gcode == code])
        splits = set(split[members].tolist())
        if len(splits) < 2:
            continue
        free = members[official[members] < VAL]
        upstream = {int(o) for o in official[members] if o >= 0}
        if len(set(split[free].tolist())) > 1 or not splits <= upstream:
            return (
                f"{_label(keys[code])} puts its samples in several splits: {_by_split(members, ids, split)}"
            )
        spanning.append(code)
    for a, b in zip(pair_a.tolist(), pair_b.tolist()):
        if comp[a] == bad and split[a] != split[b]:
            return (
                f"the footprints of {ids[a].as_py()!r} ({SPLITS[split[a]]}) and {ids[b].as_py()!r} "
                f"({SPLITS[split[b]]}) overlap or touch"
            )
    members = np.flatnonzero(comp == bad)
    offs = sorted({SPLITS[o] for o in official[members].tolist() if o >= 0}, key=SPLITS.index)
    via = f" through {', '.join(_label(keys[c]) for c in spanning[:3])}" if spanning else ""
    return (
        f"samples joined by a chain of groups{via} span splits that upstream's official splits "
        f"({offs}) do not explain: {_by_split(members, ids, split)}"
    )
