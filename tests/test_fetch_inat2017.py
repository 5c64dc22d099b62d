"""fetch@inat2017 from the requester-pays loopback bucket: JSON zips, and the image tar.gz streamed once."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from stages.errors import ChecksumMismatch, ConfigError, UnsafeArchiveError
from stages.fetch import fetch
from stages.loopback import Loopback

TAR = "train_val_images.tar.gz"
IMAGES = {
    f"train_val_images/{sc}/{cat}/{hashlib.md5(f'{cat}{i}'.encode()).hexdigest()}.jpg": hashlib.shake_256(
        f"{cat}{i}".encode()
    ).digest(6000)
    for sc, cats in {
        "Actinopterygii": ["Amphiprion ocellaris", "Gadus morhua"],
        "Mollusca": ["Octopus vulgaris"],
        "Aves": ["Pica pica"],
    }.items()
    for cat in cats
    for i in range(2)
}
CATEGORIES = [
    {"id": 0, "name": "Amphiprion ocellaris", "supercategory": "Actinopterygii"},
    {"id": 1, "name": "Gadus morhua", "supercategory": "Actinopterygii"},
    {"id": 2, "name": "Octopus vulgaris", "supercategory": "Mollusca"},
    {"id": 3, "name": "Pica pica", "supercategory": "Aves"},
]
JSONS = [
    "train2017.json",
    "train2017_locations.json",
    "train_2017_bboxes.json",
    "val2017.json",
    "val2017_locations.json",
    "val_2017_bboxes.json",
]


def coco(split: str) -> bytes:
    return json.dumps({"images": [], "annotations": [], "categories": CATEGORIES, "split": split}).encode()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_upstream(
    root: Path, tar_members: dict[str, bytes] | None = None, json_zip_extra: dict[str, bytes] | None = None
) -> None:
    bucket = root / "s3/inaturalist-datasets/2017"
    bucket.mkdir(parents=True, exist_ok=True)
    (bucket / "train_val2017.zip").write_bytes(
        zip_bytes({"train2017.json": coco("train"), "val2017.json": coco("val"), **(json_zip_extra or {})})
    )
    (bucket / "train_2017_bboxes.zip").write_bytes(zip_bytes({"train_2017_bboxes.json": coco("train")}))
    (bucket / "val_2017_bboxes.zip").write_bytes(zip_bytes({"val_2017_bboxes.json": coco("val")}))
    (bucket / "inat2017_locations.zip").write_bytes(
        zip_bytes(
            {
                "inat2017_locations/train2017_locations.json": b"[]",
                "inat2017_locations/val2017_locations.json": b"[]",
            }
        )
    )
    data = tar_gz(tar_members if tar_members is not None else IMAGES)
    (bucket / TAR).write_bytes(data)
    # The published md5 of the tar, as the sample generator writes it for the loopback overlay.
    (root / "checksums.json").write_text(json.dumps({f"inat2017/{TAR}": hashlib.md5(data).hexdigest()}))


@pytest.fixture
def upstream(tmp_path):
    root = tmp_path / "upstream"
    write_upstream(root)
    return root


@pytest.fixture
def lb(upstream):
    with Loopback(upstream=upstream) as loop:
        yield loop


@pytest.fixture
def params(lb, loopback_params, aws_test_credentials):
    return loopback_params(lb)


def files_under(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def wanted_images(*supercategories: str) -> list[str]:
    return sorted(k for k in IMAGES if k.split("/")[1] in supercategories)


def test_jsons_flat_and_only_chosen_supercategories(lb, params, tmp_path):
    out, scratch = tmp_path / "raw/inat2017", tmp_path / "scratch"
    report = fetch("inat2017", params, out, scratch)
    assert files_under(out) == sorted(
        ["archives.csv", "manifest.csv", *JSONS, *wanted_images("Actinopterygii", "Mollusca")]
    )
    key = wanted_images("Mollusca")[0]
    assert (out / key).read_bytes() == IMAGES[key]
    rows = {r["key"]: r for r in read_csv(out / "manifest.csv")}
    assert rows[key]["url"] == f"s3://inaturalist-datasets/2017/{TAR}#{key}"
    assert rows["train2017_locations.json"]["url"].endswith(
        "inat2017_locations.zip#inat2017_locations/train2017_locations.json"
    )
    tar_row = {r["key"]: r for r in read_csv(out / "archives.csv")}[TAR]
    assert tar_row["selection"] == "Actinopterygii,Mollusca"
    assert (report.downloaded, report.extracted) == (5, 6 + 6)
    assert list(scratch.iterdir()) == []


def test_second_run_skips_the_stream(lb, params, tmp_path):
    out, scratch = tmp_path / "raw/inat2017", tmp_path / "scratch"
    fetch("inat2017", params, out, scratch)
    before = {n: (out / n).read_bytes() for n in ("manifest.csv", "archives.csv")}
    report = fetch("inat2017", params, out, scratch)
    assert (report.downloaded, report.bytes_downloaded, report.unchanged) == (0, 0, 5)
    assert {n: (out / n).read_bytes() for n in before} == before


def test_narrowing_the_selection_needs_no_stream(lb, params, tmp_path):
    out, scratch = tmp_path / "raw/inat2017", tmp_path / "scratch"
    fetch("inat2017", params, out, scratch)
    params["sources"]["inat2017"]["supercategories"] = ["Mollusca"]
    report = fetch("inat2017", params, out, scratch)
    assert report.downloaded == 0 and report.removed == 4
    assert [k for k in files_under(out) if k.startswith("train_val_images/")] == wanted_images("Mollusca")
    params["sources"]["inat2017"]["supercategories"] = ["Mollusca", "Aves"]
    widened = fetch("inat2017", params, out, scratch)
    assert widened.downloaded == 1  # a supercategory not extracted before: stream again
    assert [k for k in files_under(out) if k.startswith("train_val_images/")] == wanted_images(
        "Mollusca", "Aves"
    )


def test_dropped_stream_reopens_and_md5_still_matches(lb, params, tmp_path):
    fault = lb.faults.add("s3", f"/inaturalist-datasets/2017/{TAR}", kind="drop", after_bytes=3000, times=3)
    out = tmp_path / "raw/inat2017"
    fetch("inat2017", params, out, tmp_path / "scratch")
    assert fault.hits == 3  # the HEAD and two cut GETs
    for key in wanted_images("Actinopterygii", "Mollusca"):
        assert (out / key).read_bytes() == IMAGES[key]


def test_500_then_200_is_retried(lb, params, tmp_path):
    fault = lb.faults.add(
        "s3", "/inaturalist-datasets/2017/val_2017_bboxes.zip", kind="status", status=500, times=2
    )
    out = tmp_path / "raw/inat2017"
    fetch("inat2017", params, out, tmp_path / "scratch")
    assert fault.hits == 2 and (out / "val_2017_bboxes.json").read_bytes() == coco("val")


def test_wrong_published_md5_keeps_nothing_of_the_stream(lb, params, tmp_path):
    params["endpoints"]["known_md5"][f"inat2017/{TAR}"] = "3" * 32
    out, scratch = tmp_path / "raw/inat2017", tmp_path / "scratch"
    with pytest.raises(ChecksumMismatch) as err:
        fetch("inat2017", params, out, scratch)
    assert f"s3://inaturalist-datasets/2017/{TAR}" in str(err.value) and "3" * 32 in str(err.value)
    assert not (out / "train_val_images").exists()
    assert list(scratch.iterdir()) == []


def test_unsafe_json_zip_is_refused(lb, params, tmp_path, upstream):
    write_upstream(upstream, json_zip_extra={"../../evil.json": b"{}"})
    lb.reseed()
    out = tmp_path / "raw/inat2017"
    with pytest.raises(UnsafeArchiveError, match="'..' component"):
        fetch("inat2017", params, out, tmp_path / "scratch")
    assert not (out / "train2017.json").exists() and not list(tmp_path.rglob("evil.json"))


def test_unsafe_tar_member_is_refused_and_nothing_kept(lb, params, tmp_path, upstream):
    members = dict(IMAGES)
    members["train_val_images/Mollusca/../../../evil.jpg"] = b"evil"
    write_upstream(upstream, tar_members=members)
    lb.reseed()
    params["endpoints"]["known_md5"] = lb.known_md5()
    out = tmp_path / "raw/inat2017"
    with pytest.raises(UnsafeArchiveError):
        fetch("inat2017", params, out, tmp_path / "scratch")
    assert not (out / "train_val_images").exists() and not list(tmp_path.rglob("evil.jpg"))


def test_unknown_supercategory_fails_before_streaming(lb, params, tmp_path):
    params["sources"]["inat2017"]["supercategories"] = ["Mollusca", "Molusca"]
    tar = lb.faults.add("s3", f"/inaturalist-datasets/2017/{TAR}", kind="status", status=500, times=None)
    with pytest.raises(ConfigError, match=r"\['Molusca'\] do not exist"):
        fetch("inat2017", params, tmp_path / "raw", tmp_path / "scratch")
    assert tar.hits == 0


def test_cli_exit_2_on_checksum_mismatch(lb, params, run_stage, tmp_path):
    params["endpoints"]["known_md5"] = {f"inat2017/{TAR}": "4" * 32}
    # The overlay's known_md5 (from checksums.json) would win over params: drop the tar's entry.
    (Path(lb.upstream) / "checksums.json").write_text("{}")
    proc = run_stage(
        lb,
        params,
        "stages.fetch",
        "inat2017",
        "--out",
        str(tmp_path / "raw"),
        "--scratch",
        str(tmp_path / "scratch"),
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: fetching s3://inaturalist-datasets/2017/{TAR} failed: md5 mismatch: expected 4444"
    )
