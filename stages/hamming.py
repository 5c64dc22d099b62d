"""All pairs of 64-bit hashes within a Hamming radius, without comparing every pair.

Multi-index hashing (Norouzi, Punjani & Fleet, "Fast search in Hamming space with multi-index
hashing", CVPR 2012), as a self-join in pure numpy:

- The 64 bits are cut into `m` contiguous chunks. Each probed chunk k gets a threshold `s_k`
  with `sum(s_k + 1) = radius + 1` over the probed chunks. If two hashes differ in at most
  `radius` bits, some probed chunk differs in at most `s_k` bits: otherwise the chunk distances
  would add up to at least `radius + 1` (pigeonhole). So probing each chunk with its own
  threshold finds every pair, and only pairs that collide in some chunk are ever compared.
- Per chunk, a direct-addressed bucket table (counting sort of the chunk values) gives, for any
  chunk value, the slice of hashes that have it. For every flip pattern `p` of at most `s_k`
  bits, each hash looks up the bucket `chunk ^ p`; the candidates are expanded with vectorised
  index arithmetic and verified on all 64 bits with `np.bitwise_count`.
- Each pair is produced once: for `p != 0` only the side whose chunk has the pattern's highest
  bit clear looks it up; for `p == 0` pairs inside one bucket are emitted in bucket order; and a
  pair already found in an earlier probed chunk (whose chunk distance is within that chunk's
  threshold) is dropped in later chunks. No global unique over pairs is needed.
- Equal hashes are collapsed first: the search runs on distinct values and the result is expanded
  to input positions afterwards, so a thousand identical hashes cost one search item, not half a
  million candidate pairs.

The number of chunks comes from a cost model (probes plus expected candidates under uniform
hashes). Real perceptual hashes are not uniform: skewed buckets raise the candidate count, never
the correctness. Memory is the bucket table of one chunk (2**bits offsets) plus the candidates of
one flip pattern at a time.
"""

from __future__ import annotations

import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

HASH_BITS = 64
# Widest chunk that is direct-addressed: a 2**24 table of int64 offsets is 128 MiB.
MAX_CHUNK_BITS = 24
MIN_CHUNKS = math.ceil(HASH_BITS / MAX_CHUNK_BITS)
MAX_CHUNKS = 16
# Relative cost of one bucket probe against one verified candidate, measured on this machine
# (probes touch a random table entry; candidates are streamed gathers plus a popcount).
PROBE_COST = 1.5


@dataclass(frozen=True)
class Plan:
    """How the 64 bits are chunked and how far each chunk is probed (-1 = not probed)."""

    widths: tuple[int, ...]  # bits per chunk, most significant chunk first; they sum to 64
    thresholds: tuple[int, ...]  # s_k per chunk

    @property
    def shifts(self) -> tuple[int, ...]:
        out, pos = [], HASH_BITS
        for w in self.widths:
            pos -= w
            out.append(pos)
        return tuple(out)

    def probes_per_hash(self) -> int:
        return sum(_ball(w, s) for w, s in zip(self.widths, self.thresholds) if s >= 0)

    def expected_cost(self, n: int) -> float:
        """Work per search under uniform hashes: probes plus candidates to verify."""
        total = 0.0
        for w, s in zip(self.widths, self.thresholds):
            if s < 0:
                continue
            # Half the probes of a non-zero pattern are skipped (each pair is looked up once).
            probes = 1 + (_ball(w, s) - 1) / 2
            total += n * probes * (PROBE_COST + n / 2.0**w)
        return total


def _ball(bits: int, radius: int) -> int:
    """How many values lie within `radius` flips of a `bits`-bit value."""
    return sum(math.comb(bits, i) for i in range(0, min(radius, bits) + 1))


