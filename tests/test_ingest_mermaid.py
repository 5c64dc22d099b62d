"""ingest@mermaid on the fetched sample upstream: every planted case lands where PLANTED.json says,
nothing is lost, outputs are stable, and a reshaped parquet fails loudly."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ingest_context
from PIL import Image

from stages.errors import UpstreamFormatError
from stages.ingest import mermaid, runner

PARQUET = "mermaid_confirmed_annotations.parquet"


def run(ctx) -> dict:
    return runner.run(ctx, mermaid)


def read(out_dir: Path, name: str) -> list[dict]:
    return pq.read_table(out_dir / f"{name}.parquet").to_pylist()


@pytest.fixture(scope="module")
def planted(sample_upstream: Path) -> dict:
    return json.loads((sample_upstream / "PLANTED.json").read_text())["reef"]["mermaid"]


@pytest.fixture(scope="module")
def result(fetched_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    ctx = ingest_context("mermaid", fetched_root, out_root=tmp_path_factory.mktemp("mermaid-out"))
    metrics = run(ctx)
    out = ctx.out_dir
    return {
        "ctx": ctx,
        "metrics": metrics,
        "samples": read(out, "samples"),
        "points": read(out, "points"),
        "quarantine": read(out, "quarantine"),
        "rows": pq.read_table(ctx.raw_dir / PARQUET).to_pylist(),
    }


def by_image(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["image_id"], []).append(r)
    return out


def test_inputs_equal_samples_plus_quarantine(result):
    m, q = result["metrics"], result["quarantine"]
    kinds = Counter(r["record_kind"] for r in q)
    assert m["inputs"]["image"] == m["samples"] + kinds["image"]
    assert m["inputs"]["point"] == m["points"] + kinds["point"]
    assert m["inputs"]["point"] == len(result["rows"])
    assert set(kinds) <= {"image", "point"}
    # Each parquet row lands exactly once: as a point (by its point_id) or a quarantine row.
    landed = Counter([p["point_id"].removeprefix("mermaid-") for p in result["points"]])
    landed.update(r["record_id"] for r in q if r["record_kind"] == "point")
    assert landed == Counter(r["point_id"] for r in result["rows"])


def test_truncated_png_is_corrupt_and_its_points_unusable(result, planted):
    case = planted["truncated_png"]
    q = result["quarantine"]
    image_rows = [r for r in q if r["record_kind"] == "image" and r["record_id"] == case["image_id"]]
    assert [r["reason"] for r in image_rows] == ["corrupt_image"]
    assert image_rows[0]["file"] == f"data/raw/mermaid/{case['image_id']}.png"
    ids = {r["point_id"] for r in by_image(result["rows"])[case["image_id"]]}
    unusable = [r for r in q if r["record_id"] in ids]
    assert len(unusable) == case["points"] == len(ids)
    assert {r["reason"] for r in unusable} == {"image_unusable"}
    assert all("corrupt_image" in r["detail"] and r["file"].endswith(PARQUET) for r in unusable)
    assert f"mermaid-{case['image_id']}" not in {s["sample_id"] for s in result["samples"]}


def test_missing_image(result, planted):
    case = planted["missing_image"]
    q = result["quarantine"]
    assert [r["reason"] for r in q if r["record_kind"] == "image" and r["record_id"] == case["image_id"]] == [
        "missing_image"
    ]
    ids = {r["point_id"] for r in by_image(result["rows"])[case["image_id"]]}
    unusable = [r for r in q if r["record_id"] in ids]
    assert len(unusable) == case["points"]
    assert all(r["reason"] == "image_unusable" and "missing_image" in r["detail"] for r in unusable)


def test_points_outside_image(result, planted):
    case = planted["points_outside"]
    outside = {o["point_id"]: o for o in case["outside"]}
    q = [r for r in result["quarantine"] if r["reason"] == "point_outside_image"]
    assert {r["record_id"] for r in q} == set(outside)
    assert any(o["row"] < 0 or o["col"] < 0 for o in outside.values())  # the negative case is there
    for r in q:
        o = outside[r["record_id"]]
        assert f"({o['row']}, {o['col']})" in r["detail"]
    sample = next(s for s in result["samples"] if s["upstream_id"] == case["image_id"])
    assert (sample["width"], sample["height"]) == (case["width"], case["height"])
    assert sample["n_points"] == case["points"] - len(outside)
    assert sample["region"] is None  # this image is one of the null-region ones


def test_geometry_mismatch_quarantines_the_image_and_all_its_points(result, planted):
    case = planted["geometry_mismatch"]
    assert case["outside"] > 0.05 * case["points"]  # the planted share is over the default bound
    q = result["quarantine"]
    image_rows = [r for r in q if r["record_kind"] == "image" and r["record_id"] == case["image_id"]]
    assert [r["reason"] for r in image_rows] == ["geometry_mismatch"]
    assert f"{case['outside']} of {case['points']} points" in image_rows[0]["detail"]
    ids = {r["point_id"] for r in by_image(result["rows"])[case["image_id"]]}
    point_rows = [r for r in q if r["record_kind"] == "point" and r["record_id"] in ids]
    assert len(point_rows) == case["points"] and {r["reason"] for r in point_rows} == {"geometry_mismatch"}
    # The points inside the image are not kept either: they were cut for another image.
    assert f"mermaid-{case['image_id']}" not in {s["sample_id"] for s in result["samples"]}
    assert not [p for p in result["points"] if p["sample_id"] == f"mermaid-{case['image_id']}"]


def test_sample_columns_ids_and_region(result):
    rows = by_image(result["rows"])
    samples = result["samples"]
    assert samples and all(s["sample_id"] == f"mermaid-{s['upstream_id']}" for s in samples)
    for s in samples:
        assert s["sample_id"].isascii() and "." not in s["sample_id"]
        assert s["image_format"] == "png" and s["pixel_sha256"] and s["file_sha256"]
        assert s["image_path"] == f"data/raw/mermaid/{s['upstream_id']}.png"
        assert 0 <= s["phash"] < 2**64
        assert s["region"] == rows[s["upstream_id"]][0]["region_id"]
        assert s["license"] == "CC-BY-NC-SA-4.0" and s["attribution"]
    assert any(s["region"] is None for s in samples) and any(s["region"] for s in samples)
    point_ids = [p["point_id"] for p in result["points"]]
    assert all(p.isascii() and "." not in p and p.startswith("mermaid-") for p in point_ids)


def test_growth_form_none_is_null_and_labels_resolved(result):
    rows = {r["point_id"]: r for r in result["rows"]}
    ctx = result["ctx"]
    from stages.taxonomy_index import Taxonomy

    tax = Taxonomy.load(ctx.taxonomy_dir)
    nulls = 0
    for p in result["points"]:
        src = rows[p["point_id"].removeprefix("mermaid-")]
        assert p["growth_form_name"] != "None" and p["growth_form_id"] != "None"
        if src["growth_form_id"] == "None":
            nulls += 1
            assert p["growth_form_id"] is None and p["growth_form_name"] is None
        else:
            assert p["growth_form_id"] == src["growth_form_id"]
        assert p["benthic_attribute_id"] == src["benthic_attribute_id"] == p["source_label_id"]
        assert p["top_level_category"] == tax.top_level(p["benthic_attribute_id"])
    assert nulls > 0


def test_labels_json_gives_cover_fractions(result):
    points = by_image([{**p, "image_id": p["sample_id"]} for p in result["points"]])
    for s in result["samples"]:
        labels = json.loads(s["labels"])
        mine = points.get(s["sample_id"], [])
        assert labels["n_points"] == s["n_points"] == len(mine)
        counts = Counter(p["benthic_attribute_id"] for p in mine)
        assert {k: v["count"] for k, v in labels["benthic_attributes"].items()} == dict(counts)
        tops = Counter(p["top_level_category"] for p in mine)
        assert {k: v["count"] for k, v in labels["top_level_categories"].items()} == dict(tops)
        if mine:
            assert sum(v["cover"] for v in labels["top_level_categories"].values()) == pytest.approx(1.0)
        native = json.loads(s["native_labels"])
        assert native["image_id"] == s["upstream_id"]
        assert len(native["points"]) == len(mine)


def test_metrics(result, planted):
    m = result["metrics"]
    assert m["quarantine"] == {
        "corrupt_image": 1,
        "image_unusable": planted["truncated_png"]["points"] + planted["missing_image"]["points"],
        "missing_image": 1,
        "point_outside_image": len(planted["points_outside"]["outside"]),
        "geometry_mismatch": 1 + planted["geometry_mismatch"]["points"],
    }
    assert m["inputs"] == {"image": planted["images"], "point": planted["points"]}
    assert m["growth_form_null_rows"] == planted["growth_form_none_rows"]
    # Every label looked up is mapped; points the runner then refused (outside, image unusable
    # after the lookup) were mapped too, so mapped >= kept points.
    cw = m["crosswalk"]
    assert cw["mapped"] == cw["total"] >= m["points"] and cw["ratio"] == 1.0
    assert sum(m["classes"]["top_level_category"].values()) == m["points"]
    assert sum(m["classes"]["benthic_attribute"].values()) == m["points"]


def test_stable_bytes_and_independent_of_jobs(result, tmp_path):
    ctx = replace(result["ctx"], out_dir=tmp_path / "again", jobs=1)
    run(ctx)
    for name in ("samples", "points", "quarantine"):
        first = (result["ctx"].out_dir / f"{name}.parquet").read_bytes()
        assert (ctx.out_dir / f"{name}.parquet").read_bytes() == first, name


# --- a hand-made raw folder for the records the sample upstream does not plant -------------------


def _png(path: Path, h: int, w: int, value: int) -> None:
    Image.fromarray(np.full((h, w, 3), value, dtype=np.uint8)).save(path)


def _row(pid: str, image_id: str, r: int, c: int, attr: str | None, gf: str = "None", region=None) -> dict:
    return {
        "id": f"ann-{pid}",
        "image_id": image_id,
        "point_id": pid,
        "row": r,
        "col": c,
        "benthic_attribute_id": attr,
        "benthic_attribute_name": "x",
        "growth_form_id": gf,
        "growth_form_name": gf,
        "updated_on": "2024-01-02T03:04:05+00:00",  # readers accept an ISO string too
        "region_id": region,
        "region_name": None,
    }


@pytest.fixture
def handmade(tmp_path, fetched_root):
    raw = tmp_path / "data" / "raw" / "mermaid"
    raw.mkdir(parents=True)
    attrs = json.loads((fetched_root / "data" / "taxonomy" / "benthicattributes.json").read_text())
    attr = attrs[0]["id"]
    rows = [
        _row("p1", "img-a", 1, 1, attr, region="realm-1"),
        _row("p2", "img-a", 1, 1, attr, region="realm-1"),  # same (row, col) as p1
        _row("p1", "img-b", 2, 2, attr),  # point_id already kept in img-a
        _row("p3", "img-b", 3, 3, "not-in-taxonomy"),
        _row("p4", "img-b", 4, 4, None),
        _row("p5", None, 5, 5, attr),
        _row("p6", "../escape", 1, 1, attr),
        _row("p7", "img-b", 5, 5, attr, gf=""),
    ]
    pq.write_table(pa.Table.from_pylist(rows), raw / PARQUET)
    _png(raw / "img-a.png", 8, 8, 10)
    _png(raw / "img-b.png", 8, 8, 200)
    _png(raw / "img-orphan.png", 8, 8, 90)
    _png(raw / "img-a_thumbnail.png", 4, 4, 10)  # thumbnails are not inputs
    ctx = ingest_context("mermaid", tmp_path)
    return replace(ctx, taxonomy_dir=fetched_root / "data" / "taxonomy", jobs=1)


def test_handmade_records(handmade):
    m = run(handmade)
    q = {(r["record_kind"], r["record_id"]): r for r in read(handmade.out_dir, "quarantine")}
    reasons = {k: r["reason"] for k, r in q.items()}
    assert reasons == {
        ("point", "p2"): "duplicate_point",
        ("point", "p1"): "duplicate_point",  # the img-b repeat of p1
        ("point", "p3"): "unmapped_label",
        ("point", "p4"): "bad_record",
        ("point", "p5"): "bad_record",
        ("point", "p6"): "image_unusable",
        ("image", "../escape"): "bad_record",
        ("image", "img-orphan"): "no_annotation",
    }
    assert "not in the taxonomy snapshot" in q[("point", "p3")]["detail"]
    points = read(handmade.out_dir, "points")
    assert sorted(p["point_id"] for p in points) == ["mermaid-p1", "mermaid-p7"]
    assert all(p["growth_form_id"] is None for p in points)  # "None" and "" are both null
    assert m["inputs"] == {"image": 4, "point": 8}
    kinds = Counter(k for k, _ in q)
    assert m["inputs"]["image"] == m["samples"] + kinds["image"]
    assert m["inputs"]["point"] == m["points"] + kinds["point"]
    # p1, p2 (a duplicate position, refused later by the runner), p3 (unmapped), p7 were looked up.
    assert m["crosswalk"] == {"mapped": 3, "total": 4, "ratio": 0.75}


def test_format_change_fails_naming_the_file(fetched_root, tmp_path):
    raw = tmp_path / "data" / "raw" / "mermaid"
    raw.mkdir(parents=True)
    table = pq.read_table(fetched_root / "data" / "raw" / "mermaid" / PARQUET)
    table = table.rename_columns(
        ["attribute_id" if n == "benthic_attribute_id" else n for n in table.column_names]
    )
    pq.write_table(table, raw / PARQUET)
    ctx = replace(ingest_context("mermaid", tmp_path), taxonomy_dir=fetched_root / "data" / "taxonomy")
    with pytest.raises(UpstreamFormatError) as err:
        run(ctx)
    message = str(err.value)
    assert PARQUET in message and "benthic_attribute_id" in message and "attribute_id" in message


def test_unreadable_parquet_fails_naming_the_file(fetched_root, tmp_path):
    raw = tmp_path / "data" / "raw" / "mermaid"
    raw.mkdir(parents=True)
    (raw / PARQUET).write_bytes(b"id,image_id\n1,2\n")
    ctx = replace(ingest_context("mermaid", tmp_path), taxonomy_dir=fetched_root / "data" / "taxonomy")
    with pytest.raises(UpstreamFormatError, match=PARQUET):
        run(ctx)
    shutil.rmtree(raw)
    with pytest.raises(UpstreamFormatError, match="missing"):
        run(ctx)


def test_an_empty_parquet_fails_instead_of_quarantining_every_image(fetched_root, tmp_path):
    raw = tmp_path / "data" / "raw" / "mermaid"
    raw.mkdir(parents=True)
    table = pq.read_table(fetched_root / "data" / "raw" / "mermaid" / PARQUET)
    pq.write_table(table.slice(0, 0), raw / PARQUET)
    _png(raw / "img-a.png", 8, 8, 10)
    ctx = replace(ingest_context("mermaid", tmp_path), taxonomy_dir=fetched_root / "data" / "taxonomy")
    with pytest.raises(UpstreamFormatError, match=f"{PARQUET}: the annotations parquet has no rows"):
        run(ctx)


def test_a_folder_or_symlink_where_an_image_belongs_is_quarantined(handmade, tmp_path):
    raw = handmade.raw_dir
    (raw / "img-b.png").unlink()
    (raw / "img-b.png").mkdir()
    outside = tmp_path.parent / f"{tmp_path.name}-host-secret.png"  # outside the project root
    _png(outside, 8, 8, 7)
    (raw / "img-a.png").unlink()
    (raw / "img-a.png").symlink_to(outside)
    run(handmade)
    q = {(r["record_kind"], r["record_id"]): r for r in read(handmade.out_dir, "quarantine")}
    link = q[("image", "img-a")]
    assert link["reason"] == "not_a_regular_file" and "link" in link["detail"]
    assert q[("image", "img-b")]["reason"] == "not_a_regular_file"
    assert read(handmade.out_dir, "samples") == []
