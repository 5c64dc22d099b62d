"""dedup: exact and near-duplicate images across all sources, clustered, with a survivor per cluster.

`python -m stages.dedup` reads every `data/interim/<source>/samples.parquet` of `params.sources`
and writes:

- `data/dedup/clusters.parquet`: one row per member of every cluster of two or more samples
  (CLUSTERS), sorted by (cluster_id, rank);
- `data/dedup/summary.md`: the same, for people;
- `metrics/dedup.json`: clusters, duplicate members, pairs per match kind and source pair, the
  near-pair distance histogram, the largest cluster.

Two samples match when they have the same `file_sha256` (exact_file), the same `pixel_sha256`
(exact_pixels: the same raster in another container, e.g. PNG re-saved), or 64-bit pHashes within
`dedup.radius` bits (near: resized or re-encoded copies, consecutive video frames, equal pHashes).
Clusters are the connected components of all matches (union-find), so matching is transitive: a
chain of near pairs can join samples further apart than the radius; those are counted as
`chained_members` so a radius that chains unrelated images shows up.

Ranks follow the survivor rule: `dedup.source_priority` (unlisted sources after the listed ones,
by name), then more points, then having a mask, then more pixels, then the smaller sample id.
Rank 0 is the cluster's survivor; a product that keeps one copy takes its best-ranked usable
member among its own sources (stages/products.py). `cluster_id` is the smallest member sample id:
it depends on the members only, not on row order.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stages import hamming
from stages.cli import run_main
from stages.config import load_params, require
from stages.errors import ConfigError, TidepoolError, UpstreamFormatError
from stages.executor import resolve_jobs
from stages.fsutil import repo_root, write_json, write_parquet, write_text
from stages.unionfind import components, group_edges

log = logging.getLogger(__name__)

KINDS = ("exact_file", "exact_pixels", "near")
SAMPLE_COLUMNS = (
    "sample_id",
    "source",
    "file_sha256",
    "pixel_sha256",
    "phash",
    "width",
    "height",
    "n_points",
    "mask_path",
)

CLUSTERS = pa.schema(
    [
        ("cluster_id", pa.string()),  # smallest member sample_id
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("cluster_size", pa.int32()),
        ("rank", pa.int32()),  # by the survivor rule; 0 = survivor
        ("survivor_id", pa.string()),  # the rank-0 member
        ("match_kinds", pa.list_(pa.string())),  # kinds of the matches this member takes part in
        ("distance", pa.int32()),  # pHash Hamming distance to the survivor (null without pHash)
    ]
)


@dataclass
class DedupResult:
    """Clusters plus the pair statistics that the metrics and summary report."""

    radius: int
    samples: pd.DataFrame  # the input, sorted by sample_id (positions used below)
    clusters: pd.DataFrame  # CLUSTERS rows
    pairs: dict[str, dict[str, int]]  # kind -> "a|b" source pair -> member pairs
    distance_histogram: dict[int, int]  # near pairs per distance


# --- input -----------------------------------------------------------------------------------


def samples_path(root: Path, source: str) -> Path:
    return root / "data" / "interim" / source / "samples.parquet"


def load_samples(root: Path, sources: list[str], columns: tuple[str, ...] = SAMPLE_COLUMNS) -> pd.DataFrame:
    """`columns` of every source's sample table, sorted by sample_id."""
    frames = []
    for source in sources:
        path = samples_path(root, source)
        if not path.exists():
            raise TidepoolError(f"{path}: missing; run `ingest@{source}` first")
        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise UpstreamFormatError(path, f"not a readable parquet file ({exc})") from exc
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise UpstreamFormatError(path, f"sample table lacks columns {missing} (see stages/schema.py)")
        frames.append(pq.read_table(path, columns=list(columns)))
    if not frames:
        raise ConfigError("params.yaml: `sources` lists no source to deduplicate")
    df = samples_frame(pa.concat_tables(frames, promote_options="permissive"))
    dupes = df["sample_id"][df["sample_id"].duplicated()]
    if len(dupes):
        raise TidepoolError(f"sample ids occur in two sample tables: {sorted(dupes.unique())[:5]}")
    return df


def samples_frame(table: pa.Table) -> pd.DataFrame:
    """A sample table as a DataFrame sorted by sample_id, every column Arrow-backed.

    Arrow-backed so a nullable uint64 pHash stays exact (numpy-backed pandas would turn a column
    with nulls into float64 and lose the low bits).
    """
    df = table.to_pandas(types_mapper=pd.ArrowDtype)
    return df.sort_values("sample_id", kind="stable").reset_index(drop=True)


