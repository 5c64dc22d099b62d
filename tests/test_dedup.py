"""dedup: matching, clustering, survivor rule, products' keep policies, metrics, the CLI, and the
real ingest output of the sample corpus."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ingest_context
from PIL import Image

from stages import dedup, products, schema
from stages.fsutil import write_parquet
from stages.imaging import probe_image_bytes
from stages.ingest import ingest_source
from stages.samplegen.planted import cross_source_scene
from stages.samplegen.texture import photo, video_frame

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("mermaid", "coralnet", "coasttrain", "inat2017", "seatizen")
PRIORITY = ["mermaid", "coralnet", "seatizen", "coasttrain", "inat2017"]
MAX_PIXELS = 10**8


# --- synthetic sample tables ---------------------------------------------------------------------


def row(sample_id: str, source: str, phash: int | None, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {name: None for name in schema.SAMPLES.names}
    out.update(
        sample_id=sample_id,
        source=source,
        upstream_id=sample_id,
        phash=phash,
        width=640,
        height=480,
        n_points=0,
        file_sha256=f"file-{sample_id}",
        image_format="jpeg",
    )
    out.update(kw)
    return out


def frame(rows: list[dict[str, Any]]):
    return dedup.samples_frame(pa.Table.from_pylist(rows, schema=schema.SAMPLES))


def encode(rgb: np.ndarray, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **kw)
    return buf.getvalue()


def probed(source: str, sample_id: str, data: bytes, **kw: Any) -> dict[str, Any]:
    info = probe_image_bytes(data, MAX_PIXELS)
    return row(
        sample_id,
        source,
        info.phash,
        width=info.width,
        height=info.height,
        file_sha256=info.file_sha256,
        pixel_sha256=info.pixel_sha256,
        image_format=info.format,
        **kw,
    )


def far_hashes(n: int, seed: int = 0) -> list[int]:
    """Hashes at least 20 bits from each other: unrelated images."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    while len(out) < n:
        h = int(rng.integers(0, 2**64, dtype=np.uint64))
        if all((h ^ o).bit_count() >= 20 for o in out):
            out.append(h)
    return out


def clusters_by_member(result: dedup.DedupResult) -> dict[str, str]:
    return dict(zip(result.clusters["sample_id"], result.clusters["cluster_id"]))


# --- real pHashes of the planted kinds of duplicate ------------------------------------------------


@pytest.fixture(scope="module")
def planted_rows() -> list[dict[str, Any]]:
    """The cross-source scene as MERMAID PNG, CoralNet JPEG q92 and the Seatizen 480x360 q85 copy;
    six consecutive video frames; and unrelated photos, all hashed by the ingest probe."""
    scene = cross_source_scene()
    small = np.asarray(Image.fromarray(scene).resize((480, 360), Image.Resampling.LANCZOS))
    rows = [
        probed("mermaid", "mermaid-scene", encode(scene, "PNG"), n_points=25),
        probed("coralnet", "coralnet-s1-scene", encode(scene, "JPEG", quality=92), n_points=18),
        probed("seatizen", "seatizen-scene", encode(small, "JPEG", quality=85), session="S-scene"),
    ]
    video = photo("test-video", 300, 420, "reef")
    for k in range(6):
        rows.append(
            probed(
                "seatizen",
                f"seatizen-v-{k}",
                encode(video_frame(video, "v", k, 288, 384), "JPEG", quality=90),
                session="S-v",
            )
        )
    for k in range(8):
        rows.append(
            probed(
                "mermaid",
                f"mermaid-other-{k}",
                encode(photo(f"other-{k}", 240, 320, "reef"), "PNG"),
                n_points=10,
            )
        )
    return rows


def test_cross_source_scene_and_its_resized_copy_form_one_cluster(planted_rows):
    result = dedup.find_duplicates(frame(planted_rows), 8, PRIORITY)
    member = clusters_by_member(result)
    trio = {"mermaid-scene", "coralnet-s1-scene", "seatizen-scene"}
    assert {member[s] for s in trio} == {"coralnet-s1-scene"}  # the smallest sample id names it
    c = result.clusters.set_index("sample_id")
    assert c.loc["mermaid-scene", "rank"] == 0  # source priority: MERMAID first
    assert c.loc["seatizen-scene", "survivor_id"] == "mermaid-scene"
    assert all(c.loc[s, "match_kinds"] == ["near"] for s in trio)
    assert all(c.loc[s, "distance"] <= 8 for s in trio)


