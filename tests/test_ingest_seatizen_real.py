"""ingest@seatizen on the Seatizen authors' own files (tests/reference/seatizen, see its NOTICE.md):
their file names, their binary and probability training tables with the old label names, and the
raster masks of the-point-is-the-mask. The raw folder is laid out as fetch leaves it
(`data/raw/seatizen/<csv>`, `2024_dataset/<images>`) and ingest runs through `ingest_source`."""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO, ingest_context
from PIL import Image

from stages.errors import UpstreamFormatError
from stages.ingest import ingest_source
from stages.ingest.seatizen_names import parse_name

REF = Path(__file__).resolve().parent / "reference" / "seatizen"
DINO = REF / "dinovdeau"
MASKS = REF / "point-is-the-mask"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))
    return rows[0], rows[1:]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    path.write_text(buf.getvalue(), encoding="utf-8")


def project(root: Path, fetched_root: Path, csvs: list[Path], images: list[Path]) -> Path:
    """A project whose data/raw/seatizen holds `csvs` and, under 2024_dataset/, `images`."""
    raw = root / "data" / "raw" / "seatizen"
    (raw / "2024_dataset").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n", encoding="utf-8")
    shutil.copytree(fetched_root / "data" / "taxonomy", root / "data" / "taxonomy")
    shutil.copytree(REPO / "data" / "tables", root / "data" / "tables")
    for p in csvs:
        shutil.copyfile(p, raw / p.name)
    for p in images:
        shutil.copyfile(p, raw / "2024_dataset" / p.name)
    return root


def ingest(root: Path, **overrides: Any) -> dict[str, Any]:
    params = {"sources__seatizen__annotations": ["*.csv"], **overrides}
    ctx = ingest_context("seatizen", root, **params)
    metrics = ingest_source(ctx)
    out = ctx.out_dir
    return {
        "metrics": metrics,
        "ctx": ctx,
        "samples": {s["upstream_id"]: s for s in pq.read_table(out / "samples.parquet").to_pylist()},
        "quarantine": pq.read_table(out / "quarantine.parquet").to_pylist(),
    }


def reasons(result: dict[str, Any]) -> Counter[tuple[str, str]]:
    return Counter((q["record_kind"], q["reason"]) for q in result["quarantine"])


