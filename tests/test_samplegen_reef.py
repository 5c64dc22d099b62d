"""The reef sample upstreams read back the way SOURCES.md says the real ones do, hold every planted
case where PLANTED says, and grow as supersets."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stages.samplegen import planted as scenes
from stages.samplegen import reef

SMALL, LARGER = 0.1, 0.15
MERMAID_COLUMNS = [
    "id", "image_id", "point_id", "row", "col", "benthic_attribute_id", "benthic_attribute_name",
    "growth_form_id", "growth_form_name", "updated_on", "region_id", "region_name",
]
REALMS = {
    "Arctic", "Temperate Northern Atlantic", "Temperate Northern Pacific", "Tropical Atlantic",
    "Western Indo-Pacific", "Central Indo-Pacific", "Eastern Indo-Pacific", "Tropical Eastern Pacific",
    "Temperate South America", "Temperate Southern Africa", "Temperate Australasia", "Southern Ocean",
}
GROWTH_FORMS = {
    "Arborescent", "Branching", "Columnar", "Corymbose", "Digitate", "Encrusting", "Foliose", "Massive",
    "Mushroom coral", "Plates or tables", "Submassive",
}
TOP_LEVEL = {
    "Bare substrate", "Crustose coralline algae", "Cyanobacteria", "Hard coral", "Macroalgae", "Other",
    "Other invertebrates", "Rubble", "Sand", "Seagrass", "Soft coral", "Turf algae",
}
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three generations: the small corpus twice (jobs 2 and 1) and a larger one."""
    base = tmp_path_factory.mktemp("reef")
    out = {}
    for name, scale, jobs in (("a", SMALL, 2), ("b", SMALL, 1), ("c", LARGER, 2)):
        result = reef.generate(base / name, scale=scale, jobs=jobs)
        out[name] = (base / name, result)
    return out


@pytest.fixture(scope="module")
def gen(runs: dict) -> tuple[Path, dict]:
    root, result = runs["a"]
    assert result["checksums"] == {}
    # PLANTED.json goes through JSON: the registry must survive that unchanged.
    assert json.loads(json.dumps(result["planted"])) == result["planted"]
    return root, result["planted"]


def _api(root: Path, endpoint: str) -> list | dict:
    return json.loads((root / "http/mermaid-api/v1" / endpoint).read_text())


def _mermaid(root: Path, planted: dict) -> pd.DataFrame:
    return pd.read_parquet(root / planted["mermaid"]["parquet"])


# --- MERMAID bucket -------------------------------------------------------------------------


def test_mermaid_parquet_matches_sources(gen):
    root, planted = gen
    table = pq.read_table(root / planted["mermaid"]["parquet"])
    assert table.column_names == MERMAID_COLUMNS
    df = table.to_pandas()
    for col in ("id", "image_id", "point_id", "benthic_attribute_id"):
        assert df[col].map(lambda v: bool(UUID_RE.match(v))).all(), col
    assert str(table.schema.field("row").type) == "int64" and str(table.schema.field("col").type) == "int64"
    assert str(table.schema.field("updated_on").type) == "timestamp[us, tz=UTC]"
    # Ordered by (image_id, row, col), 25 points per image (64 on the planted points-outside
    # image, whose 3 outside points must stay under ingest.max_outside_share), ids unique.
    assert list(df.index) == list(df.sort_values(["image_id", "row", "col"], kind="stable").index)
    sizes = df.groupby("image_id").size()
    outside_id = planted["mermaid"]["points_outside"]["image_id"]
    assert sizes.drop(outside_id).eq(25).all() and sizes[outside_id] == 64
    assert df["id"].is_unique and df["point_id"].is_unique
    # A missing growth form is the string "None" (id and name together), never a null.
    assert df["growth_form_id"].notna().all() and df["growth_form_name"].notna().all()
    none = df["growth_form_id"] == "None"
    assert none.any() and (~none).any()
    assert (df.loc[none, "growth_form_name"] == "None").all()
    assert not (df.loc[~none, "growth_form_name"] == "None").any()
    assert int(none.sum()) == planted["mermaid"]["growth_form_none_rows"]
    # Regions are MEOW realms or null, constant per image.
    assert set(df["region_name"].dropna()) <= REALMS
    assert df["region_name"].isna().any()
    assert (df["region_id"].isna() == df["region_name"].isna()).all()
    assert df.groupby("image_id")["region_name"].nunique(dropna=False).eq(1).all()
    assert df.groupby("image_id").ngroups == planted["mermaid"]["images"]
    assert len(df) == planted["mermaid"]["points"]


