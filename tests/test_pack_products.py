"""pack@<product> on the real ingest output of the sample corpus (dedup and split run by their own code):
shards read with webdataset alone, counts against the wids index and the manifest, masks, pyspacer
patches, byte-identical rebuilds, growth against a fixed-count sharder, metrics, the CLI."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from PIL import Image
from test_dedup import ingest_all

from stages import dedup, split
from stages.config import load_params
from stages.errors import ConfigError, UpstreamFormatError
from stages.fsutil import write_parquet
from stages.ingest.coasttrain import load_coasttrain_image
from stages.pack import PackContext, check_size, pack_product, product_settings, record_generations
from stages.pack import reef_points as rp
from stages.pack.sharding import key_hashes, plan_fixed_count, rewritten, shard_contents
from stages.pack.tarwriter import TarWriter
from stages.taxonomy_index import TOP_LEVEL_CATEGORIES, Taxonomy

REPO = Path(__file__).resolve().parents[1]
PRODUCTS = ("reef-points", "reef-images", "coast-seg", "inat2017")
KiB = 1024
# Small shards so every split has several; a 64 px patch keeps the suite fast (224 is tested apart).
TEST_SETTINGS: dict[str, dict[str, Any]] = {
    "reef-points": {"patch_size": 64, "png_compress_level": 1,
                    "shard": {"min_bytes": 128 * KiB, "target_bytes": 512 * KiB, "max_bytes": 2048 * KiB}},
    "reef-images": {"shard": {"min_bytes": 128 * KiB, "target_bytes": 512 * KiB, "max_bytes": 2048 * KiB}},
    "coast-seg": {"png_compress_level": 1,
                  "shard": {"min_bytes": 64 * KiB, "target_bytes": 160 * KiB, "max_bytes": 512 * KiB}},
    "inat2017": {"shard": {"min_bytes": 96 * KiB, "target_bytes": 256 * KiB, "max_bytes": 1024 * KiB}},
}  # fmt: skip


def pack_params() -> dict[str, Any]:
    params = load_params(REPO / "params.yaml")
    params["jobs"] = 2
    for name, extra in TEST_SETTINGS.items():
        params["products"][name] = {**params["products"][name], **copy.deepcopy(extra)}
    return params


def make_root(root: Path, fetched: Path, interim: Path) -> Path:
    """A project-shaped dir: raw data and taxonomy from the fetch, ingest tables from `interim`."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "dvc.yaml").write_text("stages: {}\n", encoding="utf-8")
    for name, target in (("raw", fetched / "data" / "raw"), ("taxonomy", fetched / "data" / "taxonomy")):
        (root / "data" / name).symlink_to(target, target_is_directory=True)
    (root / "data" / "interim").symlink_to(interim, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def corpus(fetched_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Ingest (shared cache), dedup, split, then every product packed once with jobs=2."""
    ingested = ingest_all(fetched_root, tmp_path_factory.getbasetemp() / "dedup-split-ingested")
    root = make_root(tmp_path_factory.mktemp("pack-root"), fetched_root, ingested / "data" / "interim")
    params = pack_params()
    dedup.run(params, root)
    split.run(params, root)
    metrics = {name: pack_product(params, name, root, jobs=2) for name in PRODUCTS}
    return {"root": root, "fetched": fetched_root, "interim": ingested / "data" / "interim",
            "params": params, "metrics": metrics}  # fmt: skip


def release(corpus: dict[str, Any], product: str) -> Path:
    return corpus["root"] / "data" / "release" / product


def samples_table(corpus: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    table = pq.read_table(corpus["interim"] / source / "samples.parquet").to_pylist()
    return {r["sample_id"]: r for r in table}


def read_split(out: Path, split_name: str) -> tuple[dict[str, Any], list[list[dict[str, Any]]]]:
    """The wids index of a split and, per shard, its samples as webdataset yields them (an empty
    split has no index: ({"shardlist": []}, []))."""
    path = out / f"{split_name}.index.json"
    if not path.exists():
        assert json.loads((out / "product.json").read_text())["splits"][split_name]["samples"] == 0
        return {"shardlist": []}, []
    index = json.loads(path.read_text())
    shards = []
    for entry in index["shardlist"]:
        shards.append(list(wds.WebDataset(str(out / entry["url"]), shardshuffle=False)))
    return index, shards


def fields(sample: dict[str, Any]) -> set[str]:
    return {k for k in sample if not k.startswith("__")}


EXPECTED_FIELDS = {
    "reef-points": [{"webp", "json", "cls"}],
    "reef-images": [{"jpg", "json"}, {"jpg", "json", "seg.png"}],
    "coast-seg": [{"webp", "json", "seg.png"}],
    "inat2017": [{"jpg", "json", "cls"}],
}


@pytest.mark.parametrize("product", PRODUCTS)
def test_every_shard_opens_with_webdataset_and_matches_index_and_manifest(
    corpus: dict[str, Any], product: str
):
    out = release(corpus, product)
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    by_shard: dict[str, list[dict[str, Any]]] = {}
    for row in manifest:
        by_shard.setdefault(row["shard"], []).append(row)
    seen: list[str] = []
    for split_name in ("train", "val", "test"):
        index, shards = read_split(out, split_name)
        if shards:  # an empty split has no index (read_split checks product.json says so)
            assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
        assert [e["url"] for e in index["shardlist"]] == [
            f"{split_name}-{i:06d}.tar" for i in range(len(shards))
        ]
        for entry, samples in zip(index["shardlist"], shards):
            data = (out / entry["url"]).read_bytes()
            assert entry["filesize"] == len(data) and entry["md5sum"] == hashlib.md5(data).hexdigest()
            assert entry["nsamples"] == len(samples) > 0
            rows = by_shard[entry["url"]]
            assert [r["key"] for r in rows] == [s["__key__"] for s in samples]
            assert [r["position"] for r in rows] == list(range(len(samples)))
            assert {r["split"] for r in rows} == {split_name}
            for row, sample in zip(rows, samples):
                assert fields(sample) in EXPECTED_FIELDS[product]
                doc = json.loads(sample["json"])
                assert doc["split"] == split_name
                if "cls" in sample:
                    assert int(sample["cls"]) == row["cls"]
                # the manifest's offset points at the sample's first header
                header = data[row["offset"] : row["offset"] + 100].rstrip(b"\0").decode()
                assert header.startswith(sample["__key__"] + ".")  # no pax header: names fit
                assert doc.get("point_id", doc.get("sample_id")) in (row["point_id"], row["sample_id"])
            seen += [s["__key__"] for s in samples]
        assert (
            sum(e["nsamples"] for e in index["shardlist"])
            == corpus["metrics"][product]["by_split"][split_name]["samples"]
        )
    assert len(seen) == len(set(seen)) == len(manifest) == corpus["metrics"][product]["samples"]
    assert all(k.isascii() and "." not in k for k in seen)
    # several shards per split in train: the boundaries are exercised
    assert corpus["metrics"][product]["by_split"]["train"]["shards"] >= 3


def test_splits_follow_the_split_stage_and_points_of_an_image_share_a_shard(corpus: dict[str, Any]):
    assignments = pq.read_table(corpus["root"] / "data" / "split" / "assignments.parquet").to_pylist()
    split_of = {r["sample_id"]: r["split"] for r in assignments}
    for product in PRODUCTS:
        for row in pq.read_table(release(corpus, product) / "manifest.parquet").to_pylist():
            assert row["split"] == split_of[row["sample_id"]]
    shards_of_image: dict[str, set[str]] = {}
    for row in pq.read_table(release(corpus, "reef-points") / "manifest.parquet").to_pylist():
        shards_of_image.setdefault(row["sample_id"], set()).add(row["shard"])
    assert all(len(s) == 1 for s in shards_of_image.values())


def test_reef_points_skips_images_without_kept_points_and_decodes_each_image_once(corpus: dict[str, Any]):
    m = corpus["metrics"]["reef-points"]
    empty = sum(
        1
        for source in ("mermaid", "coralnet")
        for r in samples_table(corpus, source).values()
        if r["n_points"] == 0
    )
    assert empty > 0 and m["skipped"]["no_kept_points"] == empty
    points = sum(
        pq.read_metadata(corpus["interim"] / s / "points.parquet").num_rows for s in ("mermaid", "coralnet")
    )
    assert m["samples"] == m["points"] == points  # dedup: all keeps every copy
    assert m["images_decoded"] == m["units"] == m["images"]
    assert corpus["metrics"]["reef-images"]["images_decoded"] == corpus["metrics"]["reef-images"]["samples"]
    assert corpus["metrics"]["coast-seg"]["images_decoded"] == corpus["metrics"]["coast-seg"]["samples"]
    assert corpus["metrics"]["inat2017"]["images_decoded"] == 0  # upstream bytes, never decoded


def pyspacer_patches(image_path: Path, rowcols: list[tuple[int, int]], crop_size: int) -> list[np.ndarray]:
    """pyspacer's spacer.extract_features.crop_patches, restated here independently of the stage."""
    im = np.asarray(Image.open(image_path).convert("RGB"))
    pad = crop_size
    im = np.pad(im, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    out = []
    for row, col in rowcols:
        center = (row + pad, col + pad)
        upper = int(center[0] - crop_size / 2)
        left = int(center[1] - crop_size / 2)
        out.append(im[upper : upper + crop_size, left : left + crop_size, :])
    return out


def test_reef_point_patches_equal_the_pyspacer_window(corpus: dict[str, Any]):
    out = release(corpus, "reef-points")
    images = {**samples_table(corpus, "mermaid"), **samples_table(corpus, "coralnet")}
    checked = border = 0
    for split_name in ("val", "test"):
        _, shards = read_split(out, split_name)
        by_image: dict[str, list[dict[str, Any]]] = {}
        for sample in (s for shard in shards for s in shard):
            by_image.setdefault(json.loads(sample["json"])["sample_id"], []).append(sample)
        for sid, samples in by_image.items():
            docs = [json.loads(s["json"]) for s in samples]
            rowcols = [(d["point"]["row"], d["point"]["col"]) for d in docs]
            expected = pyspacer_patches(corpus["fetched"] / images[sid]["image_path"], rowcols, 64)
            for sample, doc, want in zip(samples, docs, expected):
                got = np.asarray(Image.open(io.BytesIO(sample["webp"])))
                assert got.shape == (64, 64, 3) and np.array_equal(got, want), doc["point_id"]
                checked += 1
                r, c = doc["point"]["row"], doc["point"]["col"]
                border += (
                    r < 32 or c < 32 or r >= doc["image"]["height"] - 32 or c >= doc["image"]["width"] - 32
                )
    assert checked > 100 and border > 0


@pytest.mark.parametrize("patch_size", [224, 63])
def test_patch_size_224_and_odd_sizes_follow_pyspacer(
    corpus: dict[str, Any], patch_size: int, tmp_path: Path
):
    params = pack_params()
    params["products"]["reef-points"]["patch_size"] = patch_size
    product, settings = product_settings(params, "reef-points")
    plan = rp.plan(PackContext(params, product, settings, corpus["root"]))
    key = sorted(plan.keys["train"])[0]
    unit = plan.make_unit(key, "train")
    result = rp.encode(unit)
    assert result.error is None and result.decodes == 1
    images = {**samples_table(corpus, "mermaid"), **samples_table(corpus, "coralnet")}
    shard = tmp_path / "one.tar"
    with open(shard, "wb") as fh:
        writer = TarWriter(fh)
        for sample in result.samples:
            writer.write_sample(sample.data)
        writer.close()
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    assert len(samples) == len(result.samples) > 0
    rowcols = [(r.row["row"], r.row["col"]) for r in unit.rows]
    expected = pyspacer_patches(corpus["fetched"] / images[key]["image_path"], rowcols, patch_size)
    for sample, want in zip(samples, expected):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["webp"]))), want)
    if patch_size == 224:  # SOURCES §2: top-left (row + 224 - 112, col + 224 - 112) in padded coordinates
        assert rp.window(10, 20, 224) == (10 + 224 - 112, 20 + 224 - 112)
    else:
        assert rp.window(10, 20, 63) == (10 + 31, 20 + 31)  # int(row + 63 - 31.5)


