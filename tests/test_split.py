"""split: components, hash assignment, official splits, the ledger under growth, merges, the leakage
check, and the stage on the sample corpus (including growth from scale 0.3 to 0.33)."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import E2E_SCALE, fetch_project
from test_dedup import SOURCES, ingest_all, row, run_cli

from stages import dedup, leakage, products, schema, spatial, split, split_inputs, split_report
from stages.config import load_params
from stages.errors import TidepoolError, UpstreamFormatError
from stages.fsutil import write_parquet
from stages.ingest.coasttrain import spatial_block
from stages.ingest.common import point_cover_labels

REPO = Path(__file__).resolve().parents[1]
PRIORITY = ["mermaid", "coralnet", "seatizen", "coasttrain", "inat2017"]
GROUP_BY = {
    "mermaid": [],
    "coralnet": [],
    "coasttrain": ["spatial_block"],
    "inat2017": ["observer"],
    "seatizen": ["session"],
}


def params(salt: str = "test-salt", **ratios: float) -> split.SplitParams:
    return split.split_params(
        {
            "split": {
                "salt": salt,
                "ratios": ratios or {"train": 0.8, "val": 0.1, "test": 0.1},
                "group_by": GROUP_BY,
                "ledger": "data/ledger/splits.parquet",
            }
        }
    )


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return dedup.samples_frame(pa.Table.from_pylist(rows, schema=schema.SAMPLES))


def corpus(scale: int, seed_phash: int = 0) -> list[dict[str, Any]]:
    """A synthetic corpus that grows like the generator: item k is the same at every scale.

    Seatizen sessions of 3 frames, iNat images whose observer pool grows slowly (so new images
    join old observers) with an official split per image, single reef images, Coast Train tiles
    in blocks of 4, and every 25th reef image duplicated in another source."""
    rows = []
    rng = np.random.default_rng(seed_phash)
    base = rng.integers(0, 2**64, 10 * scale + 10, dtype=np.uint64)
    for k in range(4 * scale):
        src = "mermaid" if k % 2 else "coralnet"
        rows.append(row(f"{src}-{k:04d}", src, int(base[k]), n_points=5))
        if k % 25 == 0:
            rows.append(row(f"seatizen-dup{k:04d}", "seatizen", int(base[k]) ^ 1, session=f"dup{k}"))
    for k in range(3 * scale):
        rows.append(row(f"seatizen-s{k // 3:03d}-{k % 3}", "seatizen", None, session=f"s{k // 3:03d}"))
    for k in range(3 * scale):
        split_k = "val" if k % 4 == 0 else "train"
        rows.append(
            row(f"inat2017-{k:04d}", "inat2017", None, observer=f"u{6 + k // 10}", official_split=split_k)
        )
    for k in range(2 * scale):
        rows.append(row(f"coasttrain-{k:04d}", "coasttrain", None, spatial_block=f"b{k // 4}"))
    return rows


def clusters_of(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return dedup.find_duplicates(frame(rows), 4, PRIORITY).clusters


def assign(rows, ledger=None, sp=None) -> split.Assignment:
    empty = pd.DataFrame({c: pd.Series(dtype=object) for c in split.LEDGER.names})
    return split.assign(frame(rows), clusters_of(rows), empty if ledger is None else ledger, sp or params())


def ledger_from(result: split.Assignment) -> pd.DataFrame:
    return result.frame[["sample_id", "source", "split"]].copy()


# --- components and hashing ------------------------------------------------------------------------


def test_components_never_span_splits_and_follow_group_keys():
    rows = corpus(40)
    result = assign(rows)
    split.check_leakage(result.frame)
    f = result.frame.set_index("sample_id")
    # A Seatizen session, a Coast Train block, a duplicate pair across sources: one component each.
    assert (
        f.loc["seatizen-s005-0", "component"]
        == f.loc["seatizen-s005-2", "component"]
        == "session:seatizen:s005"
    )
    assert f.loc["coasttrain-0001", "component"] == f.loc["coasttrain-0003", "component"]
    assert f.loc["seatizen-dup0025", "component"] == f.loc["mermaid-0025", "component"]
    non_official = result.frame[result.frame["official_split"].isna()]
    assert (non_official.groupby("component")["split"].nunique() == 1).all()
    # Every split occurs, roughly by the ratios (components, not samples, are drawn).
    counts = result.frame["split"].value_counts()
    assert counts["train"] > counts["val"] > 0 and counts["test"] > 0


def test_split_is_the_salted_hash_of_the_canonical_key_not_row_order():
    rows = corpus(20)
    first = assign(rows).frame
    shuffled = [rows[i] for i in np.random.default_rng(1).permutation(len(rows))]
    assert first.to_dict("records") == assign(shuffled).frame.to_dict("records")
    sp = params()
    hashed = first[first["assigned_by"] == "hash"]
    hashed = hashed[hashed["official_split"].isna()]
    assert len(hashed) > 20
    for comp, sp_split in zip(hashed["component"], hashed["split"]):
        assert sp_split == split.hash_split(split.unit_hash(sp.salt, comp), sp.ratios)
    other_salt = assign(rows, sp=params("another-salt")).frame
    assert (other_salt["split"] != first["split"]).any()


def test_canonical_key_prefers_group_keys_so_a_new_frame_keeps_its_session_split_without_ledger():
    rows = corpus(10)
    before = assign(rows).frame.set_index("sample_id")
    grown = [*rows, row("seatizen-s002-9", "seatizen", None, session="s002")]
    after = assign(grown).frame.set_index("sample_id")
    assert after.loc["seatizen-s002-9", "component"] == "session:seatizen:s002"
    assert after.loc["seatizen-s002-9", "split"] == before.loc["seatizen-s002-0", "split"]
    # A component without group keys is named by its smallest sample id.
    assert before.loc["mermaid-0003", "component"] == "sample:mermaid-0003"


def test_site_groups_where_the_table_has_it_and_is_ignored_where_it_does_not():
    rows = [row(f"coralnet-s1-{k}", "coralnet", None, n_points=1) for k in range(6)]
    sp = split.split_params(
        {"split": {"salt": "s", "ratios": {"train": 1}, "group_by": {"coralnet": ["site"]}, "ledger": "x"}}
    )
    empty = pd.DataFrame({c: pd.Series(dtype=object) for c in split.LEDGER.names})
    no_clusters = pd.DataFrame({c: pd.Series(dtype=object) for c in ("sample_id", "cluster_id", "rank")})
    df = frame(rows).drop(columns=["site"], errors="ignore")  # a table from before the column
    assert "site" not in df  # an older table: grouping by site unites nothing, and is no error
    before = split.assign(df, no_clusters, empty, sp).frame
    assert list(before["component"]) == [f"sample:coralnet-s1-{k}" for k in range(6)]
    df["site"] = ["A", "A", "A", "B", "B", None]
    after = split.assign(df, no_clusters, empty, sp).frame.set_index("sample_id")["component"]
    assert list(after) == ["site:coralnet:A"] * 3 + ["site:coralnet:B"] * 2 + ["sample:coralnet-s1-5"]


# --- official splits -------------------------------------------------------------------------------


def test_official_val_stays_val_and_test_is_carved_from_official_train_only():
    rows = []
    for obs in range(200):
        for k in range(3):
            official = "val" if (obs % 5 == 0 and k == 0) else "train"
            rows.append(
                row(f"inat2017-{obs:03d}-{k}", "inat2017", None, observer=f"o{obs}", official_split=official)
            )
    rows.append(row("seatizen-joins-val", "seatizen", None, observer="x"))  # no official split
    result = assign(rows)
    f = result.frame
    assert (f.loc[f["official_split"] == "val", "split"] == "val").all()
    assert set(f.loc[f["official_split"] == "train", "split"]) == {"train", "test"}
    # Observers with an official-val image: their train images stay train (test never beside val).
    mixed = f[f["component"].isin(set(f.loc[f["official_split"] == "val", "component"]))]
    assert set(mixed["split"]) == {"train", "val"}
    assert (mixed.loc[mixed["official_split"] == "train", "split"] == "train").all()
    # Train-only observers: about ratios.test / (train + test) of them carved into test.
    train_only = f[~f["component"].isin(set(mixed["component"]))]
    per_comp = train_only.groupby("component")["split"].first()
    assert 0.03 < (per_comp == "test").mean() < 0.25
    overlap = split.check_leakage(f)
    assert overlap["components_spanning_official_splits"] == {"train+val": 40}
    assert overlap["samples_in_those_components"] == 120


def test_samples_without_official_split_joining_an_official_val_component_go_to_val():
    rows = [
        row("inat2017-1", "inat2017", 0xF0F0, observer="u1", official_split="val"),
        row("mermaid-copy", "mermaid", 0xF0F0),  # a duplicate of the val image
    ]
    f = assign(rows).frame.set_index("sample_id")
    assert f.loc["mermaid-copy", "split"] == "val"
    assert f.loc["mermaid-copy", "assigned_by"] == "official"
    split.check_leakage(f.reset_index())


def test_a_component_that_upstream_put_in_val_and_test_keeps_both_and_adds_nothing_else():
    rows = [
        row("inat2017-1", "inat2017", 0x0F0F, observer="u", official_split="val"),
        row("inat2017-2", "inat2017", None, observer="u", official_split="test"),
        row("seatizen-x", "seatizen", 0x0F0F),  # a duplicate of the val image
    ]
    result = assign(rows)
    f = result.frame.set_index("sample_id")
    assert f["split"].to_dict() == {"inat2017-1": "val", "inat2017-2": "test", "seatizen-x": "val"}
    overlap = split.check_leakage(result.frame)
    assert overlap["components_spanning_official_splits"] == {"val+test": 1}


# --- the leakage check -----------------------------------------------------------------------------


def test_leakage_check_fails_on_a_constructed_leak():
    f = assign(corpus(10)).frame
    comp = "session:seatizen:s003"
    members = f.index[f["component"] == comp]
    other = {"train": "test", "val": "train", "test": "train"}[f.loc[members[0], "split"]]
    leaky = f.copy()
    leaky.loc[members[0], "split"] = other
    with pytest.raises(TidepoolError, match=r"component 'session:seatizen:s003' spans splits \['"):
        split.check_leakage(leaky)


def test_leakage_check_fails_when_official_val_is_moved_or_test_sits_beside_val():
    rows = [
        row("inat2017-1", "inat2017", None, observer="u1", official_split="val"),
        row("inat2017-2", "inat2017", None, observer="u1", official_split="train"),
    ]
    f = assign(rows).frame
    split.check_leakage(f)  # upstream's own train/val overlap: allowed
    carved = f.copy()
    carved.loc[carved["official_split"] == "train", "split"] = "test"
    with pytest.raises(TidepoolError, match="spans splits"):
        split.check_leakage(carved)
    moved = f.copy()
    moved.loc[moved["official_split"] == "val", "split"] = "train"
    with pytest.raises(TidepoolError, match="official val"):
        split.check_leakage(moved)


def test_split_quality_warns_of_empty_splits_and_of_classes_missing_from_val_or_test():
    cc = products.ClassCounts(np.array([10, 0, 3]), ["a", "b"], np.array([[6, 0, 3], [4, 0, 0]]))
    w = split_report.quality(cc, {"train": 0.8, "val": 0.1, "test": 0.1})
    assert (w["empty_splits"], w["classes_without_val"], w["classes_without_test"]) == (["val"], 2, 1)
    md = "\n".join(split_report.quality_markdown({"p": {"classes": 2, "warnings": w}}))
    assert "**p**: split(s) left empty: val; 2 of 2 classes have no val sample (a, b)" in md
    assert "1 of 2 classes have no test sample (b)" in md
    # A split whose ratio is 0 is meant to be empty: no warning for it.
    w0 = split_report.quality(cc, {"train": 0.9, "val": 0.0, "test": 0.1})
    assert (w0["empty_splits"], w0["classes_without_val"]) == ([], 0)
    csv_text = split_report.plot_csv(cc)
    assert csv_text.splitlines() == [",".join(split_report.PLOT_COLUMNS), "a,6,0,3,0.600000,0,1.000000",
                                     "b,4,0,0,0.400000,0,0.000000"]  # fmt: skip


# --- the ledger ------------------------------------------------------------------------------------


def test_growth_with_the_ledger_moves_no_existing_sample():
    small = corpus(30)
    first = assign(small)
    ledger = ledger_from(first)
    grown = corpus(33)
    assert {r["sample_id"] for r in small} < {r["sample_id"] for r in grown}
    second = assign(grown, ledger)
    split.check_leakage(second.frame)
    assert len(second.moved) == 0
    old = second.frame[second.frame["sample_id"].isin(set(ledger["sample_id"]))]
    assert (old["split"].to_numpy() == old["ledger_split"].to_numpy()).all()
    assert set(old["assigned_by"]) <= {"ledger", "official"}
    # The ledger pins existing samples even when a parameter would reshuffle everything.
    resalted = assign(grown, ledger, sp=params("a-new-salt"))
    assert len(resalted.moved) == 0
    fresh = assign(grown, sp=params("a-new-salt")).frame.set_index("sample_id")
    would_move = (fresh.loc[ledger["sample_id"], "split"].to_numpy() != ledger["split"].to_numpy()).sum()
    assert would_move > 0


def _two_components_in_different_splits(rows, sp) -> tuple[str, str]:
    f = assign(rows, sp=sp).frame.set_index("sample_id")
    singles = [s for s in f.index if f.loc[s, "component"] == f"sample:{s}" and s.startswith("mermaid")]
    for a in singles:
        for b in singles:
            if f.loc[a, "split"] == "train" and f.loc[b, "split"] != "train":
                return a, b
    raise AssertionError("no pair of components in different splits")


def test_a_merge_of_two_ledger_components_is_reported_as_a_move():
    sp = params()
    rows = corpus(12)
    first = assign(rows, sp=sp)
    ledger = ledger_from(first)
    a, b = _two_components_in_different_splits(rows, sp)
    ph = {r["sample_id"]: r["phash"] for r in rows}
    # New data: a Seatizen frame that duplicates `a`, in the same session as a copy of `b`.
    grown = [
        *rows,
        row("seatizen-bridge-1", "seatizen", ph[a], session="bridge"),
        row("seatizen-bridge-2", "seatizen", ph[b], session="bridge"),
    ]
    second = assign(grown, ledger, sp)
    split.check_leakage(second.frame)
    f = second.frame.set_index("sample_id")
    assert f.loc[a, "component"] == f.loc[b, "component"]
    assert f.loc[a, "split"] == f.loc[b, "split"] == "train"  # tie: train wins
    assert f.loc[a, "assigned_by"] == "merge"
    moved = second.moved.set_index("sample_id")
    assert list(moved.index) == [b]
    assert moved.loc[b, "from_split"] == first.frame.set_index("sample_id").loc[b, "split"]
    assert (moved.loc[b, "to_split"], moved.loc[b, "reason"]) == ("train", "merge")
    m = split.split_metrics(second, split.check_leakage(second.frame), {}, ledger, 0)
    assert m["ledger"]["moved"] == 1 and m["moved"][0]["sample_id"] == b
    report = split.report_markdown(m, second.moved, sp)
    assert b in report and "merge" in report


def test_merge_goes_to_the_majority_split():
    rows = [row(f"mermaid-{k}", "mermaid", None, session=None) for k in range(5)]
    ledger = pd.DataFrame(
        {
            "sample_id": [f"mermaid-{k}" for k in range(5)],
            "source": ["mermaid"] * 5,
            "split": ["val", "val", "test", "train", "val"],
        }
    )
    # One new dedup cluster joins all five.
    clusters = pd.DataFrame(
        {
            "sample_id": [f"mermaid-{k}" for k in range(5)],
            "cluster_id": ["mermaid-0"] * 5,
            "rank": list(range(5)),
        }
    )
    result = split.assign(frame(rows), clusters, ledger, params())
    assert set(result.frame["split"]) == {"val"}
    assert sorted(result.moved["sample_id"]) == ["mermaid-2", "mermaid-3"]


def test_updated_ledger_keeps_samples_that_disappeared(tmp_path):
    first = assign(corpus(10))
    ledger = ledger_from(first)
    ledger.loc[len(ledger)] = ["mermaid-gone", "mermaid", "test"]
    table = split.updated_ledger(ledger, first.frame)
    assert table.schema.equals(split.LEDGER)
    ids = table.column("sample_id").to_pylist()
    assert ids == sorted(ids) and "mermaid-gone" in ids
    write_parquet(tmp_path / "l.parquet", table)
    back = split.read_ledger(tmp_path / "l.parquet")
    assert back.set_index("sample_id").loc["mermaid-gone", "split"] == "test"


def test_a_broken_ledger_is_named(tmp_path):
    path = tmp_path / "ledger.parquet"
    pq.write_table(pa.table({"sample_id": ["a"], "split": ["holdout"]}), path)
    with pytest.raises(UpstreamFormatError, match="ledger.parquet: ledger has splits"):
        split.read_ledger(path)
    assert len(split.read_ledger(tmp_path / "absent.parquet")) == 0


def test_committed_ledger_is_well_formed_whatever_it_holds():
    # Whatever a release put in it: the schema, sorted unique ids, valid splits, ids that carry
    # their source's prefix, and the stage reads it back as it is.
    path = REPO / "data" / "ledger" / "splits.parquet"
    table = pq.read_table(path)
    assert table.schema.equals(split.LEDGER, check_metadata=False)
    ids = table.column("sample_id").to_pylist()
    assert all(isinstance(i, str) and i for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert set(table.column("split").to_pylist()) <= set(split.SPLITS)
    assert all(
        src is None or i.startswith(f"{src}-") for i, src in zip(ids, table.column("source").to_pylist())
    )
    assert split.read_ledger_table(path).equals(table.replace_schema_metadata(None))


def test_bad_split_params_are_refused():
    from stages.errors import ConfigError

    base = {"salt": "s", "ratios": {"train": 1}, "group_by": {}, "ledger": "x"}
    for bad in (
        {"ratios": {"train": 0.8, "holdout": 0.2}},
        {"ratios": {"train": -1}},
        {"group_by": {"inat2017": ["user"]}},
        {"salt": ""},
    ):
        with pytest.raises(ConfigError):
            split.split_params({"split": {**base, **bad}})


# --- the stage on the sample corpus ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ingested(fetched_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ingest_all(fetched_root, tmp_path_factory.getbasetemp() / "dedup-split-ingested")


def stage_project(ingested_root: Path, dest: Path) -> Path:
    shutil.copytree(ingested_root, dest)
    (dest / "data" / "ledger").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "data" / "ledger" / "splits.parquet", dest / "data" / "ledger" / "splits.parquet")
    for module in ("stages.dedup", "stages.split"):
        proc = run_cli(module, dest)
        assert proc.returncode == 0, proc.stderr
    return dest


def plot_rows(root: Path, product: str) -> list[dict[str, str]]:
    with open(root / "metrics" / "plots" / "split" / f"{product}.csv", newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == split_report.PLOT_COLUMNS
        return list(reader)


def assignments(root: Path) -> pd.DataFrame:
    """assignments.parquet joined with provenance.parquet (assigned_by), indexed by sample id."""
    a = pq.read_table(root / "data" / "split" / "assignments.parquet").to_pandas().set_index("sample_id")
    p = pq.read_table(root / "data" / "split" / "provenance.parquet").to_pandas().set_index("sample_id")
    return a.join(p, how="left")


def test_stage_on_the_sample_corpus(ingested, tmp_path, sample_upstream):
    root = stage_project(ingested, tmp_path / "p")
    a = assignments(root)
    n = sum(pq.read_metadata(ingested / "data" / "interim" / s / "samples.parquet").num_rows for s in SOURCES)
    assert len(a) == n
    assert pq.read_schema(root / "data" / "split" / "assignments.parquet").equals(
        split.ASSIGNMENTS, check_metadata=False
    )
    assert set(a["assigned_by"]) <= set(split.ASSIGNED_BY)
    clusters = dedup.read_clusters(root / "data" / "dedup" / "clusters.parquet")
    for _, grp in clusters.groupby("cluster_id"):
        assert a.loc[grp["sample_id"], "split"].nunique() == 1
    inat = pq.read_table(ingested / "data" / "interim" / "inat2017" / "samples.parquet").to_pandas()
    val_ids = inat.loc[inat["official_split"] == "val", "sample_id"]
    assert (a.loc[val_ids, "split"] == "val").all()
    m = json.loads((root / "metrics" / "split.json").read_text())
    assert set(m["products"]) == {"reef-points", "reef-images", "coast-seg", "inat2017"}
    rp = m["products"]["reef-points"]
    assert sum(rp["samples"].values()) > sum(rp["images"].values())  # patches, not images
    # Per-class counts live in the plot files (one row per class), equal to the row-by-row
    # reference of stages.products; the metrics keep the totals.
    samples = dedup.load_samples(
        ingested, list(SOURCES), columns=("sample_id", "source", "labels", "mask_path", "phash")
    )
    points = pd.concat(
        [
            pq.read_table(ingested / "data" / "interim" / s / "points.parquet").to_pandas()
            for s in ("mermaid", "coralnet")
        ]
    )
    split_of = a["split"].to_dict()
    for p in products.products_from_params(load_params(REPO / "params.yaml")):
        chosen = products.product_samples(p, samples, clusters)
        if p.unit == "point":
            pts = products.product_points(p, points, chosen)
            ref = products.class_split_counts(
                products.point_classes(p, pts), [split_of[s] for s in pts["sample_id"]]
            )
        else:
            ref = products.class_split_counts(
                products.sample_classes(p, chosen), [split_of[s] for s in chosen["sample_id"]]
            )
        rows = plot_rows(root, p.name)
        assert {r["class"]: {s: int(r[s]) for s in split.SPLITS if int(r[s])} for r in rows} == ref, p.name
        assert m["products"][p.name]["classes"] == len(rows) > 0
        entry = m["products"][p.name]
        for s in split.SPLITS:
            total = entry["samples"][s]
            assert all(abs(float(r[f"{s}_share"]) - (int(r[s]) / total if total else 0)) < 1e-6 for r in rows)
        assert entry["warnings"]["classes_without_val"] == sum(int(r["val"]) == 0 for r in rows)
        assert entry["warnings"]["classes_without_test"] == sum(int(r["test"]) == 0 for r in rows)
        assert entry["warnings"]["empty_splits"] == [s for s in split.SPLITS if entry["samples"][s] == 0]
    assert m["warnings"] == sum(
        len(e["warnings"]["empty_splits"])
        + e["warnings"]["classes_without_val"]
        + e["warnings"]["classes_without_test"]
        for e in m["products"].values()
    )
    assert "## Split quality" in (root / "data" / "split" / "report.md").read_text()
    assert m["independent_check"]["samples"] == n and m["independent_check"]["points"] == len(points)
    assert m["official"]["components_spanning_official_splits"].get("train+val", 0) >= 1
    assert "# Split assignments" in (root / "data" / "split" / "report.md").read_text()

    # --update-ledger: the next run takes every split from the ledger and moves nothing.
    before = (root / "data" / "split" / "assignments.parquet").read_bytes()
    assert run_cli("stages.split", root, "--update-ledger").returncode == 0
    assert (root / "data" / "split" / "assignments.parquet").read_bytes() == before
    assert run_cli("stages.split", root).returncode == 0
    # Refreshing the ledger changes provenance only: the file pack depends on keeps its bytes.
    assert (root / "data" / "split" / "assignments.parquet").read_bytes() == before
    again = assignments(root)
    assert (again["split"] == a["split"]).all()
    assert set(again["assigned_by"]) <= {"ledger", "official"}
    m2 = json.loads((root / "metrics" / "split.json").read_text())
    assert m2["ledger"]["moved"] == 0 and m2["ledger"]["samples_in_ledger"] == n


def leak(result: split.Assignment, sample_id: str, to: str, component: str | None = None) -> split.Assignment:
    """`result` with one sample moved to split `to` (and, given `component`, relabelled to it): a
    broken assignment step, fed to the stage through `assign_inputs`."""
    t = result.table
    k = t.column("sample_id").to_pylist().index(sample_id)
    splits = t.column("split").to_pylist()
    splits[k] = to
    t = t.set_column(t.schema.get_field_index("split"), "split", pa.array(splits, pa.string()))
    if component is not None:
        comps = t.column("component").to_pylist()
        comps[k] = component
        t = t.set_column(t.schema.get_field_index("component"), "component", pa.array(comps, pa.string()))
    codes = result.decision.split.copy()
    codes[k] = split.SPLITS.index(to)
    decision = split.Decision(codes, result.decision.how, result.decision.moved)
    return split.Assignment(t, result.components, decision)


def _other(s: str) -> str:
    return "test" if s != "test" else "train"


def test_stage_fails_on_a_leak_and_names_the_component(ingested, tmp_path, monkeypatch):
    root = stage_project(ingested, tmp_path / "p")
    original = split.assign_inputs

    def leaky(*args, **kwargs):
        # A broken assignment step: one frame of a Seatizen session lands in another split.
        result = original(*args, **kwargs)
        f = result.frame
        comp = f.loc[f["source"] == "seatizen", "component"].value_counts().index[0]
        first = f.loc[f["component"] == comp].iloc[0]
        return leak(result, first["sample_id"], _other(first["split"]))

    monkeypatch.setattr(split, "assign_inputs", leaky)
    before = (root / "data" / "split" / "assignments.parquet").read_bytes()
    with pytest.raises(
        TidepoolError, match=r"split leakage check: component 'session:seatizen:.*' spans splits"
    ):
        split.run(load_params(REPO / "params.yaml"), root)
    assert (root / "data" / "split" / "assignments.parquet").read_bytes() == before  # nothing written


# --- growth of the real sample corpus: 0.3 -> 0.33 ----------------------------------------------------

GROWN_SCALE = round(E2E_SCALE * 1.1, 4)


@pytest.fixture(scope="module")
def grown_fetched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample upstreams at 1.1x the session scale, fetched like `fetched_root`."""
    from stages.samplegen.__main__ import generate_all

    upstream = tmp_path_factory.mktemp("upstream-grown")
    generate_all(upstream, scale=GROWN_SCALE, jobs=2)
    return fetch_project(upstream, tmp_path_factory.mktemp("fetched-grown"))