def test_mermaid_ids_are_those_of_the_api(gen):
    root, planted = gen
    df = _mermaid(root, planted)
    attrs = {a["id"]: a["name"] for a in _api(root, "benthicattributes/results.json")}
    forms = {e["id"]: e["name"] for c in _api(root, "choices/index.json") if c["name"] == "growthforms"
             for e in c["data"]}
    for ba_id, name in df[["benthic_attribute_id", "benthic_attribute_name"]].drop_duplicates().itertuples(
        index=False
    ):
        assert attrs[ba_id] == name
    with_gf = df[df["growth_form_id"] != "None"]
    pairs = with_gf[["growth_form_id", "growth_form_name"]].drop_duplicates()
    for gf_id, name in pairs.itertuples(index=False):
        assert forms[gf_id] == name
    regions = {e["id"]: e["name"] for c in _api(root, "choices/index.json") if c["name"] == "regions"
               for e in c["data"]}
    for rid, name in df[["region_id", "region_name"]].dropna().drop_duplicates().itertuples(index=False):
        assert regions[rid] == name


def test_mermaid_per_image_objects(gen):
    root, planted = gen
    info = planted["mermaid"]
    bucket = root / info["root"]
    df = _mermaid(root, planted)
    broken = {info["truncated_png"]["image_id"], info["missing_image"]["image_id"]}
    for image_id, rows in df.groupby("image_id", sort=True):
        with open(bucket / f"{image_id}_annotations.csv", newline="") as fh:
            records = list(csv.DictReader(fh))
        assert list(records[0]) == MERMAID_COLUMNS[:-2]
        expected = rows.drop(columns=["region_id", "region_name"]).copy()
        for col in ("growth_form_id", "growth_form_name"):
            expected[col] = expected[col].replace("None", "")  # the CSV writes an empty string instead
        got = pd.DataFrame(records)
        got[["row", "col"]] = got[["row", "col"]].astype("int64")
        got["updated_on"] = pd.to_datetime(got["updated_on"])
        pd.testing.assert_frame_equal(got, expected.reset_index(drop=True), check_dtype=False)
        assert (bucket / f"{image_id}_featurevector").stat().st_size > 0
        with Image.open(bucket / f"{image_id}_thumbnail.png") as thumb:
            assert thumb.format == "PNG" and max(thumb.size) <= 500
        if image_id in broken:
            continue
        with Image.open(bucket / f"{image_id}.png") as img:
            assert img.format == "PNG" and img.mode == "RGB"
            assert not img.getexif() and "exif" not in img.info
            img.load()
            w, h = img.size
            assert 480 <= min(h, w) and max(h, w) <= 1024
        assert thumb.size[0] / thumb.size[1] == pytest.approx(w / h, rel=0.01)


