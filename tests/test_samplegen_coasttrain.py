"""The Coast Train sample zips read back the way SOURCES §4 says the real ones do, mirror the real
metadata CSVs, hold every planted case where PLANTED says, and grow as supersets."""

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

from stages.config import load_params
from stages.samplegen import coasttrain

SMALL, LARGER = 0.5, 0.8
REFERENCE = Path(__file__).resolve().parent / "reference" / "coasttrain"  # vendored, see its NOTICE.md
REAL_CSV = {
    "A": "A_naip_meta_served.csv", "B": "B_quads_gulf_meta_served.csv", "C": "C_s2_meta_served.csv",
    "D": "D_s2_4classes_meta_served.csv", "E": "E_L8_meta_all_served.csv", "F": "F_elwha_l8_served.csv",
    "G": "G_madeira_meta_served.csv", "H": "H_dauphin_meta_served.csv", "I": "I_sandwich_metadata_served.csv",
    "J": "J_naip_6class_meta_served.csv",
}
LETTERS = {
    "NAIP_11_001": "A", "Quadrangles_7_001": "B", "Sentinel2_11_001": "C", "Sentinel2_4_001": "D",
    "Landsat8_11_001": "E", "Landsat8_12_001": "F", "Orthophoto_12_001": "G", "Orthophoto_9_001": "H",
    "Orthophoto_8_001": "I", "NAIP_6_001": "J",
}
# SOURCES §4: the authors' remap vocabulary (nodata/no_data are "no class", still known names).
VOCABULARY = {
    "water", "sediment_plume", "whitewater", "surf", "sediment", "sand", "gravel", "gravel_shell",
    "cobble_boulder", "mud_silt", "developed", "dev", "development", "coastal_defense", "pavement_road",
    "other_anthro", "vehicles", "buildings", "other_natural_terrain", "other_bare_natural_terrain",
    "bare_ground", "bedrock", "non-vegetated-wet", "non-vegetated-dry", "agricultural", "vegetated",
    "vegetated_surface", "vegtated_ground", "vegetated_ground", "terrestrial_vegetation", "marsh_vegetation",
    "herbaceous vegetation", "woody vegetation", "unknown", "unusual", "people", "ice_snow", "cloud", "other",
    "nodata", "no_data",
}


def _read(root: Path) -> dict[str, dict]:
    """Per record: zip path, bytes, member list, parsed CSV rows (latin-1) and raw CSV bytes."""
    out = {}
    for record in LETTERS:
        path = root / "http" / "coasttrain" / f"{record}.zip"
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            csvs = [i.filename for i in infos if i.filename.endswith(".csv")]
            assert len(csvs) == 1, f"{record}: expected one metadata CSV, got {csvs}"
            raw_csv = zf.read(csvs[0])
            npz = {i.filename: zf.read(i.filename) for i in infos if i.filename.endswith(".npz")}
        rows = list(csv.DictReader(io.StringIO(raw_csv.decode("latin-1"), newline="")))
        out[record] = {"path": path, "infos": infos, "csv_name": csvs[0], "csv": raw_csv, "rows": rows,
                       "npz": npz}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("coasttrain")
    out = {}
    for name, scale, jobs in (("a", SMALL, 2), ("b", SMALL, 1), ("c", LARGER, 1)):
        result = coasttrain.generate(base / name, scale=scale, jobs=jobs)
        assert json.loads(json.dumps(result)) == result  # survives PLANTED.json / checksums.json
        out[name] = (base / name, result)
    return out


