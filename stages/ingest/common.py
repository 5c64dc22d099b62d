"""What every source adapter shares: probing images in parallel, and collecting rows into the
sample, point and quarantine tables with the "every input record lands exactly once" bookkeeping.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from stages import schema
from stages.errors import TidepoolError
from stages.executor import parallel_map
from stages.fsutil import write_json, write_parquet
from stages.imaging import ImageInfo, ImageProblem, probe_image_file
from stages.progress import bar


@dataclass(frozen=True)
class ProbeTask:
    path: str
    max_pixels: int
    lossless_pixel_hash: bool = True


def _probe(task: ProbeTask) -> ImageInfo | ImageProblem:
    # Returned, not raised: a bad image is a quarantine row, and an exception would cross the
    # process boundary as a traceback.
    try:
        return probe_image_file(task.path, task.max_pixels, lossless_pixel_hash=task.lossless_pixel_hash)
    except ImageProblem as problem:
        return problem


def probe_images(
    paths: Sequence[str],
    max_pixels: int,
    jobs: int | None = 1,
    scheduler: str | None = None,
    desc: str = "probe images",
) -> dict[str, ImageInfo | ImageProblem]:
    """Decode and hash each image once, in parallel; results keyed by path."""
    tasks = [ProbeTask(p, max_pixels) for p in paths]
    results: dict[str, ImageInfo | ImageProblem] = {}
    with bar(total=len(tasks), desc=desc, unit="img") as progress:
        for task, result in zip(tasks, parallel_map(_probe, tasks, jobs=jobs, scheduler=scheduler)):
            results[task.path] = result
            progress.update(1)
    return results


@dataclass
class Tables:
    """Rows collected by one adapter run, written as the three parquet tables."""

    source: str
    samples: list[dict[str, Any]] = field(default_factory=list)
    points: list[dict[str, Any]] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)

    def add_sample(self, row: dict[str, Any]) -> None:
        full = {name: None for name in schema.SAMPLES.names}
        full.update(row)
        full["source"] = self.source
        if full.get("n_points") is None:
            full["n_points"] = 0
        self.samples.append(full)

    def add_point(self, row: dict[str, Any]) -> None:
        full = {name: None for name in schema.POINTS.names}
        full.update(row)
        full["source"] = self.source
        self.points.append(full)

    def reject(self, record_kind: str, record_id: str, file: str, reason: str, detail: str = "") -> None:
        if reason not in schema.REASONS:
            raise ValueError(f"unknown quarantine reason {reason!r}")  # a bug, not bad input
        self.quarantine.append(
            {
                "source": self.source,
                "record_kind": record_kind,
                "record_id": str(record_id),
                "file": str(file),
                "reason": reason,
                "detail": detail,
            }
        )

    def check(self) -> None:
        """Invariants every adapter must keep; a violation is a bug in the adapter."""
        ids = [s["sample_id"] for s in self.samples]
        dupes = [i for i, n in Counter(ids).items() if n > 1]
        if dupes:
            raise TidepoolError(f"{self.source}: duplicate sample ids {dupes[:5]}")
        bad = [i for i in ids if "." in i or not i.isascii()]
        if bad:
            raise TidepoolError(f"{self.source}: sample ids must be ASCII without dots: {bad[:5]}")
        point_ids = [p["point_id"] for p in self.points]
        if len(point_ids) != len(set(point_ids)):
            raise TidepoolError(f"{self.source}: duplicate point ids")
        known = set(ids)
        orphans = {p["sample_id"] for p in self.points} - known
        if orphans:
            raise TidepoolError(f"{self.source}: points reference unknown samples {sorted(orphans)[:5]}")

    def write(self, out_dir: Path) -> None:
        self.check()
        out_dir.mkdir(parents=True, exist_ok=True)
        samples = sorted(self.samples, key=lambda r: r["sample_id"])
        points = sorted(self.points, key=lambda r: (r["sample_id"], r["row"], r["col"], r["point_id"]))
        quarantine = sorted(
            self.quarantine, key=lambda r: (r["reason"], r["record_kind"], r["record_id"], r["file"])
        )
        write_parquet(out_dir / "samples.parquet", pa.Table.from_pylist(samples, schema=schema.SAMPLES))
        write_parquet(out_dir / "points.parquet", pa.Table.from_pylist(points, schema=schema.POINTS))
        write_parquet(
            out_dir / "quarantine.parquet", pa.Table.from_pylist(quarantine, schema=schema.QUARANTINE)
        )

    def metrics(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        reasons = Counter(q["reason"] for q in self.quarantine)
        out: dict[str, Any] = {
            "samples": len(self.samples),
            "points": len(self.points),
            "quarantined": len(self.quarantine),
            "quarantine": dict(sorted(reasons.items())),
        }
        if extra:
            out.update(extra)
        return out


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    write_json(path, metrics)


def sample_info_columns(info: ImageInfo) -> dict[str, Any]:
    """The sample-table columns that come from probing the image."""
    return {
        "width": info.width,
        "height": info.height,
        "file_size": info.file_size,
        "file_sha256": info.file_sha256,
        "pixel_sha256": info.pixel_sha256,
        "phash": info.phash,
    }


def dumps_labels(obj: Any) -> str:
    """Compact canonical JSON for the label columns (sorted keys: equal labels, equal bytes).

    Strict: NaN or Infinity raise ValueError, so no reader downstream ever meets a non-JSON number.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def class_counts(values: Iterable[str | None]) -> dict[str, int]:
    counts = Counter(v for v in values if v is not None)
    return dict(sorted(counts.items()))


def _growth_key(item: tuple[tuple[str | None, str | None], int]) -> tuple[bool, str, str]:
    (gf_id, gf_name), _count = item
    return (gf_id is not None, gf_id or "", gf_name or "")


def point_cover_labels(points: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The `labels` JSON of a point-annotated image (MERMAID, CoralNet): point cover per class.

    `points` are the image's kept points, each with `benthic_attribute_id`, `benthic_attribute_name`,
    `growth_form_id`, `growth_form_name` and `top_level_category`. Cover = count / n_points, so the
    pack stage builds reef-images labels (presence, cover fractions) from this alone:

        {"n_points": n,
         "benthic_attributes": {attr_id: {"name", "top_level_category", "count", "cover",
                                          "growth_forms": [{"id", "name", "count"}, ...]}},
         "top_level_categories": {name: {"count", "cover"}}}

    Growth forms are listed by id (null first); an image with no kept point has n_points 0 and
    empty maps.
    """
    attrs: dict[str, dict[str, Any]] = {}
    growth: dict[str, Counter[tuple[str | None, str | None]]] = {}
    tops: Counter[str] = Counter()
    n = 0
    for p in points:
        n += 1
        attr_id = p["benthic_attribute_id"]
        entry = attrs.setdefault(
            attr_id,
            {"name": p["benthic_attribute_name"], "top_level_category": p["top_level_category"], "count": 0},
        )
        entry["count"] += 1
        growth.setdefault(attr_id, Counter())[(p.get("growth_form_id"), p.get("growth_form_name"))] += 1
        tops[p["top_level_category"]] += 1
    for attr_id, entry in attrs.items():
        entry["cover"] = entry["count"] / n
        entry["growth_forms"] = [
            {"id": gf_id, "name": gf_name, "count": count}
            for (gf_id, gf_name), count in sorted(growth[attr_id].items(), key=_growth_key)
        ]
    return {
        "n_points": n,
        "benthic_attributes": dict(sorted(attrs.items())),
        "top_level_categories": {name: {"count": c, "cover": c / n} for name, c in sorted(tops.items())},
    }
