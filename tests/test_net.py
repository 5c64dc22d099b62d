"""The transfer layer against the loopback servers: retries, resume, parallel ranges, S3, archives."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from stages.errors import ChecksumMismatch, FetchError, UnsafeArchiveError
from stages.loopback import Loopback
from stages.net import HashingReader, NetSettings, RemoteChanged, RemoteNotFound, md5_from_etag
from stages.net.archives import ArchiveLimits, extract_tar_stream, safe_extract_zip
from stages.net.http import HttpClient
from stages.net.s3 import S3Bucket

FAST = NetSettings(retries=3, backoff_seconds=0.0, timeout_seconds=20, chunk_bytes=1024)
BLOB = bytes(hashlib.sha256(str(i).encode()).digest()[i % 32] for i in range(96 * 1024))
SMALL = b"tidepool small file\n" * 10
OBJECTS = {f"net/obj-{i:02d}.bin": bytes([i]) * (3000 + i) for i in range(5)}
INAT_OBJECT = BLOB[: 40 * 1024]
SLOW = BLOB[:4096]  # at the trickle below (500 B/s) over 8 s, never within one 0.3 s window
# The shape of "a link that drops every 5 MiB and a 20 MiB file, read in 8 MiB chunks", scaled down.
TWENTY = BLOB[: 80 * 1024]
TWENTY_DROP = 20 * 1024
TWENTY_CHUNK = 32 * 1024


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture(scope="module")
def lb(tmp_path_factory: pytest.TempPathFactory):
    up = tmp_path_factory.mktemp("upstream")
    (up / "http/files").mkdir(parents=True)
    (up / "http/files/blob.bin").write_bytes(BLOB)
    (up / "http/files/small.txt").write_bytes(SMALL)
    (up / "http/files/twenty.bin").write_bytes(TWENTY)
    (up / "http/files/slow.bin").write_bytes(SLOW)
    bucket = up / "s3/coral-reef-training"
    for key, data in OBJECTS.items():
        (bucket / key).parent.mkdir(parents=True, exist_ok=True)
        (bucket / key).write_bytes(data)
    (bucket / "net/big.bin").write_bytes(BLOB)
    (bucket / "net/twenty.bin").write_bytes(TWENTY)
    (bucket / "net/slow.bin").write_bytes(SLOW)
    (up / "s3/inaturalist-datasets/2017").mkdir(parents=True)
    (up / "s3/inaturalist-datasets/2017/object.bin").write_bytes(INAT_OBJECT)
    with Loopback(upstream=up) as loop:
        yield loop


@pytest.fixture(autouse=True)
def _no_leftover_faults(lb):
    yield
    lb.faults.clear()


@pytest.fixture
def http():
    with HttpClient(FAST) as client:
        yield client


def public_bucket(lb, **kw) -> S3Bucket:
    return S3Bucket("coral-reef-training", FAST, endpoint_url=lb.s3_endpoint, **kw)


# -- HTTP ---------------------------------------------------------------------------------------


def test_download_verifies_and_places_file(lb, http, tmp_path):
    got = http.download(
        f"{lb.http_base}/files/blob.bin",
        tmp_path / "out/blob.bin",
        tmp_path / "scratch",
        expected_size=len(BLOB),
        expected_md5=md5(BLOB),
    )
    assert (tmp_path / "out/blob.bin").read_bytes() == BLOB
    assert got.md5 == md5(BLOB) and got.size == len(BLOB) and got.transferred == len(BLOB)
    assert got.etag == md5(BLOB)  # the loopback's ETag is the quoted md5; stored without quotes
    assert list((tmp_path / "scratch").iterdir()) == []


def test_dropped_connection_resumes_with_range(lb, http, tmp_path):
    fault = lb.faults.add("http", "/files/blob.bin", kind="drop", after_bytes=8192, times=1)
    got = http.download(
        f"{lb.http_base}/files/blob.bin", tmp_path / "blob.bin", tmp_path / "scratch", expected_md5=md5(BLOB)
    )
    assert fault.hits == 1
    assert got.md5 == md5(BLOB)
    # The retry asked only for the missing tail: what crossed the wire is one file plus the
    # bytes cut off in the last unfinished chunk, not two files.
    assert got.transferred < len(BLOB) + FAST.chunk_bytes


def test_500_then_200_is_retried(lb, http, tmp_path):
    fault = lb.faults.add("http", "/files/small.txt", kind="status", status=500, times=2)
    got = http.download(f"{lb.http_base}/files/small.txt", tmp_path / "small.txt", tmp_path / "scratch")
    assert fault.hits == 2  # the HEAD and the first GET failed, the retries succeeded
    assert got.md5 == md5(SMALL)


def test_persistent_5xx_gives_one_fetch_error_after_the_retries(lb, http, tmp_path):
    fault = lb.faults.add("http", "/files/small.txt", kind="status", status=503, times=None)
    url = f"{lb.http_base}/files/small.txt"
    with pytest.raises(FetchError) as err:
        http.download(url, tmp_path / "small.txt", tmp_path / "scratch")
    assert fault.hits == FAST.retries + 1
    assert url in str(err.value) and "503" in str(err.value) and "gave up after 3 retries" in str(err.value)
    assert not (tmp_path / "small.txt").exists()


# A 403 to HEAD is tolerated (presigned storage URLs refuse HEAD), so the GET meets it too.
@pytest.mark.parametrize(
    ("status", "words", "requests"),
    [(404, "no such file", 1), (403, "access denied", 2), (410, "HTTP 410", 1)],
)
def test_other_4xx_fail_at_once(lb, http, tmp_path, status, words, requests):
    fault = lb.faults.add("http", "/files/small.txt", kind="status", status=status, times=None)
    with pytest.raises(FetchError) as err:
        http.download(f"{lb.http_base}/files/small.txt", tmp_path / "small.txt", tmp_path / "scratch")
    assert fault.hits == requests  # no retries
    assert words in str(err.value) and "/files/small.txt" in str(err.value)
    if status in (404, 410):
        assert isinstance(err.value, RemoteNotFound)


def test_checksum_mismatch_names_url_and_leaves_nothing(lb, http, tmp_path):
    url = f"{lb.http_base}/files/blob.bin"
    with pytest.raises(ChecksumMismatch) as err:
        http.download(url, tmp_path / "blob.bin", tmp_path / "scratch", expected_md5="0" * 32)
    message = str(err.value)
    assert url in message and "0" * 32 in message and md5(BLOB) in message
    assert not (tmp_path / "blob.bin").exists()
    assert list((tmp_path / "scratch").iterdir()) == []


def interrupt(lb, path: str, after_bytes: int, drops: int):
    """Faults that cut the next `drops` requests after `after_bytes`, then fail every one after:
    a download that makes some progress and then gives up, like a run killed halfway."""
    return [
        lb.faults.add("http", path, kind="drop", after_bytes=after_bytes, times=drops),
        lb.faults.add("http", path, kind="status", status=500, times=None),
    ]


def test_interrupted_download_resumes_in_the_next_run(lb, tmp_path):
    url = f"{lb.http_base}/files/blob.bin"
    faults = interrupt(lb, "/files/blob.bin", after_bytes=20_000, drops=2)  # the HEAD and one GET
    with HttpClient(NetSettings(retries=2, backoff_seconds=0, chunk_bytes=1024)) as once:
        with pytest.raises(FetchError, match="HTTP 500"):
            once.download(url, tmp_path / "blob.bin", tmp_path / "scratch")
    for fault in faults:
        lb.faults.remove(fault)
    partial = (tmp_path / "scratch/blob.bin.part").stat().st_size
    assert 0 < partial < len(BLOB) and not (tmp_path / "blob.bin").exists()
    with HttpClient(FAST) as again:
        got = again.download(url, tmp_path / "blob.bin", tmp_path / "scratch", expected_md5=md5(BLOB))
    assert got.transferred == len(BLOB) - partial
    assert (tmp_path / "blob.bin").read_bytes() == BLOB


def test_changed_upstream_discards_the_stale_part(lb, http, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "blob.bin.part").write_bytes(b"x" * 5000)
    (scratch / "blob.bin.part.json").write_text(
        json.dumps({"mode": "single", "size": len(BLOB), "etag": "old"})
    )
    got = http.download(
        f"{lb.http_base}/files/blob.bin", tmp_path / "blob.bin", scratch, expected_md5=md5(BLOB)
    )
    assert got.transferred == len(BLOB)


# -- parallel ranged download ---------------------------------------------------------------


def test_parallel_segments_resume_after_a_drop(lb, http, tmp_path):
    fault = lb.faults.add("http", "/files/blob.bin", kind="drop", after_bytes=3000, times=2)
    got = http.download(
        f"{lb.http_base}/files/blob.bin",
        tmp_path / "blob.bin",
        tmp_path / "scratch",
        expected_md5=md5(BLOB),
        connections=8,
    )
    # HEAD is the first request the fault meets (no body to cut); a segment GET is the second.
    assert fault.hits == 2
    assert got.md5 == md5(BLOB)
    assert (tmp_path / "blob.bin").read_bytes() == BLOB
    assert list((tmp_path / "scratch").iterdir()) == []


def test_parallel_download_resumes_segments_across_runs(lb, tmp_path):
    url = f"{lb.http_base}/files/blob.bin"
    scratch = tmp_path / "scratch"
    faults = interrupt(lb, "/files/blob.bin", after_bytes=2500, drops=5)  # the HEAD and 4 segments
    with HttpClient(NetSettings(retries=1, backoff_seconds=0, chunk_bytes=1024)) as once:
        with pytest.raises(FetchError):
            once.download(url, tmp_path / "blob.bin", scratch, connections=4)
    for fault in faults:
        lb.faults.remove(fault)
    state = json.loads((scratch / "blob.bin.part.json").read_text())
    assert state["mode"] == "segments" and len(state["segments"]) == 4
    done_before = sum(pos - start for start, _end, pos in state["segments"])
    assert 0 < done_before < len(BLOB)
    assert (scratch / "blob.bin.part").stat().st_size == len(BLOB)  # preallocated
    with HttpClient(FAST) as again:
        got = again.download(url, tmp_path / "blob.bin", scratch, expected_md5=md5(BLOB), connections=4)
    assert got.transferred == len(BLOB) - done_before
    assert got.md5 == md5(BLOB)


def test_small_file_uses_one_connection(lb, http, tmp_path):
    got = http.download(
        f"{lb.http_base}/files/small.txt", tmp_path / "small.txt", tmp_path / "scratch", connections=16
    )
    assert got.md5 == md5(SMALL)
    # What the server saw: one HEAD and one whole-file GET, over one (kept-alive) connection.
    seen = lb.faults.requests("http", "/files/small.txt")
    assert [(r.method, r.range) for r in seen] == [("HEAD", None), ("GET", None)]
    assert len({r.peer for r in seen}) == 1


def test_parallel_download_opens_the_connections_asked_for(lb, http, tmp_path):
    # The counterpart of the test above: the server-side count does see several connections.
    got = http.download(
        f"{lb.http_base}/files/blob.bin", tmp_path / "blob.bin", tmp_path / "scratch", connections=4
    )
    assert got.md5 == md5(BLOB)
    gets = lb.faults.requests("http", "/files/blob.bin", method="GET")
    assert len(gets) == 4 and all(r.range for r in gets)
    assert len({r.peer for r in gets}) == 4


class _NoRangeHandler(BaseHTTPRequestHandler):
    """A server that ignores Range (many do): always 200 with the whole body."""

    def do_HEAD(self):  # noqa: N802 - stdlib name
        self.send_response(200)
        self.send_header("Content-Length", str(len(BLOB)))
        self.end_headers()

    def do_GET(self):  # noqa: N802 - stdlib name
        self.do_HEAD()
        self.wfile.write(BLOB)

    def log_message(self, *args):
        pass


def test_parallel_falls_back_to_one_connection_when_range_is_ignored(http, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoRangeHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/blob.bin"
        got = http.download(
            url, tmp_path / "blob.bin", tmp_path / "scratch", expected_md5=md5(BLOB), connections=8
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert got.md5 == md5(BLOB) and (tmp_path / "blob.bin").read_bytes() == BLOB


# -- S3 -----------------------------------------------------------------------------------------


def test_s3_listing_follows_pagination(lb):
    objects = public_bucket(lb).list("net/obj-", page_size=2)
    assert [o.key for o in objects] == sorted(OBJECTS)
    assert [o.size for o in objects] == [len(OBJECTS[k]) for k in sorted(OBJECTS)]
    assert all(o.etag == md5(OBJECTS[o.key]) for o in objects)


def test_s3_listing_retries_a_500(lb):
    fault = lb.faults.add("s3", "/coral-reef-training", kind="status", status=500, times=1)
    assert len(public_bucket(lb).list("net/obj-")) == len(OBJECTS)
    assert fault.hits == 1


def test_s3_download_resumes_after_drop_and_checks_etag_md5(lb, tmp_path):
    bucket = public_bucket(lb)
    [obj] = bucket.list("net/big.bin")
    fault = lb.faults.add("s3", "/coral-reef-training/net/big.bin", kind="drop", after_bytes=10_000, times=1)
    got = bucket.download(obj, tmp_path / "big.bin", tmp_path / "scratch")
    assert fault.hits == 1
    assert got.md5 == md5(BLOB) and (tmp_path / "big.bin").read_bytes() == BLOB
    assert got.transferred < len(BLOB) + FAST.chunk_bytes


def test_s3_download_checksum_mismatch(lb, tmp_path):
    bucket = public_bucket(lb)
    [obj] = bucket.list("net/big.bin")
    with pytest.raises(ChecksumMismatch) as err:
        bucket.download(obj, tmp_path / "big.bin", tmp_path / "scratch", expected_md5="f" * 32)
    assert "s3://coral-reef-training/net/big.bin" in str(err.value)
    assert not (tmp_path / "big.bin").exists() and list((tmp_path / "scratch").iterdir()) == []


def test_s3_missing_object_is_remote_not_found(lb, aws_test_credentials):
    signed = public_bucket(lb, anonymous=False)
    with pytest.raises(RemoteNotFound) as err:
        signed.head("net/nope.bin")
    assert "s3://coral-reef-training/net/nope.bin" in str(err.value)


def test_requester_pays_without_payer_says_so(lb, aws_test_credentials):
    unsigned = S3Bucket("inaturalist-datasets", FAST, endpoint_url=lb.s3_endpoint, anonymous=True)
    with pytest.raises(FetchError) as err:
        unsigned.head("2017/object.bin")
    assert "403" in str(err.value) and "RequestPayer=requester" in str(err.value)
    payer = S3Bucket(
        "inaturalist-datasets", FAST, endpoint_url=lb.s3_endpoint, anonymous=False, requester_pays=True
    )
    assert payer.head("2017/object.bin").size == len(INAT_OBJECT)


def test_object_stream_reopens_at_its_offset(lb, aws_test_credentials):
    bucket = S3Bucket(
        "inaturalist-datasets", FAST, endpoint_url=lb.s3_endpoint, anonymous=False, requester_pays=True
    )
    obj = bucket.head("2017/object.bin")
    fault = lb.faults.add(
        "s3", "/inaturalist-datasets/2017/object.bin", kind="drop", after_bytes=7000, times=2
    )
    stream = bucket.open_stream(obj)
    reader = HashingReader(io.BufferedReader(stream, buffer_size=1024))
    reader.drain(4096)
    assert fault.hits == 2 and stream.reopened == 2
    assert reader.count == len(INAT_OBJECT) and reader.hexdigest() == md5(INAT_OBJECT)


def test_md5_from_etag_only_for_plain_md5():
    assert md5_from_etag('"' + "a" * 32 + '"') == "a" * 32
    assert md5_from_etag('"' + "a" * 32 + '-12"') is None  # multipart
    assert md5_from_etag('W/"' + "a" * 32 + '"') is None


# -- hardening: changed objects, slow servers, resume, the retry budget, unverified files ------


def slow(**kw) -> NetSettings:
    """FAST with the given overrides (a short throughput window, a deadline, a small budget...)."""
    return NetSettings(**{**FAST.__dict__, **kw})


def publish_s3(lb, key: str, data: bytes) -> None:
    path = lb.upstream / "s3/coral-reef-training" / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    lb.reseed()


def test_s3_object_that_grew_since_listing_is_one_clear_error(lb, tmp_path):
    publish_s3(lb, "net/grows.bin", BLOB[:30_000])
    bucket = public_bucket(lb)
    [obj] = bucket.list("net/grows.bin")
    publish_s3(lb, "net/grows.bin", BLOB[:30_000] + b"appended later")
    # A guard: were the ETag not pinned, the 6th GET would get a 403 instead of looping for ever.
    lb.faults.add("s3", "/net/grows.bin", kind="status", status=403, skip=5, times=None, method="GET")
    with pytest.raises(RemoteChanged) as err:
        bucket.download(obj, tmp_path / "grows.bin", tmp_path / "scratch")
    assert "s3://coral-reef-training/net/grows.bin" in str(err.value)
    assert "412" in str(err.value) and "changed upstream" in str(err.value)
    gets = lb.faults.requests("s3", "/net/grows.bin", method="GET")
    assert len(gets) == 1 and gets[0].if_match == f'"{obj.etag}"'
    assert not (tmp_path / "grows.bin").exists() and list((tmp_path / "scratch").iterdir()) == []


def test_s3_changed_object_is_caught_when_the_server_ignores_if_match(lb, tmp_path):
    publish_s3(lb, "net/ignored.bin", BLOB[:30_000])
    bucket = public_bucket(lb)
    [obj] = bucket.list("net/ignored.bin")
    publish_s3(lb, "net/ignored.bin", BLOB[:40_000])
    lb.faults.add("s3", "/net/ignored.bin", kind="pass", times=5, ignores_conditions=True)
    # A guard, as above: without the ETag check the 6th GET gets a 403 instead of looping.
    lb.faults.add("s3", "/net/ignored.bin", kind="status", status=403, times=None)
    with pytest.raises(RemoteChanged, match="not the listed"):
        bucket.download(obj, tmp_path / "ignored.bin", tmp_path / "scratch")
    assert len(lb.faults.requests("s3", "/net/ignored.bin", method="GET")) == 1


def test_object_stream_resume_meets_a_changed_object(lb, aws_test_credentials):
    publish_s3(lb, "net/stream.bin", BLOB[:30_000])
    bucket = public_bucket(lb)
    [obj] = bucket.list("net/stream.bin")
    lb.faults.add("s3", "/net/stream.bin", kind="drop", after_bytes=5000, times=1)
    stream = bucket.open_stream(obj)
    assert len(stream.read(1000)) > 0  # the first GET is streaming the listed version
    publish_s3(lb, "net/stream.bin", BLOB[1:30_001])  # same size, other bytes
    with pytest.raises(RemoteChanged, match="412"):
        while stream.read(4096):
            pass
    gets = lb.faults.requests("s3", "/net/stream.bin", method="GET")
    assert len(gets) == 2 and gets[1].range and gets[1].if_match == f'"{obj.etag}"'


@pytest.mark.parametrize("ignores_if_match", [False, True])
def test_http_file_that_changed_since_head_is_one_clear_error(lb, http, tmp_path, ignores_if_match):
    lb.faults.add(
        "http", "/files/blob.bin", kind="grow", grow_bytes=500, times=None, method="GET",
        ignores_conditions=ignores_if_match,
    )
    url = f"{lb.http_base}/files/blob.bin"
    with pytest.raises(RemoteChanged) as err:
        http.download(url, tmp_path / "blob.bin", tmp_path / "scratch")
    assert url in str(err.value) and "changed upstream" in str(err.value)
    gets = lb.faults.requests("http", "/files/blob.bin", method="GET")
    assert len(gets) == 1 and gets[0].if_match == f'"{md5(BLOB)}"'
    assert not (tmp_path / "blob.bin").exists() and list((tmp_path / "scratch").iterdir()) == []


def test_resumed_http_get_is_pinned_to_the_etag(lb, http, tmp_path):
    lb.faults.add("http", "/files/blob.bin", kind="drop", after_bytes=8192, times=1, method="GET")
    http.download(f"{lb.http_base}/files/blob.bin", tmp_path / "blob.bin", tmp_path / "scratch")
    first, resumed = lb.faults.requests("http", "/files/blob.bin", method="GET")
    assert first.range is None and resumed.range == "bytes=8192-"
    assert first.if_match == resumed.if_match == f'"{md5(BLOB)}"'


def _download(lb, transport: str, settings: NetSettings, tmp_path: Path, name: str):
    if transport == "http":
        with HttpClient(settings) as client:
            return client.download(f"{lb.http_base}/files/{name}", tmp_path / name, tmp_path / "scratch")
    bucket = S3Bucket("coral-reef-training", settings, endpoint_url=lb.s3_endpoint)
    [obj] = bucket.list(f"net/{name}")
    return bucket.download(obj, tmp_path / name, tmp_path / "scratch")


def _path(transport: str, name: str) -> str:
    return f"/files/{name}" if transport == "http" else f"/coral-reef-training/net/{name}"


@pytest.mark.parametrize("transport", ["http", "s3"])
def test_trickling_server_fails_the_throughput_floor(lb, tmp_path, transport):
    lb.faults.add(
        "http" if transport == "http" else "s3", _path(transport, "slow.bin"), kind="trickle",
        trickle_bytes=10, interval_seconds=0.02, times=None, method="GET",
    )
    settings = slow(retries=1, min_bytes_per_window=4000, throughput_window_seconds=0.3)
    with pytest.raises(FetchError) as err:
        _download(lb, transport, settings, tmp_path, "slow.bin")
    message = str(err.value)
    assert "slow.bin" in message.split(" failed: ")[0]  # the URL, not a scratch path
    assert "too slow" in message and "net.min_bytes_per_window=4000" in message
    # Each too-slow connection counts as a retry without progress, bytes or not.
    assert len(lb.faults.requests(None, _path(transport, "slow.bin"), method="GET")) == 2
    assert not (tmp_path / "slow.bin").exists()


@pytest.mark.parametrize("transport", ["http", "s3"])
def test_file_deadline_ends_a_transfer_that_keeps_above_the_floor(lb, tmp_path, transport):
    # 80 KiB at 2 KiB per 20 ms takes at least 0.8 s: the 0.4 s deadline comes first.
    lb.faults.add(
        "http" if transport == "http" else "s3", _path(transport, "twenty.bin"), kind="trickle",
        trickle_bytes=2048, interval_seconds=0.02, times=None, method="GET",
    )
    settings = slow(min_bytes_per_window=0, file_deadline_seconds=0.4)
    with pytest.raises(FetchError) as err:
        _download(lb, transport, settings, tmp_path, "twenty.bin")
    assert "twenty.bin" in str(err.value) and "net.file_deadline_seconds=0.4" in str(err.value)
    assert not (tmp_path / "twenty.bin").exists()
    assert 0 < (tmp_path / "scratch/twenty.bin.part").stat().st_size < len(TWENTY)  # kept to resume


@pytest.mark.parametrize("transport", ["http", "s3"])
def test_link_that_drops_every_quarter_still_finishes(lb, tmp_path, transport):
    lb.faults.add(
        "http" if transport == "http" else "s3", _path(transport, "twenty.bin"), kind="drop",
        after_bytes=TWENTY_DROP, times=None, method="GET",
    )
    got = _download(lb, transport, slow(chunk_bytes=TWENTY_CHUNK), tmp_path, "twenty.bin")
    assert got.md5 == md5(TWENTY) and (tmp_path / "twenty.bin").read_bytes() == TWENTY
    # Every byte that arrived was kept: four connections, and no byte crossed the wire twice.
    assert len(lb.faults.requests(None, _path(transport, "twenty.bin"), method="GET")) == 4
    assert got.transferred == len(TWENTY)


@pytest.mark.parametrize("transport", ["http", "s3"])
def test_drop_after_100_bytes_on_every_request_ends_with_a_clear_error(lb, tmp_path, transport):
    name = "big.bin" if transport == "s3" else "blob.bin"
    lb.faults.add(
        "http" if transport == "http" else "s3", _path(transport, name),
        kind="drop", after_bytes=100, times=None, method="GET",
    )
    with pytest.raises(FetchError) as err:
        _download(lb, transport, slow(retries_per_file=12), tmp_path, name)
    assert name in str(err.value) and "net.retries_per_file=12" in str(err.value)
    # Progress every time (100 bytes), so only the per-file cap ends it: 1 + 12 requests.
    assert len(lb.faults.requests(None, _path(transport, name), method="GET")) == 13
    assert (tmp_path / "scratch" / f"{name}.part").stat().st_size == 1300  # every byte kept


def _no_size_upstream(lb, after_bytes: int):
    lb.faults.add("http", "/files/blob.bin", kind="status", status=405, times=None, method="HEAD")
    lb.faults.add("http", "/files/blob.bin", kind="no_length", after_bytes=after_bytes, times=None,
                  method="GET")


def test_no_size_and_no_checksum_is_refused_naming_the_url(lb, http, tmp_path):
    _no_size_upstream(lb, after_bytes=len(BLOB) // 2)  # and the connection closes halfway
    url = f"{lb.http_base}/files/blob.bin"
    with pytest.raises(FetchError) as err:
        http.download(url, tmp_path / "blob.bin", tmp_path / "scratch")
    message = str(err.value)
    assert message.startswith(f"fetching {url} failed:") and "net.accept_unverified" in message
    assert str(tmp_path / "scratch") not in message
    assert not (tmp_path / "blob.bin").exists() and list((tmp_path / "scratch").iterdir()) == []


def test_accepted_unverified_download_says_so(lb, tmp_path):
    _no_size_upstream(lb, after_bytes=len(BLOB) // 2)
    with HttpClient(slow(accept_unverified=True)) as client:
        got = client.download(f"{lb.http_base}/files/blob.bin", tmp_path / "blob.bin", tmp_path / "scratch")
    assert got.verified == "none" and got.size == len(BLOB) // 2  # what "unverified" means


def test_no_size_but_a_known_md5_catches_the_truncation(lb, http, tmp_path):
    _no_size_upstream(lb, after_bytes=len(BLOB) // 2)
    with pytest.raises(ChecksumMismatch):
        http.download(
            f"{lb.http_base}/files/blob.bin",
            tmp_path / "blob.bin",
            tmp_path / "scratch",
            expected_md5=md5(BLOB),
        )


def test_head_refused_takes_the_size_from_the_get(lb, http, tmp_path):
    lb.faults.add("http", "/files/blob.bin", kind="status", status=405, times=None, method="HEAD")
    lb.faults.add("http", "/files/blob.bin", kind="drop", after_bytes=10_000, times=1, method="GET")
    got = http.download(f"{lb.http_base}/files/blob.bin", tmp_path / "blob.bin", tmp_path / "scratch")
    assert got.verified == "size" and got.md5 == md5(BLOB)
    first, resumed = lb.faults.requests("http", "/files/blob.bin", method="GET")
    # The ETag learnt from the first GET pins the resume.
    assert first.if_match is None and resumed.if_match == f'"{md5(BLOB)}"'


# -- archives -----------------------------------------------------------------------------------

LIMITS = ArchiveLimits(max_member_bytes=1 << 22, max_compression_ratio=50)


def make_zip(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


def test_zip_extracts_into_place_with_md5s(tmp_path):
    archive = make_zip(tmp_path / "ok.zip", {"rec/a.csv": b"a,b\n", "rec/npz/x.npz": b"xx", "top.txt": b"t"})
    files = safe_extract_zip(archive, tmp_path / "out", LIMITS)
    assert [f.name for f in files] == ["rec/a.csv", "rec/npz/x.npz", "top.txt"]
    assert files[0].md5 == md5(b"a,b\n") and files[0].size == 4
    assert (tmp_path / "out/rec/npz/x.npz").read_bytes() == b"xx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.zip", "out"]  # no temp dir left


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("../evil.txt", "'..'"),
        ("a/../../evil.txt", "'..'"),
        ("/etc/evil", "absolute"),
        ("a\\..\\evil", "backslash"),
        ("C:/evil", "drive"),
    ],
)
def test_zip_with_escaping_member_is_refused_and_nothing_extracted(tmp_path, name, problem):
    archive = make_zip(tmp_path / "bad.zip", {"fine.txt": b"ok", name: b"evil"})
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "previous.txt").write_text("kept")
    with pytest.raises(UnsafeArchiveError) as err:
        safe_extract_zip(archive, dest, LIMITS)
    assert problem in str(err.value) and str(archive) in str(err.value)
    assert sorted(p.name for p in dest.iterdir()) == ["previous.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip", "out"]  # no temp dir left


def test_zip_symlink_member_refused(tmp_path):
    archive = make_zip(tmp_path / "link.zip", {"fine.txt": b"ok"}, symlink="link")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        safe_extract_zip(archive, tmp_path / "out", LIMITS)
    assert not (tmp_path / "out").exists()


def test_zip_bomb_ratio_and_size_refused(tmp_path):
    bomb = make_zip(tmp_path / "bomb.zip", {"zeros.bin": bytes(2 << 20)})
    with pytest.raises(UnsafeArchiveError, match="compression ratio"):
        safe_extract_zip(bomb, tmp_path / "out", LIMITS)
    big = make_zip(tmp_path / "big.zip", {"big.bin": os.urandom(64 * 1024)})
    with pytest.raises(UnsafeArchiveError, match="max_member_bytes"):
        safe_extract_zip(
            big, tmp_path / "out", ArchiveLimits(max_member_bytes=1000, max_compression_ratio=50)
        )
    assert not (tmp_path / "out").exists()


def test_zip_merge_mode_replaces_only_its_top_level_entries(tmp_path):
    dest = tmp_path / "out"
    (dest / "2024_dataset").mkdir(parents=True)
    (dest / "2024_dataset/stale.jpg").write_bytes(b"old")
    (dest / "annotations.csv").write_text("keep")
    archive = make_zip(tmp_path / "images.zip", {"2024_dataset/a.jpg": b"A"})
    safe_extract_zip(archive, dest, LIMITS, replace=False)
    assert sorted(p.name for p in (dest / "2024_dataset").iterdir()) == ["a.jpg"]
    assert (dest / "annotations.csv").read_text() == "keep"


def make_tar_gz(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def test_tar_stream_keeps_only_filtered_regular_files(tmp_path):
    data = make_tar_gz(
        [("imgs/Mollusca/a b/1.jpg", b"1"), ("imgs/Aves/x/2.jpg", b"2"), ("./imgs/Mollusca/c/3.jpg", b"3")]
    )
    files = extract_tar_stream(
        io.BytesIO(data), tmp_path, lambda n: n.split("/")[1] == "Mollusca", LIMITS, "t.tgz"
    )
    assert [f.name for f in files] == ["imgs/Mollusca/a b/1.jpg", "imgs/Mollusca/c/3.jpg"]
    assert not (tmp_path / "imgs/Aves").exists()


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "device", "dotdot", "absolute"])
def test_tar_stream_refuses_hostile_members(tmp_path, kind):
    info = tarfile.TarInfo("imgs/Mollusca/evil")
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "imgs/Mollusca/a.jpg"
    elif kind == "device":
        info.type = tarfile.CHRTYPE
    elif kind == "dotdot":
        info.name = "imgs/../../evil"
    else:
        info.name = "/tmp/evil"
    data = make_tar_gz([("imgs/Mollusca/a.jpg", b"a"), info])
    with pytest.raises(UnsafeArchiveError):
        extract_tar_stream(io.BytesIO(data), tmp_path / "stage", lambda n: True, LIMITS, "t.tgz")


def test_resume_in_a_later_run_is_pinned_to_the_etag_the_first_get_gave(lb, tmp_path):
    url = f"{lb.http_base}/files/blob.bin"
    head_refused = lb.faults.add(
        "http", "/files/blob.bin", kind="status", status=405, times=None, method="HEAD"
    )
    cut = interrupt(lb, "/files/blob.bin", after_bytes=10_000, drops=1)
    with HttpClient(slow(retries=0)) as once, pytest.raises(FetchError):
        once.download(url, tmp_path / "blob.bin", tmp_path / "scratch")
    for fault in cut:
        lb.faults.remove(fault)
    assert (tmp_path / "scratch/blob.bin.part").stat().st_size == 10_000
    lb.faults.add("http", "/files/blob.bin", kind="grow", grow_bytes=100, times=None, method="GET")
    with HttpClient(FAST) as again, pytest.raises(RemoteChanged, match="412"):
        again.download(url, tmp_path / "blob.bin", tmp_path / "scratch")
    resumed = lb.faults.requests("http", "/files/blob.bin", method="GET")[-1]
    assert resumed.range == "bytes=10000-" and resumed.if_match == f'"{md5(BLOB)}"'
    assert head_refused.hits == 2 and not (tmp_path / "scratch/blob.bin.part").exists()


# -- archives: bombs of small members, tar.gz ratios, totals, clashing and duplicate names --------

GENEROUS = ArchiveLimits(max_member_bytes=1 << 30, max_compression_ratio=50, max_extract_bytes=1 << 30)


def test_zip_of_small_bombs_is_refused_member_by_member(tmp_path):
    # Each member is under 1 MiB, and together they inflate ~1000 times.
    archive = make_zip(tmp_path / "bombs.zip", {f"part-{i}.bin": bytes(600_000) for i in range(4)})
    assert archive.stat().st_size < 5000
    with pytest.raises(UnsafeArchiveError) as err:
        safe_extract_zip(archive, tmp_path / "out", GENEROUS)
    assert "'part-0.bin'" in str(err.value) and "max_compression_ratio=50" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_small_compressible_members_still_extract(tmp_path):
    # A tiny mask of zeros or a header-only CSV is not a bomb: its ratio counts its zip headers.
    members = {"mask.bin": bytes(2000), "empty.csv": b"", "header.csv": b"a,b\n"}
    files = safe_extract_zip(make_zip(tmp_path / "ok.zip", members), tmp_path / "out", GENEROUS)
    assert [f.name for f in files] == ["empty.csv", "header.csv", "mask.bin"]


def test_zip_total_extracted_bytes_are_bounded(tmp_path):
    archive = make_zip(tmp_path / "many.zip", {f"f{i}.bin": os.urandom(4000) for i in range(5)})
    limits = ArchiveLimits(max_member_bytes=1 << 20, max_compression_ratio=50, max_extract_bytes=10_000)
    with pytest.raises(UnsafeArchiveError) as err:
        safe_extract_zip(archive, tmp_path / "out", limits, name="https://example.org/many.zip")
    assert str(err.value).startswith("https://example.org/many.zip: member 'f2.bin' refused")
    assert "max_extract_bytes=10000" in str(err.value) and str(tmp_path) not in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("members", "refused", "words"),
    [
        ({"a": b"file", "a/b.txt": b"inside"}, "a/b.txt", "which is a file"),
        ({"a/b.txt": b"inside", "a": b"file"}, "a", "makes it a folder"),
        ({"x/one.txt": b"1", "X/ONE.txt": b"2"}, "X/ONE.txt", "duplicates member 'x/one.txt'"),
    ],
)
def test_zip_file_and_folder_of_one_name_are_refused_up_front(tmp_path, members, refused, words):
    archive = make_zip(tmp_path / "clash.zip", members)
    with pytest.raises(UnsafeArchiveError) as err:
        safe_extract_zip(archive, tmp_path / "out", LIMITS, name="https://example.org/clash.zip")
    message = str(err.value)
    assert f"member {refused!r} refused" in message and words in message
    assert message.startswith("https://example.org/clash.zip: ") and ".extract-" not in message
    assert not (tmp_path / "out").exists()


def zeros_tar_gz(name: str, size: int) -> bytes:
    """A tar.gz whose one member is `size` zero bytes: an honest header over a gzip bomb."""
    return make_tar_gz([(name, bytes(size))])


@pytest.mark.parametrize("kept", [True, False])
def test_tar_gz_bomb_under_an_honest_header_is_refused_while_streaming(tmp_path, kept):
    data = zeros_tar_gz("imgs/Mollusca/bomb.jpg", 32 << 20)
    assert len(data) < 64 << 10
    reader = HashingReader(io.BytesIO(data))
    with pytest.raises(UnsafeArchiveError) as err:
        extract_tar_stream(reader, tmp_path / "stage", lambda n: kept, GENEROUS, "s3://b/t.tar.gz")
    assert "'imgs/Mollusca/bomb.jpg'" in str(err.value) and "max_compression_ratio=50" in str(err.value)
    assert not list((tmp_path).rglob("bomb.jpg"))


def test_tar_gz_of_ordinary_members_and_many_gzip_members_streams(tmp_path):
    # pigz and appended archives give several gzip members back to back: read them all.
    first = make_tar_gz([("imgs/Mollusca/a.jpg", os.urandom(3000))])
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w") as tf:
        for name, body in (("imgs/Mollusca/a.jpg", b"A" * 10), ("imgs/Mollusca/b.jpg", os.urandom(5000))):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    raw = inner.getvalue()
    import gzip

    split = len(raw) // 2
    data = gzip.compress(raw[:split], mtime=0) + gzip.compress(raw[split:], mtime=0)
    files = extract_tar_stream(io.BytesIO(data), tmp_path / "s", lambda n: True, GENEROUS, "t.tgz")
    assert [f.name for f in files] == ["imgs/Mollusca/a.jpg", "imgs/Mollusca/b.jpg"]
    assert (tmp_path / "s/imgs/Mollusca/b.jpg").read_bytes() == raw[1536 : 1536 + 5000]
    assert len(extract_tar_stream(io.BytesIO(first), tmp_path / "t", lambda n: True, GENEROUS, "t")) == 1


def test_tar_total_extracted_bytes_are_bounded(tmp_path):
    data = make_tar_gz([(f"imgs/Mollusca/{i}.jpg", os.urandom(4000)) for i in range(4)])
    limits = ArchiveLimits(max_member_bytes=1 << 20, max_compression_ratio=50, max_extract_bytes=10_000)
    with pytest.raises(UnsafeArchiveError, match=r"'imgs/Mollusca/2.jpg' refused: .*max_extract_bytes"):
        extract_tar_stream(io.BytesIO(data), tmp_path / "stage", lambda n: True, limits, "t.tgz")


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


@pytest.mark.parametrize(
    ("members", "refused", "words"),
    [
        ([("imgs/Mollusca/a", b"f"), ("imgs/Mollusca/a/1.jpg", b"1")], "imgs/Mollusca/a/1.jpg", "is a file"),
        ([("imgs/Mollusca/a/1.jpg", b"1"), ("imgs/Mollusca/a", b"file")], "imgs/Mollusca/a", "a folder"),
        ([("imgs/Mollusca/a", b"file"), _dir("imgs/Mollusca/a")], "imgs/Mollusca/a", "is a folder"),
        ([("imgs/Mollusca/a.jpg", b"1"), ("imgs/Mollusca/a.jpg", b"2")], "imgs/Mollusca/a.jpg", "duplicates"),
    ],
)
def test_tar_clashing_and_duplicate_members_are_refused(tmp_path, members, refused, words):
    data = make_tar_gz(members)
    with pytest.raises(UnsafeArchiveError) as err:
        extract_tar_stream(io.BytesIO(data), tmp_path / "stage", lambda n: True, LIMITS, "s3://b/t.tar.gz")
    message = str(err.value)
    assert message.startswith(f"s3://b/t.tar.gz: member {refused!r} refused") and words in message
