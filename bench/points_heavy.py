"""Points-heavy bench: the table stages at real point counts, on images that are small in pixels.

    python -m bench.points_heavy --points 100000 --points 1000000 [--points 5000000]
        [--workdir DIR] [--out bench/results/points.json] [--pack-layout images|patches|skip]

Real sources carry 200 points per CoralNet image and 25 per MERMAID image; what grows with them is
the tables (points, labels, quarantine), not the pixels. This bench builds a small sample corpus
(the generator at a low scale, fetched through the real fetch code from the loopback servers), then
adds synthetic MERMAID and CoralNet images of 128x128 / 160x160 pixels carrying real numbers of
points (20% of the points on MERMAID images, 80% on CoralNet ones, as in the real bucket) straight
into `data/raw/` with a fresh fetch manifest, and runs every table stage as its own process under
`bench.measure`: ingest@<every source>, dedup, split and pack@reef-points (`--pack-layout images` by
default: the points-on-images layout measures pack's planning and per-image work without encoding
millions of patches; `patches` encodes them all; `skip` leaves pack out). It prints peak RSS and
CPU seconds per stage and size, and the growth of peak RSS from the smallest to each larger size.

Figures go to `--out` (default bench/results/points.json). Each size is built in its own scratch
folder under `--workdir`, removed afterwards unless `--keep`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BASE_SCALE = 0.2  # the sample corpus the synthetic points are added to
MERMAID_POINTS, CORALNET_POINTS = 25, 200
MERMAID_SHARE = 0.2
MERMAID_SIZE, CORALNET_SIZE = (128, 128), (160, 160)
STAGES_BEFORE_PACK = (
    "ingest@mermaid",
    "ingest@coralnet",
    "ingest@coasttrain",
    "ingest@inat2017",
    "ingest@seatizen",
    "dedup",
    "split",
)
NS = uuid.UUID("5b3f4f4e-8e54-4d0a-9f0e-2a8f1b7c9d10")


def log(message: str) -> None:
    print(f"[points-heavy] {message}", file=sys.stderr, flush=True)


def _texture(seed: int, h: int, w: int) -> np.ndarray:
    """A smooth, distinct image: low-frequency noise (its own pHash) plus a little grain."""
    rng = np.random.default_rng(seed)
    low = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-6, 7, size=(h, w, 1), dtype=np.int16)
    return np.clip(img + grain, 0, 255).astype(np.uint8)


def _write_image(job: tuple[str, int, int, int, str]) -> None:
    path, seed, h, w, fmt = job
    img = Image.fromarray(_texture(seed, h, w))
    if fmt == "png":
        img.save(path, "PNG", compress_level=1)
    else:
        img.save(path, "JPEG", quality=85)


def build_base(workdir: Path) -> Path:
    """A fetched project at BASE_SCALE: real fetch code, loopback servers, taxonomy snapshot."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import fetch_project, make_project  # type: ignore[import-not-found]

    from stages.samplegen.__main__ import generate_all

    upstream = workdir / "upstream"
    generate_all(upstream, scale=BASE_SCALE, jobs=2)
    root = workdir / "project"
    root.mkdir(parents=True)
    make_project(root)
    (workdir / "fetched").mkdir()
    fetched = fetch_project(upstream, workdir / "fetched")
    for part in ("raw", "taxonomy"):
        shutil.copytree(fetched / "data" / part, root / "data" / part, dirs_exist_ok=True)
    shutil.rmtree(upstream)
    shutil.rmtree(fetched)
    return root


def _mappable_coralnet_labels(root: Path) -> list[str]:
    """CoralNet label ids with exactly one MERMAID mapping in the snapshot (no ambiguity)."""
    mappings = json.loads((root / "data/taxonomy/labelmappings.json").read_text(encoding="utf-8"))
    targets: dict[str, set[tuple[Any, Any]]] = {}
    for m in mappings:
        if m.get("provider") == "CoralNet" and m.get("benthic_attribute_id"):
            targets.setdefault(str(m["provider_id"]), set()).add(
                (m["benthic_attribute_id"], m.get("growth_form_id"))
            )
    with open(root / "data/raw/coralnet/s2012/labelset.csv", newline="", encoding="utf-8") as fh:
        labelset = {row["Label ID"] for row in csv.DictReader(fh)}
    return sorted(k for k, v in targets.items() if len(v) == 1 and k in labelset)