@pytest.mark.slow
def test_growing_the_sample_sources_moves_no_existing_sample(ingested, grown_fetched, tmp_path, capsys):
    small = stage_project(ingested, tmp_path / "small")
    assert run_cli("stages.split", small, "--update-ledger").returncode == 0
    ledger = small / "data" / "ledger" / "splits.parquet"
    before = assignments(small)

    grown = ingest_all(grown_fetched, tmp_path / "grown")
    (grown / "data" / "ledger").mkdir(parents=True, exist_ok=True)
    shutil.copy(ledger, grown / "data" / "ledger" / "splits.parquet")
    for module in ("stages.dedup", "stages.split"):
        proc = run_cli(module, grown)
        assert proc.returncode == 0, proc.stderr
    after = assignments(grown)
    assert set(before.index) < set(after.index)
    new = len(after) - len(before)
    assert new >= 0.05 * len(before)
    old = after.loc[before.index]
    assert (old["split"] == before["split"]).all()
    m = json.loads((grown / "metrics" / "split.json").read_text())
    assert m["ledger"]["moved"] == 0 and m["ledger"]["new_samples"] == new
    with capsys.disabled():
        print(
            f"\ngrowth {E2E_SCALE} -> {GROWN_SCALE}: {len(before)} -> {len(after)} samples, moved "
            f"{m['ledger']['moved']}, would move without the ledger "
            f"{m['ledger']['would_move_without_ledger']}"
        )


