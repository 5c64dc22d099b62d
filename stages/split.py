"""split: train/val/test for every sample, by leak-free components, stable as the sources grow.

`python -m stages.split [--update-ledger]` reads every `data/interim/<source>/samples.parquet`
(and `points.parquet` for per-class counts), `data/dedup/clusters.parquet` and the ledger
(`split.ledger`), and writes `data/split/assignments.parquet` (ASSIGNMENTS),
`data/split/report.md` and `metrics/split.json`. `--update-ledger` also writes the assignments
into the ledger (the release process runs it). docs/dedup-split.md states the method and the
guarantees; in short:

1. Components (union-find): a sample is united with its dedup cluster and with the
   `split.group_by` keys of its source (`<key>:<source>:<value>`, so keys of different kinds or
   sources never collide). All points of an image are one sample, so they share its split.
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
3. Leakage check: free members share one split, pinned members sit on their official split, and
   a component spans several splits only where upstream's own official splits put its members
   (e.g. an iNat observer in train and val). Anything else fails the stage naming the component.
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
import pyarrow.parquet as pq

from stages import products as prod
from stages.cli import run_main
from stages.config import load_params, require
from stages.dedup import load_samples, read_clusters
from stages.errors import ConfigError, TidepoolError, UpstreamFormatError
from stages.fsutil import repo_root, write_json, write_parquet, write_text
from stages.unionfind import components

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Merge ties go to the split earlier here: a sample that was ever trained on should not become
# an evaluation sample of a later release, and val/test only ever lose members to train.
MERGE_PRECEDENCE = ("train", "val", "test")
GROUP_KEYS = ("region", "session", "spatial_block", "observer")
ASSIGNED_BY = ("ledger", "official", "hash", "merge")
SPLIT_COLUMNS = (
    "sample_id", "source", "official_split", "n_points", "mask_path", "labels", "phash", *GROUP_KEYS
)
POINT_COLUMNS = ("point_id", "sample_id", "benthic_attribute_name", "growth_form_name", "top_level_category")

ASSIGNMENTS = pa.schema(
    [
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("component", pa.string()),  # the component's canonical key
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


@dataclass(frozen=True)
class SplitParams:
    salt: str
    ratios: dict[str, float]  # normalised, keys SPLITS
    group_by: dict[str, tuple[str, ...]]
    ledger: str

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
        bad = [k for k in kinds if k not in GROUP_KEYS]
        if not isinstance(kinds, list) or bad:
            raise ConfigError(
                f"params.yaml: split.group_by.{source} must list group keys from {list(GROUP_KEYS)}, "
                f"got {kinds!r}"
            )
        keys[str(source)] = tuple(kinds)
    return SplitParams(salt, {s: v / total for s, v in values.items()}, keys, str(ledger))


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


# --- ledger ----------------------------------------------------------------------------------


def read_ledger(path: Path) -> pd.DataFrame:
    """sample_id -> split of the last release; an absent file is an empty ledger."""
    if not path.exists():
        log.warning("%s: no ledger; every component is assigned by its hash", path)
        return pd.DataFrame({c: pd.Series(dtype=object) for c in LEDGER.names})
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise UpstreamFormatError(path, f"ledger is not readable parquet ({exc})") from exc
    missing = [c for c in ("sample_id", "split") if c not in table.schema.names]
    if missing:
        raise UpstreamFormatError(path, f"ledger lacks columns {missing}; expected {LEDGER.names}")
    df = pd.DataFrame({c: table.column(c).to_pylist() for c in LEDGER.names if c in table.schema.names})
    if "source" not in df:
        df["source"] = None
    bad = sorted(set(df["split"]) - set(SPLITS))
    if bad:
        raise UpstreamFormatError(path, f"ledger has splits {bad}; expected {list(SPLITS)}")
    dupes = df["sample_id"][df["sample_id"].duplicated()]
    if len(dupes):
        raise UpstreamFormatError(path, f"ledger lists sample ids twice: {sorted(dupes)[:5]}")
    return df[list(LEDGER.names)]


def updated_ledger(ledger: pd.DataFrame, assignments: pd.DataFrame) -> pa.Table:
    """The current assignments, plus old entries of samples that are absent now.

    Keeping absent samples means a sample that disappears upstream and comes back later returns
    to its old split instead of being drawn again.
    """
    current = assignments[["sample_id", "source", "split"]]
    kept = ledger[~ledger["sample_id"].isin(set(current["sample_id"]))]
    merged = pd.concat([current, kept[list(LEDGER.names)]], ignore_index=True)
    merged = merged.sort_values("sample_id", kind="stable").reset_index(drop=True)
    return pa.Table.from_pandas(merged, schema=LEDGER, preserve_index=False)


# --- components and assignment ---------------------------------------------------------------


def _obj(series: pd.Series) -> np.ndarray:
    return np.array([None if v is None or v is pd.NA or v != v else str(v) for v in series], dtype=object)


@dataclass
class Components:
    label: np.ndarray  # per sample: the smallest sample position of its component
    canonical: dict[int, str]  # label -> canonical key


def build_components(
    samples: pd.DataFrame, clusters: pd.DataFrame, group_by: dict[str, tuple[str, ...]]
) -> Components:
    """Union samples with their dedup cluster and their source's group keys."""
    n = len(samples)
    ids = _obj(samples["sample_id"])
    sources = _obj(samples["source"])
    pos_of = {s: i for i, s in enumerate(ids)}
    key_ids: dict[str, int] = {}
    edge_a: list[int] = []
    edge_b: list[int] = []
    strong: list[tuple[int, str]] = []  # (sample position, group key)

    def link(i: int, key: str) -> None:
        node = key_ids.setdefault(key, n + len(key_ids))
        edge_a.append(i)
        edge_b.append(node)

    if len(clusters):
        for sid, cid in zip(clusters["sample_id"].tolist(), clusters["cluster_id"].tolist()):
            i = pos_of.get(str(sid))
            if i is not None:  # a cluster member of a source not read now: nothing to unite
                link(i, f"dup:{cid}")
    for kind in GROUP_KEYS:
        if kind not in samples:
            continue
        values = _obj(samples[kind])
        for i in range(n):
            v = values[i]
            if v is not None and kind in group_by.get(sources[i], ()):
                key = f"{kind}:{sources[i]}:{v}"
                link(i, key)
                strong.append((i, key))
    label = components(n + len(key_ids), np.array(edge_a, dtype=np.int64), np.array(edge_b, dtype=np.int64))[
        :n
    ]
    # Canonical key: the smallest group key in the component if it has one, so that new images
    # joining an observer, session or block keep the component's key (and its hash draw);
    # otherwise the smallest sample id, which is also the dedup cluster's id.
    canonical: dict[int, str] = {}
    for i, key in strong:
        lab = int(label[i])
        if lab not in canonical or key < canonical[lab]:
            canonical[lab] = key
    for lab in np.unique(label).tolist():
        canonical.setdefault(lab, f"sample:{ids[lab]}")
    return Components(label, canonical)


