"""The one ingest runner every source adapter runs on (see stages/ingest/records.py for the protocol).

`run(ctx, adapter)` drives `adapter.records(ctx, report)` and does everything that is the same for
all sources:

- per-image work (`Sample.work`) through one stage-long executor, in windows; each unit looks up
  the work cache (stages/cache.py) by the digest of the bytes it reads, so a rebuild after growth
  decodes only new and changed images (counted in the cache stats file, not in metrics);
- the image's own verdict: an unusable image (its work's problem, or `Sample.build`'s) is one
  quarantine row, its points go as `image_unusable`, its `on_unusable` rows with it; a kept one
  also keeps the records it `consumes` (a CSV row), and a `Built` from `Sample.build` can keep or
  refuse records that hang on the result (a mask that fits the image or does not);
- points against the image: outside `0 <= row < H, 0 <= col < W` -> `point_outside_image`; more
  than `ingest.max_outside_share` of them outside -> the image and all its points as
  `geometry_mismatch` (the points were made for another image, and the ones inside would be cut at
  the wrong place); a repeated (row, col) -> `duplicate_point` (the first in the adapter's order
  stays);
- the point-cover `labels` of point samples (`common.point_cover_labels` over the kept points) and
  the kept points' entries in `native_labels`;
- the three tables, streamed to parquet in fixed row groups (`fsutil.ParquetStream`): samples in
  sample_id order (the adapter yields them so; checked), points grouped by sample in that order and
  sorted by (row, col, point_id) within it, quarantine rows in the order they arose;
- accounting: for every record kind, inputs (`report.inputs`) == rows it ended as (samples, points,
  or containers read: `report.read`) + quarantine rows of that kind, or the stage fails (a bug,
  not bad input);
- metrics: counts, quarantine by reason, classes counted from the written points table with a
  pyarrow group-by, plus the adapter's `report.extra` (completed by its `report.on_finish` hooks,
  which run once every sample is finished); the adapter's `report.files` are written beside the
  tables.

Memory: one window of samples (and their points) at a time, the tables' current row group, and
per point one 8-byte id hash (the uniqueness check). No table is ever held as Python objects.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages import schema
from stages.cache import Cache, cache_root, open_cache, write_stats
from stages.errors import ConfigError, TidepoolError
from stages.executor import Executor
from stages.fsutil import ParquetStream, write_bytes
from stages.ingest.common import dumps_labels, point_cover_labels
from stages.ingest.context import IngestContext
from stages.ingest.probe import Cached
from stages.ingest.records import Built, Point, Quarantine, Record, Report, Sample, WorkResult
from stages.progress import bar

TABLES = ("samples.parquet", "points.parquet", "quarantine.parquet")
WINDOW = 256  # samples per round of work: bounds memory, keeps every worker busy
DEFAULT_MAX_OUTSIDE_SHARE = 0.05
# Rows per parquet row group: a group is held in memory until written, and a sample row carries
# kilobytes of label JSON (a MERMAID image's native points), a point row a few hundred bytes.
ROWS_PER_GROUP = {"samples": 1024, "points": 65536, "quarantine": 65536}
BATCH_ROWS = {"samples": 128, "points": 4096, "quarantine": 4096}


def _call(item: tuple[Any, Any, Cached]) -> tuple[WorkResult, str, int]:
    fn, task, cached = item
    result = fn(task, cached)
    return result, cached.outcome, cached.corrupt


def max_outside_share(params: dict[str, Any]) -> float:
    value = (params.get("ingest") or {}).get("max_outside_share", DEFAULT_MAX_OUTSIDE_SHARE)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigError(f"params.yaml: ingest.max_outside_share must be a number in [0, 1], got {value!r}")
    return float(value)


def _id_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


@dataclass
class _Writers:
    out_dir: Path
    samples: ParquetStream
    points: ParquetStream
    quarantine: ParquetStream

    @classmethod
    def open(cls, out_dir: Path) -> _Writers:
        return cls(
            out_dir,
            *(
                ParquetStream(out_dir / f"{name}.parquet", table, ROWS_PER_GROUP[name], BATCH_ROWS[name])
                for name, table in (
                    ("samples", schema.SAMPLES),
                    ("points", schema.POINTS),
                    ("quarantine", schema.QUARANTINE),
                )
            ),
        )

    def close(self) -> None:
        for w in (self.samples, self.points, self.quarantine):
            w.close()

    def abort(self, exc: BaseException) -> None:
        for w in (self.samples, self.points, self.quarantine):
            w.abort(exc)


@dataclass
class _Run:
    ctx: IngestContext
    report: Report
    writers: _Writers
    share: float
    cache_root: Path | None = None
    caches: dict[str, Cache] = field(default_factory=dict)
    produced: Counter[str] = field(default_factory=Counter)  # per record kind: samples/points made
    quarantined: Counter[str] = field(default_factory=Counter)  # per record kind
    reasons: Counter[str] = field(default_factory=Counter)
    point_hashes: list[np.ndarray] = field(default_factory=list)
    _hash_buf: list[int] = field(default_factory=list)
    written_files: set[str] = field(default_factory=set)
    last_sample: str | None = None
    samples: int = 0
    points: int = 0

    # --- rows -------------------------------------------------------------------------------

    def reject(self, q: Quarantine) -> None:
        if q.reason not in schema.REASONS:
            raise ValueError(f"unknown quarantine reason {q.reason!r}")  # a bug in the adapter
        self.writers.quarantine.add(
            {
                "source": self.ctx.source,
                "record_kind": q.record_kind,
                "record_id": str(q.record_id),
                "file": str(q.file),
                "reason": q.reason,
                "detail": q.detail,
            }
        )
        self.quarantined[q.record_kind] += 1
        self.reasons[q.reason] += 1

    def cache(self, namespace: str) -> Cache:
        if namespace not in self.caches:
            self.caches[namespace] = open_cache(namespace, self.ctx.root)
        return self.caches[namespace]

    def check_order(self, sample: Sample) -> None:
        sid = sample.sample_id
        if not sid or not sid.isascii() or "." in sid:
            raise TidepoolError(
                f"{self.ctx.source}: sample id {sid!r} is not ASCII without dots ({sample.file})"
            )
        if self.last_sample is not None and sid <= self.last_sample:
            what = "twice" if sid == self.last_sample else f"after {self.last_sample!r}"
            raise TidepoolError(
                f"{self.ctx.source}: sample id {sid!r} comes {what} ({sample.file}); two upstream "
                "records map to one id, or the adapter does not yield in sample_id order"
            )
        self.last_sample = sid

    # --- one sample, after its work ---------------------------------------------------------

    def _unusable(self, sample: Sample, reason: str, detail: str) -> None:
        self.reject(
            Quarantine(
                sample.record_kind, sample.record_id or sample.upstream_id, sample.file, reason, detail
            )
        )
        what = f"image {sample.file or sample.upstream_id}: {reason}" + (f" ({detail})" if detail else "")
        for p in sample.points or ():
            self.reject(Quarantine("point", p.record_id, sample.points_file, "image_unusable", what))
        for q in sample.on_unusable:
            self.reject(q)

    def finish(self, sample: Sample, result: WorkResult) -> None:
        if result.problem is not None:
            self._unusable(sample, *result.problem)
            return
        extra: dict[str, Any] = {}
        also = Built({})
        if sample.build is not None:
            built = sample.build(result)
            if isinstance(built, Quarantine):
                self._unusable(sample, built.reason, built.detail)
                return
            also = built if isinstance(built, Built) else Built(built)
            extra = also.columns
        columns = {**sample.columns, **result.columns, **extra}
        kept: list[Point] | None = None
        if sample.points is not None:
            kept = self._check_points(sample, int(columns["width"]), int(columns["height"]))
            if kept is None:
                return
            columns["labels"] = point_cover_labels(p.labels for p in kept)
            columns["n_points"] = len(kept)
            if sample.native_points_key:
                native = dict(columns.get("native_labels") or {})
                native[sample.native_points_key] = [p.native for p in kept]
                columns["native_labels"] = native
        row = {name: None for name in schema.SAMPLES.names}
        row.update(columns)
        row["sample_id"], row["upstream_id"], row["source"] = (
            sample.sample_id,
            sample.upstream_id,
            self.ctx.source,
        )
        row["n_points"] = int(row.get("n_points") or 0)
        try:
            for key in ("labels", "native_labels"):
                if row[key] is not None and not isinstance(row[key], str):
                    row[key] = dumps_labels(row[key])
        except ValueError as exc:
            # NaN/Infinity reached a label: no JSON reader downstream may ever meet one.
            self._unusable(sample, "bad_record", f"labels hold a number JSON cannot carry ({exc})")
            return
        for name, data in sorted(result.files.items()):
            self._write_file(name, data)
        self.writers.samples.add(row)
        self.produced[sample.record_kind] += 1
        for kind in (*sample.consumes, *also.consumed):
            self.produced[kind] += 1
        for q in also.quarantine:
            self.reject(q)
        self.samples += 1
        for p in kept or ():
            self.writers.points.add(
                {
                    "point_id": p.point_id,
                    "sample_id": sample.sample_id,
                    "source": self.ctx.source,
                    "row": p.row,
                    "col": p.col,
                    **{k: p.labels.get(k) for k in _POINT_LABELS},
                }
            )
            self._hash_buf.append(_id_hash(p.point_id))
        if kept:
            self.produced["point"] += len(kept)
            self.points += len(kept)
            if len(self._hash_buf) >= 1 << 16:
                self.point_hashes.append(np.array(self._hash_buf, dtype=np.uint64))
                self._hash_buf = []

    def _check_points(self, sample: Sample, width: int, height: int) -> list[Point] | None:
        points = sample.points or []
        inside = [p for p in points if 0 <= p.row < height and 0 <= p.col < width]
        outside = len(points) - len(inside)
        if points and outside > self.share * len(points):
            detail = (
                f"{outside} of {len(points)} points fall outside the {width}x{height} image "
                f"(more than ingest.max_outside_share = {self.share:g}): the annotations belong to "
                "another image or another size of it"
            )
            self.reject(
                Quarantine(
                    sample.record_kind,
                    sample.record_id or sample.upstream_id,
                    sample.file,
                    "geometry_mismatch",
                    detail,
                )
            )
            for p in points:
                self.reject(
                    Quarantine(
                        "point",
                        p.record_id,
                        sample.points_file,
                        "geometry_mismatch",
                        f"image {sample.file}: {detail}",
                    )
                )
            for q in sample.on_unusable:
                self.reject(q)
            return None
        kept: list[Point] = []
        seen: dict[tuple[int, int], str] = {}
        for p in points:
            if not (0 <= p.row < height and 0 <= p.col < width):
                self.reject(
                    Quarantine(
                        "point",
                        p.record_id,
                        sample.points_file,
                        "point_outside_image",
                        f"(row, col) = ({p.row}, {p.col}) outside {width}x{height} image {sample.file}",
                    )
                )
                continue
            first = seen.get((p.row, p.col))
            if first is not None:
                self.reject(
                    Quarantine(
                        "point",
                        p.record_id,
                        sample.points_file,
                        "duplicate_point",
                        f"(row, col) = ({p.row}, {p.col}): first kept as {first}",
                    )
                )
                continue
            seen[(p.row, p.col)] = p.point_id
            kept.append(p)
        kept.sort(key=lambda p: (p.row, p.col, p.point_id))
        return kept

    def _write_file(self, name: str, data: bytes) -> None:
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or rel.as_posix() in TABLES:
            raise TidepoolError(f"{self.ctx.source}: work wrote an unsafe output name {name!r}")  # a bug
        write_bytes(self.writers.out_dir / rel, data)
        self.written_files.add(rel.as_posix())


_POINT_LABELS = tuple(
    n for n in schema.POINTS.names if n not in ("point_id", "sample_id", "source", "row", "col")
)


def _samples_only(run: _Run, records: Iterable[Record]) -> Iterator[Sample]:
    for record in records:
        if isinstance(record, Quarantine):
            run.reject(record)
        elif isinstance(record, Sample):
            run.check_order(record)
            yield record
        else:
            raise TypeError(f"adapter yielded {type(record).__name__}, not Sample or Quarantine")  # a bug


def _windows(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    window: list[Sample] = []
    for s in samples:
        window.append(s)
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window


def _work(run: _Run, ex: Executor, window: list[Sample]) -> list[WorkResult]:
    """Each sample's work result, in order; the workers look the cache up themselves."""
    results: list[WorkResult] = [WorkResult()] * len(window)
    todo = [(i, s.work) for i, s in enumerate(window) if s.work is not None]
    items = [(w.fn, w.task, Cached(run.cache_root, w.namespace, w.code, w.settings)) for _, w in todo]
    for (i, work), (result, outcome, corrupt) in zip(todo, ex.map(_call, items, chunksize=4)):
        results[i] = result
        counters = run.cache(work.namespace).stats
        counters["items"] += 1
        counters[outcome] += 1
        counters["corrupt"] += corrupt
    return results


