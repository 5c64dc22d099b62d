"""fetch@coralnet: an export in the bucket and local export folders (CoralNet's layout and
CoralNet-Toolbox's), mirrored into one layout with a manifest."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest

from stages.errors import ChecksumMismatch, UpstreamFormatError
from stages.fetch import fetch
from stages.loopback import Loopback

ANNOTATIONS = "Name,Row,Column,Label ID\n1.jpg,10,20,4\n2.jpg,5,5,7\n"
LABELSET = "Label ID,Name,Short Code\n4,Acropora,ACR\n7,Sand,SAND\n"


def jpeg(name: str, size: int = 5000) -> bytes:
    seed = hashlib.sha256(name.encode()).digest()
    return b"\xff\xd8\xff\xe0" + (seed * (size // 32 + 1))[:size]


@pytest.fixture
def upstream(tmp_path):
    root = tmp_path / "upstream"
    s3 = root / "s3/coral-reef-training/s2012"
    (s3 / "images").mkdir(parents=True)
    (s3 / "features").mkdir()
    (s3 / "annotations.csv").write_text(ANNOTATIONS)
    (s3 / "labelset.csv").write_text(LABELSET)
    for name in ("1.jpg", "2.jpg"):
        (s3 / "images" / name).write_bytes(jpeg("s2012" + name))
    (s3 / "features/i1.featurevector").write_bytes(b"features are not fetched")
    local = root / "coralnet/s1073"
    (local / "images").mkdir(parents=True)
    (local / "annotations.csv").write_text(ANNOTATIONS.replace("1.jpg", "a.png"))
    (local / "images/a.png").write_bytes(jpeg("s1073a"))
    (local / "notes.txt").write_text("not part of an export")
    return root


@pytest.fixture
def lb(upstream):
    with Loopback(upstream=upstream) as loop:
        yield loop


EXPORTS = [{"id": 2012, "location": "s3"}, {"id": 1073, "location": "local"}]


@pytest.fixture
def params(lb, loopback_params):
    """`params(*extra_entries)`: the loopback params reading the fixture's two exports (and more)."""

    def make(*extra: dict) -> dict:
        out = loopback_params(lb)
        out["sources"]["coralnet"]["exports"] = [*EXPORTS, *extra]
        return out

    return make