def images_of(folder: str) -> list[Path]:
    return sorted(p for p in (DINO / folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def csv_rows(folder: str) -> int:
    return sum(len(read_csv(p)[1]) for p in sorted((DINO / folder).glob("*.csv")))


# --- names ------------------------------------------------------------------------------------


def test_every_real_seatizen_name_parses_with_a_session_key() -> None:
    names = {p.name for p in REF.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES + (".tif",)}
    for path in DINO.rglob("*.csv"):
        names |= {r[0] for r in read_csv(path)[1]}
    assert len(names) > 90
    for name in sorted(names):
        parsed = parse_name(name)
        assert parsed.session, name
    atlas = [n for n in names if n.startswith("20150611_")]
    assert len(atlas) == 30
    for name in atlas:  # still photos: no video or frame token
        parsed = parse_name(name)
        assert (parsed.form, parsed.session, parsed.site) == (
            "still",
            "20150611_REU-St-Gilles_scuba",
            "REU-St-Gilles",
        )
        assert (parsed.date, parsed.platform, parsed.video) == ("2015-06-11", "scuba", None)
        assert parsed.frame == name.split("_")[-1].split(".")[0]
    # Names outside the Atlas grammar are still images, grouped by what can be read.
    assert parse_name("odm_orthophoto_317341_7665591.png").session == "odm_orthophoto"
    assert parse_name("Salary_T15_DSCN8051_19.jpg").session == "Salary"
    assert parse_name("Toliara_T39_20241701_GRT_transect39_104_13.jpg").session == "Toliara"


@pytest.mark.parametrize(
    ("name", "form", "session", "parts"),
    [
        (
            "20210618_ATF-Europa_ASV-00_GX024250_004.jpeg",
            "video_frame",
            "20210618_ATF-Europa_ASV-00_GX024250",
            {"country": "ATF", "place": "Europa", "platform": "ASV", "platform_number": "00", "frame": "004"},
        ),
        (
            "20190420_MYT_scuba_DSCI1495.JPG",
            "still",
            "20190420_MYT_scuba",
            {"country": "MYT", "place": None, "frame": "DSCI1495"},
        ),
        (
            "20221021_MUS-Le-Morne-Saint-Jacques_paddle-2_10_00168.jpg",
            "video_frame",
            "20221021_MUS-Le-Morne-Saint-Jacques_paddle-2_10",
            {"place": "Le-Morne-Saint-Jacques", "platform": "paddle", "platform_number": "2", "video": "10"},
        ),
        (
            "20210618_ATF-Europa_ASV-01_G0012345.JPG",
            "still",
            "20210618_ATF-Europa_ASV-01",
            {"platform_number": "01", "video": None, "frame": "G0012345"},
        ),
        (
            "20230101_REU-StLeu_kite_GH012345_0042.jpg",
            "video_frame",
            "20230101_REU-StLeu_kite_GH012345",
            {"video": "GH012345", "frame": "0042"},
        ),
        (
            "20230101_REU-StLeu_MASK_a_b_c_0001.jpg",
            "video_frame",
            "20230101_REU-StLeu_MASK_a_b_c",
            {"video": "a_b_c"},
        ),
        ("20230101_REU-StLeu_MASK_a_b_c_d_0001.jpg", "partial", "20230101_REU-StLeu_MASK", {}),
        ("20230101_REU-StLeu_plancha_GX1_001.jpg", "partial", "20230101_REU-StLeu", {"platform": None}),
        ("20231301_REU_scuba_x.jpg", "other", "20231301", {"date": None}),
        ("20210126-ATF-Europa-KITE-GX090871-032.JPG", "partial", "20210126", {"date": "2021-01-26"}),
        ("IMG_0001.JPG", "other", "IMG", {}),
        ("IMG0001.JPG", "other", "IMG", {}),
    ],
)
def test_the_grammar_forms(name: str, form: str, session: str, parts: dict[str, Any]) -> None:
    parsed = parse_name(name)
    assert (parsed.form, parsed.session) == (form, session)
    native = parsed.native()
    assert {k: native[k] for k in parts} == parts


# --- the authors' binary multilabel tables ----------------------------------------------------


@pytest.fixture(scope="module")
def fs_ml(fetched_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = project(
        tmp_path_factory.mktemp("fs_ml") / "p",
        fetched_root,
        sorted((DINO / "fs_ml_bin").glob("*.csv")),
        images_of("fs_ml_images"),
    )
    return ingest(root)


def test_fs_ml_bin_ingests_every_row_with_old_names_mapped(fs_ml: dict[str, Any]) -> None:
    m = fs_ml["metrics"]
    assert m["inputs"] == {"annotation_row": csv_rows("fs_ml_bin"), "image": 30}
    assert m["samples"] == 30 and m["quarantined"] == 0
    header, _ = read_csv(DINO / "fs_ml_bin" / "train.csv")
    classes = header[1:]
    for s in fs_ml["samples"].values():
        native = json.loads(s["native_labels"])
        labels = json.loads(s["labels"])
        assert native["value_kind"] == "binary" and list(native["multilabel"]) == classes
        assert native["renamed"]["Acropore_branched"] == "Acropora_Branching"
        assert native["renamed"]["No_acropore_massive"] == "Non-acropora_Massive"
        assert "Homo_sapiens" in native["renamed"] and "unknown_classes" not in native
        branching = [
            a["value"]
            for a in labels["attribute_growth_form"]
            if (a["name"], a["growth_form_name"]) == ("Acropora", "Branching")
        ]
        assert branching == [native["multilabel"]["Acropore_branched"]]
        assert labels["non_benthic"]["Homo_Sapiens"] == native["multilabel"]["Homo_sapiens"]
        assert s["session"] == "20150611_REU-St-Gilles_scuba" and s["site"] == "REU-St-Gilles"
        assert s["captured_at"] == "2015-06-11"
    splits = Counter(s["official_split"] for s in fs_ml["samples"].values())
    assert splits == {"train": 10, "val": 10, "test": 10}
    files = m["files"]
    assert {Path(k).name: v["value_kind"] for k, v in files.items()} == {
        "test.csv": "binary",
        "train.csv": "binary",
        "val.csv": "binary",
    }
    authors = REF / "zenodo-tools" / "matching_between_old_new_label_multilabel.csv"
    old = {r["old_label"] for r in csv.DictReader(authors.open()) if r["old_label"] != r["label"]}
    assert all(v["renamed"] == len(old & set(classes)) == 17 for v in files.values())
    assert all(v["unknown_classes"] == [] for v in files.values())
    assert m["names"]["still"] == 30 and m["sessions"] == 1
    assert m["crosswalk"]["ratio"] == 1.0


@pytest.fixture(scope="module")
def ms_ml(fetched_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = project(
        tmp_path_factory.mktemp("ms_ml") / "p",
        fetched_root,
        sorted((DINO / "ms_ml_bin").glob("*.csv")),
        images_of("drone_images"),
    )
    return ingest(root)


def test_ms_ml_bin_quarantines_the_unknown_algae_column_and_ingests_the_rest(ms_ml: dict[str, Any]) -> None:
    m, q = ms_ml["metrics"], ms_ml["quarantine"]
    assert m["inputs"] == {"annotation_row": csv_rows("ms_ml_bin"), "image": 30, "class": 3}
    assert m["samples"] == 30
    assert reasons(ms_ml) == {("class", "unknown_class"): 3}
    algae = [r for r in q if r["record_id"] == "Algae"]
    assert sorted(Path(r["file"]).name for r in algae) == sorted(
        p.name for p in (DINO / "ms_ml_bin").glob("*.csv")
    )
    assert all("'Algae'" in r["detail"] and "left out of the labels" in r["detail"] for r in algae)
    header, _ = read_csv(DINO / "ms_ml_bin" / "drone-train_df_binary.csv")
    present = sum(
        int(r[header.index("Algae")]) for p in (DINO / "ms_ml_bin").glob("*.csv") for r in read_csv(p)[1]
    )
    assert m["unknown_classes"] == {
        "Algae": {"files": 3, "values": csv_rows("ms_ml_bin"), "present": present, "not_annotated": 0}
    }
    for s in ms_ml["samples"].values():
        native = json.loads(s["native_labels"])
        labels = json.loads(s["labels"])
        assert native["unknown_classes"] == ["Algae"] and "Algae" in native["multilabel"]
        assert labels["top_level"]["Sand"] == native["multilabel"]["Sand"]
        assert s["session"] == "odm_orthophoto" and s["captured_at"] is None
    assert m["names"]["other"] == 30 and m["names"]["odd_examples"]


# --- probabilities --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prob_root(fetched_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return project(
        tmp_path_factory.mktemp("ms_prob") / "p",
        fetched_root,
        sorted((DINO / "ms_ml_prob").glob("*.csv")),
        images_of("drone_images"),
    )


def test_ms_ml_prob_is_ingested_as_soft_labels(prob_root: Path, tmp_path: Path) -> None:
    result = ingest(prob_root)
    m = result["metrics"]
    assert m["samples"] == 30 and reasons(result) == {("class", "unknown_class"): 3}
    assert {v["value_kind"] for v in m["files"].values()} == {"probability"}
    rows = {r[0]: r for p in (DINO / "ms_ml_prob").glob("*.csv") for r in read_csv(p)[1]}
    header, _ = read_csv(DINO / "ms_ml_prob" / "drone-train_df_prob.csv")
    seen_half = 0
    for name, s in result["samples"].items():
        native, labels = json.loads(s["native_labels"]), json.loads(s["labels"])
        upstream = dict(zip(header[1:], (float(v) for v in rows[name][1:])))
        assert native["value_kind"] == "probability" and native["multilabel"] == upstream
        soft = labels["soft"]
        assert soft["threshold"] == 0.5
        assert soft["top_level"]["Sand"] == upstream["Sand"]
        assert labels["top_level"]["Sand"] == int(upstream["Sand"] >= 0.5)
        acro = {
            a["growth_form_name"]: a["p"] for a in soft["attribute_growth_form"] if a["name"] == "Acropora"
        }
        assert acro["Branching"] == upstream["Acropore_branched"]
        hard = {
            a["growth_form_name"]: a["value"]
            for a in labels["attribute_growth_form"]
            if a["name"] == "Acropora"
        }
        assert hard["Branching"] == int(upstream["Acropore_branched"] >= 0.5)
        # Hard coral: the largest of its classes' probabilities.
        coral = [upstream[c] for c in header[1:] if c.startswith(("Acropore", "No_acropore", "Millepore"))]
        assert soft["top_level"]["Hard coral"] == max(coral)
        seen_half += any(0 < v < 1 for v in upstream.values())
    assert seen_half > 20

    # The threshold is a parameter.
    strict = ingest(prob_root, sources__seatizen__presence_threshold=0.95)
    for name, s in strict["samples"].items():
        labels = json.loads(s["labels"])
        sand = float(rows[name][header.index("Sand")])
        assert labels["top_level"]["Sand"] == int(sand >= 0.95) and labels["soft"]["threshold"] == 0.95


def test_ms_ml_prob_refused_as_a_whole_when_the_param_says_so(prob_root: Path) -> None:
    with pytest.raises(UpstreamFormatError, match=r"drone-test_df_prob\.csv: holds probabilities.*'refuse'"):
        ingest(prob_root, sources__seatizen__probabilities="refuse")


def test_a_fraction_in_a_binary_file_makes_it_a_probability_file_and_1_0_passes_only_in_a_binary_one(
    fetched_root: Path, tmp_path: Path
) -> None:
    root = project(
        tmp_path / "p", fetched_root, sorted((DINO / "ms_ml_bin").glob("*.csv")), images_of("drone_images")
    )
    raw = root / "data" / "raw" / "seatizen"
    header, rows = read_csv(raw / "drone-train_df_binary.csv")
    rows[0][header.index("Sand")] = "0.87"  # one fraction: this file holds probabilities, 1 and 0 too
    write_csv(raw / "drone-train_df_binary.csv", header, rows)
    vh, vrows = read_csv(raw / "drone-val_df_binary.csv")
    write_csv(raw / "drone-val_df_binary.csv", vh, [[r[0], *(f"{v}.0" for v in r[1:])] for r in vrows])
    result = ingest(root)
    kinds = {Path(k).name: v["value_kind"] for k, v in result["metrics"]["files"].items()}
    assert kinds == {
        "drone-test_df_binary.csv": "binary",
        "drone-train_df_binary.csv": "probability",
        "drone-val_df_binary.csv": "binary",  # all 1.0 / 0.0: the whole file is binary
    }
    first = json.loads(result["samples"][rows[0][0]]["native_labels"])
    assert first["value_kind"] == "probability" and first["multilabel"]["Sand"] == 0.87
    assert json.loads(result["samples"][rows[0][0]]["labels"])["soft"]["top_level"]["Sand"] == 0.87
    val = json.loads(result["samples"][vrows[0][0]]["native_labels"])
    assert val["value_kind"] == "binary" and all(isinstance(v, int) for v in val["multilabel"].values())
    assert result["metrics"]["samples"] == 30


def test_fs_monolabel_bin_all_classes_unknown_still_ingests_the_images(
    fetched_root: Path, tmp_path: Path
) -> None:
    root = project(
        tmp_path / "p",
        fetched_root,
        sorted((DINO / "fs_monolabel_bin").glob("*.csv")),
        images_of("fs_monolabel_images"),
    )
    result = ingest(root)
    m = result["metrics"]
    header, _ = read_csv(DINO / "fs_monolabel_bin" / "train_df.csv")
    assert m["samples"] == 30 and set(m["unknown_classes"]) == set(header[1:])
    assert reasons(result) == {("class", "unknown_class"): 3 * len(header[1:])}
    for s in result["samples"].values():
        assert json.loads(s["labels"])["top_level"] == {}
        assert s["session"] in ("Salary", "Toliara")


# --- raster masks ---------------------------------------------------------------------------


def _image(size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


@pytest.fixture(scope="module")
def rasters(fetched_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The real masks beside stand-in images of their size: `annotation_mask_<stem>` <-> `<stem>.jpg`."""
    root = project(tmp_path_factory.mktemp("rasters") / "p", fetched_root, [], [])
    folder = root / "data" / "raw" / "seatizen" / "2024_dataset"
    header = ["FileName", "Acropora_Branching", "Sand"]
    rows = []
    for k, mask in enumerate(sorted(p for p in MASKS.iterdir() if p.name.startswith("annotation_mask_"))):
        stem = mask.name.removeprefix("annotation_mask_").rsplit(".", 1)[0]
        with Image.open(mask) as img:
            size = img.size
        image = f"20240101_REU-{stem}_UAV_{stem}.jpg"
        (folder / image).write_bytes(_image(size, k))
        shutil.copyfile(mask, folder / f"annotation_mask_{Path(image).stem}{mask.suffix}")
        rows.append([image, "1", "1"])
    shutil.copyfile(MASKS / "color.txt", folder / "color.txt")
    write_csv(root / "data" / "raw" / "seatizen" / "20250101_multilabel_annotations.csv", header, rows)
    return {"root": root, "result": ingest(root), "rows": rows}


def _expected(mask: Path, classes: dict[str, int]) -> np.ndarray:
    """The mask through color.txt and data/tables/seatizen/raster_classes.csv, computed here."""
    colour = {}
    for line in (MASKS / "color.txt").read_text().splitlines():
        value, r, g, b, a = line.split()
        if value not in ("nan", "-9999") and int(a):
            colour[int(value)] = (int(r), int(g), int(b))
    table = {
        (int(r["red"]), int(r["green"]), int(r["blue"])): r["seatizen_class"]
        for r in csv.DictReader((REPO / "data/tables/seatizen/raster_classes.csv").open())
    }
    ids = np.asarray(Image.open(mask))
    out = np.zeros(ids.shape, dtype=np.uint8)
    for value, rgb in colour.items():
        out[ids == value] = classes[table[rgb]]
    return out


def test_raster_masks_png_and_tiff_attach_and_are_the_same_mask(rasters: dict[str, Any]) -> None:
    result = rasters["result"]
    m = result["metrics"]
    assert m["inputs"] == {"annotation_row": 3, "image": 3, "mask": 3} and m["quarantined"] == 0
    assert m["masks_written"] == {"total": 3, "from_raster": 3}
    out = result["ctx"].out_dir
    doc = json.loads((out / "mask_classes.json").read_text())
    classes = {c["seatizen_class"]: c["value"] for c in doc["classes"][1:]}
    assert set(classes) == {
        "Acropora_Branching",
        "Acropora_Tabular",
        "Non-acropora_Massive",
        "Living_coral",
        "Sand",
    }
    masks = {}
    for name, s in result["samples"].items():
        native = json.loads(s["native_labels"])
        assert native["raster_mask"]["colour_table"].endswith("2024_dataset/color.txt")
        path = rasters["root"] / s["mask_path"]
        img = Image.open(path)
        assert img.mode == "L" and img.size == (s["width"], s["height"])
        masks[name.split("_")[1]] = (path.read_bytes(), np.asarray(img))
    stleu, saintleu = masks["REU-stleu"], masks["REU-saintleu"]
    assert stleu[0] == saintleu[0]  # the PNG and the GeoTIFF are one mask
    assert (stleu[1] == _expected(MASKS / "annotation_mask_stleu.png", classes)).all()
    assert (saintleu[1] == _expected(MASKS / "annotation_mask_saintleu.tif", classes)).all()
    assert (masks["REU-troudeau"][1] == _expected(MASKS / "annotation_mask_troudeau.png", classes)).all()
    assert set(np.unique(masks["REU-troudeau"][1]).tolist()) == set(classes.values())


def test_a_raster_of_another_size_or_with_an_unlisted_value_is_quarantined(
    rasters: dict[str, Any], tmp_path: Path
) -> None:
    root = tmp_path / "p"
    shutil.copytree(rasters["root"], root, ignore=shutil.ignore_patterns("interim"))
    folder = root / "data" / "raw" / "seatizen" / "2024_dataset"
    stleu = next(folder.glob("annotation_mask_*stleu*.png"))
    ids = np.asarray(Image.open(stleu)).copy()
    ids[0, 0] = 9
    Image.fromarray(ids).save(stleu)
    tif = next(folder.glob("annotation_mask_*.tif"))
    Image.open(tif).crop((0, 0, 100, 100)).save(tif)
    result = ingest(root)
    bad = {q["record_id"]: q["detail"] for q in result["quarantine"] if q["record_kind"] == "mask"}
    assert set(bad) == {stleu.name, tif.name}
    assert "value 9 (1 pixels) is not in the colour table" in bad[stleu.name]
    assert "differs from the image" in bad[tif.name]
    assert result["metrics"]["samples"] == 3
    assert result["metrics"]["masks_written"] == {"total": 1, "from_raster": 1}


def test_a_broken_colour_table_refuses_only_the_masks_that_use_it(
    rasters: dict[str, Any], tmp_path: Path
) -> None:
    root = tmp_path / "p"
    shutil.copytree(rasters["root"], root, ignore=shutil.ignore_patterns("interim"))
    (root / "data" / "raw" / "seatizen" / "2024_dataset" / "color.txt").write_text("1 red green blue\n")
    result = ingest(root)
    bad = [q for q in result["quarantine"] if q["record_kind"] == "mask"]
    assert len(bad) == 3 and {q["reason"] for q in bad} == {"bad_record"}
    assert all("color.txt: line 1: expected `value R G B A`" in q["detail"] for q in bad)
    assert result["metrics"]["samples"] == 3 and result["metrics"]["masks_written"] == {"total": 0}
