"""The release diff on a small git + DVC project with two hand-made revisions: exact numbers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO

from stages import diff
from stages.errors import TidepoolError
from stages.fsutil import write_json
from stages.pack.index import MANIFEST_SCHEMA, ShardInfo, wids_index

DVC = [str(Path(sys.executable).parent / "dvc")] if (Path(sys.executable).parent / "dvc").exists() else [
    sys.executable, "-m", "dvc"]  # fmt: skip
GIT = ["git", "-c", "user.email=test@tidepool", "-c", "user.name=test"]
SPLITS = ("train", "val", "test")

# (key, split, label) per revision. B relabels k1, removes k2, moves k3 val -> train, adds k6.
ROWS_A = [("k1", "train", "coral"), ("k2", "train", "sand"), ("k3", "val", "sand"), ("k4", "test", "algae"),
          ("k5", "train", "coral")]  # fmt: skip
ROWS_B = [("k1", "train", "sand"), ("k3", "train", "sand"), ("k4", "test", "algae"), ("k5", "train", "coral"),
          ("k6", "val", "algae")]  # fmt: skip
CLASSES = ("algae", "coral", "sand")


def run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
    return proc.stdout


def write_release(root: Path, rows: list[tuple[str, str, str]], shards: dict[str, bytes]) -> None:
    folder = root / "data" / "release" / "reef-points"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, data in shards.items():
        (folder / name).write_bytes(data)
    records = [
        {"key": k, "sample_id": k, "split": s, "shard": f"{s}-000000.tar", "source": "s1", "label": lbl,
         "cls": CLASSES.index(lbl), "labels": json.dumps({"name": lbl, "n": 1})}
        for k, s, lbl in rows
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(records, schema=MANIFEST_SCHEMA), folder / "manifest.parquet")
    counts = Counter((s, lbl) for _, s, lbl in rows)
    classes = [
        {"index": i, "name": n, "count": {s: counts[(s, n)] for s in SPLITS}} for i, n in enumerate(CLASSES)
    ]
    write_json(folder / "classes.json", {"num_classes": len(CLASSES), "classes": classes})
    for split in SPLITS:
        infos = [
            ShardInfo(n, 1, len(d), hashlib.md5(d).hexdigest())
            for n, d in sorted(shards.items())
            if n.startswith(f"{split}-")
        ]
        write_json(folder / f"{split}.index.json", wids_index("reef-points", split, infos))


def write_tables(root: Path, quarantine: list[tuple[str, str, str]], clusters: dict[str, list[str]]) -> None:
    q = root / "data" / "interim" / "s1"
    q.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "source": ["s1"] * len(quarantine),
                "record_kind": [k for k, _, _ in quarantine],
                "record_id": [i for _, i, _ in quarantine],
                "file": ["x"] * len(quarantine),
                "reason": [r for _, _, r in quarantine],
                "detail": [""] * len(quarantine),
            }
        ),
        q / "quarantine.parquet",
    )
    d = root / "data" / "dedup"
    d.mkdir(parents=True, exist_ok=True)
    flat = [(cid, sid) for cid, members in sorted(clusters.items()) for sid in members]
    pq.write_table(
        pa.table(
            {
                "cluster_id": [c for c, _ in flat],
                "sample_id": [s for _, s in flat],
                "source": ["s1"] * len(flat),
            }
        ),
        d / "clusters.parquet",
    )


def commit(root: Path, tag: str) -> None:
    run([*DVC, "add", "-q", "data/release/reef-points", "data/interim/s1", "data/dedup"], root)
    run([*GIT, "add", "-A"], root)
    run([*GIT, "commit", "-q", "-m", tag], root)
    run([*GIT, "tag", tag], root)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("diff-project")
    run(["git", "init", "-q", "-b", "main"], root)
    run([*DVC, "init", "-q"], root)
    run([*DVC, "config", "core.analytics", "false"], root)
    (root / "metrics").mkdir()

    def params(snapshot: str, extra: dict[str, Any]) -> str:
        doc = {"sources": {"s1": {"snapshot": snapshot, "license": "CC0"}},
               "products": {"reef-points": {"sources": ["s1"]}}, **extra}  # fmt: skip
        return yaml.safe_dump(doc)

    def dedup_metrics(samples: int, members: int, pairs: dict[str, Any]) -> dict[str, Any]:
        return {"samples": samples, "clusters": 2, "duplicate_members": members,
                "redundant_copies": members - 2, "pairs": pairs}  # fmt: skip

    (root / "params.yaml").write_text(params("1", {"split": {"salt": "x"}}))
    write_release(root, ROWS_A, {"train-000000.tar": b"T" * 3000, "val-000000.tar": b"V" * 1500,
                                 "test-000000.tar": b"S" * 1000})  # fmt: skip
    write_tables(root, [("image", "r1", "corrupt_image"), ("point", "p1", "unmapped_label")],
                 {"a": ["a", "b"], "c": ["c", "d"]})  # fmt: skip
    write_json(root / "metrics" / "dedup.json", dedup_metrics(10, 4, {"exact_file": {"s1|s1": 1}}))
    commit(root, "a")
    folder = root / "data/release/reef-points"
    md5_a = {hashlib.md5(f.read_bytes()).hexdigest() for f in folder.iterdir()}

    (root / "params.yaml").write_text(params("2", {"dedup": {"radius": 8}}))
    # train-000000 and val-000000 change; train-000001 is new but holds bytes rev A had (as val).
    write_release(root, ROWS_B, {"train-000000.tar": b"t" * 3100, "train-000001.tar": b"V" * 1500,
                                 "val-000000.tar": b"v" * 700, "test-000000.tar": b"S" * 1000})  # fmt: skip
    write_tables(root, [("image", "r1", "corrupt_image"), ("point", "p2", "unmapped_label"),
                        ("point", "p3", "point_outside_image")],
                 {"a": ["a", "b", "e"], "f": ["f", "g"]})  # fmt: skip
    pairs_b = {"exact_file": {"s1|s1": 2}, "near": {"s1|s1": 1}}
    write_json(root / "metrics" / "dedup.json", dedup_metrics(12, 5, pairs_b))
    commit(root, "b")
    new = [f for f in folder.iterdir() if hashlib.md5(f.read_bytes()).hexdigest() not in md5_a]
    upload = sum(f.stat().st_size for f in new)
    return {"root": root, "upload": upload}


@pytest.fixture(scope="module")
def ab(project: dict[str, Any]) -> dict[str, Any]:
    return diff.release_diff(project["root"], "a", "b")


def test_samples_added_removed_relabelled_moved(ab):
    rp = ab["products"]["reef-points"]
    assert rp["status"] == "compared"
    assert rp["samples"] == {"a": 5, "b": 5, "added": 1, "removed": 1, "relabelled": 1, "moved": 1}
    assert rp["by_split"] == {
        "train": {"a": 3, "b": 3, "added": 0, "removed": 1, "relabelled": 1, "moved_in": 1, "moved_out": 0},
        "val": {"a": 1, "b": 1, "added": 1, "removed": 0, "relabelled": 0, "moved_in": 0, "moved_out": 1},
        "test": {"a": 1, "b": 1, "added": 0, "removed": 0, "relabelled": 0, "moved_in": 0, "moved_out": 0},
    }
    assert rp["moves"] == {"val->train": 1}
    assert rp["examples"]["added"] == ["k6"] and rp["examples"]["removed"] == ["k2"]
    assert rp["examples"]["relabelled"] == [{"key": "k1", "a": "coral", "b": "sand"}]
    assert rp["examples"]["moved"] == [{"key": "k3", "a": "val", "b": "train"}]
    assert rp["classes"] == {
        "train": {"coral": {"a": 2, "b": 1, "delta": -1}, "sand": {"a": 1, "b": 2, "delta": 1}},
        "val": {"algae": {"a": 0, "b": 1, "delta": 1}, "sand": {"a": 1, "b": 0, "delta": -1}},
    }


def test_shards_changed_and_bytes_a_push_would_upload(project, ab):
    rp = ab["products"]["reef-points"]
    assert rp["shards"] == {
        "a": 3,
        "b": 4,
        "added": ["train-000001.tar"],
        "removed": [],
        "modified": ["train-000000.tar", "val-000000.tar"],
        "changed": 3,
    }
    # train-000001.tar is new by name but its bytes were val-000000.tar's: nothing to upload.
    assert "train-000001.tar" not in rp["upload"]["names"]
    assert rp["upload"]["bytes"] == project["upload"]
    assert rp["upload"]["names"] == sorted(
        ["classes.json", "manifest.parquet", "train-000000.tar", "train.index.json", "val-000000.tar",
         "val.index.json"]
    )  # fmt: skip


def test_quarantine_dedup_and_params_deltas(ab):
    d = ab
    assert d["quarantine"] == {
        "s1": {
            "point_outside_image": {"a": 0, "b": 1, "delta": 1, "new": 1, "resolved": 0},
            "unmapped_label": {"a": 1, "b": 1, "delta": 0, "new": 1, "resolved": 1},
        }
    }
    dd = d["dedup"]
    assert dd["metrics"]["samples"] == {"a": 10, "b": 12, "delta": 2}
    assert dd["metrics"]["redundant_copies"] == {"a": 2, "b": 3, "delta": 1}
    assert dd["pairs"] == {"exact_file": {"a": 1, "b": 2, "delta": 1}, "near": {"a": 0, "b": 1, "delta": 1}}
    assert dd["clusters"] == {"a": 2, "b": 2, "new": 1, "gone": 1, "changed": 1, "unchanged": 0}
    assert d["params"] == [
        {"key": "dedup.radius", "a": None, "b": 8, "change": "added"},
        {"key": "sources.s1.snapshot", "a": "1", "b": "2", "change": "changed"},
        {"key": "split.salt", "a": "x", "b": None, "change": "removed"},
    ]


def test_reads_revisions_without_touching_the_checkout_and_is_deterministic(project, ab):
    root = project["root"]
    head = run(["git", "rev-parse", "HEAD"], root)
    first = ab
    second = diff.release_diff(root, "a", "b")
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    assert first["a"]["commit"] == run(["git", "rev-parse", "a"], root).strip()
    assert run(["git", "status", "--porcelain"], root) == ""
    assert run(["git", "rev-parse", "HEAD"], root) == head
    # The workspace is a revision too; a clean one equals its commit.
    same = diff.release_diff(root, "b", diff.WORKSPACE)["products"]["reef-points"]
    assert same["samples"]["added"] == same["samples"]["removed"] == same["samples"]["relabelled"] == 0
    assert same["shards"]["changed"] == 0 and same["upload"]["bytes"] == 0


def test_first_release_counts_everything_as_added(project):
    d = diff.release_diff(project["root"], diff.EMPTY, "a")
    rp = d["products"]["reef-points"]
    assert rp["status"] == "added"
    assert rp["samples"] == {"a": 0, "b": 5, "added": 5, "removed": 0, "relabelled": 0, "moved": 0}
    assert rp["shards"]["added"] == ["test-000000.tar", "train-000000.tar", "val-000000.tar"]


def test_missing_cache_is_fetched_from_the_remote(project, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(project["root"], root)
    shutil.rmtree(root / ".dvc" / "cache")
    # Without cache or remote the diff fails naming the file, never reports the product as absent.
    with pytest.raises(TidepoolError, match="data/release/reef-points.* @ a: DVC could not read it"):
        diff.release_diff(root, "a", "b")
    shutil.copytree(project["root"] / ".dvc" / "cache", root / ".dvc" / "cache")
    remote = tmp_path / "remote"
    # As in a real clone: the remote's location (or endpoint) is local config, which DVC applies to
    # every revision it reads.
    run([*DVC, "remote", "add", "--local", "-d", "store", str(remote)], root)
    run([*DVC, "push", "-q", "--all-tags"], root)
    shutil.rmtree(root / ".dvc" / "cache")
    d = diff.release_diff(root, "a", "b")
    assert d["products"]["reef-points"]["samples"]["relabelled"] == 1


def test_cli_markdown_json_and_errors(project):
    root = project["root"]
    env = {**os.environ, "TIDEPOOL_PROGRESS": "0"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "stages.diff", "--repo", str(root), *args],
            cwd=REPO, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip

    md = cli("a", "b")
    assert md.returncode == 0, md.stderr
    assert md.stdout.startswith("## Dataset diff `a` → `b`")
    assert "| reef-points | 5 | 5 | 0 | 1 | 1 | 1 | 1 | 3 |" in md.stdout
    assert "`k1` coral → sand" in md.stdout
    assert "| s1 | point_outside_image | 0 | 1 | +1 | 1 | 0 |" in md.stdout
    assert "| `sources.s1.snapshot` | 1 | 2 |" in md.stdout
    js = cli("a", "b", "--json", "--product", "reef-points")
    assert json.loads(js.stdout)["products"]["reef-points"]["samples"]["added"] == 1
    bad = cli("a", "no-such-tag")
    assert bad.returncode == 2 and "git revision 'no-such-tag' not found" in bad.stderr
    with pytest.raises(TidepoolError, match=r"no product \['nope'\]"):
        diff.release_diff(root, "a", "b", ["nope"])


# --- pictures: a contact sheet of planted changes, from real tar shards ---------------------------

GALLERY_CLASSES = tuple(f"c{i:02d}" for i in range(10)) + ("algae", "coral", "sand")
LONG_KEY = "n-long-" + "x" * 110  # over the 100-byte ustar name field: the shard holds a pax header
# (key, split, label, source, image format); g2 drops r1 and r2, relabels x1..x3 and adds n*.
G_KEEP = [("k01", "train", "coral", "s1", "png"), ("k02", "train", "sand", "s1", "jpg"),
          ("k03", "val", "algae", "s2", "webp"), ("k04", "test", "coral", "s2", "png")]  # fmt: skip
G_REMOVED = [("r1", "train", "sand", "s1", "jpg"), ("r2", "val", "coral", "s1", "png")]
G_RELABEL_A = [("x1", "train", "coral", "s1", "png"), ("x2", "train", "coral", "s2", "webp"),
               ("x3", "test", "algae", "s1", "jpg")]  # fmt: skip
G_RELABEL_B = [("x1", "train", "sand", "s1", "png"), ("x2", "train", "sand", "s2", "webp"),
               ("x3", "test", "coral", "s1", "jpg")]  # fmt: skip
G_ADDED = [(LONG_KEY if i == 0 else f"n{i:02d}", SPLITS[i % 3], f"c{i:02d}", "s1" if i < 4 else "s2",
            ("png", "jpg", "webp")[i % 3]) for i in range(10)]  # fmt: skip


def colour(key: str) -> tuple[int, int, int]:
    d = hashlib.sha256(key.encode()).digest()
    return (40 + d[0] % 176, 40 + d[1] % 176, 40 + d[2] % 176)


def sample_members(key: str, label: str, fmt: str) -> dict[str, bytes]:
    import io

    from PIL import Image

    size = (64, 48) if fmt == "jpg" else (40, 40)
    buf = io.BytesIO()
    Image.new("RGB", size, colour(key)).save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt],
                                            **({"lossless": True} if fmt == "webp" else {}))  # fmt: skip
    members = {fmt: buf.getvalue(), "json": json.dumps({"key": key, "label": label}).encode(),
               "cls": str(GALLERY_CLASSES.index(label)).encode()}  # fmt: skip
    if fmt == "png":  # a mask beside the image: the sheet must show the image, not this
        mask = io.BytesIO()
        Image.new("L", size, 1).save(mask, format="PNG")
        members["seg.png"] = mask.getvalue()
    return members


def write_gallery(root: Path, rows: list[tuple[str, str, str, str, str]]) -> None:
    from stages.pack.tarwriter import TarWriter, sample_bytes

    folder = root / "data" / "release" / "reef-points"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    records = []
    for split in SPLITS:
        chosen = sorted((r for r in rows if r[1] == split), key=lambda r: r[0])
        name = f"{split}-000000.tar"
        infos = []
        if chosen:
            with open(folder / name, "wb") as fh:
                writer = TarWriter(fh)
                for pos, (key, _, label, source, fmt) in enumerate(chosen):
                    data = sample_bytes(key, sample_members(key, label, fmt))
                    offset = writer.write_sample(data)
                    records.append({"key": key, "sample_id": key, "split": split, "shard": name,
                                    "position": pos, "offset": offset, "nbytes": len(data), "source": source,
                                    "label": label, "cls": GALLERY_CLASSES.index(label),
                                    "labels": json.dumps({"name": label})})  # fmt: skip
                md5 = writer.close()
            infos = [ShardInfo(name, len(chosen), (folder / name).stat().st_size, md5)]
        write_json(folder / f"{split}.index.json", wids_index("reef-points", split, infos))
    pq.write_table(pa.Table.from_pylist(records, schema=MANIFEST_SCHEMA), folder / "manifest.parquet")
    counts = Counter((r[1], r[2]) for r in rows)
    classes = [{"index": i, "name": n, "count": {s: counts[(s, n)] for s in SPLITS}}
               for i, n in enumerate(GALLERY_CLASSES)]  # fmt: skip
    write_json(folder / "classes.json", {"num_classes": len(GALLERY_CLASSES), "classes": classes})


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("diff-gallery")
    run(["git", "init", "-q", "-b", "main"], root)
    run([*DVC, "init", "-q"], root)
    run([*DVC, "config", "core.analytics", "false"], root)
    (root / "params.yaml").write_text(yaml.safe_dump(
        {"sources": {"s1": {"snapshot": "1"}, "s2": {"snapshot": "1"}},
         "products": {"reef-points": {"sources": ["s1", "s2"]}}}))  # fmt: skip
    write_gallery(root, G_KEEP + G_REMOVED + G_RELABEL_A)
    run([*DVC, "add", "-q", "data/release/reef-points"], root)
    run([*GIT, "add", "-A"], root)
    run([*GIT, "commit", "-q", "-m", "g1"], root)
    run([*GIT, "tag", "g1"], root)
    write_gallery(root, G_KEEP + G_RELABEL_B + G_ADDED)
    run([*DVC, "add", "-q", "data/release/reef-points"], root)
    run([*GIT, "add", "-A"], root)
    run([*GIT, "commit", "-q", "-m", "g2"], root)
    run([*GIT, "tag", "g2"], root)
    return root


def test_contact_sheet_shows_exactly_the_planted_changes(gallery, tmp_path):
    from PIL import Image

    from stages import diff_pictures as pics

    d = diff.release_diff(gallery, "g1", "g2", pictures=tmp_path / "pics")
    rp = d["products"]["reef-points"]
    assert rp["samples"]["added"] == 10 and rp["samples"]["removed"] == 2 and rp["samples"]["relabelled"] == 3
    assert rp["pictures"] == {"changes": "reef-points-changes.png", "manifest": "reef-points-changes.json",
                              "cells": pics.PER_KIND + 2 + 3,
                              "classes": "reef-points-classes.png"}  # fmt: skip
    sidecar = json.loads((tmp_path / "pics" / "reef-points-changes.json").read_text())
    assert sidecar["kinds"] == {"added": {"total": 10, "shown": pics.PER_KIND},
                                "removed": {"total": 2, "shown": 2},
                                "relabelled": {"total": 3, "shown": 3}}  # fmt: skip
    by_kind: dict[str, dict[str, Any]] = {}
    for cell in sidecar["cells"]:
        by_kind.setdefault(cell["kind"], {})[cell["key"]] = cell
    # A bounded, deterministic choice of the additions: the keys with the lowest sha256.
    added_keys = [r[0] for r in G_ADDED]
    lowest = sorted(added_keys, key=lambda k: hashlib.sha256(k.encode()).hexdigest())[: pics.PER_KIND]
    assert set(by_kind["added"]) == set(lowest)
    assert set(by_kind["removed"]) == {"r1", "r2"}
    assert {k: (c["label_a"], c["label_b"]) for k, c in by_kind["relabelled"].items()} == {
        "x1": ("coral", "sand"), "x2": ("coral", "sand"), "x3": ("algae", "coral")}  # fmt: skip
    assert {c["rev"] for c in by_kind["removed"].values()} == {"a"}
    assert by_kind["relabelled"]["x3"]["caption"][1] == "algae -> coral"

    # The PNG decodes at the size the sidecar states, and every cell shows its own sample's image
    # (each planted image is one colour, derived from its key; masks are value 1, never shown).
    sheet = Image.open(tmp_path / "pics" / "reef-points-changes.png")
    assert sheet.format == "PNG" and sheet.size == (sidecar["image"]["width"], sidecar["image"]["height"])
    sheet = sheet.convert("RGB")
    for cell in sidecar["cells"]:
        centre = (cell["x"] + pics.THUMB // 2, cell["y"] + pics.THUMB // 2)
        got, want = sheet.getpixel(centre), colour(cell["key"])
        assert max(abs(g - w) for g, w in zip(got, want)) <= 6, (cell["key"], got, want)
    chart = Image.open(tmp_path / "pics" / "reef-points-classes.png")
    assert chart.format == "PNG" and chart.width > 0

    # Same inputs, same bytes.
    again = diff.release_diff(gallery, "g1", "g2", pictures=tmp_path / "again")
    assert again["products"]["reef-points"]["pictures"] == rp["pictures"]
    for name in ("reef-points-changes.png", "reef-points-changes.json", "reef-points-classes.png"):
        first, second = (tmp_path / "pics" / name).read_bytes(), (tmp_path / "again" / name).read_bytes()
        assert first == second, name


def test_relabels_aggregated_additions_by_source_and_folded_class_table(gallery, tmp_path):
    env = {**os.environ, "TIDEPOOL_PROGRESS": "0"}
    md = subprocess.run(
        [sys.executable, "-m", "stages.diff", "--repo", str(gallery), "g1", "g2", "--pictures", "pics"],
        cwd=REPO, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert md.returncode == 0, md.stderr
    text = md.stdout
    assert text.startswith("## Dataset diff `g1` → `g2`")
    assert "![reef-points: added, removed and relabelled samples](pics/reef-points-changes.png)" in text
    assert "![reef-points: samples per class before and after](pics/reef-points-classes.png)" in text
    assert (gallery / "pics" / "reef-points-changes.png").exists()  # relative to the project
    assert "| coral | sand | 2 |" in text and "| algae | coral | 1 |" in text
    assert text.index("| coral | sand | 2 |") < text.index("| algae | coral | 1 |")
    assert "| s1 | 4 | 2 |" in text and "| s2 | 6 | 0 |" in text
    # 10 new classes + coral, sand, algae changed in some split: the largest changes first, the rest folded.
    classes_at = text.index("Class counts that changed")
    folded = text.index("more class count changes</summary>", classes_at)
    visible = text[classes_at:folded].splitlines()
    assert visible[4] == "| train | coral | 3 | 1 | -2 |"  # the largest change leads (x1, x2 relabelled)
    assert len([line for line in visible if line.startswith("| ") and "class" not in line]) == diff.CLASS_TOP
    assert "<details><summary>5 more class count changes</summary>" in text
    js = json.loads(subprocess.run(
        [sys.executable, "-m", "stages.diff", "--repo", str(gallery), "g1", "g2", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout)  # fmt: skip
    rp = js["products"]["reef-points"]
    assert rp["relabels"] == [{"a": "coral", "b": "sand", "count": 2, "fields": None},
                              {"a": "algae", "b": "coral", "count": 1, "fields": None}]  # fmt: skip
    assert rp["by_source"] == {"s1": {"added": 4, "removed": 2}, "s2": {"added": 6, "removed": 0}}
    assert "pictures" not in rp  # only with --pictures


def test_make_diff_prints_only_the_diff(gallery, tmp_path):
    if shutil.which("make") is None or not (Path(sys.prefix) / ".requirements-installed").exists():
        pytest.skip("needs make and an installed project venv (make venv)")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    env["TIDEPOOL_PROGRESS"] = "0"
    proc = subprocess.run(
        ["make", "diff", "A=g1", "B=g2", f"VENV={sys.prefix}", f"PY={sys.executable}",
         f"DIFF_ARGS=--repo {gallery}", f"DIFF_DIR={tmp_path / 'made'}"],
        cwd=REPO, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("## Dataset diff `g1` → `g2`\n")
    assert proc.stdout.endswith("\n") and "make" not in proc.stdout.splitlines()[0]
    assert f"]({tmp_path / 'made'}/reef-points-changes.png)" in proc.stdout
    assert (tmp_path / "made" / "reef-points-changes.png").exists()


def test_images_of_a_non_redistributable_source_are_not_drawn(gallery, tmp_path):
    """The sheet goes into pull requests: for a product with a non-redistributable source it keeps
    the cells (keys, labels) but draws a placeholder instead of any thumbnail."""
    from PIL import Image

    from stages import diff_pictures as pics

    root = tmp_path / "copy"
    shutil.copytree(gallery, root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["sources"]["s2"]["redistributable"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    run([*GIT, "commit", "-q", "-am", "s2 may not be redistributed"], root)
    d = diff.release_diff(root, "g1", "HEAD", pictures=tmp_path / "pics")
    assert d["products"]["reef-points"]["pictures"]["cells"] == pics.PER_KIND + 2 + 3
    sidecar = json.loads((tmp_path / "pics" / "reef-points-changes.json").read_text())
    assert sidecar["images_withheld"] == "s2 not redistributable"
    sheet = Image.open(tmp_path / "pics" / "reef-points-changes.png").convert("RGB")
    for cell in sidecar["cells"]:
        assert cell["width"] == cell["height"] == 0  # no thumbnail was pasted
        box = sheet.crop((cell["x"], cell["y"], cell["x"] + pics.THUMB, cell["y"] + pics.THUMB))
        own = colour(cell["key"])
        near = [c for _, c in box.getcolors(1 << 16) if max(abs(x - y) for x, y in zip(c, own)) <= 6]
        assert not near, cell["key"]
