"""fetch@seatizen through a loopback Zenodo record: parallel ranged downloads, md5 from the record."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest

from stages.errors import ChecksumMismatch, UnsafeArchiveError, UpstreamFormatError
from stages.fetch import fetch
from stages.loopback import Loopback

RECORD = "13951614"
CSV = "20241016_132819_multilabel_annotations.csv"
SEG = "20241018_segmentation_annotations.json"
GBIF = "gbif_class_mapping.csv"
IMAGES = {
    "2024_dataset/20210618_ATF-Europa_ASV-00_GX024250_004.jpeg": hashlib.shake_256(b"a").digest(5000),
    "2024_dataset/20221020_SYC-Aldabra_UAV-01_DJI0001_001.JPG": hashlib.shake_256(b"b").digest(5000),
}


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def contents(images: dict[str, bytes] | None = None) -> dict[str, bytes]:
    return {
        CSV: b"FileName,Acropora_Branching,Sand\n20210618_ATF-Europa_ASV-00_GX024250_004.jpeg,1,-1\n",
        # Big enough (with 1 KiB chunks in the tests) to be split across many connections.
        SEG: json.dumps(
            {"images": [], "annotations": [], "pad": hashlib.shake_256(b"seg").hexdigest(20_000)}
        ).encode(),
        GBIF: b"class,gbif_id\nSand,\n",
        "images.zip": zip_bytes(images if images is not None else IMAGES),
    }


def publish(
    root: Path,
    files: dict[str, bytes],
    md5_override: dict[str, str] | None = None,
    listed: list[str] | None = None,
) -> None:
    record = root / f"http/zenodo/api/records/{RECORD}"
    entries = []
    for name, data in files.items():
        (record / "files" / name).mkdir(parents=True, exist_ok=True)
        (record / "files" / name / "content").write_bytes(data)
        if listed is None or name in listed:
            md5 = (md5_override or {}).get(name, hashlib.md5(data).hexdigest())
            entries.append(
                {
                    "key": name,
                    "size": len(data),
                    "checksum": f"md5:{md5}",
                    "links": {"self": f"{{{{BASE}}}}/zenodo/api/records/{RECORD}/files/{name}/content"},
                }
            )
    (record / "index.json").write_text(json.dumps({"id": int(RECORD), "files": entries}))


@pytest.fixture
def upstream(tmp_path):
    root = tmp_path / "upstream"
    publish(root, contents())
    return root


@pytest.fixture
def lb(upstream):
    with Loopback(upstream=upstream) as loop:
        yield loop


@pytest.fixture
def params(lb, loopback_params):
    return loopback_params(lb)


def files_under(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_downloads_record_files_and_extracts_images(lb, params, tmp_path):
    out, scratch = tmp_path / "raw/seatizen", tmp_path / "scratch"
    report = fetch("seatizen", params, out, scratch)
    assert files_under(out) == sorted([CSV, SEG, GBIF, "archives.csv", "manifest.csv", *IMAGES])
    data = contents()
    assert (out / SEG).read_bytes() == data[SEG]
    rows = {r["key"]: r for r in read_csv(out / "manifest.csv")}
    # The manifest names the upstream the loopback stands in for, never a loopback port.
    base = f"https://zenodo.org/api/records/{RECORD}/files"
    assert (
        rows[SEG]["md5"] == hashlib.md5(data[SEG]).hexdigest() and rows[SEG]["url"] == f"{base}/{SEG}/content"
    )
    image = next(iter(IMAGES))
    assert rows[image]["url"] == f"{base}/images.zip/content#{image}"
    assert [r["key"] for r in read_csv(out / "archives.csv")] == ["images.zip"]
    assert (report.downloaded, report.extracted) == (4, 2)
    assert list(scratch.iterdir()) == []


def test_second_run_downloads_nothing(lb, params, tmp_path):
    out, scratch = tmp_path / "raw/seatizen", tmp_path / "scratch"
    fetch("seatizen", params, out, scratch)
    before = {n: (out / n).read_bytes() for n in ("manifest.csv", "archives.csv")}
    report = fetch("seatizen", params, out, scratch)
    assert (report.downloaded, report.bytes_downloaded, report.unchanged) == (0, 0, 4)
    assert {n: (out / n).read_bytes() for n in before} == before


def test_parallel_download_resumes_dropped_segments(lb, params, tmp_path):
    fault = lb.faults.add("http", f"/files/{SEG}/content", kind="drop", after_bytes=700, times=4)
    out = tmp_path / "raw/seatizen"
    report = fetch("seatizen", params, out, tmp_path / "scratch")
    assert fault.hits == 4
    assert (out / SEG).read_bytes() == contents()[SEG]
    total = sum(len(v) for v in contents().values())
    assert report.bytes_downloaded < total + 4 * 1024  # cut segments resumed, not restarted


def test_500_then_200_on_the_record_api(lb, params, tmp_path):
    fault = lb.faults.add("http", f"/zenodo/api/records/{RECORD}", kind="status", status=502, times=1)
    fetch("seatizen", params, tmp_path / "raw", tmp_path / "scratch")
    assert fault.hits == 1 and (tmp_path / "raw" / CSV).exists()


def test_record_md5_mismatch_names_the_url_and_keeps_nothing(lb, params, tmp_path, upstream):
    publish(upstream, contents(), md5_override={SEG: "5" * 32})
    out, scratch = tmp_path / "raw/seatizen", tmp_path / "scratch"
    with pytest.raises(ChecksumMismatch) as err:
        fetch("seatizen", params, out, scratch)
    assert f"/files/{SEG}/content" in str(err.value) and "5" * 32 in str(err.value)
    assert not (out / SEG).exists()
    assert list(scratch.iterdir()) == []


def test_missing_expected_file_names_record_and_file(lb, params, tmp_path, upstream):
    publish(upstream, contents(), listed=[CSV, SEG, "images.zip"])
    with pytest.raises(UpstreamFormatError) as err:
        fetch("seatizen", params, tmp_path / "raw", tmp_path / "scratch")
    message = str(err.value)
    assert f"{lb.http_base}/zenodo/api/records/{RECORD}" in message and repr(GBIF) in message


def test_images_zip_with_parent_member_is_refused(lb, params, tmp_path, upstream):
    publish(upstream, contents({**IMAGES, "2024_dataset/../../evil.jpg": b"x"}))
    out = tmp_path / "raw/seatizen"
    with pytest.raises(UnsafeArchiveError, match="'..' component"):
        fetch("seatizen", params, out, tmp_path / "scratch")
    assert not (out / "2024_dataset").exists() and not list(tmp_path.rglob("evil.jpg"))


def test_cli_exit_2_on_missing_file(lb, params, run_stage, tmp_path, upstream):
    publish(upstream, contents(), listed=[CSV, GBIF, "images.zip"])
    proc = run_stage(
        lb,
        params,
        "stages.fetch",
        "seatizen",
        "--out",
        str(tmp_path / "raw"),
        "--scratch",
        str(tmp_path / "scratch"),
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {lb.http_base}/zenodo/api/records/{RECORD}: expected file '{SEG}'")
