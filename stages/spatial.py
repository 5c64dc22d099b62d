"""Which georeferenced tiles touch: an axis-aligned-box sweep in numpy, for spatial split groups.

Coast Train tiles carry their footprint as lat/lon bounds (`native_labels.geo`: `lat_min`,
`lat_max`, `lon_min`, `lon_max`, from the metadata CSV's LatMin..LonMax). Two tiles whose
footprints overlap, share an edge or a corner, or lie within `buffer_m` metres of each other
show the same ground (or its continuation across the seam), so the split stage unites them.

The buffer is in metres because tiles come from sensors of very different resolutions (5 cm
orthophotos to 30 m Landsat pixels) and a degree of longitude shrinks with latitude: each box
grows by `buffer_m / 2` on every side, converted to degrees at its own latitude (the pole-ward
edge, where a degree of longitude is shortest, so the growth is never less than asked). Two
grown boxes that overlap or touch (closed intervals) are a pair.

Method: sweep and prune on one axis. Boxes are sorted by their low edge on the axis that gives
fewer candidates (both counts come from one `searchsorted` each); every box pairs with the
following boxes whose low edge is at most its high edge, expanded by index arithmetic in
bounded batches (no Python loop over boxes), then filtered on the other axis. Boxes near the
antimeridian are also tested shifted by 360 degrees, so tiles either side of it pair too.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

METRES_PER_DEGREE_LAT = 111_320.0  # mean; the buffer is a margin, not a survey
MAX_CANDIDATES = 1 << 22  # candidate pairs expanded at once: bounds the sweep's memory


def bounds_from_geo(geo: Any) -> tuple[float, float, float, float] | None:
    """(lat_min, lat_max, lon_min, lon_max) of a `geo` mapping, or None when unusable.

    Unusable: missing, not numbers, not finite, outside the globe, or min above max. Such a tile
    keeps only its grid-cell key (the caller's fallback).
    """
    if not isinstance(geo, dict):
        return None
    out = []
    for key in ("lat_min", "lat_max", "lon_min", "lon_max"):
        v = geo.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return None
        out.append(float(v))
    lat_min, lat_max, lon_min, lon_max = out
    if not (-90.0 <= lat_min <= lat_max <= 90.0 and -180.0 <= lon_min <= lon_max <= 180.0):
        return None
    return lat_min, lat_max, lon_min, lon_max


def grown_boxes(boxes: np.ndarray, buffer_m: float) -> np.ndarray:
    """`boxes` (n x 4: lat_min, lat_max, lon_min, lon_max) grown by buffer_m / 2 on every side."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    half = max(0.0, float(buffer_m)) / 2.0
    if half == 0.0:
        return boxes.copy()
    dlat = half / METRES_PER_DEGREE_LAT
    pole = np.minimum(np.maximum(np.abs(boxes[:, 0]), np.abs(boxes[:, 1])) + dlat, 89.9)
    dlon = half / (METRES_PER_DEGREE_LAT * np.cos(np.radians(pole)))
    return np.stack([boxes[:, 0] - dlat, boxes[:, 1] + dlat, boxes[:, 2] - dlon, boxes[:, 3] + dlon], axis=1)


def _sweep(lo: np.ndarray, hi: np.ndarray, olo: np.ndarray, ohi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j positions) whose [lo, hi] and [olo, ohi] intervals both intersect."""
    n = len(lo)
    order = np.argsort(lo, kind="stable")
    slo, shi = lo[order], hi[order]
    # Sorted by low edge: box k meets every later box whose low edge is <= its high edge.
    ends = np.searchsorted(slo, shi, side="right")
    counts = np.maximum(ends - np.arange(n) - 1, 0)
    out_a: list[np.ndarray] = []
    out_b: list[np.ndarray] = []
    start = 0
    while start < n:
        # A batch of boxes whose candidates fit MAX_CANDIDATES (at least one box per batch).
        total = np.cumsum(counts[start:])
        stop = start + max(1, int(np.searchsorted(total, MAX_CANDIDATES, side="right")))
        c = counts[start:stop]
        if c.sum():
            first = np.repeat(np.arange(start, stop), c)
            offsets = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
            second = first + 1 + offsets
            a, b = order[first], order[second]
            keep = (olo[a] <= ohi[b]) & (olo[b] <= ohi[a])
            out_a.append(np.minimum(a, b)[keep])
            out_b.append(np.maximum(a, b)[keep])
        start = stop
    if not out_a:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    return np.concatenate(out_a).astype(np.int64), np.concatenate(out_b).astype(np.int64)


def touching_pairs(boxes: np.ndarray, buffer_m: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (a < b) of boxes that overlap or touch once grown by the buffer; sorted, unique."""
    g = grown_boxes(boxes, buffer_m)
    n = len(g)
    if n < 2:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    # Copies shifted by -/+360 degrees for boxes reaching over the antimeridian; a copy keeps
    # the index of its original.
    idx = np.arange(n)
    east = g[:, 3] >= 180.0
    west = g[:, 2] <= -180.0
    ext = np.concatenate([g, g[east] - [0, 0, 360, 360], g[west] + [0, 0, 360, 360]])
    owner = np.concatenate([idx, idx[east], idx[west]])
    lat_lo, lat_hi, lon_lo, lon_hi = ext[:, 0], ext[:, 1], ext[:, 2], ext[:, 3]

    def candidates(lo: np.ndarray, hi: np.ndarray) -> int:
        order = np.argsort(lo, kind="stable")
        ends = np.searchsorted(lo[order], hi[order], side="right")
        return int((ends - np.arange(1, len(lo) + 1)).clip(0).sum())

    if candidates(lon_lo, lon_hi) <= candidates(lat_lo, lat_hi):
        a, b = _sweep(lon_lo, lon_hi, lat_lo, lat_hi)
    else:
        a, b = _sweep(lat_lo, lat_hi, lon_lo, lon_hi)
    a, b = owner[a], owner[b]
    keep = a != b
    a, b = np.minimum(a, b)[keep], np.maximum(a, b)[keep]
    if not len(a):
        return a, b
    pairs = np.unique(np.stack([a, b], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]