# --- a hand-made project: the independent leakage check, spatial blocks, privacy, split quality ------

SECRET_OBSERVERS = ("obs-SECRET-4242", "obs-SECRET-777")  # raw user ids that must never be published


def _point_labels(n: int, attr: str = "Acropora") -> str:
    pts = [
        {
            "benthic_attribute_id": f"id-{attr}",
            "benthic_attribute_name": attr,
            "growth_form_id": None,
            "growth_form_name": None,
            "top_level_category": "Hard coral",
        }
    ] * n
    return json.dumps(point_cover_labels(pts), sort_keys=True)


def _tile(sample_id: str, session: str, lon_min: float, lon_max: float, lat_min: float = 25.0) -> dict:
    lat_max = lat_min + 0.01
    geo = {"lat_min": lat_min, "lat_max": lat_max, "lon_min": lon_min, "lon_max": lon_max}
    labels = {"classes": ["water"], "pixels": {"water": 10, "ignore": 0}, "present": ["water"]}
    return row(
        sample_id,
        "coasttrain",
        None,
        session=session,
        spatial_block=spatial_block((lat_min + lat_max) / 2, (lon_min + lon_max) / 2, 0.05),
        native_labels=json.dumps({"geo": geo}),
        labels=json.dumps(labels),
        mask_path=f"data/interim/coasttrain/masks/{sample_id}.png",
    )


