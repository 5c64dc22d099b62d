"""fetch@coasttrain over loopback HTTP: resumable verified zips, safe extraction, remembered archives."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest

from stages.config import load_params
from stages.errors import ChecksumMismatch, FetchError, UnsafeArchiveError
from stages.fetch import fetch
from stages.loopback import Loopback

REPO = Path(__file__).resolve().parents[1]

RECORDS = ["NAIP_6_001", "Sentinel2_4_001"]


def npz_like(name: str, size: int = 6000) -> bytes:
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // 32 + 1))[:size]


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    # Stored, not deflated: the bytes on the wire are then large enough to cut mid-file.
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def record_members(record: str, n: int = 3) -> dict[str, bytes]:
    members = {f"{record}.csv": b"label_image_filename,classes_array\n"}
    members.update({f"npz/{record}_{i}.npz": npz_like(f"{record}{i}") for i in range(n)})
    return members


def publish(root: Path, record: str, members: dict[str, bytes]) -> str:
    data = zip_bytes(members)
    (root / "http/coasttrain").mkdir(parents=True, exist_ok=True)
    (root / "http/coasttrain" / f"{record}.zip").write_bytes(data)
    checksums_path = root / "checksums.json"
    checksums = json.loads(checksums_path.read_text()) if checksums_path.exists() else {}
    checksums[f"coasttrain/{record}.zip"] = hashlib.md5(data).hexdigest()
    checksums_path.write_text(json.dumps(checksums))
    return checksums[f"coasttrain/{record}.zip"]


@pytest.fixture
def upstream(tmp_path):
    root = tmp_path / "upstream"
    for record in RECORDS:
        publish(root, record, record_members(record))
    return root


@pytest.fixture
def lb(upstream):
    with Loopback(upstream=upstream) as loop:
        yield loop


@pytest.fixture
def params(lb, loopback_params):
    p = loopback_params(lb)
    p["sources"]["coasttrain"]["records"] = list(RECORDS)
    return p


def files_under(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_downloads_verifies_and_extracts_each_record(lb, params, tmp_path, upstream):
    out, scratch = tmp_path / "raw/coasttrain", tmp_path / "scratch"
    report = fetch("coasttrain", params, out, scratch)
    expected = ["archives.csv", "manifest.csv"]
    for record in RECORDS:
        expected += [f"{record}/{name}" for name in record_members(record)]
    assert files_under(out) == sorted(expected)
    assert (out / "NAIP_6_001/npz/NAIP_6_001_1.npz").read_bytes() == npz_like("NAIP_6_0011")
    rows = {r["key"]: r for r in read_csv(out / "manifest.csv")}
    row = rows["NAIP_6_001/npz/NAIP_6_001_0.npz"]
    assert row["md5"] == hashlib.md5(npz_like("NAIP_6_0010")).hexdigest()
    # The manifest names the upstream the loopback stands in for (params.yaml), never a loopback port.
    upstream_base = load_params(REPO / "params.yaml")["endpoints"]["coasttrain_base"]
    assert row["url"] == f"{upstream_base}NAIP_6_001.zip#npz/NAIP_6_001_0.npz"
    archives = {r["key"]: r for r in read_csv(out / "archives.csv")}
    zip_path = upstream / "http/coasttrain/NAIP_6_001.zip"
    assert archives["NAIP_6_001.zip"]["md5"] == hashlib.md5(zip_path.read_bytes()).hexdigest()
    assert archives["NAIP_6_001.zip"]["size"] == str(zip_path.stat().st_size)
    assert (report.downloaded, report.extracted) == (2, 8)
    assert list(scratch.iterdir()) == []  # zips are deleted after extraction
    # Each zip was checked against its published md5, and its members inherit that.
    assert {r["verified"] for r in rows.values()} == {"md5"}
    assert {r["verified"] for r in archives.values()} == {"md5"}


def test_second_run_downloads_nothing(lb, params, tmp_path):
    out, scratch = tmp_path / "raw/coasttrain", tmp_path / "scratch"
    fetch("coasttrain", params, out, scratch)
    before = {name: (out / name).read_bytes() for name in ("manifest.csv", "archives.csv")}
    report = fetch("coasttrain", params, out, scratch)
    assert (report.downloaded, report.bytes_downloaded, report.unchanged) == (0, 0, 2)
    assert {name: (out / name).read_bytes() for name in before} == before


def test_changed_zip_is_re_extracted_and_stale_members_go(lb, params, tmp_path, upstream):
    out, scratch = tmp_path / "raw/coasttrain", tmp_path / "scratch"
    fetch("coasttrain", params, out, scratch)
    params["endpoints"]["known_md5"]["coasttrain/NAIP_6_001.zip"] = publish(
        upstream, "NAIP_6_001", record_members("NAIP_6_001", n=2)
    )
    report = fetch("coasttrain", params, out, scratch)
    assert (report.downloaded, report.unchanged) == (1, 1)
    assert not (out / "NAIP_6_001/npz/NAIP_6_001_2.npz").exists()
    assert [r["key"] for r in read_csv(out / "manifest.csv")].count("NAIP_6_001/npz/NAIP_6_001_2.npz") == 0


def test_record_dropped_from_params_is_removed(lb, params, tmp_path):
    out, scratch = tmp_path / "raw/coasttrain", tmp_path / "scratch"
    fetch("coasttrain", params, out, scratch)
    params["sources"]["coasttrain"]["records"] = ["NAIP_6_001"]
    report = fetch("coasttrain", params, out, scratch)
    assert not (out / "Sentinel2_4_001").exists() and report.removed == 4
    assert [r["key"] for r in read_csv(out / "archives.csv")] == ["NAIP_6_001.zip"]


def test_dropped_connection_resumes_to_the_published_md5(lb, params, tmp_path):
    fault = lb.faults.add("http", "/coasttrain/NAIP_6_001.zip", kind="drop", after_bytes=4096, times=2)
    out = tmp_path / "raw/coasttrain"
    report = fetch("coasttrain", params, out, tmp_path / "scratch")
    assert fault.hits == 2  # HEAD, then the GET that was cut
    assert (out / "NAIP_6_001/npz/NAIP_6_001_2.npz").read_bytes() == npz_like("NAIP_6_0012")
    zips = sum(p.stat().st_size for p in (tmp_path / "upstream/http/coasttrain").iterdir())
    assert report.bytes_downloaded < zips + 1024  # resumed, not restarted


def test_500_then_200_is_retried(lb, params, tmp_path):
    fault = lb.faults.add("http", "/coasttrain/Sentinel2_4_001.zip", kind="status", status=500, times=2)
    out = tmp_path / "raw/coasttrain"
    fetch("coasttrain", params, out, tmp_path / "scratch")
    assert fault.hits == 2 and (out / "Sentinel2_4_001/Sentinel2_4_001.csv").exists()


def test_wrong_known_md5_fails_naming_the_url_and_leaves_nothing(lb, params, tmp_path):
    params["endpoints"]["known_md5"]["coasttrain/NAIP_6_001.zip"] = "2" * 32
    out, scratch = tmp_path / "raw/coasttrain", tmp_path / "scratch"
    with pytest.raises(ChecksumMismatch) as err:
        fetch("coasttrain", params, out, scratch)
    assert f"{lb.http_base}/coasttrain/NAIP_6_001.zip" in str(err.value) and "2" * 32 in str(err.value)
    assert not (out / "NAIP_6_001").exists()
    assert list(scratch.iterdir()) == []


def test_zip_with_parent_member_is_refused_and_nothing_extracted(lb, params, tmp_path, upstream):
    members = record_members("NAIP_6_001")
    members["../escape.txt"] = b"outside"
    params["endpoints"]["known_md5"]["coasttrain/NAIP_6_001.zip"] = publish(upstream, "NAIP_6_001", members)
    out = tmp_path / "raw/coasttrain"
    with pytest.raises(UnsafeArchiveError) as err:
        fetch("coasttrain", params, out, tmp_path / "scratch")
    assert "'../escape.txt'" in str(err.value)
    assert not (out / "NAIP_6_001").exists() and not (tmp_path / "raw/escape.txt").exists()
    assert [p.name for p in out.iterdir()] == []  # no half-extracted temp folder either


def test_cli_exit_2_on_unsafe_zip(lb, params, run_stage, tmp_path, upstream):
    members = record_members("Sentinel2_4_001")
    members["/abs/evil.npz"] = b"x"
    params["endpoints"]["known_md5"] = {}
    publish(upstream, "Sentinel2_4_001", members)
    proc = run_stage(
        lb,
        params,
        "stages.fetch",
        "coasttrain",
        "--out",
        str(tmp_path / "raw"),
        "--scratch",
        str(tmp_path / "scratch"),
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: ")
        and "Sentinel2_4_001.zip: member '/abs/evil.npz' refused: absolute path" in last
    )


def test_unsafe_zip_error_names_the_url_not_the_scratch_copy(lb, params, tmp_path, upstream):
    members = record_members("NAIP_6_001")
    members["npz"] = b"a file where the zip also has a folder"
    params["endpoints"]["known_md5"]["coasttrain/NAIP_6_001.zip"] = publish(upstream, "NAIP_6_001", members)
    scratch = tmp_path / "scratch"
    with pytest.raises(UnsafeArchiveError) as err:
        fetch("coasttrain", params, tmp_path / "raw/coasttrain", scratch)
    message = str(err.value)
    assert message.startswith(f"{lb.http_base}/coasttrain/NAIP_6_001.zip: member ")
    assert str(scratch) not in message and "makes it a folder" in message


def _no_size_and_no_md5(lb, params, record: str) -> None:
    """Upstream refuses HEAD and sends the zip without Content-Length; no md5 is published."""
    del params["endpoints"]["known_md5"][f"coasttrain/{record}.zip"]
    lb.faults.add("http", f"/coasttrain/{record}.zip", kind="status", status=405, times=None, method="HEAD")
    lb.faults.add("http", f"/coasttrain/{record}.zip", kind="no_length", times=None, method="GET")


def test_unverified_zip_is_refused_by_default(lb, params, tmp_path):
    _no_size_and_no_md5(lb, params, "NAIP_6_001")
    out = tmp_path / "raw/coasttrain"
    with pytest.raises(FetchError) as err:
        fetch("coasttrain", params, out, tmp_path / "scratch")
    message = str(err.value)
    assert f"{lb.http_base}/coasttrain/NAIP_6_001.zip" in message and "net.accept_unverified" in message
    assert not (out / "NAIP_6_001").exists() and list((tmp_path / "scratch").iterdir()) == []


def test_accepted_unverified_zip_is_marked_in_manifest_and_archives(lb, params, tmp_path):
    _no_size_and_no_md5(lb, params, "NAIP_6_001")
    params["net"]["accept_unverified"] = True
    out = tmp_path / "raw/coasttrain"
    fetch("coasttrain", params, out, tmp_path / "scratch")
    rows = read_csv(out / "manifest.csv")
    marks = {r["key"].split("/")[0]: r["verified"] for r in rows}
    assert marks == {"NAIP_6_001": "none", "Sentinel2_4_001": "md5"}
    archives = {r["key"]: r["verified"] for r in read_csv(out / "archives.csv")}
    assert archives == {"NAIP_6_001.zip": "none", "Sentinel2_4_001.zip": "md5"}
    # Refused again once accepting is switched off: the unverified copy is not silently reused.
    params["net"]["accept_unverified"] = False
    with pytest.raises(FetchError, match="net.accept_unverified"):
        fetch("coasttrain", params, out, tmp_path / "scratch")


def test_manifest_without_the_verified_column_is_upgraded_without_downloading(lb, params, tmp_path):
    out, scratch = tmp_path / "raw/coasttrain", tmp_path / "scratch"
    fetch("coasttrain", params, out, scratch)
    current = {name: (out / name).read_bytes() for name in ("manifest.csv", "archives.csv")}
    for name, data in current.items():  # the shape an older tidepool wrote
        lines = data.decode().splitlines()
        (out / name).write_text("".join(line.rsplit(",", 1)[0] + "\n" for line in lines))
    report = fetch("coasttrain", params, out, scratch)
    assert (report.downloaded, report.unchanged) == (0, 2)
    assert {name: (out / name).read_bytes() for name in current} == current