def make_plan(chunks: int, radius: int) -> Plan:
    """Split 64 bits into `chunks` near-equal chunks and spread `radius + 1` probe units evenly.

    Wider chunks come first and get the spare units, since a wider chunk has smaller buckets.
    With more chunks than `radius + 1`, only `radius + 1` chunks are probed, exactly.
    """
    if not MIN_CHUNKS <= chunks <= MAX_CHUNKS:
        raise ValueError(f"chunks must be in [{MIN_CHUNKS}, {MAX_CHUNKS}], got {chunks}")
    if not 0 <= radius < HASH_BITS:
        raise ValueError(f"radius must be in [0, {HASH_BITS - 1}], got {radius}")
    base, extra = divmod(HASH_BITS, chunks)
    widths = tuple(base + 1 if k < extra else base for k in range(chunks))
    units, spare = divmod(radius + 1, chunks)
    thresholds = tuple(units + (1 if k < spare else 0) - 1 for k in range(chunks))
    return Plan(widths, thresholds)


def choose_plan(n: int, radius: int) -> Plan:
    """The plan with the lowest expected cost for `n` distinct hashes at `radius`."""
    plans = [make_plan(m, radius) for m in range(MIN_CHUNKS, MAX_CHUNKS + 1)]
    return min(plans, key=lambda p: (p.expected_cost(max(n, 1)), len(p.widths)))


def _patterns(bits: int, max_flips: int) -> list[int]:
    """Every `bits`-bit flip mask with 1..max_flips bits set (0 is handled separately)."""
    out = []
    for k in range(1, min(max_flips, bits) + 1):
        for combo in itertools.combinations(range(bits), k):
            out.append(sum(1 << b for b in combo))
    return out


