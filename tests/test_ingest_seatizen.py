"""ingest@seatizen against the fetched sample record: planted cases, crosswalk, sessions, masks."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import ingest_context
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from stages.errors import UpstreamFormatError
from stages.ingest import ingest_source, seatizen, seatizen_masks
from stages.ingest.seatizen_csv import META_COLUMNS
from stages.ingest.seatizen_labels import BENTHIC_KINDS
from stages.samplegen.seatizen import LATE_CAMPAIGN, LATE_CLASSES, UNKNOWN_CLASS, session_spec

CSV_NAME = "20241016_132819_multilabel_annotations.csv"
JSON_NAME = "20241018_segmentation_annotations.json"
REPO_TABLE = Path(__file__).resolve().parents[1] / "data" / "tables" / "seatizen" / "crosswalk.csv"
KINDS = ("annotation_row", "image", "mask", "class")


# --- helpers ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Tables:
    samples: list[dict[str, Any]]
    quarantine: list[dict[str, Any]]


def run(
    root: Path, out_root: Path | None = None, jobs: int = 1, **overrides: Any
) -> tuple[Tables, dict, Any]:
    ctx = dataclasses.replace(ingest_context("seatizen", root, out_root or root, **overrides), jobs=jobs)
    metrics = ingest_source(ctx)
    out = ctx.out_dir
    tables = Tables(
        pq.read_table(out / "samples.parquet").to_pylist(),
        pq.read_table(out / "quarantine.parquet").to_pylist(),
    )
    return tables, metrics, ctx


def copy_project(fetched_root: Path, dest: Path) -> Path:
    """A writable project with the fetched Seatizen raw data, the taxonomy and the tables."""
    (dest / "data").mkdir(parents=True)
    (dest / "dvc.yaml").write_text("stages: {}\n", encoding="utf-8")
    shutil.copytree(fetched_root / "data" / "raw" / "seatizen", dest / "data" / "raw" / "seatizen")
    shutil.copytree(fetched_root / "data" / "taxonomy", dest / "data" / "taxonomy")
    shutil.copytree(fetched_root / "data" / "tables", dest / "data" / "tables")
    return dest


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))
    return rows[0], rows[1:]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    path.write_text(buf.getvalue(), encoding="utf-8")


def assert_every_input_lands_once(tables: Any, extra: dict) -> None:
    by_kind = Counter(q["record_kind"] for q in tables.quarantine)
    n_samples = len(tables.samples)
    n_masks = sum(s["mask_path"] is not None for s in tables.samples)
    assert set(by_kind) <= set(KINDS)
    assert extra["inputs"]["annotation_row"] == n_samples + by_kind["annotation_row"]
    assert extra["inputs"]["image"] == n_samples + by_kind["image"]
    assert extra["inputs"].get("mask", 0) == n_masks + by_kind["mask"]
    assert extra["inputs"].get("class", 0) == by_kind["class"]
    # and no record is quarantined twice
    keys = [(q["record_kind"], q["record_id"]) for q in tables.quarantine]
    assert len(keys) == len(set(keys))


def rle_decode_reference(counts: list[int], h: int, w: int) -> np.ndarray:
    """An independent decoder: expand alternating 0/1 runs, reshape column-major."""
    return np.repeat(np.arange(len(counts)) % 2, counts).astype(bool).reshape((h, w), order="F")


def rle_encode_reference(mask: np.ndarray) -> list[int]:
    flat = mask.reshape(-1, order="F").astype(np.int8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = int(v), 1
    counts.append(run)
    return counts


def rle_to_string_reference(counts: list[int]) -> str:
    """pycocotools' rleToString, transcribed from its C source (maskApi.c)."""
    out = []
    for i, c in enumerate(counts):
        x = c - counts[i - 2] if i > 2 else c
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = (x != -1) if ch & 0x10 else (x != 0)
            if more:
                ch |= 0x20
            out.append(chr(ch + 48))
    return "".join(out)


# --- the sample record, ingested once -----------------------------------------------------------


