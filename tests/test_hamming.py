"""The multi-index Hamming search against brute force, and the union-find it feeds."""

from __future__ import annotations

import subprocess
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages import hamming
from stages.unionfind import components, group_edges

REPO = Path(__file__).resolve().parents[1]


def corpus(seed: int, n: int, radius: int, skewed: bool = False) -> np.ndarray:
    """Random 64-bit hashes with planted near pairs (at most `radius` + 2 flips, so some sit just
    outside the radius), exact copies, and optionally low-entropy hashes that crowd few buckets."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    if skewed:
        h &= np.uint64(0x0F0F_0000_00FF_0F0F)  # most bits zero: big buckets in every chunk
    planted = max(1, n // 5)
    src = rng.integers(0, n, planted)
    dst = rng.integers(0, n, planted)
    for s, d in zip(src, dst):
        flips = rng.choice(64, size=int(rng.integers(0, radius + 3)), replace=False)
        mask = np.uint64(sum(1 << int(b) for b in flips))
        h[d] = h[s] ^ mask
    copies = rng.integers(0, n, max(1, n // 20))
    h[rng.integers(0, n, len(copies))] = h[copies]
    return h


def same(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 400),
    radius=st.sampled_from([0, 1, 2, 3, 4, 6, 8, 10, 13]),
    skewed=st.booleans(),
)
def test_index_equals_brute_force_on_random_hashes(seed, n, radius, skewed):
    h = corpus(seed, n, radius, skewed) if n else np.zeros(0, dtype=np.uint64)
    expected = hamming.brute_force_pairs(h, radius)
    assert same(hamming.search_pairs(h, radius), expected)


@pytest.mark.parametrize("radius", [0, 1, 4, 8, 12])
@pytest.mark.parametrize("chunks", [3, 4, 5, 7, 9, 16])
def test_every_plan_finds_the_same_pairs(radius, chunks):
    h = corpus(radius * 100 + chunks, 1500, radius)
    expected = hamming.brute_force_pairs(h, radius)
    assert len(expected[0]) > 100  # the planted pairs are there
    assert same(hamming.search_pairs(h, radius, plan=hamming.make_plan(chunks, radius)), expected)


def test_threads_and_small_batches_do_not_change_the_result(monkeypatch):
    h = corpus(7, 3000, 8, skewed=True)
    expected = hamming.brute_force_pairs(h, 8)
    monkeypatch.setattr(hamming, "BATCH_CANDIDATES", 257)
    assert same(hamming.search_pairs(h, 8, jobs=2), expected)
    assert same(hamming.search_pairs(h, 8, jobs=3, plan=hamming.make_plan(4, 8)), expected)


def test_pairs_are_sorted_unique_and_carry_their_distance():
    h = corpus(3, 2000, 6)
    i, j, d = hamming.search_pairs(h, 6)
    assert np.all(i < j)
    key = i * len(h) + j
    assert np.all(np.diff(key) > 0)
    assert np.array_equal(d, np.bitwise_count(h[i] ^ h[j]))
    assert d.max() <= 6


def test_equal_hashes_are_pairs_at_distance_zero():
    h = np.array([5, 5, 5, 2**63, 5 ^ 1], dtype=np.uint64)
    i, j, d = hamming.search_pairs(h, 0)
    assert list(zip(i.tolist(), j.tolist(), d.tolist())) == [(0, 1, 0), (0, 2, 0), (1, 2, 0)]
    i, j, d = hamming.search_pairs(h, 1)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 2), (0, 4), (1, 2), (1, 4), (2, 4)]


def test_brute_force_on_a_sample_of_rows_matches_the_full_result():
    h = corpus(11, 1200, 8)
    i, j, d = hamming.search_pairs(h, 8)
    rows = np.arange(0, 1200, 7)
    si, sj, sd = hamming.brute_force_pairs(h, 8, rows=rows)
    involved = np.isin(i, rows) | np.isin(j, rows)
    assert same((i[involved], j[involved], d[involved]), (si, sj, sd))


@pytest.mark.parametrize("radius", range(0, 20))
@pytest.mark.parametrize("chunks", range(hamming.MIN_CHUNKS, hamming.MAX_CHUNKS + 1))
def test_plans_satisfy_the_pigeonhole_condition(radius, chunks):
    plan = hamming.make_plan(chunks, radius)
    assert sum(plan.widths) == 64
    assert max(plan.widths) <= hamming.MAX_CHUNK_BITS
    # Every distance <= radius must leave some probed chunk within its threshold.
    assert sum(s + 1 for s in plan.thresholds if s >= 0) == radius + 1


def test_the_cost_model_picks_fewer_chunks_as_the_corpus_grows():
    small = hamming.choose_plan(10_000, 8)
    large = hamming.choose_plan(1_000_000, 8)
    assert len(large.widths) <= len(small.widths)
    assert len(large.widths) == 3  # 21-22 bit chunks, 2-bit balls: the measured optimum at 1M


def test_bad_plan_arguments_are_refused():
    with pytest.raises(ValueError):
        hamming.make_plan(2, 4)  # 32-bit chunks would need a 2**32 table
    with pytest.raises(ValueError):
        hamming.make_plan(4, 64)


def _bfs_labels(n, edges):
    adj = [[] for _ in range(n)]
    for a, b in edges:
        adj[a].append(b)
        adj[b].append(a)
    label = [-1] * n
    for start in range(n):
        if label[start] >= 0:
            continue
        seen, queue = [start], deque([start])
        label[start] = start
        while queue:
            for nxt in adj[queue.popleft()]:
                if label[nxt] < 0:
                    label[nxt] = start
                    seen.append(nxt)
                    queue.append(nxt)
    return label


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 60), edges=st.lists(st.tuples(st.integers(0, 59), st.integers(0, 59)), max_size=80))
def test_components_label_by_smallest_member(n, edges):
    edges = [(a % n, b % n) for a, b in edges]
    a = np.array([e[0] for e in edges], dtype=np.int64)
    b = np.array([e[1] for e in edges], dtype=np.int64)
    assert components(n, a, b).tolist() == _bfs_labels(n, edges)
    # Edge order does not matter.
    assert components(n, b[::-1], a[::-1]).tolist() == _bfs_labels(n, edges)


def test_long_chains_collapse():
    n = 100_000
    perm = np.random.default_rng(0).permutation(n)
    labels = components(n, perm[:-1], perm[1:])
    assert np.all(labels == 0)


def test_group_edges_connect_equal_keys_only():
    keys = np.array(["b", "a", "b", "c", "a", "b"], dtype=object)
    a, b = group_edges(keys)
    labels = components(len(keys), a, b)
    assert labels.tolist() == [0, 1, 0, 3, 1, 0]


def test_bench_script_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "hamming.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.bench_hamming",
            "--sizes",
            "2000",
            "--radii",
            "4",
            "--out",
            str(out),
            "--imagededup-max",
            "2000",
            "--imagededup-site",
            str(tmp_path / "absent"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "equal" in proc.stdout
    import json

    results = json.loads(out.read_text())
    methods = {r["method"] for r in results["runs"]}
    assert {"mih", "brute_force"} <= methods
    assert all(r["equal_to_reference"] for r in results["runs"] if r.get("equal_to_reference") is not None)