def test_mermaid_planted_cases(gen):
    root, planted = gen
    info = planted["mermaid"]
    df = _mermaid(root, planted)
    counts = df.groupby("image_id").size()

    truncated = info["truncated_png"]
    assert counts[truncated["image_id"]] == truncated["points"]
    data = (root / truncated["file"]).read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(OSError), Image.open(io.BytesIO(data)) as img:
        img.load()

    missing = info["missing_image"]
    assert counts[missing["image_id"]] == missing["points"]
    assert not (root / missing["file"]).exists()
    assert (root / missing["file"].replace(".png", "_thumbnail.png")).exists()

    scene = info["cross_source_scene"]
    with Image.open(root / scene["file"]) as img:
        assert np.array_equal(np.asarray(img), scenes.cross_source_scene())

    outside = info["points_outside"]
    rows = df[df["image_id"] == outside["image_id"]]
    off = rows[(rows["row"] < 0) | (rows["row"] >= outside["height"]) | (rows["col"] < 0)
               | (rows["col"] >= outside["width"])]
    assert sorted(off["point_id"]) == sorted(p["point_id"] for p in outside["outside"])
    assert any(p["row"] < 0 or p["col"] < 0 for p in outside["outside"])
    with Image.open(root / outside["file"]) as img:
        assert img.size == (outside["width"], outside["height"])
    mismatch = info["geometry_mismatch"]
    rows = df[df["image_id"] == mismatch["image_id"]]
    off = (rows["row"] >= mismatch["height"]) | (rows["col"] >= mismatch["width"])
    assert int(off.sum()) == mismatch["outside"] > 0.05 * len(rows) and len(rows) == mismatch["points"]
    with Image.open(root / mismatch["file"]) as img:
        assert img.size == (mismatch["width"], mismatch["height"])
    # Every other image has all its points inside.
    for image_id, group in df.groupby("image_id"):
        if image_id in (outside["image_id"], missing["image_id"], mismatch["image_id"]):
            continue
        with Image.open(root / info["root"] / f"{image_id}.png") as img:
            w, h = img.size
        assert group["row"].between(0, h - 1).all() and group["col"].between(0, w - 1).all()


# --- CoralNet --------------------------------------------------------------------------------


def _label_ids_used(frame: pd.DataFrame) -> set[int]:
    return {int(v) for v in frame["Label ID"].dropna()}


def test_coralnet_bucket_source(gen):
    root, planted = gen
    info = planted["coralnet"]["s2012"]
    src = root / info["root"]
    assert info["root"] == "s3/coral-reef-training/s2012/"
    ann = pd.read_csv(src / "annotations.csv", dtype={"Label ID": "Int64"})
    assert list(ann.columns) == ["Image ID", "Row", "Column", "Label ID", "Status"]
    assert len(ann) == info["rows"]
    assert ann["Status"].value_counts().to_dict() == info["status_counts"]
    assert info["not_confirmed_rows"] == (ann["Status"] != "Confirmed").sum() > 0
    # Unclassified points carry no label; every other row does.
    assert ann.loc[ann["Status"] == "Unclassified", "Label ID"].isna().all()
    assert ann.loc[ann["Status"] != "Unclassified", "Label ID"].notna().all()
    labelset = pd.read_csv(src / "labelset.csv")
    assert list(labelset.columns) == ["Label ID", "Name", "Short Code"]
    assert _label_ids_used(ann) <= set(labelset["Label ID"])
    files = {p.name for p in (src / "images").iterdir()}
    for pk in ann["Image ID"].unique():
        assert f"{pk}.jpg" in files or f"{pk}.png" in files
        feature = src / "features" / f"i{pk}.featurevector"
        assert feature.exists() == (pk != info["zero_byte_jpeg"]["image_id"])
    assert (root / info["zero_byte_jpeg"]["file"]).stat().st_size == 0
    with Image.open(root / info["png_image"]["file"]) as img:
        assert img.format == "PNG"
    regular = next(f for f in sorted(files) if f.endswith(".jpg") and (src / "images" / f).stat().st_size)
    with Image.open(src / "images" / regular) as img:
        assert img.format == "JPEG"
    for case in ("zero_byte_jpeg", "png_image", "planted_labels", "status_mix", "geometry_mismatch"):
        assert (ann["Image ID"] == info[case]["image_id"]).sum() == info[case]["rows"]
    # Points made for a 1200x1600 image on a 480x640 JPEG: far more than 5% fall outside it.
    mismatch = info["geometry_mismatch"]
    rows = ann[ann["Image ID"] == mismatch["image_id"]]
    with Image.open(root / mismatch["file"]) as img:
        assert img.size == (mismatch["width"], mismatch["height"]) == (640, 480)
    off = ((rows["Row"] >= mismatch["height"]) | (rows["Column"] >= mismatch["width"])).sum()
    assert off == mismatch["outside"] and off / len(rows) > 0.5
    mixed = ann[ann["Image ID"] == info["status_mix"]["image_id"]]
    assert mixed["Status"].value_counts().to_dict() == info["status_mix"]["status_counts"]
    assert set(info["status_mix"]["status_counts"]) == {"Confirmed", "Unconfirmed", "Unclassified"}