def test_consecutive_frames_chain_into_one_cluster_and_unrelated_images_stay_out(planted_rows):
    result = dedup.find_duplicates(frame(planted_rows), 8, PRIORITY)
    member = clusters_by_member(result)
    assert len({member[f"seatizen-v-{k}"] for k in range(6)}) == 1
    assert not any(s.startswith("mermaid-other") for s in member)
    assert result.clusters["cluster_id"].nunique() == 2


def test_radius_zero_still_finds_identical_phashes_but_not_shifted_frames(planted_rows):
    result = dedup.find_duplicates(frame(planted_rows), 0, PRIORITY)
    member = clusters_by_member(result)
    # The planted scene hashes identically in all three encodings; pans of a video do not.
    assert {"mermaid-scene", "coralnet-s1-scene", "seatizen-scene"} <= set(member)
    assert len({member.get(f"seatizen-v-{k}") for k in range(6)}) > 1


# --- exact matches, ranks, ids -------------------------------------------------------------------


def test_exact_file_and_exact_pixel_matches_join_clusters_without_a_close_phash():
    h = far_hashes(6, seed=1)
    rows = [
        row("coralnet-a", "coralnet", h[0], file_sha256="same-file"),
        row("coralnet-b", "coralnet", h[1], file_sha256="same-file"),  # pHash far: still one file
        row("mermaid-p", "mermaid", h[2], pixel_sha256="same-raster", image_format="png"),
        row("seatizen-q", "seatizen", h[3], pixel_sha256="same-raster", image_format="png"),
        row("inat2017-x", "inat2017", h[4]),
        row("coasttrain-y", "coasttrain", None, file_sha256=None, pixel_sha256="r-y"),
    ]
    result = dedup.find_duplicates(frame(rows), 8, PRIORITY)
    c = result.clusters.set_index("sample_id")
    assert c.loc["coralnet-b", "cluster_id"] == "coralnet-a"
    assert c.loc["coralnet-b", "match_kinds"] == ["exact_file"]
    assert c.loc["seatizen-q", "cluster_id"] == "mermaid-p"
    assert c.loc["seatizen-q", "match_kinds"] == ["exact_pixels"]
    assert set(c.index) == {"coralnet-a", "coralnet-b", "mermaid-p", "seatizen-q"}
    m = dedup.metrics(result)
    assert m["pairs"]["exact_file"] == {"coralnet|coralnet": 1}
    assert m["pairs"]["exact_pixels"] == {"mermaid|seatizen": 1}
    assert m["pairs"]["near"] == {}
    assert m["chained_members"] == 2  # far pHashes, joined by exact matches


def test_survivor_rule_priority_then_points_then_mask_then_pixels_then_id():
    base = far_hashes(1, seed=2)[0]
    rows = [
        row("seatizen-z", "seatizen", base, n_points=99, mask_path="m.png", width=4000, height=3000),
        row("coralnet-few", "coralnet", base, n_points=5),
        row("coralnet-many", "coralnet", base, n_points=20),
        row("coralnet-mask", "coralnet", base, n_points=5, mask_path="mask.png"),
        row("coralnet-big", "coralnet", base, n_points=5, width=1000, height=1000),
        row("coralnet-big2", "coralnet", base, n_points=5, width=1000, height=1000),
        row("mermaid-poor", "mermaid", base ^ 0b11, n_points=1),
        row("newsource-1", "newsource", base),  # not in source_priority: ranks after the listed ones
    ]
    result = dedup.find_duplicates(frame(rows), 8, PRIORITY)
    ranked = result.clusters.sort_values("rank")["sample_id"].tolist()
    assert ranked == [
        "mermaid-poor",
        "coralnet-many",
        "coralnet-mask",
        "coralnet-big",
        "coralnet-big2",
        "coralnet-few",
        "seatizen-z",
        "newsource-1",
    ]
    c = result.clusters.set_index("sample_id")
    assert c.loc["coralnet-few", "distance"] == 2
    assert (c["survivor_id"] == "mermaid-poor").all()
    assert (c["cluster_size"] == 8).all()