def _clean_stale(out_dir: Path, keep: set[str]) -> int:
    """Files under out_dir that this run did not write (an earlier run's masks): removed."""
    removed = 0
    for path in sorted(out_dir.rglob("*"), reverse=True):
        rel = path.relative_to(out_dir).as_posix()
        if path.is_file() and rel not in keep and rel not in TABLES:
            path.unlink()
            removed += 1
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return removed


def _check_point_ids(run: _Run) -> None:
    if run._hash_buf:
        run.point_hashes.append(np.array(run._hash_buf, dtype=np.uint64))
        run._hash_buf = []
    if not run.point_hashes:
        return
    hashes = np.sort(np.concatenate(run.point_hashes))
    if not np.any(hashes[1:] == hashes[:-1]):
        return
    # A hash collision is possible; a real duplicate is named exactly from the written table.
    ids = pq.read_table(run.writers.out_dir / "points.parquet", columns=["point_id"]).column("point_id")
    counts = pa.TableGroupBy(pa.table({"point_id": ids}), "point_id").aggregate([("point_id", "count")])
    dupes = counts.filter(pa.compute.greater(counts["point_id_count"], 1))["point_id"].to_pylist()
    if dupes:
        raise TidepoolError(
            f"{run.ctx.source}: point ids repeat across images: {sorted(dupes)[:5]} "
            f"(data/interim/{run.ctx.source}/points.parquet); two upstream points map to one id"
        )


