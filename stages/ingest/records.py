"""What a source adapter yields: one record at a time, `Sample | Quarantine`, points inside samples.

An adapter is a generator `records(ctx, report)` in the spirit of TFDS's `_generate_examples`: it
parses its upstream files, validates and crosswalks what it can judge on its own, and yields

- `Quarantine(...)` for an input record it cannot use (a bad CSV row, an unmapped label, ...);
- `Sample(...)` for an image, with the `Work` that probes it (decode, hashes, size; for Coast Train
  the npz decode and its mask) and, for point sources, its candidate `Point`s.

Samples come in strictly increasing `sample_id` order (the runner checks), so the tables stream
straight to disk already sorted. Everything that needs the image itself is the runner's
(stages.ingest.runner): running the work through the executor and the work cache, quarantining
the image when it is unusable (and its points as `image_unusable`), points outside the image
(`point_outside_image`, or the whole image as `geometry_mismatch` past
`ingest.max_outside_share`), repeated (row, col) points (`duplicate_point`), the point-cover labels
of point samples, writing the tables in record batches and the bookkeeping
`inputs = samples/points + quarantine rows`, per record kind.

`report.inputs[kind]` counts the adapter's input records per `record_kind`; `report.read[kind]` those
of them that are containers read into other records (a CoralNet export: read, or one quarantine
row); `report.extra` holds source-specific metrics. Quarantine rows, samples and points are counted by
the runner.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Quarantine:
    record_kind: str  # image | point | annotation_row | mask | file | ...
    record_id: str
    file: str  # relative to the repo root
    reason: str  # one of stages.schema.REASONS
    detail: str = ""


@dataclass(frozen=True)
class WorkResult:
    """What a unit of work found out about one image. JSON-able (it is cached), plus files."""

    columns: dict[str, Any] = field(default_factory=dict)  # width, height, file_size, file_sha256, ...
    data: dict[str, Any] = field(default_factory=dict)  # source-specific findings for `Sample.build`
    files: dict[str, bytes] = field(default_factory=dict)  # outputs under out_dir (e.g. masks/<id>.png)
    problem: tuple[str, str] | None = None  # (reason, detail): the image is unusable


@dataclass(frozen=True)
class Work:
    """A unit of per-image work, run in a worker process and cached by content.

    `fn(task, cached)` must be a module-level function returning a WorkResult (problems as values,
    not raised). It reads its inputs, digests them, and asks `cached.lookup(inputs)` before
    computing (then `cached.store(inputs, result)`): the digest is taken in the worker, from the
    bytes the work reads anyway, so the main process never reads an image and a file that changed
    in place can never be mistaken for its old self. `namespace`, `code` and `settings` complete
    the key (stages.cache.work_key).
    """

    fn: Callable[[Any, Any], WorkResult]
    task: Any
    namespace: str
    code: str
    settings: Any


@dataclass
class Point:
    point_id: str  # the POINTS table id, already made by the adapter (make_sample_id)
    row: int
    col: int
    record_id: str  # the input record's id, for quarantine rows
    labels: dict[
        str, Any
    ]  # source_label_id, source_label, benthic_attribute_*, growth_form_*, top_level_category
    native: dict[str, Any] | None = None  # this point in native_labels (kept points only)


@dataclass
class Sample:
    sample_id: str
    upstream_id: str
    work: Work | None  # None: the adapter gives every probed column itself in `columns`
    columns: dict[str, Any]  # sample-table columns the adapter knows (image_path, group keys, labels ...)
    record_kind: str = "image"  # the kind of the input record the image is (its quarantine row's)
    record_id: str | None = None  # id in the image's quarantine row (default upstream_id)
    file: str = ""  # the image's file, for its quarantine row
    points: list[Point] | None = None  # point sources: candidate points, in first-kept-wins order
    points_file: str = ""  # where the point records came from (their quarantine rows' `file`)
    native_points_key: str | None = None  # native_labels[key] := the kept points' `native`, sorted
    on_unusable: list[Quarantine] = field(default_factory=list)  # also quarantined if the image is
    # Kinds of other input records that end in this sample when it is kept (Seatizen: its CSV row),
    # one record each: the runner counts them as kept, as it counts the image itself.
    consumes: tuple[str, ...] = ()
    # Called in the main process with the work's result: returns more columns (or a Built), or a
    # Quarantine for the image (its points then go as image_unusable). Needed where labels come
    # from the pixels.
    build: Callable[[WorkResult], dict[str, Any] | Built | Quarantine] | None = None


@dataclass(frozen=True)
class Built:
    """What `Sample.build` gives for a kept image when records beside it depend on the result
    (Seatizen: the image's mask is attached, or refused while the image stays)."""

    columns: dict[str, Any]
    consumed: tuple[str, ...] = ()  # kinds of further input records that end in this sample
    quarantine: tuple[Quarantine, ...] = ()  # further input records refused though the image is kept


Record = Sample | Quarantine


@dataclass
class Report:
    """What an adapter tells the runner besides its records."""

    inputs: Counter[str] = field(default_factory=Counter)  # input records per record_kind
    # Input records read into other records rather than kept as rows (a CoralNet export into its
    # annotation rows): each one is either read (counted here) or quarantined whole.
    read: Counter[str] = field(default_factory=Counter)
    extra: dict[str, Any] = field(default_factory=dict)  # source-specific metrics
    # Files under out_dir besides the tables (e.g. a class list), by name relative to it: written
    # by the runner once the records are done, and kept by its cleanup of stale files.
    files: dict[str, bytes] = field(default_factory=dict)
    # Called once every sample is finished (its work judged, its row written or quarantined) and
    # before the metrics are assembled: for metrics of what was kept (counted in `Sample.build`).
    on_finish: list[Callable[[], None]] = field(default_factory=list)
