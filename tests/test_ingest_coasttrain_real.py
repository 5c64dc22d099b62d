"""ingest@coasttrain on real Doodler output (tests/reference/doodler, see its NOTICE.md): the npz
decoder against Doodler's own label PNGs, and the files as a Coast Train record, served as a zip by
the loopback, fetched by the real fetch code and ingested by the real stage."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO, ingest_context
from PIL import Image

from stages.config import ENDPOINTS_ENV, load_params
from stages.imaging import pixel_sha256
from stages.ingest import coasttrain, coasttrain_npz, ingest_source
from stages.samplegen.inat import zip_bytes

DOODLER = REPO / "tests" / "reference" / "doodler"
RECORD = "Doodler_2_001"  # a record name in Coast Train's form, for the real files
# Doodler's `class_label_colormap` (dash_doodler), class index = position: the colours its label
# PNGs use, so a PNG pixel's colour gives the class index Doodler meant.
PALETTE = ("#3366CC", "#DC3912", "#FF9900", "#109618", "#990099", "#0099C6", "#DD4477", "#66AA00")
_LABEL_PNG = re.compile(r"^(?P<image>.+)_label(?P<time>\d{4}-\d{2}-\d{2}-\d{2}-\d{2})_(?P<user>[^_]+)\.png$")
NPZ = sorted(DOODLER.glob("results*/*.npz"))


def _newest_png(npz: Path) -> Path:
    """The last label PNG Doodler wrote for this npz in its session folder: its final pass."""
    image, user = npz.stem.rsplit("_", 1)
    pngs = []
    for png in npz.parent.glob("*.png"):
        m = _LABEL_PNG.match(png.name)
        if m and m["image"] == image and m["user"] == user:
            pngs.append((m["time"], png))
    assert pngs, npz
    return max(pngs)[1]


def _png_classes(png: Path) -> np.ndarray:
    with Image.open(png) as img:
        rgb = np.asarray(img.convert("RGB"))
    index = np.full(rgb.shape[:2], 255, dtype=np.uint8)
    for k, colour in enumerate(PALETTE):
        index[(rgb == [int(colour[i : i + 2], 16) for i in (1, 3, 5)]).all(-1)] = k
    assert (index != 255).all(), f"{png.name}: a colour outside Doodler's palette"
    return index


def test_the_reference_set_is_what_its_notice_says():
    assert len(NPZ) == 7
    names = [p.name for p in NPZ]
    assert len(set(names)) == 5  # two names are labelled in two sessions each


@pytest.mark.parametrize("npz", NPZ, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_doodler_npz_decodes_equal_to_doodlers_newest_label_png(npz: Path):
    decoded = coasttrain_npz.decode_npz(npz.read_bytes(), max_pixels=178956970, max_bytes=1 << 30)
    expected = _png_classes(_newest_png(npz))
    np.testing.assert_array_equal(decoded.index, expected)
    assert int(expected.max()) < len(decoded.classes) and decoded.channels == int(expected.max()) + 1
    with np.load(npz, allow_pickle=False) as z:
        np.testing.assert_array_equal(decoded.rgb, z["orig_image"][..., :3])
        earlier = [k for k in z.files if k.endswith("label") and k != "label"]
        # an earlier pass's label differs from the final PNG, so a reader that took it is caught
        for key in earlier:
            assert not np.array_equal(z[key].argmax(-1), expected), key


def test_classes_txt_is_crlf_without_a_final_newline_and_names_the_two_class_sessions():
    raw = (DOODLER / "classes.txt").read_bytes()
    assert raw == b"water\r\nland"  # what the NOTICE says: CRLF, no final newline
    names = tuple(raw.decode("utf-8").splitlines())
    two_class = [p for p in NPZ if len(np.load(p)["classes"]) == 2]
    assert two_class
    for npz in two_class:
        assert coasttrain_npz.decode_npz(npz.read_bytes(), 178956970, 1 << 30).classes == names


# --- the real files as a Coast Train record, through fetch and ingest ------------------------------


def _metadata_csv(names: list[str]) -> bytes:
    """Doodler writes no metadata; a record needs its CSV, so this one is made here: one row per npz
    name (the newest session's file joins it), tiles side by side, as the served CSVs lay them out."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(coasttrain.REQUIRED_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for i, name in enumerate(names):
        lon = -122.0 + 0.001 * i
        writer.writerow(
            {
                "annotation_image_filename": name,
                "year": "2018",
                "month": "1",
                "day": "20",
                "LonMin": f"{lon:.6f}",
                "LonMax": f"{lon + 0.001:.6f}",
                "LatMin": "36.950000",
                "LatMax": "36.951000",
                "px_size_m": "10",
                "epsg": "32610",
                "CRS": "n/a",
            }
        )
    return buf.getvalue().encode("latin-1")


def _ingest(root: Path, tables: Path, out: Path) -> SimpleNamespace:
    ctx = ingest_context("coasttrain", root, out_root=out, sources__coasttrain__records=[RECORD])
    metrics = ingest_source(replace(ctx, tables_dir=tables, jobs=1))
    return SimpleNamespace(
        metrics=metrics,
        out=out,
        samples=pq.read_table(ctx.out_dir / "samples.parquet").to_pylist(),
        quarantine=pq.read_table(ctx.out_dir / "quarantine.parquet").to_pylist(),
    )


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from stages.fetch import fetch
    from stages.loopback import Loopback

    names = sorted({p.name for p in NPZ})
    members = [
        (p.relative_to(DOODLER).as_posix(), p.read_bytes()) for p in sorted(DOODLER.rglob("*")) if p.is_file()
    ]
    members.append(("Doodler_meta.csv", _metadata_csv(names)))
    upstream = tmp_path_factory.mktemp("doodler-upstream")
    data = zip_bytes(members)
    (upstream / "http" / "coasttrain").mkdir(parents=True)
    (upstream / "http" / "coasttrain" / f"{RECORD}.zip").write_bytes(data)
    (upstream / "checksums.json").write_text(
        json.dumps({f"coasttrain/{RECORD}.zip": hashlib.md5(data).hexdigest()}), encoding="utf-8"
    )
    root = tmp_path_factory.mktemp("doodler-project")
    (root / "dvc.yaml").write_text("stages: {}\n", encoding="utf-8")
    shutil.copytree(REPO / "data" / "tables", root / "data" / "tables")
    with Loopback(upstream=upstream) as lb, pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENDPOINTS_ENV, str(lb.write_overlay(root / "endpoints.yaml")))
        params = load_params(REPO / "params.yaml")
        params["sources"]["coasttrain"]["records"] = [RECORD]
        fetch("coasttrain", params, root / "data" / "raw" / "coasttrain", root / "data" / ".downloads" / "ct")
    raw = root / "data" / "raw" / "coasttrain" / RECORD
    # With the project's table `land` is not a Coast Train class; a table that maps it shows the
    # masks the real files make.
    with_land = tmp_path_factory.mktemp("tables-with-land")
    shutil.copytree(REPO / "data" / "tables", with_land, dirs_exist_ok=True)
    remap = with_land / "coasttrain" / "remap.csv"
    remap.write_bytes(remap.read_bytes() + b"land,natural_terrain\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIDEPOOL_CACHE_DIR", str(tmp_path_factory.mktemp("doodler-cache")))
        default = _ingest(root, root / "data" / "tables", tmp_path_factory.mktemp("doodler-out"))
        mapped = _ingest(root, with_land, tmp_path_factory.mktemp("doodler-out-land"))
    newest = {}
    for p in NPZ:
        if p.name not in newest or p.parent.name > newest[p.name].parent.name:
            newest[p.name] = p
    return SimpleNamespace(
        raw=raw,
        default=default,
        mapped=mapped,
        newest=newest,
        manifest=root / "data/raw/coasttrain/manifest.csv",
    )