@pytest.fixture(scope="module")
def small(runs: dict) -> tuple[dict, dict]:
    root, result = runs["a"]
    return _read(root), result


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def test_every_record_in_params_is_a_zip_with_its_md5(small: tuple[dict, dict]) -> None:
    zips, result = small
    records = load_params()["sources"]["coasttrain"]["records"]
    assert sorted(records) == sorted(zips)
    for record, z in zips.items():
        md5 = hashlib.md5(z["path"].read_bytes()).hexdigest()
        assert result["checksums"][f"coasttrain/{record}.zip"] == md5
        names = [i.filename for i in z["infos"]]
        assert names == sorted(names)
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in z["infos"])
        # npz/x.npz, or x.npz in a Doodler session folder (the planted superseded pair)
        session = r"(results\d{4}-\d{2}-\d{2}-\d{2}-\d{2}/)?"
        assert all(re.fullmatch(rf"npz/{session}[^/]+\.npz", n) for n in names if n != z["csv_name"])
        superseded = [c for c in result["planted"]["superseded_npz"] if c["record"] == record]
        assert len(z["npz"]) == 3 + len(superseded)  # ceil(6 * 0.5), plus an earlier session's copy


def test_csv_mirrors_the_real_metadata(small: tuple[dict, dict]) -> None:
    zips, _ = small
    for record, z in zips.items():
        letter = LETTERS[record]
        assert z["csv_name"] == REAL_CSV[letter]
        with open(REFERENCE / REAL_CSV[letter], encoding="latin-1", newline="") as fh:
            real = list(csv.DictReader(fh))
        assert list(z["rows"][0].keys()) == list(real[0].keys()), f"{record}: column order"
        real_lists = {r["classes_array"] for r in real}
        real_crs = {r["CRS"] for r in real}
        lat = [float(r["LatMin"]) for r in real]
        lon = [float(r["LonMin"]) for r in real]
        for row in z["rows"]:
            if "'wrack'" not in row["classes_array"]:
                assert row["classes_array"] in real_lists, f"{record}: {row['classes_array']}"
            # The CRS cell's style: same text as upstream, or the same form with another UTM zone.
            assert row["CRS"] in real_crs or re.sub(r"\d+N", "", row["CRS"]) in {
                re.sub(r"\d+N", "", c) for c in real_crs}
            assert row["px_size_m"] == real[0]["px_size_m"]
            real_path = real[0]["annotation_image_filename"]
            real_prefix = real_path[: -len(_basename(real_path))]
            path = row["annotation_image_filename"]
            assert path == real_prefix + _basename(path)
            assert min(lat) - 1.5 <= float(row["LatMin"]) <= max(lat) + 1.5
            assert min(lon) - 1.5 <= float(row["LonMin"]) <= max(lon) + 1.5
            assert row["classes_integer"] == ", ".join(str(k) for k in range(1, int(row["num_classes"])))


def test_quirks_across_records(small: tuple[dict, dict]) -> None:
    zips, _ = small
    prefixes = {r["annotation_image_filename"][: -len(_basename(r["annotation_image_filename"]))]
                for z in zips.values() for r in z["rows"]}
    assert prefixes == {"npz/", "/npz/", ""}
    crs = {r["CRS"] for z in zips.values() for r in z["rows"]}
    assert {"n/a", "na", ""} <= crs and any(c.startswith('"') for c in crs)
    # Latin-1, not UTF-8: at least one CSV has a non-ASCII byte that is not valid UTF-8.
    non_ascii = [rec for rec, z in zips.items() if any(b > 127 for b in z["csv"])]
    assert non_ascii
    for record in non_ascii:
        with pytest.raises(UnicodeDecodeError):
            zips[record]["csv"].decode("utf-8")