def handmade_rows() -> dict[str, list[dict[str, Any]]]:
    """Five small sample tables with one case each of what the split must keep together."""
    h = [int(x) for x in np.random.default_rng(21).integers(0, 2**63, 16, dtype=np.uint64)]
    seatizen_labels = json.dumps({"attribute": [{"name": "Sand", "value": 1}], "top_level": {"Sand": 1}})
    rows = {
        "mermaid": [
            row("mermaid-a", "mermaid", h[0], n_points=2, labels=_point_labels(2)),
            row("mermaid-dup", "mermaid", h[1] ^ 1, n_points=2, labels=_point_labels(2, "Porites")),
        ],
        "coralnet": [
            row("coralnet-s1-b", "coralnet", h[1], n_points=2, labels=_point_labels(2, "Porites")),
            row("coralnet-s1-c", "coralnet", h[2], n_points=2, labels=_point_labels(2)),
        ],
        "seatizen": [
            row("seatizen-s1-0", "seatizen", h[3], session="S1", labels=seatizen_labels),
            row("seatizen-s1-1", "seatizen", h[4], session="S1", labels=seatizen_labels),
            row("seatizen-s2-0", "seatizen", h[5], session="S2", labels=seatizen_labels),
        ],
        "coasttrain": [
            # West and east share the edge at -80.05: one grid cell each, one footprint seam.
            _tile("coasttrain-R1-west", "R1/a", -80.0510, -80.0500),
            _tile("coasttrain-R2-east", "R2/b", -80.0500, -80.0490),
            _tile("coasttrain-R3-far", "R3/c", -81.0000, -80.9900),
            # No footprint: falls back to its grid cell, the west tile's.
            {**_tile("coasttrain-R4-nogeo", "R4/d", -80.0510, -80.0500), "native_labels": "{}"},
        ],
        "inat2017": [
            row("inat2017-1", "inat2017", h[6], observer=SECRET_OBSERVERS[0], official_split="train",
                labels=json.dumps({"category": "Conus"})),
            row("inat2017-2", "inat2017", h[7], observer=SECRET_OBSERVERS[0], official_split="val",
                labels=json.dumps({"category": "Conus"})),
            row("inat2017-3", "inat2017", h[8], observer=SECRET_OBSERVERS[1], official_split="train",
                labels=json.dumps({"category": "Nerita"})),
            row("inat2017-4", "inat2017", h[9], observer=SECRET_OBSERVERS[1], official_split="val",
                labels=json.dumps({"category": "Nerita"})),
        ],
    }  # fmt: skip
    return rows


