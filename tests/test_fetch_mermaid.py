"""fetch@mermaid through the loopback S3: only referenced PNGs, incremental, mirrored, verified."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.errors import ChecksumMismatch, UpstreamFormatError
from stages.fetch import fetch
from stages.loopback import Loopback

PARQUET = "mermaid_confirmed_annotations.parquet"


def png_bytes(name: str, size: int = 6000) -> bytes:
    seed = hashlib.sha256(name.encode()).digest()
    return b"\x89PNG\r\n\x1a\n" + (seed * (size // 32 + 1))[:size]


def write_upstream(root: Path, referenced: list[str], present: list[str]) -> Path:
    bucket = root / "s3/coral-reef-training/mermaid"
    bucket.mkdir(parents=True, exist_ok=True)
    rows = [(f"{img}-{p}", img, p) for img in referenced for p in range(3)]
    table = pa.table(
        {
            "id": [r[0] for r in rows],
            "image_id": [r[1] for r in rows],
            "row": [r[2] * 10 for r in rows],
            "growth_form_name": ["None"] * len(rows),
        }
    )
    pq.write_table(table, bucket / PARQUET)
    for img in present:
        (bucket / f"{img}.png").write_bytes(png_bytes(img))
        (bucket / f"{img}_thumbnail.png").write_bytes(png_bytes(img + "thumb", 500))
        (bucket / f"{img}_annotations.csv").write_text("row,col\n1,2\n")
        (bucket / f"{img}_featurevector").write_bytes(b"fv")
    return bucket


@pytest.fixture
def upstream(tmp_path):
    root = tmp_path / "upstream"
    write_upstream(root, referenced=["img-a", "img-b", "img-gone"], present=["img-a", "img-b", "img-extra"])
    return root


@pytest.fixture
def lb(upstream):
    with Loopback(upstream=upstream) as loop:
        yield loop


def read_manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_fetches_parquet_and_referenced_images_only(lb, loopback_params, tmp_path, upstream):
    out = tmp_path / "raw/mermaid"
    report = fetch("mermaid", loopback_params(lb), out, tmp_path / "scratch")
    assert sorted(p.name for p in out.iterdir()) == ["img-a.png", "img-b.png", "manifest.csv", PARQUET]
    assert (out / "img-a.png").read_bytes() == png_bytes("img-a")
    rows = read_manifest(out)
    assert [r["key"] for r in rows] == ["img-a.png", "img-b.png", PARQUET]
    a = rows[0]
    assert a["size"] == str(len(png_bytes("img-a")))
    assert a["md5"] == hashlib.md5(png_bytes("img-a")).hexdigest() == a["etag"]
    assert a["url"] == "s3://coral-reef-training/mermaid/img-a.png"
    assert (report.downloaded, report.missing, report.removed) == (3, 1, 0)  # img-gone is not in the bucket
    assert list((tmp_path / "scratch").rglob("*.part")) == []


def test_second_run_downloads_nothing_and_writes_the_same_manifest(lb, loopback_params, tmp_path):
    out = tmp_path / "raw/mermaid"
    params = loopback_params(lb)
    fetch("mermaid", params, out, tmp_path / "scratch")
    first = (out / "manifest.csv").read_bytes()
    report = fetch("mermaid", params, out, tmp_path / "scratch")
    assert report.downloaded == 0 and report.bytes_downloaded == 0 and report.unchanged == 3
    assert (out / "manifest.csv").read_bytes() == first


def test_growth_and_removal_upstream_are_mirrored(lb, loopback_params, tmp_path, upstream):
    out = tmp_path / "raw/mermaid"
    params = loopback_params(lb)
    fetch("mermaid", params, out, tmp_path / "scratch")
    # Upstream: img-b no longer referenced, img-c added, img-a's bytes changed.
    bucket = write_upstream(upstream, referenced=["img-a", "img-c"], present=["img-c"])
    (bucket / "img-a.png").write_bytes(png_bytes("img-a v2"))
    lb.reseed()
    report = fetch("mermaid", params, out, tmp_path / "scratch")
    assert sorted(p.name for p in out.glob("*.png")) == ["img-a.png", "img-c.png"]
    assert (out / "img-a.png").read_bytes() == png_bytes("img-a v2")
    assert report.downloaded == 3  # parquet, changed img-a, new img-c
    assert report.removed == 1
    assert [r["key"] for r in read_manifest(out)] == ["img-a.png", "img-c.png", PARQUET]


def test_dropped_connection_resumes_to_the_right_checksum(lb, loopback_params, tmp_path):
    fault = lb.faults.add(
        "s3", "/coral-reef-training/mermaid/img-b.png", kind="drop", after_bytes=2048, times=1
    )
    out = tmp_path / "raw/mermaid"
    fetch("mermaid", loopback_params(lb), out, tmp_path / "scratch")
    assert fault.hits == 1
    assert (out / "img-b.png").read_bytes() == png_bytes("img-b")


def test_500_then_200_is_retried(lb, loopback_params, tmp_path):
    listing = lb.faults.add("s3", "/coral-reef-training", kind="status", status=500, times=1)
    image = lb.faults.add("s3", "/coral-reef-training/mermaid/img-a.png", kind="status", status=503, times=1)
    out = tmp_path / "raw/mermaid"
    fetch("mermaid", loopback_params(lb), out, tmp_path / "scratch")
    assert listing.hits == 1 and image.hits == 1
    assert (out / "img-a.png").read_bytes() == png_bytes("img-a")


def test_checksum_mismatch_names_the_url_and_keeps_nothing(lb, loopback_params, tmp_path):
    params = loopback_params(lb)
    params["endpoints"]["known_md5"] = {f"mermaid/{PARQUET}": "0" * 32}
    out = tmp_path / "raw/mermaid"
    with pytest.raises(ChecksumMismatch) as err:
        fetch("mermaid", params, out, tmp_path / "scratch")
    assert f"s3://coral-reef-training/mermaid/{PARQUET}" in str(err.value) and "0" * 32 in str(err.value)
    assert not (out / PARQUET).exists() and not (out / "manifest.csv").exists()
    assert list((tmp_path / "scratch").rglob("*.part")) == []


def test_missing_parquet_is_a_clear_error(lb, loopback_params, tmp_path, upstream):
    (upstream / "s3/coral-reef-training/mermaid" / PARQUET).unlink()
    lb.reseed()
    with pytest.raises(UpstreamFormatError, match="annotations parquet is not in the bucket"):
        fetch("mermaid", loopback_params(lb), tmp_path / "out", tmp_path / "scratch")


def test_cli_reports_and_fails_with_exit_2(lb, loopback_params, run_stage, tmp_path):
    out, scratch = tmp_path / "raw", tmp_path / "scratch"
    params = loopback_params(lb)
    ok = run_stage(lb, params, "stages.fetch", "mermaid", "--out", str(out), "--scratch", str(scratch))
    assert ok.returncode == 0, ok.stderr
    assert "fetch mermaid: 3 downloaded" in ok.stderr and (out / "img-a.png").exists()
    lb.faults.add("s3", "/coral-reef-training/mermaid/img-a.png", kind="status", status=403, times=None)
    (out / "img-a.png").unlink()
    bad = run_stage(lb, params, "stages.fetch", "mermaid", "--out", str(out), "--scratch", str(scratch))
    assert bad.returncode == 2
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: fetching s3://coral-reef-training/mermaid/img-a.png failed: S3 403")
    assert "Traceback" not in bad.stderr
