"""Peak RSS and CPU of the dedup and split stages on points-heavy synthetic interim tables.

    python -m bench.bench_split [--points 100000 1000000 5000000] [--label after]
                                [--code DIR] [--workdir DIR] [--keep]
                                [--out bench/results/split.json]

For each size, a scratch project gets interim tables of the shape ingest writes
(`stages/schema.py`; row groups of 128k rows as `fsutil.write_parquet` writes them), written
in record batches so the generator itself stays small:

- per "unit" of the corpus (the sample generator's base counts): 50 MERMAID images with 25 points
  each, 80 CoralNet images with 200 points each (17,250 points), 80 Seatizen frames (10 sessions
  of 8, consecutive frames near-duplicates so each session chains into one dedup cluster), 60
  Coast Train tiles (scenes of 3x2 tiles whose bounds touch, in `native_labels.geo`), 120 iNat
  images (15% official val, observers of about 6 images);
- `labels` built by the ingest code's own `point_cover_labels` (about 12 attributes per CoralNet
  image, 6 per MERMAID image, growth forms included), Seatizen multilabel JSON of 40 classes,
  Coast Train pixel counts, iNat category JSON: real JSON sizes;
- planted duplicates: every 40th MERMAID image is a near copy of a CoralNet image, 0.5% of iNat
  images are exact file copies.

The number of units is chosen so the points table holds `--points` rows. Then, each in a fresh
`python -m bench.measure` (so ru_maxrss is that command's own peak): `stages.dedup`, `stages.split`
with an empty ledger, `stages.split --update-ledger`, and `stages.split` again with the ledger
full (the steady state of a release). Prints a table and merges the figures into `--out` under
`--label`. `--code` runs the stages of another checkout, e.g. the commit before a change:
`git archive <rev> stages | tar -x -C /tmp/old` then `--code /tmp/old --label before`.
Timings are CPU seconds on a shared machine; RSS is the figure to read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from stages import schema
from stages.fsutil import write_json
from stages.ingest.coasttrain import spatial_block
from stages.ingest.common import dumps_labels, point_cover_labels
from stages.samplegen.texture import rng_for

REPO = Path(__file__).resolve().parents[1]
POINTS_PER_IMAGE = {"mermaid": 25, "coralnet": 200}
PER_UNIT = {"mermaid": 50, "coralnet": 80, "seatizen": 80, "coasttrain": 60, "inat2017": 120}
POINTS_PER_UNIT = sum(PER_UNIT[s] * n for s, n in POINTS_PER_IMAGE.items())
BATCH_IMAGES = 2000
WRITE = {
    "compression": "zstd",
    "compression_level": 3,
    "version": "2.6",
    "data_page_version": "1.0",
}

# A taxonomy of the real one's shape: ~150 benthic attributes under 8 top-level categories, 10
# growth forms; ids are uuid-like like MERMAID's.
TOPS = [
    "Hard coral",
    "Soft coral",
    "Macroalgae",
    "Turf algae",
    "Other invertebrates",
    "Sand",
    "Rubble",
    "Other",
]
N_ATTRS = 150
GROWTH_FORMS = [
    "Branching",
    "Massive",
    "Encrusting",
    "Plates or tables",
    "Columnar",
    "Foliose",
    "Digitate",
    "Corymbose",
    "Solitary",
    "Tabular",
]


def _uuid(rng: np.random.Generator) -> str:
    h = rng.bytes(16).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def taxonomy() -> dict[str, list[Any]]:
    rng = rng_for("bench-split", "taxonomy")
    attrs = [
        f"Attribute {k:03d} {['Acropora', 'Porites', 'Pocillopora', 'Halimeda', 'Dictyota'][k % 5]}"
        for k in range(N_ATTRS)
    ]
    return {
        "attr_id": [_uuid(rng) for _ in attrs],
        "attr_name": attrs,
        "attr_top": [TOPS[k % len(TOPS)] for k in range(N_ATTRS)],
        "gf_id": [_uuid(rng) for _ in GROWTH_FORMS],
        "gf_name": GROWTH_FORMS,
        "label_code": [f"C{k:03d}" for k in range(N_ATTRS)],
    }


def _base_row(source: str, sample_id: str, rng: np.random.Generator, phash: int) -> dict[str, Any]:
    row: dict[str, Any] = {name: None for name in schema.SAMPLES.names}
    row.update(
        sample_id=sample_id,
        source=source,
        upstream_id=sample_id.split("-", 1)[1],
        image_path=f"data/raw/{source}/{sample_id}.jpg",
        image_format="jpeg",
        width=4000,
        height=3000,
        file_size=int(rng.integers(200_000, 4_000_000)),
        file_sha256=rng.bytes(32).hex(),
        phash=phash,
        license="CC-BY-NC-SA-4.0",
        attribution=f"{source} contributors (bench)",
        n_points=0,
    )
    return row


class TableWriter:
    """A parquet file written in record batches, in row groups of ingest's size (128k rows), so
    readers meet the layout `fsutil.write_parquet` gives real interim tables; the bench never
    holds more than one row group."""

    ROWS = 128 * 1024

    def __init__(self, path: Path, table_schema: pa.Schema) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.schema = table_schema
        self.writer = pq.ParquetWriter(path, table_schema, **WRITE)
        self.pending: list[pa.Table] = []
        self.buffered = 0
        self.rows = 0

    def write(self, rows: list[dict[str, Any]] | pa.Table) -> None:
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=self.schema)
        self.pending.append(table)
        self.buffered += table.num_rows
        self.rows += table.num_rows
        if self.buffered >= self.ROWS:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        table = pa.concat_tables(self.pending) if self.pending else self.schema.empty_table()
        cut = table.num_rows if final else table.num_rows // self.ROWS * self.ROWS
        if cut:
            self.writer.write_table(table.slice(0, cut), row_group_size=self.ROWS)
        rest = table.slice(cut)
        self.pending = [rest] if rest.num_rows else []
        self.buffered = rest.num_rows

    def close(self) -> None:
        self._flush(final=True)
        self.writer.close()


def _reef_source(root: Path, source: str, n_images: int, tax: dict[str, list[Any]]) -> int:
    """MERMAID or CoralNet samples and points (ids sorted by construction); returns the points."""
    per = POINTS_PER_IMAGE[source]
    samples = TableWriter(root / "data/interim" / source / "samples.parquet", schema.SAMPLES)
    points = TableWriter(root / "data/interim" / source / "points.parquet", schema.POINTS)
    arrays = {k: pa.array(v) for k, v in tax.items()}
    gf_id = pa.array([*tax["gf_id"], None])
    gf_name = pa.array([*tax["gf_name"], None])
    # Zipf-like class frequencies: a few attributes dominate, as on real reefs.
    weights = 1.0 / np.arange(1, N_ATTRS + 1) ** 1.1
    weights /= weights.sum()
    n_classes = 12 if source == "coralnet" else 6
    for lo in range(0, n_images, BATCH_IMAGES):
        rows: list[dict[str, Any]] = []
        attr_parts: list[np.ndarray] = []
        gf_parts: list[np.ndarray] = []
        cell_parts: list[np.ndarray] = []
        for k in range(lo, min(n_images, lo + BATCH_IMAGES)):
            rng = rng_for("bench-split", source, k)
            if source == "coralnet":
                sample_id = f"coralnet-s{1000 + k // 5000}-IMG_{k:07d}_{rng.bytes(3).hex()}_JPG"
                phash = int(rng.integers(0, 2**63))
            else:
                sample_id = f"mermaid-{k:08x}-{_uuid(rng)[9:]}"
                phash = int(rng.integers(0, 2**63))
                if k % 40 == 0:  # a near copy of a CoralNet image, one bit away
                    phash = coralnet_phash(k // 40) ^ 1
            classes = rng.choice(N_ATTRS, size=n_classes, replace=False, p=weights)
            attrs = classes[rng.integers(0, n_classes, per)]
            gfs = np.where(attrs % 3 == 0, rng.integers(0, len(GROWTH_FORMS), per), len(GROWTH_FORMS))
            cells = np.sort(rng.choice(150 * 200, size=per, replace=False))
            pts = [
                {
                    "benthic_attribute_id": tax["attr_id"][a],
                    "benthic_attribute_name": tax["attr_name"][a],
                    "growth_form_id": tax["gf_id"][g] if g < len(GROWTH_FORMS) else None,
                    "growth_form_name": tax["gf_name"][g] if g < len(GROWTH_FORMS) else None,
                    "top_level_category": tax["attr_top"][a],
                }
                for a, g in zip(attrs.tolist(), gfs.tolist())
            ]
            row = _base_row(source, sample_id, rng, phash)
            row.update(
                region=f"region-{k % 17}",
                captured_at=f"20{10 + k % 14:02d}-0{1 + k % 9}-1{k % 10}",
                lat=float(-20 + rng.random()),
                lon=float(150 + rng.random()),
                native_labels=dumps_labels(
                    {
                        "site": f"Site {k % 97}",
                        "transect": f"T{k % 5}",
                        "depth_m": float(k % 20),
                        "aux": {"Aux1": f"reef-{k % 13}", "Aux2": "", "Aux3": "quadrat"},
                    }
                ),
                labels=dumps_labels(point_cover_labels(pts)),
                n_points=per,
            )
            rows.append(row)
            attr_parts.append(attrs)
            gf_parts.append(gfs)
            cell_parts.append(cells)
        samples.write(rows)
        ids = pa.array([r["sample_id"] for r in rows])
        a = pa.array(np.concatenate(attr_parts))
        g = pa.array(np.concatenate(gf_parts))
        cell = np.concatenate(cell_parts)
        sid = ids.take(pa.array(np.repeat(np.arange(len(rows)), per)))
        row_px = pa.array((cell // 200) * 20, pa.int32())
        col_px = pa.array((cell % 200) * 20, pa.int32())
        point_id = pc.binary_join_element_wise(
            sid, pc.cast(row_px, pa.string()), pc.cast(col_px, pa.string()), "-"
        )
        points.write(
            pa.table(
                [
                    point_id,
                    sid,
                    pa.array([source] * len(a)),
                    row_px,
                    col_px,
                    pc.cast(a, pa.string()),
                    arrays["label_code"].take(a),
                    arrays["attr_id"].take(a),
                    arrays["attr_name"].take(a),
                    gf_id.take(g),
                    gf_name.take(g),
                    arrays["attr_top"].take(a),
                ],
                schema=schema.POINTS,
            )
        )
    samples.close()
    points.close()
    return points.rows


def coralnet_phash(k: int) -> int:
    return int(rng_for("bench-split", "coralnet", k).integers(0, 2**63))


def _seatizen(root: Path, n_images: int, tax: dict[str, list[Any]]) -> None:
    out = TableWriter(root / "data/interim/seatizen/samples.parquet", schema.SAMPLES)
    rows: list[dict[str, Any]] = []
    phash = 0
    for k in range(n_images):
        session, frame = divmod(k, 8)
        rng = rng_for("bench-split", "seatizen", k)
        if frame == 0:
            phash = int(rng.integers(0, 2**63))
        else:  # consecutive frames: two bits away from the previous one, so a session chains
            bits = rng.choice(63, size=2, replace=False)
            phash ^= (1 << int(bits[0])) | (1 << int(bits[1]))
        values = rng.random(40) < 0.2
        attribute = [
            {
                "id": tax["attr_id"][c],
                "name": tax["attr_name"][c],
                "top_level": tax["attr_top"][c],
                "value": int(v),
            }
            for c, v in zip(range(0, 80, 2), values.tolist())
        ]
        gf = [{**item, "growth_form_id": None, "growth_form_name": None} for item in attribute]
        row = _base_row("seatizen", f"seatizen-{20230000 + session:08d}_{frame:04d}_jpeg", rng, phash)
        row.update(
            session=f"2023{session:06d}_REU-bench",
            lat=float(-21 + rng.random()),
            lon=float(55 + rng.random()),
            captured_at=f"2023-0{1 + session % 9}-12T10:{frame:02d}:00",
            native_labels=dumps_labels(
                {name: int(v) for name, v in zip(tax["attr_name"][:40], values.tolist())}
            ),
            labels=dumps_labels(
                {
                    "attribute": attribute,
                    "attribute_growth_form": gf,
                    "top_level": {
                        t: int(any(v for c, v in zip(range(0, 80, 2), values) if tax["attr_top"][c] == t))
                        for t in TOPS
                    },
                }
            ),
        )
        rows.append(row)
        if len(rows) == BATCH_IMAGES:
            out.write(rows)
            rows = []
    out.write(rows)
    out.close()


COAST_CLASSES = [
    "water",
    "whitewater",
    "sediment",
    "other_bare_natural_terrain",
    "marsh_vegetation",
    "terrestrial_vegetation",
    "development",
]


def _coasttrain(root: Path, n_images: int) -> None:
    """Scenes of 3x2 tiles whose bounds touch, along a coast, each tile's bounds in `geo`."""
    out = TableWriter(root / "data/interim/coasttrain/samples.parquet", schema.SAMPLES)
    rows: list[dict[str, Any]] = []
    tile = 0.0153  # degrees: about 1.7 km, the NAIP tiles' size
    for k in range(n_images):
        scene, t = divmod(k, 6)
        rng = rng_for("bench-split", "coasttrain", k)
        lat0 = 25.0 + scene * 0.11  # scenes apart along a coast; some straddle a 0.05-degree cell edge
        lon0 = -80.6 - scene * 0.011
        i, j = divmod(t, 2)
        lat_min, lon_min = lat0 + i * tile, lon0 + j * tile
        geo = {
            "epsg": 26917,
            "crs": "NAD83 / UTM zone 17N",
            "px_size_m": 1.0,
            "lat_min": lat_min,
            "lat_max": lat_min + tile,
            "lon_min": lon_min,
            "lon_max": lon_min + tile,
        }
        pixels = rng.integers(0, 200_000, len(COAST_CLASSES) + 1).tolist()
        total = sum(pixels)
        names = [*COAST_CLASSES, "ignore"]
        record = f"NAIP_{6 + scene % 6}_001"
        stem = f"chunk{t}_m_{2808000 + scene}_nw_17_1_20151017"
        row = _base_row("coasttrain", f"coasttrain-{record}-{stem}", rng, int(rng.integers(0, 2**63)))
        row.update(
            upstream_id=f"{record}/npz/{stem}.npz",
            image_format="npz",
            session=f"{record}/m_{2808000 + scene}_nw_17_1",
            spatial_block=spatial_block(lat_min + tile / 2, lon_min + tile / 2, 0.05),
            lat=lat_min + tile / 2,
            lon=lon_min + tile / 2,
            mask_path=f"data/interim/coasttrain/masks/coasttrain-{record}-{stem}.png",
            native_labels=dumps_labels(
                {
                    "record": record,
                    "npz": f"npz/{stem}.npz",
                    "classes": COAST_CLASSES,
                    "classes_present": COAST_CLASSES,
                    "label_channels": 7,
                    "csv": "meta.csv",
                    "geo": geo,
                }
            ),
            labels=dumps_labels(
                {
                    "classes": COAST_CLASSES,
                    "ignore_index": 255,
                    "pixels": dict(zip(names, pixels)),
                    "fractions": {n: round(c / total, 6) for n, c in zip(names, pixels)},
                    "present": [c for c, n in zip(COAST_CLASSES, pixels) if n > 0],
                }
            ),
        )
        rows.append(row)
    rows.sort(key=lambda r: r["sample_id"])
    for lo in range(0, len(rows), BATCH_IMAGES):
        out.write(rows[lo : lo + BATCH_IMAGES])
    out.close()


