"""ingest@coralnet on the fetched sample upstream (a bucket-style export, a full local export and one
laid out as CoralNet-Toolbox writes it): every planted case lands where PLANTED.json says, nothing
is lost, outputs are stable, and a changed or broken export fails loudly (or is quarantined whole
when ingest.on_bad_export says so). Hand-made exports cover what the sample upstream cannot plant
(they run through the same `ingest_source` entry point as the stage)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import unicodedata
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import ingest_context
from PIL import Image

from stages.errors import UpstreamFormatError
from stages.ingest import ingest_source
from stages.schema import make_sample_id

EXPORTS = ("s1073", "s2012", "s3120")


def run(ctx) -> dict:
    return ingest_source(ctx)


def read(out_dir: Path, name: str) -> list[dict]:
    return pq.read_table(out_dir / f"{name}.parquet").to_pylist()


def load(ctx, metrics: dict) -> dict:
    return {
        "ctx": ctx,
        "metrics": metrics,
        "samples": {s["upstream_id"]: s for s in read(ctx.out_dir, "samples")},
        "points": read(ctx.out_dir, "points"),
        "quarantine": read(ctx.out_dir, "quarantine"),
    }


@pytest.fixture(scope="module")
def planted(sample_upstream: Path) -> dict:
    return json.loads((sample_upstream / "PLANTED.json").read_text())["reef"]


@pytest.fixture(scope="module")
def result(fetched_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    ctx = ingest_context("coralnet", fetched_root, out_root=tmp_path_factory.mktemp("coralnet-out"))
    return load(ctx, run(ctx))


@pytest.fixture(scope="module")
def lowest(fetched_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    ctx = ingest_context(
        "coralnet",
        fetched_root,
        out_root=tmp_path_factory.mktemp("coralnet-lowest"),
        ingest__ambiguous_mapping="lowest_mapping_id",
    )
    return load(ctx, run(ctx))


def csv_rows(fetched_root: Path, export: str) -> list[dict[str, str]]:
    data = (fetched_root / "data/raw/coralnet" / export / "annotations.csv").read_bytes()
    text = data.decode("utf-8", errors="surrogateescape")
    return list(csv.DictReader(io.StringIO(text, newline="")))


def sample_id(export: str, key: str) -> str:
    return make_sample_id("coralnet", export, key)


def rows_of(result: dict, export: str, key: str) -> tuple[list[dict], list[dict]]:
    """(points, quarantined point rows) of one image."""
    sid = sample_id(export, key)
    points = [p for p in result["points"] if p["sample_id"] == sid]
    quarantined = [
        q
        for q in result["quarantine"]
        if q["record_kind"] == "point" and q["record_id"].startswith(sid + "-")
    ]
    return points, quarantined


def test_inputs_equal_samples_plus_quarantine(result, planted, fetched_root):
    m, q = result["metrics"], result["quarantine"]
    kinds = Counter(r["record_kind"] for r in q)
    assert set(kinds) <= {"image", "point", "file"}
    assert m["inputs"]["image"] == m["samples"] + kinds["image"]
    assert m["inputs"]["point"] == m["points"] + kinds["point"]
    assert m["inputs"]["file"] == kinds["file"]
    assert m["inputs"]["export"] == len(EXPORTS) and m["bad_exports"] == {}
    assert m["inputs"]["point"] == sum(planted["coralnet"][e]["rows"] for e in EXPORTS)
    for export in EXPORTS:
        info = planted["coralnet"][export]
        stats = m["exports"][export]
        assert (stats["rows"], stats["images"]) == (info["rows"], info["images"])
        assert len(csv_rows(fetched_root, export)) == info["rows"]
    # Every data row lands exactly once: as a point or as a quarantine row with its id.
    landed = Counter(p["point_id"] for p in result["points"])
    landed.update(r["record_id"] for r in q if r["record_kind"] == "point")
    assert sum(landed.values()) == m["inputs"]["point"] and max(landed.values()) == 1


def test_zero_byte_jpeg_is_empty_file(result, planted):
    case = planted["coralnet"]["s2012"]["zero_byte_jpeg"]
    key = str(case["image_id"])
    image_rows = [
        r for r in result["quarantine"] if r["record_kind"] == "image" and r["record_id"] == f"s2012/{key}"
    ]
    assert [r["reason"] for r in image_rows] == ["empty_file"]
    assert image_rows[0]["file"] == f"data/raw/coralnet/s2012/images/{key}.jpg"
    points, quarantined = rows_of(result, "s2012", key)
    assert points == [] and f"s2012/{key}" not in result["samples"]
    assert len(quarantined) == case["rows"]
    assert {q["reason"] for q in quarantined} == {"image_unusable"}
    assert all("empty_file" in q["detail"] for q in quarantined)


def test_png_upload_found_by_image_id(result, planted):
    case = planted["coralnet"]["s2012"]["png_image"]
    sample = result["samples"][f"s2012/{case['image_id']}"]
    assert sample["image_format"] == "png" and sample["pixel_sha256"]
    assert sample["image_path"].endswith(f"images/{case['image_id']}.png")
    assert sample["n_points"] == case["rows"]


def test_status_rows_are_unconfirmed(result, planted):
    s2012 = planted["coralnet"]["s2012"]
    case = s2012["status_mix"]
    points, quarantined = rows_of(result, "s2012", str(case["image_id"]))
    assert len(points) == case["status_counts"]["Confirmed"]
    assert len(quarantined) == case["rows"] - case["status_counts"]["Confirmed"]
    assert {q["reason"] for q in quarantined} == {"unconfirmed_annotation"}
    unconfirmed = [
        q
        for q in result["quarantine"]
        if q["reason"] == "unconfirmed_annotation" and q["file"].endswith("s2012/annotations.csv")
    ]
    assert len(unconfirmed) == s2012["not_confirmed_rows"]
    m = result["metrics"]["unconfirmed"]
    assert {k.removeprefix("status "): v for k, v in m.items() if k.startswith("status ")} == {
        k: v for k, v in s2012["status_counts"].items() if k != "Confirmed"
    }


def test_robot_rows_are_unconfirmed(result, planted):
    s1073 = planted["coralnet"]["s1073"]
    case = s1073["robot_rows"]
    points, quarantined = rows_of(result, "s1073", case["name"])
    assert len(points) == case["annotator_counts"]["human"]
    assert len(quarantined) == case["annotator_counts"]["robot"]
    assert all(q["reason"] == "unconfirmed_annotation" and "robot" in q["detail"] for q in quarantined)
    robot = [
        q
        for q in result["quarantine"]
        if q["reason"] == "unconfirmed_annotation" and q["file"].endswith("s1073/annotations.csv")
    ]
    assert len(robot) == s1073["robot_row_count"] == result["metrics"]["unconfirmed"]["robot"]


def test_imported_rows_are_kept(result, planted):
    s1073 = planted["coralnet"]["s1073"]
    case = s1073["imported_rows"]
    points, quarantined = rows_of(result, "s1073", case["name"])
    assert len(points) == case["rows"] and quarantined == []
    native = json.loads(result["samples"][f"s1073/{case['name']}"]["native_labels"])
    assert {p["annotator"] for p in native["points"]} == {"Imported"}
    assert all("machine_suggestions" not in p for p in native["points"])
    assert result["metrics"]["imported_rows_kept"] == s1073["imported_row_count"]


def test_duplicate_points(result, planted, fetched_root):
    case = planted["coralnet"]["s1073"]["duplicate_points"]
    points, quarantined = rows_of(result, "s1073", case["name"])
    dups = {(q["record_id"].rsplit("-r", 1)[1]): q for q in quarantined if q["reason"] == "duplicate_point"}
    assert len(dups) == len(case["same_label"]) + len(case["different_label"])
    for same in case["same_label"]:
        q = dups[f"{same['row']}-c{same['col']}-dup1"]
        assert "same label" in q["detail"]
    for diff in case["different_label"]:
        q = dups[f"{diff['row']}-c{diff['col']}-dup1"]
        assert "different label" in q["detail"]
        kept = [p for p in points if (p["row"], p["col"]) == (diff["row"], diff["col"])]
        at = [
            r["Label ID"]
            for r in csv_rows(fetched_root, "s1073")
            if (r["Name"], r["Row"], r["Column"]) == (case["name"], str(diff["row"]), str(diff["col"]))
        ]
        assert sorted(int(x) for x in at) == diff["label_ids"]
        assert [p["source_label_id"] for p in kept] == [at[0]]  # the first row in file order wins
    assert len(points) == case["rows"] - len(dups)
    assert len({p["point_id"] for p in points}) == len(points)
    assert result["metrics"]["duplicates"] == {
        "same_label": len(case["same_label"]),
        "different_label": len(case["different_label"]),
    }


def test_points_outside_under_the_share_quarantine_only_them(result, planted):
    case = planted["coralnet"]["s1073"]["points_outside"]
    assert " " in case["name"] and len(case["outside"]) / case["rows"] <= 0.05
    sample = result["samples"][f"s1073/{case['name']}"]
    assert sample["image_path"] == f"data/raw/coralnet/s1073/images/{case['name']}"
    assert sample["sample_id"].isascii() and " " not in sample["sample_id"] and "." not in sample["sample_id"]
    assert (sample["width"], sample["height"]) == (case["width"], case["height"])
    points, quarantined = rows_of(result, "s1073", case["name"])
    outside = [q for q in quarantined if q["reason"] == "point_outside_image"]
    expected = {f"{sample['sample_id']}-r{o['row']}-c{o['col']}" for o in case["outside"]}
    assert {q["record_id"] for q in outside} == expected
    assert any(o["col"] < 0 or o["row"] < 0 for o in case["outside"])
    assert len(points) == sample["n_points"] == case["rows"] - len(case["outside"])


def test_geometry_mismatch_quarantines_the_image_and_all_its_points(result, planted):
    case = planted["coralnet"]["s2012"]["geometry_mismatch"]
    key = str(case["image_id"])
    assert case["outside"] / case["rows"] > 0.05
    assert f"s2012/{key}" not in result["samples"]
    image_rows = [
        r for r in result["quarantine"] if r["record_kind"] == "image" and r["record_id"] == f"s2012/{key}"
    ]
    assert [r["reason"] for r in image_rows] == ["geometry_mismatch"]
    assert f"{case['outside']} of {case['rows']} points" in image_rows[0]["detail"]
    points, quarantined = rows_of(result, "s2012", key)
    assert points == [] and len(quarantined) == case["rows"]
    assert {q["reason"] for q in quarantined} == {"geometry_mismatch"}


def test_planted_labels_quarantine_by_default(result, planted):
    api = planted["mermaid_api"]["labels"]
    for export, key in (("s1073", "name"), ("s2012", "image_id")):
        case = planted["coralnet"][export]["planted_labels"]
        points, quarantined = rows_of(result, export, str(case[key]))
        by_reason = Counter(q["reason"] for q in quarantined)
        by_count = case["rows_by_label_id"]
        unmapped = by_count[str(api["unmapped"]["label_id"])] + by_count[str(api["null_mapping"]["label_id"])]
        assert by_reason == {
            "unmapped_label": unmapped,
            "ambiguous_mapping": by_count[str(api["ambiguous"]["label_id"])],
        }
        null_rows = [q for q in quarantined if f"Label ID {api['null_mapping']['label_id']} " in q["detail"]]
        assert null_rows and all("null benthic attribute" in q["detail"] for q in null_rows)
        assert all(
            all(mid in q["detail"] for mid in api["ambiguous"]["mapping_ids"])
            for q in quarantined
            if q["reason"] == "ambiguous_mapping"
        )
        assert len(points) == case["rows"] - sum(by_count.values())
    amb = result["metrics"]["ambiguous_mapping"]
    assert amb["policy"] == "quarantine" and amb["labels"] == 1 and amb["labels_decided"] == 0


def test_lowest_mapping_id_resolves_the_ambiguous_label(lowest, planted, fetched_root):
    api = planted["mermaid_api"]["labels"]
    label = str(api["ambiguous"]["label_id"])
    mappings = json.loads((fetched_root / "data/taxonomy/labelmappings.json").read_text())
    candidates = [m for m in mappings if m["provider"] == "CoralNet" and m["provider_id"] == label]
    chosen = min(candidates, key=lambda m: m["id"])
    assert chosen["id"] == min(api["ambiguous"]["mapping_ids"])
    decided = [p for p in lowest["points"] if p["source_label_id"] == label]
    n_rows = sum(
        planted["coralnet"][e]["planted_labels"]["rows_by_label_id"][label] for e in ("s1073", "s2012")
    )
    assert len(decided) == n_rows
    assert {p["benthic_attribute_id"] for p in decided} == {chosen["benthic_attribute_id"]}
    assert not [q for q in lowest["quarantine"] if q["reason"] == "ambiguous_mapping"]
    amb = lowest["metrics"]["ambiguous_mapping"]
    assert amb["policy"] == "lowest_mapping_id" and "lowest" in amb["rule"]
    assert amb["labels_decided"] == 1 and amb["points_decided"] == n_rows
    assert amb["decisions"] == {label: chosen["id"]}
    # Unmapped labels stay quarantined whatever the ambiguity policy.
    unmapped = [
        q for q in lowest["quarantine"] if q["reason"] == "unmapped_label" and "Label ID" in q["detail"]
    ]
    assert len(unmapped) == result_unmapped(planted)


def result_unmapped(planted: dict) -> int:
    api = planted["mermaid_api"]["labels"]
    ids = (str(api["unmapped"]["label_id"]), str(api["null_mapping"]["label_id"]))
    return sum(
        planted["coralnet"][e]["planted_labels"]["rows_by_label_id"][i]
        for e in ("s1073", "s2012")
        for i in ids
    )


def test_multiline_comments_survive_into_native_labels(result, planted, fetched_root):
    s1073 = planted["coralnet"]["s1073"]
    raw = {}
    for row in csv_rows(fetched_root, "s1073"):
        raw.setdefault(row["Name"], row)
    assert s1073["multiline_comment_images"]
    for name in s1073["multiline_comment_images"]:
        native = json.loads(result["samples"][f"s1073/{name}"]["native_labels"])
        comment = native["metadata"]["Comments"]
        assert "\n" in comment and comment == raw[name]["Comments"]
    assert "DSC_4411.JPG" in s1073["multiline_comment_images"]
    stats = result["metrics"]["exports"]["s1073"]
    # Physical lines = header + one per record + the extra lines of the multi-line comments.
    extra_lines = sum(r["Comments"].count("\n") for r in csv_rows(fetched_root, "s1073"))
    assert stats["multiline_records"] == s1073["multiline_comment_rows"]
    assert stats["physical_lines"] == 1 + stats["rows"] + extra_lines + stats["blank_lines"]


def test_native_metadata_and_sample_columns(result, fetched_root):
    raw = {}
    for row in csv_rows(fetched_root, "s1073"):
        raw.setdefault(row["Name"], row)
    for upstream_id, s in result["samples"].items():
        assert s["sample_id"].isascii() and "." not in s["sample_id"]
        native = json.loads(s["native_labels"])
        assert native["export"] == upstream_id.split("/")[0]
        if not upstream_id.startswith("s1073/"):
            assert native["metadata"] == {} and s["captured_at"] is None and s["site"] is None
            continue
        src = raw[native["image"]["Name"]]
        columns = list(src)
        before_row = columns[: columns.index("Row")]
        assert native["metadata"] == {k: src[k] for k in before_row if k != "Name" and src[k] != ""}
        assert "Row" not in native["metadata"] and "Name" not in native["metadata"]
        assert s["captured_at"] == (src["Date"] or None)
        assert s["site"] == f"s1073/{src['Site']}"  # params.yaml: sources.coralnet.site_columns: [Site]
        if src["Latitude"] and src["Longitude"]:
            assert (s["lat"], s["lon"]) == (float(src["Latitude"]), float(src["Longitude"]))
        else:
            assert s["lat"] is None and s["lon"] is None
        labels = json.loads(s["labels"])
        assert labels["n_points"] == s["n_points"] == len(native["points"])
    exports = result["metrics"]["exports"]
    assert exports["s1073"]["site_columns"] == ["Site"] and exports["s2012"]["site_columns_missing"] == [
        "Site"
    ]


def test_labels_json_matches_points(result):
    by_sample: dict[str, list[dict]] = {}
    for p in result["points"]:
        by_sample.setdefault(p["sample_id"], []).append(p)
    for s in result["samples"].values():
        labels = json.loads(s["labels"])
        mine = by_sample.get(s["sample_id"], [])
        assert labels["n_points"] == len(mine)
        assert {k: v["count"] for k, v in labels["benthic_attributes"].items()} == dict(
            Counter(p["benthic_attribute_id"] for p in mine)
        )
        assert {k: v["count"] for k, v in labels["top_level_categories"].items()} == dict(
            Counter(p["top_level_category"] for p in mine)
        )
        for v in labels["top_level_categories"].values():
            assert v["cover"] == pytest.approx(v["count"] / len(mine))


def test_crosswalk_and_class_metrics(result):
    m = result["metrics"]
    cw = m["crosswalk"]
    q = Counter(r["reason"] for r in result["quarantine"] if r["record_kind"] == "point")
    # Looked up: every row that got past the row checks and duplicates; mapped ones were later
    # kept, or lost with their image or their position.
    assert cw["total"] - cw["mapped"] == q["unmapped_label"] + q["ambiguous_mapping"]
    assert (
        cw["mapped"] == m["points"] + q["image_unusable"] + q["point_outside_image"] + q["geometry_mismatch"]
    )
    assert cw["ratio"] == round(cw["mapped"] / cw["total"], 6)
    assert sum(m["classes"]["benthic_attribute"].values()) == m["points"]
    assert sum(m["classes"]["top_level_category"].values()) == m["points"]


def test_cross_source_scene_hashes_are_close(result, planted, fetched_root, tmp_path):
    ctx = ingest_context("mermaid", fetched_root, out_root=tmp_path)
    ingest_source(ctx)
    mermaid_scene = next(
        s
        for s in pq.read_table(ctx.out_dir / "samples.parquet").to_pylist()
        if s["upstream_id"] == planted["mermaid"]["cross_source_scene"]["image_id"]
    )
    case = planted["coralnet"]["s1073"]["cross_source_scene"]
    coralnet_scene = result["samples"][f"s1073/{case['name']}"]
    assert coralnet_scene["image_format"] == "jpeg" and mermaid_scene["image_format"] == "png"
    assert coralnet_scene["file_sha256"] != mermaid_scene["file_sha256"]
    assert bin(coralnet_scene["phash"] ^ mermaid_scene["phash"]).count("1") <= 6
    # ...and no other pair of the two sources is that close.
    others = [s["phash"] for s in result["samples"].values() if s is not coralnet_scene]
    assert min(bin(h ^ mermaid_scene["phash"]).count("1") for h in others) > 10


def test_stable_bytes_and_independent_of_jobs(result, tmp_path):
    ctx = replace(result["ctx"], out_dir=tmp_path / "again", jobs=1)
    assert run(ctx) == result["metrics"]
    for name in ("samples", "points", "quarantine"):
        assert (ctx.out_dir / f"{name}.parquet").read_bytes() == (
            result["ctx"].out_dir / f"{name}.parquet"
        ).read_bytes(), name


# --- the CoralNet-Toolbox-style export of the sample upstream ------------------------------------


def test_toolbox_export_legacy_label_and_pandas_labelset(result, planted):
    info = planted["coralnet"]["s3120"]
    stats = result["metrics"]["exports"]["s3120"]
    assert stats["label_columns"] == ["Label"] and stats["key_column"] == "Name"
    assert stats["labelset"] == "data/raw/coralnet/s3120/label_set.csv"
    assert result["metrics"]["exports"]["s1073"]["labelset"] == "data/raw/coralnet/s1073/labelset.csv"
    kept = [p for p in result["points"] if p["sample_id"].startswith("coralnet-s3120-")]
    assert kept and all(p["source_label_id"] and p["source_label"] for p in kept)
    case = info["unmapped_code"]
    points, quarantined = rows_of(result, "s3120", case["name"])
    unmapped = [q for q in quarantined if q["reason"] == "unmapped_label"]
    assert len(unmapped) == case["code_rows"] and len(points) == case["rows"] - case["code_rows"]
    assert all("'Review' is not in label_set.csv" in q["detail"] for q in unmapped)


def test_one_stray_byte_is_one_encoding_error_row(result, planted):
    case = planted["coralnet"]["s3120"]["encoding_error"]
    bad = [q for q in result["quarantine"] if q["reason"] == "encoding_error"]
    assert [(q["record_id"], q["file"]) for q in bad] == [
        (f"s3120/line{case['line']}", "data/raw/coralnet/s3120/annotations.csv")
    ]
    assert (
        f"line {case['line']}: byte 0x{case['byte']:02X}" in bad[0]["detail"] and "utf-8" in bad[0]["detail"]
    )
    assert result["samples"][f"s3120/{case['name']}"]["n_points"] == case["rows"] - 1
    assert result["metrics"]["exports"]["s3120"]["encoding"] == "utf-8"
    # The rest of the file is read as UTF-8, not as mojibake.
    texts = [s["native_labels"] for s in result["samples"].values()]
    assert not any("Ã" in t or "\ufffd" in t for t in texts)


def test_names_are_compared_in_nfc(result, planted):
    case = planted["coralnet"]["s3120"]["nfd_name"]
    assert (
        case["name"] != case["file_name_nfc"]
        and unicodedata.normalize("NFC", case["name"]) == case["file_name_nfc"]
    )
    sample = result["samples"][f"s3120/{case['file_name_nfc']}"]
    assert sample["image_path"] == f"data/raw/coralnet/s3120/images/{case['file_name_nfc']}"
    assert sample["n_points"] == case["rows"]
    assert json.loads(sample["native_labels"])["image"] == {"Name": case["name"]}  # as written


def test_a_folder_where_the_image_should_be_is_quarantined(result, planted):
    case = planted["coralnet"]["s3120"]["folder_as_image"]
    rows = [
        r
        for r in result["quarantine"]
        if r["record_kind"] == "image" and r["record_id"] == f"s3120/{case['name']}"
    ]
    assert [r["reason"] for r in rows] == ["not_a_regular_file"]
    _points, quarantined = rows_of(result, "s3120", case["name"])
    assert len(quarantined) == case["rows"] and {q["reason"] for q in quarantined} == {"image_unusable"}


def test_files_no_record_uses_are_counted(result, planted):
    files = [r for r in result["quarantine"] if r["record_kind"] == "file"]
    assert {r["reason"] for r in files} == {"unreferenced_file"}
    assert {r["file"] for r in files} == {
        "data/raw/coralnet/s3120/images/extra/T_S09999.jpg",
        "data/raw/coralnet/s3120/images/T_S00104.jpg/preview.jpg",  # inside the folder-as-image
    }
    assert result["metrics"]["exports"]["s3120"]["unreferenced_files"] == 2


# --- the real CoralNet-Toolbox export (tests/reference/coralnet-toolbox), through fetch -----------

REFERENCE = Path(__file__).parent / "reference" / "coralnet-toolbox"
TOOLBOX_ID = 4856
PRESENT = ("T_S04856.jpg", "T_S04857.jpg")


def _toolbox_project(tmp_path: Path, fetched_root: Path, labelset_text: str | None = None, **entry) -> tuple:
    """The reference folder as a local export, fetched the way fetch@coralnet mirrors it."""
    from stages.config import load_params
    from stages.fetch import fetch

    local = tmp_path / "external"
    shutil.copytree(REFERENCE, local / f"s{TOOLBOX_ID}")
    if labelset_text is not None:
        (local / f"s{TOOLBOX_ID}" / "labelset.csv").write_text(labelset_text)
    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    exports = [{"id": TOOLBOX_ID, "location": "local", **entry}]
    params["sources"]["coralnet"]["exports"] = exports
    params["endpoints"]["coralnet_local_root"] = str(local)
    report = fetch("coralnet", params, root / "data/raw/coralnet", tmp_path / "scratch")
    ctx = ingest_context("coralnet", root, sources__coralnet__exports=exports)
    return replace(ctx, taxonomy_dir=fetched_root / "data" / "taxonomy"), report


def _reference_rows() -> list[dict[str, str]]:
    with open(REFERENCE / "CoralNet_Annotations.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def toolbox(fetched_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    ctx, report = _toolbox_project(tmp_path_factory.mktemp("toolbox"), fetched_root)
    return {**load(ctx, run(ctx)), "fetch": report}


def test_real_toolbox_export_adds_up_through_fetch_and_ingest(toolbox):
    m, q = toolbox["metrics"], toolbox["quarantine"]
    rows = _reference_rows()
    names = sorted({r["Name"] for r in rows})
    assert len(rows) == 8987 and len(names) == 68
    raw = toolbox["ctx"].raw_dir / f"s{TOOLBOX_ID}"
    assert sorted(p.name for p in (raw / "images").iterdir()) == list(PRESENT)
    assert (raw / "annotations.csv").read_bytes() == (REFERENCE / "CoralNet_Annotations.csv").read_bytes()
    assert any("Labels.json" in note and "NOTICE.md" in note for note in toolbox["fetch"].notes)
    kinds = Counter(r["record_kind"] for r in q)
    assert m["inputs"] == {"export": 1, "file": 0, "image": 68, "point": 8987}
    assert m["samples"] + kinds["image"] == 68 and m["points"] + kinds["point"] == 8987
    assert sorted(s["upstream_id"] for s in toolbox["samples"].values()) == [
        f"s{TOOLBOX_ID}/{n}" for n in PRESENT
    ]
    missing = [r for r in q if r["record_kind"] == "image"]
    assert len(missing) == 66 and {r["reason"] for r in missing} == {"missing_image"}
    stats = m["exports"][f"s{TOOLBOX_ID}"]
    assert stats["label_columns"] == ["Label"]
    # The only labelset beside it is another project's (pandas index column): the toolbox's codes
    # are not in it, and every row says so, naming the code and the file.
    assert stats["labelset"] == f"data/raw/coralnet/s{TOOLBOX_ID}/MIR_CoralNet_Labelset.csv"
    assert stats["labelset_rows"] == 120
    # One real repeat: T_S04916.jpg has (988, 730) twice, both NotCoral.
    dups = [r for r in q if r["reason"] == "duplicate_point"]
    assert len(dups) == _repeats(rows) == 1 and "same label" in dups[0]["detail"]
    assert Counter(r["reason"] for r in q if r["record_kind"] == "point") == {
        "unmapped_label": 8987 - 1,
        "duplicate_point": 1,
    }
    assert {r["detail"].split(": ", 1)[1] for r in q if r["reason"] == "unmapped_label"} == {
        f"Label code {c!r} is not in MIR_CoralNet_Labelset.csv"
        for c in ("Coral", "NotCoral", "DVR", "SclBar")
    }


def _repeats(rows: list[dict[str, str]]) -> int:
    return sum(n - 1 for n in Counter((r["Name"], r["Row"], r["Column"]) for r in rows).values())


def test_real_pandas_labelset_with_an_index_column_resolves_codes():
    from stages.ingest.coralnet_labels import read_labelset

    labelset = read_labelset(REFERENCE / "MIR_CoralNet_Labelset.csv", "utf-8")
    assert (labelset.rows, labelset.skipped_rows, len(labelset.ids)) == (120, 0, 120)
    assert labelset.resolve("Sand") == ("84", "") and labelset.resolve("*ANTI") == ("3507", "")
    assert labelset.resolve("sand") == ("84", "")  # case-insensitive when only one code folds to it
    assert labelset.resolve("Coral") == (None, "is not in MIR_CoralNet_Labelset.csv")
    assert labelset.codes["1357"] == "AgAga"


def test_real_toolbox_export_points_equal_the_csv(tmp_path, fetched_root):
    # The toolbox's codes are its own: a user resolves them with a labelset of their own beside the
    # export; with two labelsets there, the entry must name one.
    labelset = (
        "Label ID,Name,Short Code\n2110,Coral,Coral\n41,Not coral,NotCoral\n33,DVR,DVR\n27,SclBar,SclBar\n"
    )
    with pytest.raises(
        UpstreamFormatError, match=r"several labelset CSVs \(MIR_CoralNet_Labelset.csv, labelset.csv\)"
    ):
        ctx, _ = _toolbox_project(tmp_path / "a", fetched_root, labelset)
        run(ctx)
    ctx, _ = _toolbox_project(tmp_path / "b", fetched_root, labelset, labelset="labelset.csv")
    m = run(ctx)
    points = read(ctx.out_dir, "points")
    rows = _reference_rows()
    for name in PRESENT:
        sid = sample_id(f"s{TOOLBOX_ID}", name)
        got = {(p["row"], p["col"], p["source_label"]) for p in points if p["sample_id"] == sid}
        want = {(int(r["Row"]), int(r["Column"]), r["Label"]) for r in rows if r["Name"] == name}
        assert got == want and len(want) == sum(1 for r in rows if r["Name"] == name)
    assert m["points"] == sum(1 for r in rows if r["Name"] in PRESENT)
    q = read(ctx.out_dir, "quarantine")
    assert Counter(r["reason"] for r in q if r["record_kind"] == "point") == {
        "image_unusable": 8987 - m["points"] - _repeats(rows),
        "duplicate_point": _repeats(rows),
    }
    native = json.loads(read(ctx.out_dir, "samples")[0]["native_labels"])
    assert native["points"][0]["extra"].keys() == {"Long Label", "Patch Size"}


# --- one bad export among good ones --------------------------------------------------------------


def _copy_raw(fetched_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(fetched_root / "data/raw/coralnet", root / "data/raw/coralnet")
    (root / "dvc.yaml").write_text("stages: {}\n")
    return root


def test_one_bad_export_fails_by_default_or_is_quarantined_whole(fetched_root, tmp_path, result):
    root = _copy_raw(fetched_root, tmp_path)
    csv_path = root / "data/raw/coralnet/s1073/annotations.csv"
    data = csv_path.read_bytes()
    csv_path.write_bytes(data.replace(b",Row,", b",Point row,", 1))
    ctx = replace(ingest_context("coralnet", root), taxonomy_dir=fetched_root / "data/taxonomy", jobs=1)
    with pytest.raises(UpstreamFormatError) as err:
        run(ctx)
    message = str(err.value)
    assert "s1073/annotations.csv" in message and "missing Row" in message and "Point row" in message
    assert "ingest.on_bad_export: quarantine" in message

    params = {**ctx.params, "ingest": {**ctx.params["ingest"], "on_bad_export": "quarantine"}}
    m = run(replace(ctx, params=params))
    q = read(ctx.out_dir, "quarantine")
    bad = [r for r in q if r["record_kind"] == "export"]
    assert [(r["record_id"], r["reason"], r["file"]) for r in bad] == [
        ("s1073", "bad_export", "data/raw/coralnet/s1073/annotations.csv")
    ]
    assert "missing Row" in bad[0]["detail"]
    assert m["bad_exports"] == {"s1073": f"data/raw/coralnet/s1073/annotations.csv: {bad[0]['detail']}"}
    assert m["inputs"]["export"] == 3 and sorted(m["exports"]) == ["s2012", "s3120"]
    good = result["metrics"]["exports"]
    assert m["inputs"]["point"] == good["s2012"]["rows"] + good["s3120"]["rows"]
    assert {s["upstream_id"].split("/")[0] for s in read(ctx.out_dir, "samples")} == {"s2012", "s3120"}


def test_the_stage_cli_names_the_bad_export_in_one_line(fetched_root, tmp_path):
    import subprocess
    import sys

    import yaml

    root = _copy_raw(fetched_root, tmp_path)
    shutil.copytree(fetched_root / "data/taxonomy", root / "data/taxonomy")
    csv_path = root / "data/raw/coralnet/s2012/annotations.csv"
    csv_path.write_bytes(csv_path.read_bytes().split(b"\n", 1)[0] + b"\n")  # header only
    params = ingest_context("coralnet", root).params
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "TIDEPOOL_PROGRESS": "0", "TIDEPOOL_CACHE": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "stages.ingest", "coralnet", "--params", str(root / "params.yaml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        f"error: {csv_path}: CoralNet export s2012: no data rows, only a header: a source that lost its "
        "annotations is not an empty release (to ingest the other exports without it, set "
        "ingest.on_bad_export: quarantine)"
    )
    assert "Traceback" not in proc.stderr


def test_on_bad_export_must_be_fail_or_quarantine(fetched_root):
    from stages.errors import ConfigError

    ctx = ingest_context("coralnet", fetched_root, ingest__on_bad_export="skip")
    with pytest.raises(ConfigError, match="on_bad_export must be one of fail, quarantine"):
        run(ctx)


# --- hand-made exports: the tolerant reader and the hostile cases -------------------------------


def _jpeg(path: Path, h: int, w: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 120, dtype=np.uint8)).save(path, format="JPEG")


def _export_ctx(tmp_path: Path, fetched_root: Path, source_id: int, **entry):
    ctx = ingest_context(
        "coralnet", tmp_path, sources__coralnet__exports=[{"id": source_id, "location": "local", **entry}]
    )
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    return replace(ctx, taxonomy_dir=fetched_root / "data" / "taxonomy", jobs=1)


def test_handmade_name_export_with_codes_only(tmp_path, fetched_root):
    folder = tmp_path / "data/raw/coralnet/s9"
    _jpeg(folder / "images/a (1).jpg", 40, 60)
    _jpeg(folder / "images/unlisted.jpg", 10, 10)
    (folder / "labelset.csv").write_text(
        "Label ID,Name,Short Code\r\n27,Crustose coralline algae,CCA\r\n41,Sand,Sand\r\n"
    )
    # BOM, odd header spacing/case, metadata before Row, an extra column after it, a short row,
    # a too-long row, a non-integer Row, an unknown code, a code in another case, an empty key.
    text = (
        "\ufeffName,Date,Site,Comments, row ,Column,Label code,Annotator,Frame\r\n"
        'a (1).jpg,2020-02-30,Reef,"two\nlines, ""quoted""",1,2,CCA,kim,F1\r\n'
        "a (1).jpg,2020-02-30,Reef,x,3,4,Sand\r\n"
        "a (1).jpg,2020-02-30,Reef,x,5,6,NOPE,kim,\r\n"
        "a (1).jpg,2020-02-30,Reef,x,five,6,CCA,kim,\r\n"
        "a (1).jpg,2020-02-30,Reef,x,7,8,CCA,kim,F,surplus\r\n"
        ",2020-02-30,Reef,x,7,8,CCA,kim,\r\n"
        "a (1).jpg,2020-02-30,Reef,x,9,9,cca,kim,\r\n"
        "\r\n"
    )
    (folder / "annotations.csv").write_text(text, encoding="utf-8", newline="")
    m = run(_export_ctx(tmp_path, fetched_root, 9))
    out = tmp_path / "data/interim/coralnet"
    samples = read(out, "samples")
    assert [s["upstream_id"] for s in samples] == ["s9/a (1).jpg"]
    native = json.loads(samples[0]["native_labels"])
    assert native["metadata"]["Comments"] == 'two\nlines, "quoted"'
    assert native["metadata_conflicts"] == ["Comments"]
    assert native["points"][0]["extra"] == {"Frame": "F1"} and native["points"][0]["label_code"] == "CCA"
    assert samples[0]["captured_at"] is None  # 2020-02-30 is not a date
    assert samples[0]["site"] == "s9/Reef"
    points = read(out, "points")
    assert [(p["row"], p["col"], p["source_label_id"], p["source_label"]) for p in points] == [
        (1, 2, "27", "CCA"),
        (3, 4, "41", "Sand"),
        (9, 9, "27", "cca"),
    ]
    reasons = sorted((q["record_kind"], q["reason"], q["record_id"]) for q in read(out, "quarantine"))
    sid = make_sample_id("coralnet", "s9", "a (1).jpg")
    assert reasons == [
        ("image", "no_annotation", "s9/unlisted.jpg"),
        ("point", "bad_record", f"{sid}-line6"),  # five (the first record spans lines 2-3)
        ("point", "bad_record", "s9/line7"),  # too long
        ("point", "bad_record", "s9/line8"),  # empty Name
        ("point", "unmapped_label", f"{sid}-r5-c6"),  # NOPE
    ]
    assert m["inputs"] == {"export": 1, "file": 0, "image": 2, "point": 7}
    assert m["exports"]["s9"]["blank_lines"] == 1 and m["exports"]["s9"]["multiline_records"] == 1


