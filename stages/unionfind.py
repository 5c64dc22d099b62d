"""Connected components of an edge list, vectorised (hook to the smaller root, then compress).

Each round hooks every edge's larger root under its smaller root and compresses all paths, so a
component ends labelled by its smallest node index whatever the edge order: the labels are a
function of the graph alone, which keeps cluster and component ids deterministic. Rounds are
O(log n) in practice; each is a few numpy passes over the edges.
"""

from __future__ import annotations

import numpy as np


def _compress(parent: np.ndarray) -> np.ndarray:
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Label of every node 0..n-1: the smallest node index in its component."""
    parent = np.arange(n, dtype=np.int64)
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    if len(a) != len(b):
        raise ValueError("edge arrays differ in length")
    if len(a) and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= n):
        raise ValueError(f"edge endpoint outside 0..{n - 1}")
    while len(a):
        ra, rb = parent[a], parent[b]
        lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
        live = lo != hi
        if not live.any():
            break
        lo, hi = lo[live], hi[live]
        # `hi` is a root (paths are fully compressed), so this only ever lowers a root's parent:
        # no cycles, and the smallest index of a component ends up as its root.
        np.minimum.at(parent, hi, lo)
        parent = _compress(parent)
        # Edges inside one tree are done; keep the rest for the next round.
        a, b = a[live], b[live]
    return parent


def group_edges(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges that connect all positions with equal `keys` (a chain per key value, in position order)."""
    keys = np.asarray(keys)
    if len(keys) < 2:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    order = np.argsort(keys, kind="stable")
    same = keys[order][1:] == keys[order][:-1]
    return order[:-1][same].astype(np.int64), order[1:][same].astype(np.int64)
