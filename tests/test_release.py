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
    store = base / "s3-store"
    lb = Loopback(upstream=upstream, store=store).start()
    try:
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

        # The demo ends and starts again: the loopback stops (saving the DVC remote bucket to the
        # store) and a new one, on new ports, restores it. Every later test reads the restored one.
        pushed = _remote_objects(lb)
        lb.stop()
        lb = Loopback(upstream=upstream, store=store).start()
        overlay = lb.write_overlay(base / "endpoints.yaml")
        p.lb = lb
        lb.configure_dvc_remote(root)
        p.dvc("remote", "modify", "--local", PUBLIC, "endpointurl", lb.s3_endpoint)
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
            "pushed": pushed,
        }
    finally:
        lb.stop()


def _remote_objects(lb: Any) -> dict[str, int]:
    """key -> size of every object in the DVC remote bucket (DVC's keys are the content's md5)."""
    client = lb.s3_client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="tidepool-dvc"):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


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


def _walkthrough(world: Any, work: Path) -> Any:
    """The walkthrough's steps (stages.walkthrough), pointed at the world's loopback by environment
    only, as `make walkthrough` points them: no `.dvc/config.local` anywhere but the producer's."""
    from stages import walkthrough as wt

    lb = world["lb"]
    lines: list[str] = []
    w = wt.Walkthrough(work, wt.base_env({**lb.env(world["overlay"]), **lb.remote_env()}), lines.append)
    return w, lines


def test_pushed_releases_survive_a_loopback_restart(world):
    lb = world["lb"]
    assert world["pushed"], "the releases pushed nothing"
    assert lb.restored == len(world["pushed"])
    assert _remote_objects(lb) == world["pushed"]  # same keys, same sizes, on a new server


def test_fresh_clone_pulls_the_tag_byte_identical_and_has_nothing_to_do(world, tmp_path):
    w, lines = _walkthrough(world, tmp_path)
    clone = tmp_path / "clone"
    with w.step("fresh clone: git clone, git checkout v0.1.0 && dvc pull, dvc status") as r:
        got = w.fresh_clone_pull(world["p"].root, "v0.1.0", clone)
        r["ok"] = f"{got['files']} files"
    assert got["status"] == {} and not got["config_local"]
    assert output_digests(clone) == world["digests_v1"]
    again = w.dvc(clone, "repro")
    assert stages_run(again) == []
    assert "Data and pipelines are up to date." in again
    assert lines[0].startswith("[1] fresh clone") and any(line.startswith("    ok (") for line in lines)


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


# --- the walkthrough's consumer steps, the release diff's pictures, the pull-request workflow -----


def _sidecar(project: Path, product: str) -> dict[str, Any]:
    return json.loads((project / "build" / "diff" / f"{product}-changes.json").read_text())