def test_cluster_ids_and_ranks_do_not_depend_on_row_order():
    rng = np.random.default_rng(5)
    hashes = far_hashes(30, seed=3)
    rows = []
    for k in range(120):
        h = hashes[k % 30] ^ (1 << int(rng.integers(0, 64))) if k % 3 else hashes[k % 30]
        rows.append(row(f"{PRIORITY[k % 5]}-{k:03d}", PRIORITY[k % 5], h, n_points=int(rng.integers(0, 4))))
    first = dedup.find_duplicates(frame(rows), 4, PRIORITY).clusters
    shuffled = [rows[i] for i in rng.permutation(len(rows))]
    second = dedup.find_duplicates(frame(shuffled), 4, PRIORITY).clusters
    assert first.to_dict("records") == second.to_dict("records")
    assert (first.groupby("cluster_id")["sample_id"].min() == first.groupby("cluster_id").size().index).all()


def test_pair_metrics_match_counting_every_pair():
    rng = np.random.default_rng(9)
    bases = far_hashes(12, seed=4)
    rows = []
    for k in range(80):
        h = bases[k % 12]
        if rng.random() < 0.6:
            flips = rng.choice(64, size=int(rng.integers(0, 9)), replace=False)
            h ^= sum(1 << int(b) for b in flips)
        src = PRIORITY[int(rng.integers(0, 5))]
        rows.append(row(f"{src}-{k:03d}", src, h))
    result = dedup.find_duplicates(frame(rows), 6, PRIORITY)
    expected: Counter[str] = Counter()
    hist: Counter[int] = Counter()
    for a, b in combinations(rows, 2):
        d = (a["phash"] ^ b["phash"]).bit_count()
        if d <= 6:
            expected["|".join(sorted((a["source"], b["source"])))] += 1
            hist[d] += 1
    m = dedup.metrics(result)
    assert m["pairs"]["near"] == dict(sorted(expected.items()))
    assert m["near_distance_histogram"] == {str(k): v for k, v in sorted(hist.items())}


def test_samples_without_phash_are_only_matched_exactly():
    rows = [
        row("coasttrain-a", "coasttrain", None, pixel_sha256="r"),
        row("coasttrain-b", "coasttrain", None),
    ]
    result = dedup.find_duplicates(frame(rows), 8, PRIORITY)
    assert len(result.clusters) == 0


# --- products: keep one / keep all ----------------------------------------------------------------


def _labels_points(n: int) -> str:
    return json.dumps({"n_points": n, "benthic_attributes": {}, "top_level_categories": {}})