def _class_counts(path: Path) -> dict[str, dict[str, int]]:
    table = pq.read_table(path, columns=["benthic_attribute_name", "top_level_category"])
    out: dict[str, dict[str, int]] = {}
    for column, name in (
        ("benthic_attribute_name", "benthic_attribute"),
        ("top_level_category", "top_level_category"),
    ):
        counts = pa.table({"k": table.column(column)}).group_by("k").aggregate([("k", "count")])
        pairs = [
            (k, int(n))
            for k, n in zip(counts["k"].to_pylist(), counts["k_count"].to_pylist())
            if k is not None
        ]
        out[name] = dict(sorted(pairs))
    return out


def run(ctx: IngestContext, adapter: ModuleType) -> dict[str, Any]:
    """Ingest one source with `adapter.records`; write the tables; return the metrics."""
    out_dir = ctx.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    report = Report()
    writers = _Writers.open(out_dir)
    state = _Run(ctx, report, writers, max_outside_share(ctx.params), cache_root(ctx.root))
    preload = sorted({getattr(adapter, "__name__", "")} - {""})
    try:
        with (
            Executor(ctx.jobs, ctx.scheduler, preload=preload) as ex,
            bar(desc=f"ingest {ctx.source}", unit="img") as progress,
        ):
            for window in _windows(_samples_only(state, adapter.records(ctx, report)), WINDOW):
                for sample, result in zip(window, _work(state, ex, window)):
                    state.finish(sample, result)
                progress.update(len(window))
        writers.close()
    except BaseException as exc:
        writers.abort(exc)
        raise
    for name, data in sorted(report.files.items()):
        state._write_file(name, data)
    for hook in report.on_finish:
        hook()
    _check_point_ids(state)
    stale = _clean_stale(out_dir, state.written_files)

    kept = state.produced + report.read  # a container read into its records counts as kept
    kinds = set(report.inputs) | set(kept) | set(state.quarantined)
    wrong = {
        k: (report.inputs.get(k, 0), kept.get(k, 0), state.quarantined.get(k, 0))
        for k in sorted(kinds)
        if report.inputs.get(k, 0) != kept.get(k, 0) + state.quarantined.get(k, 0)
    }
    if wrong:
        detail = "; ".join(f"{k}: {i} inputs != {p} kept + {q} quarantined" for k, (i, p, q) in wrong.items())
        raise TidepoolError(f"{ctx.source}: records lost or counted twice ({detail})")  # a bug

    metrics: dict[str, Any] = {
        "samples": state.samples,
        "points": state.points,
        "quarantined": sum(state.quarantined.values()),
        "quarantine": dict(sorted(state.reasons.items())),
        "inputs": dict(sorted(report.inputs.items())),
    }
    if state.points:
        metrics["classes"] = _class_counts(out_dir / "points.parquet")
    metrics.update(report.extra)
    write_stats(
        f"ingest@{ctx.source}",
        state.caches.values(),
        root=ctx.root,
        samples=state.samples,
        stale_files_removed=stale,
    )
    return _finite(metrics)


def _finite(obj: Any) -> Any:
    """Metrics are strict JSON: a non-finite ratio is a bug to see, not a NaN to write."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise TidepoolError(f"metrics hold a non-finite number: {obj!r}")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