def test_handmade_image_id_export_finds_the_extension(tmp_path, fetched_root):
    folder = tmp_path / "data/raw/coralnet/s5"
    _jpeg(folder / "images/11.JPG", 30, 30)
    _jpeg(folder / "images/12.png.jpg", 30, 30)  # stem "12.png": not image 12
    _jpeg(folder / "images/_11.jpg", 30, 30)  # `_11` and `11` are two images with two ids
    text = "Image ID,Row,Column,Label ID\n11,0,0,27\n12,0,0,27\n11,29,29,41\n_11,1,1,27\n"
    (folder / "annotations.csv").write_text(text)
    m = run(_export_ctx(tmp_path, fetched_root, 5))
    out = tmp_path / "data/interim/coralnet"
    samples = read(out, "samples")
    assert [s["image_path"] for s in samples] == [
        "data/raw/coralnet/s5/images/11.JPG",
        "data/raw/coralnet/s5/images/_11.jpg",
    ]
    assert [s["sample_id"] for s in samples] == ["coralnet-s5-11", "coralnet-s5-_11"]
    q = {(r["record_kind"], r["reason"]) for r in read(out, "quarantine")}
    assert q == {("image", "missing_image"), ("point", "image_unusable"), ("image", "no_annotation")}
    assert [p["point_id"] for p in read(out, "points")] == [
        "coralnet-s5-11-r0-c0",
        "coralnet-s5-11-r29-c29",
        "coralnet-s5-_11-r1-c1",
    ]
    assert m["inputs"] == {"export": 1, "file": 0, "image": 4, "point": 4}


