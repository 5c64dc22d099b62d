"""Peak RSS and CPU of pack@reef-points as the points grow: 100k, 1M, 5M points.

    python -m bench.pack_memory [--points 100000 1000000 5000000] [--stage-points 100000 1000000]
                                [--workdir DIR] [--out bench/results/pack-memory.json]

For each size it writes synthetic interim tables of the shape ingest writes (half the points on
MERMAID-like images with 25 points each, half on CoralNet-like images with 200; uuid-long point ids,
labels from a 48-attribute taxonomy, point-cover `labels` per image), a dedup table without
clusters and split assignments (80/10/10 by a hash), and one tiny distinct PNG per image, then
measures (`python -m bench.measure`, the process and all its children):

- **planning** (`layout: patches`, the default): the stage's main-process work without pixels:
  `reef_points.plan` (tables read,
  points sorted and spanned in Arrow) and `make_unit` for every image in shard order (the JSON of
  every point built, keyed and dropped), which is what the main process does while the workers
  encode;
- **the whole stage** (`python -m stages.pack reef-points`, `layout: images`, the work cache off) at
  `--stage-points`: plan, units, workers (file read + sha256 + header check), tar writer, manifest,
  class counts, card. The `images` layout keeps pixels out of it: the patch encoder's cost per
  point is measured at real resolution by bench/realres.py.

Prints peak RSS and CPU per size and the growth 100k -> 1M (target: <= 1 GiB at 1M, <= 1.5 GiB at
5M, growth <= 1.5x).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import yaml
from PIL import Image

from stages.fsutil import repo_root, write_json, write_parquet

REPO = repo_root()
MiB = 1 << 20


def log(msg: str) -> None:
    print(f"[pack_memory] {msg}", file=sys.stderr, flush=True)


def synth_root(root: Path, n_points: int) -> dict[str, int]:
    """Interim tables, dedup, split, taxonomy and tiny images for `n_points` points under `root`."""
    from bench.realres import taxonomy
    from stages.dedup import CLUSTERS
    from stages.ingest.common import point_cover_labels
    from stages.schema import POINTS, SAMPLES

    leaves = taxonomy(root / "data" / "taxonomy")
    rng = np.random.default_rng(11)
    counts: dict[str, int] = {}
    assignments: list[tuple[str, str]] = []
    for source, per_image in (("mermaid", 25), ("coralnet", 200)):
        n_images = max(1, (n_points // 2) // per_image)
        raw = root / "data" / "raw" / source
        raw.mkdir(parents=True, exist_ok=True)
        samples: list[dict[str, Any]] = []
        writer = None
        out = root / "data" / "interim" / source
        out.mkdir(parents=True, exist_ok=True)
        tmp_points = out / "points.parquet"
        import pyarrow.parquet as pq

        writer = pq.ParquetWriter(tmp_points, POINTS, compression="zstd")
        batch: list[dict[str, Any]] = []
        for i in range(n_images):
            sid = f"{source}-{hashlib.sha1(f'{source}{i}'.encode()).hexdigest()[:24]}"
            pixels = np.full((8, 8, 3), i % 251, np.uint8)
            pixels[0, 0] = [(i >> 8) % 256, i % 256, 7]
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "PNG")
            data = buf.getvalue()
            path = raw / f"{sid}.png"
            path.write_bytes(data)
            attr = rng.integers(0, len(leaves), per_image)
            pts = []
            for k in range(per_image):
                leaf = leaves[int(attr[k])]
                pts.append({
                    "point_id": f"{hashlib.md5(f'{sid}{k}'.encode()).hexdigest()[:8]}-{sid[-12:]}-{k:04d}",
                    "sample_id": sid, "source": source,
                    "row": int(rng.integers(0, 8)), "col": int(rng.integers(0, 8)),
                    "source_label_id": leaf["id"], "source_label": leaf["name"][:8],
                    "benthic_attribute_id": leaf["id"], "benthic_attribute_name": leaf["name"],
                    "growth_form_id": None, "growth_form_name": None,
                    "top_level_category": leaf["top_level_category"],
                })  # fmt: skip
            batch.extend(pts)
            if len(batch) >= 200_000:
                writer.write_table(pa.Table.from_pylist(batch, schema=POINTS))
                batch = []
            row: dict[str, Any] = {name: None for name in SAMPLES.names}
            row.update(
                sample_id=sid, source=source, upstream_id=sid, image_path=str(path.relative_to(root)),
                image_format="png", width=8, height=8, file_size=len(data),
                file_sha256=hashlib.sha256(data).hexdigest(), phash=0, license="CC BY 4.0",
                attribution=f"bench {source}", labels=json.dumps(point_cover_labels(pts), sort_keys=True),
                native_labels="{}", n_points=per_image,
            )  # fmt: skip
            samples.append(row)
            split = ("train",) * 8 + ("val", "test")
            assignments.append((sid, split[int(hashlib.sha1(sid.encode()).hexdigest(), 16) % 10]))
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=POINTS))
        writer.close()
        write_parquet(out / "samples.parquet", pa.Table.from_pylist(samples, schema=SAMPLES))
        counts[f"{source}_images"] = n_images
        counts[f"{source}_points"] = n_images * per_image
    write_parquet(root / "data" / "dedup" / "clusters.parquet", CLUSTERS.empty_table())
    write_parquet(
        root / "data" / "split" / "assignments.parquet",
        pa.table({"sample_id": [a for a, _ in assignments], "split": [b for _, b in assignments]}),
    )
    (root / "dvc.yaml").write_text("stages: {}\n")
    return counts


def params_file(root: Path, layout: str) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["jobs"] = 2
    spec = params["products"]["reef-points"]
    spec.pop("ledger", None)
    spec.pop("shard", None)
    spec["layout"] = layout
    path = root / f"params-{layout}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def plan_only(root: Path, params_path: Path) -> None:
    """The main process's share of pack@reef-points: plan, then every unit built in shard order."""
    from stages.config import load_params
    from stages.pack import SPLITS, PackContext, load_generations, product_settings, shard_order
    from stages.pack import reef_points as rp

    params = load_params(params_path)
    product, settings = product_settings(params, "reef-points")
    plan = rp.plan(PackContext(params, product, settings, root))
    order = {s: shard_order(plan.keys.get(s, []), load_generations(None)) for s in SPLITS}
    samples = 0
    for split in SPLITS:
        for key in order[split]:
            samples += len(plan.make_unit(key, split).rows)
    print(json.dumps({"units": sum(len(v) for v in order.values()), "samples": samples}))