def test_coralnet_local_export(gen):
    root, planted = gen
    info = planted["coralnet"]["s1073"]
    src = root / info["root"]
    assert info["root"] == "coralnet/s1073/"
    raw = (src / "annotations.csv").read_bytes()
    assert b"\r\n" in raw and raw.decode("utf-8")
    ann = pd.read_csv(src / "annotations.csv", keep_default_na=False, dtype=str)
    cols = list(ann.columns)
    assert cols[0] == "Name" and cols[cols.index("Row"):cols.index("Row") + 4] == [
        "Row", "Column", "Label code", "Label ID"]
    meta = cols[1:cols.index("Row")]
    assert meta == ["Date", "Site", "Transect", "Quadrant", "Aux4", "Aux5", "Height (cm)", "Latitude",
                    "Longitude", "Depth", "Camera", "Photographer", "Water quality", "Strobes",
                    "Framing gear used", "White balance card", "Comments"]
    assert cols[cols.index("Label ID") + 1:cols.index("Label ID") + 3] == ["Annotator", "Date annotated"]
    assert cols[-10:] == [
        c for k in range(1, 6) for c in (f"Machine suggestion {k}", f"Machine confidence {k}")
    ]
    assert len(ann) == info["rows"]
    # The csv module and pandas agree, so multi-line quoted comments parse as single fields.
    with open(src / "annotations.csv", newline="", encoding="utf-8") as fh:
        assert sum(1 for _ in csv.DictReader(fh)) == len(ann)
    multi = ann[ann["Comments"].str.contains("\n")]
    assert sorted(multi["Name"].unique()) == sorted(info["multiline_comment_images"])
    assert len(multi) == info["multiline_comment_rows"] > 0
    assert (ann == "").any().any()  # empty cells exist
    assert ann["Date annotated"].str.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\+00:00").all()
    kinds = ann["Annotator"].where(ann["Annotator"].isin(["robot", "Imported"]), "human")
    assert kinds.value_counts().to_dict() == info["annotator_counts"]
    assert info["robot_row_count"] > 0 and info["imported_row_count"] > 0
    robot = ann[ann["Name"] == info["robot_rows"]["name"]]
    n_robot = int((robot["Annotator"] == "robot").sum())
    assert n_robot == info["robot_rows"]["annotator_counts"]["robot"] and 0 < n_robot < len(robot)
    imported = ann[ann["Name"] == info["imported_rows"]["name"]]
    assert len(imported) == info["imported_rows"]["rows"] and (imported["Annotator"] == "Imported").all()
    assert (imported["Machine suggestion 1"] == "").all()
    # Machine suggestions: label codes of the labelset with integer percents, or all empty.
    labelset = pd.read_csv(src / "labelset.csv")
    codes = dict(zip(labelset["Short Code"], labelset["Label ID"]))
    suggested = ann[ann["Machine suggestion 1"] != ""]
    assert 0 < len(suggested) < len(ann)
    for k in range(1, 6):
        assert suggested[f"Machine suggestion {k}"].isin(list(codes)).all()
        assert suggested[f"Machine confidence {k}"].str.fullmatch(r"\d{1,3}").all()
    robot = ann[ann["Annotator"] == "robot"]
    assert (robot["Label code"] == robot["Machine suggestion 1"]).all()
    # Label code and Label ID agree with the labelset.
    assert all(codes[c] == int(i) for c, i in zip(ann["Label code"], ann["Label ID"]))
    for name in ann["Name"].unique():
        path = src / "images" / name
        with Image.open(path) as img:
            assert img.format == "JPEG"


