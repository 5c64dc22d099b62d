"""Near-duplicate search: the multi-index Hamming index against brute force and imagededup.

    python -m bench.bench_hamming [--sizes 10000 100000 1000000] [--radii 4 8]
                                  [--imagededup-site /tmp/dedup-split/venv/lib/python3.11/site-packages]

For each size N: N random 64-bit hashes with planted near-duplicate groups (members 0..10 bit
flips from their group's base, so some sit just outside the radius, plus exact copies). For each
radius r, every method's pair set is compared with the reference:

- `mih`: stages.hamming.search_pairs (the index dedup uses), `--jobs` threads;
- `brute_force`: chunked numpy all-pairs, up to `--brute-max`; above it, all pairs involving
  `--sample-queries` rows (half random, half hashes the index paired), compared with the
  index's pairs involving those rows, and the full time extrapolated (marked `estimated`);
- `imagededup_bktree`, `imagededup_cython`: imagededup's own search classes
  (`imagededup.handlers.search.bktree.BKTree`, `...brute_force_cython.BruteForceCython`), queried
  the way its `HashEval` does (each hash against all, self removed), on all hashes up to
  `--imagededup-max` and on sampled queries above (time extrapolated). Skipped, with the reason
  printed, when imagededup cannot be imported.

imagededup's `HashEval` (retrieval.py) and `Hashing.hamming_distance` cannot be imported without
torch: `imagededup/utils/__init__.py` imports `plotter` (matplotlib) and `models` (torch), and
`imagededup/methods/__init__.py` imports `cnn` (torch). The two search modules import cleanly, so
they are used directly with a distance function of the same semantics as `hamming_distance`
(popcount of the XOR of the hex hashes). Install it apart from the project:
    python3 -m venv /tmp/dedup-split/venv && /tmp/dedup-split/venv/bin/pip install --no-deps imagededup
and pass that venv's site-packages as `--imagededup-site` (it is appended to sys.path, so the
project's numpy stays in front).

Prints a table (N, r, method, seconds, pairs, speedup over brute force, equal) and the scaling,
and writes everything to `--out` (bench/results/hamming.json). Timings are wall-clock on a
shared machine: read ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from stages import hamming
from stages.fsutil import write_json
from stages.samplegen.texture import rng_for


def make_hashes(n: int) -> np.ndarray:
    """Random hashes with planted groups (about 4% of the hashes) and a few exact copies."""
    rng = rng_for("bench-hamming", n)
    h = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    groups = max(1, n // 100)
    pos = 0
    for _ in range(groups):
        size = int(rng.integers(2, 6))
        if pos + size > n:
            break
        base = h[pos]
        for k in range(1, size):
            flips = rng.choice(64, size=int(rng.integers(0, 11)), replace=False)
            h[pos + k] = base ^ np.uint64(sum(1 << int(b) for b in flips))
        pos += size
    return rng.permutation(h)


def query_sample(n: int, radius: int, size: int, paired: np.ndarray) -> np.ndarray:
    """Query rows: half uniformly random, half hashes that the index paired, interleaved so that
    any prefix keeps both halves. The paired half gives a sampled comparison pairs to compare; a
    pair the index missed can still turn up through the random half."""
    rng = rng_for("bench-hamming-queries", n, radius)
    random_part = rng.choice(n, size=size - size // 2, replace=False)
    members = np.setdiff1d(np.unique(paired), random_part)
    picked = rng.choice(members, size=min(len(members), size // 2), replace=False)
    k = min(len(random_part), len(picked))
    both = np.empty(2 * k, dtype=np.int64)
    both[0::2], both[1::2] = random_part[:k], picked[:k]
    return np.concatenate([both, random_part[k:], picked[k:]]).astype(np.int64)


def _pairs_set(i: np.ndarray, j: np.ndarray) -> set[tuple[int, int]]:
    return set(zip(i.tolist(), j.tolist()))


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float, float]:
    """(result, seconds, peak MiB of traced allocations)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return out, seconds, peak


