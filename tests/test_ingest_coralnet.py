"""ingest@coralnet on the fetched sample upstream (a bucket-style and a local export): every planted
case lands where PLANTED.json says, nothing is lost, outputs are stable, and a changed export
fails loudly."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import ingest_context
from PIL import Image

from stages.errors import UpstreamFormatError
from stages.ingest import coralnet, ingest_source
from stages.ingest.coralnet import image_sample_id


def run(ctx) -> dict:
    tables, extra = coralnet.ingest(ctx)
    tables.write(ctx.out_dir)
    return tables.metrics(extra)


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
    with open(
        fetched_root / "data/raw/coralnet" / export / "annotations.csv", newline="", encoding="utf-8"
    ) as fh:
        return list(csv.DictReader(fh))


def rows_of(result: dict, export: str, key: str) -> tuple[list[dict], list[dict]]:
    """(points, quarantined annotation rows) of one image."""
    sid = image_sample_id(int(export[1:]), key)
    points = [p for p in result["points"] if p["sample_id"] == sid]
    quarantined = [
        q
        for q in result["quarantine"]
        if q["record_kind"] == "annotation_row" and q["record_id"].startswith(sid + "-")
    ]
    return points, quarantined


def test_inputs_equal_samples_plus_quarantine(result, planted, fetched_root):
    m, q = result["metrics"], result["quarantine"]
    kinds = Counter(r["record_kind"] for r in q)
    assert set(kinds) <= {"image", "annotation_row"}
    assert m["inputs"]["images"] == m["samples"] + kinds["image"]
    assert m["inputs"]["annotation_rows"] == m["points"] + kinds["annotation_row"]
    for export in ("s1073", "s2012"):
        info = planted["coralnet"][export]
        assert m["inputs_by_export"][export] == {"images": info["images"], "annotation_rows": info["rows"]}
        assert len(csv_rows(fetched_root, export)) == info["rows"]


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


def test_points_outside_and_name_with_space(result, planted):
    case = planted["coralnet"]["s1073"]["points_outside"]
    assert " " in case["name"]
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
    assert lowest["metrics"]["quarantine"]["unmapped_label"] == result_unmapped(planted)


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


def test_native_metadata_and_sample_columns(result, fetched_root):
    raw = {}
    for row in csv_rows(fetched_root, "s1073"):
        raw.setdefault(row["Name"], row)
    for upstream_id, s in result["samples"].items():
        assert s["sample_id"].isascii() and "." not in s["sample_id"]
        native = json.loads(s["native_labels"])
        assert native["export"] == upstream_id.split("/")[0]
        if not upstream_id.startswith("s1073/"):
            assert native["metadata"] == {} and s["captured_at"] is None
            continue
        src = raw[native["image"]["Name"]]
        columns = list(src)
        before_row = columns[: columns.index("Row")]
        assert native["metadata"] == {k: src[k] for k in before_row if k != "Name" and src[k] != ""}
        assert "Row" not in native["metadata"] and "Name" not in native["metadata"]
        assert s["captured_at"] == (src["Date"] or None)
        if src["Latitude"] and src["Longitude"]:
            assert (s["lat"], s["lon"]) == (float(src["Latitude"]), float(src["Longitude"]))
        else:
            assert s["lat"] is None and s["lon"] is None
        labels = json.loads(s["labels"])
        assert labels["n_points"] == s["n_points"] == len(native["points"])


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
    assert cw["mapped"] == m["points"]
    assert (
        cw["total"] == m["points"] + m["quarantine"]["unmapped_label"] + m["quarantine"]["ambiguous_mapping"]
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
    run(ctx)
    for name in ("samples", "points", "quarantine"):
        assert (ctx.out_dir / f"{name}.parquet").read_bytes() == (
            result["ctx"].out_dir / f"{name}.parquet"
        ).read_bytes(), name


# --- hand-made exports: the tolerant reader and the records the sample upstream does not plant ---


def _jpeg(path: Path, h: int, w: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 120, dtype=np.uint8)).save(path, format="JPEG")


def _export_ctx(tmp_path: Path, fetched_root: Path, source_id: int):
    ctx = ingest_context(
        "coralnet", tmp_path, sources__coralnet__exports=[{"id": source_id, "location": "local"}]
    )
    return replace(ctx, taxonomy_dir=fetched_root / "data" / "taxonomy", jobs=1)


def test_handmade_name_export_with_codes_only(tmp_path, fetched_root):
    folder = tmp_path / "data/raw/coralnet/s9"
    _jpeg(folder / "images/a (1).jpg", 40, 60)
    _jpeg(folder / "images/unlisted.jpg", 10, 10)
    (folder / "labelset.csv").write_text(
        "Label ID,Name,Short Code\r\n27,Crustose coralline algae,CCA\r\n41,Sand,Sand\r\n"
    )
    # BOM, odd header spacing/case, metadata before Row, an extra column after it, a short row,
    # a too-long row, a non-integer Row, an unknown code, an empty key and an empty Annotator.
    text = (
        "\ufeffName,Date,Site,Comments, row ,Column,Label code,Annotator,Frame\r\n"
        'a (1).jpg,2020-02-30,Reef,"two\nlines, ""quoted""",1,2,CCA,kim,F1\r\n'
        "a (1).jpg,2020-02-30,Reef,x,3,4,Sand\r\n"
        "a (1).jpg,2020-02-30,Reef,x,5,6,NOPE,kim,\r\n"
        "a (1).jpg,2020-02-30,Reef,x,five,6,CCA,kim,\r\n"
        "a (1).jpg,2020-02-30,Reef,x,7,8,CCA,kim,F,surplus\r\n"
        ",2020-02-30,Reef,x,7,8,CCA,kim,\r\n"
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
    points = read(out, "points")
    assert [(p["row"], p["col"], p["source_label_id"], p["source_label"]) for p in points] == [
        (1, 2, "27", "CCA"),
        (3, 4, "41", "Sand"),
    ]
    reasons = sorted((q["record_kind"], q["reason"]) for q in read(out, "quarantine"))
    assert reasons == [
        ("annotation_row", "bad_record"),  # five
        ("annotation_row", "bad_record"),  # too long
        ("annotation_row", "bad_record"),  # empty Name
        ("annotation_row", "unmapped_label"),  # NOPE
        ("image", "no_annotation"),  # unlisted.jpg
    ]
    assert m["inputs"] == {"images": 2, "annotation_rows": 6}