def test_keep_one_takes_the_best_usable_member_among_the_products_own_sources():
    h = far_hashes(3, seed=6)
    rows = [
        # cluster A: MERMAID survivor without usable points, then CoralNet, then Seatizen
        row("mermaid-a", "mermaid", h[0], n_points=0, labels=_labels_points(0)),
        row("coralnet-a", "coralnet", h[0], n_points=7, labels=_labels_points(7)),
        row("seatizen-a", "seatizen", h[0], labels=json.dumps({"attribute": [], "top_level": {}})),
        # cluster B: MERMAID + CoralNet, both usable
        row("mermaid-b", "mermaid", h[1], n_points=3, labels=_labels_points(3)),
        row("coralnet-b", "coralnet", h[1] ^ 1, n_points=9, labels=_labels_points(9)),
        # not in a cluster
        row("coralnet-solo", "coralnet", h[2], n_points=4, labels=_labels_points(4)),
    ]
    result = dedup.find_duplicates(frame(rows), 4, PRIORITY)
    samples = frame(rows)
    params = {
        "sources": {s: {} for s in SOURCES},
        "products": {
            "reef-points": {"sources": ["mermaid", "coralnet"], "dedup": "all", "patch_size": 224},
            "reef-images": {"sources": ["mermaid", "coralnet", "seatizen"], "dedup": "one"},
            "seatizen-only": {"sources": ["coralnet", "seatizen"], "dedup": "one"},
        },
    }
    specs = {p.name: p for p in products.products_from_params(params)}
    pick = {
        name: products.product_samples(p, samples, result.clusters)["sample_id"].tolist()
        for name, p in specs.items()
    }
    # keep all: every usable copy (the point-less MERMAID image gives no patch)
    assert pick["reef-points"] == ["coralnet-a", "coralnet-b", "coralnet-solo", "mermaid-b"]
    # keep one: cluster A's overall survivor is unusable, so CoralNet's copy stands in
    assert pick["reef-images"] == ["coralnet-a", "coralnet-solo", "mermaid-b"]
    # a product without MERMAID still keeps one copy of cluster B: its best own member
    assert pick["seatizen-only"] == ["coralnet-a", "coralnet-b", "coralnet-solo"]
    assert specs["reef-points"].unit == "point" and specs["reef-images"].unit == "image"


def test_keep_cover_drops_near_copies_but_keeps_the_far_ends_of_a_chain():
    base = far_hashes(1, seed=9)[0]

    def flip(h: int, bits: range) -> int:
        return h ^ sum(1 << b for b in bits)

    # A chain of video frames: each within 6 bits of the next, the ends 18 bits apart.
    chain = [base, flip(base, range(0, 6)), flip(base, range(0, 12)), flip(base, range(0, 18))]
    lab = json.dumps({"attribute": [], "top_level": {}})
    rows = [row(f"seatizen-f{k}", "seatizen", h, labels=lab) for k, h in enumerate(chain)]
    rows.append(row("seatizen-f0copy", "seatizen", base ^ 1, labels=lab))  # a near copy of f0
    result = dedup.find_duplicates(frame(rows), 8, PRIORITY)
    assert result.clusters["cluster_id"].nunique() == 1  # union-find chained all five
    params = {
        "sources": {s: {} for s in SOURCES},
        "dedup": {"radius": 8},
        "products": {"frames": {"sources": ["seatizen"], "dedup": "cover"}},
    }
    (spec,) = products.products_from_params(params)
    kept = products.product_samples(spec, frame(rows), result.clusters)["sample_id"].tolist()
    ranked = result.clusters.sort_values("rank")["sample_id"].tolist()
    # Greedy in rank order: no two kept frames within the radius, every dropped one near a kept one.
    hashes = {r["sample_id"]: r["phash"] for r in rows}
    assert kept and ranked[0] in kept
    for a, b in combinations(kept, 2):
        assert (hashes[a] ^ hashes[b]).bit_count() > 8
    for dropped in set(hashes) - set(kept):
        assert min((hashes[dropped] ^ hashes[k]).bit_count() for k in kept) <= 8
    assert 2 <= len(kept) < len(rows)


def test_products_refuse_bad_params():
    from stages.errors import ConfigError

    with pytest.raises(ConfigError, match="dedup"):
        products.products_from_params(
            {"sources": {"a": {}}, "products": {"p": {"sources": ["a"], "dedup": "two"}}}
        )
    with pytest.raises(ConfigError, match="unknown sources"):
        products.products_from_params({"sources": {"a": {}}, "products": {"p": {"sources": ["b"]}}})


# --- the stage on the real ingest output of the sample corpus --------------------------------------


def ingest_all(fetched: Path, out_root: Path) -> Path:
    """Every ingest adapter run on `fetched`'s raw data, tables under `out_root` (cached)."""
    done = out_root / ".ingested"
    if done.exists():
        return out_root
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "dvc.yaml").write_text("stages: {}\n", encoding="utf-8")
    for source in SOURCES:
        ctx = ingest_context(source, fetched, out_root)
        ingest_source(ctx)
    done.write_text("ok\n", encoding="utf-8")
    return out_root