def _strings(series: pd.Series) -> np.ndarray:
    """An object array with None for nulls (pandas string dtypes would give pd.NA)."""
    return np.array([None if pd.isna(v) else str(v) for v in series], dtype=object)


def _phashes(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(positions with a pHash, their pHashes as uint64)."""
    col = df["phash"]
    ok = col.notna().to_numpy()
    idx = np.flatnonzero(ok)
    values = col[ok].to_numpy(dtype=np.uint64)
    return idx, values


# --- survivor rule ---------------------------------------------------------------------------


def survivor_sort_keys(df: pd.DataFrame, source_priority: list[str]) -> pd.DataFrame:
    """Columns whose ascending sort is the survivor rule (best first)."""
    order = {s: i for i, s in enumerate(source_priority)}
    sources = _strings(df["source"])
    unlisted = sorted({s for s in sources if s not in order})
    for s in unlisted:
        order[s] = len(source_priority) + unlisted.index(s)
    points = pd.to_numeric(df["n_points"], errors="coerce").fillna(0).to_numpy(np.int64)
    pixels = pd.to_numeric(df["width"], errors="coerce").fillna(0).to_numpy(np.int64) * pd.to_numeric(
        df["height"], errors="coerce"
    ).fillna(0).to_numpy(np.int64)
    return pd.DataFrame(
        {
            "k_source": [order[s] for s in sources],
            "k_points": -points,
            "k_mask": np.where(df["mask_path"].notna().to_numpy(), 0, 1),
            "k_pixels": -pixels,
            "k_id": _strings(df["sample_id"]),
        },
        index=df.index,
    )


# --- matching --------------------------------------------------------------------------------


def _source_pair(a: str, b: str) -> str:
    return "|".join(sorted((a, b)))


def _pairs_in_groups(keys: np.ndarray, sources: np.ndarray) -> Counter[str]:
    """Member pairs per source pair among positions sharing a key (k members -> k(k-1)/2 pairs)."""
    counts: Counter[str] = Counter()
    if len(keys) == 0:
        return counts
    per_group = pd.DataFrame({"key": keys, "source": sources}).value_counts().reset_index(name="n")
    for _, grp in per_group.groupby("key", sort=True):
        srcs = grp["source"].tolist()
        ns = grp["n"].tolist()
        for x in range(len(srcs)):
            if ns[x] > 1:
                counts[_source_pair(srcs[x], srcs[x])] += ns[x] * (ns[x] - 1) // 2
            for y in range(x + 1, len(srcs)):
                counts[_source_pair(srcs[x], srcs[y])] += ns[x] * ns[y]
    return counts


def find_duplicates(
    samples: pd.DataFrame, radius: int, source_priority: list[str], jobs: int = 1
) -> DedupResult:
    """Match, cluster and rank `samples` (sorted by sample_id, columns SAMPLE_COLUMNS)."""
    if not 0 <= radius < hamming.HASH_BITS:
        raise ConfigError(f"params.yaml: dedup.radius must be in [0, {hamming.HASH_BITS - 1}], got {radius}")
    df = samples.reset_index(drop=True)
    n = len(df)
    sources = _strings(df["source"])
    edges_a: list[np.ndarray] = []
    edges_b: list[np.ndarray] = []
    matched = {kind: np.zeros(n, dtype=bool) for kind in KINDS}
    pairs: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}

    for kind, column in (("exact_file", "file_sha256"), ("exact_pixels", "pixel_sha256")):
        values = _strings(df[column])
        idx = np.flatnonzero([v is not None for v in values])
        a, b = group_edges(values[idx].astype(str))
        a, b = idx[a], idx[b]
        edges_a.append(a)
        edges_b.append(b)
        matched[kind][a] = matched[kind][b] = True
        grouped = np.flatnonzero(matched[kind])
        pairs[kind] = _pairs_in_groups(values[grouped].astype(str), sources[grouped])

    # Near: equal pHashes are chained directly; the index searches the distinct values only.
    idx, ph = _phashes(df)
    groups = hamming.group_equal(ph)
    a, b = group_edges(groups.inverse)
    edges_a.append(idx[a])
    edges_b.append(idx[b])
    u, v, dist = hamming.distinct_pairs(groups.values, radius, jobs=jobs)
    first = idx[groups.members[groups.starts]]  # one member per distinct pHash
    edges_a.append(first[u])
    edges_b.append(first[v])
    in_pair = np.zeros(len(groups.values), dtype=bool)
    in_pair[u] = in_pair[v] = True
    matched["near"][idx] = (in_pair | (groups.sizes > 1))[groups.inverse]
    near_pairs, histogram = _near_pair_stats(groups, u, v, dist, sources[idx])
    pairs["near"] = near_pairs

    labels = components(n, np.concatenate(edges_a), np.concatenate(edges_b))
    clusters = _rank_clusters(df, labels, matched, source_priority, idx, ph)
    return DedupResult(
        radius=radius,
        samples=df,
        clusters=clusters,
        pairs={k: dict(sorted(c.items())) for k, c in pairs.items()},
        distance_histogram=histogram,
    )


def _near_pair_stats(
    groups: hamming.Groups, u: np.ndarray, v: np.ndarray, dist: np.ndarray, sources: np.ndarray
) -> tuple[Counter[str], dict[int, int]]:
    """Near member pairs per source pair and per distance, without listing member pairs.

    A distinct-pHash pair (u, v) stands for |u| x |v| member pairs; a group of k equal pHashes
    for k(k-1)/2 pairs at distance 0. Per source, that is a product of source-count vectors.
    """
    names = sorted(set(sources.tolist()))
    col = {s: i for i, s in enumerate(names)}
    counts = np.zeros((len(groups.values), len(names)), dtype=np.int64)
    np.add.at(counts, (groups.inverse, np.array([col[s] for s in sources], dtype=np.int64)), 1)
    cross = counts[u].T @ counts[v] if len(u) else np.zeros((len(names), len(names)), dtype=np.int64)
    result: Counter[str] = Counter()
    for x, sx in enumerate(names):
        within = int((counts[:, x] * (counts[:, x] - 1) // 2).sum())
        same = int(cross[x, x]) + within
        if same:
            result[_source_pair(sx, sx)] += same
        for y in range(x + 1, len(names)):
            n_xy = int(cross[x, y] + cross[y, x] + (counts[:, x] * counts[:, y]).sum())
            if n_xy:
                result[_source_pair(sx, names[y])] += n_xy
    histogram: Counter[int] = Counter()
    zero = int((groups.sizes * (groups.sizes - 1) // 2).sum())
    if zero:
        histogram[0] += zero
    if len(u):
        weights = groups.sizes[u] * groups.sizes[v]
        per_d = np.bincount(dist.astype(np.int64), weights=weights, minlength=1)
        for d in np.flatnonzero(per_d):
            histogram[int(d)] += int(per_d[d])
    return result, dict(sorted(histogram.items()))


def _rank_clusters(
    df: pd.DataFrame,
    labels: np.ndarray,
    matched: dict[str, np.ndarray],
    source_priority: list[str],
    ph_idx: np.ndarray,
    ph: np.ndarray,
) -> pd.DataFrame:
    sizes = np.bincount(labels, minlength=len(labels))
    members = np.flatnonzero(sizes[labels] >= 2)
    if len(members) == 0:
        return pd.DataFrame({name: pd.Series(dtype=object) for name in CLUSTERS.names})
    keys = survivor_sort_keys(df.iloc[members], source_priority)
    keys["label"] = labels[members]
    keys["pos"] = members
    keys = keys.sort_values(["label", "k_source", "k_points", "k_mask", "k_pixels", "k_id"], kind="stable")
    pos = keys["pos"].to_numpy()
    lab = keys["label"].to_numpy()
    start = np.r_[True, lab[1:] != lab[:-1]]
    group_start = np.maximum.accumulate(np.where(start, np.arange(len(lab)), 0))
    rank = np.arange(len(lab)) - group_start
    survivor = pos[group_start]
    ids = _strings(df["sample_id"])
    phash = np.zeros(len(df), dtype=np.uint64)
    has_ph = np.zeros(len(df), dtype=bool)
    phash[ph_idx] = ph
    has_ph[ph_idx] = True
    distance = np.bitwise_count(phash[pos] ^ phash[survivor]).astype(np.int64)
    distance_col = pd.array(
        [int(d) if has_ph[p] and has_ph[s] else None for d, p, s in zip(distance, pos, survivor)],
        dtype="Int32",
    )
    kinds = [[k for k in KINDS if matched[k][p]] for p in pos]
    out = pd.DataFrame(
        {
            "cluster_id": ids[lab],  # the label is the smallest position = smallest sample_id
            "sample_id": ids[pos],
            "source": _strings(df["source"])[pos],
            "cluster_size": sizes[lab].astype(np.int32),
            "rank": rank.astype(np.int32),
            "survivor_id": ids[survivor],
            "match_kinds": kinds,
            "distance": distance_col,
        }
    )
    return out.sort_values(["cluster_id", "rank"], kind="stable").reset_index(drop=True)


def clusters_table(result: DedupResult) -> pa.Table:
    return pa.Table.from_pandas(result.clusters, schema=CLUSTERS, preserve_index=False)


def read_clusters(path: Path) -> pd.DataFrame:
    """data/dedup/clusters.parquet as a DataFrame (plain object columns)."""
    if not path.exists():
        raise TidepoolError(f"{path}: missing; run the `dedup` stage first")
    table = pq.read_table(path)
    missing = [c for c in CLUSTERS.names if c not in table.schema.names]
    if missing:
        raise UpstreamFormatError(path, f"cluster table lacks columns {missing}")
    return pd.DataFrame({c: table.column(c).to_pylist() for c in CLUSTERS.names})


# --- reporting -------------------------------------------------------------------------------


def metrics(result: DedupResult) -> dict[str, Any]:
    c = result.clusters
    n_clusters = int(c["cluster_id"].nunique()) if len(c) else 0
    by_source = Counter(_strings(result.samples["source"]).tolist())
    out: dict[str, Any] = {
        "radius": result.radius,
        "samples": len(result.samples),
        "samples_by_source": dict(sorted(by_source.items())),
        "clusters": n_clusters,
        "duplicate_members": len(c),
        "redundant_copies": len(c) - n_clusters,
        "members_by_source": dict(sorted(Counter(c["source"].tolist()).items())) if len(c) else {},
        "pairs": {kind: result.pairs.get(kind, {}) for kind in KINDS},
        "near_distance_histogram": {str(k): v for k, v in result.distance_histogram.items()},
        "cluster_sizes": {},
        "clusters_by_sources": {},
        "cross_source_clusters": 0,
        "chained_members": 0,
        "largest_cluster": None,
    }
    if not len(c):
        return out
    per_cluster = _per_cluster(c)
    out["cluster_sizes"] = {str(k): v for k, v in sorted(Counter(per_cluster["size"].tolist()).items())}
    out["clusters_by_sources"] = dict(sorted(Counter(per_cluster["mix"].tolist()).items()))
    out["cross_source_clusters"] = int((per_cluster["n_sources"] > 1).sum())
    out["chained_members"] = int((c["distance"].fillna(-1).astype(int) > result.radius).sum())
    big = per_cluster.iloc[0]
    out["largest_cluster"] = {
        "cluster_id": str(big["cluster_id"]),
        "size": int(big["size"]),
        "members_by_source": {k: int(v) for k, v in big["by_source"].items()},
        "max_distance_to_survivor": None if pd.isna(big["max_distance"]) else int(big["max_distance"]),
    }
    return out


def _per_cluster(c: pd.DataFrame) -> pd.DataFrame:
    """One row per cluster, largest first (ties by cluster_id)."""
    rows = []
    for cid, grp in c.groupby("cluster_id", sort=True):
        by_source = dict(sorted(Counter(grp["source"].tolist()).items()))
        dists = [int(d) for d in grp["distance"].tolist() if not pd.isna(d)]
        rows.append(
            {
                "cluster_id": cid,
                "size": len(grp),
                "by_source": by_source,
                "mix": "+".join(by_source),
                "n_sources": len(by_source),
                "survivor_id": grp["survivor_id"].iloc[0],
                "max_distance": max(dists) if dists else None,
            }
        )
    out = pd.DataFrame(rows)
    return out.sort_values(["size", "cluster_id"], ascending=[False, True], kind="stable").reset_index(
        drop=True
    )


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = ("" if v is None or v is pd.NA else str(v).replace("|", "\\|") for v in row)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_markdown(result: DedupResult, m: dict[str, Any], max_rows: int = 50) -> str:
    c = result.clusters
    parts = [
        "# Duplicate images\n",
        f"Near duplicates: 64-bit pHash Hamming distance <= {result.radius}. Exact: equal file or "
        "pixel sha256. Clusters are connected components of all matches; rank 0 survives where a "
        "product keeps one copy.\n",
        _md_table(
            [
                "samples",
                "clusters",
                "members",
                "redundant copies",
                "cross-source clusters",
                "chained members",
            ],
            [
                [
                    m["samples"],
                    m["clusters"],
                    m["duplicate_members"],
                    m["redundant_copies"],
                    m["cross_source_clusters"],
                    m["chained_members"],
                ]
            ],
        ),
        "",
        "`chained members` are further than the radius from their survivor: joined by a chain.\n",
        "## Matching pairs by source pair\n",
    ]
    source_pairs = sorted({p for kind in KINDS for p in m["pairs"][kind]})
    parts.append(
        _md_table(
            ["source pair", *KINDS],
            [[p, *(m["pairs"][k].get(p, 0) for k in KINDS)] for p in source_pairs],
        )
        if source_pairs
        else "No matching pairs."
    )
    parts += ["", "## Near-pair distances\n"]
    hist = m["near_distance_histogram"]
    parts.append(_md_table(["distance", "pairs"], [[d, hist[d]] for d in hist]) if hist else "No near pairs.")
    if len(c):
        per_cluster = _per_cluster(c)
        parts += ["", "## Clusters by source mix\n"]
        mix = per_cluster.groupby("mix", sort=True)["size"].agg(["count", "sum"]).reset_index()
        parts.append(_md_table(["sources", "clusters", "members"], mix.values.tolist()))
        parts += ["", f"## Largest clusters (top {min(10, len(per_cluster))})\n"]
        parts.append(
            _md_table(
                ["cluster", "size", "sources", "survivor", "max distance to survivor"],
                [
                    [
                        r.cluster_id,
                        r.size,
                        json.dumps(r.by_source, sort_keys=True),
                        r.survivor_id,
                        r.max_distance,
                    ]
                    for r in per_cluster.head(10).itertuples()
                ],
            )
        )
        cross = set(per_cluster.loc[per_cluster["n_sources"] > 1, "cluster_id"])
        rows = c[c["cluster_id"].isin(cross)]
        parts += ["", f"## Cross-source clusters ({len(cross)})\n"]
        if len(rows):
            shown = rows.head(max_rows)
            parts.append(
                _md_table(
                    ["cluster", "member", "source", "rank", "kinds", "distance"],
                    [
                        [r.cluster_id, r.sample_id, r.source, r.rank, "+".join(r.match_kinds), r.distance]
                        for r in shown.itertuples()
                    ],
                )
            )
            if len(rows) > max_rows:
                parts.append(f"\n... {len(rows) - max_rows} more rows in data/dedup/clusters.parquet")
        else:
            parts.append("None.")
    return "\n".join(parts).rstrip() + "\n"


# --- stage -----------------------------------------------------------------------------------


def dedup_params(params: dict[str, Any]) -> tuple[int, list[str]]:
    radius = require(params, "dedup.radius")
    priority = require(params, "dedup.source_priority")
    if not isinstance(radius, int) or isinstance(radius, bool):
        raise ConfigError(f"params.yaml: dedup.radius must be an integer, got {radius!r}")
    if not isinstance(priority, list) or not all(isinstance(s, str) for s in priority):
        raise ConfigError("params.yaml: dedup.source_priority must be a list of source names")
    return radius, priority


def run(params: dict[str, Any], root: Path) -> tuple[DedupResult, dict[str, Any]]:
    radius, priority = dedup_params(params)
    sources = list(require(params, "sources"))
    samples = load_samples(root, sources)
    jobs = resolve_jobs(params.get("jobs", 1))
    result = find_duplicates(samples, radius, priority, jobs=jobs)
    m = metrics(result)
    write_parquet(root / "data" / "dedup" / "clusters.parquet", clusters_table(result))
    write_text(root / "data" / "dedup" / "summary.md", summary_markdown(result, m))
    write_json(root / "metrics" / "dedup.json", m)
    return result, m


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.dedup", description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=None)
    args = parser.parse_args(argv)
    params = load_params(args.params)
    _, m = run(params, repo_root())
    print(
        f"dedup: {m['samples']} samples, {m['clusters']} clusters, {m['duplicate_members']} members "
        f"({m['cross_source_clusters']} cross-source), largest {(m['largest_cluster'] or {}).get('size', 0)}"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