def _expand(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For slices [starts[q], starts[q] + counts[q]): (owner q, position) of every element."""
    total = int(counts.sum())
    owner = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    offsets = np.cumsum(counts) - counts
    pos = np.arange(total, dtype=np.int64) + np.repeat(starts - offsets, counts)
    return owner, pos


def _chunk(values: np.ndarray, shift: int, width: int) -> np.ndarray:
    return ((values >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)


# Candidates expanded at once: bounds memory (a few arrays of this many int64) whatever the skew.
BATCH_CANDIDATES = 1 << 22


class _Chunk:
    """One probed chunk: hashes in counting-sort order of their chunk value, and the bucket table.

    Everything below works on ranks in that order: lookups of `c ^ p` for consecutive ranks hit
    nearby table entries and nearby hashes, which keeps a million-hash search mostly in cache.
    """

    def __init__(self, values: np.ndarray, shift: int, width: int, threshold: int) -> None:
        self.shift, self.width, self.threshold = shift, width, threshold
        c = _chunk(values, shift, width)
        self.order = np.argsort(c, kind="stable")
        self.sorted_c = c[self.order]
        self.sorted_v = values[self.order]
        self.counts = np.bincount(self.sorted_c, minlength=1 << width)
        self.starts = np.concatenate(([0], np.cumsum(self.counts)[:-1]))
        # A bool table: gathering from it and taking nonzero is several times faster than from
        # the counts, and most probes miss.
        self.occupied = self.counts > 0


def _batches(counts: np.ndarray) -> list[slice]:
    """Consecutive slices of `counts` whose sums stay near BATCH_CANDIDATES."""
    total = np.cumsum(counts, dtype=np.int64)
    if len(total) == 0 or total[-1] <= BATCH_CANDIDATES:
        return [slice(0, len(counts))]
    cuts = np.searchsorted(total, np.arange(BATCH_CANDIDATES, int(total[-1]), BATCH_CANDIDATES))
    bounds = [0, *sorted(set(int(x) + 1 for x in cuts)), len(counts)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _probe_chunk(
    chunk: _Chunk, patterns: list[int], earlier: list[tuple[int, int, int]], radius: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Pairs found through `patterns` of one chunk (0 = same bucket), as (rank, rank, distance)."""
    out = []
    n = len(chunk.sorted_c)

    def keep(src: np.ndarray, dst: np.ndarray) -> None:
        d = np.bitwise_count(chunk.sorted_v[src] ^ chunk.sorted_v[dst])
        ok = np.flatnonzero(d <= radius)
        if len(ok) == 0:
            return
        src, dst, d = src[ok], dst[ok], d[ok]
        if earlier:
            x = chunk.sorted_v[src] ^ chunk.sorted_v[dst]
            new = np.ones(len(ok), dtype=bool)
            for shift, width, s in earlier:
                # Within that chunk's threshold: already found while probing it.
                new &= np.bitwise_count(_chunk(x, shift, width)) > s
            src, dst, d = src[new], dst[new], d[new]
        if len(src):
            out.append((src, dst, d))

    def expand_and_keep(src_ranks: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> None:
        for part in _batches(counts):
            owner, pos = _expand(starts[part], counts[part])
            keep(src_ranks[part][owner], pos)

    rank = np.arange(n, dtype=np.int64)
    by_top: dict[int, list[int]] = {}
    for p in patterns:
        if p == 0:
            # Same bucket: each hash with the ones after it in bucket order.
            after = chunk.starts[chunk.sorted_c] + chunk.counts[chunk.sorted_c] - rank - 1
            expand_and_keep(rank, rank + 1, after)
        else:
            by_top.setdefault(p.bit_length() - 1, []).append(p)
    # Only hashes whose chunk has the pattern's top bit clear look up `c ^ p` (which has it set),
    # so each unordered pair is looked up once.
    for top, group in sorted(by_top.items()):
        lookers = np.flatnonzero((chunk.sorted_c >> top) & 1 == 0)
        c_lookers = chunk.sorted_c[lookers]
        for p in group:
            keys = c_lookers ^ p
            hit = np.flatnonzero(chunk.occupied[keys])
            if len(hit) == 0:
                continue
            keys, src = keys[hit], lookers[hit]
            first = chunk.starts[keys]
            # Buckets are mostly singletons: pair with the first member directly, and expand
            # only the rest of the few larger buckets.
            keep(src, first)
            rest = chunk.counts[keys] - 1
            more = np.flatnonzero(rest)
            if len(more):
                expand_and_keep(src[more], first[more] + 1, rest[more])
    return out


def distinct_pairs(
    values: np.ndarray, radius: int, plan: Plan | None = None, jobs: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i, j, distance), i < j, of DISTINCT uint64 `values` within `radius`, sorted by (i, j).

    `jobs` threads share the flip patterns (numpy releases the GIL in the heavy loops); the result
    does not depend on it.
    """
    values = np.ascontiguousarray(values, dtype=np.uint64)
    n = len(values)
    empty = np.zeros(0, dtype=np.int64)
    if n < 2:
        return empty, empty, empty.astype(np.uint8)
    plan = plan or choose_plan(n, radius)
    found_i: list[np.ndarray] = []
    found_j: list[np.ndarray] = []
    found_d: list[np.ndarray] = []
    earlier: list[tuple[int, int, int]] = []
    for shift, width, s in zip(plan.shifts, plan.widths, plan.thresholds):
        if s < 0:
            continue
        chunk = _Chunk(values, shift, width, s)
        patterns = [0, *_patterns(width, s)]
        if jobs > 1:
            # Interleaved shares keep the work even (early patterns flip low bits, late ones high).
            shares = [patterns[k::jobs] for k in range(jobs)]
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                done = list(earlier)
                futures = [pool.submit(_probe_chunk, chunk, ps, done, radius) for ps in shares]
                results = [f.result() for f in futures]
        else:
            results = [_probe_chunk(chunk, patterns, earlier, radius)]
        for part in results:
            for src, dst, d in part:
                a, b = chunk.order[src], chunk.order[dst]
                found_i.append(np.minimum(a, b))
                found_j.append(np.maximum(a, b))
                found_d.append(d)
        earlier.append((shift, width, s))

    if not found_i:
        return empty, empty, empty.astype(np.uint8)
    i = np.concatenate(found_i)
    j = np.concatenate(found_j)
    d = np.concatenate(found_d)
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]


@dataclass(frozen=True)
class Groups:
    """Input positions grouped by equal hash value (the search runs on `values`)."""

    values: np.ndarray  # distinct hash values, sorted
    inverse: np.ndarray  # position -> index into values
    members: np.ndarray  # positions sorted by (value, position)
    starts: np.ndarray  # group g is members[starts[g] : starts[g] + sizes[g]]
    sizes: np.ndarray


def group_equal(hashes: np.ndarray) -> Groups:
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    values, inverse, sizes = np.unique(hashes, return_inverse=True, return_counts=True)
    members = np.argsort(inverse, kind="stable")
    starts = (np.cumsum(sizes) - sizes).astype(np.int64)
    return Groups(values, inverse.astype(np.int64), members, starts, sizes.astype(np.int64))


def search_pairs(
    hashes: np.ndarray, radius: int, plan: Plan | None = None, jobs: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of positions (i, j), i < j, with Hamming distance <= `radius`, and the distance.

    Sorted by (i, j). Equal hashes are pairs at distance 0. Output-sensitive: k equal hashes give
    k*(k-1)/2 pairs, so callers that only need connectivity should use `group_equal` plus
    `distinct_pairs` instead of materialising them.
    """
    g = group_equal(hashes)
    a, b, d = distinct_pairs(g.values, radius, plan, jobs)
    parts_i, parts_j, parts_d = [], [], []
    # Pairs between two distinct values: every member of one with every member of the other.
    ka, kb = g.sizes[a], g.sizes[b]
    pair_owner, flat = _expand(np.zeros(len(a), dtype=np.int64), ka * kb)
    if len(flat):
        kb_rep = kb[pair_owner]
        ia = g.members[g.starts[a][pair_owner] + flat // kb_rep]
        ib = g.members[g.starts[b][pair_owner] + flat % kb_rep]
        parts_i.append(np.minimum(ia, ib))
        parts_j.append(np.maximum(ia, ib))
        parts_d.append(d[pair_owner])
    # Pairs inside a group of equal hashes: member t with members t+1.. of the same group.
    multi = np.flatnonzero(g.sizes > 1)
    if len(multi):
        owner, pos = _expand(g.starts[multi], g.sizes[multi])  # every member of multi-groups
        after = g.starts[multi][owner] + g.sizes[multi][owner] - pos - 1
        first, second = _expand(pos + 1, after)
        ia, ib = g.members[pos[first]], g.members[second]
        parts_i.append(np.minimum(ia, ib))
        parts_j.append(np.maximum(ia, ib))
        parts_d.append(np.zeros(len(ia), dtype=np.uint8))
    if not parts_i:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty.astype(np.uint8)
    i, j, dist = np.concatenate(parts_i), np.concatenate(parts_j), np.concatenate(parts_d)
    order = np.lexsort((j, i))
    return i[order], j[order], dist[order].astype(np.uint8)


def brute_force_pairs(
    hashes: np.ndarray, radius: int, block: int = 256, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference: compare every pair (or every pair involving `rows`), in blocks of rows.

    The result has the same form as `search_pairs`. Quadratic: for tests and benchmarks.
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(hashes)
    all_rows = rows is None
    row_ids = np.arange(n, dtype=np.int64) if all_rows else np.unique(np.asarray(rows, dtype=np.int64))
    parts_i, parts_j, parts_d = [], [], []
    for lo in range(0, len(row_ids), block):
        r = row_ids[lo : lo + block]
        # All pairs: a block of rows only needs the columns from its first row on (j > i).
        col0 = int(r[0]) if all_rows else 0
        d = np.bitwise_count(hashes[r][:, None] ^ hashes[None, col0:])
        qi, qj = np.nonzero(d <= radius)
        a, b = r[qi], qj.astype(np.int64) + col0
        off = a < b if all_rows else a != b
        a, b, dd = a[off], b[off], d[qi, qj][off]
        parts_i.append(np.minimum(a, b))
        parts_j.append(np.maximum(a, b))
        parts_d.append(dd)
    if not parts_i:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty.astype(np.uint8)
    i, j, dist = np.concatenate(parts_i), np.concatenate(parts_j), np.concatenate(parts_d)
    # With `rows`, a pair of two listed rows is seen from both ends.
    key = i * n + j
    key, first = np.unique(key, return_index=True)
    return i[first], j[first], dist[first].astype(np.uint8)