@dataclass
class Assignment:
    frame: pd.DataFrame  # sample_id, source, component, split, assigned_by, official_split, ledger_split
    moved: pd.DataFrame  # sample_id, source, component, from_split, to_split, reason


def _free_split(
    allowed: list[str],
    ledger_splits: list[str],
    pinned: set[str],
    has_official_train: bool,
    u: float,
    sp: SplitParams,
) -> tuple[str, str]:
    """(F, how) for the free members of one component."""
    if ledger_splits:
        distinct = set(ledger_splits)
        if len(distinct) == 1 and ledger_splits[0] in allowed:
            return ledger_splits[0], "ledger"
        votes = Counter(s for s in ledger_splits if s in allowed)
        if votes:
            best = max(votes.items(), key=lambda kv: (kv[1], -MERGE_PRECEDENCE.index(kv[0])))
            return best[0], "merge"
        return _default_split(allowed, pinned, has_official_train, u, sp), "merge"
    how = "official" if pinned else "hash"
    return _default_split(allowed, pinned, has_official_train, u, sp), how


def _default_split(
    allowed: list[str], pinned: set[str], has_official_train: bool, u: float, sp: SplitParams
) -> str:
    if pinned:
        # Beside upstream's val/test, official-train members stay train; others join the pinned
        # split (val first), so the component spans no split that upstream did not put it in.
        prefer = ["train"] if has_official_train else [s for s in ("val", "test") if s in pinned]
        return next((s for s in prefer if s in allowed), allowed[0])
    if has_official_train:
        return "test" if u < sp.carve_test and "test" in allowed else "train"
    return hash_split(u, sp.ratios)