def _upstream(p: Path) -> str:
    return f"{RECORD}/{p.relative_to(DOODLER).as_posix()}"


def test_fetch_mirrors_the_doodler_record(real):
    for p in DOODLER.rglob("*"):
        if p.is_file():
            assert (real.raw / p.relative_to(DOODLER)).read_bytes() == p.read_bytes()
    with open(real.manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["verified"] for r in rows} == {"md5"}


def test_real_record_with_the_projects_remap_quarantines_land_and_the_superseded_sessions(real):
    run = real.default
    superseded = {_upstream(p) for p in NPZ if real.newest[p.name] != p}
    assert superseded == {
        f"{RECORD}/results2022-05-04-14-34/2017-12-21-19-00-36_S2_rgb_03_db.npz",
        f"{RECORD}/results2022-05-04-14-40/2018-01-20-18-57-04_S2_rgb_00_Enter-user-ID.npz",
    }
    assert run.metrics["inputs"] == {"image": 7, "annotation_row": 5}
    assert run.metrics["samples"] == 0
    assert run.metrics["quarantine"] == {"image_unusable": 5, "superseded": 2, "unknown_class": 5}
    by_reason: dict[str, set[str]] = {}
    for q in run.quarantine:
        by_reason.setdefault(q["reason"], set()).add(q["record_id"])
    assert by_reason["superseded"] == superseded
    assert by_reason["unknown_class"] == {_upstream(p) for p in real.newest.values()}
    assert all("'land'" in q["detail"] for q in run.quarantine if q["reason"] == "unknown_class")
    # Doodler's class file names `land` as this decoder reads it: no stray CR from the CRLF list.
    assert run.metrics["unknown_classes"] == {"land": 5}
    assert set(run.metrics["unknown_classes"]) <= set((DOODLER / "classes.txt").read_text().splitlines())
    assert run.metrics["records"][RECORD] == {
        "csv_rows": 5,
        "csv_rows_joined": 0,
        "npz": 7,
        "quarantined": {"superseded": 2, "unknown_class": 5},
        "samples": 0,
    }


def test_real_record_with_land_mapped_gives_doodlers_own_masks(real):
    run = real.mapped
    table = coasttrain.load_remap(REPO / "data" / "tables")
    assert run.metrics["samples"] == 5 and run.metrics["quarantine"] == {"superseded": 2}
    assert run.metrics["unknown_classes"] == {} and run.metrics["csv_rows_joined"] == 5
    by_upstream = {s["upstream_id"]: s for s in run.samples}
    assert set(by_upstream) == {_upstream(p) for p in real.newest.values()}
    for name, npz in real.newest.items():
        sample = by_upstream[_upstream(npz)]
        classes = [str(c) for c in np.load(npz)["classes"]]
        lut = np.array(
            [5 if c == "land" else table[c] for c in classes] + [255] * (256 - len(classes)), dtype=np.uint8
        )
        expected = lut[_png_classes(_newest_png(npz))]
        with Image.open(run.out / sample["mask_path"]) as img:
            np.testing.assert_array_equal(np.asarray(img), expected, err_msg=name)
        assert sample["pixel_sha256"] == pixel_sha256(np.load(npz)["orig_image"][..., :3])
        native = json.loads(sample["native_labels"])
        assert native["classes"] == classes and native["geo"]["lon_min"] is not None
        assert sample["session"].startswith(f"{RECORD}/")
