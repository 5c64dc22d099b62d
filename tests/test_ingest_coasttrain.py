"""ingest@coasttrain on the sample Coast Train release fetched through the real fetch code, on the real
metadata CSVs and the authors' remap configs, and on small npz files built here."""

from __future__ import annotations

import ast
import csv
import io
import json
import re
import shutil
import tempfile
import zipfile
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

from stages.config import ENDPOINTS_ENV, load_params
from stages.errors import UpstreamFormatError
from stages.fsutil import write_json
from stages.imaging import pixel_sha256
from stages.ingest import coasttrain
from stages.ingest.context import IngestContext

REFERENCE = REPO / "tests" / "reference" / "coasttrain"  # vendored, see its NOTICE.md
REMAP_CSV = REPO / "data" / "tables" / "coasttrain" / "remap.csv"
# Coast Train needs scale >= 0.5 for every planted case (the wrack npz is index 2 of its record;
# mixed class lists need a record's second site): the shared session upstream is generated at 0.3.
SCALE = 0.5


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


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from stages.fetch import fetch
    from stages.loopback import Loopback
    from stages.samplegen import coasttrain as gen

    upstream = tmp_path_factory.mktemp("ct-upstream")
    generated = gen.generate(upstream, scale=SCALE, jobs=2)
    write_json(upstream / "checksums.json", generated["checksums"])
    root = tmp_path_factory.mktemp("ct-project")
    (root / "dvc.yaml").write_text("stages: {}\n", encoding="utf-8")
    shutil.copytree(REPO / "data" / "tables", root / "data" / "tables")
    with Loopback(upstream=upstream) as lb, pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENDPOINTS_ENV, str(lb.write_overlay(root / "endpoints.yaml")))
        params = load_params(REPO / "params.yaml")
        fetch("coasttrain", params, root / "data" / "raw" / "coasttrain", root / "data" / ".downloads" / "ct")
    out = tmp_path_factory.mktemp("ct-out")
    ctx = ingest_context("coasttrain", root, out_root=out)
    tables, extra = coasttrain.ingest(ctx)
    tables.write(ctx.out_dir)
    samples = _read(ctx.out_dir / "samples.parquet")
    return SimpleNamespace(
        root=root,
        out=out,
        ctx=ctx,
        extra=extra,
        planted=generated["planted"],
        samples=samples,
        by_upstream={s["upstream_id"]: s for s in samples},
        quarantine=_read(ctx.out_dir / "quarantine.parquet"),
        raw=root / "data" / "raw" / "coasttrain",
    )


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
    assert ct.extra["unknown_classes"] == {case["class"]: 1}
    assert _ref(case) not in ct.by_upstream
    stem = Path(case["npz"]).stem
    assert not (ct.ctx.out_dir / "masks" / f"{coasttrain.sample_id_for(case['record'], stem)}.png").exists()
    assert ct.extra["crosswalk"]["total"] == ct.extra["crosswalk"]["mapped"] + 1


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
    assert ct.extra["npz_without_csv_row"] == 3


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
    assert ct.extra["inputs"] == {"npz": len(npz_on_disk), "csv_rows": csv_rows}
    images_q = [q for q in ct.quarantine if q["record_kind"] == "image"]
    rows_q = [q for q in ct.quarantine if q["record_kind"] == "annotation_row"]
    assert len(ct.samples) + len(images_q) == len(npz_on_disk)
    assert ct.extra["csv_rows_joined"] + len(rows_q) == csv_rows
    ids = {s["upstream_id"] for s in ct.samples} | {q["record_id"] for q in images_q}
    assert ids == {p.relative_to(ct.raw).as_posix() for p in npz_on_disk}
    metrics = json.loads(json.dumps(ct.extra))
    assert sum(metrics["classes"].values()) >= len(ct.samples)


def test_ids_are_stable_and_outputs_byte_identical(ct, tmp_path):
    ids = [s["sample_id"] for s in ct.samples]
    assert len(set(ids)) == len(ids)
    assert all(i.isascii() and "." not in i and i.startswith("coasttrain-") for i in ids)
    # jobs=1 here, 2 in the fixture: the outputs must not depend on the worker count either
    ctx = replace(ingest_context("coasttrain", ct.root, out_root=tmp_path), jobs=1)
    tables, _ = coasttrain.ingest(ctx)
    tables.write(ctx.out_dir)
    for name in ("samples.parquet", "quarantine.parquet", "points.parquet"):
        assert (ctx.out_dir / name).read_bytes() == (ct.ctx.out_dir / name).read_bytes(), name
    masks = sorted(p.name for p in (ctx.out_dir / "masks").iterdir())
    assert masks == sorted(Path(s["mask_path"]).name for s in ct.samples)
    for name in masks:
        assert (ctx.out_dir / "masks" / name).read_bytes() == (ct.ctx.out_dir / "masks" / name).read_bytes()


# --- changed or damaged inputs, on a copy of one record -----------------------------------------


def _copy_record(ct, tmp_path: Path, record: str) -> tuple[Path, Path]:
    root = tmp_path / "project"
    shutil.copytree(ct.raw / record, root / "data" / "raw" / "coasttrain" / record)
    shutil.copytree(REPO / "data" / "tables", root / "data" / "tables")
    (csv_path,) = (root / "data" / "raw" / "coasttrain" / record).glob("*.csv")
    return root, csv_path