@pytest.fixture(scope="module")
def result(fetched_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("seatizen-out")
    tables, extra, ctx = run(fetched_root, out, jobs=2)
    samples = {s["upstream_id"]: s for s in tables.samples}
    seg = json.loads((fetched_root / "data" / "raw" / "seatizen" / JSON_NAME).read_text())
    return {"tables": tables, "extra": extra, "ctx": ctx, "out": out, "samples": samples, "segmentation": seg}


@pytest.fixture(scope="module")
def planted(sample_upstream: Path) -> dict[str, Any]:
    return json.loads((sample_upstream / "PLANTED.json").read_text())["seatizen"]


@pytest.fixture(scope="module")
def segmentation(fetched_root: Path) -> dict[str, Any]:
    return json.loads((fetched_root / "data" / "raw" / "seatizen" / JSON_NAME).read_text())


def quarantined(result: dict[str, Any], kind: str, record_id: str) -> list[str]:
    return [
        q["reason"]
        for q in result["tables"].quarantine
        if (q["record_kind"], q["record_id"]) == (kind, record_id)
    ]


def test_cross_source_copy_is_a_sample(result: dict[str, Any], planted: dict[str, Any]) -> None:
    s = result["samples"][planted["cross_source_image"]["file"]]
    assert (s["height"], s["width"]) == tuple(planted["cross_source_image"]["size_hw"])
    assert s["image_format"] == "jpeg" and s["phash"] is not None
    assert s["session"] == "20230415_REU-StLeu_SCUBA_GX010227"


def test_csv_row_without_image_is_missing_image(result: dict[str, Any], planted: dict[str, Any]) -> None:
    for name in planted["csv_row_without_image"]:
        assert name not in result["samples"]
        assert quarantined(result, "annotation_row", name) == ["missing_image"]


def test_image_without_csv_row_is_no_annotation(result: dict[str, Any], planted: dict[str, Any]) -> None:
    for name in planted["image_without_csv_row"]:
        assert name not in result["samples"]
        assert quarantined(result, "image", name) == ["no_annotation"]


def test_nothing_else_is_quarantined(result: dict[str, Any], planted: dict[str, Any]) -> None:
    q = Counter(q["reason"] for q in result["tables"].quarantine)
    assert q == {
        "missing_image": len(planted["csv_row_without_image"]),
        "no_annotation": len(planted["image_without_csv_row"]),
        "unknown_class": 1,  # the planted Algae column
    }
    assert result["extra"]["inputs"]["annotation_row"] == planted["csv_rows"]
    assert result["extra"]["inputs"]["image"] == planted["images_in_zip"]
    assert result["extra"]["inputs"]["mask"] == len(result["segmentation"]["images"]) + 1  # + the raster


EXPECTED_ODD = {  # form in the sample record -> (form of the grammar, session of its first frame)
    "country_without_place": ("still", "20190420_MYT_scuba"),
    "place_of_several_words": ("video_frame", "20221021_MUS-Le-Morne-Saint-Jacques_paddle-2_10"),
    "numbered_platform_one_token": ("still", "20210618_ATF-Europa_ASV-01"),
    "still_photos": ("still", "20150611_REU-St-Gilles_scuba"),
    "four_token_rest": ("video_frame", "20220305_SYC-Mahe_MASK_ses_2_GX030120"),
    "fits_no_rule": ("other", "odm_orthophoto"),
}


def test_odd_names_of_every_form_are_samples_grouped_by_session(
    result: dict[str, Any], planted: dict[str, Any]
) -> None:
    assert set(planted["odd_names"]) == set(EXPECTED_ODD)
    for kind, names in planted["odd_names"].items():
        form, session = EXPECTED_ODD[kind]
        for name in names:
            s = result["samples"][name]
            assert (json.loads(s["native_labels"])["name"]["form"], s["session"]) == (form, session), name
    assert result["extra"]["names"]["other"] == len(planted["odd_names"]["fits_no_rule"])
    assert result["extra"]["names"]["odd_examples"] == sorted(planted["odd_names"]["fits_no_rule"])
    mayotte = result["samples"]["20190420_MYT_scuba_DSCI1495.JPG"]
    assert (mayotte["site"], mayotte["captured_at"]) == ("MYT", "2019-04-20")


def test_the_raster_mask_attaches_through_its_colour_table(
    result: dict[str, Any], planted: dict[str, Any], fetched_root: Path
) -> None:
    case = planted["raster_mask"]
    s = result["samples"][case["image"]]
    assert s["mask_path"] == f"data/interim/seatizen/masks/{s['sample_id']}.png"
    native = json.loads(s["native_labels"])
    raw = fetched_root / "data" / "raw" / "seatizen"
    assert native["raster_mask"] == {
        "file": f"data/raw/seatizen/{case['zip_member']}",
        "colour_table": f"data/raw/seatizen/{case['colour_table']}",
    }
    doc = json.loads((result["ctx"].out_dir / "mask_classes.json").read_text())
    value = {c["seatizen_class"]: c["value"] for c in doc["classes"][1:]}
    table = {
        (int(r["red"]), int(r["green"]), int(r["blue"])): r["seatizen_class"]
        for r in csv.DictReader((REPO_TABLE.parent / "raster_classes.csv").open())
    }
    ids = np.asarray(Image.open(raw / case["zip_member"]))
    expected = np.zeros(ids.shape, dtype=np.uint8)
    for line in (raw / case["colour_table"]).read_text().splitlines():
        v, r, g, b, a = line.split()
        if v not in ("nan", "-9999") and int(a):
            expected[ids == int(v)] = value[table[(int(r), int(g), int(b))]]
    got = np.asarray(Image.open(result["out"] / s["mask_path"]))
    assert got.shape == (s["height"], s["width"]) and (got == expected).all()
    assert set(np.unique(got).tolist()) == {0, *(value[c] for c in table.values())}
    assert result["extra"]["masks_written"]["from_raster"] == 1


def test_the_unknown_class_column_is_quarantined_with_its_counts(
    result: dict[str, Any], planted: dict[str, Any]
) -> None:
    col = planted["unknown_class_column"]
    rows = [q for q in result["tables"].quarantine if q["record_kind"] == "class"]
    assert [(q["record_id"], q["reason"], Path(q["file"]).name) for q in rows] == [
        (col["name"], "unknown_class", CSV_NAME)
    ]
    assert result["extra"]["unknown_classes"] == {
        col["name"]: {"files": 1, "not_annotated": 0, "present": col["present"], "values": col["values"]}
    }


def test_inputs_equal_samples_plus_quarantine(result: dict[str, Any]) -> None:
    assert_every_input_lands_once(result["tables"], result["extra"])


def test_ids_schema_and_columns(result: dict[str, Any]) -> None:
    table = pq.read_table(result["ctx"].out_dir / "samples.parquet")
    for s in table.to_pylist():
        assert s["sample_id"].isascii() and "." not in s["sample_id"]
        assert s["sample_id"].startswith("seatizen-") and s["source"] == "seatizen"
        assert s["image_path"] == f"data/raw/seatizen/2024_dataset/{s['upstream_id']}"
        dated = s["upstream_id"][:8].isdigit()
        assert s["captured_at"] == (
            "-".join((s["upstream_id"][:4], s["upstream_id"][4:6], s["upstream_id"][6:8])) if dated else None
        )
        assert s["license"].startswith("CC-BY-4.0") and "Seatizen" in s["attribution"]
    assert seatizen.sample_id_for("20210618_ATF-Europa_ASV-00_GX024250_004.jpeg") == (
        "seatizen-20210618_ATF-Europa_ASV-00_GX024250_004_jpeg"
    )
    # names that slug alike keep distinct ids
    assert seatizen.sample_id_for("a_b.jpg") != seatizen.sample_id_for("a.b.jpg")


def test_minus_one_is_kept_as_unknown(result: dict[str, Any]) -> None:
    seen_late = 0
    for s in result["samples"].values():
        native = json.loads(s["native_labels"])
        labels = json.loads(s["labels"])
        early = native["csv"]["annotation_date"] < LATE_CAMPAIGN.isoformat()
        for cls in LATE_CLASSES:
            assert (native["multilabel"][cls] == -1) == early, (s["upstream_id"], cls)
        if early:
            seen_late += 1
            halimeda = [a for a in labels["attribute"] if a["name"] == "Halimeda"]
            assert halimeda and halimeda[0]["value"] == -1  # Algae_Halimeda is its only source
            assert labels["non_benthic"]["Waste"] == -1 and labels["non_benthic"]["Trample"] == -1
            if native["multilabel"]["Algal_Assemblage"] == 0:
                assert labels["top_level"]["Macroalgae"] == -1  # unknown, not absent
    assert seen_late > 0


def test_labels_follow_the_combination_rule(result: dict[str, Any]) -> None:
    for s in result["samples"].values():
        values = json.loads(s["native_labels"])["multilabel"]
        labels = json.loads(s["labels"])
        hard = [
            values[c]
            for c in values
            if c.startswith(("Acropora", "Non-acropora_")) or c in ("Living_coral", "Bleached_coral")
        ]
        expected = 1 if 1 in hard else (-1 if -1 in hard else 0)
        assert labels["top_level"]["Hard coral"] == expected
        acro = {
            a["growth_form_name"]: a["value"]
            for a in labels["attribute_growth_form"]
            if a["name"] == "Acropora"
        }
        assert acro == {
            "Branching": values["Acropora_Branching"],
            "Digitate": values["Acropora_Digitate"],
            "Submassive": values["Acropora_Submassive"],
            "Plates or tables": values["Acropora_Tabular"],
        }
        assert labels["image_quality"] == {"Blurred": values["Blurred"], "Useless": values["Useless"]}
        assert "Fish" in labels["non_benthic"] and "Fish" not in labels["top_level"]
        assert labels["coverage"]["mapped"] == labels["coverage"]["present"]


def test_sessions_group_consecutive_frames(result: dict[str, Any], planted: dict[str, Any]) -> None:
    samples = result["samples"]
    for s in range(planted["sessions"]):
        spec = session_spec(s)
        frames = [f for f in spec["frames"] if f in samples]
        assert len(frames) >= len(spec["frames"]) - 1
        assert {samples[f]["session"] for f in frames} == {spec["name"]}
        numbers = sorted(int(json.loads(samples[f]["native_labels"])["name"]["frame"]) for f in frames)
        assert numbers[-1] - numbers[0] < len(spec["frames"])  # consecutive video frames
        names = [json.loads(samples[f]["native_labels"])["name"] for f in frames]
        assert {(n["platform"], n["platform_number"]) for n in names} == {
            tuple(spec["platform"].split("-")) if "-" in spec["platform"] else (spec["platform"], None)
        }
    # + the cross-source session and the odd-name sessions
    assert result["extra"]["sessions"] == planted["sessions"] + 1 + len(planted["odd_names"])


def test_every_class_column_is_crosswalked(fetched_root: Path, result: dict[str, Any]) -> None:
    header, _ = read_csv(fetched_root / "data" / "raw" / "seatizen" / CSV_NAME)
    table = {r["seatizen_class"]: r for r in csv.DictReader(REPO_TABLE.open(encoding="utf-8"))}
    classes = [c for c in header if c not in META_COLUMNS and c != UNKNOWN_CLASS]
    assert classes and not [c for c in classes if c not in table]
    for name in ("Fish", "Turtle", "Homo_Sapiens", "Human_Object", "Waste", "Trample"):
        assert table[name]["kind"] == "non_benthic"
    assert {table["Blurred"]["kind"], table["Useless"]["kind"]} == {"image_quality"}
    assert (table["Acropora_Branching"]["mermaid_target"], table["Acropora_Branching"]["growth_form"]) == (
        "Acropora",
        "Branching",
    )
    cov = result["extra"]["crosswalk"]
    assert cov["total"] == sum(table[c]["kind"] in BENTHIC_KINDS for c in classes) > 0
    assert cov["mapped"] == cov["total"] and cov["ratio"] == 1.0


# --- masks --------------------------------------------------------------------------------------


def test_mask_classes_file(result: dict[str, Any], segmentation: dict[str, Any]) -> None:
    doc = json.loads((result["ctx"].out_dir / "mask_classes.json").read_text())
    cats = sorted(segmentation["categories"], key=lambda c: c["id"])
    assert [(c["value"], c["name"]) for c in doc["classes"]] == [(0, "unlabelled")] + [
        (i, c["name"]) for i, c in enumerate(cats, start=1)
    ]
    assert all(c.get("kind") for c in doc["classes"][1:])


def test_rle_annotation_rasterised_correctly(
    result: dict[str, Any], planted: dict[str, Any], segmentation: dict[str, Any]
) -> None:
    name = planted["rle_annotation_image"]
    s = result["samples"][name]
    mask = np.asarray(Image.open(result["out"] / s["mask_path"]))
    assert Image.open(result["out"] / s["mask_path"]).mode == "L"
    image = next(i for i in segmentation["images"] if i["file_name"] == name)
    h, w = image["height"], image["width"]
    assert mask.shape == (h, w) == (s["height"], s["width"])
    value = {
        c["id"]: v for v, c in enumerate(sorted(segmentation["categories"], key=lambda c: c["id"]), start=1)
    }
    anns = [a for a in segmentation["annotations"] if a["image_id"] == image["id"]]
    rle = [a for a in anns if isinstance(a["segmentation"], dict)]
    assert len(rle) == 1
    truth = rle_decode_reference(rle[0]["segmentation"]["counts"], h, w)
    assert truth.sum() == rle[0]["area"]
    # Pixels other instances may claim: their bounding boxes, a pixel wider on every side.
    others = np.zeros((h, w), dtype=bool)
    for a in anns:
        if a is not rle[0]:
            x, y, bw, bh = a["bbox"]
            others[max(0, int(y) - 1) : int(y + bh) + 2, max(0, int(x) - 1) : int(x + bw) + 2] = True
    own = truth & ~others
    assert own.sum() > 1000
    assert (mask[own] == value[rle[0]["category_id"]]).all()
    assert (mask[~truth & ~others] == 0).all()
    assert json.loads(s["native_labels"])["segmentation"]["instances"][0]["encoding"] == "rle"


def test_polygon_masks_are_non_empty_where_annotated(
    result: dict[str, Any], segmentation: dict[str, Any]
) -> None:
    value = {
        c["id"]: v for v, c in enumerate(sorted(segmentation["categories"], key=lambda c: c["id"]), start=1)
    }
    by_image: dict[int, list[dict]] = {}
    for a in segmentation["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    checked = 0
    for image in segmentation["images"]:
        s = result["samples"].get(image["file_name"])
        if s is None:
            continue
        mask = np.asarray(Image.open(result["out"] / s["mask_path"]))
        present = set(np.unique(mask).tolist())
        for a in by_image.get(image["id"], []):
            if isinstance(a["segmentation"], list):
                x, y, bw, bh = a["bbox"]
                window = mask[int(y) : int(y + bh) + 2, int(x) : int(x + bw) + 2]
                assert value[a["category_id"]] in present and (window != 0).mean() > 0.3
                checked += 1
    assert checked > 5
    assert result["extra"]["masks_written"]["total"] == sum(
        s["mask_path"] is not None for s in result["samples"].values()
    )


def test_overlap_rule_smaller_instance_wins() -> None:
    big = seatizen_masks.Instance(1, 3, "rle", (rle_encode_reference(_box(10, 10, 0, 0, 8, 8)),))
    small = seatizen_masks.Instance(2, 5, "rle", (rle_encode_reference(_box(10, 10, 2, 2, 4, 4)),))
    tie_low = seatizen_masks.Instance(7, 8, "polygon", ((0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0),))
    tie_high = seatizen_masks.Instance(9, 9, "polygon", ((0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0),))
    for order in ((big, small), (small, big)):
        out = seatizen_masks.rasterise(order, 10, 10)
        assert out[3, 3] == 5 and out[0, 7] == 3 and out[9, 9] == 0
    assert (seatizen_masks.rasterise((tie_high, tie_low), 10, 10)[:2, :2] == 9).all()


def _box(h: int, w: int, y: int, x: int, bh: int, bw: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y : y + bh, x : x + bw] = True
    return m


# --- COCO RLE decoding --------------------------------------------------------------------------


def test_compressed_rle_known_answers() -> None:
    assert seatizen_masks.rle_string_to_counts("121") == [1, 2, 1]
    counts = [3, 40, 5, 100, 2, 1]
    assert seatizen_masks.rle_string_to_counts(rle_to_string_reference(counts)) == counts
    with pytest.raises(ValueError):
        seatizen_masks.rle_counts_to_mask([1, 2], 2, 2)  # sums to 3, not 4
    with pytest.raises(ValueError):
        seatizen_masks.rle_string_to_counts("1" + chr(48 + 0x20))  # ends inside a count


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.data())
def test_rle_decoding_matches_an_independent_decoder(h: int, w: int, data: st.DataObject) -> None:
    bits = data.draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))
    mask = np.array(bits, dtype=bool).reshape(h, w)
    counts = rle_encode_reference(mask)
    assert (rle_decode_reference(counts, h, w) == mask).all()
    assert (seatizen_masks.rle_counts_to_mask(counts, h, w) == mask).all()
    compressed = rle_to_string_reference(counts)
    assert seatizen_masks.rle_string_to_counts(compressed) == counts
    inst = seatizen_masks.Instance(0, 1, "compressed_rle", (compressed,))
    assert (seatizen_masks.instance_mask(inst, h, w) == mask).all()