def test_walkthrough_import_get_and_make_diff_with_the_planted_contact_sheet(world, tmp_path):
    import webdataset as wds
    from PIL import Image

    from stages import diff_pictures as pics

    p, planted = world["p"], world["planted"]
    w, lines = _walkthrough(world, tmp_path)
    # dvc import into an empty DVC project: the endpoint came from the environment, so the .dvc
    # file records none (a loopback port in a tracked file would be dead tomorrow).
    got = w.import_product(p.root, "reef-points", "v0.1.0", tmp_path / "consumer")
    repo = got["record"]["deps"][0]["repo"]
    assert repo["rev"] == "v0.1.0" and "remote" not in repo and "config" not in repo
    assert got["samples"] == len(world["manifest_v1"]["reef-points"])
    assert not (tmp_path / "consumer" / ".dvc" / "config.local").exists()
    fetched = w.get_product(p.root, "coast-seg", "v0.2.0", tmp_path / "coast-seg")
    assert fetched["samples"] == len(manifest(p.root, "coast-seg")) and fetched["shards"] > 0

    # make diff: stdout is the markdown alone, the pictures land in build/diff/ and are embedded.
    md = w.release_diff(p.root, "v0.1.0", "v0.2.0", tmp_path / "diff.md")
    text = md["markdown"]
    assert text.startswith("## Dataset diff `v0.1.0` → `v0.2.0`\n")
    assert "](build/diff/reef-points-changes.png)" in text and "](build/diff/reef-points-classes.png)" in text
    assert {"reef-points-changes.png", "reef-points-changes.json", "reef-points-classes.png",
            "reef-images-changes.png"} <= set(md["pictures"])  # fmt: skip
    # Products with no changed sample get no contact sheet.
    assert not {"coast-seg-changes.png", "inat2017-changes.png"} & set(md["pictures"])

    # The sheet shows exactly the planted changes, each from its own revision's shard.
    sheet_rp = _sidecar(p.root, "reef-points")
    cells = {(c["kind"], c["key"]): c for c in sheet_rp["cells"]}
    expected = {("added", planted["added"]), ("relabelled", planted["relabelled"])}
    expected |= {("removed", k) for k in planted["removed"]}
    assert set(cells) == expected
    assert cells[("relabelled", planted["relabelled"])]["label_b"] == planted["relabel_to"]
    assert {c["rev"] for (kind, _), c in cells.items() if kind == "removed"} == {"a"}
    sheet_ri = _sidecar(p.root, "reef-images")
    assert {(c["kind"], c["key"]) for c in sheet_ri["cells"]} == {("relabelled", planted["x"]),
                                                                 ("relabelled", planted["y"])}  # fmt: skip
    image = Image.open(p.root / "build" / "diff" / "reef-points-changes.png")
    assert image.size == (sheet_rp["image"]["width"], sheet_rp["image"]["height"])
    # Each v0.2.0 cell holds the thumbnail of the image webdataset reads from that sample's shard.
    folder = p.root / "data" / "release" / "reef-points"
    wanted = {key for kind, key in cells if kind != "removed"}
    shards = sorted({cells[(k, key)]["shard"] for k, key in cells if key in wanted})
    seen = 0
    for sample in wds.WebDataset([str(folder / s) for s in shards], shardshuffle=False).decode("pil"):
        if sample["__key__"] not in wanted:
            continue
        kind = "added" if sample["__key__"] == planted["added"] else "relabelled"
        c = cells[(kind, sample["__key__"])]
        img = next(sample[e] for e in ("png", "jpg", "webp") if e in sample)
        thumb = pics.thumbnail(img)
        box = (c["x"] + (pics.THUMB - thumb.width) // 2, c["y"] + (pics.THUMB - thumb.height) // 2)
        crop = image.convert("RGB").crop((box[0], box[1], box[0] + thumb.width, box[1] + thumb.height))
        assert crop.tobytes() == thumb.tobytes(), sample["__key__"]
        seen += 1
    assert seen == len(wanted)
    assert Image.open(p.root / "build" / "diff" / "reef-points-classes.png").format == "PNG"
    assert "Relabels (from → to):" in text and "Added and removed by source:" in text


def _ci_clone(world: Any, dest: Path) -> Path:
    """What the workflow has: a git clone at the head, no DVC data, no config.local."""
    subprocess.run(["git", "clone", "-q", str(world["p"].root), str(dest)], check=True)
    return dest


def _ci_env(world: Any, **extra: str) -> dict[str, str]:
    from stages import walkthrough as wt

    lb = world["lb"]
    env = wt.base_env(lb.env(world["overlay"]))
    env.pop("AWS_ENDPOINT_URL_S3", None)
    return {**env, **extra}


def test_pr_check_on_a_checkout_without_data(world, tmp_path):
    lb = world["lb"]
    clone = _ci_clone(world, tmp_path / "head")
    env = _ci_env(world, AWS_ENDPOINT_URL_S3=lb.s3_endpoint)

    def pr_check(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "stages.pr_check", "--json", *args], cwd=clone, env=env,
                              capture_output=True, text=True, check=False)  # fmt: skip

    ok = pr_check()
    assert ok.returncode == 0, ok.stderr
    clean = {"ok": True, "findings": []}
    assert json.loads(ok.stdout) == {"lock": clean, "pushed": clean}
    # A code change without `dvc repro` is a stale dvc.lock, named by stage and file.
    (clone / "stages" / "split.py").write_text((clone / "stages" / "split.py").read_text() + "# edited\n")
    stale = pr_check("--no-remote", "fork")
    assert stale.returncode == 1
    found = json.loads(stale.stdout)
    assert found["pushed"] == {"ok": None, "reason": "fork", "findings": []}
    assert any(f.startswith("`split`") and "stages/split.py" in f for f in found["lock"]["findings"])
    subprocess.run(["git", "checkout", "-q", "--", "stages/split.py"], cwd=clone, check=True)
    # Outputs that are in no remote: point the remote at an empty prefix.
    subprocess.run([*world["p"].dvc_cmd, "remote", "modify", "--local", "storage", "url",
                    "s3://tidepool-dvc/nothing-here"], cwd=clone, env=env, check=True)  # fmt: skip
    missing = pr_check()
    assert missing.returncode == 1
    assert json.loads(missing.stdout)["lock"]["ok"] is True
    findings = json.loads(missing.stdout)["pushed"]["findings"]
    assert any(f.startswith("data/release/reef-points") for f in findings), findings


