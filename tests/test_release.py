"""Releases end to end, through real git and DVC in a temp project fed by the loopback servers.

One module-scoped build serves every test (two full builds are the expensive part):

1. build, `make release VERSION=0.1.0` (ledger refresh, repro, push to the loopback S3, CHANGELOG,
   commit, tag);
2. plant known changes in the MERMAID upstream (remove two points of one image, relabel one point
   and add one of another, add one point outside its image), bump the snapshot, rebuild, release
   0.2.0.

Then: a fresh `git clone` + `dvc pull` at v0.1.0 gives byte-identical files, a clean `dvc status` and a
`dvc repro` that runs nothing; the release diff shows exactly the planted numbers; the Croissant files
of the built products validate; the licence policy refuses public pushes; release refusals.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, Pipeline, make_project

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        "pack" not in (yaml.safe_load((REPO / "dvc.yaml").read_text()).get("stages") or {}),
        reason="dvc.yaml has no pack stage yet: releases need data/release/<product>",
    ),
]

PUBLIC = "public"
MERMAID_PARQUET = "s3/coral-reef-training/mermaid/mermaid_confirmed_annotations.parquet"
GIT_ID = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@tidepool",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@tidepool",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tracked_outputs(root: Path) -> list[str]:
    """Every output path in dvc.lock (cached and `cache: false` alike)."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return sorted({out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])})