def test_compressed_rle_in_the_json_gives_the_same_mask(
    fetched_root: Path, tmp_path: Path, result: dict[str, Any], planted: dict[str, Any]
) -> None:
    root = copy_project(fetched_root, tmp_path / "p")
    path = root / "data" / "raw" / "seatizen" / JSON_NAME
    doc = json.loads(path.read_text())
    for a in doc["annotations"]:
        if isinstance(a["segmentation"], dict):
            a["segmentation"]["counts"] = rle_to_string_reference(a["segmentation"]["counts"])
    path.write_text(json.dumps(doc))
    tables, extra, _ = run(root)
    assert extra["masks_written"].get("compressed_rle") == 1 and "rle" not in extra["masks_written"]
    s = result["samples"][planted["rle_annotation_image"]]
    assert (root / s["mask_path"]).read_bytes() == (result["out"] / s["mask_path"]).read_bytes()


# --- determinism, bad records, format changes ---------------------------------------------------


def test_two_runs_are_byte_identical(fetched_root: Path, tmp_path: Path, result: dict[str, Any]) -> None:
    run(fetched_root, tmp_path, jobs=1)
    first, second = result["ctx"].out_dir, tmp_path / "data" / "interim" / "seatizen"
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert any(f.suffix == ".png" for f in files)
    for f in files:
        assert (first / f).read_bytes() == (second / f).read_bytes(), f