def add_points(root: Path, points: int, jobs: int) -> dict[str, int]:
    """Synthetic MERMAID and CoralNet images carrying `points` points, written into data/raw."""
    from stages.fetch.manifest import ManifestRow, write_manifest
    from stages.fsutil import file_digest

    n_mermaid = max(1, round(points * MERMAID_SHARE / MERMAID_POINTS))
    n_coralnet = max(1, round(points * (1 - MERMAID_SHARE) / CORALNET_POINTS))
    rng = np.random.default_rng(20261202)
    jobs_list: list[tuple[str, int, int, int, str]] = []

    # MERMAID: rows appended to the confirmed-annotations parquet, one PNG per image.
    raw_m = root / "data/raw/mermaid"
    parquet = raw_m / "mermaid_confirmed_annotations.parquet"
    base = pq.read_table(parquet)
    attrs = [
        r
        for r in base.select(
            ["benthic_attribute_id", "benthic_attribute_name", "growth_form_id", "growth_form_name"]
        ).to_pylist()
    ]
    h, w = MERMAID_SIZE
    grid = [(int((i + 0.5) * h / 5), int((j + 0.5) * w / 5)) for i in range(5) for j in range(5)]
    cols: dict[str, list[Any]] = {c: [] for c in base.column_names}
    stamp = base.column("updated_on")[0].as_py()
    for k in range(n_mermaid):
        image_id = str(uuid.uuid5(NS, f"mermaid-image-{k}"))
        jobs_list.append((str(raw_m / f"{image_id}.png"), k, h, w, "png"))
        picks = rng.integers(0, len(attrs), size=MERMAID_POINTS)
        for p, (r, c) in enumerate(grid):
            a = attrs[int(picks[p])]
            cols["id"].append(str(uuid.uuid5(NS, f"mermaid-ann-{k}-{p}")))
            cols["image_id"].append(image_id)
            cols["point_id"].append(str(uuid.uuid5(NS, f"mermaid-point-{k}-{p}")))
            cols["row"].append(r)
            cols["col"].append(c)
            for name in (
                "benthic_attribute_id",
                "benthic_attribute_name",
                "growth_form_id",
                "growth_form_name",
            ):
                cols[name].append(a[name])
            cols["updated_on"].append(stamp)
            cols["region_id"].append(None)
            cols["region_name"].append(None)
    extra = pa.table({c: pa.array(v, type=base.schema.field(c).type) for c, v in cols.items()})
    table = pa.concat_tables([base, extra]).sort_by(
        [("image_id", "ascending"), ("row", "ascending"), ("col", "ascending")]
    )
    pq.write_table(table, parquet)
    del cols, extra, table

    # CoralNet: rows appended to the bucket export s2012 (Image ID, Row, Column, Label ID, Status).
    raw_c = root / "data/raw/coralnet/s2012"
    labels = _mappable_coralnet_labels(root)
    h, w = CORALNET_SIZE
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for k in range(n_coralnet):
        image_id = 90_000_000 + k
        jobs_list.append((str(raw_c / "images" / f"{image_id}.jpg"), 10**7 + k, h, w, "jpeg"))
        cells = rng.choice(h * w, size=CORALNET_POINTS, replace=False)
        picks = rng.integers(0, len(labels), size=CORALNET_POINTS)
        for cell, pick in zip(cells.tolist(), picks.tolist()):
            writer.writerow([image_id, cell // w, cell % w, labels[pick], "Confirmed"])
    with open(raw_c / "annotations.csv", "a", encoding="utf-8", newline="") as fh:
        fh.write(buf.getvalue())
    del buf

    started = time.monotonic()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(_write_image, jobs_list, chunksize=256))
    log(f"wrote {len(jobs_list)} images in {time.monotonic() - started:.0f}s")

    for source in ("mermaid", "coralnet"):
        raw = root / "data/raw" / source
        rows = [
            ManifestRow(
                p.relative_to(raw).as_posix(), p.stat().st_size, file_digest(p, "md5"), "", "synthetic", "md5"
            )
            for p in sorted(raw.rglob("*"))
            if p.is_file() and p.name != "manifest.csv"
        ]
        write_manifest(raw, rows)
    return {
        "mermaid_images": n_mermaid,
        "coralnet_images": n_coralnet,
        "points_added": n_mermaid * MERMAID_POINTS + n_coralnet * CORALNET_POINTS,
    }


def set_params(root: Path, jobs: int, pack_layout: str) -> None:
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    params["jobs"] = jobs
    if pack_layout != "skip":
        params["products"]["reef-points"]["layout"] = pack_layout
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def stage_argv(stage: str) -> list[str]:
    name, _, key = stage.partition("@")
    return [sys.executable, "-m", f"stages.{name}", *([key] if key else [])]


def measure(root: Path, stage: str, logdir: Path) -> dict[str, Any]:
    log_path = logdir / f"{stage}.jsonl"
    log_path.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "bench.measure",
        "--log",
        str(log_path),
        "--label",
        stage,
        "--",
        *stage_argv(stage),
    ]
    env = {**os.environ, "PYTHONPATH": str(root), "TIDEPOOL_PROGRESS": "0", "TIDEPOOL_CACHE": "0"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"stage": stage, "error": (proc.stderr or proc.stdout)[-2000:]}
    record = json.loads(log_path.read_text(encoding="utf-8").splitlines()[-1])
    return {
        "stage": stage,
        "cpu_s": record["cpu_s"],
        "wall_s": record["wall_s"],
        "max_rss_bytes": record["max_rss_bytes"],
    }


