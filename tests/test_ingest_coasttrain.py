"""ingest@coasttrain on the sample Coast Train release fetched through the real fetch code (the
session's `fetched_root`), on the real metadata CSVs and the authors' remap configs, and on damaged
or hostile copies of one record, all through the real runner (`stages.ingest.ingest_source`)."""

from __future__ import annotations

import ast
import csv
import io
import json
import math
import re
import shutil
import tempfile
import unicodedata
import zipfile
import zlib
from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO, ingest_context
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from stages.config import load_params
from stages.errors import TidepoolError, UpstreamFormatError
from stages.imaging import pixel_sha256
from stages.ingest import coasttrain, coasttrain_npz, ingest_source
from stages.ingest.context import IngestContext
from stages.samplegen.coasttrain import npz_bytes

REFERENCE = REPO / "tests" / "reference" / "coasttrain"  # vendored, see its NOTICE.md
REMAP_CSV = REPO / "data" / "tables" / "coasttrain" / "remap.csv"
TABLES = ("samples.parquet", "points.parquet", "quarantine.parquet")


def _table() -> dict[str, str]:
    """remap.csv read independently of the adapter: class name -> superclass."""
    with open(REMAP_CSV, encoding="utf-8", newline="") as fh:
        return {row["class_name"]: row["superclass"] for row in csv.DictReader(fh)}


def _super_classes() -> list[str]:
    orders = {tuple(json.loads(p.read_text())["super_classes"]) for p in REFERENCE.glob("remap_*.json")}
    assert len(orders) == 1
    return list(orders.pop())


def _lut_ids() -> dict[str, int]:
    order = _super_classes()
    return {name: (255 if sup == "ignore" else order.index(sup)) for name, sup in _table().items()}


def _expected_mask(npz_path: Path, label_key: str = "label") -> np.ndarray:
    """argmax of the one-hot label, remapped through the table; 255 where the one-hot is empty."""
    with np.load(npz_path, allow_pickle=False) as z:
        onehot, classes = z[label_key], [str(c) for c in z["classes"]]
    ids = _lut_ids()
    lut = np.array([ids.get(c, 254) for c in classes] + [255] * (256 - len(classes)), dtype=np.uint8)
    mask = lut[onehot.argmax(-1)]
    mask[onehot.sum(-1) == 0] = 255
    return mask