def test_format_change_fails_naming_the_file(tmp_path, fetched_root):
    src = fetched_root / "data/raw/coralnet/s1073"
    folder = tmp_path / "data/raw/coralnet/s1073"
    folder.mkdir(parents=True)
    shutil.copy(src / "labelset.csv", folder / "labelset.csv")
    data = (src / "annotations.csv").read_bytes()
    header, rest = data.split(b"\r\n", 1)
    (folder / "annotations.csv").write_bytes(header.replace(b",Row,", b",Point row,") + b"\r\n" + rest)
    ctx = _export_ctx(tmp_path, fetched_root, 1073)
    with pytest.raises(UpstreamFormatError) as err:
        run(ctx)
    message = str(err.value)
    assert "s1073/annotations.csv" in message and "missing Row" in message and "Point row" in message

    (folder / "annotations.csv").write_bytes(data)
    (folder / "labelset.csv").write_text("Label ID,Name\n27,CCA\n")
    with pytest.raises(UpstreamFormatError, match="labelset.csv.*Short Code"):
        run(ctx)


def test_header_only_or_wholly_unusable_csv_fails_loudly(tmp_path, fetched_root):
    """issue 13 item 21: not every image quarantined as no_annotation, exit 0."""
    folder = tmp_path / "data/raw/coralnet/s6"
    _jpeg(folder / "images/a.jpg", 20, 20)
    (folder / "annotations.csv").write_text("Name,Row,Column,Label ID\r\n")
    ctx = _export_ctx(tmp_path, fetched_root, 6)
    with pytest.raises(UpstreamFormatError, match=r"s6/annotations.csv: .*no data rows"):
        run(ctx)
    (folder / "annotations.csv").write_text(
        "Name,Row,Column,Label ID\na.jpg,x,1,27\n,1,1,27\na.jpg,1,1,27,9\n"
    )
    with pytest.raises(UpstreamFormatError, match=r"none of the 3 data rows is usable"):
        run(ctx)


