"""The iNat 2017 sample bucket reads back the way SOURCES §5 says the real one does, holds the planted
corrupt JPEG where PLANTED says, and grows as a superset."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from stages.samplegen import inat

SMALL, LARGER = 0.1, 0.2  # 12 and 24 images: 800 px JPEGs are the slow part
BUCKET = Path("s3") / "inaturalist-datasets" / "2017"
OBJECTS = ["inat2017_locations.zip", "train_2017_bboxes.zip", "train_val2017.zip", "train_val_images.tar.gz",
           "val_2017_bboxes.zip"]
MEMBER_RE = re.compile(
    r"^train_val_images/(?P<sup>[A-Za-z]+)/(?P<cat>[A-Z][a-z]+(?: [a-z]+)+)/[0-9a-f]{32}\.jpg$"
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("inat")
    out = {}
    for name, scale, jobs in (("a", SMALL, 2), ("b", SMALL, 1), ("c", LARGER, 1)):
        result = inat.generate(base / name, scale=scale, jobs=jobs)
        assert json.loads(json.dumps(result)) == result
        out[name] = (base / name, result)
    return out


def _read(root: Path) -> dict:
    bucket = root / BUCKET
    raw = bucket / "train_val_images.tar.gz"
    members, infos = {}, []
    with tarfile.open(raw, "r:gz") as tar:
        for info in tar:
            infos.append(info)
            if info.isfile():
                members[info.name] = tar.extractfile(info).read()
    jsons = {}
    for name in OBJECTS:
        if name.endswith(".zip"):
            with zipfile.ZipFile(bucket / name) as zf:
                for info in zf.infolist():
                    assert info.date_time == (1980, 1, 1, 0, 0, 0)
                    jsons[info.filename] = json.loads(zf.read(info))
    return {"bucket": bucket, "tar_raw": raw.read_bytes(), "tar_infos": infos, "members": members,
            "json": jsons}


@pytest.fixture(scope="module")
def small(runs: dict) -> tuple[dict, dict]:
    root, result = runs["a"]
    return _read(root), result


def test_objects_and_checksums(small: tuple[dict, dict]) -> None:
    data, result = small
    assert sorted(p.name for p in data["bucket"].iterdir()) == OBJECTS  # and no .md5 side files
    for name in OBJECTS:
        md5 = hashlib.md5((data["bucket"] / name).read_bytes()).hexdigest()
        assert result["checksums"][f"inat2017/{name}"] == md5
    assert sorted(result["checksums"]) == sorted(f"inat2017/{n}" for n in OBJECTS)


def test_tar_is_deterministic_and_laid_out_as_upstream(small: tuple[dict, dict]) -> None:
    data, _ = small
    raw = data["tar_raw"]
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0"  # gzip, no timestamp
    assert not raw[3] & 0x08  # no file name in the gzip header
    names = [i.name for i in data["tar_infos"]]
    assert names == sorted(names)
    for info in data["tar_infos"]:
        assert (info.mtime, info.uid, info.gid, info.uname, info.gname) == (0, 0, 0, "", "")
    assert data["members"] and all(MEMBER_RE.match(n) for n in data["members"])
    supers = {MEMBER_RE.match(n)["sup"] for n in data["members"]}
    assert {"Actinopterygii", "Mollusca"} <= supers and len(supers - {"Actinopterygii", "Mollusca"}) >= 3


def test_coco_json(small: tuple[dict, dict]) -> None:
    data, result = small
    js = data["json"]
    corrupt = {c["file_name"] for c in result["planted"]["corrupt_jpegs"]}
    seen = set()
    for split in ("train", "val"):
        doc = js[f"{split}2017.json"]
        assert {"images", "categories", "annotations"} <= set(doc)
        cats = {c["id"]: c for c in doc["categories"]}
        assert all(set(c) == {"id", "name", "supercategory"} for c in cats.values())
        assert any(" " in c["name"] for c in cats.values())
        images = {im["id"]: im for im in doc["images"]}
        for im in images.values():
            assert set(im) == {"id", "width", "height", "file_name", "license", "rights_holder"}
            assert max(im["width"], im["height"]) <= 800
            assert im["file_name"] in data["members"]
            sup, cat = im["file_name"].split("/")[1:3]
            if im["file_name"] not in corrupt:
                with Image.open(io.BytesIO(data["members"][im["file_name"]])) as img:
                    img.load()
                    assert img.size == (im["width"], im["height"]) and img.format == "JPEG"
            seen.add(im["file_name"])
        assert len(doc["annotations"]) == len(images)  # one label per image
        for ann in doc["annotations"]:
            assert set(ann) == {"id", "image_id", "category_id"}
            cat = cats[ann["category_id"]]
            path = images[ann["image_id"]]["file_name"]
            assert path.split("/")[1:3] == [cat["supercategory"], cat["name"]]
        # Boxes: same images subset, bbox inside the image, area = w*h, none for plants and fungi.
        boxes = js[f"{split}_2017_bboxes.json"]
        box_images = {im["id"]: im for im in boxes["images"]}
        assert set(box_images) <= set(images)
        assert box_images and all(box_images[i] == images[i] for i in box_images)
        box_cats = {c["id"]: c for c in boxes["categories"]}
        for ann in boxes["annotations"]:
            x, y, w, h = ann["bbox"]
            im = box_images[ann["image_id"]]
            assert 0 <= x and 0 <= y and x + w <= im["width"] and y + h <= im["height"]
            assert ann["area"] == w * h and ann["iscrowd"] == 0
            assert box_cats[ann["category_id"]]["supercategory"] not in ("Plantae", "Fungi")
    assert seen == set(data["members"])  # every tar member is in exactly one split's JSON


def test_locations_and_observers(small: tuple[dict, dict]) -> None:
    data, result = small
    js = data["json"]
    users = {}
    records = []
    for split in ("train", "val"):
        locs = js[f"{split}2017_locations.json"]
        ids = {im["id"] for im in js[f"{split}2017.json"]["images"]}
        assert {r["id"] for r in locs} == ids
        for r in locs:
            assert set(r) == {"id", "lat", "lon", "user_id", "date"}
        users[split] = {r["user_id"] for r in locs}
        records += locs
    assert any(r["lat"] is None for r in records) and any(r["date"] is None for r in records)
    per_user: dict[int, int] = {}
    for r in records:
        per_user[r["user_id"]] = per_user.get(r["user_id"], 0) + 1
    assert sum(per_user.values()) / len(per_user) >= 2  # observers have several images each
    both = users["train"] & users["val"]
    assert both and sorted(both) == result["planted"]["observers_in_both_splits"]


def test_planted_corrupt_jpeg_in_the_marine_subset(small: tuple[dict, dict]) -> None:
    data, result = small
    [corrupt] = result["planted"]["corrupt_jpegs"]
    assert corrupt["supercategory"] in ("Actinopterygii", "Mollusca")
    assert corrupt["file_name"].split("/")[1] == corrupt["supercategory"]
    with pytest.raises(OSError):
        with Image.open(io.BytesIO(data["members"][corrupt["file_name"]])) as img:
            img.load()


def test_deterministic_whatever_the_jobs(runs: dict) -> None:
    (a, ra), (b, rb) = runs["a"], runs["b"]
    assert ra == rb
    for name in OBJECTS:
        assert (a / BUCKET / name).read_bytes() == (b / BUCKET / name).read_bytes()


def test_larger_scale_is_a_superset(runs: dict) -> None:
    small_data, large_data = _read(runs["a"][0]), _read(runs["c"][0])
    assert len(large_data["members"]) > len(small_data["members"])
    for name, content in small_data["members"].items():
        assert large_data["members"][name] == content
    for name, doc in small_data["json"].items():
        large = large_data["json"][name]
        if isinstance(doc, list):
            assert all(r in large for r in doc)
            continue
        for key in ("images", "annotations", "categories"):
            assert all(r in large[key] for r in doc[key]), f"{name}:{key}"
    # The gzip stream is one object: prefix-identical bytes are not expected, content is.
    assert gzip.decompress(small_data["tar_raw"])[:512] == gzip.decompress(large_data["tar_raw"])[:512]