def test_seg_png_decodes_to_the_original_class_ids(corpus: dict[str, Any]):
    coast = samples_table(corpus, "coasttrain")
    seen = 0
    for split_name in ("train", "val", "test"):
        _, shards = read_split(release(corpus, "coast-seg"), split_name)
        for sample in (s for shard in shards for s in shard):
            row = coast[json.loads(sample["json"])["sample_id"]]  # the key may be shortened
            seg = Image.open(io.BytesIO(sample["seg.png"]))
            assert seg.mode == "L"
            original = np.asarray(Image.open(corpus["interim"].parent.parent / row["mask_path"]))
            assert np.array_equal(np.asarray(seg), original)
            assert set(np.unique(original)) <= set(range(7)) | {255}
            rgb = np.asarray(Image.open(io.BytesIO(sample["webp"])))
            assert np.array_equal(rgb, load_coasttrain_image(corpus["fetched"] / row["image_path"]))
            seen += 1
    assert seen == corpus["metrics"]["coast-seg"]["samples"]
    seatizen = samples_table(corpus, "seatizen")
    masks = 0
    for split_name in ("train", "val", "test"):
        _, shards = read_split(release(corpus, "reef-images"), split_name)
        for sample in (s for shard in shards for s in shard):
            if "seg.png" not in sample:
                continue
            row = seatizen[json.loads(sample["json"])["sample_id"]]
            seg = np.asarray(Image.open(io.BytesIO(sample["seg.png"])))
            assert np.array_equal(
                seg, np.asarray(Image.open(corpus["interim"].parent.parent / row["mask_path"]))
            )
            masks += 1
    assert masks == corpus["metrics"]["reef-images"]["masks"] > 0