def _read(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _run(ctx: IngestContext) -> SimpleNamespace:
    metrics = ingest_source(ctx)
    samples = _read(ctx.out_dir / "samples.parquet")
    return SimpleNamespace(
        ctx=ctx,
        metrics=metrics,
        samples=samples,
        by_upstream={s["upstream_id"]: s for s in samples},
        quarantine=_read(ctx.out_dir / "quarantine.parquet"),
    )


@pytest.fixture(scope="module")
def ct(
    fetched_root: Path, sample_upstream: Path, tmp_path_factory: pytest.TempPathFactory
) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("ct-out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIDEPOOL_CACHE_DIR", str(tmp_path_factory.mktemp("ct-cache")))
        result = _run(ingest_context("coasttrain", fetched_root, out_root=out))
    result.root = fetched_root
    result.out = out
    result.raw = fetched_root / "data" / "raw" / "coasttrain"
    result.planted = json.loads((sample_upstream / "PLANTED.json").read_text())["coasttrain"]
    return result


def _ref(case: dict) -> str:
    return f"{case['record']}/{case['npz']}"


# --- the remap table against the real metadata and the authors' configs ------------------------


def test_remap_covers_every_class_name_in_the_real_metadata():
    names: set[str] = set()
    csvs = sorted(REFERENCE.glob("*.csv"))
    assert len(csvs) == 10
    for path in csvs:
        with open(path, encoding="latin-1", newline="") as fh:
            for row in csv.DictReader(fh):
                for column in ("classes_array", "classes_present_array"):
                    if row.get(column):
                        names.update(ast.literal_eval(f"[{row[column]}]"))
    table = coasttrain.load_remap(REPO / "data" / "tables")
    assert names and names <= set(table), sorted(names - set(table))


def test_remap_agrees_with_the_authors_configs_except_nodata():
    table = _table()
    configs = sorted(REFERENCE.glob("remap_coast_train_classes_*.json"))
    assert len(configs) == 10
    for path in configs:
        pairs = json.loads(path.read_text(), object_pairs_hook=lambda kv: kv)
        config = dict(pairs)
        assert config["super_classes"] == list(coasttrain.COMMON_CLASSES)
        for name, superclass in config["aliases"]:
            expected = "ignore" if name in ("nodata", "no_data") else superclass
            assert table.get(name) == expected, (path.name, name)
        assert set(config["classes"]) <= set(table), path.name
    assert table["nodata"] == table["no_data"] == "ignore"
    assert coasttrain.load_remap(REPO / "data" / "tables")["no_data"] == 255


def test_the_real_metadata_csvs_read_whole(tmp_path):
    """Every real served CSV: each data line a row, none a problem, the file cell joined by name."""
    from stages.ingest.coasttrain_meta import read_metadata_csv

    for path in sorted(REFERENCE.glob("*_served.csv")):
        table = read_metadata_csv(path)
        with open(path, encoding="latin-1", newline="") as fh:
            expected = list(csv.DictReader(fh))
        assert [r.problem for r in table.rows] == [None] * len(expected), path.name
        assert [r.key for r in table.rows] == [
            Path(e["annotation_image_filename"].replace("\\", "/")).name for e in expected
        ]
        assert all(r.metadata is not None and r.metadata.lat is not None for r in table.rows), path.name


def test_a_remap_table_that_is_not_utf8_fails_naming_it(tmp_path):
    tables = tmp_path / "tables"
    shutil.copytree(REPO / "data" / "tables", tables)
    path = tables / "coasttrain" / "remap.csv"
    path.write_bytes(path.read_bytes() + "caf\xe9,other\n".encode("latin-1"))
    with pytest.raises(TidepoolError, match=r"remap\.csv: not UTF-8"):
        coasttrain.load_remap(tables)


# --- planted cases -----------------------------------------------------------------------------


def test_masks_equal_the_one_hot_argmax_remapped(ct):
    assert len(ct.samples) >= 25
    ids = _lut_ids()
    for s in ct.samples:
        expected = _expected_mask(ct.root / s["image_path"])
        assert 254 not in expected  # every pixel class of a sample is in the table
        mask_file = ct.out / s["mask_path"]
        with Image.open(mask_file) as img:
            assert img.mode == "L"
            mask = np.asarray(img)
        np.testing.assert_array_equal(mask, expected, err_msg=s["sample_id"])
        labels = json.loads(s["labels"])
        counts = np.bincount(expected.reshape(-1), minlength=256)
        order = list(coasttrain.COMMON_CLASSES)
        assert labels["pixels"] == {
            **{c: int(counts[i]) for i, c in enumerate(order)},
            "ignore": int(counts[255]),
        }
        assert labels["present"] == [c for i, c in enumerate(order) if counts[i]]
        native = json.loads(s["native_labels"])
        assert set(ids[c] for c in native["classes_present"]) - {255} == {
            order.index(c) for c in labels["present"]
        }
    # nodata strips exist in the sample release and became 255
    assert any(json.loads(s["labels"])["pixels"]["ignore"] for s in ct.samples)


def test_earlier_doodling_passes_are_not_used(ct):
    checked = 0
    for s in ct.samples:
        path = ct.root / s["image_path"]
        with np.load(path, allow_pickle=False) as z:
            if "0label" not in z.files:
                continue
            final_rgb = z["orig_image"][..., :3]
            earlier_rgb = z["0image"]
        earlier = _expected_mask(path, "0label")
        with Image.open(ct.out / s["mask_path"]) as img:
            mask = np.asarray(img)
        assert s["pixel_sha256"] == pixel_sha256(final_rgb)
        assert s["pixel_sha256"] != pixel_sha256(earlier_rgb)
        if not np.array_equal(earlier, mask):
            checked += 1
    assert checked >= 3  # the planted earlier passes differ, so a prefixed-key reader would be caught


def test_npz_that_needs_pickle_is_quarantined(ct):
    (case,) = ct.planted["pickle_npz"]
    rows = [q for q in ct.quarantine if q["record_id"] == _ref(case)]
    assert [(q["reason"], q["record_kind"]) for q in rows] == [("npz_needs_pickle", "image")]
    assert case["key"] in rows[0]["detail"]
    assert rows[0]["file"] == f"data/raw/coasttrain/{_ref(case)}"
    assert _ref(case) not in ct.by_upstream
    # its CSV row is accounted for as well
    unusable = [q for q in ct.quarantine if q["reason"] == "image_unusable" and _ref(case) in q["detail"]]
    assert len(unusable) == 1 and unusable[0]["record_kind"] == "annotation_row"


def test_unknown_class_is_quarantined_naming_it(ct):
    (case,) = ct.planted["unknown_class"]
    rows = [q for q in ct.quarantine if q["record_id"] == _ref(case)]
    assert [q["reason"] for q in rows] == ["unknown_class"]
    assert repr(case["class"]) in rows[0]["detail"]
    assert ct.metrics["unknown_classes"] == {case["class"]: 1}
    assert _ref(case) not in ct.by_upstream
    stem = Path(case["npz"]).stem
    assert not (
        ct.out
        / "data"
        / "interim"
        / "coasttrain"
        / "masks"
        / f"{coasttrain.sample_id_for(case['record'], stem)}.png"
    ).exists()
    assert ct.metrics["crosswalk"]["total"] == ct.metrics["crosswalk"]["mapped"] + 1


def test_a_label_that_is_not_one_hot_is_quarantined(ct):
    (case,) = ct.planted["not_one_hot"]
    with np.load(ct.raw / _ref(case), allow_pickle=False) as z:
        assert (z["label"] == 1).all() and z["label"].shape[2] > 1  # as planted: all ones
    rows = [q for q in ct.quarantine if q["record_id"] == _ref(case)]
    assert [(q["reason"], q["record_kind"]) for q in rows] == [("not_one_hot", "image")]
    assert "not one-hot" in rows[0]["detail"]
    assert _ref(case) not in ct.by_upstream  # not a mask of channel 0 everywhere
    unusable = [q for q in ct.quarantine if q["reason"] == "image_unusable" and _ref(case) in q["detail"]]
    assert len(unusable) == 1 and unusable[0]["record_kind"] == "annotation_row"


def test_an_earlier_doodler_session_is_superseded_by_the_newest(ct):
    (case,) = ct.planted["superseded_npz"]
    old, kept = f"{case['record']}/{case['npz']}", f"{case['record']}/{case['kept']}"
    assert Path(case["npz"]).name == Path(case["kept"]).name  # one npz name, two session folders
    rows = [q for q in ct.quarantine if q["record_id"] == old]
    assert [(q["reason"], q["record_kind"]) for q in rows] == [("superseded", "image")]
    older, newer = case["sessions"]
    assert older in rows[0]["detail"] and newer in rows[0]["detail"]
    sample = ct.by_upstream[kept]
    assert old not in ct.by_upstream
    # The kept one is the newer session's file, and its CSV row (named by file name only) joined it.
    np.testing.assert_array_equal(
        np.asarray(Image.open(ct.out / sample["mask_path"])),
        _expected_mask(ct.raw / case["record"] / case["kept"]),
    )
    assert not np.array_equal(_expected_mask(ct.raw / old), _expected_mask(ct.raw / kept))
    assert sample["lat"] is not None and json.loads(sample["native_labels"])["geo"] is not None
    record = ct.metrics["records"][case["record"]]
    npz_on_disk = len(list((ct.raw / case["record"]).rglob("*.npz")))
    assert record["npz"] == npz_on_disk == record["samples"] + sum(record["quarantined"].values())
    assert record["quarantined"] == {"superseded": 1} and ct.metrics["quarantine"]["superseded"] == 1


def test_npz_without_csv_row_is_a_sample_grouped_with_its_scene(ct):
    orphans = ct.planted["npz_without_csv_row"]
    assert len(orphans) == 3
    for case in orphans:
        s = ct.by_upstream[_ref(case)]
        assert s["lat"] is None and s["lon"] is None and s["captured_at"] is None
        assert json.loads(s["native_labels"])["geo"] is None
        siblings = [
            o
            for o in ct.samples
            if o["session"] == s["session"] and o["sample_id"] != s["sample_id"] and o["lat"] is not None
        ]
        assert siblings, s["session"]
        assert s["spatial_block"] in {o["spatial_block"] for o in siblings}
    assert ct.metrics["npz_without_csv_row"] == 3


def test_four_band_orig_image_is_cut_to_rgb(ct):
    cases = ct.planted["four_band_npz"]
    assert cases
    for case in cases:
        s = ct.by_upstream[_ref(case)]
        path = ct.root / s["image_path"]
        with np.load(path, allow_pickle=False) as z:
            orig = z["orig_image"]
        assert orig.shape[2] == 4
        image = coasttrain.load_coasttrain_image(path)
        assert image.shape == (s["height"], s["width"], 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(image, orig[..., :3])
        assert s["pixel_sha256"] == pixel_sha256(orig[..., :3])


def test_mixed_class_lists_in_one_record(ct):
    mixed = ct.planted["mixed_class_lists"]
    assert {"NAIP_11_001", "NAIP_6_001", "Sentinel2_11_001", "Orthophoto_8_001"} <= set(mixed)
    for record, lists in mixed.items():
        seen = {
            ", ".join(f"'{c}'" for c in json.loads(s["native_labels"])["classes"])
            for s in ct.samples
            if s["upstream_id"].startswith(record + "/")
        }
        expected = {x for x in lists if "wrack" not in x}  # the wrack npz is quarantined
        assert seen == expected, record
    # each list's own names are remapped: every class present in a tile shows up in its mask
    ids = _lut_ids()
    checked = set()
    for s in ct.samples:
        native = json.loads(s["native_labels"])
        if native["record"] not in mixed:
            continue
        with Image.open(ct.out / s["mask_path"]) as img:
            values = set(np.unique(np.asarray(img)).tolist())
        assert {ids[c] for c in native["classes_present"]} == values
        checked.add((native["record"], tuple(native["classes"])))
    assert len(checked) >= 2 * 4


def test_csv_metadata_joined_and_normalised(ct):
    (case,) = ct.planted["non_ascii_csv"]
    s = ct.by_upstream[_ref(case)]  # a latin-1 CSV cell joined to a UTF-8 file name
    assert s["lat"] is not None and s["spatial_block"].startswith("lat")
    assert s["sample_id"].isascii() and "." not in s["sample_id"]
    geo_by_record = {}
    for s in ct.samples:
        native = json.loads(s["native_labels"])
        if native["geo"] is not None:
            geo_by_record.setdefault(native["record"], native["geo"])
            assert s["captured_at"] and s["lat"] is not None
            assert native["geo"]["lat_min"] <= s["lat"] <= native["geo"]["lat_max"]
    naip_crs = {
        json.loads(s["native_labels"])["geo"]["crs"]
        for s in ct.samples
        if s["upstream_id"].startswith("NAIP_11_001/") and s["lat"] is not None
    }
    # the cell reads '"NAD83 / UTM zone 17N"' with the quotes inside the value
    assert naip_crs and all(re.fullmatch(r"NAD83 / UTM zone \d+N", c) for c in naip_crs), naip_crs
    for record in ("Orthophoto_8_001", "Orthophoto_12_001", "Sentinel2_4_001", "Quadrangles_7_001"):
        assert geo_by_record[record]["crs"] is None  # n/a, na, empty
    assert geo_by_record["Orthophoto_12_001"]["px_size_m"] == 0.05


def test_neighbouring_tiles_share_a_block(ct):
    by_session: dict[str, set[str]] = {}
    for s in ct.samples:
        by_session.setdefault(s["session"], set()).add(s["spatial_block"])
    grid_sessions = [k for k in by_session if k.startswith(("Orthophoto_", "NAIP_"))]
    assert grid_sessions
    for key in grid_sessions:
        assert len(by_session[key]) == 1, key


def test_every_input_lands_exactly_once(ct):
    npz_on_disk = sorted(ct.raw.rglob("*.npz"))
    csv_rows = 0
    for record_dir in sorted(p for p in ct.raw.iterdir() if p.is_dir()):
        (csv_path,) = record_dir.glob("*.csv")
        csv_rows += len(list(csv.DictReader(io.StringIO(csv_path.read_bytes().decode("latin-1")))))
    assert ct.metrics["inputs"] == {"image": len(npz_on_disk), "annotation_row": csv_rows}
    images_q = [q for q in ct.quarantine if q["record_kind"] == "image"]
    rows_q = [q for q in ct.quarantine if q["record_kind"] == "annotation_row"]
    assert len(ct.samples) + len(images_q) == len(npz_on_disk)
    assert ct.metrics["csv_rows_joined"] + len(rows_q) == csv_rows
    ids = {s["upstream_id"] for s in ct.samples} | {q["record_id"] for q in images_q}
    assert ids == {p.relative_to(ct.raw).as_posix() for p in npz_on_disk}
    assert sum(ct.metrics["classes"].values()) >= len(ct.samples)
    per_record = Counter()
    for record in ct.metrics["records"].values():
        per_record.update(record["quarantined"])
    assert dict(per_record) == {r: n for r, n in ct.metrics["quarantine"].items() if r != "image_unusable"}
    assert set(ct.metrics["quarantine"]) == {
        "image_unusable",
        "not_one_hot",
        "npz_needs_pickle",
        "superseded",
        "unknown_class",
    }


def test_ids_are_stable_and_outputs_byte_identical_whatever_the_jobs_or_cache(ct, tmp_path, monkeypatch):
    ids = [s["sample_id"] for s in ct.samples]
    assert ids == sorted(set(ids))
    assert all(i.isascii() and "." not in i and i.startswith("coasttrain-") for i in ids)
    # jobs=1 and no cache here; jobs=2 and a cold cache in the fixture
    monkeypatch.setenv("TIDEPOOL_CACHE", "0")
    ctx = replace(ingest_context("coasttrain", ct.root, out_root=tmp_path), jobs=1)
    metrics = ingest_source(ctx)
    assert metrics == ct.metrics
    ours = ct.out / "data" / "interim" / "coasttrain"
    for name in TABLES:
        assert (ctx.out_dir / name).read_bytes() == (ours / name).read_bytes(), name
    masks = sorted(p.name for p in (ctx.out_dir / "masks").iterdir())
    assert masks == sorted(Path(s["mask_path"]).name for s in ct.samples)
    for name in masks:
        assert (ctx.out_dir / "masks" / name).read_bytes() == (ours / "masks" / name).read_bytes()


# --- changed, damaged or hostile inputs, on a copy of one record ---------------------------------


def _copy_record(ct, tmp_path: Path, record: str) -> tuple[Path, Path]:
    root = tmp_path / "project"
    shutil.copytree(ct.raw / record, root / "data" / "raw" / "coasttrain" / record)
    shutil.copytree(REPO / "data" / "tables", root / "data" / "tables")
    (csv_path,) = (root / "data" / "raw" / "coasttrain" / record).glob("*.csv")
    return root, csv_path


def _one_record(root: Path, record: str, **overrides) -> SimpleNamespace:
    # one worker: a pool's start-up would cost more than these few npz
    ctx = replace(
        ingest_context("coasttrain", root, sources__coasttrain__records=[record], **overrides), jobs=1
    )
    return _run(ctx)


def _image_rows(result: SimpleNamespace) -> dict[str, dict]:
    return {q["record_id"]: q for q in result.quarantine if q["record_kind"] == "image"}


def test_csv_row_without_npz_is_missing_image(ct, tmp_path):
    root, csv_path = _copy_record(ct, tmp_path, "Sentinel2_4_001")
    gone = sorted((csv_path.parent / "npz").glob("*.npz"))[0]
    gone.unlink()
    result = _one_record(root, "Sentinel2_4_001")
    rows = [q for q in result.quarantine if q["record_kind"] == "annotation_row"]
    assert [q["reason"] for q in rows] == ["missing_image"]
    assert gone.name in rows[0]["detail"] and rows[0]["file"].endswith(csv_path.name)
    assert result.metrics["inputs"]["annotation_row"] == result.metrics["csv_rows_joined"] + 1


def test_csv_without_the_npz_column_fails_naming_the_csv(ct, tmp_path):
    root, csv_path = _copy_record(ct, tmp_path, "Landsat8_12_001")
    text = csv_path.read_bytes().decode("latin-1").replace("annotation_image_filename", "npz_file", 1)
    csv_path.write_bytes(text.encode("latin-1"))
    with pytest.raises(UpstreamFormatError) as info:
        _one_record(root, "Landsat8_12_001")
    message = str(info.value)
    assert csv_path.name in message and "annotation_image_filename" in message and "npz_file" in message


def test_record_without_metadata_csv_fails(ct, tmp_path):
    root, csv_path = _copy_record(ct, tmp_path, "Landsat8_12_001")
    csv_path.unlink()
    with pytest.raises(UpstreamFormatError, match="Landsat8_12_001.*one metadata CSV"):
        _one_record(root, "Landsat8_12_001")


def test_a_header_only_metadata_csv_fails_loudly(ct, tmp_path):
    root, csv_path = _copy_record(ct, tmp_path, "Landsat8_12_001")
    header = csv_path.read_bytes().split(b"\n", 1)[0]
    csv_path.write_bytes(header + b"\n")
    with pytest.raises(UpstreamFormatError, match=rf"{csv_path.name}: .*header but no data rows"):
        _one_record(root, "Landsat8_12_001")
    csv_path.write_bytes(header)  # and without the final newline
    with pytest.raises(UpstreamFormatError, match="header but no data rows"):
        _one_record(root, "Landsat8_12_001")


def test_a_record_without_npz_fails_loudly(ct, tmp_path):
    root, csv_path = _copy_record(ct, tmp_path, "Landsat8_12_001")
    shutil.rmtree(csv_path.parent / "npz")
    with pytest.raises(UpstreamFormatError, match=r"Landsat8_12_001: the record holds no \.npz files"):
        _one_record(root, "Landsat8_12_001")


def test_npz_with_missing_keys_or_garbage_is_unreadable(ct, tmp_path):
    root, csv_path = _copy_record(ct, tmp_path, "Landsat8_12_001")
    npz_dir = csv_path.parent / "npz"
    first, second, third = sorted(npz_dir.glob("*.npz"))[:3]
    with np.load(first, allow_pickle=False) as z:
        kept = {k: z[k] for k in z.files if k != "label"}
    np.savez(first, **kept)  # Doodler output without its `label`
    second.write_bytes(b"PK\x03\x04 not really a zip")
    third.write_bytes(b"")
    result = _one_record(root, "Landsat8_12_001")
    by_npz = _image_rows(result)
    missing = by_npz[f"Landsat8_12_001/npz/{first.name}"]
    assert (
        missing["reason"] == "unreadable_npz"
        and "label" in missing["detail"]
        and "0label" in missing["detail"]
    )
    assert by_npz[f"Landsat8_12_001/npz/{second.name}"]["reason"] == "unreadable_npz"
    assert by_npz[f"Landsat8_12_001/npz/{third.name}"]["reason"] == "empty_file"


def _broken_deflate_copy(good: Path, dest: Path, member: str, at_header: bool) -> None:
    """`good` rewritten with `member`'s deflate stream broken: a block of the invalid type 0b11 (a
    byte 0x06 at a byte-aligned block start), at the stream's start or after half of its data.
    The CRCs are right, so only the deflate stream is wrong."""
    members = []
    with zipfile.ZipFile(good) as zf:
        for info in zf.infolist():
            plain = zf.read(info)
            comp = zlib.compressobj(6, zlib.DEFLATED, -15)
            if info.filename != member:
                raw = comp.compress(plain) + comp.flush()
            elif at_header:
                raw = b"\x06" + comp.compress(plain) + comp.flush()
            else:
                half = len(plain) // 2
                raw = comp.compress(plain[:half]) + comp.flush(zlib.Z_FULL_FLUSH) + b"\x06" + plain[half:]
            members.append((info.filename, raw, len(plain), zlib.crc32(plain)))
    dest.write_bytes(_zip64(members))
    with zipfile.ZipFile(dest) as zf, pytest.raises(zlib.error):
        zf.read(member)  # the damage is what the test says it is


@pytest.mark.parametrize("where", ["data", "header"])
def test_a_corrupt_deflate_stream_inside_a_member_is_unreadable_npz(ct, tmp_path, where):
    root, csv_path = _copy_record(ct, tmp_path, "Landsat8_12_001")
    target = sorted((csv_path.parent / "npz").glob("*.npz"))[0]
    _broken_deflate_copy(target, target, "label.npy", at_header=where == "header")
    result = _one_record(root, "Landsat8_12_001")
    row = _image_rows(result)[f"Landsat8_12_001/npz/{target.name}"]
    assert row["reason"] == "unreadable_npz" and "label.npy" in row["detail"], row
    assert result.metrics["samples"] == 1  # the others of the record (one more is not one-hot)


def test_packs_image_reader_names_the_file_of_a_damaged_npz(ct, tmp_path):
    good = sorted((ct.raw / "Landsat8_12_001" / "npz").glob("*.npz"))[0]
    bad = tmp_path / good.name
    _broken_deflate_copy(good, bad, "orig_image.npy", at_header=False)
    with pytest.raises(UpstreamFormatError, match=rf"{bad.name}: unreadable_npz: member 'orig_image.npy'"):
        coasttrain.load_coasttrain_image(bad, 178956970)
    np.testing.assert_array_equal(
        coasttrain.load_coasttrain_image(good, 178956970), np.load(good)["orig_image"][..., :3]
    )


def _zip64(members: list[tuple[str, bytes, int, int]]) -> bytes:
    """A zip of (name, raw deflate bytes, declared uncompressed size, crc32) members, written by
    hand so that a member may declare more than it carries (zipfile cannot write that). Zip64
    records throughout, so declared sizes may pass 4 GiB."""
    out, central = bytearray(), bytearray()
    for name, raw, size, crc in members:
        offset = len(out)
        encoded = name.encode()
        local_extra = (
            (1).to_bytes(2, "little")
            + (16).to_bytes(2, "little")
            + size.to_bytes(8, "little")
            + len(raw).to_bytes(8, "little")
        )
        out += b"PK\x03\x04" + (45).to_bytes(2, "little") + bytes(2) + (8).to_bytes(2, "little") + bytes(4)
        out += (
            crc.to_bytes(4, "little")
            + b"\xff\xff\xff\xff" * 2
            + len(encoded).to_bytes(2, "little")
            + len(local_extra).to_bytes(2, "little")
        )
        out += encoded + local_extra + raw
        extra = (1).to_bytes(2, "little") + (24).to_bytes(2, "little") + size.to_bytes(8, "little")
        extra += len(raw).to_bytes(8, "little") + offset.to_bytes(8, "little")
        central += (
            b"PK\x01\x02" + (45).to_bytes(2, "little") * 2 + bytes(2) + (8).to_bytes(2, "little") + bytes(4)
        )
        central += crc.to_bytes(4, "little") + b"\xff\xff\xff\xff" * 2
        central += len(encoded).to_bytes(2, "little") + len(extra).to_bytes(2, "little")
        central += bytes(10) + b"\xff\xff\xff\xff" + encoded + extra
    cd_offset, n = len(out), len(members)
    out += central
    eocd64 = len(out)
    out += b"PK\x06\x06" + (44).to_bytes(8, "little") + (45).to_bytes(2, "little") * 2 + bytes(8)
    out += n.to_bytes(8, "little") * 2 + len(central).to_bytes(8, "little") + cd_offset.to_bytes(8, "little")
    out += b"PK\x06\x07" + bytes(4) + eocd64.to_bytes(8, "little") + (1).to_bytes(4, "little")
    out += b"PK\x05\x06" + bytes(4) + b"\xff\xff" * 2 + b"\xff\xff\xff\xff" * 2 + bytes(2)
    return bytes(out)


def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
    )
    return header.getvalue()


def _npy_member(
    name: str, dtype: str, shape: tuple[int, ...], data: bytes | None = None, declared: int | None = None
) -> tuple[str, bytes, int, int]:
    """A `.npy` zip member declaring dtype x shape. With `data`, a whole member; without, a stream
    of the header and 4 KiB of zeros that declares (in the zip) `declared` bytes, by default as many
    as the header says: a bomb's declaration, without its gigabytes."""
    header = _npy_header(dtype, shape)
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    body = data if data is not None else bytes(4096)
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    raw = comp.compress(header + body) + comp.flush(zlib.Z_FINISH if data is not None else zlib.Z_SYNC_FLUSH)
    if data is not None:
        return f"{name}.npy", raw, len(header) + len(data), zlib.crc32(header + data)
    return f"{name}.npy", raw, declared if declared is not None else len(header) + nbytes, 0


# Just inside limits.max_image_pixels (178956970), so that only a byte bound can see the bomb.
SIDE = 13370


@pytest.mark.parametrize(
    ("bombs", "member"),
    [
        # a 7.2 GB one-hot label (40 channels) over an image of the largest allowed size
        ((("image", "|u1", (SIDE, SIDE, 3)), ("label", "|u1", (SIDE, SIDE, 40))), "label"),
        # 3e9 one-character names: 12 GB of UCS-4, and 3e9 Python strings if ever turned into them
        ((("classes", "<U1", (3_000_000_000,)),), "classes"),
    ],
)
def test_npz_memory_bombs_are_refused_from_their_headers(ct, tmp_path, bombs, member):
    root, csv_path = _copy_record(ct, tmp_path, "Landsat8_12_001")
    target = sorted((csv_path.parent / "npz").glob("*.npz"))[0]
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    members = {
        "image": _npy_member("image", "|u1", (8, 8, 3), image.tobytes()),
        "label": _npy_member("label", "|u1", (8, 8, 1), np.ones((8, 8, 1), np.uint8).tobytes()),
        "classes": _npy_member("classes", "<U5", (1,), np.asarray(["water"]).tobytes()),
    }
    for bomb in bombs:
        members[bomb[0]] = _npy_member(*bomb)
    target.write_bytes(_zip64(list(members.values())))
    assert target.stat().st_size < 1 << 20
    with zipfile.ZipFile(target) as zf:
        assert zf.getinfo(f"{member}.npy").file_size > 7 * 10**9  # the declaration the bomb makes
    result = _one_record(root, "Landsat8_12_001")
    row = _image_rows(result)[f"Landsat8_12_001/npz/{target.name}"]
    assert row["reason"] == "npz_too_large", row
    assert f"`{member}`" in row["detail"] and "ingest.coasttrain_max_npz_bytes" in row["detail"]


def test_a_header_that_lies_about_its_data_is_unreadable_without_allocating(tmp_path):
    image = _npy_member("image", "|u1", (8, 8, 3), bytes(192))
    # A label header declaring 13000 x 13000 x 40 (6.8 GB) over 4 KiB of data in an honest zip:
    # numpy would allocate the declared array before finding out.
    shape = (13000, 13000, 40)
    lying = _npy_member("label", "|u1", shape, declared=len(_npy_header("|u1", shape)) + 4096)
    data = _zip64([image, lying, _npy_member("classes", "<U5", (1,), np.asarray(["water"]).tobytes())])
    with pytest.raises(coasttrain_npz.ImageProblem) as info:
        coasttrain_npz.decode_npz(data, max_pixels=178956970, max_bytes=1 << 40)
    assert info.value.reason == "unreadable_npz" and "declares" in info.value.detail


def test_decode_label_rejects_several_classes_at_one_pixel_and_keeps_empty_ones():
    onehot = np.zeros((2, 3, 4), dtype=np.uint8)
    onehot[0, 0, 2] = 1
    onehot[1, 2, 3] = 1
    np.testing.assert_array_equal(coasttrain_npz.decode_label(onehot), [[2, 255, 255], [255, 255, 3]])
    onehot[0, 1, 0] = onehot[0, 1, 1] = 1
    with pytest.raises(coasttrain_npz.ImageProblem) as info:
        coasttrain_npz.decode_label(onehot)
    assert info.value.reason == "not_one_hot" and "at 1 of 6 pixels" in info.value.detail


def test_a_csv_field_over_the_csv_modules_limit_is_one_bad_record(ct, tmp_path):
    root, csv_path = _copy_record(ct, tmp_path, "Landsat8_12_001")
    lines = csv_path.read_bytes().decode("latin-1").split("\n")
    header = lines[0].split(",")
    at = header.index("acc_georef")
    fields = lines[2].split(",")
    fields[at] = "9" * 200_000  # over csv's 128 KiB field limit
    lines[2] = ",".join(fields)
    csv_path.write_bytes("\n".join(lines).encode("latin-1"))
    result = _one_record(root, "Landsat8_12_001")
    rows = [q for q in result.quarantine if q["record_kind"] == "annotation_row"]
    bad = [q for q in rows if q["reason"] == "bad_record"]
    assert len(bad) == 1 and bad[0]["record_id"].endswith(f"{csv_path.name}:3")
    assert "field larger than field limit" in bad[0]["detail"] and "line 3" in bad[0]["detail"]
    # the rows after it still join
    n_rows = len([line for line in lines[1:] if line])
    assert result.metrics["csv_rows_joined"] == n_rows - 1 - sum(
        q["reason"] == "image_unusable" for q in rows
    )
    assert result.metrics["npz_without_csv_row"] == 1


def test_a_row_with_the_wrong_number_of_fields_is_a_bad_record(ct, tmp_path):
    root, csv_path = _copy_record(ct, tmp_path, "Sentinel2_4_001")
    lines = csv_path.read_bytes().decode("latin-1").split("\n")
    lines[1] = lines[1].rsplit(",", 3)[0]  # three fields short: later columns would shift
    lines[2] = lines[2] + ",,"  # trailing empty fields are harmless
    csv_path.write_bytes("\n".join(lines).encode("latin-1"))
    result = _one_record(root, "Sentinel2_4_001")
    bad = [q for q in result.quarantine if q["reason"] == "bad_record"]
    assert [q["record_id"].rsplit(":", 1)[1] for q in bad] == ["2"]
    assert "fields where the header has" in bad[0]["detail"]


def test_metadata_csv_encodings(ct, tmp_path):
    """Latin-1 (the release's) and UTF-8 (a re-export) both join non-ASCII names; NFD cells and
    NFD file names join their NFC counterparts."""
    (case,) = ct.planted["non_ascii_csv"]
    record = case["record"]
    root, csv_path = _copy_record(ct, tmp_path, record)
    latin = csv_path.read_bytes()
    text = latin.decode("latin-1")
    assert "ñ" in text and b"\xf1" in latin
    expected = _one_record(root, record).by_upstream[_ref(case)]
    assert expected["lat"] is not None

    csv_path.write_bytes(text.encode("utf-8"))
    assert _one_record(root, record).by_upstream[_ref(case)]["lat"] == expected["lat"]

    csv_path.write_bytes(unicodedata.normalize("NFD", text).encode("utf-8"))
    assert _one_record(root, record).by_upstream[_ref(case)]["lat"] == expected["lat"]

    csv_path.write_bytes(latin)
    nfc_path = root / "data" / "raw" / "coasttrain" / _ref(case)
    nfd_path = nfc_path.with_name(unicodedata.normalize("NFD", nfc_path.name))
    assert nfd_path.name != nfc_path.name
    nfc_path.rename(nfd_path)
    result = _one_record(root, record)
    (sample,) = [s for s in result.samples if s["sample_id"] == expected["sample_id"]]
    assert sample["lat"] == expected["lat"]  # joined, and the same id as the NFC name's


def test_the_same_name_in_folders_without_session_times_is_refused_not_guessed(ct, tmp_path):
    root, csv_path = _copy_record(ct, tmp_path, "Sentinel2_4_001")
    npz_dir = csv_path.parent / "npz"
    original = sorted(npz_dir.glob("*.npz"))[0]
    (npz_dir / "copy").mkdir()
    shutil.copy(original, npz_dir / "copy" / original.name)
    result = _one_record(root, "Sentinel2_4_001")
    rows = _image_rows(result)
    for member in (f"npz/{original.name}", f"npz/copy/{original.name}"):
        assert rows[f"Sentinel2_4_001/{member}"]["reason"] == "bad_record"
        assert "no Doodler session timestamps" in rows[f"Sentinel2_4_001/{member}"]["detail"]
    unusable = [q for q in result.quarantine if q["reason"] == "image_unusable"]
    assert len(unusable) == 1 and original.name in unusable[0]["detail"]


def test_a_folder_or_a_link_named_like_an_npz_is_quarantined(ct, tmp_path):
    root, csv_path = _copy_record(ct, tmp_path, "Landsat8_12_001")
    npz_dir = csv_path.parent / "npz"
    first, second = sorted(npz_dir.glob("*.npz"))[:2]
    first.unlink()
    first.mkdir()
    second.unlink()
    second.symlink_to(REMAP_CSV)
    result = _one_record(root, "Landsat8_12_001")
    rows = _image_rows(result)
    for path in (first, second):
        assert rows[f"Landsat8_12_001/npz/{path.name}"]["reason"] == "not_a_regular_file"


def test_the_byte_bound_is_a_parameter(ct, tmp_path):
    root, _ = _copy_record(ct, tmp_path, "Landsat8_12_001")
    result = _one_record(root, "Landsat8_12_001", ingest__coasttrain_max_npz_bytes=4096)
    assert {q["reason"] for q in _image_rows(result).values()} == {"npz_too_large"}
    with pytest.raises(TidepoolError, match="coasttrain_max_npz_bytes"):
        _one_record(root, "Landsat8_12_001", ingest__coasttrain_max_npz_bytes="lots")


def _cache_stats(cache: Path) -> dict:
    doc = json.loads((cache / "stats" / "ingest@coasttrain.json").read_text())
    return doc["namespaces"][coasttrain_npz.NAMESPACE]


def test_the_work_cache_is_keyed_by_the_npz_bytes_and_the_remap(ct, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TIDEPOOL_CACHE_DIR", str(cache))
    root, _ = _copy_record(ct, tmp_path, "Orthophoto_8_001")
    shutil.copytree(root / "data/raw/coasttrain/Orthophoto_8_001", root / "data/raw/coasttrain/Copy_8_001")
    first = _one_record(root, "Orthophoto_8_001")
    n = _cache_stats(cache)["computed"]
    assert n == len(list((root / "data/raw/coasttrain/Orthophoto_8_001").rglob("*.npz")))

    # The same bytes under another record: taken from the cache, each sample with its own mask.
    both = _run(
        replace(
            ingest_context(
                "coasttrain", root, sources__coasttrain__records=["Copy_8_001", "Orthophoto_8_001"]
            ),
            jobs=1,
        )
    )
    assert _cache_stats(cache)["reused"] == 2 * n and _cache_stats(cache).get("computed", 0) == 0
    for s in first.samples:
        twin = both.by_upstream[s["upstream_id"].replace("Orthophoto_8_001", "Copy_8_001", 1)]
        assert (
            twin["sample_id"] != s["sample_id"] and Path(twin["mask_path"]).name == f"{twin['sample_id']}.png"
        )
        assert (root / twin["mask_path"]).read_bytes() == (root / s["mask_path"]).read_bytes()

    # Another remap table is another setting: every unit is computed again.
    remap = root / "data/tables/coasttrain/remap.csv"
    remap.write_bytes(remap.read_bytes() + b"driftwood,other\n")
    again = _one_record(root, "Orthophoto_8_001")
    assert _cache_stats(cache)["computed"] == n and _cache_stats(cache).get("reused", 0) == 0
    assert again.samples == first.samples


# --- property: any mix of good and bad npz and CSV rows is accounted for exactly once ---------

_KNOWN = sorted(_table())
_npz_spec = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(
            ["good", "good", "good", "pickle", "unknown_listed", "unknown_painted", "garbage", "all_ones"]
        ),
        "classes": st.lists(st.sampled_from(_KNOWN), min_size=1, max_size=5, unique=True),
        "row": st.integers(0, 2),  # CSV rows for this npz: none, one, two (a duplicate)
        "seed": st.integers(0, 2**16),
    }
)


