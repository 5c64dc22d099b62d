"""The Seatizen sample Zenodo record reads back the way SOURCES §6 says the real one does, holds the
planted cases where PLANTED says, and grows as a superset."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.samplegen import planted as scenes
from stages.samplegen import seatizen

SMALL, LARGER = 0.5, 0.8
RECORD = Path("http") / "zenodo" / "api" / "records" / "13951614"
FILES = ["20241016_132819_multilabel_annotations.csv", "20241018_segmentation_annotations.json",
         "gbif_class_mapping.csv", "images.zip"]
NAME_RE = re.compile(
    r"^(?P<session>\d{8}_[A-Z]{3}-[A-Za-z]+_(?:ASV|UAV|SCUBA|MASK|KITE|PADDLE)(?:-\d\d)?_[A-Za-z0-9]+)"
    r"_(?P<frame>\d{3})\.(?:JPG|jpg|jpeg)$"
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("seatizen")
    out = {}
    for name, scale, jobs in (("a", SMALL, 2), ("b", SMALL, 1), ("c", LARGER, 1)):
        result = seatizen.generate(base / name, scale=scale, jobs=jobs)
        assert json.loads(json.dumps(result)) == result
        out[name] = (base / name, result)
    return out


def _read(root: Path) -> dict:
    rec = root / RECORD
    files = {key: (rec / "files" / key / "content").read_bytes() for key in FILES}
    rows = list(csv.DictReader(io.StringIO(files[FILES[0]].decode("utf-8"), newline="")))
    with zipfile.ZipFile(io.BytesIO(files["images.zip"])) as zf:
        infos = zf.infolist()
        members = {i.filename: zf.read(i) for i in infos}
    images = {k: v for k, v in members.items() if not _is_mask_input(k)}
    return {"index": json.loads((rec / "index.json").read_text()), "files": files, "rows": rows,
            "zip_infos": infos, "images": images, "members": members, "seg": json.loads(files[FILES[1]])}


def _is_mask_input(member: str) -> bool:
    name = member.rsplit("/", 1)[-1]
    return name == "color.txt" or name.startswith("annotation_mask_")


def _odd(result: dict) -> set[str]:
    return {n for names in result["planted"]["odd_names"].values() for n in names}


@pytest.fixture(scope="module")
def small(runs: dict) -> tuple[dict, dict]:
    root, result = runs["a"]
    return _read(root), result


def test_record_json_lists_every_file_with_its_md5(small: tuple[dict, dict]) -> None:
    data, result = small
    index = data["index"]
    assert index["id"] == 13951614 and index["doi"] == "10.5281/zenodo.13951614"
    assert index["metadata"]["version"] == "1.1.0" and index["metadata"]["license"]
    assert [f["key"] for f in index["files"]] == FILES
    for entry in index["files"]:
        content = data["files"][entry["key"]]
        assert entry["size"] == len(content)
        assert entry["checksum"] == "md5:" + hashlib.md5(content).hexdigest()
        assert result["checksums"][f"seatizen/{entry['key']}"] == hashlib.md5(content).hexdigest()
        assert entry["links"]["self"] == (
            "{{BASE}}/zenodo/api/records/13951614/files/" + entry["key"] + "/content"
        )


def test_multilabel_csv(small: tuple[dict, dict]) -> None:
    data, result = small
    header = list(data["rows"][0])
    assert header[:4] == ["FileName", "frame_doi", "relative_file_path", "annotation_date"]
    classes = header[4:]
    assert 40 <= len(classes) <= 53
    assert {"Acropora_Branching", "Non-acropora_Coral_free", "Algae_Turf", "Sand", "Rubble", "Rock",
            "Sponges", "Fish", "Turtle", "Homo_Sapiens", "Human_Object", "Waste", "Blurred", "Useless",
            "Trample"} <= set(classes)
    values = {row[c] for row in data["rows"] for c in classes}
    assert values == {"1", "0", "-1"}
    for row in data["rows"]:
        assert NAME_RE.match(row["FileName"]) or row["FileName"] in _odd(result), row["FileName"]
        assert row["frame_doi"].startswith("10.5281/zenodo.")
        assert row["relative_file_path"].endswith("/" + row["FileName"])
    names = [row["FileName"] for row in data["rows"]]
    assert names == sorted(names) and len(set(names)) == len(names)


def test_images_zip(small: tuple[dict, dict]) -> None:
    data, result = small
    members = [i.filename for i in data["zip_infos"]]
    assert members == sorted(members)
    assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in data["zip_infos"])
    names = [n for n in data["images"] if n.split("/", 1)[1] not in _odd(result)]
    assert all(n.startswith("2024_dataset/") and NAME_RE.match(n.split("/", 1)[1]) for n in names)
    assert {Path(n).suffix for n in names} == {".JPG", ".jpg", ".jpeg"}
    assert set(members) - set(data["images"]) == {
        result["planted"]["raster_mask"]["zip_member"], result["planted"]["raster_mask"]["colour_table"]
    }
    platforms = {NAME_RE.match(n.split("/", 1)[1])["session"].split("_")[2].split("-")[0] for n in names}
    assert len(platforms) >= 4
    for member, content in data["images"].items():
        with Image.open(io.BytesIO(content)) as img:
            img.load()
            assert img.format == ("PNG" if member.endswith(".png") else "JPEG"), member


def test_sessions_are_near_duplicate_frames(small: tuple[dict, dict]) -> None:
    data, _ = small
    sessions: dict[str, list[np.ndarray]] = {}
    for member, content in sorted(data["images"].items()):
        m = NAME_RE.match(member.split("/", 1)[1])
        if m is None:
            continue  # an odd name, in a session of its own
        with Image.open(io.BytesIO(content)) as img:
            sessions.setdefault(m["session"], []).append(np.asarray(img.convert("L").resize((64, 48)), float))
    multi = [frames for frames in sessions.values() if len(frames) >= 6]
    assert len(multi) >= 3
    within = np.mean([np.abs(f[0] - f[1]).mean() for f in multi])
    across = np.mean([np.abs(a[0] - b[0]).mean() for a, b in zip(multi, multi[1:])])
    assert within * 3 < across


def test_planted_cases(small: tuple[dict, dict]) -> None:
    data, result = small
    planted = result["planted"]
    in_zip = {n.split("/", 1)[1] for n in data["images"]}
    in_csv = {row["FileName"] for row in data["rows"]}
    [missing] = planted["csv_row_without_image"]
    [zip_only] = planted["image_without_csv_row"]
    assert missing in in_csv and missing not in in_zip
    assert zip_only in in_zip and zip_only not in in_csv
    assert in_csv - in_zip == {missing} and in_zip - in_csv == {zip_only}
    # The cross-source scene: resized and re-encoded, so similar pixels but different bytes.
    cross = planted["cross_source_image"]
    content = data["images"][cross["zip_member"]]
    assert cross["file"] in in_csv
    with Image.open(io.BytesIO(content)) as img:
        assert img.size == (cross["size_hw"][1], cross["size_hw"][0])
        got = np.asarray(img.convert("RGB"), float)
    scene = Image.fromarray(scenes.cross_source_scene()).resize(img.size, Image.Resampling.BILINEAR)
    assert np.abs(got - np.asarray(scene, float)).mean() < 8
    other = next(v for k, v in data["images"].items() if k != cross["zip_member"])
    with Image.open(io.BytesIO(other)) as img:
        unrelated = np.asarray(img.convert("RGB").resize(scene.size), float)
    assert np.abs(unrelated - np.asarray(scene, float)).mean() > 20


def test_segmentation_json(small: tuple[dict, dict]) -> None:
    data, result = small
    seg = data["seg"]
    assert {"images", "annotations", "categories"} <= set(seg)
    cats = {c["id"]: c["name"] for c in seg["categories"]}
    images = {im["id"]: im for im in seg["images"]}
    csv_names = {row["FileName"] for row in data["rows"]}
    zip_names = {n.split("/", 1)[1] for n in data["images"]}
    assert images and all(im["file_name"] in csv_names & zip_names for im in images.values())
    kinds = set()
    for ann in seg["annotations"]:
        assert ann["category_id"] in cats and ann["image_id"] in images
        im = images[ann["image_id"]]
        if isinstance(ann["segmentation"], dict):
            kinds.add("rle")
            rle = ann["segmentation"]
            assert rle["size"] == [im["height"], im["width"]] and ann["iscrowd"] == 1
            assert sum(rle["counts"]) == im["height"] * im["width"]
            assert sum(rle["counts"][1::2]) == ann["area"]
            assert im["file_name"] == result["planted"]["rle_annotation_image"]
        else:
            kinds.add("polygon")
            assert ann["iscrowd"] == 0
            for poly in ann["segmentation"]:
                assert len(poly) >= 6 and len(poly) % 2 == 0
                xs, ys = poly[0::2], poly[1::2]
                assert 0 <= min(xs) and max(xs) <= im["width"] and 0 <= min(ys) and max(ys) <= im["height"]
    assert kinds == {"rle", "polygon"}


def test_gbif_mapping_covers_the_classes(small: tuple[dict, dict]) -> None:
    data, _ = small
    rows = list(csv.DictReader(io.StringIO(data["files"]["gbif_class_mapping.csv"].decode("utf-8"))))
    assert {r["label"] for r in rows} == set(list(data["rows"][0])[4:]) - {seatizen.UNKNOWN_CLASS}
    assert any(r["id_gbif"].startswith("https://www.gbif.org/species/") for r in rows)


def test_deterministic_whatever_the_jobs(runs: dict) -> None:
    (a, ra), (b, rb) = runs["a"], runs["b"]
    assert ra == rb
    for path in sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file()):
        assert (a / path).read_bytes() == (b / path).read_bytes(), path


def test_larger_scale_is_a_superset(runs: dict) -> None:
    s, lg = _read(runs["a"][0]), _read(runs["c"][0])
    assert len(lg["images"]) > len(s["images"])
    for name, content in s["images"].items():
        assert lg["images"][name] == content
    assert all(row in lg["rows"] for row in s["rows"])
    for key in ("images", "annotations", "categories"):
        assert all(r in lg["seg"][key] for r in s["seg"][key])
    assert s["files"]["gbif_class_mapping.csv"] == lg["files"]["gbif_class_mapping.csv"]


def test_odd_names_raster_mask_and_unknown_class_are_planted(small: tuple[dict, dict]) -> None:
    data, result = small
    planted = result["planted"]
    assert set(planted["odd_names"]) == {
        "country_without_place", "place_of_several_words", "numbered_platform_one_token", "still_photos",
        "four_token_rest", "fits_no_rule",
    }
    in_csv = {row["FileName"] for row in data["rows"]}
    in_zip = {n.split("/", 1)[1] for n in data["images"]}
    assert _odd(result) <= in_csv & in_zip
    assert not any(NAME_RE.match(n) for n in _odd(result))
    assert "20190420_MYT_scuba_DSCI1495.JPG" in planted["odd_names"]["country_without_place"]
    assert "20150611_REU-St-Gilles_scuba_G0043959.JPG" in planted["odd_names"]["still_photos"]
    # The raster mask: mode L, the image's size, ids of color.txt; no COCO entry for that image.
    mask = planted["raster_mask"]
    with Image.open(io.BytesIO(data["members"][mask["zip_member"]])) as img:
        assert img.mode == "L" and img.size == (mask["size_hw"][1], mask["size_hw"][0])
        ids = set(np.unique(np.asarray(img)).tolist())
    with Image.open(io.BytesIO(data["images"]["2024_dataset/" + mask["image"]])) as img:
        assert img.size == (mask["size_hw"][1], mask["size_hw"][0])
    table = data["members"][mask["colour_table"]].decode()
    listed = {line.split()[0] for line in table.splitlines()}
    assert ids == {0, 1, 2, 3, 4, 5} and {str(i) for i in ids} <= listed
    assert mask["image"] not in {im["file_name"] for im in data["seg"]["images"]}
    # The unknown class column carries 1/0 values.
    col = planted["unknown_class_column"]
    values = [row[col["name"]] for row in data["rows"]]
    assert set(values) == {"0", "1"} and values.count("1") == col["present"] and len(values) == col["values"]