def output_digests(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file of every DVC output."""
    out = {}
    for rel in tracked_outputs(root):
        path = root / rel
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            out[f.relative_to(root).as_posix()] = sha256(f)
    return out


def release_md5s(root: Path) -> dict[str, dict[str, str]]:
    """product -> file name -> md5 of data/release/<product>/ (what DVC addresses content by)."""
    out = {}
    for product in sorted(p.name for p in (root / "data" / "release").iterdir() if p.is_dir()):
        folder = root / "data" / "release" / product
        files = sorted(f for f in folder.rglob("*") if f.is_file())  # the viewer/ and croissant/ folders too
        out[product] = {
            f.relative_to(folder).as_posix(): hashlib.md5(f.read_bytes()).hexdigest()  # noqa: S324
            for f in files
        }
    return out


def manifest(root: Path, product: str) -> list[dict[str, Any]]:
    return pq.read_table(root / "data" / "release" / product / "manifest.parquet").to_pylist()


def stages_run(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


# --- the planted change ---------------------------------------------------------------------------


def plant(upstream: Path, root: Path) -> dict[str, Any]:
    """Edit the MERMAID parquet: image X loses two kept points, image Y gets one point relabelled,
    one new point, and one point outside the image. Returns what the diff must show."""
    rows = manifest(root, "reef-points")
    clustered = set()
    clusters = root / "data" / "dedup" / "clusters.parquet"
    if clusters.exists():
        clustered = set(pq.read_table(clusters, columns=["sample_id"]).column("sample_id").to_pylist())
    by_image: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["source"] == "mermaid" and r["sample_id"] not in clustered:
            by_image.setdefault(r["sample_id"], []).append(r)
    # Images with several kept points, outside any dedup cluster (so reef-images keeps both).
    candidates = sorted(sid for sid, pts in by_image.items() if len(pts) >= 3)
    x_id, y_id = candidates[0], candidates[1]
    labels_seen = sorted({r["label"] for r in rows if r["source"] == "mermaid"})

    table = pq.read_table(upstream / MERMAID_PARQUET)
    schema = table.schema
    records = table.to_pylist()
    point_of = {f"mermaid-{r['point_id']}": r for r in records}
    x_pts = sorted(by_image[x_id], key=lambda r: r["key"])[:2]
    y_pts = sorted(by_image[y_id], key=lambda r: r["key"])
    relabel = y_pts[0]
    kept = {r["key"]: r for r in rows if r["source"] == "mermaid"}

    def donor_for(label: str) -> dict[str, Any]:
        # A row whose point was kept with this label: its attribute is mapped, so ingest keeps it.
        return next(r for r in records if kept.get(f"mermaid-{r['point_id']}", {}).get("label") == label)

    new_label = next(lbl for lbl in labels_seen if lbl != relabel["label"])
    add_label = labels_seen[-1]
    donor, add_donor = donor_for(new_label), donor_for(add_label)

    removed_ids = {point_of[p["key"]]["id"] for p in x_pts}
    records = [r for r in records if r["id"] not in removed_ids]
    target = point_of[relabel["key"]]
    for r in records:
        if r["id"] == target["id"]:
            for col in (
                "benthic_attribute_id",
                "benthic_attribute_name",
                "growth_form_id",
                "growth_form_name",
            ):
                r[col] = donor[col]
    samples = pq.read_table(root / "data" / "interim" / "mermaid" / "samples.parquet").to_pylist()
    y_sample = next(s for s in samples if s["sample_id"] == y_id)
    used = {(r["row"], r["col"]) for r in records if r["image_id"] == target["image_id"]}
    free = next(
        (rr, cc)
        for rr in range(5, y_sample["height"])
        for cc in range(7, y_sample["width"])
        if (rr, cc) not in used
    )
    new_point = str(uuid.uuid5(uuid.NAMESPACE_URL, "tidepool-test-added-point"))
    outside_point = str(uuid.uuid5(uuid.NAMESPACE_URL, "tidepool-test-outside-point"))
    base = {k: target[k] for k in target}
    for col in ("benthic_attribute_id", "benthic_attribute_name", "growth_form_id", "growth_form_name"):
        base[col] = add_donor[col]
    records.append({**base, "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "a")), "point_id": new_point,
                    "row": free[0], "col": free[1]})  # fmt: skip
    records.append({**base, "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "b")), "point_id": outside_point,
                    "row": y_sample["height"] + 5, "col": 1})  # fmt: skip
    records.sort(key=lambda r: (r["image_id"], r["row"], r["col"]))
    pq.write_table(pa.Table.from_pylist(records, schema=schema), upstream / MERMAID_PARQUET)

    split_x, split_y = x_pts[0]["split"], relabel["split"]
    classes: Counter[tuple[str, str]] = Counter()
    for p in x_pts:
        classes[(split_x, p["label"])] -= 1
    classes[(split_y, relabel["label"])] -= 1
    classes[(split_y, new_label)] += 1
    classes[(split_y, add_label)] += 1
    return {
        "x": x_id,
        "y": y_id,
        "removed": sorted(p["key"] for p in x_pts),
        "relabelled": relabel["key"],
        "relabel_to": new_label,
        "added": f"mermaid-{new_point}",
        "split_x": split_x,
        "split_y": split_y,
        "classes": {k: v for k, v in classes.items() if v},
    }


# --- the module's build ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, sample_upstream: Path) -> Any:
    from stages.loopback import Loopback

    base = tmp_path_factory.mktemp("release")
    upstream = base / "upstream"
    shutil.copytree(sample_upstream, upstream)  # private: the planted change edits it
    root = make_project(base / "project")
    with Loopback(upstream=upstream) as lb:
        overlay = lb.write_overlay(base / "endpoints.yaml")
        p = Pipeline(root, lb, overlay)
        p.env.update(GIT_ID)
        # A second remote that params mark public, for the licence policy.
        p.dvc("remote", "add", PUBLIC, "s3://tidepool-dvc/public")
        p.dvc("remote", "modify", "--local", PUBLIC, "endpointurl", lb.s3_endpoint)
        params = yaml.safe_load((root / "params.yaml").read_text())
        params.setdefault("remotes", {}).setdefault("storage", {"public": False})
        params["remotes"][PUBLIC] = {"public": True}
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        p.git("add", "-A")
        p.git("commit", "-q", "-m", "public remote")

        p.dvc("repro")
        p.git("add", "-A")
        p.git("commit", "-q", "-m", "build")
        first = p.run(sys.executable, "-m", "stages.release_cut", "0.1.0")
        digests_v1 = output_digests(root)
        md5s_v1 = release_md5s(root)
        manifest_v1 = {prod: manifest(root, prod) for prod in md5s_v1}

        planted = plant(upstream, root)
        lb.reseed()
        params = yaml.safe_load((root / "params.yaml").read_text())
        old_snapshot = params["sources"]["mermaid"]["snapshot"]
        params["sources"]["mermaid"]["snapshot"] = "2099-01-01"
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        rebuild = p.dvc("repro")
        p.git("add", "-A")
        p.git("commit", "-q", "-m", "mermaid grew")
        second = p.run(sys.executable, "-m", "stages.release_cut", "0.2.0")
        yield {
            "p": p,
            "lb": lb,
            "base": base,
            "overlay": overlay,
            "first": first,
            "second": second,
            "rebuild": rebuild,
            "digests_v1": digests_v1,
            "md5s_v1": md5s_v1,
            "manifest_v1": manifest_v1,
            "planted": planted,
            "old_snapshot": old_snapshot,
        }


# --- tests ----------------------------------------------------------------------------------------


def test_release_commits_tags_and_pushes_everything(world):
    p = world["p"]
    tags = p.git("tag", "--list", "v*").stdout.split()
    assert tags == ["v0.1.0", "v0.2.0"]
    assert p.git("status", "--porcelain").stdout == ""
    assert p.git("log", "-1", "--format=%s", "v0.2.0").stdout.strip() == "Release v0.2.0"
    changelog = (p.root / "CHANGELOG.md").read_text()
    assert changelog.index("## v0.2.0") < changelog.index("## v0.1.0")
    assert "Initial release" in changelog and "Changes since v0.1.0" in changelog
    # The ledger holds the released assignments; refreshing it rebuilt no shard.
    assert "Running stage 'pack@" not in world["first"].stdout + world["second"].stdout
    ledger = pq.read_table(p.root / "data" / "ledger" / "splits.parquet").num_rows
    assert ledger > 0
    assert json.loads(p.dvc("status", "--cloud", "--json").stdout) == {}


def test_fresh_clone_pulls_the_tag_byte_identical_and_has_nothing_to_do(world):
    p, lb = world["p"], world["lb"]
    clone = world["base"] / "clone"
    subprocess.run(["git", "clone", "-q", str(p.root), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", "v0.1.0"], cwd=clone, check=True)
    c = Pipeline(clone, lb, world["overlay"])
    c.dvc("pull")
    assert output_digests(clone) == world["digests_v1"]
    assert json.loads(c.dvc("status", "--json").stdout) == {}
    again = c.dvc("repro")
    assert stages_run(again.stdout) == []
    assert "Data and pipelines are up to date." in again.stdout


def test_release_diff_shows_exactly_the_planted_changes(world):
    p, planted = world["p"], world["planted"]
    out = p.run(sys.executable, "-m", "stages.diff", "v0.1.0", "v0.2.0", "--json")
    d = json.loads(out.stdout)
    rp = d["products"]["reef-points"]
    assert rp["samples"]["added"] == 1
    assert rp["samples"]["removed"] == 2
    assert rp["samples"]["relabelled"] == 1
    assert rp["samples"]["moved"] == 0
    assert rp["samples"]["b"] - rp["samples"]["a"] == -1
    assert rp["examples"]["added"] == [planted["added"]]
    assert rp["examples"]["removed"] == planted["removed"]
    assert rp["examples"]["relabelled"][0]["key"] == planted["relabelled"]
    assert rp["examples"]["relabelled"][0]["b"] == planted["relabel_to"]
    got = {(split, cls): v["delta"] for split, per in rp["classes"].items() for cls, v in per.items()}
    assert got == planted["classes"]

    # Shards: every shard holding a changed key changed; shards of untouched splits did not.
    keys = {planted["added"], planted["relabelled"], *planted["removed"]}
    before = {r["shard"] for r in world["manifest_v1"]["reef-points"] if r["key"] in keys}
    after = {r["shard"] for r in manifest(p.root, "reef-points") if r["key"] in keys}
    changed = set(rp["shards"]["added"]) | set(rp["shards"]["removed"]) | set(rp["shards"]["modified"])
    assert before | after <= changed
    touched = {planted["split_x"], planted["split_y"]}
    assert all(name.split("-")[0] in touched for name in changed)
    # Upload: the files of v0.2.0 whose content no v0.1.0 release file has, computed independently.
    old = {md5 for files in world["md5s_v1"].values() for md5 in files.values()}
    now = release_md5s(p.root)["reef-points"]
    folder = p.root / "data" / "release" / "reef-points"
    expected = sum((folder / n).stat().st_size for n, md5 in now.items() if md5 not in old)
    assert rp["upload"]["bytes"] == expected
    assert rp["upload"]["files"] == sum(1 for md5 in now.values() if md5 not in old)

    ri = d["products"]["reef-images"]["samples"]
    assert (ri["added"], ri["removed"], ri["moved"], ri["relabelled"]) == (0, 0, 0, 2)  # X and Y
    for product in ("coast-seg", "inat2017"):
        other = d["products"][product]
        assert other["samples"]["added"] == other["samples"]["removed"] == other["samples"]["relabelled"] == 0
        assert other["shards"]["changed"] == 0
        # Nothing but product.json may differ: it says whether the generations ledger had entries
        # when pack ran, and the release between the two builds recorded the first ones.
        assert set(other["upload"]["names"]) <= {"product.json"}

    assert d["quarantine"] == {
        "mermaid": {"point_outside_image": {"a": d["quarantine"]["mermaid"]["point_outside_image"]["a"],
                                            "b": d["quarantine"]["mermaid"]["point_outside_image"]["a"] + 1,
                                            "delta": 1, "new": 1, "resolved": 0}}
    }  # fmt: skip
    assert all(v["delta"] == 0 for v in d["dedup"]["metrics"].values())
    assert (
        d["dedup"]["clusters"]["new"]
        == d["dedup"]["clusters"]["gone"]
        == d["dedup"]["clusters"]["changed"]
        == 0
    )
    assert d["params"] == [
        {
            "key": "sources.mermaid.snapshot",
            "a": world["old_snapshot"],
            "b": "2099-01-01",
            "change": "changed",
        }
    ]
    # The markdown form and the CHANGELOG entry carry the same numbers.
    md = p.run(sys.executable, "-m", "stages.diff", "v0.1.0", "v0.2.0").stdout
    assert "| reef-points |" in md and "point_outside_image" in md
    assert "`sources.mermaid.snapshot`" in (p.root / "CHANGELOG.md").read_text()


def test_cards_and_croissant_of_the_built_products(world, tmp_path):
    root = world["p"].root
    for product in ("reef-points", "reef-images", "coast-seg", "inat2017"):
        folder = root / "data" / "release" / product
        card = (folder / "README.md").read_text()
        header = yaml.safe_load(card.split("---\n")[1])
        assert header["configs"][0]["data_files"]
        doc = json.loads((folder / "croissant.json").read_text())
        assert doc["conformsTo"] == "http://mlcommons.org/croissant/1.1"
        shards = {
            f["name"]: f["sha256"]
            for f in doc["distribution"]
            if f.get("encodingFormat") == "application/x-tar"
        }
        assert shards == {t.name: sha256(t) for t in folder.glob("*.tar")}
    assert "Not redistributable" in (root / "data" / "release" / "inat2017" / "README.md").read_text()
    # Class distributions per split reach `dvc plots` (top-level `plots:`, one class,split,count file each).
    shown = json.loads(world["p"].dvc("plots", "show", "--json").stdout)["data"]
    products = ("reef-points", "reef-images", "coast-seg", "inat2017")
    assert {f"metrics/plots/classes/{p}.csv" for p in products} <= set(shown)
    mlc = pytest.importorskip("mlcroissant", reason="mlcroissant is not installed (requirements.txt)")
    for product in ("reef-points", "coast-seg"):
        mlc.Dataset(str(root / "data" / "release" / product / "croissant.json"))  # raises on any error


def _push(p: Pipeline, *args: str) -> subprocess.CompletedProcess[str]:
    return p.run(sys.executable, "-m", "stages.push", *args, check=False)


def _public_objects(lb: Any) -> list[str]:
    listing = lb.s3_client().list_objects_v2(Bucket="tidepool-dvc", Prefix="public/")
    return [o["Key"] for o in listing.get("Contents", [])]


def test_licence_policy_refuses_public_pushes(world):
    p, lb = world["p"], world["lb"]
    refused = _push(p, "-r", PUBLIC)
    assert refused.returncode == 2
    msg = refused.stderr
    assert "licence policy" in msg and "remotes.public.public: true" in msg
    for path in ("data/raw/inat2017", "data/interim/inat2017", "data/release/inat2017"):
        assert path in msg
    # Targets inside, around and naming a restricted output are refused alike.
    for target in ("data/release/inat2017/train.index.json", "data/release", "pack@inat2017"):
        assert _push(p, "-r", PUBLIC, target).returncode == 2, target
    # An undeclared remote is refused: it might be public.
    p.dvc("remote", "add", "--local", "elsewhere", "s3://tidepool-dvc/elsewhere")
    try:
        undeclared = _push(p, "-r", "elsewhere")
        assert undeclared.returncode == 2 and "not declared under `remotes:`" in undeclared.stderr
    finally:
        p.dvc("remote", "remove", "--local", "elsewhere")
    # A release to the public remote is refused before anything changes.
    cut = p.run(sys.executable, "-m", "stages.release_cut", "0.3.0", "-r", PUBLIC, check=False)
    assert cut.returncode == 2 and "licence policy" in cut.stderr
    assert p.git("status", "--porcelain").stdout == ""
    assert _public_objects(lb) == []

    # DVC's own guard: restricted outputs are pinned to the private remote, so even a bare
    # `dvc push -r public` of them sends nothing; a redistributable product does go.
    assert _push(p, "--check").returncode == 0
    p.dvc("push", "-r", PUBLIC, "data/raw/inat2017", "data/release/inat2017", "data/interim/inat2017")
    assert _public_objects(lb) == []
    allowed = _push(p, "-r", PUBLIC, "data/release/coast-seg")
    assert allowed.returncode == 0, allowed.stderr
    pushed = _public_objects(lb)
    coast = set(release_md5s(p.root)["coast-seg"].values())
    inat = set(release_md5s(p.root)["inat2017"].values())
    pushed_md5 = {k.split("/")[-2] + k.split("/")[-1] for k in pushed if "/md5/" in k}
    assert coast <= pushed_md5 and not (inat & pushed_md5)


def test_release_refusals(world):
    p = world["p"]

    def cut(version: str) -> subprocess.CompletedProcess[str]:
        return p.run(sys.executable, "-m", "stages.release_cut", version, "--no-push", check=False)

    for version, reason in (("0.2.0", "already exists"), ("0.1.5", "not newer"), ("1.2", "not x.y.z")):
        res = cut(version)
        assert res.returncode == 2 and reason in res.stderr, (version, res.stderr)
    stray = p.root / "notes.txt"
    stray.write_text("draft")
    try:
        res = cut("0.3.0")
        assert res.returncode == 2 and "not clean" in res.stderr and "notes.txt" in res.stderr
    finally:
        stray.unlink()
    params = yaml.safe_load((p.root / "params.yaml").read_text())
    params["dedup"]["radius"] = params["dedup"]["radius"] + 2
    (p.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    p.git("commit", "-q", "-am", "stale pipeline")
    try:
        res = cut("0.3.0")
        assert res.returncode == 2 and "not up to date" in res.stderr and "dedup" in res.stderr
    finally:
        p.git("reset", "-q", "--hard", "HEAD~1")
    assert p.git("tag", "--list", "v*").stdout.split() == ["v0.1.0", "v0.2.0"]


def test_example_trains_one_epoch_from_the_shards(world):
    pytest.importorskip("torch", reason="torch is optional (requirements-examples.txt)")
    release = world["p"].root / "data" / "release" / "reef-points"
    res = subprocess.run(
        [sys.executable, str(REPO / "examples" / "train_reef_points.py"), "--release", str(release),
         "--batch-size", "16", "--image-size", "32"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    train_samples = sum(1 for r in manifest(world["p"].root, "reef-points") if r["split"] == "train")
    assert f"epoch 1: {train_samples} training samples" in res.stdout