def _inat(root: Path, n_images: int) -> None:
    out = TableWriter(root / "data/interim/inat2017/samples.parquet", schema.SAMPLES)
    rows: list[dict[str, Any]] = []
    for k in range(n_images):
        rng = rng_for("bench-split", "inat2017", k)
        row = _base_row("inat2017", f"inat2017-{100000 + k:07d}", rng, int(rng.integers(0, 2**63)))
        if k % 200 == 1:  # an exact copy of the previous image uploaded again
            row["file_sha256"] = rows[-1]["file_sha256"] if rows else row["file_sha256"]
        category = int(rng.integers(0, 400))
        row.update(
            observer=str(int(rng.integers(0, max(1, n_images // 6)))),
            official_split="val" if rng.random() < 0.15 else "train",
            lat=float(rng.uniform(-60, 60)),
            lon=float(rng.uniform(-180, 180)),
            native_labels=dumps_labels(
                {
                    "file_name": f"train_val_images/Mollusca/Species {category}/{rng.bytes(16).hex()}.jpg",
                    "license_id": 1,
                    "rights_holder": f"observer {k % 977}",
                    "category_id": category,
                }
            ),
            labels=dumps_labels(
                {
                    "category": f"Species {category}",
                    "category_id": category,
                    "supercategory": ["Mollusca", "Actinopterygii"][category % 2],
                    "bboxes": [[10.0, 20.0, 300.0, 200.0]],
                }
            ),
        )
        rows.append(row)
        if len(rows) >= BATCH_IMAGES:
            out.write(rows[:-1])
            rows = rows[-1:]
    out.write(rows)
    out.close()


def make_corpus(root: Path, points: int) -> dict[str, Any]:
    units = points / POINTS_PER_UNIT
    counts = {s: max(1, round(n * units)) for s, n in PER_UNIT.items()}
    counts["seatizen"] = max(8, counts["seatizen"] // 8 * 8)
    counts["coasttrain"] = max(6, counts["coasttrain"] // 6 * 6)
    (root / "dvc.yaml").write_text("stages: {}\n", encoding="utf-8")
    tax = taxonomy()
    n_points = sum(_reef_source(root, s, counts[s], tax) for s in ("mermaid", "coralnet"))
    _seatizen(root, counts["seatizen"], tax)
    _coasttrain(root, counts["coasttrain"])
    _inat(root, counts["inat2017"])
    ledger = root / "data/ledger/splits.parquet"
    ledger.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "data/ledger/splits.parquet", ledger)
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return {"points": n_points, "samples": sum(counts.values()), "samples_by_source": counts}


def measure(root: Path, label: str, *argv: str, code: Path = REPO) -> dict[str, Any]:
    """One stage command in a fresh `bench.measure` process: its own CPU and peak RSS.

    `code` is the checkout whose `stages` package runs (bench.measure always comes from here).
    """
    log = root / "bench-log.jsonl"
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{REPO}", "TIDEPOOL_PROGRESS": "0"}
    env.pop("TIDEPOOL_ENDPOINTS", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.measure",
            "--label",
            label,
            "--log",
            str(log),
            "--",
            sys.executable,
            "-m",
            *argv,
            "--params",
            str(root / "params.yaml"),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    record = json.loads(log.read_text(encoding="utf-8").splitlines()[-1])
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {k: record[k] for k in ("cpu_s", "wall_s", "max_rss_bytes")}


RUNS = (
    ("dedup", ("stages.dedup",)),
    ("split", ("stages.split",)),
    ("split --update-ledger", ("stages.split", "--update-ledger")),
    ("split (ledger full)", ("stages.split",)),
)


def bench_size(workdir: Path, points: int, code: Path = REPO) -> dict[str, Any]:
    root = workdir / f"p{points}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    print(f"[bench_split] writing interim tables for {points:,} points", file=sys.stderr)
    corpus = make_corpus(root, points)
    out: dict[str, Any] = {**corpus, "runs": {}}
    for label, argv in RUNS:
        print(f"[bench_split] {points:,} points: {label}", file=sys.stderr)
        out["runs"][label] = measure(root, label, *argv, code=code)
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def print_table(label: str, sizes: list[dict[str, Any]]) -> None:
    print(f"\n{label}: peak RSS (MiB) / CPU s of each command, python -m bench.bench_split")
    header = ["points", "samples", *(name for name, _ in RUNS)]
    print(" | ".join(header))
    for s in sizes:
        cells = [f"{s['points']:,}", f"{s['samples']:,}"]
        for name, _ in RUNS:
            r = s["runs"][name]
            cells.append(f"{_mib(r['max_rss_bytes'])} MiB / {r['cpu_s']:.1f} s")
        print(" | ".join(cells))
    for a, b in zip(sizes, sizes[1:]):
        growth = ", ".join(
            f"{name} {b['runs'][name]['max_rss_bytes'] / a['runs'][name]['max_rss_bytes']:.2f}x"
            for name, _ in RUNS
        )
        print(f"peak RSS growth {a['points']:,} -> {b['points']:,} points: {growth}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_split", description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, nargs="+", default=[100_000, 1_000_000, 5_000_000])
    parser.add_argument("--label", default="current")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the scratch projects")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "split.json")
    parser.add_argument(
        "--code",
        type=Path,
        default=REPO,
        help="run the stages of another checkout (e.g. `git archive` of an older commit), to compare",
    )
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-split-"))
    sizes = []
    try:
        for points in args.points:
            sizes.append(bench_size(workdir, points, args.code.resolve()))
            if not args.keep:
                shutil.rmtree(workdir / f"p{points}", ignore_errors=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=args.code, capture_output=True, text=True, check=False
    ).stdout.strip()
    results = json.loads(args.out.read_text(encoding="utf-8")) if args.out.exists() else {}
    results[args.label] = {
        "command": "python -m bench.bench_split " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": commit,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
        },
        "sizes": sizes,
    }
    write_json(args.out, results)
    print_table(args.label, sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
