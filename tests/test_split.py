"""split: components, hash assignment, official splits, the ledger under growth, merges, the leakage
check, and the stage on the sample corpus (including growth from scale 0.3 to 0.33)."""

from __future__ import annotations

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

from stages import dedup, schema, split
from stages.config import load_params
from stages.errors import TidepoolError, UpstreamFormatError
from stages.fsutil import write_parquet

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


def test_committed_ledger_is_empty_with_the_right_schema():
    table = pq.read_table(REPO / "data" / "ledger" / "splits.parquet")
    assert table.schema.equals(split.LEDGER, check_metadata=False)
    assert table.num_rows == 0


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
    assert all(set(per) == {"train", "val", "test"} for per in rp["classes"].values())
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


def test_stage_fails_on_a_leak_and_names_the_component(ingested, tmp_path, monkeypatch):
    root = stage_project(ingested, tmp_path / "p")
    original = split.assign

    def leaky(*args, **kwargs):
        # A broken assignment step: one frame of a Seatizen session lands in another split.
        result = original(*args, **kwargs)
        f = result.frame
        comp = f.loc[f["source"] == "seatizen", "component"].value_counts().index[0]
        first = f.index[f["component"] == comp][0]
        f.loc[first, "split"] = "test" if f.loc[first, "split"] != "test" else "train"
        return result

    monkeypatch.setattr(split, "assign", leaky)
    with pytest.raises(
        TidepoolError, match=r"split leakage check: component 'session:seatizen:.*' spans splits"
    ):
        split.run(load_params(REPO / "params.yaml"), root)


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
