"""ingest@inat2017 on the sample bucket fetched through the real fetch code (the session fixtures),
and on small synthetic trees for format changes and the accounting property."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from conftest import REPO, ingest_context
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from stages.config import load_params
from stages.errors import UpstreamFormatError
from stages.ingest import inat2017
from stages.ingest.context import IngestContext

SELECTED = {"Actinopterygii", "Mollusca"}
PARAMS = load_params(REPO / "params.yaml")


def _read(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def inat(
    fetched_root: Path, sample_upstream: Path, tmp_path_factory: pytest.TempPathFactory
) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("inat-out")
    ctx = ingest_context("inat2017", fetched_root, out_root=out)
    tables, extra = inat2017.ingest(ctx)
    tables.write(ctx.out_dir)
    raw = fetched_root / "data" / "raw" / "inat2017"
    samples = _read(ctx.out_dir / "samples.parquet")
    return SimpleNamespace(
        root=fetched_root,
        raw=raw,
        ctx=ctx,
        extra=extra,
        planted=_json(sample_upstream / "PLANTED.json")["inat2017"],
        samples=samples,
        by_id={s["upstream_id"]: s for s in samples},
        quarantine=_read(ctx.out_dir / "quarantine.parquet"),
        coco={split: _json(raw / f"{split}2017.json") for split in ("train", "val")},
    )


def _images_by_split(inat) -> dict[int, tuple[str, dict, str]]:
    """image id -> (split, image record, supercategory), read independently of the adapter."""
    out = {}
    for split, doc in inat.coco.items():
        cats = {c["id"]: c for c in doc["categories"]}
        label = {a["image_id"]: a["category_id"] for a in doc["annotations"]}
        for img in doc["images"]:
            out[img["id"]] = (split, img, cats[label[img["id"]]]["supercategory"])
    return out


def test_corrupt_jpeg_is_quarantined(inat):
    (case,) = inat.planted["corrupt_jpegs"]
    rows = [q for q in inat.quarantine if q["record_id"] == str(case["id"])]
    assert [(q["reason"], q["record_kind"]) for q in rows] == [("corrupt_image", "image")]
    assert rows[0]["file"] == f"data/raw/inat2017/{case['file_name']}"
    assert str(case["id"]) not in inat.by_id
    assert inat.extra["inputs"]["images"] == len(inat.samples) + 1


def test_other_supercategories_are_filtered_and_counted_not_quarantined(inat):
    images = _images_by_split(inat)
    other = Counter(sup for _, _, sup in images.values() if sup not in SELECTED)
    marine = [i for i, (_, _, sup) in images.items() if sup in SELECTED]
    assert other and marine
    assert inat.extra["filtered_by_params"] == {
        "images": other.total(),
        "supercategories": dict(sorted(other.items())),
    }
    assert inat.extra["inputs"] == {"images": len(marine), "orphan_annotations": 0}
    landed = set(inat.by_id) | {q["record_id"] for q in inat.quarantine}
    assert landed == {str(i) for i in marine}
    assert {json.loads(s["labels"])["supercategory"] for s in inat.samples} == SELECTED


def test_every_input_lands_exactly_once(inat):
    q = Counter(q["record_kind"] for q in inat.quarantine)
    assert inat.extra["inputs"]["images"] == len(inat.samples) + q["image"]
    assert inat.extra["inputs"]["orphan_annotations"] == q["annotation_row"]
    assert len(inat.by_id) == len(inat.samples)


def test_observers_in_both_splits_keep_their_official_split(inat):
    images = _images_by_split(inat)
    locations = {
        rec["id"]: rec
        for split in ("train", "val")
        for rec in _json(inat.raw / f"{split}2017_locations.json")
    }
    splits_of: dict[str, set[str]] = defaultdict(set)
    for s in inat.samples:
        split, _, _ = images[int(s["upstream_id"])]
        assert s["official_split"] == split
        assert s["observer"] == str(locations[int(s["upstream_id"])]["user_id"])
        splits_of[s["observer"]].add(split)
    both = {o for o, splits in splits_of.items() if splits == {"train", "val"}}
    assert both and both <= {str(u) for u in inat.planted["observers_in_both_splits"]}
    assert inat.extra["observers"]["in_both_splits"] == len(both)


def test_bboxes_are_attached(inat):
    boxes = defaultdict(list)
    for split in ("train", "val"):
        for ann in _json(inat.raw / f"{split}_2017_bboxes.json")["annotations"]:
            boxes[ann["image_id"]].append(ann)
    multi = 0
    for s in inat.samples:
        native = json.loads(s["native_labels"])
        expected = sorted(boxes.get(int(s["upstream_id"]), []), key=lambda a: a["id"])
        assert [b["bbox"] for b in native["bboxes"]] == [a["bbox"] for a in expected]
        assert [b["area"] for b in native["bboxes"]] == [a["area"] for a in expected]
        multi += len(expected) > 1
    assert multi >= 1
    assert inat.extra["bboxes"]["boxes"] == sum(
        len(json.loads(s["native_labels"])["bboxes"]) for s in inat.samples
    )


def test_locations_dates_and_licences(inat):
    no_location = {str(i) for i in inat.planted["images_without_location"]}
    no_date = {str(i) for i in inat.planted["images_without_date"]}
    images = _images_by_split(inat)
    checked_location = checked_date = 0
    for s in inat.samples:
        if s["upstream_id"] in no_location:
            assert s["lat"] is None and s["lon"] is None and s["observer"] is not None
            checked_location += 1
        else:
            assert -90 <= s["lat"] <= 90 and -180 <= s["lon"] <= 180
        if s["upstream_id"] in no_date:
            assert s["captured_at"] is None
            checked_date += 1
        else:
            assert s["captured_at"][:4].isdigit() and "T" in s["captured_at"]
        _, img, _ = images[int(s["upstream_id"])]
        assert s["license"] == load_params(REPO / "params.yaml")["sources"]["inat2017"]["license"]
        assert img["rights_holder"] in s["attribution"] and "Van Horn" in s["attribution"]
        native = json.loads(s["native_labels"])
        assert native["license_id"] == img["license"] and native["rights_holder"] == img["rights_holder"]
        assert s["image_format"] == "jpeg" and s["pixel_sha256"] is None and s["phash"] is not None
        assert (s["width"], s["height"]) == (img["width"], img["height"])
    assert checked_location + checked_date >= 1
    assert inat.extra["locations"]["date_key"] == "date"


def test_labels_and_class_index_keyed_by_category_id(inat):
    categories = {c["id"]: c for c in inat.coco["train"]["categories"]}
    for s in inat.samples:
        labels = json.loads(s["labels"])
        cat = categories[labels["category_id"]]
        assert labels == {
            "category_id": cat["id"],
            "category": cat["name"],
            "supercategory": cat["supercategory"],
            "class_index": cat["id"],
        }
    classes = _json(inat.ctx.out_dir / "classes.json")
    assert classes == [
        {"category_id": c["id"], "name": c["name"], "supercategory": c["supercategory"]}
        for c in sorted(categories.values(), key=lambda c: c["id"])
        if c["supercategory"] in SELECTED
    ]


def test_ids_and_byte_identical_rerun(inat, tmp_path):
    ids = [s["sample_id"] for s in inat.samples]
    assert all(i == f"inat2017-{s['upstream_id']}" for i, s in zip(ids, inat.samples))
    ctx = replace(ingest_context("inat2017", inat.root, out_root=tmp_path), jobs=1)
    tables, extra = inat2017.ingest(ctx)
    tables.write(ctx.out_dir)
    for name in ("samples.parquet", "quarantine.parquet", "points.parquet", "classes.json"):
        assert (ctx.out_dir / name).read_bytes() == (inat.ctx.out_dir / name).read_bytes(), name
    assert extra == inat.extra


# --- format changes and damaged inputs, on copies -------------------------------------------------


def _copy(inat, tmp_path: Path, with_images: bool = False) -> Path:
    root = tmp_path / "project"
    raw = root / "data" / "raw" / "inat2017"
    raw.mkdir(parents=True)
    for path in inat.raw.glob("*.json"):
        shutil.copy2(path, raw / path.name)
    if with_images:
        shutil.copytree(inat.raw / "train_val_images", raw / "train_val_images")
    return root


def _context(root: Path) -> IngestContext:
    return replace(ingest_context("inat2017", root), jobs=1)


def test_train_json_without_annotations_fails_naming_the_file(inat, tmp_path):
    root = _copy(inat, tmp_path)
    path = root / "data" / "raw" / "inat2017" / "train2017.json"
    doc = _json(path)
    del doc["annotations"]
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(UpstreamFormatError) as info:
        inat2017.ingest(_context(root))
    assert "train2017.json" in str(info.value) and "annotations" in str(info.value)


def test_category_without_supercategory_fails(inat, tmp_path):
    root = _copy(inat, tmp_path)
    path = root / "data" / "raw" / "inat2017" / "val2017.json"
    doc = _json(path)
    doc["categories"] = [{"id": c["id"], "name": c["name"]} for c in doc["categories"]]
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(UpstreamFormatError, match=r"val2017\.json.*supercategory"):
        inat2017.ingest(_context(root))


def test_other_date_key_and_missing_file(inat, tmp_path):
    root = _copy(inat, tmp_path, with_images=True)
    raw = root / "data" / "raw" / "inat2017"
    for split in ("train", "val"):
        path = raw / f"{split}2017_locations.json"
        records = _json(path)
        path.write_text(
            json.dumps(
                [{**{k: v for k, v in r.items() if k != "date"}, "datetime": r["date"]} for r in records]
            ),
            encoding="utf-8",
        )
    gone = next(s for s in inat.samples if s["captured_at"])
    (root / gone["image_path"]).unlink()
    tables, extra = inat2017.ingest(_context(root))
    assert extra["locations"]["date_key"] == "datetime"
    by_id = {s["upstream_id"]: s for s in tables.samples}
    for s in inat.samples:
        if s["upstream_id"] != gone["upstream_id"]:
            assert by_id[s["upstream_id"]]["captured_at"] == s["captured_at"]
    (row,) = [q for q in tables.quarantine if q["record_id"] == gone["upstream_id"]]
    assert row["reason"] == "missing_image" and row["file"] == gone["image_path"]


# --- property: any mix of records is accounted for exactly once -----------------------------------

_SUPERS = ["Actinopterygii", "Mollusca", "Aves", "Plantae"]
_image_spec = st.fixed_dictionaries(
    {
        "split": st.sampled_from(["train", "val"]),
        "category": st.integers(0, 3),
        "kind": st.sampled_from(
            [
                "good",
                "good",
                "good",
                "missing_file",
                "corrupt",
                "no_annotation",
                "unsafe_name",
                "duplicate_id",
            ]
        ),
        "location": st.sampled_from(["full", "null", "absent"]),
    }
)


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (seed % 256, 40, 90)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


@settings(max_examples=60, deadline=None)
@given(specs=st.lists(_image_spec, min_size=1, max_size=8), orphans=st.lists(st.integers(0, 3), max_size=3))
def test_property_inputs_equal_samples_plus_quarantine(specs, orphans):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        raw = root / "data" / "raw" / "inat2017"
        categories = [
            {"id": 10 + i, "name": f"Species {i}", "supercategory": s} for i, s in enumerate(_SUPERS)
        ]
        docs = {s: {"images": [], "categories": categories, "annotations": []} for s in ("train", "val")}
        locations: dict[str, list] = {"train": [], "val": []}
        effective = []  # (category index, kind) of each image record as written
        for i, spec in enumerate(specs):
            kind, category = spec["kind"], spec["category"]
            if kind == "duplicate_id" and i > 0:
                # the previous image listed again (maybe in the other split): same id, file, category
                image = dict(docs[specs[i - 1]["split"]]["images"][-1])
                category = effective[-1][0]
                annotated = "no_annotation" not in effective[-1][1]
                kind = "duplicate" if annotated else "duplicate no_annotation"
            else:
                kind = "good" if kind == "duplicate_id" else kind
                cat = categories[category]
                name = f"train_val_images/{cat['supercategory']}/{cat['name']}/{i:032x}.jpg"
                if kind == "unsafe_name":
                    name = f"train_val_images/../../{i}.jpg"
                image = {
                    "id": 100 + i,
                    "file_name": name,
                    "width": 16,
                    "height": 12,
                    "license": 1,
                    "rights_holder": "R",
                }
                if kind not in ("missing_file", "unsafe_name"):
                    path = raw / name
                    path.parent.mkdir(parents=True, exist_ok=True)
                    data = _jpeg(i)
                    path.write_bytes(data[: len(data) // 2] if kind == "corrupt" else data)
            effective.append((category, kind))
            doc = docs[spec["split"]]
            doc["images"].append(image)
            if "no_annotation" not in kind:
                doc["annotations"].append(
                    {"id": image["id"], "image_id": image["id"], "category_id": 10 + category}
                )
            if spec["location"] != "absent":
                full = spec["location"] == "full"
                locations[spec["split"]].append(
                    {
                        "id": image["id"],
                        "lat": 1.5 if full else None,
                        "lon": 2.5 if full else None,
                        "user_id": 7 if full else None,
                        "date": "2015-06-01 10:00:00" if full else None,
                    }
                )
        for k, c in enumerate(orphans):
            docs["train"]["annotations"].append({"id": 9000 + k, "image_id": 9000 + k, "category_id": 10 + c})
        raw.mkdir(parents=True, exist_ok=True)
        for split in ("train", "val"):
            (raw / f"{split}2017.json").write_text(json.dumps(docs[split]))
            (raw / f"{split}_2017_bboxes.json").write_text(json.dumps({"annotations": []}))
            (raw / f"{split}2017_locations.json").write_text(json.dumps(locations[split]))
        ctx = IngestContext(
            "inat2017",
            PARAMS,
            root,
            raw,
            root / "data" / "interim" / "inat2017",
            root / "data" / "taxonomy",
            root / "data" / "tables",
            jobs=1,
        )
        tables, extra = inat2017.ingest(ctx)
        tables.check()

        marine = [kind for category, kind in effective if _SUPERS[category] in SELECTED]
        selected_orphans = sum(1 for c in orphans if _SUPERS[c] in SELECTED)
        kinds = Counter(q["record_kind"] for q in tables.quarantine)
        assert extra["inputs"] == {"images": len(marine), "orphan_annotations": selected_orphans}
        assert len(tables.samples) + kinds["image"] == len(marine)
        assert kinds["annotation_row"] == selected_orphans
        assert extra["filtered_by_params"]["images"] == len(specs) - len(marine)
        reasons = Counter(q["reason"] for q in tables.quarantine if q["record_kind"] == "image")
        # a second listing of an image id is a bad record whatever its first listing was
        verdict = {
            "good": "sample",
            "corrupt": "corrupt_image",
            "missing_file": "missing_image",
            "no_annotation": "no_annotation",
            "unsafe_name": "bad_record",
        }
        expected = Counter(verdict.get(kind, "bad_record") for kind in marine)
        assert Counter({"sample": len(tables.samples), **reasons}) == expected
        for s in tables.samples:
            assert (s["observer"] is None) == (s["lat"] is None)
