"""split: train/val/test for every sample, by leak-free components, stable as the sources grow.

`python -m stages.split [--update-ledger]` reads every `data/interim/<source>/samples.parquet`
(and `points.parquet` for per-class counts), `data/dedup/clusters.parquet` and the ledger
(`split.ledger`), and writes `data/split/assignments.parquet` (ASSIGNMENTS),
`data/split/report.md` and `metrics/split.json`. `--update-ledger` also writes the assignments
into the ledger (the release process runs it). docs/dedup-split.md states the method and the
guarantees; in short:

1. Components (union-find): a sample is united with its dedup cluster and with the
   `split.group_by` keys of its source (`<key>:<source>:<value>`, so keys of different kinds or
   sources never collide), and a tile with a footprint with every tile whose footprint overlaps
   or touches it (`split.spatial_buffer_m`). All points of an image are one sample, so they
   share its split.
2. Splits are decided per component, in this order:
   - members with an official `val`/`test` split keep it ("pinned");
   - the other members ("free": official-train and no official split) all get one split F:
     the split their ledger entries agree on (`ledger`); if those disagree because new data
     joined components of the last release, the majority, ties to train > val > test (`merge`,
     and every sample whose split changes is reported); with no ledger member, F is forced by
     pinned members (`official`) or drawn from the salted hash of the component's canonical key
     against `split.ratios` (`hash`). F never makes the component span a split that upstream
     did not give it: official-train members are train or test (test is carved from official
     train, never beside an official val); others beside pinned members take a pinned split.
3. Leakage checks: free members share one split, pinned members sit on their official split, and
   a component spans several splits only where upstream's own official splits put its members
   (e.g. an iNat observer in train and val). `check_leakage` checks the components built here;
   `stages.leakage` rebuilds every group from the input tables and checks the assignments
   again, trusting nothing built here. Either fails the stage, naming the offending component
   or group, before anything is written.

A component keyed by a personal value (an iNat observer's user id) is written under a public key
instead (`public_keys`); split quality (empty splits, classes without val/test samples) goes to
the metrics and report, per-class counts to `metrics/plots/split/<product>.csv`
(stages/split_report.py).

Everything is columnar (stages/split_inputs.py): sample tables are read by record batch, points
are counted with Arrow's group-by, and per-component decisions are numpy array operations, so
memory follows the number of samples in arrays, not Python objects per sample or point.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages import products as prod
from stages.cli import run_main
from stages.config import load_params, require
from stages.errors import ConfigError, TidepoolError, UpstreamFormatError
from stages.fsutil import repo_root, write_json, write_parquet, write_text
from stages.leakage import verify_assignments
from stages.spatial import touching_pairs
from stages.split_inputs import (
    GROUP_KEYS,
    PERSONAL_KEYS,
    SPLITS,
    SplitInputs,
    inputs_from_frame,
    members_from_table,
    read_cluster_members,
    read_split_inputs,
    split_codes,
)
from stages.split_report import ASSIGNED_BY, product_metrics, report_markdown, split_metrics, write_plots
from stages.unionfind import components

log = logging.getLogger(__name__)

# Merge ties go to the split earlier here: a sample that was ever trained on should not become
# an evaluation sample of a later release, and val/test only ever lose members to train. The
# vectorised vote takes the first maximum in SPLITS order, which is this order.
MERGE_PRECEDENCE = ("train", "val", "test")
assert MERGE_PRECEDENCE == SPLITS
LEDGER_HOW, OFFICIAL_HOW, HASH_HOW, MERGE_HOW = range(4)  # indices into ASSIGNED_BY
TRAIN, VAL, TEST = range(3)
POINT_COLUMNS = ("point_id", "sample_id", *prod.POINT_CLASS_COLUMNS)
SPATIAL_BUFFER_M = 10.0  # default of split.spatial_buffer_m
PLOTS = Path("metrics") / "plots" / "split"  # per-class counts per split, one CSV per product

ASSIGNMENTS = pa.schema(
    [
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("component", pa.string()),  # the component's public key (see `public_keys`)
        ("split", pa.string()),
    ]
)
# Why each sample has its split. Kept apart from ASSIGNMENTS on purpose: refreshing the ledger
# turns "hash" into "ledger" without changing a single split, and the pack stages, which depend
# on assignments.parquet only, must not rebuild every shard for that.
PROVENANCE = pa.schema(
    [
        ("sample_id", pa.string()),
        ("assigned_by", pa.string()),  # ledger | official | hash | merge
    ]
)
LEDGER = pa.schema([("sample_id", pa.string()), ("source", pa.string()), ("split", pa.string())])
_SPLIT_NAMES = pa.array(SPLITS, pa.string())
_HOW_NAMES = pa.array(ASSIGNED_BY, pa.string())


@dataclass(frozen=True)
class SplitParams:
    salt: str
    ratios: dict[str, float]  # normalised, keys SPLITS
    group_by: dict[str, tuple[str, ...]]
    ledger: str
    spatial_buffer_m: float | None = SPATIAL_BUFFER_M  # None: grid cells only, no footprint join

    @property
    def carve_test(self) -> float:
        """Share of official-train components carved into test."""
        denom = self.ratios["train"] + self.ratios["test"]
        return self.ratios["test"] / denom if denom > 0 else 0.0


def split_params(params: dict[str, Any]) -> SplitParams:
    salt = require(params, "split.salt")
    ratios = require(params, "split.ratios")
    group_by = require(params, "split.group_by")
    ledger = require(params, "split.ledger")
    buffer = (params.get("split") or {}).get("spatial_buffer_m", SPATIAL_BUFFER_M)
    if not isinstance(salt, str) or not salt:
        raise ConfigError("params.yaml: split.salt must be a non-empty string")
    if not isinstance(ratios, dict) or set(ratios) - set(SPLITS):
        raise ConfigError(f"params.yaml: split.ratios must map {list(SPLITS)} to shares, got {ratios!r}")
    values = {s: ratios.get(s, 0) for s in SPLITS}
    if any(not isinstance(v, int | float) or isinstance(v, bool) or v < 0 for v in values.values()):
        raise ConfigError(f"params.yaml: split.ratios must be non-negative numbers, got {ratios!r}")
    total = float(sum(values.values()))
    if total <= 0:
        raise ConfigError("params.yaml: split.ratios must not all be zero")
    if not isinstance(group_by, dict):
        raise ConfigError("params.yaml: split.group_by must map sources to lists of group keys")
    keys: dict[str, tuple[str, ...]] = {}
    for source, kinds in group_by.items():
        kinds = kinds or []
        bad = [k for k in kinds if k not in GROUP_KEYS] if isinstance(kinds, list) else kinds
        if not isinstance(kinds, list) or bad:
            raise ConfigError(
                f"params.yaml: split.group_by.{source} must list group keys from {list(GROUP_KEYS)}, "
                f"got {kinds!r}"
            )
        keys[str(source)] = tuple(kinds)
    if buffer is not None and (
        isinstance(buffer, bool) or not isinstance(buffer, int | float) or not buffer >= 0
    ):
        raise ConfigError(
            f"params.yaml: split.spatial_buffer_m must be a distance in metres >= 0 or null, got {buffer!r}"
        )
    return SplitParams(
        salt,
        {s: v / total for s, v in values.items()},
        keys,
        str(ledger),
        None if buffer is None else float(buffer),
    )


def unit_hash(salt: str, key: str) -> float:
    """A number in [0, 1) fixed by (salt, key): the split draw of a component, never random."""
    digest = hashlib.sha256(f"{salt}\x1f{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def hash_split(u: float, ratios: dict[str, float]) -> str:
    edge = 0.0
    for split in SPLITS:
        edge += ratios[split]
        if u < edge:
            return split
    return next(s for s in reversed(SPLITS) if ratios[s] > 0)


def _hash_splits(u: np.ndarray, ratios: dict[str, float]) -> np.ndarray:
    """hash_split of every u at once (same float edges: cumsum adds in the loop's order)."""
    edges = np.cumsum([ratios[s] for s in SPLITS])
    out = np.searchsorted(edges, u, side="right")
    last = next(k for k in reversed(range(len(SPLITS))) if ratios[SPLITS[k]] > 0)
    return np.where(out >= len(SPLITS), last, out).astype(np.int8)


# --- parquet with the bytes earlier builds wrote --------------------------------------------------


def _pandas_metadata(schema: pa.Schema) -> dict[bytes, bytes]:
    # Earlier builds wrote these tables through pandas, which stores its own schema note in the
    # file; a table built here carries the same note, so equal data still gives equal bytes (and
    # dvc.lock hashes) across this change.
    empty = pd.DataFrame({name: pd.Series([], dtype="str") for name in schema.names})
    return pa.Table.from_pandas(empty, schema=schema, preserve_index=False).schema.metadata


def _table(columns: dict[str, pa.Array], schema: pa.Schema) -> pa.Table:
    return pa.table([columns[n] for n in schema.names], schema=schema.with_metadata(_pandas_metadata(schema)))


def _arrow(obj: pd.DataFrame | pa.Table, columns: list[str]) -> pa.Table:
    """The named columns of a DataFrame or Table as an Arrow table of strings (missing: nulls)."""
    if isinstance(obj, pd.DataFrame):
        arrays = [
            pc.cast(pa.array(obj[c].tolist(), from_pandas=True), pa.string())
            if c in obj
            else pa.nulls(len(obj), pa.string())
            for c in columns
        ]
        return pa.table(arrays, names=columns)
    arrays = [
        pc.cast(obj.column(c), pa.string()) if c in obj.schema.names else pa.nulls(len(obj), pa.string())
        for c in columns
    ]
    return pa.table(arrays, names=columns).combine_chunks()


def _codes_of(values: pa.Array | pa.ChunkedArray, what: str) -> np.ndarray:
    """int8 split codes of split names (-1 for null); any other name is an error naming `what`."""
    codes = pc.index_in(values, value_set=_SPLIT_NAMES)
    bad = pc.and_(pc.is_valid(values), pc.is_null(codes))
    if pc.any(bad).as_py():
        found = sorted(set(pc.filter(values, bad).to_pylist()))
        raise UpstreamFormatError(what, f"ledger has splits {found}; expected {list(SPLITS)}")
    return pc.fill_null(codes, -1).to_numpy().astype(np.int8)


def _names(codes: np.ndarray, names: pa.Array) -> pa.Array:
    """Names of int codes (-1 -> null), built by Arrow (no Python string per row)."""
    missing = codes < 0
    return names.take(pa.array(np.where(missing, 0, codes), mask=missing))


# --- ledger ----------------------------------------------------------------------------------


def read_ledger_table(path: Path) -> pa.Table:
    """sample_id, source, split of the last release (LEDGER); an absent file is an empty ledger."""
    if not path.exists():
        log.warning("%s: no ledger; every component is assigned by its hash", path)
        return LEDGER.empty_table()
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise UpstreamFormatError(path, f"ledger is not readable parquet ({exc})") from exc
    missing = [c for c in ("sample_id", "split") if c not in table.schema.names]
    if missing:
        raise UpstreamFormatError(path, f"ledger lacks columns {missing}; expected {LEDGER.names}")
    table = _arrow(table, list(LEDGER.names))
    _codes_of(table.column("split"), str(path))
    ids = table.column("sample_id")
    counts = pc.value_counts(ids)
    dupes = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(dupes):
        raise UpstreamFormatError(path, f"ledger lists sample ids twice: {sorted(dupes.to_pylist())[:5]}")
    return table


def read_ledger(path: Path) -> pd.DataFrame:
    """sample_id -> split of the last release, as a DataFrame; an absent file is an empty ledger."""
    table = read_ledger_table(path)
    return pd.DataFrame({c: np.array(table.column(c).to_pylist(), dtype=object) for c in LEDGER.names})


def ledger_codes(ledger: pd.DataFrame | pa.Table, ids: pa.Array) -> np.ndarray:
    """Per sample of `ids`, the int8 code of its ledger split (-1 when it has no entry)."""
    table = _arrow(ledger, ["sample_id", "split"])
    if not table.num_rows:
        return np.full(len(ids), -1, dtype=np.int8)
    codes = _codes_of(table.column("split"), "ledger")
    at = pc.fill_null(pc.index_in(ids, value_set=table.column("sample_id")), -1).to_numpy()
    return np.where(at >= 0, codes[np.maximum(at, 0)], -1).astype(np.int8)


def updated_ledger(ledger: pd.DataFrame | pa.Table, assignments: pd.DataFrame | pa.Table) -> pa.Table:
    """The current assignments, plus old entries of samples that are absent now.

    Keeping absent samples means a sample that disappears upstream and comes back later returns
    to its old split instead of being drawn again.
    """
    current = _arrow(assignments, list(LEDGER.names))
    old = _arrow(ledger, list(LEDGER.names))
    kept = old.filter(pc.invert(pc.is_in(old.column("sample_id"), value_set=current.column("sample_id"))))
    merged = pa.concat_tables([current, kept])
    merged = merged.take(pc.sort_indices(merged.column("sample_id")))
    return _table({c: merged.column(c).combine_chunks() for c in LEDGER.names}, LEDGER)


# --- components and assignment ---------------------------------------------------------------


@dataclass
class Components:
    """Leak-free components: per sample an index, per component its canonical key and draw."""

    index: np.ndarray  # per sample: component 0..n-1, numbered by the smallest member position
    first: np.ndarray  # per component: its smallest sample position
    canonical: pa.Array  # per component: canonical key (the hash draw's key)
    public: pa.Array  # per component: the key written to outputs
    u: np.ndarray  # per component: unit_hash(salt, canonical)

    def __len__(self) -> int:
        return len(self.first)


def build_components(inputs: SplitInputs, members: prod.ClusterMembers, sp: SplitParams) -> Components:
    """Union samples with their dedup cluster, their source's group keys and touching footprints."""
    n = len(inputs)
    edge_a: list[np.ndarray] = []
    edge_b: list[np.ndarray] = []
    nodes = n
    if len(members.pos):
        edge_a.append(members.pos)
        edge_b.append(n + members.cluster)
        nodes += int(members.cluster.max()) + 1
    # Group keys "<kind>:<source>:<value>", one node per distinct key.
    sources = inputs.source_names
    key_pos: list[np.ndarray] = []
    key_text: list[pa.Array] = []
    for kind in GROUP_KEYS:
        value = inputs.groups[kind]
        if value.null_count == len(value):
            continue
        keys = pc.binary_join_element_wise(kind, sources, value, ":")
        valid = pc.is_valid(keys)
        key_pos.append(np.flatnonzero(valid.to_numpy(zero_copy_only=False)))
        key_text.append(keys.filter(valid))
    sorted_keys = pa.array([], pa.string())
    key_rank = np.zeros(0, dtype=np.int64)
    strong_pos = np.concatenate(key_pos) if key_pos else np.zeros(0, dtype=np.int64)
    if key_text:
        encoded = pc.dictionary_encode(pa.concat_arrays(key_text))
        order = pc.sort_indices(encoded.dictionary).to_numpy()
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        sorted_keys = encoded.dictionary.take(pa.array(order))
        key_rank = rank[encoded.indices.to_numpy()]
        edge_a.append(strong_pos)
        edge_b.append(nodes + encoded.indices.to_numpy().astype(np.int64))
        nodes += len(order)
    if sp.spatial_buffer_m is not None and inputs.has_box.sum() > 1:
        at = np.flatnonzero(inputs.has_box)
        a, b = touching_pairs(inputs.boxes[at], sp.spatial_buffer_m)
        edge_a.append(at[a])
        edge_b.append(at[b])
    empty = np.zeros(0, dtype=np.int64)
    label = components(
        nodes,
        np.concatenate(edge_a) if edge_a else empty,
        np.concatenate(edge_b) if edge_b else empty,
    )[:n]
    # Every component holds a sample, and sample nodes come first: its label is its smallest
    # sample position, which is also its smallest sample id (samples are sorted by id).
    first, index = np.unique(label, return_inverse=True)
    # Canonical key: the smallest group key in the component if it has one, so that new images
    # joining an observer, session or block keep the component's key (and its hash draw);
    # otherwise the smallest sample id, which is also the dedup cluster's id.
    best = np.full(len(first), np.iinfo(np.int64).max, dtype=np.int64)
    if len(key_rank):
        np.minimum.at(best, index[strong_pos], key_rank)
    strong = best < np.iinfo(np.int64).max
    fallback = pc.binary_join_element_wise("sample", inputs.ids.take(pa.array(first)), ":")
    if strong.any():
        chosen = sorted_keys.take(pa.array(np.where(strong, best, 0)))
        canonical = pc.if_else(pa.array(strong), chosen, fallback)
    else:
        canonical = fallback
    u = np.empty(len(first), dtype=np.float64)
    for lo in range(0, len(first), 1 << 16):
        chunk = canonical.slice(lo, 1 << 16).to_pylist()
        u[lo : lo + len(chunk)] = [unit_hash(sp.salt, k) for k in chunk]
    public = public_keys(canonical, inputs.ids.take(pa.array(first)))
    return Components(index.astype(np.int64), first.astype(np.int64), canonical, public, u)


def public_keys(canonical: pa.Array, smallest: pa.Array) -> pa.Array:
    """Component keys fit for public outputs: a key made of a personal value (an iNat user id)
    becomes `<kind>:<source>:#<the component's smallest sample id>`.

    Hashing would not hide the value: user ids are small integers and the salt is public, so a
    dictionary of every id's hash takes seconds. The member's sample id is already in the same
    row; the hash draw still uses the canonical key, so no split changes.
    """
    personal = pa.array(np.zeros(len(canonical), dtype=bool))
    for kind in PERSONAL_KEYS:
        personal = pc.or_(personal, pc.starts_with(canonical, f"{kind}:"))
    if not pc.any(personal).as_py():
        return canonical
    parts = pc.split_pattern(canonical, ":", max_splits=2)
    masked = pc.binary_join_element_wise(
        pc.list_element(parts, 0),
        pc.list_element(parts, 1),
        pc.binary_join_element_wise("#", smallest, ""),
        ":",
    )
    return pc.if_else(personal, masked, canonical)


@dataclass
class Decision:
    split: np.ndarray  # int8 per sample
    how: np.ndarray  # int8 per sample: index into ASSIGNED_BY
    moved: np.ndarray  # bool per sample: its ledger split differs from its split


def decide(comp: Components, official: np.ndarray, led: np.ndarray, sp: SplitParams) -> Decision:
    """Split every sample from its component, official split and ledger split (all array codes)."""
    c, size = comp.index, len(comp)
    pinned = official >= VAL
    free = ~pinned
    pin_val = np.zeros(size, dtype=bool)
    pin_val[c[official == VAL]] = True
    pin_test = np.zeros(size, dtype=bool)
    pin_test[c[official == TEST]] = True
    any_pinned = pin_val | pin_test
    has_ot = np.zeros(size, dtype=bool)
    has_ot[c[free & (official == TRAIN)]] = True
    # Splits the free members may take without making the component span a split that upstream
    # did not give it: official-train stays train or is carved into test (never test beside an
    # official val); without official-train, beside pinned members only their splits.
    allowed = np.ones((size, 3), dtype=bool)
    allowed[has_ot, VAL] = False
    allowed[has_ot & pin_val, TEST] = False
    beside = ~has_ot & any_pinned
    allowed[beside, TRAIN] = False
    allowed[beside, VAL] = pin_val[beside]
    allowed[beside, TEST] = pin_test[beside]
    # Default split: beside pinned members, official-train stays train and the others join the
    # pinned split (val first); carved test from official-train components; else the hash draw.
    default = _hash_splits(comp.u, sp.ratios)
    default[has_ot] = np.where(comp.u[has_ot] < sp.carve_test, TEST, TRAIN)
    default[any_pinned & has_ot] = TRAIN
    default[beside] = np.where(pin_val[beside], VAL, TEST)
    # Ledger votes of the free members.
    votes = np.zeros((size, 3), dtype=np.int64)
    in_ledger = free & (led >= 0)
    np.add.at(votes, (c[in_ledger], led[in_ledger].astype(np.int64)), 1)
    has_ledger = votes.sum(axis=1) > 0
    only = np.argmax(votes > 0, axis=1)
    agreed = has_ledger & ((votes > 0).sum(axis=1) == 1) & allowed[np.arange(size), only]
    allowed_votes = np.where(allowed, votes, 0)
    majority = np.argmax(allowed_votes, axis=1)  # first maximum: ties to train > val > test
    f_split = np.where(
        agreed, only, np.where(has_ledger & (allowed_votes.sum(axis=1) > 0), majority, default)
    )
    f_how = np.where(
        agreed, LEDGER_HOW, np.where(has_ledger, MERGE_HOW, np.where(any_pinned, OFFICIAL_HOW, HASH_HOW))
    )
    split = np.where(pinned, official, f_split[c]).astype(np.int8)
    how = np.where(pinned, OFFICIAL_HOW, f_how[c]).astype(np.int8)
    return Decision(split, how, (led >= 0) & (led != split))


@dataclass
class Assignment:
    """The split of every sample, with why, as columns (`frame`/`moved` give DataFrames)."""

    table: pa.Table  # sample_id, source, component, split, assigned_by, official_split, ledger_split
    components: Components
    decision: Decision

    @property
    def frame(self) -> pd.DataFrame:
        """The assignment as a DataFrame (for people and tests; the stage keeps to `table`)."""
        return pd.DataFrame(
            {c: np.array(self.table.column(c).to_pylist(), dtype=object) for c in self.table.schema.names}
        )

    @property
    def moved(self) -> pd.DataFrame:
        """Samples whose ledger split differs from their split now: from/to/reason."""
        t = self.table.filter(pa.array(self.decision.moved))
        return pd.DataFrame(
            {
                "sample_id": np.array(t.column("sample_id").to_pylist(), dtype=object),
                "source": np.array(t.column("source").to_pylist(), dtype=object),
                "component": np.array(t.column("component").to_pylist(), dtype=object),
                "from_split": np.array(t.column("ledger_split").to_pylist(), dtype=object),
                "to_split": np.array(t.column("split").to_pylist(), dtype=object),
                "reason": np.array(t.column("assigned_by").to_pylist(), dtype=object),
            }
        )


def assign_inputs(
    inputs: SplitInputs, members: prod.ClusterMembers, led: np.ndarray, sp: SplitParams
) -> Assignment:
    """Split every sample of `inputs` (see the module docstring); `led`: ledger split codes."""
    comp = build_components(inputs, members, sp)
    decision = decide(comp, inputs.official, led, sp)
    table = pa.table(
        {
            "sample_id": inputs.ids,
            "source": inputs.source_names,
            "component": comp.public.take(pa.array(comp.index)),
            "split": _names(decision.split, _SPLIT_NAMES),
            "assigned_by": _names(decision.how, _HOW_NAMES),
            "official_split": _names(inputs.official, _SPLIT_NAMES),
            "ledger_split": _names(led, _SPLIT_NAMES),
        }
    )
    return Assignment(table, comp, decision)


def assign(
    samples: pd.DataFrame, clusters: pd.DataFrame, ledger: pd.DataFrame | pa.Table, sp: SplitParams
) -> Assignment:
    """Split every sample of a sample DataFrame (the stage reads its inputs by batch instead)."""
    inputs = inputs_from_frame(samples, sp.group_by)
    members = prod.ClusterMembers.empty()
    if len(clusters):
        table = _arrow(clusters, ["sample_id", "cluster_id"])
        table = table.append_column("rank", pa.array(clusters["rank"].astype(int).to_numpy()))
        members = members_from_table(table, inputs.ids)
    return assign_inputs(inputs, members, ledger_codes(ledger, inputs.ids), sp)


def check_leakage(assignment: pd.DataFrame | pa.Table) -> dict[str, Any]:
    """Fail unless every component keeps the documented guarantee; return the upstream overlap.

    Guarantee, per component: members without an official val/test split ("free") share one
    split; members with an official val/test split are in it; and a component that spans two
    splits spans only splits that upstream itself gave its members (official-train free members
    count as train). So test sits beside another split only where upstream put a member in test.
    """
    t = _arrow(assignment, ["sample_id", "component", "split", "official_split"])
    split = split_codes(t.column("split"), "split assignments")
    official = split_codes(t.column("official_split"), "split assignments")
    off_pin = np.flatnonzero((official >= VAL) & (official != split))
    if len(off_pin):
        k = int(off_pin[0])
        raise TidepoolError(
            f"split leakage check: component {t.column('component')[k].as_py()!r} puts official "
            f"{SPLITS[official[k]]} sample {t.column('sample_id')[k].as_py()!r} in {SPLITS[split[k]]}"
        )
    encoded = pc.dictionary_encode(t.column("component")).combine_chunks()
    code = encoded.indices.to_numpy()
    keys = encoded.dictionary
    size = len(keys)
    bit = (1 << split.astype(np.int64)).astype(np.uint8)
    spanned = np.zeros(size, dtype=np.uint8)
    np.bitwise_or.at(spanned, code, bit)
    free_bits = np.zeros(size, dtype=np.uint8)
    free = official < VAL
    np.bitwise_or.at(free_bits, code[free], bit[free])
    upstream = np.zeros(size, dtype=np.uint8)
    has_off = official >= 0
    np.bitwise_or.at(upstream, code[has_off], (1 << official[has_off].astype(np.int64)).astype(np.uint8))
    spanning = np.bitwise_count(spanned) > 1
    failing = spanning & ((np.bitwise_count(free_bits) > 1) | ((spanned & ~upstream) != 0))
    if failing.any():
        order = pc.sort_indices(keys).to_numpy()
        k = int(next(i for i in order if failing[i]))
        all_splits = [s for b, s in enumerate(SPLITS) if spanned[k] >> b & 1]
        if np.bitwise_count(free_bits[k]) > 1:
            free_splits = sorted(s for b, s in enumerate(SPLITS) if free_bits[k] >> b & 1)
            detail = f"members without an official val/test split are in {free_splits}"
        else:
            up = [s for b, s in enumerate(SPLITS) if upstream[k] >> b & 1]
            detail = f"upstream's official splits here are only {up}"
        raise TidepoolError(
            f"split leakage check: component {keys[k].as_py()!r} spans splits {all_splits} ({detail})"
        )
    sizes = np.bincount(code, minlength=size)
    overlap = Counter(
        "+".join(s for b, s in enumerate(SPLITS) if spanned[k] >> b & 1) for k in np.flatnonzero(spanning)
    )
    return {
        "components_spanning_official_splits": dict(sorted(overlap.items())),
        "samples_in_those_components": int(sizes[spanning].sum()),
    }


# --- metrics and report ----------------------------------------------------------------------


def point_files(root: Path, sources: list[str]) -> list[Path]:
    """The points tables of `sources` that have the columns class counts need."""
    out = []
    for source in sources:
        path = root / "data" / "interim" / source / "points.parquet"
        if path.exists() and all(c in pq.read_schema(path).names for c in POINT_COLUMNS):
            out.append(path)
    return out


def class_counts(
    inputs: SplitInputs,
    members: prod.ClusterMembers,
    split: np.ndarray,
    products: list[prod.Product],
    points: list[Path],
) -> dict[str, tuple[np.ndarray, prod.ClassCounts]]:
    """Per product: (images per split, class counts) of the samples it takes."""
    chosen = {p.name: prod.select_samples(p, inputs.facts, members) for p in products}
    by_points = prod.point_class_counts(
        {p.name: (p.label_level, chosen[p.name]) for p in products if p.unit == "point"},
        points,
        inputs.ids,
        split,
        len(SPLITS),
    )
    out = {}
    for p in products:
        images = np.bincount(split[chosen[p.name]], minlength=len(SPLITS))
        if p.unit == "point":
            out[p.name] = (images, by_points[p.name])
        else:
            counts = prod.image_class_counts(inputs.facts, p.label_level, chosen[p.name], split, len(SPLITS))
            out[p.name] = (images, counts)
    return out


# --- stage -----------------------------------------------------------------------------------


def would_move_without_ledger(
    result: Assignment, official: np.ndarray, led: np.ndarray, sp: SplitParams
) -> int:
    """Ledger samples that a ledger-less assignment would put elsewhere: what the ledger prevents."""
    in_ledger = led >= 0
    if not in_ledger.any():
        return 0
    fresh = decide(result.components, official, np.full(len(led), -1, dtype=np.int8), sp)
    return int((fresh.split[in_ledger] != led[in_ledger]).sum())


def run(params: dict[str, Any], root: Path, update_ledger: bool = False) -> dict[str, Any]:
    sp = split_params(params)
    sources = list(require(params, "sources"))
    products = prod.products_from_params(params)
    levels = {p.label_level for p in products if p.unit == "image"}
    inputs = read_split_inputs(root, sources, sp.group_by, levels)
    members = read_cluster_members(root / "data" / "dedup" / "clusters.parquet", inputs.ids)
    ledger_path = root / sp.ledger
    ledger = read_ledger_table(ledger_path)
    led = ledger_codes(ledger, inputs.ids)
    result = assign_inputs(inputs, members, led, sp)
    overlap = check_leakage(result.table)
    points = point_files(root, sources)
    # Nothing is written unless the assignments also pass the check rebuilt from the inputs.
    checked = verify_assignments(
        root, sources, sp.group_by, sp.spatial_buffer_m, result.table.select(["sample_id", "split"]), points
    )
    counts = class_counts(inputs, members, result.decision.split, products, points)
    per_product = product_metrics(counts, sp.ratios)
    would_move = would_move_without_ledger(result, inputs.official, led, sp)
    m = split_metrics(result, overlap, per_product, ledger, would_move, checked)
    t = result.table
    write_parquet(
        root / "data" / "split" / "assignments.parquet",
        _table({c: t.column(c).combine_chunks() for c in ASSIGNMENTS.names}, ASSIGNMENTS),
    )
    write_parquet(
        root / "data" / "split" / "provenance.parquet",
        _table({c: t.column(c).combine_chunks() for c in PROVENANCE.names}, PROVENANCE),
    )
    write_text(root / "data" / "split" / "report.md", report_markdown(m, result.moved, sp, per_product))
    write_json(root / "metrics" / "split.json", m)
    write_plots(root / PLOTS, counts)
    if update_ledger:
        write_parquet(ledger_path, updated_ledger(ledger, t))
    return m


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.split", description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=None)
    parser.add_argument(
        "--update-ledger",
        action="store_true",
        help="also write the assignments into split.ledger (release process)",
    )
    args = parser.parse_args(argv)
    m = run(load_params(args.params), repo_root(), update_ledger=args.update_ledger)
    by = m["by_split"]
    print(
        f"split: {m['samples']} samples in {m['components']} components: train {by['train']}, "
        f"val {by['val']}, test {by['test']}; {m['ledger']['moved']} moved"
        + ("; ledger updated" if args.update_ledger else "")
    )
    return 0


if __name__ == "__main__":
    run_main(main)