def files_under(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def manifest(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "manifest.csv", newline="") as fh:
        return {r["key"]: r for r in csv.DictReader(fh)}


def test_mirrors_bucket_and_local_exports(lb, params, tmp_path, upstream):
    out = tmp_path / "raw/coralnet"
    report = fetch("coralnet", params(), out, tmp_path / "scratch")
    assert files_under(out) == [
        "manifest.csv",
        "s1073/annotations.csv",
        "s1073/images/a.png",
        "s2012/annotations.csv",
        "s2012/images/1.jpg",
        "s2012/images/2.jpg",
        "s2012/labelset.csv",
    ]
    rows = manifest(out)
    img = rows["s2012/images/1.jpg"]
    assert img["md5"] == hashlib.md5(jpeg("s20121.jpg")).hexdigest() == img["etag"]
    assert img["url"] == "s3://coral-reef-training/s2012/images/1.jpg"
    local = rows["s1073/images/a.png"]
    # Local exports are recorded under params.yaml's root, not this checkout's absolute path.
    assert local["etag"] == "" and local["url"] == "data/external/coralnet/s1073/images/a.png"
    assert report.downloaded == 6
    assert report.notes == ["coralnet s1073: not part of the export, not mirrored: notes.txt"]


def test_second_run_downloads_nothing(lb, params, tmp_path):
    out = tmp_path / "raw/coralnet"
    p = params()
    fetch("coralnet", p, out, tmp_path / "scratch")
    first = (out / "manifest.csv").read_bytes()
    report = fetch("coralnet", p, out, tmp_path / "scratch")
    assert (report.downloaded, report.bytes_downloaded, report.unchanged) == (0, 0, 6)
    assert (out / "manifest.csv").read_bytes() == first


def test_local_changes_are_copied_and_removals_mirrored(lb, params, tmp_path, upstream):
    out = tmp_path / "raw/coralnet"
    p = params()
    fetch("coralnet", p, out, tmp_path / "scratch")
    local = upstream / "coralnet/s1073"
    (local / "images/a.png").write_bytes(jpeg("s1073a v2"))
    (local / "images/b.png").write_bytes(jpeg("s1073b"))
    (upstream / "s3/coral-reef-training/s2012/images/2.jpg").unlink()
    lb.reseed()
    report = fetch("coralnet", p, out, tmp_path / "scratch")
    assert (out / "s1073/images/a.png").read_bytes() == jpeg("s1073a v2")
    assert (out / "s1073/images/b.png").exists() and not (out / "s2012/images/2.jpg").exists()
    assert (report.downloaded, report.removed) == (2, 1)


def test_dropped_connection_resumes(lb, params, tmp_path):
    fault = lb.faults.add(
        "s3", "/coral-reef-training/s2012/images/2.jpg", kind="drop", after_bytes=1500, times=1
    )
    out = tmp_path / "raw/coralnet"
    fetch("coralnet", params(), out, tmp_path / "scratch")
    assert fault.hits == 1
    assert (out / "s2012/images/2.jpg").read_bytes() == jpeg("s20122.jpg")


def test_500_then_200_is_retried(lb, params, tmp_path):
    fault = lb.faults.add(
        "s3", "/coral-reef-training/s2012/annotations.csv", kind="status", status=500, times=2
    )
    out = tmp_path / "raw/coralnet"
    fetch("coralnet", params(), out, tmp_path / "scratch")
    assert fault.hits == 2 and (out / "s2012/annotations.csv").read_text() == ANNOTATIONS


def test_checksum_mismatch_names_the_url(lb, params, tmp_path):
    p = params()
    p["endpoints"]["known_md5"] = {"coralnet/s2012/images/1.jpg": "1" * 32}
    out = tmp_path / "raw/coralnet"
    with pytest.raises(ChecksumMismatch) as err:
        fetch("coralnet", p, out, tmp_path / "scratch")
    assert "s3://coral-reef-training/s2012/images/1.jpg" in str(err.value) and "1" * 32 in str(err.value)
    assert not (out / "s2012/images/1.jpg").exists()
    assert list((tmp_path / "scratch").rglob("*.part")) == []


def test_missing_annotations_in_bucket_names_the_place(lb, params, tmp_path, upstream):
    (upstream / "s3/coral-reef-training/s2012/annotations.csv").unlink()
    lb.reseed()
    with pytest.raises(UpstreamFormatError) as err:
        fetch("coralnet", params(), tmp_path / "out", tmp_path / "scratch")
    assert "s3://coral-reef-training/s2012/annotations.csv" in str(err.value)


def test_missing_local_export_names_the_folder(lb, params, tmp_path, upstream):
    p = params()
    p["endpoints"]["coralnet_local_root"] = str(tmp_path / "nowhere")
    with pytest.raises(UpstreamFormatError) as err:
        fetch("coralnet", p, tmp_path / "out", tmp_path / "scratch")
    assert str(tmp_path / "nowhere/s1073") in str(err.value) and "not found" in str(err.value)


def test_cli_exit_2_on_missing_annotations(lb, params, run_stage, tmp_path, upstream):
    (upstream / "coralnet/s1073/annotations.csv").unlink()
    proc = run_stage(
        lb,
        params(),
        "stages.fetch",
        "coralnet",
        "--out",
        str(tmp_path / "raw"),
        "--scratch",
        str(tmp_path / "scratch"),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {upstream / 'coralnet/s1073/annotations.csv'}: CoralNet export s1073 has no annotations.csv "
        "and no other CSV with a CoralNet annotations header (Name or Image ID, Row, Column, Label...); "
        "CSVs: none"
    )


def _plant_link(upstream: Path, tmp_path: Path, how: str) -> Path:
    """A symbolic link in the local export s1073 that leads to a host file outside it."""
    secret = tmp_path / "host-secret.txt"
    secret.write_text("TOP SECRET host file")
    images = upstream / "coralnet/s1073/images"
    if how == "absolute":
        link = images / "x.jpg"
        link.symlink_to(secret)
    elif how == "relative":
        link = images / "x.jpg"
        link.symlink_to(Path("../../../..") / secret.relative_to(tmp_path))
    elif how == "chain":  # a link to a link inside the export, which leaves it
        (upstream / "coralnet/s1073/hop").symlink_to(secret)
        link = images / "x.jpg"
        link.symlink_to("../hop")
    elif how == "folder":  # a linked folder that leads out
        outside = tmp_path / "host-dir"
        outside.mkdir()
        (outside / "y.jpg").write_text("host image")
        link = images / "sub"
        link.symlink_to(outside, target_is_directory=True)
    else:  # the annotations file itself
        link = upstream / "coralnet/s1073/annotations.csv"
        link.unlink()
        link.symlink_to(secret)
    return link


@pytest.mark.parametrize("how", ["absolute", "relative", "chain", "folder", "annotations"])
def test_local_export_symlink_that_leaves_the_folder_is_refused(
    lb, params, tmp_path, upstream, how
):
    link = _plant_link(upstream, tmp_path, how)
    out = tmp_path / "raw/coralnet"
    with pytest.raises(UpstreamFormatError) as err:
        fetch("coralnet", params(), out, tmp_path / "scratch")
    message = str(err.value)
    assert message.startswith(f"{link}: symbolic link to ") and "outside the export folder" in message
    copied = [p.read_bytes() for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not any(b"TOP SECRET" in data or b"host image" in data for data in copied)


def test_local_export_symlink_inside_the_folder_is_mirrored(lb, params, tmp_path, upstream):
    images = upstream / "coralnet/s1073/images"
    (images / "alias.png").symlink_to("a.png")
    out = tmp_path / "raw/coralnet"
    fetch("coralnet", params(), out, tmp_path / "scratch")
    assert (out / "s1073/images/alias.png").read_bytes() == jpeg("s1073a")
    assert not (out / "s1073/images/alias.png").is_symlink()


def test_local_export_broken_symlink_is_named(lb, params, tmp_path, upstream):
    link = upstream / "coralnet/s1073/images/gone.jpg"
    link.symlink_to("nowhere.jpg")
    with pytest.raises(UpstreamFormatError, match="broken symbolic link") as err:
        fetch("coralnet", params(), tmp_path / "raw", tmp_path / "scratch")
    assert str(link) in str(err.value)


# --- what an export folder holds besides annotations.csv and images/ ------------------------------


def test_every_top_level_csv_and_everything_under_images_is_mirrored(lb, params, tmp_path, upstream):
    s3 = upstream / "s3/coral-reef-training/s2012"
    (s3 / "labelset.csv").rename(s3 / "label_set.csv")  # the name used to be skipped without a word
    (s3 / "images/extra").mkdir()
    (s3 / "images/extra/x.jpg").write_bytes(jpeg("extra"))
    local = upstream / "coralnet/s1073"
    (local / "MIR_CoralNet_Labelset.csv").write_text(",Short Code,Label ID\n2,ACR,4\n")
    lb.reseed()
    out = tmp_path / "raw/coralnet"
    fetch("coralnet", params(), out, tmp_path / "scratch")
    got = files_under(out)
    for key in ("s2012/label_set.csv", "s2012/images/extra/x.jpg", "s1073/MIR_CoralNet_Labelset.csv"):
        assert key in got, key
    assert "s2012/labelset.csv" not in got and not any("features" in k for k in got)


def _toolbox(root: Path, name: str = "s3120") -> Path:
    """A local export as CoralNet-Toolbox writes it: another CSV name, images in D3/, its own labels."""
    folder = root / name
    (folder / "D3/extra").mkdir(parents=True)
    (folder / "CoralNet_Annotations.csv").write_text(
        "Name,Row,Column,Label,Long Label,Patch Size\na.jpg,1,2,Coral,Coral,112\n"
    )
    (folder / "label_set.csv").write_text(",Short Code,Label ID\n0,Coral,4\n")
    (folder / "Labels.json").write_text("[]")
    (folder / "D3/a.jpg").write_bytes(jpeg("toolbox a"))
    (folder / "D3/extra/b.jpg").write_bytes(jpeg("toolbox b"))
    return folder


def test_a_toolbox_layout_is_mirrored_into_the_export_layout(lb, params, tmp_path, upstream):
    _toolbox(upstream / "coralnet")
    out = tmp_path / "raw/coralnet"
    report = fetch("coralnet", params({"id": 3120, "location": "local"}), out, tmp_path / "scratch")
    assert [k for k in files_under(out) if k.startswith("s3120/")] == [
        "s3120/annotations.csv",
        "s3120/images/a.jpg",
        "s3120/images/extra/b.jpg",
        "s3120/label_set.csv",
    ]
    rows = manifest(out)
    # The manifest keeps where each file came from.
    assert rows["s3120/annotations.csv"]["url"] == "data/external/coralnet/s3120/CoralNet_Annotations.csv"
    assert rows["s3120/images/a.jpg"]["url"] == "data/external/coralnet/s3120/D3/a.jpg"
    assert "coralnet s3120: not part of the export, not mirrored: Labels.json" in report.notes


def test_a_flat_export_has_its_images_beside_the_csv(lb, params, tmp_path, upstream):
    folder = upstream / "coralnet/s77"
    folder.mkdir(parents=True)
    (folder / "export.csv").write_text("Name,Row,Column,Label\na.JPG,1,1,Coral\n")
    (folder / "a.JPG").write_bytes(jpeg("flat a"))
    (folder / "readme.txt").write_text("notes")
    out = tmp_path / "raw/coralnet"
    fetch("coralnet", params({"id": 77, "location": "local"}), out, tmp_path / "scratch")
    assert [k for k in files_under(out) if k.startswith("s77/")] == [
        "s77/annotations.csv",
        "s77/images/a.JPG",
    ]


def test_ambiguous_local_exports_are_refused_until_the_entry_names_the_files(lb, params, tmp_path, upstream):
    folder = _toolbox(upstream / "coralnet")
    (folder / "CoralNet_Annotations_v2.csv").write_text("Name,Row,Column,Label\na.jpg,1,2,Coral\n")
    (folder / "D4").mkdir()
    (folder / "D4/c.png").write_bytes(jpeg("toolbox c"))
    out = tmp_path / "raw/coralnet"
    entry = {"id": 3120, "location": "local"}
    with pytest.raises(UpstreamFormatError) as err:
        fetch("coralnet", params(entry), out, tmp_path / "scratch")
    assert "several annotations CSVs (CoralNet_Annotations.csv, CoralNet_Annotations_v2.csv)" in str(
        err.value
    )
    assert "`annotations:`" in str(err.value) and str(folder) in str(err.value)
    entry["annotations"] = "CoralNet_Annotations_v2.csv"
    with pytest.raises(UpstreamFormatError, match=r"several image folders \(D3, D4\).*`images:`"):
        fetch("coralnet", params(entry), out, tmp_path / "scratch")
    entry["images"] = "D4"
    fetch("coralnet", params(entry), out, tmp_path / "scratch")
    got = [k for k in files_under(out) if k.startswith("s3120/")]
    # The other annotations-like CSV is mirrored under its own name: ingest counts it as unused.
    assert got == [
        "s3120/CoralNet_Annotations.csv",
        "s3120/annotations.csv",
        "s3120/images/c.png",
        "s3120/label_set.csv",
    ]
    assert manifest(out)["s3120/annotations.csv"]["url"].endswith("CoralNet_Annotations_v2.csv")