def run_size(
    points: int, workdir: Path, jobs: int, pack_layout: str, keep: bool, only: list[str] | None = None
) -> dict[str, Any]:
    where = workdir / f"p{points}"
    marker = where / "corpus.json"
    if keep and marker.exists():
        # --keep: a corpus an earlier run kept is reused (its stage outputs are overwritten).
        root = where / "project"
        added = json.loads(marker.read_text(encoding="utf-8"))
        log(f"{points} points: reusing the corpus in {where}")
    else:
        if where.exists():
            shutil.rmtree(where)
        where.mkdir(parents=True)
        started = time.monotonic()
        root = build_base(where)
        added = add_points(root, points, jobs)
        marker.write_text(json.dumps(added), encoding="utf-8")
        log(f"{points} points: corpus ready in {time.monotonic() - started:.0f}s ({added})")
    set_params(root, jobs, pack_layout)
    stages = list(STAGES_BEFORE_PACK) + ([] if pack_layout == "skip" else ["pack@reef-points"])
    if only:
        stages = [s for s in stages if s in only]
    results = []
    for stage in stages:
        record = measure(root, stage, where / "logs")
        results.append(record)
        log(
            f"  {stage}: "
            + (
                record["error"].splitlines()[-1]
                if "error" in record
                else f"{record['cpu_s']:.1f} CPU s, peak RSS {record['max_rss_bytes'] / 2**20:.0f} MiB"
            )
        )
    metrics = {}
    for source in ("mermaid", "coralnet"):
        path = root / "metrics/ingest" / f"{source}.json"
        if path.exists():
            m = json.loads(path.read_text(encoding="utf-8"))
            metrics[source] = {
                "samples": m.get("samples"),
                "points": m.get("points"),
                "quarantined": m.get("quarantined"),
            }
    out = {
        "points_requested": points,
        "added": added,
        "ingested": metrics,
        "stages": results,
        "pack_layout": pack_layout,
        "jobs": jobs,
    }
    if not keep:
        shutil.rmtree(where)
    return out


def table(runs: list[dict[str, Any]]) -> str:
    stages = [r["stage"] for r in runs[0]["stages"]]
    header = ["stage"] + [f"{r['points_requested']:,} pts: CPU s / RSS MiB" for r in runs]
    if len(runs) > 1:
        header += [f"RSS x {runs[0]['points_requested']:,} -> {r['points_requested']:,}" for r in runs[1:]]
    rows = [header]
    for i, stage in enumerate(stages):
        cells = [stage]
        for r in runs:
            s = r["stages"][i]
            cells.append("error" if "error" in s else f"{s['cpu_s']:.1f} / {s['max_rss_bytes'] / 2**20:.0f}")
        first = runs[0]["stages"][i]
        for r in runs[1:]:
            s = r["stages"][i]
            ok = "error" not in s and "error" not in first
            cells.append(f"{s['max_rss_bytes'] / first['max_rss_bytes']:.2f}" if ok else "-")
        rows.append(cells)
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(widths[c]) for c, cell in enumerate(row)) for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.points_heavy", description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, action="append", help="points per build (repeatable)")
    parser.add_argument("--workdir", type=Path, default=Path("build/bench-points"))
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/points.json")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--pack-layout", choices=("images", "patches", "skip"), default="images")
    parser.add_argument("--keep", action="store_true", help="keep the scratch corpora (and reuse kept ones)")
    parser.add_argument("--stage", action="append", help="run only these stages (repeatable)")
    args = parser.parse_args(argv)
    sizes = sorted(set(args.points or [100_000, 1_000_000]))
    runs = [
        run_size(n, args.workdir.resolve(), args.jobs, args.pack_layout, args.keep, args.stage) for n in sizes
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": runs}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(
        "points-heavy bench (each stage its own process under bench.measure; CPU of all its processes, "
        "peak RSS of the largest)"
    )
    print(table(runs))
    print(f"figures: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