def test_strict_utf8_by_default_latin1_when_declared(tmp_path, fetched_root):
    """issue 13 item 16: one stray byte no longer turns the whole CSV into latin-1."""
    folder = tmp_path / "data/raw/coralnet/s7"
    _jpeg(folder / "images/r.jpg", 20, 20)
    _jpeg(folder / "images/Récif.jpg", 20, 20)
    header = b"Name,Site,Row,Column,Label ID,Status\n"
    first = b"r.jpg,Reef,1,1,27,Confirmed\n"
    stray = "r.jpg,Récif,2,2,41,Confirmed\n".encode("latin-1")  # one latin-1 byte, 0xE9
    last = "Récif.jpg,Récif,3,3,27,Confirmed\n".encode()
    (folder / "annotations.csv").write_bytes(header + first + stray + last)
    m = run(_export_ctx(tmp_path, fetched_root, 7))
    out = tmp_path / "data/interim/coralnet"
    bad = [q for q in read(out, "quarantine") if q["reason"] == "encoding_error"]
    assert [q["record_id"] for q in bad] == ["s7/line3"] and "byte 0xE9 at byte 8 of the line" in bad[0][
        "detail"
    ]
    assert m["points"] == 2 and {s["upstream_id"] for s in read(out, "samples")} == {
        "s7/r.jpg",
        "s7/Récif.jpg",
    }
    assert json.loads(read(out, "samples")[0]["native_labels"])["metadata"] == {"Site": "Récif"}

    (folder / "annotations.csv").write_bytes(header + first + stray)
    m = run(_export_ctx(tmp_path, fetched_root, 7, encoding="latin-1"))
    native = json.loads(read(out, "samples")[0]["native_labels"])
    assert m["exports"]["s7"]["encoding"] == "latin-1" and m["points"] == 2
    assert native["metadata"] == {"Site": "Reef"} and native["metadata_conflicts"] == ["Site"]
    assert not [q for q in read(out, "quarantine") if q["reason"] == "encoding_error"]