def _write_npz(path: Path, spec: dict) -> np.ndarray | None:
    """A small Doodler-like npz; returns the expected mask for a good one."""
    rng = np.random.default_rng(spec["seed"])
    classes = list(spec["classes"])
    if spec["kind"].startswith("unknown"):
        classes.append("wrack")
    h, w = 6, 7
    index = rng.integers(0, len(classes) - (spec["kind"] == "unknown_listed"), size=(h, w))
    if spec["kind"] == "unknown_painted":
        index[0, 0] = len(classes) - 1
    k = int(index.max()) + 1
    onehot = (index[..., None] == np.arange(k)).astype(np.uint8)
    onehot[rng.random((h, w)) < 0.2] = 0  # unlabelled pixels
    if spec["kind"] == "all_ones":
        onehot = np.ones((h, w, max(2, k)), dtype=np.uint8)
    arrays = {
        "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "label": onehot,
        "classes": np.asarray(classes),
        "settings": np.arange(6, dtype=np.float64),
        "0label": np.zeros_like(onehot),
    }
    if spec["kind"] == "pickle":
        arrays["doodles"] = np.asarray([{"a": 1}], dtype=object)
    path.write_bytes(b"garbage" if spec["kind"] == "garbage" else npz_bytes(arrays, allow_pickle=True))
    if spec["kind"] not in ("good", "unknown_listed"):
        return None
    ids = _lut_ids()
    lut = np.array([ids.get(c, 254) for c in classes] + [255] * 256, dtype=np.uint8)
    mask = lut[onehot.argmax(-1)]
    mask[onehot.sum(-1) == 0] = 255
    return mask


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(_npz_spec, min_size=1, max_size=6), ghost_rows=st.integers(0, 2))
def test_property_inputs_equal_samples_plus_quarantine(specs, ghost_rows):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        record_dir = root / "data" / "raw" / "coasttrain" / "Synthetic_3_001"
        (record_dir / "npz").mkdir(parents=True)
        header = list(coasttrain.REQUIRED_COLUMNS)
        rows, expected = [], {}
        for i, spec in enumerate(specs):
            name = f"tile_{i:02d}_ID1.npz"
            expected[f"Synthetic_3_001/npz/{name}"] = _write_npz(record_dir / "npz" / name, spec)
            for _ in range(spec["row"]):
                rows.append(
                    {
                        **dict.fromkeys(header, "n/a"),
                        "annotation_image_filename": f"/npz/{name}",
                        "LatMin": "10",
                        "LatMax": "10.01",
                        "LonMin": "-20",
                        "LonMax": "-19.99",
                        "year": "2020",
                        "month": "1",
                        "day": "2",
                    }
                )
        # A CSV with no data row fails the stage (tested above): give it at least one.
        ghosts = ghost_rows if rows or ghost_rows else 1
        for g in range(ghosts):
            rows.append({**dict.fromkeys(header, ""), "annotation_image_filename": f"npz/ghost_{g}.npz"})
        with open(record_dir / "meta.csv", "w", encoding="latin-1", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        params = load_params(REPO / "params.yaml")
        params["sources"]["coasttrain"]["records"] = ["Synthetic_3_001"]
        ctx = IngestContext(
            "coasttrain",
            params,
            root,
            root / "data" / "raw" / "coasttrain",
            root / "data" / "interim" / "coasttrain",
            root / "data" / "taxonomy",
            REPO / "data" / "tables",
            jobs=1,
        )
        result = _run(ctx)  # the runner itself fails if inputs != kept + quarantined, per kind

        images_q = _image_rows(result)
        rows_q = [q for q in result.quarantine if q["record_kind"] == "annotation_row"]
        assert result.metrics["inputs"] == {"image": len(specs), "annotation_row": len(rows)}
        assert len(result.samples) + len(images_q) == len(specs)
        assert result.metrics["csv_rows_joined"] + len(rows_q) == len(rows)
        assert sum(q["reason"] == "missing_image" for q in rows_q) == ghosts
        for spec, (upstream_id, mask) in zip(specs, expected.items()):
            reason = {
                "pickle": "npz_needs_pickle",
                "garbage": "unreadable_npz",
                "unknown_painted": "unknown_class",
                "all_ones": "not_one_hot",
            }.get(spec["kind"])
            if reason:
                assert images_q[upstream_id]["reason"] == reason
                continue
            (sample,) = [s for s in result.samples if s["upstream_id"] == upstream_id]
            assert (sample["lat"] is not None) == (spec["row"] > 0)
            with Image.open(root / sample["mask_path"]) as img:
                np.testing.assert_array_equal(np.asarray(img), mask)
