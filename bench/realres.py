"""`make bench REALRES=1`: pack at real resolution, against a fixed reference floor.

    python -m bench.realres [--jpeg-images 16] [--png-images 16] [--jobs 2] [--workdir DIR] [--keep]
                            [--photos DIR ...] [--out bench/results/realres.json]

What it measures, in a scratch folder:

1. **Codecs on real photos.** Patches (224 px, pyspacer windows at seeded points, borders
   included) of the real photos vendored in tests/reference/ (plus `--photos` folders), encoded
   with every candidate setting: process CPU ms per patch, KiB per patch, lossless or not.
2. **A real-size corpus.** 12 MP images (4000x3000) textured like photos: tiles of the real
   CoralNet camera JPEG in tests/reference/coralnet-toolbox (mirrored 2x2, each image its own
   offset and flip), saved as camera-like JPEG q92 with 200 points each (CoralNet-like) and as PNG
   with 25 points each (MERMAID-like), plus interim tables of the shape ingest writes (samples,
   points with real point-cover labels), a one-cluster-free dedup table, split assignments and a
   small taxonomy snapshot. No network, no DVC: pack reads a project-shaped folder.
3. **pack@reef-points** (real stage CLI, `python -m bench.measure --`: CPU of the stage and all
   its workers) per codec and per layout, the work cache off (`TIDEPOOL_CACHE=0`), once with
   every image and once per source (so per-image and per-patch slopes separate).
4. **pack@reef-images** at max_side 1024 (JPEG q90), once per source.
5. **Reference floor** (fixed, today's encoder): one process, each image fully decoded (PIL),
   reflect-padded whole, every patch cut and encoded as PNG level 6; reef-images as today's path
   (full decode, LANCZOS with reducing_gap=None, JPEG q90). Ratios below 1 are gains. The
   ingest probe (`stages.imaging.probe_image_file`, one per image) is timed too, so
   "pipeline CPU" = probe + pack, the per-image work the real build does for these products.
6. **Cached rebuild**: pack@reef-points again with the work cache after adding one image of each
   kind: CPU against the clean build.
7. **Projection** to the real sources (50k MERMAID PNG + 100k CoralNet JPEG images, 3.25M
   points; 14.5k Seatizen frames in reef-images) from the measured slopes, on 16 cores.

Writes `--out` (JSON) and prints a table where each figure names what measured it. Timings are
CPU seconds on a shared machine (wall-clock varies with the other jobs; CPU much less).
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
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import yaml
from PIL import Image

from stages.dedup import CLUSTERS
from stages.fsutil import repo_root, write_json, write_parquet
from stages.ingest.common import point_cover_labels
from stages.pack.codec import ImageSettings, cut_patch, encode_rgb, rgb_array
from stages.schema import POINTS, SAMPLES
from stages.taxonomy_index import TOP_LEVEL_CATEGORIES

REPO = repo_root()
REFERENCE = REPO / "tests" / "reference"
TEXTURE = REFERENCE / "coralnet-toolbox" / "D3" / "T_S04856.jpg"
PHOTO_GROUPS = {
    "coralnet camera JPEG 2159x1619": [TEXTURE],
    "seatizen 12 MP still JPEG": sorted((REFERENCE / "seatizen" / "dinovdeau" / "fs_ml_images").glob("*")),
    "seatizen UAV tile PNG 164x164": sorted(
        (REFERENCE / "seatizen" / "dinovdeau" / "drone_images").glob("*")
    ),
    "doodler Sentinel-2 JPEG 306x172": sorted((REFERENCE / "doodler").glob("*.jpg")),
}
SIZE = (4000, 3000)
EMPTY = "benchempty"  # a source with no sample: a stage run on it measures start-up alone
PATCH = 224
MAX_PIXELS = 178956970
# Candidate settings: (label, image_format, params for products.reef-points)
CODECS = [
    ("png level 6 (before)", {"image_format": "png", "png_compress_level": 6}),
    ("png level 1", {"image_format": "png", "png_compress_level": 1}),
    ("webp lossless m0 q0 (default)", {"image_format": "webp", "webp_method": 0, "webp_quality": 0}),
    ("webp lossless m0 q50", {"image_format": "webp", "webp_method": 0, "webp_quality": 50}),
    ("webp lossless m1 q0", {"image_format": "webp", "webp_method": 1, "webp_quality": 0}),
    ("webp lossless m4 q0", {"image_format": "webp", "webp_method": 4, "webp_quality": 0}),
    ("jpg q90 (lossy)", {"image_format": "jpg", "jpeg_quality": 90}),
]
# What real sources hold (issue 14): images and points per source.
REAL = {"mermaid_images": 50_000, "mermaid_points": 1_250_000, "coralnet_images": 100_000,
        "coralnet_points": 2_000_000, "seatizen_images": 14_492, "cores": 16}  # fmt: skip


def log(msg: str) -> None:
    print(f"[realres] {msg}", file=sys.stderr, flush=True)


# --- 1. codecs on real photos --------------------------------------------------------------------


def photo_patches(paths: list[Path], per_photo: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for path in paths:
        rgb = rgb_array(Image.open(path))
        h, w = rgb.shape[:2]
        for _ in range(per_photo):
            out.append(
                np.ascontiguousarray(cut_patch(rgb, int(rng.integers(0, h)), int(rng.integers(0, w)), PATCH))
            )
    return out


def codec_settings(spec: dict[str, Any]) -> ImageSettings:
    return ImageSettings(
        spec["image_format"], spec.get("jpeg_quality", 90), spec.get("png_compress_level", 6), None,
        MAX_PIXELS, spec.get("webp_method", 0), spec.get("webp_quality", 0),
    )  # fmt: skip


def codec_table(groups: dict[str, list[Path]]) -> list[dict[str, Any]]:
    rows = []
    for group, paths in groups.items():
        if not paths:
            continue
        patches = photo_patches(paths, max(4, 120 // len(paths)))
        for label, spec in CODECS:
            s = codec_settings(spec)
            started = time.process_time()
            encoded = [encode_rgb(p, s) for p in patches]
            cpu = time.process_time() - started
            lossless = all(
                np.array_equal(np.asarray(Image.open(io.BytesIO(e)).convert("RGB")), p)
                for e, p in zip(encoded, patches)
            )
            rows.append({
                "photos": group, "files": len(paths), "patches": len(patches), "setting": label,
                "ms_per_patch": round(cpu / len(patches) * 1000, 2),
                "kib_per_patch": round(sum(map(len, encoded)) / len(encoded) / 1024, 1),
                "lossless": lossless,
            })  # fmt: skip
    return rows


# --- 2. a real-size corpus -----------------------------------------------------------------------


def texture_tile() -> np.ndarray:
    """The real photo mirrored 2x2: 4318x3238, continuous across the seams."""
    src = rgb_array(Image.open(TEXTURE))
    top = np.concatenate([src, src[:, ::-1]], axis=1)
    return np.ascontiguousarray(np.concatenate([top, top[::-1]], axis=0))


def real_size_image(tile: np.ndarray, i: int) -> np.ndarray:
    w, h = SIZE
    dy, dx = (i * 37) % (tile.shape[0] - h + 1), (i * 53) % (tile.shape[1] - w + 1)
    img = tile[dy : dy + h, dx : dx + w]
    if i % 2:
        img = img[:, ::-1]
    if (i // 2) % 2:
        img = img[::-1]
    return np.ascontiguousarray(img)


def taxonomy(dest: Path) -> list[dict[str, Any]]:
    """A small snapshot: the 12 top-level categories and three attributes under each."""
    attrs = [
        {"id": f"top-{i:02d}", "name": name, "parent": None} for i, name in enumerate(TOP_LEVEL_CATEGORIES)
    ]
    leaves = []
    for i, name in enumerate(TOP_LEVEL_CATEGORIES):
        for k in range(3):
            leaves.append({"id": f"attr-{i:02d}-{k}", "name": f"{name} {k}", "parent": f"top-{i:02d}",
                           "top_level_category": name})  # fmt: skip
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "benthicattributes.json").write_text(
        json.dumps(attrs + [{k: v for k, v in a.items() if k != "top_level_category"} for a in leaves])
    )
    (dest / "growthforms.json").write_text(
        json.dumps([{"id": "gf-1", "name": "Branching"}, {"id": "gf-2", "name": "Massive"}])
    )
    (dest / "labelmappings.json").write_text("[]")
    return leaves


def sample_row(
    source: str, sid: str, rel: str, fmt: str, data: bytes, labels: dict[str, Any], n: int
) -> dict[str, Any]:
    row: dict[str, Any] = {name: None for name in SAMPLES.names}
    row.update(
        sample_id=sid, source=source, upstream_id=sid, image_path=rel, image_format=fmt, width=SIZE[0],
        height=SIZE[1], file_size=len(data), file_sha256=hashlib.sha256(data).hexdigest(), phash=0,
        license="CC BY-NC-SA 4.0" if source == "mermaid" else "CC BY 4.0", attribution=f"bench {source}",
        labels=json.dumps(labels, sort_keys=True), native_labels="{}", n_points=n,
    )  # fmt: skip
    return row


def build_corpus(root: Path, jpeg_images: int, png_images: int, start: int = 0) -> dict[str, Any]:
    """Images, interim tables, dedup, split and taxonomy under `root` (images [start, start + n))."""
    leaves = taxonomy(root / "data" / "taxonomy")
    tile = texture_tile()
    tables: dict[str, dict[str, list[dict[str, Any]]]] = {
        "mermaid": {"s": [], "p": []},
        "coralnet": {"s": [], "p": []},
    }
    counts = {"coralnet": jpeg_images, "mermaid": png_images}
    for source, n_images in counts.items():
        per_image = 200 if source == "coralnet" else 25
        fmt = "jpeg" if source == "coralnet" else "png"
        raw = root / "data" / "raw" / source
        raw.mkdir(parents=True, exist_ok=True)
        for i in range(n_images):
            idx = start + i
            sid = f"{source}-bench-{idx:05d}"
            path = raw / f"{sid}.{'jpg' if fmt == 'jpeg' else 'png'}"
            if not path.exists():
                pixels = real_size_image(tile, idx + (1000 if source == "mermaid" else 0))
                buf = io.BytesIO()
                if fmt == "jpeg":
                    Image.fromarray(pixels).save(buf, "JPEG", quality=92)  # a camera's setting
                else:
                    Image.fromarray(pixels).save(buf, "PNG")  # Pillow's default level 6, as a PNG export
                path.write_bytes(buf.getvalue())
            data = path.read_bytes()
            prng = np.random.default_rng(idx * 7 + (1 if source == "mermaid" else 0))
            rows = prng.integers(0, SIZE[1], per_image)
            cols = prng.integers(0, SIZE[0], per_image)
            rows[:4], cols[:4] = (
                [0, SIZE[1] - 1, 5, SIZE[1] // 2],
                [0, SIZE[0] - 1, SIZE[0] // 2, 3],
            )  # borders
            points = []
            for k, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
                leaf = leaves[int(prng.integers(0, len(leaves)))]
                points.append({
                    "point_id": f"{sid}-p{k:03d}", "sample_id": sid, "source": source, "row": r, "col": c,
                    "source_label_id": leaf["id"], "source_label": leaf["name"][:8],
                    "benthic_attribute_id": leaf["id"], "benthic_attribute_name": leaf["name"],
                    "growth_form_id": None, "growth_form_name": None,
                    "top_level_category": leaf["top_level_category"],
                })  # fmt: skip
            rel = str(path.relative_to(root))
            tables[source]["s"].append(
                sample_row(source, sid, rel, fmt, data, point_cover_labels(points), len(points))
            )
            tables[source]["p"].extend(points)
    for source, t in tables.items():
        out = root / "data" / "interim" / source
        write_parquet(out / "samples.parquet", pa.Table.from_pylist(t["s"], schema=SAMPLES))
        write_parquet(out / "points.parquet", pa.Table.from_pylist(t["p"], schema=POINTS))
    empty = root / "data" / "interim" / EMPTY
    write_parquet(empty / "samples.parquet", SAMPLES.empty_table())
    write_parquet(empty / "points.parquet", POINTS.empty_table())
    sids = [r["sample_id"] for t in tables.values() for r in t["s"]]
    write_parquet(root / "data" / "dedup" / "clusters.parquet", CLUSTERS.empty_table())  # no duplicates
    write_parquet(root / "data" / "split" / "assignments.parquet",
                  pa.table({"sample_id": sids, "split": ["train"] * len(sids)}))  # fmt: skip
    (root / "dvc.yaml").write_text("stages: {}\n")
    images = {s: [str(root / r["image_path"]) for r in t["s"]] for s, t in tables.items()}
    return {"images": images, "points": {s: len(t["p"]) for s, t in tables.items()},
            "bytes": {s: sum(r["file_size"] for r in t["s"]) for s, t in tables.items()}}  # fmt: skip


# --- 3./4. the real stage --------------------------------------------------------------------------


def bench_params(jobs: int, product: str, sources: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["jobs"] = jobs
    params["sources"][EMPTY] = dict(params["sources"]["mermaid"])
    spec = dict(params["products"][product])
    spec.pop("ledger", None)
    spec.pop("shard", None)  # production shard sizes: 64 / 256 / 512 MiB
    spec.update(sources=sources, dedup="all", **extra)
    params["products"] = {product: spec}
    return params


def run_pack(
    root: Path, work: Path, label: str, product: str, params: dict[str, Any], cache: bool
) -> dict[str, Any]:
    params_path = work / f"params-{label}.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    out = work / "out" / label
    if out.exists() and not cache:
        shutil.rmtree(out)
    logfile = work / "measure.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TIDEPOOL_PROGRESS": "0",
           "TIDEPOOL_CACHE": "1" if cache else "0", "TIDEPOOL_CACHE_DIR": str(work / "cache")}  # fmt: skip
    env.pop("TIDEPOOL_ENDPOINTS", None)
    metrics_path = work / "metrics" / f"{label}.json"
    cmd = [sys.executable, "-m", "bench.measure", "--label", label, "--log", str(logfile), "--",
           sys.executable, "-m", "stages.pack", product, "--params", str(params_path), "--out", str(out),
           "--metrics", str(metrics_path), "--plots", str(work / "plots" / label)]  # fmt: skip
    log(f"pack {product} [{label}]")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"pack {label} failed:\n{proc.stderr[-3000:]}")
    record = [json.loads(line) for line in logfile.read_text().splitlines()][-1]
    metrics = json.loads((work / "metrics" / f"{label}.json").read_text())
    stats_path = work / "cache" / "stats" / f"pack@{product}.json"
    stats = json.loads(stats_path.read_text()) if cache and stats_path.exists() else None
    return {"label": label, "cpu_s": round(record["cpu_s"], 3), "wall_s": round(record["wall_s"], 3),
            "max_rss_mib": round(record["max_rss_bytes"] / 2**20, 1), "samples": metrics["samples"],
            "bytes": metrics["bytes"], "points": metrics.get("points"), "images": metrics.get("images"),
            "units": metrics["units"], "stats": stats}  # fmt: skip


# --- 5. the reference floor ------------------------------------------------------------------------


def reference_floor(root: Path, corpus: dict[str, Any]) -> dict[str, Any]:
    """Today's encoder in one process: full decode, whole-image reflect pad, PNG level 6 patches;
    reef-images: full decode, LANCZOS with reducing_gap=None, JPEG q90. Plus the ingest probe."""
    import pyarrow.parquet as pq

    from stages.imaging import probe_image_file

    png6 = ImageSettings("png", 90, 6, None, MAX_PIXELS)
    jpg90 = ImageSettings("jpg", 90, 6, None, MAX_PIXELS)
    phases: dict[str, float] = {}
    counts: dict[str, int] = {}

    def add(name: str, started: float, n: int = 1) -> float:
        now = time.process_time()
        phases[name] = phases.get(name, 0.0) + now - started
        counts[name] = counts.get(name, 0) + n
        return now

    for source in ("coralnet", "mermaid"):
        points = pq.read_table(
            root / "data" / "interim" / source / "points.parquet", columns=["sample_id", "row", "col"]
        )
        by_image: dict[str, list[tuple[int, int]]] = {}
        for sid, r, c in zip(*(points.column(n).to_pylist() for n in ("sample_id", "row", "col"))):
            by_image.setdefault(sid, []).append((r, c))
        samples = pq.read_table(
            root / "data" / "interim" / source / "samples.parquet", columns=["sample_id", "image_path"]
        )
        for sid, rel in zip(
            samples.column("sample_id").to_pylist(), samples.column("image_path").to_pylist()
        ):
            path = root / rel
            now = time.process_time()
            probe_image_file(path, MAX_PIXELS)
            now = add(f"{source}.ingest_probe", now)
            rgb = np.asarray(Image.open(path).convert("RGB"))
            now = add(f"{source}.decode_full", now)
            padded = np.pad(rgb, ((PATCH, PATCH), (PATCH, PATCH), (0, 0)), mode="reflect")
            now = add(f"{source}.pad_whole", now)
            for r, c in by_image[sid]:
                top, left = int(r + PATCH - PATCH / 2), int(c + PATCH - PATCH / 2)
                encode_rgb(padded[top : top + PATCH, left : left + PATCH], png6)
            now = add(f"{source}.patch_png6", now, len(by_image[sid]))
            del padded
            now = time.process_time()
            small = Image.fromarray(rgb).resize((1024, 768), Image.Resampling.LANCZOS, reducing_gap=None)
            encode_rgb(np.asarray(small), jpg90)
            add(f"{source}.reef_images_old", now)
    return {
        "phases": {
            k: {"cpu_s": round(v, 3), "count": counts[k], "ms_each": round(v / counts[k] * 1000, 2)}
            for k, v in sorted(phases.items())
        }
    }


# --- report ------------------------------------------------------------------------------------------


def fmt_table(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.realres", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--jpeg-images", type=int, default=16, help="CoralNet-like 12 MP JPEGs, 200 points each"
    )
    parser.add_argument("--png-images", type=int, default=16, help="MERMAID-like 12 MP PNGs, 25 points each")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--photos", type=Path, nargs="*", default=[], help="more folders of real photos")
    parser.add_argument("--skip-codecs", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "realres.json")
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tidepool-realres-"))
    root = work / "project"
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "load": list(os.getloadavg())}}
    try:
        if not args.skip_codecs:
            groups = dict(PHOTO_GROUPS)
            for folder in args.photos:
                files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
                groups[f"{folder.name} ({len(files)} files)"] = files
            log("codec comparison on real photos")
            results["codecs"] = codec_table(groups)
        log(f"corpus: {args.jpeg_images} JPEG + {args.png_images} PNG images at {SIZE[0]}x{SIZE[1]}")
        corpus = build_corpus(root, args.jpeg_images, args.png_images)
        results["corpus"] = {"images": {s: len(v) for s, v in corpus["images"].items()},
                             "points": corpus["points"], "bytes": corpus["bytes"]}  # fmt: skip
        runs: dict[str, Any] = {}
        both = ["mermaid", "coralnet"]
        default = dict(CODECS[2][1])

        def pack(
            key: str, product: str, sources: list[str], extra: dict[str, Any], jobs: int = args.jobs
        ) -> None:
            label = "".join(c if c.isalnum() else "_" for c in key)
            params = bench_params(jobs, product, sources, extra)
            runs[key] = run_pack(root, work, label, product, params, cache=False)

        # Slopes (per image, per point) come from inline runs (jobs 1): no pool start-up in them,
        # and the no-sample runs give the stage's fixed cost to subtract.

        for label, spec in CODECS:
            if label.startswith(("png level 6", "png level 1", "webp lossless m0 q0", "jpg")):
                pack(f"patches {label}", "reef-points", both, spec)
        for source in both:
            pack(f"patches webp default, {source} only", "reef-points", [source], default, jobs=1)
        pack("reef-points start-up (no sample)", "reef-points", [EMPTY], default, jobs=1)
        pack("reef-images start-up (no sample)", "reef-images", [EMPTY], {}, jobs=1)
        for source in both:
            layout = {**default, "layout": "images"}
            pack(f"images layout, {source} only", "reef-points", [source], layout, jobs=1)
        pack("images layout", "reef-points", both, {**default, "layout": "images"})
        for source in both:
            pack(
                f"reef-images max_side 1024, {source} only",
                "reef-images",
                [source],
                {"max_side": 1024},
                jobs=1,
            )
        # 6. cached rebuild: a build with the cache, then one image of each kind more
        runs["cached: first build"] = run_pack(
            root,
            work,
            "cached",
            "reef-points",
            bench_params(args.jobs, "reef-points", both, default),
            cache=True,
        )
        build_corpus(root, args.jpeg_images + 1, args.png_images + 1)
        runs["cached: +1 JPEG +1 PNG image"] = run_pack(
            root,
            work,
            "cached",
            "reef-points",
            bench_params(args.jobs, "reef-points", both, default),
            cache=True,
        )
        pack("clean: +1 JPEG +1 PNG image", "reef-points", both, default)
        build_corpus(root, args.jpeg_images, args.png_images)  # back to the measured corpus for the floor
        results["runs"] = runs
        log("reference floor (single process, today's encoder)")
        results["floor"] = reference_floor(root, corpus)
        results["summary"] = summarize(results)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    write_json(args.out, results)
    print(report(results))
    return 0


SOURCES = ("mermaid", "coralnet")


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    """The issue-14 figures and the projection, from per-image and per-point slopes.

    A stage's CPU = start-up (measured on a source with no sample) + per-image work; per image,
    the pack decode is the floor's measured full decode and the rest is divided by the points.
    """
    runs, ph = r["runs"], r["floor"]["phases"]
    pts, n_img = r["corpus"]["points"], r["corpus"]["images"]
    startup = {p: runs[f"{p} start-up (no sample)"]["cpu_s"] for p in ("reef-points", "reef-images")}
    default = runs["patches webp lossless m0 q0 (default)"]
    total_points = sum(pts.values())
    default_inline = sum(
        runs[f"patches webp default, {s} only"]["cpu_s"] - startup["reef-points"] for s in SOURCES
    )

    def work(run: dict[str, Any], product: str = "reef-points") -> float:
        return max(0.0, run["cpu_s"] - startup[product])

    slopes: dict[str, dict[str, float]] = {}
    for s in SOURCES:
        decode = ph[f"{s}.decode_full"]["ms_each"] / 1000
        per_image = work(runs[f"patches webp default, {s} only"]) / n_img[s]
        slopes[s] = {
            "pack_per_image_s": round(per_image, 4),
            "decode_s": round(decode, 4),
            "per_point_s": round(max(0.0, per_image - decode) / (pts[s] / n_img[s]), 5),
            "probe_s": round(ph[f"{s}.ingest_probe"]["ms_each"] / 1000, 4),
            "reef_images_s": round(
                work(runs[f"reef-images max_side 1024, {s} only"], "reef-images") / n_img[s], 4
            ),
            "images_layout_per_image_s": round(work(runs[f"images layout, {s} only"]) / n_img[s], 4),
        }
    floor_points = sum(
        ph[f"{s}.{k}"]["cpu_s"] for s in SOURCES for k in ("decode_full", "pad_whole", "patch_png6")
    )
    floor_images = sum(ph[f"{s}.{k}"]["cpu_s"] for s in SOURCES for k in ("decode_full", "reef_images_old"))
    probe = sum(ph[f"{s}.ingest_probe"]["cpu_s"] for s in SOURCES)
    pack_points = default_inline  # per-image work of the inline runs, stage start-up excluded
    pack_images = sum(work(runs[f"reef-images max_side 1024, {s} only"], "reef-images") for s in SOURCES)
    per_real_image = {"mermaid": REAL["mermaid_points"] / REAL["mermaid_images"],
                      "coralnet": REAL["coralnet_points"] / REAL["coralnet_images"]}  # fmt: skip
    cpu_real: dict[str, float] = {}
    for s in SOURCES:
        sl, images = slopes[s], REAL[f"{s}_images"]
        cpu_real[f"ingest probe {s}"] = images * sl["probe_s"]
        cpu_real[f"pack reef-points {s}"] = images * (sl["decode_s"] + per_real_image[s] * sl["per_point_s"])
        cpu_real[f"pack reef-images {s}"] = images * sl["reef_images_s"]
    # Seatizen frames are JPEGs in ingest and reef-images only: CoralNet's per-image JPEG slopes.
    cpu_real["ingest probe + pack reef-images seatizen"] = REAL["seatizen_images"] * (
        slopes["coralnet"]["probe_s"] + slopes["coralnet"]["reef_images_s"]
    )
    total_cpu = sum(cpu_real.values())
    images_by_source = {s: runs[f"images layout, {s} only"]["bytes"] for s in SOURCES}
    patches_by_source = {s: runs[f"patches webp default, {s} only"]["bytes"] for s in SOURCES}
    grown_clean, grown_cached = runs["clean: +1 JPEG +1 PNG image"], runs["cached: +1 JPEG +1 PNG image"]
    return {
        "startup_cpu_s": startup,
        "reef_points_cpu_ms_per_patch": round(default_inline / total_points * 1000, 2),
        "reef_points_stage_cpu_ms_per_patch_jobs2": round(default["cpu_s"] / total_points * 1000, 2),
        "reef_points_cpu_ms_per_patch_by_source": {
            s: round(work(runs[f"patches webp default, {s} only"]) / pts[s] * 1000, 2) for s in SOURCES
        },
        "patches_kib_per_point": round(default["bytes"] / total_points / 1024, 1),
        "patches_kib_per_point_png6": round(
            runs["patches png level 6 (before)"]["bytes"] / total_points / 1024, 1
        ),
        "patches_kib_per_point_by_source": {
            s: round(patches_by_source[s] / pts[s] / 1024, 1) for s in SOURCES
        },
        "images_kib_per_point": round(runs["images layout"]["bytes"] / total_points / 1024, 1),
        "images_kib_per_point_by_source": {s: round(images_by_source[s] / pts[s] / 1024, 1) for s in SOURCES},
        "images_over_patches_bytes": round(runs["images layout"]["bytes"] / default["bytes"], 3),
        "images_over_patches_bytes_by_source": {
            s: round(images_by_source[s] / patches_by_source[s], 3) for s in SOURCES
        },
        "build_cpu_s": {"patches": round(pack_points, 2), "images": round(work(runs["images layout"]), 2)},
        "reef_images_ms_per_12mp_jpeg": round(slopes["coralnet"]["reef_images_s"] * 1000, 1),
        "reef_images_ms_per_12mp_png": round(slopes["mermaid"]["reef_images_s"] * 1000, 1),
        "reef_images_ms_per_12mp_jpeg_floor": round(
            (ph["coralnet.reef_images_old"]["cpu_s"] + ph["coralnet.decode_full"]["cpu_s"])
            / n_img["coralnet"]
            * 1000,
            1,
        ),
        "pack_cpu_over_floor": round(pack_points / floor_points, 3),
        "pack_both_products_over_floor": round(
            (pack_points + pack_images) / (floor_points + floor_images), 3
        ),
        "pipeline_cpu_over_floor": round(
            (pack_points + pack_images + probe) / (floor_points + floor_images + probe), 3
        ),
        "cached_rebuild_over_clean": round(work(grown_cached) / work(grown_clean), 3)
        if work(grown_clean)
        else None,
        "cached_rebuild_over_clean_with_startup": round(grown_cached["cpu_s"] / grown_clean["cpu_s"], 3),
        "slopes": slopes,
        "projection": {
            "cpu_h": {k: round(v / 3600, 2) for k, v in cpu_real.items()},
            "total_cpu_h": round(total_cpu / 3600, 2),
            "hours_on_16_cores": round(total_cpu / 3600 / REAL["cores"], 2),
            "assumes": REAL,
        },
    }


def report(r: dict[str, Any]) -> str:
    out = []
    if "codecs" in r:
        rows = [["photos", "setting", "ms/patch", "KiB/patch", "lossless"]]
        for c in r["codecs"]:
            rows.append([c["photos"], c["setting"], f"{c['ms_per_patch']:.2f}", f"{c['kib_per_patch']:.1f}",
                         "yes" if c["lossless"] else "no"])  # fmt: skip
        out += ["codec comparison: 224 px patches of real photos, process CPU (bench.realres codec_table)",
                fmt_table(rows), ""]  # fmt: skip
    rows = [["run", "CPU s", "wall s", "samples", "MiB", "peak RSS MiB", "work cache"]]
    for label, run in r["runs"].items():
        st = run["stats"]
        cache = "off"
        if st:
            cache = (f"{st.get('units_computed', 0)} encoded, {st.get('units_reused', 0)} reused, "
                     f"{st.get('shards_reused', 0)} shards copied")  # fmt: skip
        rows.append([label, f"{run['cpu_s']:.1f}", f"{run['wall_s']:.1f}", run["samples"],
                     f"{run['bytes'] / 2**20:.0f}", f"{run['max_rss_mib']:.0f}", cache])  # fmt: skip
    c = r["corpus"]
    out += [f"pack at {SIZE[0]}x{SIZE[1]}: {c['images']} images, {c['points']} points "
            "(python -m bench.measure -- python -m stages.pack ...)", fmt_table(rows), ""]  # fmt: skip
    s = r["summary"]
    proj = s["projection"]
    rows = [
        ["figure", "value", "target"],
        ["reef-points CPU per patch (decode share included)",
         f"{s['reef_points_cpu_ms_per_patch']} ms (by source {s['reef_points_cpu_ms_per_patch_by_source']})",
         "<= 3 ms"],
        ["reef-points bytes per point, patches (webp; png6 before)",
         f"{s['patches_kib_per_point']} KiB ({s['patches_kib_per_point_png6']} KiB)", "<= 70 KiB lossless"],
        ["reef-points bytes per point, images layout",
         f"{s['images_kib_per_point']} KiB = {s['images_over_patches_bytes']} x patches "
         f"(by source {s['images_over_patches_bytes_by_source']})", "<= 0.1 x patches"],
        ["build CPU s, patches / images layout",
         f"{s['build_cpu_s']['patches']} / {s['build_cpu_s']['images']}", ""],
        ["reef-images CPU per 12 MP JPEG at max_side 1024",
         f"{s['reef_images_ms_per_12mp_jpeg']} ms (PNG {s['reef_images_ms_per_12mp_png']} ms; "
         f"before {s['reef_images_ms_per_12mp_jpeg_floor']} ms)", "<= 90 ms"],
        ["pack CPU / reference floor: reef-points; + reef-images",
         f"{s['pack_cpu_over_floor']}; {s['pack_both_products_over_floor']}", "<= 0.4"],
        ["pipeline CPU (+ ingest probe, unchanged) / floor", f"{s['pipeline_cpu_over_floor']}", "<= 0.4"],
        ["cached rebuild after +1 JPEG +1 PNG / clean (start-up excluded; included)",
         f"{s['cached_rebuild_over_clean']}; {s['cached_rebuild_over_clean_with_startup']}", "<= 0.05"],
        ["projected real build, 16 cores",
         f"{proj['hours_on_16_cores']} h ({proj['total_cpu_h']} CPU-h)", "<= 1.5 h"],
    ]  # fmt: skip
    out += ["targets (issue 14; per-image slopes net of stage start-up)", fmt_table(rows), "",
            "projection CPU-h: " + json.dumps(proj["cpu_h"])]  # fmt: skip
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