@pytest.fixture(scope="module")
def ingested(fetched_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ingest_all(fetched_root, tmp_path_factory.getbasetemp() / "dedup-split-ingested")


@pytest.fixture(scope="module")
def planted_ids(sample_upstream: Path, ingested: Path) -> dict[str, Any]:
    planted = json.loads((sample_upstream / "PLANTED.json").read_text())
    up = {}
    for source in SOURCES:
        t = pq.read_table(
            ingested / "data" / "interim" / source / "samples.parquet",
            columns=["sample_id", "upstream_id", "session"],
        )
        up.update({u: (s, sess) for s, u, sess in zip(*(t.column(c).to_pylist() for c in t.column_names))})
    reef = planted["reef"]
    return {
        "trio": [
            up[reef["mermaid"]["cross_source_scene"]["image_id"]][0],
            up[f"s1073/{reef['coralnet']['s1073']['cross_source_scene']['name']}"][0],
            up[planted["seatizen"]["cross_source_image"]["file"]][0],
        ],
    }


def run_cli(module: str, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params_path = root / "test-params.yaml"
    params_path.write_text(yaml.safe_dump(params), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TIDEPOOL_PROGRESS": "0"}
    env.pop("TIDEPOOL_ENDPOINTS", None)
    return subprocess.run(
        [sys.executable, "-m", module, "--params", str(params_path), *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_stage_on_the_sample_corpus_finds_the_planted_trio_and_session_frames(
    ingested, planted_ids, tmp_path
):
    import shutil

    root = tmp_path / "project"
    shutil.copytree(ingested, root)
    proc = run_cli("stages.dedup", root)
    assert proc.returncode == 0, proc.stderr
    clusters = dedup.read_clusters(root / "data" / "dedup" / "clusters.parquet")
    member = dict(zip(clusters["sample_id"], clusters["cluster_id"]))
    trio = planted_ids["trio"]
    assert len({member[s] for s in trio}) == 1, trio
    survivor = clusters.set_index("sample_id").loc[trio[0], "rank"]
    assert survivor == 0  # the MERMAID PNG
    # Every Seatizen session with several frames chains into one cluster of its own.
    seatizen = pq.read_table(
        root / "data" / "interim" / "seatizen" / "samples.parquet", columns=["sample_id", "session"]
    )
    sessions: dict[str, set[str]] = {}
    for sid, sess in zip(*(seatizen.column(c).to_pylist() for c in ("sample_id", "session"))):
        if sid not in trio:
            sessions.setdefault(sess, set()).add(member.get(sid, sid))
    assert len(sessions) >= 3 and all(len(cids) == 1 for cids in sessions.values())
    m = json.loads((root / "metrics" / "dedup.json").read_text())
    assert m["pairs"]["near"].get("coralnet|mermaid", 0) >= 1
    assert m["largest_cluster"]["size"] <= 12  # no giant cluster from chaining unrelated images
    # The only cluster that mixes sources is the planted scene.
    assert m["cross_source_clusters"] == 1
    summary = (root / "data" / "dedup" / "summary.md").read_text()
    assert trio[0] in summary
    # Deterministic: a second run writes the same bytes.
    before = {
        p: (root / p).read_bytes()
        for p in ("data/dedup/clusters.parquet", "data/dedup/summary.md", "metrics/dedup.json")
    }
    assert run_cli("stages.dedup", root).returncode == 0
    assert before == {p: (root / p).read_bytes() for p in before}


def test_cli_names_a_missing_sample_table(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    proc = run_cli("stages.dedup", tmp_path)
    assert proc.returncode == 2
    assert "samples.parquet: missing" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_clusters_table_round_trips_through_parquet(planted_rows, tmp_path):
    result = dedup.find_duplicates(frame(planted_rows), 8, PRIORITY)
    write_parquet(tmp_path / "c.parquet", dedup.clusters_table(result))
    back = dedup.read_clusters(tmp_path / "c.parquet")
    assert back.to_dict("records") == result.clusters.astype(object).to_dict("records")
    assert pq.read_schema(tmp_path / "c.parquet").equals(dedup.CLUSTERS, check_metadata=False)