def test_bad_records_are_quarantined(fetched_root: Path, tmp_path: Path, result: dict[str, Any]) -> None:
    root = copy_project(fetched_root, tmp_path / "p")
    raw = root / "data" / "raw" / "seatizen"
    header, rows = read_csv(raw / CSV_NAME)
    on_disk = [r for r in rows if (raw / "2024_dataset" / r[0]).exists()]
    corrupt, bad_value, bad_name, dup = on_disk[0][0], on_disk[1][0], on_disk[2], on_disk[3]
    data = (raw / "2024_dataset" / corrupt).read_bytes()
    (raw / "2024_dataset" / corrupt).write_bytes(data[: len(data) // 3])
    for r in rows:
        if r[0] == bad_value:
            r[-1] = "2"
    renamed = "IMG_0001.jpg"  # fits no rule of the grammar: still an image, with a coarse session
    (raw / "2024_dataset" / bad_name[0]).rename(raw / "2024_dataset" / renamed)
    bad_name[0] = renamed
    rows.append(list(dup))
    write_csv(raw / CSV_NAME, header, rows)
    (raw / "2024_dataset" / "notes.txt").write_text("not an image")

    tables, extra, _ = run(root)
    reasons = {(q["record_kind"], q["record_id"]): q["reason"] for q in tables.quarantine}
    assert reasons[("image", corrupt)] == "corrupt_image"
    assert reasons[("annotation_row", corrupt)] == "image_unusable"
    assert reasons[("annotation_row", bad_value)] == "bad_record"
    assert reasons[("image", bad_value)] == "bad_record"
    odd = next(s for s in tables.samples if s["upstream_id"] == renamed)
    assert (odd["session"], odd["captured_at"], json.loads(odd["native_labels"])["name"]["form"]) == (
        "IMG",
        None,
        "other",
    )
    assert (
        extra["names"]["other"] == result["extra"]["names"]["other"] + 1
        and renamed in extra["names"]["odd_examples"]
    )
    assert reasons[("image", "notes.txt")] == "no_annotation"
    assert dup[0] in {s["upstream_id"] for s in tables.samples}
    dup_line = len(rows) + 1  # the appended copy: the header is line 1
    assert reasons[("annotation_row", f"{dup[0]} (line {dup_line})")] == "bad_record"
    assert_every_input_lands_once(tables, extra)


def test_names_that_all_fit_no_rule_never_abort_the_source(
    fetched_root: Path, tmp_path: Path, result: dict[str, Any]
) -> None:
    # The old rule (more than half the names unparsed -> abort) would refuse this source.
    root = copy_project(fetched_root, tmp_path / "p")
    raw = root / "data" / "raw" / "seatizen"
    header, rows = read_csv(raw / CSV_NAME)
    for r in rows:
        path = raw / "2024_dataset" / r[0]
        r[0] = r[0].replace("_", "-")
        if path.exists():
            path.rename(path.with_name(r[0]))
    write_csv(raw / CSV_NAME, header, rows)
    tables, extra, _ = run(root)
    assert len(tables.samples) == len(result["samples"])
    dated = [s for s in tables.samples if s["upstream_id"][:8].isdigit()]
    assert extra["names"]["partial"] == len(dated) == len(tables.samples) - extra["names"]["other"]
    for s in dated:  # the coarsest key that can be read: the date
        native = json.loads(s["native_labels"])["name"]
        assert (s["session"], s["captured_at"]) == (s["upstream_id"][:8], native["date"])
    assert_every_input_lands_once(tables, extra)


def test_unknown_class_column_is_quarantined_and_the_rest_ingested(
    fetched_root: Path, tmp_path: Path, result: dict[str, Any]
) -> None:
    root = copy_project(fetched_root, tmp_path / "p")
    raw = root / "data" / "raw" / "seatizen"
    header, rows = read_csv(raw / CSV_NAME)
    write_csv(raw / CSV_NAME, [*header, "Seahorse"], [[*r, str(i % 2)] for i, r in enumerate(rows)])
    tables, extra, _ = run(root)
    unknown = [
        q for q in tables.quarantine if q["record_kind"] == "class" and q["record_id"] != UNKNOWN_CLASS
    ]
    assert [(q["record_id"], q["reason"], Path(q["file"]).name) for q in unknown] == [
        ("Seahorse", "unknown_class", CSV_NAME)
    ]
    assert "'Seahorse'" in unknown[0]["detail"] and "crosswalk.csv" in unknown[0]["detail"]
    present = sum(i % 2 for i in range(len(rows)))
    assert extra["unknown_classes"]["Seahorse"] == {
        "files": 1,
        "not_annotated": 0,
        "present": present,
        "values": len(rows),
    }
    assert len(tables.samples) == len(result["samples"])
    for s in tables.samples:
        before = result["samples"][s["upstream_id"]]
        assert s["labels"] == before["labels"]  # the unknown column's values are not in the labels
        assert "Seahorse" in json.loads(s["native_labels"])["multilabel"]
    assert_every_input_lands_once(tables, extra)


def test_crosswalk_target_missing_from_taxonomy_fails(fetched_root: Path, tmp_path: Path) -> None:
    root = copy_project(fetched_root, tmp_path / "p")
    table = root / "data" / "tables" / "seatizen" / "crosswalk.csv"
    table.write_text(
        table.read_text().replace(
            "Sponges,benthic attribute,Porifera", "Sponges,benthic attribute,Spongiform"
        )
    )
    with pytest.raises(UpstreamFormatError, match=r"crosswalk\.csv.*'Spongiform' is not in the taxonomy"):
        run(root)


def test_unmapped_benthic_class_lowers_coverage(fetched_root: Path, tmp_path: Path) -> None:
    root = copy_project(fetched_root, tmp_path / "p")
    table = root / "data" / "tables" / "seatizen" / "crosswalk.csv"
    table.write_text(
        table.read_text().replace("Dead_coral,top-level category,Bare substrate,", "Dead_coral,unmapped,,")
    )
    tables, extra, _ = run(root)
    cov = extra["crosswalk"]
    assert cov["mapped"] == cov["total"] - 1
    dead = [s for s in tables.samples if json.loads(s["native_labels"])["multilabel"]["Dead_coral"] == 1]
    assert dead and all(json.loads(s["labels"])["coverage"]["ratio"] < 1 for s in dead)


@pytest.mark.parametrize(
    ("target", "edit", "expected"),
    [
        ("csv", lambda t: t.replace("FileName,", "filename,", 1), r"expected columns FileName"),
        ("json", lambda t: t.replace('"annotations"', '"instances"', 1), r"expected a COCO object"),
    ],
)
def test_format_change_fails_naming_the_file(
    fetched_root: Path, tmp_path: Path, target: str, edit: Any, expected: str
) -> None:
    root = copy_project(fetched_root, tmp_path / "p")
    path = root / "data" / "raw" / "seatizen" / (CSV_NAME if target == "csv" else JSON_NAME)
    path.write_text(edit(path.read_text()))
    with pytest.raises(UpstreamFormatError, match=expected) as err:
        run(root)
    assert path.name in str(err.value)


def test_mask_size_mismatch_quarantines_the_mask(
    fetched_root: Path, tmp_path: Path, segmentation: dict
) -> None:
    root = copy_project(fetched_root, tmp_path / "p")
    path = root / "data" / "raw" / "seatizen" / JSON_NAME
    doc = json.loads(path.read_text())
    victim = next(
        i
        for i in doc["images"]
        if not any(
            isinstance(a["segmentation"], dict) for a in doc["annotations"] if a["image_id"] == i["id"]
        )
    )
    victim["width"] += 1
    doc["images"].append(
        {**doc["images"][0], "id": 999999, "file_name": "20990101_XXX-Nowhere_ASV_GX1_001.jpg"}
    )
    path.write_text(json.dumps(doc))
    tables, extra, _ = run(root)
    masks = {
        q["record_id"].split(" ")[0]: q["reason"] for q in tables.quarantine if q["record_kind"] == "mask"
    }
    assert masks == {
        victim["file_name"]: "bad_record",
        "20990101_XXX-Nowhere_ASV_GX1_001.jpg": "missing_image",
    }
    assert next(s for s in tables.samples if s["upstream_id"] == victim["file_name"])["mask_path"] is None
    assert_every_input_lands_once(tables, extra)


def _polygon_image(doc: dict) -> tuple[dict, list[dict]]:
    """An entry whose instances are all polygons, and its annotations."""
    for image in doc["images"]:
        anns = [a for a in doc["annotations"] if a["image_id"] == image["id"]]
        if anns and all(isinstance(a["segmentation"], list) for a in anns):
            return image, anns
    raise AssertionError("no polygon-only image in the sample record")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda seg: [[1e300, 5.0, 10.0, 5.0, 10.0, 10.0]], "polygon vertex (1e+300, 5) lies far outside"),
        (lambda seg: [[5.0, -1e300, 10.0, 5.0, 10.0, 10.0]], "lies far outside"),
        (lambda seg: {"size": [1, 1], "counts": [1]}, "RLE size [1, 1] differs"),
        (lambda seg: {"size": None, "counts": ["x"]}, "RLE size"),
        (lambda seg: [[1.0, "a", 3.0, 4.0, 5.0, 6.0]], "not a list of finite numbers"),
    ],
)
def test_a_bad_annotation_quarantines_its_mask_not_the_source_and_paints_nothing(
    fetched_root: Path, tmp_path: Path, result: dict[str, Any], edit: Any, expected: str
) -> None:
    root = copy_project(fetched_root, tmp_path / "p")
    path = root / "data" / "raw" / "seatizen" / JSON_NAME
    doc = json.loads(path.read_text())
    image, anns = _polygon_image(doc)
    anns[0]["segmentation"] = edit(anns[0]["segmentation"])
    path.write_text(json.dumps(doc))
    tables, extra, _ = run(root)
    masks = [q for q in tables.quarantine if q["record_kind"] == "mask"]
    assert [(q["record_id"], q["reason"]) for q in masks] == [
        (f"{image['file_name']} (image id {image['id']})", "bad_record")
    ]
    assert expected in masks[0]["detail"] and f"annotation {anns[0]['id']}" in masks[0]["detail"]
    sample = next(s for s in tables.samples if s["upstream_id"] == image["file_name"])
    assert sample["mask_path"] is None and json.loads(sample["native_labels"])["segmentation"] is None
    # Every other mask is the one a clean build makes.
    for s in tables.samples:
        if s["mask_path"] is not None:
            before = result["samples"][s["upstream_id"]]
            assert (root / s["mask_path"]).read_bytes() == (result["out"] / before["mask_path"]).read_bytes()
    assert extra["masks_written"]["total"] == result["extra"]["masks_written"]["total"] - 1
    assert_every_input_lands_once(tables, extra)