def _attribute(r: dict[str, Any]) -> str:
    return next(iter(json.loads(r["labels"])["benthic_attributes"].values()))["name"]


def write_handmade(root: Path) -> Path:
    (root / "dvc.yaml").parent.mkdir(parents=True, exist_ok=True)
    (root / "dvc.yaml").write_text("stages: {}\n", encoding="utf-8")
    for source, rows in handmade_rows().items():
        out = root / "data" / "interim" / source
        write_parquet(out / "samples.parquet", pa.Table.from_pylist(rows, schema=schema.SAMPLES))
        points = [
            {**{c: None for c in schema.POINTS.names}, "point_id": f"{r['sample_id']}-p{k}",
             "sample_id": r["sample_id"], "source": source, "row": k, "col": k,
             "benthic_attribute_name": _attribute(r), "top_level_category": "Hard coral"}
            for r in rows
            for k in range(r["n_points"] or 0)
        ]  # fmt: skip
        if source in ("mermaid", "coralnet"):
            write_parquet(out / "points.parquet", pa.Table.from_pylist(points, schema=schema.POINTS))
    write_parquet(root / "data" / "ledger" / "splits.parquet", split.LEDGER.empty_table())
    return root


@pytest.fixture(scope="module")
def handmade(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hand-made project with dedup and split run (treat as read-only)."""
    root = write_handmade(tmp_path_factory.mktemp("handmade"))
    params = load_params(REPO / "params.yaml")
    dedup.run(params, root)
    split.run(params, root)
    return root


def handmade_params() -> dict[str, Any]:
    return load_params(REPO / "params.yaml")


def verify(root: Path, table: pa.Table, points: list[Path] | None = None) -> dict[str, Any]:
    params = handmade_params()
    sp = split.split_params(params)
    files = split.point_files(root, list(params["sources"])) if points is None else points
    return leakage.verify_assignments(
        root, list(params["sources"]), sp.group_by, sp.spatial_buffer_m, table, files
    )


def with_split(table: pa.Table, sample_id: str, to: str | None = None, drop: bool = False) -> pa.Table:
    ids = table.column("sample_id").to_pylist()
    k = ids.index(sample_id)
    if drop:
        return table.filter(pa.array([i != k for i in range(len(ids))]))
    splits = table.column("split").to_pylist()
    splits[k] = to if to is not None else _other(splits[k])
    return table.set_column(table.schema.get_field_index("split"), "split", pa.array(splits, pa.string()))


def test_independent_check_passes_the_stage_output_and_fails_every_planted_leak(handmade, tmp_path):
    a = pq.read_table(handmade / "data" / "split" / "assignments.parquet")
    checked = verify(handmade, a)
    assert checked["samples"] == a.num_rows and checked["points"] == 8
    assert checked["groups"]["dedup_cluster"] == 1 and checked["groups"]["session"] >= 2
    assert checked["overlapping_tile_pairs"] == 1
    split_of = dict(zip(a.column("sample_id").to_pylist(), a.column("split").to_pylist()))
    cases = {
        "mermaid-dup": r"dedup cluster 'coralnet-s1-b' puts its samples in several splits: .*'mermaid-dup'",
        "seatizen-s1-1": r"session 'S1' of seatizen puts its samples in several splits: .*'seatizen-s1-0'",
        "coasttrain-R2-east": r"the footprints of 'coasttrain-R1-west' \(\w+\) and "
        r"'coasttrain-R2-east' \(\w+\) overlap or touch",
    }
    for sample_id, message in cases.items():
        with pytest.raises(TidepoolError, match=r"split leakage check \(from the inputs\): " + message):
            verify(handmade, with_split(a, sample_id))
    # An observer's official-train image carved into test beside its official-val image: named
    # without the user id.
    assert split_of["inat2017-3"] == "train"
    with pytest.raises(TidepoolError, match=r"one observer of inat2017 \(id withheld\)") as exc:
        verify(handmade, with_split(a, "inat2017-3", "test"))
    assert not any(s in str(exc.value) for s in SECRET_OBSERVERS)
    with pytest.raises(TidepoolError, match=r"'inat2017-2' has the official split val but is in train"):
        verify(handmade, with_split(a, "inat2017-2", "train"))
    with pytest.raises(TidepoolError, match=r"samples \['seatizen-s2-0'\] have no split"):
        verify(handmade, with_split(a, "seatizen-s2-0", drop=True))
    ghost = pa.concat_tables([a, pa.table({"sample_id": ["mermaid-ghost"], "source": ["mermaid"],
                                           "component": ["sample:mermaid-ghost"], "split": ["train"]},
                                          schema=a.schema)])  # fmt: skip
    with pytest.raises(TidepoolError, match=r"assigns samples no sample table holds: \['mermaid-ghost'\]"):
        verify(handmade, ghost)
    orphan = tmp_path / "points.parquet"
    write_parquet(orphan, pa.Table.from_pylist(
        [{**{c: None for c in schema.POINTS.names}, "point_id": "pt-1", "sample_id": "mermaid-gone"}],
        schema=schema.POINTS,
    ))  # fmt: skip
    with pytest.raises(
        TidepoolError, match=r"point 'pt-1' belongs to image 'mermaid-gone', which has no split"
    ):
        verify(handmade, a, [orphan])


def test_the_stage_fails_on_a_leak_its_own_component_check_cannot_see(handmade, tmp_path, monkeypatch):
    root = tmp_path / "p"
    shutil.copytree(handmade, root)
    original = split.assign_inputs

    def leaky(*args, **kwargs):
        # A broken component builder: one session frame gets a component of its own (and a
        # split of its own), so the component-based check sees nothing wrong.
        result = original(*args, **kwargs)
        f = result.frame.set_index("sample_id")
        return leak(result, "seatizen-s1-1", _other(f.loc["seatizen-s1-1", "split"]), "sample:seatizen-s1-1")

    monkeypatch.setattr(split, "assign_inputs", leaky)
    split.check_leakage(leaky(*_stage_inputs(root)).table)  # the component check passes ...
    with pytest.raises(TidepoolError, match=r"from the inputs\): session 'S1' of seatizen"):
        split.run(handmade_params(), root)  # ... the stage does not


def _stage_inputs(root: Path) -> tuple[Any, ...]:
    params = handmade_params()
    sp = split.split_params(params)
    inputs = split_inputs.read_split_inputs(root, list(params["sources"]), sp.group_by)
    members = split_inputs.read_cluster_members(root / "data" / "dedup" / "clusters.parquet", inputs.ids)
    return inputs, members, np.full(len(inputs), -1, dtype=np.int8), sp


def test_tiles_that_straddle_a_cell_edge_share_a_component_and_a_split(handmade):
    a = assignments(handmade)
    west, east = a.loc["coasttrain-R1-west"], a.loc["coasttrain-R2-east"]
    assert west["component"] == east["component"] == a.loc["coasttrain-R4-nogeo", "component"]
    assert west["split"] == east["split"]
    assert a.loc["coasttrain-R3-far", "component"] != west["component"]
    inputs, members, led, sp = _stage_inputs(handmade)
    cells_only = split.assign_inputs(inputs, members, led, dataclasses.replace(sp, spatial_buffer_m=None))
    f = cells_only.frame.set_index("sample_id")
    # Without the footprint join the seam splits them: the grid cells differ.
    assert f.loc["coasttrain-R1-west", "component"] != f.loc["coasttrain-R2-east", "component"]
    assert f.loc["coasttrain-R1-west", "component"] == f.loc["coasttrain-R4-nogeo", "component"]


def test_footprints_pair_within_the_buffer_and_across_the_antimeridian():
    boxes = np.array(
        [
            [0.0, 1.0, 10.0, 11.0],
            [0.0, 1.0, 11.0, 12.0],  # shares an edge with 0
            [0.0, 1.0, 12.00005, 13.0],  # ~5.6 m east of 1
            [5.0, 6.0, 179.5, 180.0],  # touches 4 across the antimeridian
            [5.0, 6.0, -180.0, -179.5],
            [1.00001, 2.0, 10.0, 10.5],  # ~1.1 m north of 0
        ]
    )
    pairs = lambda m: set(zip(*(x.tolist() for x in spatial.touching_pairs(boxes, m))))  # noqa: E731
    assert pairs(0) == {(0, 1), (3, 4)}
    assert pairs(2) == {(0, 1), (3, 4), (0, 5)}
    assert pairs(10) == {(0, 1), (3, 4), (0, 5), (1, 2)}
    rng = np.random.default_rng(3)  # against brute force on random boxes
    lat, lon = rng.uniform(-60, 60, 400), rng.uniform(-180, 179, 400)
    rand = np.stack(
        [lat, lat + rng.uniform(0, 2, 400), lon, np.minimum(lon + rng.uniform(0, 2, 400), 180)], 1
    )
    g = spatial.grown_boxes(rand, 500)
    brute = {
        (i, j)
        for i in range(400)
        for j in range(i + 1, 400)
        if g[i, 0] <= g[j, 1] and g[j, 0] <= g[i, 1] and g[i, 2] <= g[j, 3] and g[j, 2] <= g[i, 3]
    }
    found = set(zip(*(x.tolist() for x in spatial.touching_pairs(rand, 500))))
    assert brute <= found and all(abs(rand[i, 2] - rand[j, 2]) > 300 for i, j in found - brute)
    assert spatial.bounds_from_geo({"lat_min": 1, "lat_max": 0, "lon_min": 0, "lon_max": 1}) is None
    assert (
        spatial.bounds_from_geo({"lat_min": 0, "lat_max": 1, "lon_min": float("nan"), "lon_max": 1}) is None
    )


def test_no_raw_observer_id_in_any_output(handmade, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(handmade, root)
    split.run(handmade_params(), root, update_ledger=True)
    outputs = [
        *(root / "data" / "split").iterdir(),
        *(root / "metrics").rglob("*"),
        root / "data" / "ledger" / "splits.parquet",
    ]
    checked = 0
    for path in outputs:
        if path.is_dir():
            continue
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            text = "\n".join(str(v) for c in table.columns for v in c.to_pylist())
            text += str(table.schema.metadata)
        else:
            text = path.read_text(encoding="utf-8")
        assert not any(s in text for s in SECRET_OBSERVERS), path
        checked += 1
    assert checked >= 6
    a = assignments(root)
    # The two observers still hold their images together, under a public name.
    assert (
        a.loc["inat2017-1", "component"]
        == a.loc["inat2017-2", "component"]
        == "observer:inat2017:#inat2017-1"
    )
    m = json.loads((root / "metrics" / "split.json").read_text())
    assert m["official"]["components_spanning_official_splits"] == {"train+val": 2}