def test_handmade_image_id_export_finds_the_extension(tmp_path, fetched_root):
    folder = tmp_path / "data/raw/coralnet/s5"
    _jpeg(folder / "images/11.JPG", 30, 30)
    _jpeg(folder / "images/12.png.jpg", 30, 30)  # stem "12.png": not image 12
    text = "Image ID,Row,Column,Label ID\n11,0,0,27\n12,0,0,27\n11,29,29,41\n"
    (folder / "annotations.csv").write_text(text)
    m = run(_export_ctx(tmp_path, fetched_root, 5))
    out = tmp_path / "data/interim/coralnet"
    assert [s["image_path"] for s in read(out, "samples")] == ["data/raw/coralnet/s5/images/11.JPG"]
    q = {(r["record_kind"], r["reason"]) for r in read(out, "quarantine")}
    assert q == {("image", "missing_image"), ("annotation_row", "image_unusable"), ("image", "no_annotation")}
    assert [p["point_id"] for p in read(out, "points")] == ["coralnet-s5-11-r0-c0", "coralnet-s5-11-r29-c29"]
    assert m["inputs"] == {"images": 3, "annotation_rows": 3}


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
        coralnet.ingest(ctx)
    message = str(err.value)
    assert "s1073/annotations.csv" in message and "missing Row" in message and "Point row" in message

    (folder / "annotations.csv").write_bytes(data)
    (folder / "labelset.csv").write_text("Label ID,Name\n27,CCA\n")
    with pytest.raises(UpstreamFormatError, match="labelset.csv.*Short Code"):
        coralnet.ingest(ctx)


def test_latin1_export_is_read_and_reported(tmp_path, fetched_root):
    folder = tmp_path / "data/raw/coralnet/s7"
    _jpeg(folder / "images/r.jpg", 20, 20)
    text = (
        "Name,Site,Row,Column,Label ID,Status\nr.jpg,Récif,1,1,27,Confirmed\nr.jpg,Récif,2,2,41,Unconfirmed\n"
    )
    (folder / "annotations.csv").write_bytes(text.encode("latin-1"))
    m = run(_export_ctx(tmp_path, fetched_root, 7))
    out = tmp_path / "data/interim/coralnet"
    native = json.loads(read(out, "samples")[0]["native_labels"])
    assert native["metadata"] == {"Site": "Récif"}
    assert m["encoding_by_export"] == {"s7": "latin-1"}
    assert m["unconfirmed"] == {"status Unconfirmed": 1} and m["points"] == 1