def _with_a_stray_quote(fetched_root: Path, tmp_path: Path, commented: bool) -> int:
    """s1073 with a Camera cell typed with an opening quote and no closing one, in a row that has
    (or has not) a quoted comment after it; returns the row's physical line."""
    src = fetched_root / "data/raw/coralnet/s1073"
    folder = tmp_path / "data/raw/coralnet/s1073"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(src, folder)
    records = (src / "annotations.csv").read_bytes().split(b"\r\n")  # a comment's "\n" stays inside
    at = next(
        i
        for i in range(len(records) // 3, len(records))
        if b",Olympus TG-5," in records[i] and (b'"' in records[i]) == commented
    )
    records[at] = records[at].replace(b",Olympus TG-5,", b',"Olympus TG-5,', 1)
    (folder / "annotations.csv").write_bytes(b"\r\n".join(records))
    return b"\r\n".join(records[:at]).count(b"\n") + 2


def test_an_unbalanced_quote_fails_naming_its_line(fetched_root, tmp_path):
    """issue 13 item 15: one missing quote used to swallow the rows after it (exit 0, fewer rows,
    and the accounting passed because the inputs count shrank with it), or split its row in two."""
    ctx = _export_ctx(tmp_path, fetched_root, 1073)
    before = len(csv_rows(fetched_root, "s1073"))
    for commented, what in (
        (False, "a quoted field opened here"),
        (True, "a quote closes a field in the middle"),
    ):
        line = _with_a_stray_quote(fetched_root, tmp_path, commented)
        text = (tmp_path / "data/raw/coralnet/s1073/annotations.csv").read_text()
        assert len(list(csv.DictReader(io.StringIO(text, newline="")))) != before  # what a csv reader sees
        with pytest.raises(UpstreamFormatError) as err:
            run(ctx)
        message = str(err.value)
        assert "s1073/annotations.csv" in message and f"line {line}: {what}" in message, message
        assert "unbalanced" in message


def test_an_unclosed_quote_at_the_end_and_line_breaks_outside_free_text_fail(fetched_root, tmp_path):
    folder = tmp_path / "data/raw/coralnet/s5"
    _jpeg(folder / "images/1.jpg", 30, 30)
    rows = "".join(f"1,{k},{k},27,Confirmed\n" for k in range(20))
    (folder / "annotations.csv").write_text(
        "Image ID,Row,Column,Label ID,Status\n" + rows + '1,25,"25,27,Confirmed\n1,26,26,27,Confirmed\n'
    )
    ctx = _export_ctx(tmp_path, fetched_root, 5)
    with pytest.raises(UpstreamFormatError, match=r"line 22: a quoted field opened here is never closed"):
        run(ctx)
    (folder / "annotations.csv").write_text('Image ID,Row,Column,Label ID,Status\n1,2,"2\n",27,Confirmed\n')
    with pytest.raises(
        UpstreamFormatError, match=r"line 2: .*column 'Column', which never holds line breaks"
    ):
        run(ctx)


def test_cells_over_the_csv_modules_limit_are_a_bad_row_not_a_csv_error(fetched_root, tmp_path):
    """issue 13 item 11: a cell over 128 KiB is one quarantined row; a line over 16 MiB a clear error."""
    folder = tmp_path / "data/raw/coralnet/s8"
    _jpeg(folder / "images/a.jpg", 20, 20)
    long = "x" * 200_000
    (folder / "annotations.csv").write_text(
        f"Name,Comments,Row,Column,Label ID\na.jpg,{long},1,1,27\na.jpg,short,2,2,27\n"
    )
    ctx = _export_ctx(tmp_path, fetched_root, 8)
    m = run(ctx)
    q = read(tmp_path / "data/interim/coralnet", "quarantine")
    assert [(r["record_id"], r["reason"]) for r in q] == [("s8/line2", "bad_record")]
    assert "'Comments' (200000 characters)" in q[0]["detail"] and m["points"] == 1
    (folder / "annotations.csv").write_text(
        f"Name,Comments,Row,Column,Label ID\na.jpg,{'y' * (17 << 20)},1,1,27\n"
    )
    with pytest.raises(UpstreamFormatError, match=r"line 2 is longer than 16 MiB"):
        run(ctx)


def test_folders_and_symlinks_where_images_are_expected(fetched_root, tmp_path):
    """issue 13 item 12: a quarantine row with a reason, not IsADirectoryError or a host file read."""
    folder = tmp_path / "data/raw/coralnet/s4"
    _jpeg(folder / "images/ok.jpg", 20, 20)
    (folder / "images/dir.jpg").mkdir()
    outside = tmp_path / "host-secret.jpg"
    _jpeg(outside, 20, 20)
    os.symlink(outside, folder / "images/link.jpg")
    os.symlink(outside, folder / "images/unused-link.jpg")
    text = "Name,Row,Column,Label ID\nok.jpg,1,1,27\ndir.jpg,1,1,27\nlink.jpg,1,1,27\n"
    (folder / "annotations.csv").write_text(text)
    m = run(_export_ctx(tmp_path, fetched_root, 4))
    out = tmp_path / "data/interim/coralnet"
    assert [s["upstream_id"] for s in read(out, "samples")] == ["s4/ok.jpg"]
    images = {
        r["record_id"]: (r["reason"], r["file"])
        for r in read(out, "quarantine")
        if r["record_kind"] == "image"
    }
    assert images == {
        "s4/dir.jpg": ("not_a_regular_file", "data/raw/coralnet/s4/images/dir.jpg"),
        "s4/link.jpg": ("not_a_regular_file", "data/raw/coralnet/s4/images/link.jpg"),
        "s4/unused-link.jpg": ("no_annotation", "data/raw/coralnet/s4/images/unused-link.jpg"),
    }
    assert m["points"] == 1 and m["quarantine"]["image_unusable"] == 2


def test_unreferenced_files_are_counted_not_ignored(fetched_root, tmp_path):
    """issue 13 item 19."""
    folder = tmp_path / "data/raw/coralnet/s3"
    _jpeg(folder / "images/a.jpg", 20, 20)
    _jpeg(folder / "images/extra/x.jpg", 20, 20)
    (folder / "image_covers.csv").write_text("Image ID,Image name,Annotation status,Points\n")
    (folder / "annotations.csv").write_text("Name,Row,Column,Label ID\na.jpg,1,1,27\n")
    m = run(_export_ctx(tmp_path, fetched_root, 3))
    files = [r for r in read(tmp_path / "data/interim/coralnet", "quarantine") if r["record_kind"] == "file"]
    assert [(r["record_id"], r["reason"]) for r in files] == [
        ("s3/image_covers.csv", "unreferenced_file"),
        ("s3/images/extra/x.jpg", "unreferenced_file"),
    ]
    assert m["inputs"]["file"] == 2 and m["exports"]["s3"]["unreferenced_files"] == 2
    assert m["exports"]["s3"]["labelset"] is None


def test_id_collisions_name_the_files_and_nfc_equal_keys_are_one_image(fetched_root, tmp_path):
    """issue 13 item 20/21: names compared in NFC; two files that are one name in NFC are refused."""
    folder = tmp_path / "data/raw/coralnet/s2"
    nfc, nfd = "Récif.jpg", unicodedata.normalize("NFD", "Récif.jpg")
    _jpeg(folder / "images" / nfc, 20, 20)
    _jpeg(folder / "images/a b.jpg", 20, 20)
    _jpeg(folder / "images/a_b.jpg", 20, 20)
    text = f"Name,Row,Column,Label ID\n{nfc},1,1,27\n{nfd},2,2,27\na b.jpg,1,1,27\na_b.jpg,1,1,27\n"
    (folder / "annotations.csv").write_text(text)
    ctx = _export_ctx(tmp_path, fetched_root, 2)
    m = run(ctx)
    samples = {s["upstream_id"]: s for s in read(tmp_path / "data/interim/coralnet", "samples")}
    assert sorted(samples) == ["s2/Récif.jpg", "s2/a b.jpg", "s2/a_b.jpg"]
    assert samples["s2/Récif.jpg"]["n_points"] == 2 and m["inputs"]["image"] == 3
    assert len({s["sample_id"] for s in samples.values()}) == 3

    _jpeg(folder / "images" / nfd, 20, 20)  # now two files whose names are one in NFC
    with pytest.raises(UpstreamFormatError) as err:
        run(ctx)
    assert "have the same name in NFC" in str(err.value) and "s2/images" in str(err.value)


def test_site_columns_per_export_override_the_default(fetched_root, tmp_path):
    folder = tmp_path / "data/raw/coralnet/s1"
    _jpeg(folder / "images/a.jpg", 20, 20)
    _jpeg(folder / "images/b.jpg", 20, 20)
    text = "Name,Site,Transect,Row,Column,Label ID\na.jpg,North,T1,1,1,27\nb.jpg,,,1,1,27\n"
    (folder / "annotations.csv").write_text(text)
    m = run(_export_ctx(tmp_path, fetched_root, 1, site_columns=["Site", "transect"]))
    sites = {s["upstream_id"]: s["site"] for s in read(tmp_path / "data/interim/coralnet", "samples")}
    assert sites == {"s1/a.jpg": "s1/North/T1", "s1/b.jpg": None}
    assert m["exports"]["s1"]["site_columns"] == ["Site", "Transect"]