def _load_all(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def test_npz_read_back_as_sources_says(small: tuple[dict, dict]) -> None:
    zips, result = small
    planted = result["planted"]
    pickled = {(p["record"], p["npz"]) for p in planted["pickle_npz"]}
    not_one_hot = {(p["record"], p["npz"]) for p in planted["not_one_hot"]}
    superseded = {(p["record"], p["npz"]) for p in planted["superseded_npz"]}
    four_band = set()
    colour_label_absent = 0
    for record, z in zips.items():
        rows = {_basename(r["annotation_image_filename"]): r for r in z["rows"]}
        for member, data in z["npz"].items():
            if (record, member) in pickled:
                continue
            arrays = _load_all(data)
            image, orig, label = arrays["image"], arrays["orig_image"], arrays["label"]
            classes = arrays["classes"]
            h, w = image.shape[:2]
            assert image.dtype == np.uint8 and image.shape == (h, w, 3)
            assert orig.dtype == np.uint8 and orig.shape[:2] == (h, w) and orig.shape[2] in (3, 4)
            assert np.array_equal(orig[..., :3], image)
            if orig.shape[2] == 4:
                four_band.add((record, member))
            assert 64 <= h <= 256 and 64 <= w <= 256
            assert classes.dtype.kind == "U"
            assert arrays["settings"].dtype == np.float64 and arrays["settings"].shape in ((6,), (7,))
            assert arrays["doodles"].shape == (h, w) and arrays["color_doodles"].shape == (h, w, 3)
            colour_label_absent += "color_label" not in arrays
            # One-hot with K = highest class present + 1, not len(classes).
            assert label.dtype == np.uint8 and label.shape[:2] == (h, w)
            if (record, member) in not_one_hot:
                continue
            assert np.all(label.sum(-1) == 1)
            index = label.argmax(-1)
            assert label.shape[2] == index.max() + 1 <= len(classes)
            # Spatially coherent regions, not per-pixel noise.
            assert np.mean(index[:, 1:] == index[:, :-1]) > 0.9
            # Earlier passes hold different content than the final one.
            for key in [k for k in arrays if k.startswith("0")]:
                final = arrays[key.lstrip("0")]
                assert final.shape != arrays[key].shape or not np.array_equal(final, arrays[key]), key
            row = rows.get(_basename(member))
            if row is None or (record, member) in superseded:  # the row is the newer session's
                continue
            assert row["classes_array"] == coasttrain.format_list(list(classes))
            present = sorted(int(v) for v in np.unique(index))
            assert row["classes_present_integer"] == ", ".join(map(str, present))
            assert (int(row["ImageHeightPx"]), int(row["ImageWidthPx"])) == (h, w)
    assert four_band == {(p["record"], p["npz"]) for p in planted["four_band_npz"]}
    assert colour_label_absent > 0


def test_earlier_passes_exist_with_both_prefixes(runs: dict) -> None:
    root, _ = runs["c"]
    keys = set()
    for z in _read(root).values():
        for data in z["npz"].values():
            with np.load(io.BytesIO(data), allow_pickle=True) as npz:
                keys.update(npz.files)
    assert {"0label", "00label", "0image", "00image"} <= keys


def test_planted_cases(small: tuple[dict, dict]) -> None:
    zips, result = small
    planted = result["planted"]
    # The pickle npz: refused without pickle, a dict with it.
    [pick] = planted["pickle_npz"]
    data = zips[pick["record"]]["npz"][pick["npz"]]
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        with pytest.raises(ValueError):
            npz[pick["key"]]
    with np.load(io.BytesIO(data), allow_pickle=True) as npz:
        assert isinstance(npz[pick["key"]].item(), dict)
    # The unknown class: listed in the npz, painted in its label, absent from the remap vocabulary.
    [unknown] = planted["unknown_class"]
    assert unknown["class"] not in VOCABULARY
    arrays = _load_all(zips[unknown["record"]]["npz"][unknown["npz"]])
    classes = list(arrays["classes"])
    assert unknown["class"] in classes
    assert (arrays["label"].argmax(-1) == classes.index(unknown["class"])).any()
    for z in zips.values():
        for data in z["npz"].values():
            with np.load(io.BytesIO(data), allow_pickle=True) as npz:
                names = set(npz["classes"].tolist())
            assert names <= VOCABULARY or unknown["class"] in names
    # npz without a CSV row; every CSV row has its npz.
    orphans = {(o["record"], o["npz"]) for o in planted["npz_without_csv_row"]}
    assert len({r for r, _ in orphans}) >= 2
    for record, z in zips.items():
        listed = {_basename(r["annotation_image_filename"]) for r in z["rows"]}
        stored = {_basename(m) for m in z["npz"]}
        assert listed <= stored
        assert {(record, f"npz/{s}") for s in stored - listed} == {o for o in orphans if o[0] == record}
    # Mixed class lists inside NAIP_11, Sentinel2_11 and Orthophoto_8 (and NAIP_6), as upstream.
    for record in ("NAIP_11_001", "Sentinel2_11_001", "Orthophoto_8_001", "NAIP_6_001"):
        lists = planted["mixed_class_lists"][record]
        found = {r["classes_array"] for r in zips[record]["rows"]}
        # Both lists are visible in rows that have their npz, not only in planted orphans.
        assert len(lists) == 2 and set(lists) <= found
    assert any("vegtated_ground" in s for s in planted["mixed_class_lists"]["NAIP_6_001"])
    assert planted["non_ascii_csv"]
    # Two Doodler sessions of one npz: same name, same image, another label; one CSV row for both.
    [sup] = planted["superseded_npz"]
    older, newer = sup["sessions"]
    assert older < newer and _basename(sup["npz"]) == _basename(sup["kept"])
    name = _basename(sup["npz"])
    assert (sup["npz"], sup["kept"]) == (f"npz/{older}/{name}", f"npz/{newer}/{name}")
    first = _load_all(zips[sup["record"]]["npz"][sup["npz"]])
    final = _load_all(zips[sup["record"]]["npz"][sup["kept"]])
    assert np.array_equal(first["orig_image"], final["orig_image"])
    assert not np.array_equal(first["label"].argmax(-1), final["label"].argmax(-1))
    names = [_basename(r["annotation_image_filename"]) for r in zips[sup["record"]]["rows"]]
    assert names.count(_basename(sup["kept"])) == 1
    # A label that is not one-hot: every channel set at every pixel.
    [ones] = planted["not_one_hot"]
    label = _load_all(zips[ones["record"]]["npz"][ones["npz"]])["label"]
    assert label.shape[2] > 1 and (label == 1).all()


def test_tiles_of_one_mosaic_are_neighbours(small: tuple[dict, dict]) -> None:
    zips, _ = small
    tile = re.compile(r"^(?P<survey>.+)_(?P<row>\d\d)_(?P<col>\d\d)_ID\d\.npz$")
    pairs = 0
    for record in ("Orthophoto_12_001", "Orthophoto_9_001", "Orthophoto_8_001"):
        boxes = {}
        for row in zips[record]["rows"]:
            m = tile.match(_basename(row["annotation_image_filename"]))
            assert m, row["annotation_image_filename"]
            boxes[(m["survey"], int(m["row"]), int(m["col"]))] = {k: float(row[k]) for k in (
                "LonMin", "LonMax", "LatMin", "LatMax")}
        for (survey, r, c), box in boxes.items():
            right = boxes.get((survey, r, c + 1))
            if right:
                pairs += 1
                assert right["LonMin"] == pytest.approx(box["LonMax"], abs=1e-9)
                assert right["LatMin"] == pytest.approx(box["LatMin"], abs=1e-9)
            below = boxes.get((survey, r + 1, c))
            if below:
                pairs += 1
                assert below["LatMax"] == pytest.approx(box["LatMin"], abs=1e-9)
                # ~1 m: a UTM grid is not aligned with meridians.
                assert below["LonMin"] == pytest.approx(box["LonMin"], abs=1e-5)
    assert pairs >= 2


def test_deterministic_whatever_the_jobs(runs: dict) -> None:
    (a, ra), (b, rb) = runs["a"], runs["b"]
    assert ra == rb
    for record in LETTERS:
        name = Path("http") / "coasttrain" / f"{record}.zip"
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_larger_scale_is_a_superset(runs: dict) -> None:
    small_zips, large_zips = _read(runs["a"][0]), _read(runs["c"][0])
    for record in LETTERS:
        s, lg = small_zips[record], large_zips[record]
        assert len(lg["npz"]) > len(s["npz"])
        for member, data in s["npz"].items():
            assert lg["npz"][member] == data, f"{record}/{member} changed"
        small_lines = s["csv"].decode("latin-1").splitlines()
        large_lines = set(lg["csv"].decode("latin-1").splitlines())
        assert set(small_lines) <= large_lines
        assert small_lines[0] == lg["csv"].decode("latin-1").splitlines()[0]