def assign(
    samples: pd.DataFrame, clusters: pd.DataFrame, ledger: pd.DataFrame, sp: SplitParams
) -> Assignment:
    """Split every sample (samples sorted by sample_id; see the module docstring)."""
    n = len(samples)
    ids = _obj(samples["sample_id"])
    sources = _obj(samples["source"])
    official = _obj(samples["official_split"]) if "official_split" in samples else np.full(n, None, object)
    bad = sorted({o for o in official if o is not None and o not in SPLITS})
    if bad:
        raise TidepoolError(f"sample tables: official_split values {bad} are not one of {list(SPLITS)}")
    ledger_of = dict(zip(ledger["sample_id"].astype(str), ledger["split"].astype(str)))
    led = np.array([ledger_of.get(s) for s in ids], dtype=object)
    comp = build_components(samples, clusters, sp.group_by)

    # Plain Python over plain lists: components are mostly tiny, and per-component numpy calls
    # would cost more than the work (a million components must take seconds, not minutes).
    split: list[str | None] = [None] * n
    how: list[str | None] = [None] * n
    reason: list[str | None] = [None] * n
    off_l, led_l, lab_l = official.tolist(), led.tolist(), comp.label.tolist()
    order = np.argsort(comp.label, kind="stable").tolist()
    lo = 0
    while lo < n:
        lab = lab_l[order[lo]]
        hi = lo + 1
        while hi < n and lab_l[order[hi]] == lab:
            hi += 1
        members = order[lo:hi]
        lo = hi
        free = [m for m in members if off_l[m] not in ("val", "test")]
        pinned = {off_l[m] for m in members if off_l[m] in ("val", "test")}
        has_official_train = any(off_l[m] == "train" for m in free)
        # Splits the free members may take without making the component span a split that
        # upstream did not give it: official-train stays train or is carved into test (never
        # test beside an official val); without official-train, beside pinned members only their
        # splits.
        if has_official_train:
            allowed = ["train"] if "val" in pinned else ["train", "test"]
        elif pinned:
            allowed = [s for s in SPLITS if s in pinned]
        else:
            allowed = list(SPLITS)
        u = unit_hash(sp.salt, comp.canonical[lab])
        ledger_splits = [led_l[m] for m in free if led_l[m] is not None]
        f_split, f_how = _free_split(allowed, ledger_splits, pinned, has_official_train, u, sp)
        for m in members:
            if off_l[m] in ("val", "test"):
                split[m], how[m] = off_l[m], "official"
            else:
                split[m], how[m] = f_split, f_how
            if led_l[m] is not None and led_l[m] != split[m]:
                reason[m] = how[m]  # merge or official: agreeing ledger entries never move
    split_a = np.array(split, dtype=object)
    reason_a = np.array(reason, dtype=object)

    component = np.array([comp.canonical[int(lab)] for lab in comp.label], dtype=object)
    frame = pd.DataFrame(
        {
            "sample_id": ids,
            "source": sources,
            "component": component,
            "split": split_a,
            "assigned_by": np.array(how, dtype=object),
            "official_split": official,
            "ledger_split": led,
        }
    )
    moved_mask = np.array([r is not None for r in reason], dtype=bool)
    moved = pd.DataFrame(
        {
            "sample_id": ids[moved_mask],
            "source": sources[moved_mask],
            "component": component[moved_mask],
            "from_split": led[moved_mask],
            "to_split": split_a[moved_mask],
            "reason": reason_a[moved_mask],
        }
    )
    return Assignment(frame, moved)