def test_coralnet_planted_cases(gen):
    root, planted = gen
    info = planted["coralnet"]["s1073"]
    ann = pd.read_csv(root / info["root"] / "annotations.csv", keep_default_na=False)

    dup = info["duplicate_points"]
    rows = ann[ann["Name"] == dup["name"]]
    assert len(rows) == dup["rows"]
    same = dup["same_label"][0]
    hits = rows[(rows["Row"] == same["row"]) & (rows["Column"] == same["col"])]
    assert len(hits) == 2 and set(hits["Label ID"]) == {same["label_id"]}
    diff = dup["different_label"][0]
    hits = rows[(rows["Row"] == diff["row"]) & (rows["Column"] == diff["col"])]
    assert sorted(hits["Label ID"]) == diff["label_ids"] and len(set(diff["label_ids"])) == 2
    assert rows.duplicated(["Row", "Column"]).sum() == 2
    assert not ann[ann["Name"] != dup["name"]].duplicated(["Name", "Row", "Column"]).any()

    out = info["points_outside"]
    rows = ann[ann["Name"] == out["name"]]
    off = rows[(rows["Row"] < 0) | (rows["Row"] >= out["height"]) | (rows["Column"] < 0)
               | (rows["Column"] >= out["width"])]
    assert sorted(zip(off["Row"], off["Column"])) == sorted((p["row"], p["col"]) for p in out["outside"])
    # 3 of 64: under the 5% share past which the whole image would be a geometry mismatch.
    assert len(rows) == out["rows"] == 64 and len(off) == 3
    with Image.open(root / out["file"]) as img:
        assert img.size == (out["width"], out["height"])

    scene = info["cross_source_scene"]
    with Image.open(root / scene["file"]) as img:
        assert img.format == "JPEG"
        diff_px = np.abs(np.asarray(img, dtype=np.int16) - scenes.cross_source_scene().astype(np.int16))
    assert diff_px.mean() < 4  # the same scene, only JPEG loss apart
    assert (ann["Name"] == scene["name"]).sum() == scene["rows"]