def test_a_field_over_the_csv_module_limit_is_a_bad_record_not_a_crash(
    fetched_root: Path, tmp_path: Path, result: dict[str, Any]
) -> None:
    root = copy_project(fetched_root, tmp_path / "p")
    raw = root / "data" / "raw" / "seatizen"
    header, rows = read_csv(raw / CSV_NAME)
    victim = next(r for r in rows if r[0] in result["samples"])
    victim[header.index("relative_file_path")] = "x" * (csv.field_size_limit() + 10)
    write_csv(raw / CSV_NAME, header, rows)
    tables, extra, _ = run(root)
    line = rows.index(victim) + 2
    bad = [q for q in tables.quarantine if q["record_kind"] == "annotation_row"]
    assert [(q["record_id"], q["reason"]) for q in bad if q["reason"] == "bad_record"] == [
        (f"line {line}", "bad_record")
    ]
    assert (
        "longer than the CSV field limit" in next(q for q in bad if q["reason"] == "bad_record")["detail"]
    )
    assert victim[0] not in {s["upstream_id"] for s in tables.samples}
    assert len(tables.samples) == len(result["samples"]) - 1
    assert extra["inputs"]["annotation_row"] == len(rows)
    assert_every_input_lands_once(tables, extra)


def test_an_unbalanced_quote_quarantines_every_line_it_swallows(fetched_root: Path, tmp_path: Path) -> None:
    root = copy_project(fetched_root, tmp_path / "p")
    raw = root / "data" / "raw" / "seatizen"
    text = (raw / CSV_NAME).read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    lines[3] = lines[3].replace(",", ',"', 1)  # line 4 opens a quote nothing closes
    (raw / CSV_NAME).write_text("".join(lines), encoding="utf-8")
    tables, extra, _ = run(root)
    bad = [q for q in tables.quarantine if q["reason"] == "bad_record"]
    span = f"lines 4-{len(lines)}"
    assert [q["record_id"] for q in bad] == [f"line {n}" for n in range(4, len(lines) + 1)]
    assert all(q["detail"].startswith(f"{span}: one record spans several lines") for q in bad)
    assert extra["inputs"]["annotation_row"] == len(lines) - 1  # every data line is counted
    before = [line.split(",", 1)[0] for line in lines[1:3]]
    assert {s["upstream_id"] for s in tables.samples} == {
        n for n in before if (raw / "2024_dataset" / n).exists()
    }
    assert_every_input_lands_once(tables, extra)