def load_imagededup(site: str | None) -> tuple[Any, Any, str | None]:
    """(BKTree, BruteForceCython, None) or (None, None, why not)."""
    if site:
        if not Path(site).is_dir():
            return None, None, f"--imagededup-site {site} is not a directory"
        sys.path.append(site)
    try:
        from imagededup.handlers.search.bktree import BKTree
        from imagededup.handlers.search.brute_force_cython import BruteForceCython
    except ImportError as exc:
        return None, None, f"imagededup not importable ({exc}); see the module docstring"
    return BKTree, BruteForceCython, None


def hex_distance(a: str, b: str) -> int:
    """imagededup's Hashing.hamming_distance semantics (bits that differ), without numpy per call."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def imagededup_search(cls: Any, h: np.ndarray, radius: int, queries: np.ndarray) -> tuple[set, float, float]:
    """(pairs, build seconds, query seconds) from querying `queries` against all hashes, as
    imagededup's HashEval does."""
    hash_dict = {str(k): f"{int(v):016x}" for k, v in enumerate(h.tolist())}
    t0 = time.perf_counter()
    index = cls(hash_dict, hex_distance)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    pairs: set[tuple[int, int]] = set()
    for q in queries.tolist():
        for name, _dist in index.search(query=hash_dict[str(q)], tol=radius):
            other = int(name)
            if other != q:  # HashEval drops the query itself
                pairs.add((min(q, other), max(q, other)))
    return pairs, t_build, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--radii", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--brute-max", type=int, default=100_000)
    parser.add_argument("--sample-queries", type=int, default=2000)
    parser.add_argument("--imagededup-site", default=os.environ.get("TIDEPOOL_IMAGEDEDUP_SITE"))
    parser.add_argument("--imagededup-max", type=int, default=10_000)
    parser.add_argument(
        "--imagededup-queries",
        type=int,
        default=200,
        help="sampled queries for imagededup above --imagededup-max, at N=100k; "
        "scaled by 100k/N above that (at least 20)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/hamming.json"))
    args = parser.parse_args(argv)

    bktree, cython, why = load_imagededup(args.imagededup_site)
    if why:
        print(f"skipped imagededup: {why}")
    runs: list[dict[str, Any]] = []
    header = f"{'N':>9} {'r':>2} {'method':<20} {'seconds':>10} {'pairs':>9} {'speedup':>9}  equal  note"
    print(header)
    print("-" * len(header))

    def report(row: dict[str, Any]) -> None:
        runs.append(row)
        speed = f"{row['speedup_vs_brute_force']:.3g}x" if row.get("speedup_vs_brute_force") else "-"
        eq = {True: "equal", False: "DIFF", None: "-"}[row.get("equal_to_reference")]
        print(
            f"{row['n']:>9} {row['radius']:>2} {row['method']:<20} {row['seconds']:>10.3f} {row['pairs']:>9} "
            f"{speed:>9}  {eq:<5}  {row.get('note', '')}",
            flush=True,
        )

    for n in args.sizes:
        h = make_hashes(n)
        brute_full = None
        for r in args.radii:
            plan = hamming.choose_plan(n, r)
            (i, j, _d), t_mih, peak = _timed(hamming.search_pairs, h, r, jobs=args.jobs)
            mih_pairs = _pairs_set(i, j)
            sample = query_sample(n, r, min(n, args.sample_queries), np.concatenate([i, j]))
            if n <= args.brute_max:
                if brute_full is None:
                    # One pass at the largest radius: brute force costs the same at every radius.
                    (bi, bj, bd), t_brute, _ = _timed(hamming.brute_force_pairs, h, max(args.radii))
                    brute_full = (bi, bj, bd, t_brute)
                bi, bj, bd, t_brute = brute_full
                keep = bd <= r
                reference = _pairs_set(bi[keep], bj[keep])
                brute_row = {
                    "n": n,
                    "radius": r,
                    "method": "brute_force",
                    "seconds": t_brute,
                    "pairs": len(reference),
                    "equal_to_reference": None,
                    "note": "all pairs, one pass for all radii",
                }
                mih_equal = mih_pairs == reference
                t_ref = t_brute
            else:
                (si, sj, _sd), t_sample, _ = _timed(hamming.brute_force_pairs, h, r, rows=sample)
                reference = _pairs_set(si, sj)
                involved = np.isin(i, sample) | np.isin(j, sample)
                mih_equal = _pairs_set(i[involved], j[involved]) == reference
                # Full all-pairs time: n/2 rows against n columns, at the sampled rate.
                t_ref = t_sample * (n / len(sample)) / 2
                brute_row = {
                    "n": n,
                    "radius": r,
                    "method": "brute_force",
                    "seconds": t_ref,
                    "pairs": len(reference),
                    "equal_to_reference": None,
                    "estimated": True,
                    "note": f"estimated from {len(sample)} query rows ({t_sample:.2f}s); "
                    "pairs = pairs involving them",
                }
            report(brute_row)
            report(
                {
                    "n": n,
                    "radius": r,
                    "method": "mih",
                    "seconds": t_mih,
                    "pairs": len(mih_pairs),
                    "speedup_vs_brute_force": t_ref / t_mih if t_mih > 0 else None,
                    "equal_to_reference": mih_equal,
                    "peak_mib": round(peak, 1),
                    "plan": {"widths": list(plan.widths), "thresholds": list(plan.thresholds)},
                    "note": f"chunks {'/'.join(map(str, plan.widths))}, thresholds "
                    f"{'/'.join(map(str, plan.thresholds))}, peak {peak:.0f} MiB",
                }
            )
            for name, cls in (("imagededup_cython", cython), ("imagededup_bktree", bktree)):
                if cls is None:
                    continue
                if n <= args.imagededup_max:
                    queries = np.arange(n)
                else:
                    q = args.imagededup_queries if n <= 100_000 else args.imagededup_queries * 100_000 // n
                    queries = sample[: max(20, q)]
                found, t_build, t_query = imagededup_search(cls, h, r, queries)
                if n <= args.imagededup_max:
                    equal = found == mih_pairs
                    t_total = t_build + t_query
                    note = f"all queries (build {t_build:.1f}s)"
                else:
                    involved = np.isin(i, queries) | np.isin(j, queries)
                    equal = found == _pairs_set(i[involved], j[involved])
                    t_total = t_build + t_query * n / len(queries)
                    note = (
                        f"estimated: build {t_build:.1f}s + {len(queries)} queries {t_query:.1f}s "
                        "scaled to N; pairs = pairs involving them"
                    )
                report(
                    {
                        "n": n,
                        "radius": r,
                        "method": name,
                        "seconds": t_total,
                        "pairs": len(found),
                        "speedup_vs_brute_force": t_ref / t_total if t_total > 0 else None,
                        "equal_to_reference": equal,
                        "estimated": n > args.imagededup_max,
                        "note": note,
                    }
                )

    print("\nscaling (seconds ratio between consecutive sizes):")
    for method in sorted({r["method"] for r in runs}):
        for radius in args.radii:
            series = [(r["n"], r["seconds"]) for r in runs if r["method"] == method and r["radius"] == radius]
            steps = [
                f"{b[0] // a[0]}x N -> {b[1] / a[1]:.1f}x time"
                for a, b in zip(series, series[1:])
                if a[1] > 0
            ]
            if steps:
                print(f"  {method:<20} r={radius}: " + "; ".join(steps))
    print("\nratios at each size (method seconds / mih seconds):")
    for n in args.sizes:
        for radius in args.radii:
            here = {r["method"]: r["seconds"] for r in runs if r["n"] == n and r["radius"] == radius}
            if here.get("mih"):
                ratios = ", ".join(
                    f"{m} {s / here['mih']:.3g}" for m, s in sorted(here.items()) if m != "mih"
                )
                print(f"  N={n} r={radius}: {ratios}")

    write_json(args.out, {"cpus": os.cpu_count(), "jobs": args.jobs, "imagededup_skipped": why, "runs": runs})
    print(f"\nwritten {args.out}")
    bad = [r for r in runs if r.get("equal_to_reference") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