def test_coralnet_toolbox_export(gen):
    root, planted = gen
    info = planted["coralnet"]["s3120"]
    src = root / info["root"]
    assert info["root"] == "coralnet/s3120/" and info["layout"] == "coralnet-toolbox"
    assert sorted(p.name for p in src.iterdir()) == [
        "CoralNet_Annotations.csv", "D3", "Labels.json", "label_set.csv"]
    raw = (src / "CoralNet_Annotations.csv").read_bytes()
    lines = raw.split(b"\n")
    assert lines[0] == b"Name,Row,Column,Label,Long Label,Patch Size" and b"\r" not in raw
    # Exactly one line is not UTF-8: the planted one, with a latin-1 0xFB.
    bad = []
    for k, line in enumerate(lines, start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(k)
    case = info["encoding_error"]
    assert bad == [case["line"]] and bytes([case["byte"]]) in lines[case["line"] - 1]
    text = raw.decode("utf-8", errors="replace")  # latin-1 would garble every other line
    ann = pd.read_csv(io.StringIO(text), keep_default_na=False, dtype=str)
    assert list(ann.columns) == info["columns"] and len(ann) == info["rows"]
    assert ann["Name"].nunique() == info["images"] and (ann["Patch Size"] == "112").all()
    # A labelset as pandas saves one: an unnamed index column, then Short Code and Label ID.
    labelset = (src / "label_set.csv").read_text().splitlines()
    assert labelset[0] == ",Short Code,Label ID" and labelset[1].startswith("0,")
    codes = {line.split(",")[1] for line in labelset[1:]}
    unmapped = info["unmapped_code"]
    used = set(ann["Label"])
    assert unmapped["code"] in used and unmapped["code"] not in codes and used - {unmapped["code"]} <= codes
    review = ann[ann["Label"] == unmapped["code"]]
    assert set(review["Name"]) == {unmapped["name"]} and len(review) == unmapped["code_rows"]
    nfd = info["nfd_name"]
    assert nfd["name"] in set(ann["Name"]) and nfd["name"] != nfd["file_name_nfc"]
    assert (root / nfd["file"]).is_file() and not (src / "D3" / nfd["name"]).exists()
    folder = info["folder_as_image"]
    assert (root / folder["folder"]).is_dir() and (root / folder["file"]).is_file()
    assert (root / info["unreferenced_file"]["file"]).is_file()
    assert not ann["Name"].str.contains("/").any()
    labels = json.loads((src / "Labels.json").read_text())
    assert labels[0]["short_label_code"] == "Review" and {"id", "color"} <= set(labels[0])
    for name in set(ann["Name"]) - {nfd["name"], folder["name"]}:
        with Image.open(src / "D3" / name) as img:
            assert img.format == "JPEG"


def test_label_mappings_cover_the_sources(gen):
    root, planted = gen
    mappings = _api(root, "classification/labelmappings/results.json")
    assert {m["provider"] for m in mappings} == {"CoralNet", "ReefCloud"}
    fields = {"id", "benthic_attribute_id", "benthic_attribute_name", "growth_form_id", "growth_form_name",
              "provider", "provider_id", "provider_label"}
    assert all(set(m) == fields for m in mappings)
    attrs = {a["id"]: a["name"] for a in _api(root, "benthicattributes/results.json")}
    by_label: dict[str, list[dict]] = {}
    for m in mappings:
        if m["benthic_attribute_id"] is not None:
            assert attrs[m["benthic_attribute_id"]] == m["benthic_attribute_name"]
        if m["provider"] == "CoralNet":
            by_label.setdefault(m["provider_id"], []).append(m)

    labels = planted["mermaid_api"]["labels"]
    planted_ids = {labels[k]["label_id"] for k in ("unmapped", "null_mapping", "ambiguous")}
    used: set[int] = set()
    for sid in ("s2012", "s1073"):
        src = root / planted["coralnet"][sid]["root"]
        used |= _label_ids_used(pd.read_csv(src / "annotations.csv", dtype={"Label ID": "Int64"}))
        per_label = planted["coralnet"][sid]["planted_labels"]["rows_by_label_id"]
        assert {int(k) for k in per_label} == planted_ids
    assert planted_ids <= used
    for label_id in used - planted_ids:
        found = by_label[str(label_id)]
        assert len(found) == 1 and found[0]["benthic_attribute_id"] is not None, label_id

    assert str(labels["unmapped"]["label_id"]) not in by_label
    null = by_label[str(labels["null_mapping"]["label_id"])]
    assert [m["id"] for m in null] == labels["null_mapping"]["mapping_ids"]
    assert null[0]["benthic_attribute_id"] is None
    amb = by_label[str(labels["ambiguous"]["label_id"])]
    assert sorted(m["id"] for m in amb) == labels["ambiguous"]["mapping_ids"]
    assert len({(m["benthic_attribute_id"], m["growth_form_id"]) for m in amb}) == 2


def test_taxonomy_api(gen):
    root, planted = gen
    attrs = _api(root, "benthicattributes/results.json")
    assert len(attrs) == planted["mermaid_api"]["benthicattributes"]
    assert 60 <= len(attrs) <= 100
    fields = {"id", "name", "parent", "regions", "life_histories", "growth_form_life_histories",
              "top_level_category", "status"}
    assert all(set(a) == fields for a in attrs)
    by_id = {a["id"]: a for a in attrs}
    assert len(by_id) == len(attrs)
    tops = {a["name"] for a in attrs if a["parent"] is None}
    assert tops == TOP_LEVEL

    def chain(a: dict) -> list[str]:
        names = [a["name"]]
        while a["parent"] is not None:
            a = by_id[a["parent"]]
            names.append(a["name"])
        return names

    for a in attrs:
        assert by_id[a["top_level_category"]]["name"] == chain(a)[-1]
    assert max(len(chain(a)) for a in attrs) >= 3
    by_name = {a["name"]: a for a in attrs}
    assert chain(by_name["Porifera"])[-1] == "Other invertebrates"
    assert chain(by_name["Acropora"]) == ["Acropora", "Acroporidae", "Hard coral"]

    index = _api(root, "choices/index.json")
    assert isinstance(index, list)
    growth = next(c for c in index if c["name"] == "growthforms")["data"]
    assert {g["name"] for g in growth} == GROWTH_FORMS and all(set(g) == {"id", "name"} for g in growth)
    regions = next(c for c in index if c["name"] == "regions")["data"]
    assert {r["name"] for r in regions} == REALMS
    region_ids = {r["id"] for r in regions}
    assert all(set(a["regions"]) <= region_ids for a in attrs)


# --- determinism and growth ----------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_scale_gives_identical_bytes_whatever_the_jobs(runs):
    (a, ra), (b, rb) = runs["a"], runs["b"]
    assert ra == rb
    ta, tb = _tree(a), _tree(b)
    assert ta.keys() == tb.keys()
    assert [k for k in ta if ta[k] != tb[k]] == []


def _csv_rows(data: bytes) -> list[tuple[str, ...]]:
    # surrogateescape: the toolbox export plants one latin-1 byte.
    text = data.decode("utf-8", errors="surrogateescape")
    return [tuple(r) for r in csv.reader(io.StringIO(text, newline=""))]


def test_larger_scale_is_a_superset(runs):
    (small, rs), (large, rl) = runs["a"], runs["c"]
    ts, tl = _tree(small), _tree(large)
    assert set(ts) < set(tl)
    aggregates = {rs["planted"]["mermaid"]["parquet"]} | {
        info["root"] + info.get("annotations", "annotations.csv")
        for info in (rs["planted"]["coralnet"][s] for s in ("s2012", "s1073", "s3120"))
    }
    for key, data in ts.items():
        if key in aggregates:
            continue
        assert tl[key] == data, key
    for key in aggregates:
        if key.endswith(".parquet"):
            old = pd.read_parquet(small / key)
            new = pd.read_parquet(large / key)
            assert list(new.columns) == list(old.columns)
            merged = old.merge(new, how="left", indicator=True)
            assert (merged["_merge"] == "both").all() and len(new) > len(old)
        else:
            old_rows, new_rows = _csv_rows(ts[key]), _csv_rows(tl[key])
            assert old_rows[0] == new_rows[0]
            assert set(old_rows) <= set(new_rows) and len(new_rows) > len(old_rows)
    # Planted cases do not move with scale; only the counts grow.
    cases = ("cross_source_scene", "truncated_png", "missing_image", "points_outside", "geometry_mismatch")
    for case in cases:
        assert rs["planted"]["mermaid"][case] == rl["planted"]["mermaid"][case]
    assert rs["planted"]["mermaid_api"] == rl["planted"]["mermaid_api"]
    for export, names in (
        ("s2012", ("zero_byte_jpeg", "png_image", "planted_labels", "status_mix", "geometry_mismatch")),
        ("s1073", ("cross_source_scene", "duplicate_points", "planted_labels", "points_outside")),
        ("s3120", ("encoding_error", "unmapped_code", "nfd_name", "folder_as_image", "unreferenced_file")),
    ):
        for case in names:
            assert rs["planted"]["coralnet"][export][case] == rl["planted"]["coralnet"][export][case], case
    assert rl["planted"]["mermaid"]["images"] > rs["planted"]["mermaid"]["images"]


def test_counts_follow_ceil_of_base_times_scale():
    assert reef.scaled_count(50, 1.1) == 55
    assert reef.scaled_count(50, 0.3) == 15
    assert reef.scaled_count(40, 0.01) == 1
    assert reef.scaled_count(40, 0) == 0