def test_a_header_only_csv_fails_loudly(fetched_root: Path, tmp_path: Path) -> None:
    root = copy_project(fetched_root, tmp_path / "p")
    path = root / "data" / "raw" / "seatizen" / CSV_NAME
    path.write_text(path.read_text(encoding="utf-8").splitlines()[0] + "\n\n", encoding="utf-8")
    with pytest.raises(
        UpstreamFormatError, match=rf"{CSV_NAME}: header only: the annotation CSV has no data rows"
    ):
        run(root)


def test_names_are_compared_in_nfc(fetched_root: Path, tmp_path: Path) -> None:
    root = copy_project(fetched_root, tmp_path / "p")
    raw = root / "data" / "raw" / "seatizen"
    header, rows = read_csv(raw / CSV_NAME)
    victim = next(r for r in rows if (raw / "2024_dataset" / r[0]).exists())
    name = unicodedata.normalize("NFC", "20240101_REU-Étang-Salé_scuba_G0001234.JPG")
    (raw / "2024_dataset" / victim[0]).rename(raw / "2024_dataset" / unicodedata.normalize("NFD", name))
    victim[0] = name  # the CSV says NFC, the file system holds NFD (as macOS writes it)
    write_csv(raw / CSV_NAME, header, rows)
    tables, extra, _ = run(root)
    sample = next(s for s in tables.samples if s["upstream_id"] == name)
    assert sample["image_path"].endswith(unicodedata.normalize("NFD", name))
    assert sample["site"] == "REU-Étang-Salé" and sample["session"] == "20240101_REU-Étang-Salé_scuba"
    assert sample["sample_id"].isascii() and "." not in sample["sample_id"]
    assert not [q for q in tables.quarantine if q["record_id"] in (name, unicodedata.normalize("NFD", name))]
    assert_every_input_lands_once(tables, extra)