def test_labels_and_class_maps(corpus: dict[str, Any]):
    taxonomy = Taxonomy.load(corpus["fetched"] / "data" / "taxonomy")
    classes = json.loads((release(corpus, "reef-points") / "classes.json").read_text())
    # the index space is the taxonomy, not the classes present
    assert classes["num_classes"] == len(taxonomy.attributes) == len(classes["classes"])
    names = [c["name"] for c in classes["classes"]]
    manifest = pq.read_table(release(corpus, "reef-points") / "manifest.parquet").to_pylist()
    for row in manifest[:300]:
        labels = json.loads(row["labels"])
        assert names[row["cls"]] == labels["benthic_attribute_name"] == row["label"]
    counted = Counter(row["cls"] for row in manifest)
    assert {
        c["index"]: sum(c["count"].values()) for c in classes["classes"] if sum(c["count"].values())
    } == counted
    # reef-images: dense 1/0/-1 vectors; Seatizen's unknowns stay -1, point images have no -1
    _, shards = read_split(release(corpus, "reef-images"), "train")
    sources = Counter()
    for sample in (s for shard in shards for s in shard):
        doc = json.loads(sample["json"])
        ml = doc["multilabel"]
        assert len(ml["values"]) == classes["num_classes"] and len(ml["top_level"]) == len(
            TOP_LEVEL_CATEGORIES
        )
        if doc["source"] == "seatizen":
            assert -1 in ml["values"] and doc["cover"] is None
            native = doc["labels"]["top_level"]
            vector = dict(zip(TOP_LEVEL_CATEGORIES, ml["top_level"]))
            # the crosswalked values where a class reaches the category, unknown (-1) elsewhere
            assert {c: vector[c] for c in native} == native
            assert all(v == -1 for c, v in vector.items() if c not in native)
        else:
            assert set(ml["values"]) <= {0, 1} and doc["cover"]["n_points"] == doc["labels"]["n_points"]
            present = {a["name"] for a in doc["labels"]["benthic_attributes"].values()}
            assert {names[i] for i, v in enumerate(ml["values"]) if v == 1} == present
        sources[doc["source"]] += 1
    assert set(sources) == {"mermaid", "coralnet", "seatizen"}
    # inat2017: cls is the upstream category id
    for row in pq.read_table(release(corpus, "inat2017") / "manifest.parquet").to_pylist():
        assert row["cls"] == json.loads(row["labels"])["category_id"]


def test_product_card_carries_licences_and_redistributability(corpus: dict[str, Any]):
    inat = json.loads((release(corpus, "inat2017") / "product.json").read_text())
    assert inat["redistributable"] is False and corpus["metrics"]["inat2017"]["redistributable"] is False
    reef = json.loads((release(corpus, "reef-points") / "product.json").read_text())
    assert reef["redistributable"] is True
    assert set(reef["sources"]) == {"mermaid", "coralnet"}
    assert reef["sources"]["mermaid"]["license"] == corpus["params"]["sources"]["mermaid"]["license"]
    _, shards = read_split(release(corpus, "inat2017"), "val")
    doc = json.loads(shards[0][0]["json"])
    assert doc["license"] == corpus["params"]["sources"]["inat2017"]["license"] and doc["attribution"]


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