def _workflow() -> dict[str, Any]:
    return yaml.safe_load((REPO / ".github" / "workflows" / "dataset-diff.yml").read_text())


def _step(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in doc["jobs"]["diff"]["steps"] if s.get("name") == name)


def test_workflow_triggers_permissions_and_steps():
    doc = _workflow()
    on = doc.get("on", doc.get(True))  # YAML 1.1 reads a bare `on` as true
    paths = on["pull_request"]["paths"]
    for wanted in ("dvc.lock", "dvc.yaml", "params.yaml", "metrics/**", "data/ledger/**", "data/tables/**",
                   "stages/**"):  # fmt: skip
        assert wanted in paths
    steps = doc["jobs"]["diff"]["steps"]
    install = _step(doc, "Install what the diff needs")["run"]
    assert "requirements-diff.txt" in install and "-r requirements.txt" not in install
    diff_step = _step(doc, "Release diff")
    script = diff_step["run"]
    assert 'git merge-base "$BASE_SHA" "$HEAD_SHA"' in script
    assert 'python -m stages.diff "${base:0:10}" "${HEAD_SHA:0:10}"' in script  # merge base, not base tip
    assert "python -m stages.pr_check" in script
    assert doc["jobs"]["diff"]["env"]["HEAD_SHA"] == "${{ github.event.pull_request.head.sha }}"
    # Fork pull requests: no comment, no pictures branch; the artifact and summary still happen, and a
    # refused write does not turn the run red.
    comment = _step(doc, "Comment on the pull request")
    assert "env.SAME_REPO == 'true'" in comment["if"] and comment["continue-on-error"] is True
    publish = _step(doc, "Publish the pictures for the comment")
    assert "env.SAME_REPO == 'true'" in publish["if"] and publish["continue-on-error"] is True
    upload = next(s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and upload["with"]["path"] == "diff-out/"
    assert doc["jobs"]["diff"]["env"]["SAME_REPO"] == (
        "${{ github.event.pull_request.head.repo.full_name == github.repository }}")  # fmt: skip
    fail = _step(doc, "Fail when dvc.lock is stale, outputs are not pushed, or the diff failed")
    assert fail["if"] == "steps.diff.outputs.failed == '1'"
    # Only what the diff needs is installed, pinned as requirements.txt pins it.
    from stages.requirements_subset import read_pins, subset_text

    assert (REPO / "requirements-diff.txt").read_text() == subset_text(REPO / "requirements.txt")
    subset, full = read_pins(REPO / "requirements-diff.txt"), read_pins(REPO / "requirements.txt")
    assert subset.items() <= full.items() and "moto" not in subset and "dvc" in subset


def _run_step(doc: dict[str, Any], name: str, cwd: Path, env: dict[str, str]) -> Any:
    """Run a workflow step's script as Actions does (`bash -eo pipefail`), `${{ }}` resolved by `env`."""
    step = _step(doc, name)
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], cwd=cwd,
                          env=env, capture_output=True, text=True, check=False, timeout=900)  # fmt: skip