def test_the_segmentation_json_is_read_as_a_stream(tmp_path: Path) -> None:
    """Peak Python memory while reading a 40 MB JSON stays far below its size (json.load would
    hold all of it, several times over, as Python objects)."""
    import tempfile
    import tracemalloc

    n, ring = 400, [float(v) for v in np.round(np.random.default_rng(0).uniform(10, 90, 4000), 3)]
    path = tmp_path / "seg.json"
    with path.open("w") as fh:
        fh.write('{"categories":[{"id":1,"name":"Sand"}],"images":[')
        fh.write(",".join(f'{{"id":{i},"file_name":"f{i}.jpg","width":100,"height":100}}' for i in range(n)))
        fh.write('],"annotations":[')
        fh.write(
            ",".join(f'{{"id":{i},"image_id":{i},"category_id":1,"segmentation":[{ring}]}}' for i in range(n))
        )
        fh.write("]}")
    size = path.stat().st_size
    assert size > 10_000_000
    with tempfile.TemporaryFile() as spill:
        tracemalloc.start()
        seg = seatizen_masks.read_segmentation(path, lambda name: name, spill)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert seg.annotations == n and all(len(i.refs) == 1 for i in seg.images)
        blob = seg.instances(seg.images[7])
    assert peak < size / 10, (peak, size)
    (inst,) = seatizen_masks.instances_from_blob(blob)
    assert inst.annotation_id == 7 and inst.value == 1 and list(inst.data[0]) == ring