def check_leakage(frame: pd.DataFrame) -> dict[str, Any]:
    """Fail unless every component keeps the documented guarantee; return the upstream overlap.

    Guarantee, per component: members without an official val/test split ("free") share one
    split; members with an official val/test split are in it; and a component that spans two
    splits spans only splits that upstream itself gave its members (official-train free members
    count as train). So test sits beside another split only where upstream put a member in test.
    """
    official = frame["official_split"].to_numpy(dtype=object)
    splits = frame["split"].to_numpy(dtype=object)
    pinned = np.isin(official, ["val", "test"])
    off_pin = np.flatnonzero(pinned & (official != splits))
    if len(off_pin):
        k = off_pin[0]
        raise TidepoolError(
            f"split leakage check: component {frame['component'].iloc[k]!r} puts official {official[k]} "
            f"sample {frame['sample_id'].iloc[k]!r} in {splits[k]}"
        )
    n_splits = frame.groupby("component", sort=True)["split"].nunique()
    overlap_components: Counter[str] = Counter()
    overlap_samples = 0
    spanning = frame[frame["component"].isin(set(n_splits.index[n_splits > 1]))]
    for comp_key, grp in spanning.groupby("component", sort=True):
        all_splits = sorted(set(grp["split"]), key=SPLITS.index)
        off = grp["official_split"].tolist()
        free = [o not in ("val", "test") for o in off]
        free_splits = sorted({s for s, f in zip(grp["split"], free) if f})
        upstream = {o for o in off if isinstance(o, str)}  # pandas may hold a missing one as NaN
        if len(free_splits) > 1:
            detail = f"members without an official val/test split are in {free_splits}"
        elif not set(all_splits) <= upstream:
            detail = f"upstream's official splits here are only {sorted(upstream, key=SPLITS.index)}"
        else:
            overlap_components["+".join(all_splits)] += 1
            overlap_samples += len(grp)
            continue
        raise TidepoolError(
            f"split leakage check: component {comp_key!r} spans splits {all_splits} ({detail})"
        )
    return {
        "components_spanning_official_splits": dict(sorted(overlap_components.items())),
        "samples_in_those_components": overlap_samples,
    }


# --- metrics and report ----------------------------------------------------------------------


def _per_split(values: pd.Series) -> dict[str, int]:
    counts = Counter(values.tolist())
    return {s: int(counts.get(s, 0)) for s in SPLITS}


def product_metrics(
    samples: pd.DataFrame,
    clusters: pd.DataFrame,
    points: pd.DataFrame | None,
    frame: pd.DataFrame,
    products: list[prod.Product],
) -> dict[str, Any]:
    split_of = dict(zip(frame["sample_id"], frame["split"]))
    out: dict[str, Any] = {}
    for p in products:
        chosen = prod.product_samples(p, samples, clusters)
        image_splits = [split_of[s] for s in chosen["sample_id"].astype(str)]
        entry: dict[str, Any] = {"images": _per_split(pd.Series(image_splits, dtype=object))}
        if p.unit == "point":
            pts = prod.product_points(p, points, chosen) if points is not None else points
            if pts is None:
                pts = pd.DataFrame({c: pd.Series(dtype=object) for c in POINT_COLUMNS})
            pt_splits = [split_of[s] for s in pts["sample_id"].astype(str)]
            entry["samples"] = _per_split(pd.Series(pt_splits, dtype=object))
            classes = prod.class_split_counts(prod.point_classes(p, pts), pt_splits)
        else:
            entry["samples"] = entry["images"]
            classes = prod.class_split_counts(prod.sample_classes(p, chosen), image_splits)
        entry["classes"] = {c: {s: per.get(s, 0) for s in SPLITS} for c, per in classes.items()}
        entry["warnings"] = {
            "no_val": sorted(c for c, per in entry["classes"].items() if per["val"] == 0),
            "no_test": sorted(c for c, per in entry["classes"].items() if per["test"] == 0),
        }
        out[p.name] = entry
    return out