def test_a_second_clean_build_is_byte_identical(
    corpus: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # Inline (jobs=1) against the fixture's process pool: the bytes must not depend on scheduling.
    monkeypatch.setenv("TIDEPOOL_CACHE", "0")  # encode everything again, nothing from the cache
    for product in PRODUCTS:
        out = tmp_path / product
        pack_product(
            corpus["params"], product, corpus["root"], out_dir=out, metrics_path=tmp_path / "m.json", jobs=1
        )
        assert digests(out) == digests(release(corpus, product)), product


def test_stale_shards_of_an_earlier_build_are_removed(corpus: dict[str, Any], tmp_path: Path):
    out = tmp_path / "inat2017"
    out.mkdir()
    (out / "train-999999.tar").write_bytes(b"old")
    (out / "notes.txt").write_text("not ours")
    pack_product(corpus["params"], "inat2017", corpus["root"], out_dir=out, metrics_path=tmp_path / "m.json")
    assert not (out / "train-999999.tar").exists() and (out / "notes.txt").exists()
    assert digests(out).items() >= digests(release(corpus, "inat2017")).items()


# --- growth --------------------------------------------------------------------------------------


def grown_out(
    corpus: dict[str, Any], tmp: Path, product: str, source: str, fraction: float
) -> tuple[Path, set[str]]:
    """A root without some of `source`'s samples: the corpus before they arrived. Split assignments
    stay as they are, as the split ledger keeps them.

    The new samples are `fraction` of them chosen by a hash of the id, plus the one that comes
    first in the train order: at this corpus size a handful of random arrivals may all land near
    the end, where a fixed-count sharder is cheap too; one at the front shows the difference
    deterministically (uniform arrivals at scale: test_pack_sharding and bench/bench_pack.py)."""
    samples = pq.read_table(corpus["interim"] / source / "samples.parquet")
    ids = samples.column("sample_id").to_pylist()
    new = {s for s in ids if key_hashes("growth:" + s)[1] < fraction}
    manifest = pq.read_table(release(corpus, product) / "manifest.parquet").to_pylist()
    new.add(next(r["sample_id"] for r in manifest if r["split"] == "train" and r["source"] == source))
    interim = tmp / "interim"
    interim.mkdir(parents=True)
    for entry in corpus["interim"].iterdir():
        if entry.name != source:
            (interim / entry.name).symlink_to(entry, target_is_directory=True)
    (interim / source).mkdir()
    for entry in (corpus["interim"] / source).iterdir():
        if entry.name != "samples.parquet":
            (interim / source / entry.name).symlink_to(entry)
    keep = [i for i, s in enumerate(ids) if s not in new]
    write_parquet(interim / source / "samples.parquet", samples.take(keep))
    root = make_root(tmp / "root", corpus["fetched"], interim)
    for stage in ("dedup", "split"):
        shutil.copytree(corpus["root"] / "data" / stage, root / "data" / stage)
    assignments = pq.read_table(root / "data" / "split" / "assignments.parquet")
    mask = [s not in new for s in assignments.column("sample_id").to_pylist()]
    write_parquet(root / "data" / "split" / "assignments.parquet", assignments.filter(mask))
    return root, new


def manifest_shards(out: Path) -> dict[str, tuple[str, ...]]:
    shards: dict[str, list[str]] = {}
    for row in pq.read_table(out / "manifest.parquet").to_pylist():
        shards.setdefault(row["shard"], []).append(row["key"])
    return {name: tuple(keys) for name, keys in shards.items()}


def samples_by_split(out: Path) -> dict[str, list[tuple[str, int]]]:
    """(sample key, bytes) per split, in shard order, from a build's manifest."""
    out_rows: dict[str, list[tuple[str, int]]] = {}
    for row in pq.read_table(out / "manifest.parquet").to_pylist():
        out_rows.setdefault(row["split"], []).append((row["key"], row["nbytes"]))
    return out_rows


@pytest.mark.parametrize(
    ("product", "source"), [("inat2017", "inat2017"), ("coast-seg", "coasttrain"), ("reef-points", "mermaid")]
)
def test_growth_rewrites_few_shards_where_a_fixed_count_sharder_rewrites_most(
    corpus: dict[str, Any], tmp_path: Path, product: str, source: str
):
    root, new = grown_out(corpus, tmp_path, product, source, 0.05)
    before = tmp_path / "before"
    pack_product(corpus["params"], product, root, out_dir=before, metrics_path=tmp_path / "m.json")
    after = release(corpus, product)
    old_digests = set(digests(before).values())
    shards_after = {p.name: p.stat().st_size for p in after.glob("*.tar")}
    changed = {n for n, d in digests(after).items() if n in shards_after and d not in old_digests}
    cdc_fraction = sum(shards_after[n] for n in changed) / sum(shards_after.values())
    # The same comparison from the manifests (a shard's bytes are a function of its unit sequence)
    # must find the same shards; then a fixed-count sharder with as many samples per shard as the
    # content-defined one is measured on the very same orders.
    # A shard's bytes are a function of its unit sequence: the manifests must tell the same story.
    old_seqs = set(manifest_shards(before).values())
    assert {n for n, seq in manifest_shards(after).items() if seq not in old_seqs} == changed
    # A fixed-count sharder (ShardWriter's maxcount) with as many samples per shard, same orders.
    old_samples, new_samples = samples_by_split(before), samples_by_split(after)
    fixed_bytes = total = 0
    for split_name, a in new_samples.items():
        b = old_samples.get(split_name, [])
        per = max(1, round(len(a) / corpus["metrics"][product]["by_split"][split_name]["shards"]))
        fixed = rewritten(
            shard_contents(b, plan_fixed_count(b, per)), shard_contents(a, plan_fixed_count(a, per))
        )
        fixed_bytes += fixed["bytes_rewritten"]
        total += fixed["bytes"]
    fixed_fraction = fixed_bytes / total
    n_new = len(new & {r["sample_id"] for r in pq.read_table(after / "manifest.parquet").to_pylist()})
    assert n_new >= 1
    assert len(changed) <= 2 * n_new + 1
    assert cdc_fraction <= 0.35 < fixed_fraction, (cdc_fraction, fixed_fraction, n_new)


# --- the CLI -------------------------------------------------------------------------------------


def run_cli(root: Path, params: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    path = root / "cli-params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TIDEPOOL_PROGRESS": "0"}
    env.pop("TIDEPOOL_ENDPOINTS", None)
    return subprocess.run(
        [sys.executable, "-m", "stages.pack", *args, "--params", str(path)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_cli_packs_a_product_and_reports_bad_input_in_one_line(corpus: dict[str, Any], tmp_path: Path):
    root = make_root(tmp_path / "cli", corpus["fetched"], corpus["interim"])
    for stage in ("dedup", "split"):
        shutil.copytree(corpus["root"] / "data" / stage, root / "data" / stage)
    proc = run_cli(root, corpus["params"], "inat2017")
    assert proc.returncode == 0, proc.stderr
    assert "pack inat2017:" in proc.stdout
    assert digests(root / "data" / "release" / "inat2017") == digests(release(corpus, "inat2017"))
    assert json.loads((root / "metrics" / "pack" / "inat2017.json").read_text())["samples"] > 0
    proc = run_cli(root, corpus["params"], "no-such-product")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "error: params.yaml: no product"
    )
    (root / "data" / "split" / "assignments.parquet").unlink()
    proc = run_cli(root, corpus["params"], "coast-seg")
    assert proc.returncode == 2 and "assignments.parquet" in proc.stderr


def test_a_changed_image_fails_naming_the_file(corpus: dict[str, Any], tmp_path: Path):
    params = pack_params()
    product, settings = product_settings(params, "inat2017")
    from stages.pack import inat2017 as inat

    plan = inat.plan(PackContext(params, product, settings, corpus["root"]))
    key = sorted(plan.keys["train"])[0]
    unit = plan.make_unit(key, "train")
    broken = tmp_path / "x.jpg"
    broken.write_bytes(b"\xff\xd8 not the same bytes")
    result = inat.encode(replace(unit, payload=(str(broken), *unit.payload[1:])))
    assert result.error and "x.jpg" in result.error and "changed since ingest" in result.error


def test_generations_ledger_keeps_earlier_shards_and_appends_new_units(
    corpus: dict[str, Any], tmp_path: Path
):
    root, new = grown_out(corpus, tmp_path / "grown", "coast-seg", "coasttrain", 0.1)
    params = pack_params()
    ledger = tmp_path / "ledger" / "coast-seg.parquet"
    params["products"]["coast-seg"]["ledger"] = str(ledger)  # absolute: both roots share it
    before = tmp_path / "before"
    pack_product(params, "coast-seg", root, out_dir=before, metrics_path=tmp_path / "m.json")
    assert record_generations(params, "coast-seg", root, out_dir=before) == ledger
    # recording does not change the order: the same build again gives the same bytes
    again = tmp_path / "again"
    pack_product(params, "coast-seg", root, out_dir=again, metrics_path=tmp_path / "m.json")
    assert {n: d for n, d in digests(again).items() if n.endswith(".tar")} == {
        n: d for n, d in digests(before).items() if n.endswith(".tar")
    }
    after = tmp_path / "after"
    pack_product(params, "coast-seg", corpus["root"], out_dir=after, metrics_path=tmp_path / "m.json")
    old = set(digests(before).values())
    changed = sorted(n for n, d in digests(after).items() if n.endswith(".tar") and d not in old)
    old_counts = Counter(n.split("-")[0] for n in digests(before) if n.endswith(".tar"))
    for name in changed:  # only the last old shard of a split, or shards after it
        split_name, number = name[: -len(".tar")].split("-")
        assert int(number) >= old_counts[split_name] - 1, name
    rows = pq.read_table(after / "manifest.parquet").to_pylist()
    assert {r["shard"] for r in rows if r["sample_id"] in new} <= set(changed)
    assert len(changed) < len(digests(after)) - 5


def test_update_ledger_needs_a_configured_ledger(corpus: dict[str, Any]):
    params = copy.deepcopy(corpus["params"])
    params["products"]["coast-seg"].pop("ledger", None)
    with pytest.raises(ConfigError, match="ledger is not set"):
        record_generations(params, "coast-seg", corpus["root"])


def test_an_image_that_changed_size_since_ingest_is_refused_naming_the_file(tmp_path: Path):
    path = tmp_path / "frame.png"
    rgb = np.zeros((30, 40, 3), np.uint8)  # 40 wide, 30 high
    check_size(rgb, (40, 30), path)
    with pytest.raises(UpstreamFormatError) as err:
        check_size(rgb, (30, 40), path)
    assert str(path) in str(err.value) and "image is 40x30, the sample table says 30x40" in str(err.value)


# --- the work cache: pack costs what changed ------------------------------------------------------


def pack_stats(cache_dir: Path, product: str) -> dict[str, Any]:
    return json.loads((cache_dir / "stats" / f"pack@{product}.json").read_text())


def interim_with(corpus: dict[str, Any], dest: Path, replace_tables: dict[str, Any]) -> Path:
    """The corpus' interim folder as symlinks, with some tables replaced ({"mermaid/points.parquet": t})."""
    for entry in corpus["interim"].iterdir():
        mine = {r.split("/", 1)[1]: t for r, t in replace_tables.items() if r.split("/", 1)[0] == entry.name}
        if not mine:
            (dest / entry.name).parent.mkdir(parents=True, exist_ok=True)
            (dest / entry.name).symlink_to(entry, target_is_directory=True)
            continue
        (dest / entry.name).mkdir(parents=True)
        for f in entry.iterdir():
            if f.name in mine:
                write_parquet(dest / entry.name / f.name, mine[f.name])
            else:
                (dest / entry.name / f.name).symlink_to(f)
    return dest


def full_root(corpus: dict[str, Any], dest: Path, replace_tables: dict[str, Any] | None = None) -> Path:
    """A root with the whole corpus and no release folder of its own, optionally with tables replaced."""
    interim = interim_with(corpus, dest / "interim", replace_tables or {})
    root = make_root(dest / "root", corpus["fetched"], interim)
    for stage in ("dedup", "split"):
        shutil.copytree(corpus["root"] / "data" / stage, root / "data" / stage)
    return root


def test_growth_encodes_exactly_the_new_and_changed_units_and_equals_a_clean_build(
    corpus: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("TIDEPOOL_CACHE_DIR", str(cache_dir))
    params, out = corpus["params"], tmp_path / "release"
    small, new = grown_out(corpus, tmp_path / "small", "reef-points", "mermaid", 0.05)
    pack_product(params, "reef-points", small, out_dir=out, metrics_path=tmp_path / "m0.json")
    first = pack_stats(cache_dir, "reef-points")
    assert first["units_computed"] == first["units"] > 0 and "units_reused" not in first
    # Grown: the new images arrive, and one existing image has a point relabelled upstream.
    points = pq.read_table(corpus["interim"] / "mermaid" / "points.parquet")
    old_ids = set(pq.read_table(small / "data" / "split" / "assignments.parquet")["sample_id"].to_pylist())
    sids = points.column("sample_id").to_pylist()
    changed_at = next(i for i, s in enumerate(sids) if s in old_ids)
    labels = points.column("source_label").to_pylist()
    labels[changed_at] = f"{labels[changed_at]}-relabelled"
    column = points.schema.get_field_index("source_label")
    relabelled = points.set_column(column, "source_label", pa.array(labels))
    grown = full_root(corpus, tmp_path / "grown", {"mermaid/points.parquet": relabelled})
    metrics = pack_product(params, "reef-points", grown, out_dir=out, metrics_path=tmp_path / "m1.json")
    stats = pack_stats(cache_dir, "reef-points")
    packed_images = set(pq.read_table(out / "manifest.parquet")["sample_id"].to_pylist())
    expected = len(new & packed_images) + 1  # the new images, plus the relabelled one
    assert len(new & packed_images) >= 1
    assert stats["units_computed"] == expected, stats
    assert stats["units_reused"] == stats["units"] - expected and stats["shards_reused"] > 0
    assert metrics["images_decoded"] == metrics["units"]  # metrics do not depend on the cache
    monkeypatch.setenv("TIDEPOOL_CACHE", "0")
    clean = tmp_path / "clean"
    clean_metrics = pack_product(
        params, "reef-points", grown, out_dir=clean, metrics_path=tmp_path / "m2.json"
    )
    assert digests(out) == digests(clean)
    assert clean_metrics == metrics
    assert not (out / ".pack-previous").exists()


def entry_files(cache_dir: Path, product: str) -> list[Path]:
    return sorted(p for p in (cache_dir / f"pack-{product}").rglob("*") if p.is_file())


def rebuild(
    corpus: dict[str, Any], root: Path, out: Path, product: str, params: dict[str, Any] | None = None
) -> None:
    pack_product(params or corpus["params"], product, root, out_dir=out, metrics_path=out.parent / "m.json")


def test_corrupt_entries_and_shards_are_recomputed_and_only_they(
    corpus: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("TIDEPOOL_CACHE_DIR", str(cache_dir))
    root, out, product = full_root(corpus, tmp_path / "p"), tmp_path / "release", "coast-seg"
    rebuild(corpus, root, out, product)
    reference = digests(out)
    entries = entry_files(cache_dir, product)
    units = pack_stats(cache_dir, product)["units"]
    assert len(entries) == units
    # A truncated entry and a tampered one: detected, dropped, their units encoded again.
    entries[0].write_bytes(entries[0].read_bytes()[:-7])
    data = bytearray(entries[1].read_bytes())
    data[-3] ^= 0x55
    entries[1].write_bytes(bytes(data))
    rebuild(corpus, root, out, product)
    stats = pack_stats(cache_dir, product)
    assert stats["units_computed"] == 2 and stats["units_reused"] == units - 2, stats
    assert stats["namespaces"][f"pack-{product}"]["corrupt"] == 2
    assert digests(out) == reference
    # A shard whose bytes changed on disk: its md5 no longer matches, so it is not copied; the
    # unit whose bytes were hit fails its sha256 and is encoded again, its neighbours are reused.
    index = json.loads((out / "train.index.json").read_text())
    victim = next(e for e in index["shardlist"] if e["nsamples"] >= 2)
    manifest = [r for r in pq.read_table(out / "manifest.parquet").to_pylist() if r["shard"] == victim["url"]]
    shard = out / victim["url"]
    data = bytearray(shard.read_bytes())
    data[manifest[1]["offset"] + 600] ^= 0xFF  # inside the second unit's first member
    shard.write_bytes(bytes(data))
    rebuild(corpus, root, out, product)
    stats = pack_stats(cache_dir, product)
    assert stats["references_unreadable"] == 1 and stats["units_computed"] == 1, stats
    assert stats["shards_reused"] == stats["shards"] - 1
    assert digests(out) == reference


def test_a_changed_setting_or_code_version_re_encodes_what_it_touches_and_only_that(
    corpus: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import stages.pack.reuse as reuse

    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("TIDEPOOL_CACHE_DIR", str(cache_dir))
    root = full_root(corpus, tmp_path / "p")
    outs = {p: tmp_path / p for p in ("coast-seg", "inat2017")}
    for product, out in outs.items():
        rebuild(corpus, root, out, product)
    # Shard sizes shape shards, not units: every unit is reused, the shards are re-assembled.
    params = copy.deepcopy(corpus["params"])
    params["products"]["coast-seg"]["shard"] = {
        "min_bytes": 32 * KiB, "target_bytes": 96 * KiB, "max_bytes": 512 * KiB
    }
    rebuild(corpus, root, outs["coast-seg"], "coast-seg", params)
    stats = pack_stats(cache_dir, "coast-seg")
    assert stats.get("units_computed", 0) == 0 and stats["units_reused"] == stats["units"], stats
    # An encoder setting of coast-seg: all of its units, none of inat2017's.
    params["products"]["coast-seg"]["webp_method"] = 1
    rebuild(corpus, root, outs["coast-seg"], "coast-seg", params)
    stats = pack_stats(cache_dir, "coast-seg")
    assert stats["units_computed"] == stats["units"] and stats.get("units_reused", 0) == 0, stats
    rebuild(corpus, root, outs["inat2017"], "inat2017", params)
    assert pack_stats(cache_dir, "inat2017")["units_reused"] == pack_stats(cache_dir, "inat2017")["units"]
    # A code version change of the coast-seg module (as an edit to its source would give).
    real = reuse.code_version

    def edited(*modules: str, libraries: Any = ()) -> str:
        version = real(*modules, libraries=libraries)
        return version + "-edited" if "stages.pack.coast_seg" in modules else version

    monkeypatch.setattr(reuse, "code_version", edited)
    rebuild(corpus, root, outs["coast-seg"], "coast-seg", params)
    stats = pack_stats(cache_dir, "coast-seg")
    assert stats["units_computed"] == stats["units"], stats
    rebuild(corpus, root, outs["inat2017"], "inat2017", params)
    assert pack_stats(cache_dir, "inat2017").get("units_computed", 0) == 0
    # ...and the re-encoded build is what a clean build with these settings gives.
    monkeypatch.setenv("TIDEPOOL_CACHE", "0")
    clean = tmp_path / "clean"
    rebuild(corpus, root, clean, "coast-seg", params)
    assert digests(clean) == digests(outs["coast-seg"])


# --- reef-points `layout: images` ---------------------------------------------------------------------


def documented_reader() -> Any:
    """The reader function exactly as docs/pack.md prints it (the code block after its marker),
    which is also exactly what the card prints (stages.card.readers)."""
    from stages.card.readers import REEF_PATCHES

    text = (REPO / "docs" / "pack.md").read_text(encoding="utf-8")
    after = text.split("<!-- reader: reef-points images -->", 1)[1]
    block = after.split("```python\n", 1)[1].split("```", 1)[0]
    assert block == REEF_PATCHES, "docs/pack.md and the card print different readers"
    namespace: dict[str, Any] = {}
    exec(compile(block, "docs/pack.md", "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace["reef_patches"]


def test_images_layout_keeps_upstream_bytes_and_its_reader_cuts_the_patches_layouts_patches(
    corpus: dict[str, Any], tmp_path: Path
):
    params = copy.deepcopy(corpus["params"])
    params["products"]["reef-points"]["layout"] = "images"
    out = tmp_path / "images"
    metrics = pack_product(
        params, "reef-points", corpus["root"], out_dir=out, metrics_path=tmp_path / "m.json"
    )
    patches_metrics = corpus["metrics"]["reef-points"]
    assert metrics["samples"] == metrics["images"] == patches_metrics["images"]
    assert metrics["points"] == patches_metrics["points"]
    # classes.json counts points either way
    assert json.loads((out / "classes.json").read_text())["classes"] == json.loads(
        (release(corpus, "reef-points") / "classes.json").read_text()
    )["classes"]
    images = {**samples_table(corpus, "mermaid"), **samples_table(corpus, "coralnet")}
    shards = sorted(str(p) for p in out.glob("*.tar"))
    for sample in wds.WebDataset(shards, shardshuffle=False):
        (ext,) = fields(sample) - {"json"}
        row = images[sample["__key__"]]
        assert hashlib.sha256(sample[ext]).hexdigest() == row["file_sha256"]  # the upstream bytes
        assert ext == {"png": "png", "jpeg": "jpg"}[row["image_format"]]
    want: dict[str, np.ndarray] = {}
    for sample in wds.WebDataset(sorted(str(p) for p in release(corpus, "reef-points").glob("*.tar")),
                                 shardshuffle=False):  # fmt: skip
        want[sample["__key__"]] = np.asarray(Image.open(io.BytesIO(sample["webp"])))
    reef_patches = documented_reader()
    # The card prints the same function, with the lines that point it at this product's shards.
    from stages.card.readers import REEF_PATCHES

    card_text = (out / "README.md").read_text(encoding="utf-8")
    assert REEF_PATCHES in card_text and reef_patches.__doc__ in REEF_PATCHES
    seen = 0
    for patch, point, meta in reef_patches(shards):
        assert meta["patch_size"] == 64 and patch.shape == (64, 64, 3)
        assert np.array_equal(patch, want[point["point_id"]]), point["point_id"]
        assert point["class"]["index"] >= 0
        seen += 1
    assert seen == len(want) == metrics["points"]


def test_a_dvc_repro_rebuild_reuses_shards_from_the_dvc_cache(
    corpus: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # `dvc repro` deletes a stage's outputs before it runs; the previous shards are then only in
    # DVC's cache (files/md5/<2>/<30>), where `cache.dir` of .dvc/config puts it.
    cache_dir = tmp_path / "work-cache"
    monkeypatch.setenv("TIDEPOOL_CACHE_DIR", str(cache_dir))
    root, product = full_root(corpus, tmp_path / "p"), "coast-seg"
    out = root / "data" / "release" / product
    rebuild(corpus, root, out, product)
    reference = digests(out)
    (root / ".dvc").mkdir()
    (root / ".dvc" / "config").write_text("[cache]\n    dir = ../dvc-cache\n")
    for split_name in ("train", "val", "test"):
        for entry in read_split(out, split_name)[0]["shardlist"]:
            md5 = entry["md5sum"]
            target = root / "dvc-cache" / "files" / "md5" / md5[:2] / md5[2:]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / entry["url"], target)
            target.chmod(0o444)
    shutil.rmtree(out)
    rebuild(corpus, root, out, product)
    stats = pack_stats(cache_dir, product)
    assert stats.get("units_computed", 0) == 0 and stats["shards_reused"] == stats["shards"] > 0, stats
    assert digests(out) == reference
    assert all((out / name).stat().st_mode & 0o200 for name in reference)  # writable copies, not cache files


@pytest.mark.parametrize("product", PRODUCTS)
def test_pack_selects_exactly_the_samples_stages_products_selects(corpus: dict[str, Any], product: str):
    # pack decides membership on light columns read batch by batch; the split stage counts with
    # stages.products.product_samples on whole tables: both must pick the same samples.
    from stages import products as prod
    from stages.pack import load_clusters, read_table, select_samples

    params = corpus["params"]
    declared, settings = product_settings(params, product)
    ctx = PackContext(params, declared, settings, corpus["root"])
    cols = ["sample_id", "source", "labels", "mask_path", "n_points", "phash"]
    tables = [read_table(corpus["interim"] / s / "samples.parquet", cols) for s in declared.sources]
    samples = pd.concat(tables)
    expected = prod.product_samples(declared, samples.reset_index(drop=True), load_clusters(corpus["root"]))
    selected, skipped = select_samples(ctx, [])
    assert list(selected["sample_id"]) == list(expected["sample_id"])
    assert sum(skipped.values()) == len(samples) - len(expected)
    if product != "reef-points":  # reef-points adds images without point rows to its own count
        assert corpus["metrics"][product]["skipped"] == skipped


def test_inat_png_bytes_under_a_jpg_name_are_shipped_as_jpeg(corpus: dict[str, Any], tmp_path: Path):
    # iNat's folder can hold PNG bytes under a .jpg name (ingest records image_format png): the
    # `jpg` member must still be a JPEG, of the same picture; JPEG files keep their bytes.
    samples = pq.read_table(corpus["interim"] / "inat2017" / "samples.parquet")
    rows = samples.to_pylist()
    packed = set(pq.read_table(release(corpus, "inat2017") / "manifest.parquet")["sample_id"].to_pylist())
    target = next(r for r in rows if r["sample_id"] in packed)
    with Image.open(corpus["root"] / target["image_path"]) as img:
        pixels = np.asarray(img.convert("RGB"))
    dest = tmp_path / "p"
    png_path = Path("data") / "png" / Path(target["image_path"]).name
    (dest / "root" / png_path).parent.mkdir(parents=True)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    png_sha = hashlib.sha256(buf.getvalue()).hexdigest()
    for r in rows:
        if r["sample_id"] == target["sample_id"]:
            r.update(image_path=str(png_path), image_format="png", file_sha256=png_sha)
    table = pa.Table.from_pylist(rows, schema=samples.schema)
    root = full_root(corpus, dest, {"inat2017/samples.parquet": table})
    (root / png_path).write_bytes(buf.getvalue())
    out = tmp_path / "release"
    pack_product(corpus["params"], "inat2017", root, out_dir=out, metrics_path=tmp_path / "m.json")
    by_id = {r["sample_id"]: r for r in rows}
    seen = 0
    for sample in wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False):
        meta = json.loads(sample["json"])
        with Image.open(io.BytesIO(sample["jpg"])) as img:
            assert img.format == "JPEG", sample["__key__"]
            decoded = np.asarray(img.convert("RGB"))
        if sample["__key__"] == target["sample_id"]:
            assert meta["image"]["reencoded"] and meta["image"]["upstream_format"] == "png"
            assert decoded.shape == pixels.shape
            assert np.abs(decoded.astype(int) - pixels.astype(int)).mean() < 8  # the same picture
        else:
            assert hashlib.sha256(sample["jpg"]).hexdigest() == by_id[sample["__key__"]]["file_sha256"]
        seen += sample["__key__"] == target["sample_id"]
    assert seen == 1


@pytest.mark.parametrize("product", PRODUCTS)
def test_manifest_has_typed_label_and_place_columns_matching_the_samples(
    corpus: dict[str, Any], product: str
):
    folder = release(corpus, product)
    manifest = pq.read_table(folder / "manifest.parquet")
    schema = manifest.schema
    assert schema.field("classes").type == pa.list_(pa.string())
    assert schema.field("lat").type == schema.field("lon").type == pa.float64()
    assert schema.field("width").type == pa.int32() and schema.field("site").type == pa.string()
    rows = {r["key"]: r for r in manifest.to_pylist()}
    names = {int(c["index"]): c["name"] for c in json.loads((folder / "classes.json").read_text())["classes"]}
    table: dict[str, dict[str, Any]] = {}
    for src in json.loads((folder / "product.json").read_text())["sources"]:
        table.update(samples_table(corpus, src))
    placed = 0
    for sample in wds.WebDataset(sorted(str(p) for p in folder.glob("*.tar")), shardshuffle=False):
        row, doc = rows[sample["__key__"]], json.loads(sample["json"])
        upstream = table[row["sample_id"]]
        assert (row["width"], row["height"]) == (upstream["width"], upstream["height"])
        assert row["attribution"] == upstream["attribution"] and row["site"] == upstream["site"]
        assert row["captured_at"] == upstream["captured_at"] == doc.get("captured_at")
        assert row["lat"] == doc.get("lat") and row["lon"] == doc.get("lon")
        placed += row["lat"] is not None
        if "cls" in sample:
            assert row["classes"] == [names[int(sample["cls"])]] == [row["label"]]
        else:
            assert row["classes"] and set(row["classes"]) <= set(names.values())
        if product == "reef-points":
            labels = doc["labels"]
            assert row["benthic_attribute"] == labels["benthic_attribute_name"]
            assert row["source_label"] == labels["source_label"]
            assert row["growth_form"] == labels["growth_form_name"]
        else:
            assert row["benthic_attribute"] is None
    assert placed > 0  # some sources give positions, and they reach the manifest