def test_workflow_diff_step_runs_on_a_checkout_without_data(world, tmp_path):
    p, lb = world["p"], world["lb"]
    doc = _workflow()
    clone = _ci_clone(world, tmp_path / "ci")
    base_sha = p.git("rev-parse", "v0.1.0^{commit}").stdout.strip()  # the tags are annotated
    head_sha = p.git("rev-parse", "v0.2.0^{commit}").stdout.strip()
    outputs, summary = tmp_path / "outputs", tmp_path / "summary.md"
    pictures_url = "https://pictures.invalid/pr-1/abc"
    env = _ci_env(world, BASE_SHA=base_sha, HEAD_SHA=head_sha, GITHUB_OUTPUT=str(outputs),
                  GITHUB_STEP_SUMMARY=str(summary), MARKER=doc["env"]["MARKER"],
                  DVC_REMOTE_ENDPOINT=lb.s3_endpoint, PICTURES_URL=pictures_url)  # fmt: skip
    run = _run_step(doc, "Release diff", clone, env)
    assert run.returncode == 0, run.stderr
    out = dict(line.split("=", 1) for line in outputs.read_text().splitlines())
    assert out == {"base": base_sha, "failed": "0", "pictures": "true"}
    comment = (clone / "diff-out" / "comment.md").read_text()
    assert comment.startswith(doc["env"]["MARKER"] + "\n")
    assert f"Merge base `{base_sha[:10]}` → head `{head_sha[:10]}`." in comment
    assert "✅ `dvc.lock` is current" in comment
    assert "✅ Every output in `dvc.lock` is in the DVC remote" in comment
    assert f"## Dataset diff `{base_sha[:10]}` → `{head_sha[:10]}`" in comment
    assert f"![reef-points: added, removed and relabelled samples]({pictures_url}/" in comment
    assert (clone / "diff-out" / "pictures" / "reef-points-changes.png").exists()

    # Without a published copy the images become links to the artifact; the summary gets the comment.
    point = _step(doc, "Point the markdown at the pictures")
    env2 = {**env, "PUBLISHED": "", "ARTIFACT_URL": "https://artifact.invalid/1"}
    res = subprocess.run(["bash", "-eo", "pipefail", "-c", point["run"]], cwd=clone, env=env2,
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    linked = (clone / "diff-out" / "comment.md").read_text()
    assert "![" not in linked
    assert "[reef-points: added, removed and relabelled samples: reef-points-changes.png, in the workflow " \
           "artifact](https://artifact.invalid/1)" in linked
    assert summary.read_text() == linked

    # A fork: no secrets. The step stays green, says why, and still checks dvc.lock.
    fork_out = tmp_path / "fork-outputs"
    shutil.rmtree(clone / "diff-out")
    fork_env = {**env, "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "GITHUB_OUTPUT": str(fork_out)}
    fork = _run_step(doc, "Release diff", clone, fork_env)
    assert fork.returncode == 0, fork.stderr
    assert dict(line.split("=", 1) for line in fork_out.read_text().splitlines())["failed"] == "0"
    fork_comment = (clone / "diff-out" / "comment.md").read_text()
    assert "Dataset diff skipped: no DVC remote credentials" in fork_comment
    assert "✅ `dvc.lock` is current" in fork_comment and "⚪ Outputs pushed: not checked" in fork_comment
