"""ingest@coralnet at real numbers of points: peak RSS and time, one export per run.

    python -m bench.bench_coralnet_ingest [--points 100000 1000000] [--per-image 200] [--jobs 2]

For each size: a CoralNet export (`Name, Date, Site, Comments, Row, Column, Label code, Label ID,
Annotator, Date annotated, Machine suggestion 1, Machine confidence 1`, sorted by Name as CoralNet
writes it) with `points / per-image` images of 96x128 pixels (small in pixels, real in points:
CoralNet images carry about 200 points), a labelset and the sample taxonomy, in a scratch project;
then `python -m stages.ingest coralnet` in a measured subprocess (bench.measure: summed CPU, the
largest peak RSS of any process, i.e. the main process here). Prints one line per size and the
RSS growth between the smallest and the largest, and writes them to `--out`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from bench.measure import run_measured
from stages.fsutil import write_json
from stages.samplegen import reef

REPO = Path(__file__).resolve().parents[1]
HEADER = (
    "Name,Date,Site,Comments,Row,Column,Label code,Label ID,Annotator,Date annotated,"
    "Machine suggestion 1,Machine confidence 1\r\n"
)
HEIGHT, WIDTH = 96, 128


def _taxonomy(out: Path) -> None:
    tax = reef.taxonomy()
    write_json(out / "benthicattributes.json", sorted(tax.attributes, key=lambda r: r["id"]))
    forms = next(c["data"] for c in reef.choices() if c["name"] == "growthforms")
    write_json(out / "growthforms.json", sorted(forms, key=lambda r: r["id"]))
    write_json(out / "labelmappings.json", reef.label_mappings())


def build(root: Path, n_points: int, per_image: int) -> int:
    """A scratch project with one export of `n_points` rows; returns the number of images."""
    (root / "dvc.yaml").write_text("stages: {}\n")
    _taxonomy(root / "data" / "taxonomy")
    folder = root / "data" / "raw" / "coralnet" / "s1"
    (folder / "images").mkdir(parents=True)
    labels = [lab for lab in reef.CORALNET_LABELS if lab.flavour in ("shared", "caribbean")]
    (folder / "labelset.csv").write_text(
        "Label ID,Name,Short Code\r\n"
        + "".join(f"{lab.label_id},{lab.name},{lab.code}\r\n" for lab in labels)
    )
    n_images = -(-n_points // per_image)
    rng = np.random.default_rng(0)
    cells = HEIGHT * WIDTH
    with open(folder / "annotations.csv", "w", encoding="utf-8", newline="") as fh:
        fh.write(HEADER)
        left = n_points
        for i in range(n_images):
            name = f"IMG_{i:07d}.JPG"
            k = min(per_image, left)
            left -= k
            pixels = rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "JPEG", quality=80)
            (folder / "images" / name).write_bytes(buf.getvalue())
            where = rng.choice(cells, size=k, replace=False)
            picks = rng.integers(0, len(labels), size=k)
            site = f"Site {i % 37}"
            comment = '"Quadrat shifted, re-shot\nfrom the same stake"' if i % 13 == 0 else ""
            rows = []
            for pos, lab_ix in zip(where.tolist(), picks.tolist()):
                lab = labels[lab_ix]
                rows.append(
                    f"{name},2021-03-04,{site},{comment},{pos // WIDTH},{pos % WIDTH},{lab.code},"
                    f"{lab.label_id},annotator,2021-05-06 07:08:09+00:00,{lab.code},87\r\n"
                )
            fh.write("".join(rows))
    return n_images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_coralnet_ingest", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--points", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--per-image", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "coralnet-ingest.json")
    args = parser.parse_args(argv)
    results = []
    for n in args.points:
        with tempfile.TemporaryDirectory(prefix="bench-coralnet-") as tmp:
            root = Path(tmp)
            n_images = build(root, n, args.per_image)
            params = root / "params.yaml"
            doc = yaml.safe_load((REPO / "params.yaml").read_text())
            doc["jobs"] = args.jobs
            doc["sources"]["coralnet"]["exports"] = [{"id": 1, "location": "local"}]
            params.write_text(yaml.safe_dump(doc))
            env_cwd = os.getcwd()
            os.chdir(root)
            os.environ["TIDEPOOL_PROGRESS"] = "0"
            os.environ["TIDEPOOL_CACHE"] = "0"
            os.environ["PYTHONPATH"] = str(REPO)
            try:
                measured = run_measured(
                    [sys.executable, "-m", "stages.ingest", "coralnet", "--params", str(params)],
                    label=f"ingest coralnet {n} points",
                )
            finally:
                os.chdir(env_cwd)
            metrics = json.loads((root / "metrics" / "ingest" / "coralnet.json").read_text())
            csv_bytes = (root / "data/raw/coralnet/s1/annotations.csv").stat().st_size
        row = {
            "points": n,
            "images": n_images,
            "csv_mib": round(csv_bytes / 2**20, 1),
            "kept_points": metrics["points"],
            "wall_s": measured["wall_s"],
            "cpu_s": measured["cpu_s"],
            "max_rss_mib": round(measured["max_rss_bytes"] / 2**20, 1),
            "returncode": measured["returncode"],
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    if len(results) > 1:
        growth = results[-1]["max_rss_mib"] / results[0]["max_rss_mib"]
        print(f"peak RSS {results[0]['points']} -> {results[-1]['points']} points: x{growth:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"per_image": args.per_image, "jobs": args.jobs, "runs": results}, indent=2) + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