# --- property: whatever is removed, duplicated or broken, every input lands exactly once ----------


@pytest.fixture(scope="module")
def pristine(fetched_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_project(fetched_root, tmp_path_factory.mktemp("seatizen-pristine") / "p")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_property_inputs_equal_samples_plus_quarantine(pristine: Path, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory(prefix="seatizen-prop-") as tmp:
        root = Path(tmp) / "p"
        shutil.copytree(pristine, root)
        raw = root / "data" / "raw" / "seatizen"
        header, rows = read_csv(raw / CSV_NAME)
        images = sorted(
            p.name
            for p in (raw / "2024_dataset").iterdir()
            if p.name != "color.txt" and not p.name.startswith("annotation_mask_")
        )
        n = len(rows)
        idx = st.integers(0, n - 1)
        drop_rows = data.draw(st.sets(idx, max_size=4))
        dup_rows = data.draw(st.sets(idx, max_size=3))
        bad_values = data.draw(st.sets(idx, max_size=3))
        bad_names = data.draw(st.sets(idx, max_size=3))
        drop_images = data.draw(st.sets(st.sampled_from(images), max_size=4))
        broken_images = data.draw(st.sets(st.sampled_from(images), max_size=3))
        for name in drop_images:
            (raw / "2024_dataset" / name).unlink()
        for name in broken_images - drop_images:
            (raw / "2024_dataset" / name).write_bytes(b"" if len(name) % 2 else b"\xff\xd8 broken")
        new_rows = []
        for i, r in enumerate(rows):
            r = list(r)
            if i in bad_values:
                r[4] = "yes"
            if i in bad_names:
                r[0] = f"frame{i}.jpg"
            if i not in drop_rows:
                new_rows.append(r)
            if i in dup_rows:
                new_rows.append(list(r))
        write_csv(raw / CSV_NAME, header, new_rows)
        tables, extra, _ = run(root)
        assert extra["inputs"]["annotation_row"] == len(new_rows)
        assert extra["inputs"]["image"] == len(images) - len(drop_images)
        assert_every_input_lands_once(tables, extra)
        broken = {q["record_id"] for q in tables.quarantine if q["reason"] in ("corrupt_image", "empty_file")}
        assert broken <= broken_images