MAX_LISTED_MOVES = 1000


def split_metrics(
    result: Assignment,
    overlap: dict[str, Any],
    per_product: dict[str, Any],
    ledger: pd.DataFrame,
    would_move: int,
) -> dict[str, Any]:
    f = result.frame
    comp_sizes = f.groupby("component").size()
    by_source = {
        src: _per_split(grp["split"])
        for src, grp in sorted(f.groupby("source", sort=True), key=lambda kv: kv[0])
    }
    moved = result.moved
    in_ledger = f["ledger_split"].notna()
    return {
        "samples": len(f),
        "by_split": _per_split(f["split"]),
        "by_source": by_source,
        "assigned_by": {k: int((f["assigned_by"] == k).sum()) for k in ASSIGNED_BY},
        "components": int(len(comp_sizes)),
        "largest_component": {
            "component": str(comp_sizes.sort_index().idxmax()) if len(comp_sizes) else None,
            "size": int(comp_sizes.max()) if len(comp_sizes) else 0,
        },
        "official": overlap,
        "ledger": {
            "entries": len(ledger),
            "samples_in_ledger": int(in_ledger.sum()),
            "new_samples": int((~in_ledger).sum()),
            "moved": len(moved),
            "moved_by_reason": dict(sorted(Counter(moved["reason"].tolist()).items())),
            "would_move_without_ledger": would_move,
        },
        "moved": [
            {k: r[k] for k in ("sample_id", "source", "component", "from_split", "to_split", "reason")}
            for r in moved.head(MAX_LISTED_MOVES).to_dict("records")
        ],
        "moved_listed_in_full": len(moved) <= MAX_LISTED_MOVES,
        "products": per_product,
    }


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join("" if v is None else str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


def report_markdown(m: dict[str, Any], moved: pd.DataFrame, sp: SplitParams) -> str:
    ratios = ", ".join(f"{s} {sp.ratios[s]:.3g}" for s in SPLITS)
    parts = [
        "# Split assignments\n",
        f"Salt `{sp.salt}`, ratios {ratios}; {m['samples']} samples in {m['components']} components "
        f"(largest: {m['largest_component']['size']}).\n",
        _md_table(
            ["", *SPLITS],
            [["all samples", *m["by_split"].values()]]
            + [[src, *v.values()] for src, v in m["by_source"].items()],
        ),
        "",
        "## How splits were decided\n",
        _md_table(list(m["assigned_by"]), [list(m["assigned_by"].values())]),
        "",
        "## Products\n",
    ]
    rows = []
    for name, entry in m["products"].items():
        rows.append([name, "samples", *entry["samples"].values()])
        if entry["samples"] != entry["images"]:
            rows.append([name, "images", *entry["images"].values()])
    parts.append(_md_table(["product", "unit", *SPLITS], rows))
    for name, entry in m["products"].items():
        w = entry["warnings"]
        if w["no_val"] or w["no_test"]:
            parts += [
                "",
                f"**{name}**: {len(entry['classes'])} classes; without val samples: "
                f"{', '.join(w['no_val']) or 'none'}; without test samples: "
                f"{', '.join(w['no_test']) or 'none'}.",
            ]
    overlap = m["official"]
    parts += [
        "",
        "## Upstream official-split overlap\n",
        "Components that span splits because upstream's own train/val split puts their members on "
        "both sides (e.g. one iNat observer in train and val). Allowed and counted; test only where "
        "upstream put a member in test.\n",
        _md_table(
            ["splits", "components"],
            [[k, v] for k, v in overlap["components_spanning_official_splits"].items()],
        )
        if overlap["components_spanning_official_splits"]
        else "None.",
        "",
        "## Ledger\n",
        f"{m['ledger']['samples_in_ledger']} samples were in the ledger ({m['ledger']['entries']} entries), "
        f"{m['ledger']['new_samples']} are new. Moved: {m['ledger']['moved']}. Without the ledger "
        f"{m['ledger']['would_move_without_ledger']} ledger samples would be in another split.\n",
    ]
    if len(moved):
        parts.append(
            _md_table(
                ["sample", "source", "component", "from", "to", "reason"],
                moved[
                    ["sample_id", "source", "component", "from_split", "to_split", "reason"]
                ].values.tolist(),
            )
        )
    else:
        parts.append("No sample changed split.")
    return "\n".join(parts).rstrip() + "\n"


# --- stage -----------------------------------------------------------------------------------


def load_points(root: Path, sources: list[str]) -> pd.DataFrame | None:
    frames = []
    for source in sources:
        path = root / "data" / "interim" / source / "points.parquet"
        if not path.exists():
            continue
        schema = pq.read_schema(path)
        if all(c in schema.names for c in POINT_COLUMNS):
            frames.append(pq.read_table(path, columns=list(POINT_COLUMNS)))
    if not frames:
        return None
    table = pa.concat_tables(frames)
    return pd.DataFrame({c: table.column(c).to_pylist() for c in POINT_COLUMNS})


def would_move_without_ledger(
    samples: pd.DataFrame,
    clusters: pd.DataFrame,
    ledger: pd.DataFrame,
    sp: SplitParams,
    current: pd.DataFrame,
) -> int:
    """Ledger samples that a ledger-less assignment would put elsewhere: what the ledger prevents."""
    in_ledger = current["ledger_split"].notna().to_numpy()
    if not in_ledger.any():
        return 0
    fresh = assign(samples, clusters, ledger.iloc[0:0], sp).frame
    return int((fresh["split"].to_numpy()[in_ledger] != current["ledger_split"].to_numpy()[in_ledger]).sum())


def run(params: dict[str, Any], root: Path, update_ledger: bool = False) -> dict[str, Any]:
    sp = split_params(params)
    sources = list(require(params, "sources"))
    products = prod.products_from_params(params)
    samples = load_samples(root, sources, columns=SPLIT_COLUMNS)
    clusters = read_clusters(root / "data" / "dedup" / "clusters.parquet")
    ledger_path = root / sp.ledger
    ledger = read_ledger(ledger_path)
    result = assign(samples, clusters, ledger, sp)
    overlap = check_leakage(result.frame)
    points = load_points(root, sources)
    per_product = product_metrics(samples, clusters, points, result.frame, products)
    m = split_metrics(
        result,
        overlap,
        per_product,
        ledger,
        would_move_without_ledger(samples, clusters, ledger, sp, result.frame),
    )
    table = pa.Table.from_pandas(
        result.frame[list(ASSIGNMENTS.names)], schema=ASSIGNMENTS, preserve_index=False
    )
    write_parquet(root / "data" / "split" / "assignments.parquet", table)
    provenance = pa.Table.from_pandas(
        result.frame[list(PROVENANCE.names)], schema=PROVENANCE, preserve_index=False
    )
    write_parquet(root / "data" / "split" / "provenance.parquet", provenance)
    write_text(root / "data" / "split" / "report.md", report_markdown(m, result.moved, sp))
    write_json(root / "metrics" / "split.json", m)
    if update_ledger:
        write_parquet(ledger_path, updated_ledger(ledger, result.frame))
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
