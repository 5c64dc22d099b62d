"""The shard writer: units in shard order -> content-defined shards, manifest rows, class counts.

Units come from `Resolver` in shard order, each either *computed* (encoded by a worker) or
*reused* (a reference into an earlier shard whose work key is unchanged, see reuse.py). The writer

- appends computed bytes as they arrive, and reused bytes read back through their reference
  (sha256-checked; a reference that fails is encoded again on the spot);
- at the start of a shard whose next units are all reused, runs the cut rule ahead over their
  recorded sizes: if the shard it would write is exactly an earlier shard (same units, same
  order), that file is copied instead (md5-checked) and nothing is assembled;
- records, once a shard is closed and its md5 known, a reference for every unit it assembled.

The cut rule only sees (key, bytes) per unit, so reused and computed units give the same shards
and the bytes equal a build without the cache.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from stages.errors import TidepoolError
from stages.executor import Executor
from stages.fsutil import atomic_path
from stages.pack import index as idx
from stages.pack.reuse import Ref, ShardStore, UnitCache, tiles_whole_shard
from stages.pack.sharding import Cutter, ShardSizes, key_hashes
from stages.pack.tarwriter import TarWriter, tar_key
from stages.pack.units import ProductPlan, Unit, UnitOut, run_unit
from stages.progress import bar

SPLITS = ("train", "val", "test")
# Units the resolver keeps ahead of the writer (their rows, not their payloads): enough to keep
# every worker busy across a run of reused units, small enough to be noise in memory.
MAX_AHEAD = 64


class ClassCounts:
    """Per split, how many samples count for each class index (numpy, not a Python object per point)."""

    def __init__(self, num_classes: int) -> None:
        self.size = max(0, int(num_classes))
        self.dense = {s: np.zeros(self.size, dtype=np.int64) for s in SPLITS}
        self.sparse: dict[str, Counter[int]] = {s: Counter() for s in SPLITS}  # indices past `size`

    def add(self, split: str, indices: list[int]) -> None:
        if not indices:
            return
        arr = np.asarray(indices, dtype=np.int64)
        inside = (arr >= 0) & (arr < self.size)
        if inside.all():
            np.add.at(self.dense[split], arr, 1)
            return
        np.add.at(self.dense[split], arr[inside], 1)
        self.sparse[split].update(int(i) for i in arr[~inside])

    def get(self, split: str, index: int) -> int:
        if 0 <= index < self.size:
            return int(self.dense[split][index])
        return self.sparse[split].get(index, 0)

    def present(self) -> int:
        total = sum(self.dense.values()) if self.size else np.zeros(0, dtype=np.int64)
        extra: set[int] = set().union(*(set(c) for c in self.sparse.values()))
        return int(np.count_nonzero(total)) + len(extra)


@dataclass
class WriteResult:
    shards: dict[str, list[idx.ShardInfo]]
    samples: Counter[str]
    units: Counter[str]
    decodes: int
    forced_cuts: int
    oversize_units: int
    counts: ClassCounts
    stats: Counter[str] = field(default_factory=Counter)  # computed / reused units, reused shards


@dataclass
class Resolved:
    unit: Unit  # without its payload when reused (make_unit rebuilds it if the reference fails)
    wkey: str | None
    ref: Ref | None = None  # reused: where its bytes are
    out: UnitOut | None = None  # computed: the worker's result


_NOOP = object()


class Resolver:
    """Units in shard order, each with its cached reference or its freshly computed result.

    One pass: `make_unit` builds a unit (labels, json), its work key is looked up, and a miss is
    fed to the executor while hits are passed straight through. `Executor.map` pulls its input
    only while it fills its in-flight window, so to keep the hits queued ahead of the writer
    bounded, the feeder sends a no-op item whenever MAX_AHEAD units are waiting: that lets a
    result come back, and the writer drain the queue, without stalling the workers. The no-ops
    themselves are not counted as waiting: the executor reads up to its whole in-flight window
    (jobs x 3 chunks) before it returns a result, and a window wider than MAX_AHEAD filled with
    no-ops that counted would keep the feeder sending no-ops forever (seen: inat2017's 16-unit
    chunks, 96 ahead).
    """

    def __init__(self, plan: ProductPlan, order: dict[str, list[str]], cache: UnitCache | None) -> None:
        self.plan = plan
        self.order = order
        self.cache = cache
        self.pending: deque[Any] = deque()
        self.noops = 0  # _NOOP entries in `pending`

    def _feed(self) -> Iterator[Any]:
        for split in SPLITS:
            for key in self.order.get(split, []):
                while len(self.pending) - self.noops >= MAX_AHEAD:
                    self.pending.append(_NOOP)
                    self.noops += 1
                    yield None
                unit = self.plan.make_unit(key, split)
                wkey = None
                if self.cache is not None and self.cache.enabled and unit.inputs is not None:
                    wkey = self.cache.key(unit.inputs)
                    ref = self.cache.lookup(wkey)
                    if ref is not None and ref.keys == tuple(r.key for r in unit.rows):
                        self.pending.append(Resolved(replace(unit, payload=None), wkey, ref=ref))
                        continue
                self.pending.append(Resolved(replace(unit, payload=None), wkey))
                yield (self.plan.encode, replace(unit, rows=(), inputs=None))

    def __call__(self, executor: Executor) -> Iterator[Resolved]:
        results = executor.map(run_unit, self._feed(), chunksize=self.plan.chunksize)
        computed: deque[Any] = deque()
        while True:
            if not self.pending:
                try:
                    computed.append(next(results))
                except StopIteration:
                    if not self.pending:
                        return
                continue
            item = self.pending.popleft()
            if isinstance(item, Resolved) and item.ref is not None:
                yield item
                continue
            out = computed.popleft() if computed else next(results)
            if item is _NOOP:
                self.noops -= 1
                continue
            item.out = out
            yield item


class _Shard:
    def __init__(self, out_dir: Path, split: str, number: int) -> None:
        self.name = idx.shard_name(split, number)
        self.path = out_dir / self.name
        self._ctx = atomic_path(self.path)
        self._fh = open(self._ctx.__enter__(), "wb")  # noqa: SIM115 - closed in finish/abort
        self.tar = TarWriter(self._fh)
        self.assembled: list[tuple[str, int, int, str, tuple[int, ...], tuple[str, ...], int]] = []

    def finish(self) -> idx.ShardInfo:
        md5 = self.tar.close()
        self._fh.close()
        self._ctx.__exit__(None, None, None)
        return idx.ShardInfo(self.name, self.tar.samples, self.tar.size, md5)

    def abort(self, exc: BaseException) -> None:
        self._fh.close()
        self._ctx.__exit__(type(exc), exc, exc.__traceback__)


class _Peekable:
    def __init__(self, it: Iterator[Resolved]) -> None:
        self._it = it
        self._buf: deque[Resolved] = deque()

    def peek(self, i: int) -> Resolved | None:
        while len(self._buf) <= i:
            try:
                self._buf.append(next(self._it))
            except StopIteration:
                return None
        return self._buf[i]

    def __iter__(self) -> _Peekable:
        return self

    def __next__(self) -> Resolved:
        if self._buf:
            return self._buf.popleft()
        return next(self._it)


def _nbytes(item: Resolved) -> int:
    if item.ref is not None:
        return item.ref.length
    assert item.out is not None
    return sum(len(s.data) for s in item.out.samples)


def write_shards(
    plan: ProductPlan,
    order: dict[str, list[str]],
    out_dir: Path,
    sizes: ShardSizes,
    executor: Executor,
    desc: str,
    cache: UnitCache | None = None,
    store: ShardStore | None = None,
) -> WriteResult:
    """Encode (or reuse) the units in `order` and append them to content-defined shards."""
    total_units = sum(len(v) for v in order.values())
    result = WriteResult(
        {s: [] for s in SPLITS}, Counter(), Counter(), 0, 0, 0, ClassCounts(plan.num_classes)
    )
    manifest = idx.ManifestWriter(out_dir / idx.MANIFEST)
    class_names = {int(c["index"]): str(c["name"]) for c in plan.classes.get("classes") or []}
    stream = _Peekable(Resolver(plan, order, cache)(executor))
    shard: _Shard | None = None
    split: str | None = None
    cutter = Cutter(sizes)
    number = 0

    def close_shard() -> None:
        nonlocal shard
        assert shard is not None and split is not None
        info = shard.finish()
        result.shards[split].append(info)
        if cache is not None and cache.enabled:
            for wkey, offset, length, sha, lengths, keys, decodes in shard.assembled:
                cache.store(
                    wkey, Ref(info.md5sum, info.filesize, offset, length, sha, lengths, keys, decodes)
                )
        shard = None

    def emit_rows(
        item: Resolved, shard_name: str, first_position: int, offset: int, lengths: list[int]
    ) -> None:
        assert split is not None
        position = first_position
        for row, length in zip(item.unit.rows, lengths):
            manifest.add(
                {
                    **row.row,
                    "key": tar_key(row.key),  # what readers see as __key__
                    "classes": sorted({class_names.get(int(c), str(c)) for c in row.counts}),
                    "split": split,
                    "shard": shard_name,
                    "position": position,
                    "offset": offset,
                    "nbytes": length,
                }
            )
            position += 1
            offset += length
            result.samples[split] += 1
            result.counts.add(split, list(row.counts))

    def reuse_whole_shard(first: Resolved) -> int:
        """Copy an earlier shard when the shard starting at `first` is exactly it; returns the
        number of units it took from the stream (0: not reusable, nothing consumed)."""
        assert store is not None and split is not None
        run = [first]
        sim = Cutter(sizes)
        forced = False
        i = 0
        while True:
            item = run[-1]
            n = item.ref.length if item.ref is not None else 0
            if sim.after(key_hashes(item.unit.key)[1], n):
                break  # a cut point: the shard ends after this unit
            nxt = stream.peek(i)
            if nxt is None or nxt.unit.split != split:
                break  # the split ends: so does its last shard
            if nxt.ref is None:
                return 0  # a unit to encode falls into this shard: it is new
            if sim.before(nxt.ref.length):
                forced = True  # a forced cut before `nxt` ends the shard
                break
            run.append(nxt)
            i += 1
        refs = [r.ref for r in run if r.ref is not None]
        if len(refs) != len(run) or not tiles_whole_shard(refs):
            return 0
        name = idx.shard_name(split, number)
        if not store.copy_shard(refs[0].shard_md5, refs[0].shard_size, out_dir / name):
            return 0
        for _ in range(len(run) - 1):
            next(stream)
        position = 0
        for item in run:
            assert item.ref is not None
            emit_rows(item, name, position, item.ref.offset, list(item.ref.lengths))
            position += len(item.ref.lengths)
            result.units[split] += 1
            result.decodes += item.ref.decodes
            result.oversize_units += item.ref.length > sizes.max_bytes
        result.shards[split].append(idx.ShardInfo(name, position, refs[0].shard_size, refs[0].shard_md5))
        result.forced_cuts += int(forced)
        result.stats["units_reused"] += len(run)
        result.stats["shards_reused"] += 1
        return len(run)

    def unit_bytes(item: Resolved) -> tuple[bytes, list[int], str, int]:
        """(bytes, per-sample lengths, sha256, decodes) of a unit, reading or encoding it."""
        if item.ref is not None:
            assert store is not None
            data = store.read(item.ref)
            if data is not None:
                result.stats["units_reused"] += 1
                return data, list(item.ref.lengths), item.ref.sha256, item.ref.decodes
            # The referenced bytes are gone or changed: encode the unit again, here.
            result.stats["references_unreadable"] += 1
            fresh = plan.make_unit(item.unit.key, item.unit.split)
            item.out = plan.encode(replace(fresh, rows=(), inputs=None))
            item.ref = None
        out = item.out
        assert out is not None
        if out.error:
            raise TidepoolError(f"{desc}: unit {out.key}: {out.error}")
        keys = [s.key for s in out.samples]
        if keys != [r.key for r in item.unit.rows]:
            raise TidepoolError(
                f"{desc}: unit {out.key}: encoder returned samples {keys[:3]}..., planned otherwise"
            )
        result.stats["units_computed"] += 1
        return (
            b"".join(s.data for s in out.samples),
            [len(s.data) for s in out.samples],
            out.sha256,
            out.decodes,
        )

    try:
        with bar(total=total_units, desc=desc, unit="unit") as progress:
            for item in stream:
                if item.unit.split != split:
                    if shard is not None:
                        close_shard()
                    result.forced_cuts += cutter.forced
                    split, cutter, number = item.unit.split, Cutter(sizes), 0
                if shard is None and item.ref is not None and store is not None and cutter.bytes == 0:
                    taken = reuse_whole_shard(item)
                    if taken:
                        number += 1
                        cutter = Cutter(sizes)
                        progress.update(taken)
                        continue
                if item.ref is None and item.out is not None and item.out.error:
                    raise TidepoolError(f"{desc}: unit {item.out.key}: {item.out.error}")
                nbytes = _nbytes(item)
                progress.update(1)
                result.units[split] += 1
                if not item.unit.rows:
                    if item.out is not None:
                        result.decodes += item.out.decodes
                    continue
                if cutter.before(nbytes) and shard is not None:
                    close_shard()
                if nbytes > sizes.max_bytes:
                    result.oversize_units += 1
                if shard is None:
                    shard = _Shard(out_dir, split, number)
                    number += 1
                data, lengths, sha, decodes = unit_bytes(item)
                result.decodes += decodes
                position = shard.tar.samples
                offset = shard.tar.size
                view, start = memoryview(data), 0
                for length in lengths:
                    shard.tar.write_sample(view[start : start + length])
                    start += length
                emit_rows(item, shard.name, position, offset, lengths)
                if item.wkey is not None:
                    keys = tuple(r.key for r in item.unit.rows)
                    shard.assembled.append((item.wkey, offset, len(data), sha, tuple(lengths), keys, decodes))
                if cutter.after(key_hashes(item.unit.key)[1], nbytes):
                    close_shard()
            result.forced_cuts += cutter.forced
        if shard is not None:
            close_shard()
        manifest.close()
    except BaseException as exc:
        if shard is not None:
            shard.abort(exc)
        manifest.abort(exc)
        raise
    return result