def measured(root: Path, label: str, argv: list[str], log_path: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TIDEPOOL_PROGRESS": "0", "TIDEPOOL_CACHE": "0"}
    env.pop("TIDEPOOL_ENDPOINTS", None)
    cmd = [sys.executable, "-m", "bench.measure", "--label", label, "--log", str(log_path), "--", *argv]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
    record = json.loads(log_path.read_text().splitlines()[-1])
    return {"cpu_s": round(record["cpu_s"], 2), "wall_s": round(record["wall_s"], 2),
            "max_rss_mib": round(record["max_rss_bytes"] / MiB, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pack_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, nargs="*", default=[100_000, 1_000_000, 5_000_000])
    parser.add_argument("--stage-points", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pack-memory.json")
    parser.add_argument("--plan-only", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--params", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plan_only:
        plan_only(args.plan_only, args.params)
        return 0
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tidepool-pack-memory-"))
    results: list[dict[str, Any]] = []
    try:
        for n in sorted(set(args.points) | set(args.stage_points)):
            root = work / f"p{n}"
            log(f"tables for {n} points")
            counts = synth_root(root, n)
            entry: dict[str, Any] = {"points": n, **counts}
            params_path = params_file(root, "images")
            if n in args.points:
                log(f"planning at {n} points")
                entry["planning"] = measured(
                    root, f"plan-{n}",
                    [sys.executable, "-m", "bench.pack_memory", "--plan-only", str(root),
                     "--params", str(params_file(root, "patches"))],
                    work / "measure.jsonl",
                )  # fmt: skip
            if n in args.stage_points:
                log(f"whole stage at {n} points")
                entry["stage"] = measured(
                    root, f"stage-{n}",
                    [sys.executable, "-m", "stages.pack", "reef-points", "--params", str(params_path),
                     "--out", str(root / "out"), "--metrics", str(root / "m.json"),
                     "--plots", str(root / "plots")],
                    work / "measure.jsonl",
                )  # fmt: skip
            results.append(entry)
            shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    by_n = {r["points"]: r for r in results}
    growth = {}
    for kind in ("planning", "stage"):
        if 100_000 in by_n and 1_000_000 in by_n and kind in by_n[100_000] and kind in by_n[1_000_000]:
            growth[kind] = round(by_n[1_000_000][kind]["max_rss_mib"] / by_n[100_000][kind]["max_rss_mib"], 2)
    write_json(args.out, {"sizes": results, "rss_growth_100k_to_1m": growth})
    print("points     images   what      CPU s    wall s   peak RSS MiB")
    for r in results:
        for kind in ("planning", "stage"):
            if kind in r:
                m = r[kind]
                images = r["mermaid_images"] + r["coralnet_images"]
                cpu, wall, rss = m["cpu_s"], m["wall_s"], m["max_rss_mib"]
                print(f"{r['points']:<10} {images:<8} {kind:<9} {cpu:<8} {wall:<8} {rss}")
    print(f"peak RSS growth 100k -> 1M points: {growth} (target <= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