def _one_record_context(root: Path, record: str) -> IngestContext:
    # one worker: a pool's start-up would cost more than these few npz
    return replace(ingest_context("coasttrain", root, sources__coasttrain__records=[record]), jobs=1)


def test_csv_row_without_npz_is_missing_image(ct, tmp_path):
    root, csv_path = _copy_record(ct, tmp_path, "Sentinel2_4_001")
    gone = sorted((csv_path.parent / "npz").glob("*.npz"))[0]
    gone.unlink()
    ctx = _one_record_context(root, "Sentinel2_4_001")
    tables, extra = coasttrain.ingest(ctx)
    (row,) = tables.quarantine
    assert row["reason"] == "missing_image" and row["record_kind"] == "annotation_row"
    assert gone.name in row["detail"] and row["file"].endswith(csv_path.name)
    assert extra["inputs"]["csv_rows"] == extra["csv_rows_joined"] + 1


def test_csv_without_the_npz_column_fails_naming_the_csv(ct, tmp_path):
    root, csv_path = _copy_record(ct, tmp_path, "Landsat8_12_001")
    text = csv_path.read_bytes().decode("latin-1").replace("annotation_image_filename", "npz_file", 1)
    csv_path.write_bytes(text.encode("latin-1"))
    ctx = _one_record_context(root, "Landsat8_12_001")
    with pytest.raises(UpstreamFormatError) as info:
        coasttrain.ingest(ctx)
    message = str(info.value)
    assert csv_path.name in message and "annotation_image_filename" in message and "npz_file" in message


def test_record_without_metadata_csv_fails(ct, tmp_path):
    root, csv_path = _copy_record(ct, tmp_path, "Landsat8_12_001")
    csv_path.unlink()
    ctx = _one_record_context(root, "Landsat8_12_001")
    with pytest.raises(UpstreamFormatError, match="Landsat8_12_001.*one metadata CSV"):
        coasttrain.ingest(ctx)


def test_npz_with_missing_keys_or_garbage_is_unreadable(ct, tmp_path):
    root, csv_path = _copy_record(ct, tmp_path, "Landsat8_12_001")
    npz_dir = csv_path.parent / "npz"
    first, second = sorted(npz_dir.glob("*.npz"))[:2]
    with np.load(first, allow_pickle=False) as z:
        kept = {k: z[k] for k in z.files if k != "label"}
    np.savez(first, **kept)  # Doodler output without its `label`
    second.write_bytes(b"PK\x03\x04 not really a zip")
    ctx = _one_record_context(root, "Landsat8_12_001")
    tables, _ = coasttrain.ingest(ctx)
    by_npz = {q["record_id"]: q for q in tables.quarantine if q["record_kind"] == "image"}
    missing = by_npz[f"Landsat8_12_001/npz/{first.name}"]
    assert (
        missing["reason"] == "unreadable_npz"
        and "label" in missing["detail"]
        and "0label" in missing["detail"]
    )
    assert by_npz[f"Landsat8_12_001/npz/{second.name}"]["reason"] == "unreadable_npz"


# --- property: any mix of good and bad npz and CSV rows is accounted for exactly once ---------

_KNOWN = sorted(_table())
_npz_spec = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(
            ["good", "good", "good", "pickle", "unknown_listed", "unknown_painted", "garbage"]
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
    arrays = {
        "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "label": onehot,
        "classes": np.asarray(classes),
        "settings": np.arange(6, dtype=np.float64),
        "0label": np.zeros_like(onehot),
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for key, value in arrays.items():
            with zf.open(f"{key}.npy", "w") as fh:
                np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)
        if spec["kind"] == "pickle":
            with zf.open("doodles.npy", "w") as fh:
                np.lib.format.write_array(fh, np.asarray([{"a": 1}], dtype=object), allow_pickle=True)
    path.write_bytes(b"garbage" if spec["kind"] == "garbage" else buf.getvalue())
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
        for g in range(ghost_rows):
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
        tables, extra = coasttrain.ingest(ctx)
        tables.check()

        images_q = {q["record_id"]: q for q in tables.quarantine if q["record_kind"] == "image"}
        rows_q = [q for q in tables.quarantine if q["record_kind"] == "annotation_row"]
        assert extra["inputs"] == {"npz": len(specs), "csv_rows": len(rows)}
        assert len(tables.samples) + len(images_q) == len(specs)
        assert extra["csv_rows_joined"] + len(rows_q) == len(rows)
        assert sum(q["reason"] == "missing_image" for q in rows_q) == ghost_rows
        for spec, (upstream_id, mask) in zip(specs, expected.items()):
            reason = {
                "pickle": "npz_needs_pickle",
                "garbage": "unreadable_npz",
                "unknown_painted": "unknown_class",
            }.get(spec["kind"])
            if reason:
                assert images_q[upstream_id]["reason"] == reason
                continue
            (sample,) = [s for s in tables.samples if s["upstream_id"] == upstream_id]
            assert (sample["lat"] is not None) == (spec["row"] > 0)
            with Image.open(root / sample["mask_path"]) as img:
                np.testing.assert_array_equal(np.asarray(img), mask)
