"""The loopback S3 and HTTP servers: real servers on 127.0.0.1, real clients (boto3, requests, dvc)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import boto3
import pytest
import requests
import yaml
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError, ResponseStreamingError

from stages.config import load_params
from stages.errors import TidepoolError
from stages.loopback import Loopback, dvc_command
from stages.loopback.http import RangeNotSatisfiable, parse_range

REPO = Path(__file__).resolve().parents[1]
ZIP_SIZE = 300_000
N_RESULTS = 23


def _blob(name: str, size: int) -> bytes:
    """Deterministic pseudo-random bytes, distinct per name."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{name}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


@pytest.fixture
def upstream(tmp_path: Path) -> Path:
    """A tiny upstream tree laid out like build/upstream (buckets, HTTP services, checksums)."""
    up = tmp_path / "upstream"
    s3 = up / "s3"
    _write(s3 / "coral-reef-training/mermaid/img-1.png", _blob("img-1", 5000))
    _write(s3 / "coral-reef-training/mermaid/img-1_annotations.csv", "id,row,col\n1,2,3\n")
    _write(s3 / "coral-reef-training/s2012/annotations.csv", "Image ID,Row,Column,Label ID\n1,2,3,4\n")
    _write(s3 / "inaturalist-datasets/2017/train_val2017.zip", _blob("inat", 20_000))
    # tidepool-dvc deliberately has no folder: the bucket must exist anyway.
    http_root = up / "http"
    _write(http_root / "coasttrain/NAIP_6_001.zip", _blob("naip", ZIP_SIZE))
    results = [{"id": f"ba-{i:03d}", "name": f"attr {i}", "link": "{{BASE}}/x"} for i in range(N_RESULTS)]
    _write(http_root / "mermaid-api/v1/benthicattributes/results.json", json.dumps(results))
    _write(http_root / "mermaid-api/v1/choices/index.json",
           json.dumps([{"name": "growthforms", "data": [{"id": "g1", "name": "Massive"}]}]))
    record_dir = http_root / "zenodo/api/records/13951614"
    link = "{{BASE}}/zenodo/api/records/13951614/files/gbif_class_mapping.csv/content"
    record = {"id": 13951614, "files": [{"key": "gbif_class_mapping.csv", "checksum": "md5:abc",
                                          "links": {"self": link}}]}
    _write(record_dir / "index.json", json.dumps(record))
    _write(record_dir / "files/gbif_class_mapping.csv/content", "class,gbif\nA,1\n")
    _write(up / "checksums.json", json.dumps({"coasttrain/NAIP_6_001.zip": "0" * 32}))
    _write(tmp_path / "secret.txt", "TOP SECRET")
    return up


@pytest.fixture
def lb(upstream: Path):
    with Loopback(upstream) as loopback:
        yield loopback


def _anon(lb: Loopback, retries: int = 0):
    return boto3.client(
        "s3", endpoint_url=lb.s3_endpoint, region_name="us-east-1",
        config=Config(signature_version=UNSIGNED, retries={"total_max_attempts": retries + 1}),
    )


def _raw_get(base: str, target: str, method: str = "GET", headers: dict | None = None):
    """A request with the target sent verbatim (requests would normalise `..` away)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request(method, target, headers=headers or {})
    resp = conn.getresponse()
    return conn, resp


# -- S3 -----------------------------------------------------------------------------------------


def test_anonymous_client_lists_and_gets_public_bucket(lb, upstream):
    s3 = _anon(lb)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="coral-reef-training")["Contents"]]
    assert keys == ["mermaid/img-1.png", "mermaid/img-1_annotations.csv", "s2012/annotations.csv"]
    body = s3.get_object(Bucket="coral-reef-training", Key="mermaid/img-1.png")["Body"].read()
    assert body == (upstream / "s3/coral-reef-training/mermaid/img-1.png").read_bytes()
    head = s3.head_object(Bucket="coral-reef-training", Key="mermaid/img-1.png")
    assert head["ETag"].strip('"') == hashlib.md5(body).hexdigest()


def test_anonymous_client_is_refused_by_private_buckets(lb):
    with pytest.raises(ClientError) as err:
        _anon(lb).list_objects_v2(Bucket="tidepool-dvc")
    assert err.value.response["Error"]["Code"] == "AccessDenied"


def test_requester_pays_refused_without_request_payer_and_allowed_with_it(lb, upstream):
    s3 = lb.s3_client()
    key = "2017/train_val2017.zip"
    for call in (
        lambda **kw: s3.get_object(Bucket="inaturalist-datasets", Key=key, **kw),
        lambda **kw: s3.list_objects_v2(Bucket="inaturalist-datasets", **kw),
    ):
        with pytest.raises(ClientError) as err:
            call()
        assert err.value.response["Error"]["Code"] == "AccessDenied"
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError) as err:
        s3.head_object(Bucket="inaturalist-datasets", Key=key)
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

    body = s3.get_object(Bucket="inaturalist-datasets", Key=key, RequestPayer="requester")["Body"].read()
    assert body == (upstream / "s3/inaturalist-datasets" / key).read_bytes()
    listed = s3.list_objects_v2(Bucket="inaturalist-datasets", RequestPayer="requester")
    assert [o["Key"] for o in listed["Contents"]] == [key]
    assert s3.get_bucket_request_payment(Bucket="inaturalist-datasets")["Payer"] == "Requester"


def test_signed_put_and_get_on_dvc_bucket(lb):
    s3 = lb.s3_client()
    assert s3.list_objects_v2(Bucket="tidepool-dvc").get("KeyCount") == 0
    s3.put_object(Bucket="tidepool-dvc", Key="store/files/md5/ab/cdef", Body=b"payload")
    assert s3.get_object(Bucket="tidepool-dvc", Key="store/files/md5/ab/cdef")["Body"].read() == b"payload"


def test_reseed_uploads_new_and_changed_objects_and_drops_removed(lb, upstream):
    bucket = upstream / "s3/coral-reef-training"
    _write(bucket / "mermaid/img-2.png", b"new image")
    _write(bucket / "s2012/annotations.csv", "Image ID,Row,Column,Label ID\n9,9,9,9\n")
    (bucket / "mermaid/img-1_annotations.csv").unlink()
    os.utime(bucket / "mermaid/img-1.png")  # touched, same bytes: not re-uploaded
    result = lb.reseed()
    assert result.uploaded == [
        "coral-reef-training/mermaid/img-2.png", "coral-reef-training/s2012/annotations.csv",
    ]
    assert result.deleted == ["coral-reef-training/mermaid/img-1_annotations.csv"]
    s3 = _anon(lb)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="coral-reef-training")["Contents"]]
    assert keys == ["mermaid/img-1.png", "mermaid/img-2.png", "s2012/annotations.csv"]
    body = s3.get_object(Bucket="coral-reef-training", Key="s2012/annotations.csv")["Body"].read()
    assert body.endswith(b"9,9,9,9\n")
    again = lb.reseed()
    assert (again.uploaded, again.deleted) == ([], [])


# -- HTTP ---------------------------------------------------------------------------------------


def test_http_range_requests(lb, upstream):
    url = lb.http_base + "/coasttrain/NAIP_6_001.zip"
    data = (upstream / "http/coasttrain/NAIP_6_001.zip").read_bytes()
    full = requests.get(url)
    assert full.status_code == 200 and full.content == data
    assert full.headers["Content-Length"] == str(ZIP_SIZE)
    etag = full.headers["ETag"]
    assert etag == f'"{hashlib.md5(data).hexdigest()}"'
    for header, (first, last) in {
        "bytes=100-199": (100, 199),
        "bytes=299000-": (299000, ZIP_SIZE - 1),
        "bytes=-500": (ZIP_SIZE - 500, ZIP_SIZE - 1),
        "bytes=299990-999999": (299990, ZIP_SIZE - 1),
    }.items():
        r = requests.get(url, headers={"Range": header})
        assert r.status_code == 206, header
        assert r.content == data[first:last + 1]
        assert r.headers["Content-Range"] == f"bytes {first}-{last}/{ZIP_SIZE}"
        assert r.headers["Content-Length"] == str(last - first + 1)
    r = requests.get(url, headers={"Range": f"bytes={ZIP_SIZE}-"})
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{ZIP_SIZE}"
    # A resume against a changed file (If-Range no longer matches) must get the whole new body.
    r = requests.get(url, headers={"Range": "bytes=100-199", "If-Range": '"stale"'})
    assert r.status_code == 200 and r.content == data
    r = requests.get(url, headers={"Range": "bytes=100-199", "If-Range": etag})
    assert r.status_code == 206


def test_http_head_and_missing(lb):
    r = requests.head(lb.http_base + "/coasttrain/NAIP_6_001.zip")
    assert r.status_code == 200 and r.content == b""
    assert r.headers["Content-Length"] == str(ZIP_SIZE) and r.headers["ETag"].startswith('"')
    assert requests.get(lb.http_base + "/coasttrain/NAIP_11_001.zip").status_code == 404
    assert requests.head(lb.http_base + "/nothing/here/").status_code == 404


TRAVERSALS = [
    "/../secret.txt",
    "/coasttrain/../../secret.txt",
    "/%2e%2e/secret.txt",
    "/coasttrain/..%2f..%2fsecret.txt",
    "/%2F..%2F..%2Fsecret.txt",
    "/coasttrain/%5c..%5c..%5csecret.txt",
    "//etc/passwd",
    "/%2Fetc%2Fpasswd",
]


def test_http_path_traversal_refused(lb):
    for target in TRAVERSALS:
        conn, resp = _raw_get(lb.http_base, target)
        body = resp.read()
        conn.close()
        assert resp.status in (400, 404), target
        assert b"TOP SECRET" not in body and b"root:" not in body, target


def test_http_pagination_walk_collects_every_result_once(lb):
    endpoint = lb.http_base + "/mermaid-api/v1/benthicattributes/"
    url = endpoint + "?limit=7"
    pages = []
    while url:
        pages.append(requests.get(url).json())
        url = pages[-1]["next"]
    seen = [r["id"] for page in pages for r in page["results"]]
    assert seen == [f"ba-{i:03d}" for i in range(N_RESULTS)]
    assert [page["count"] for page in pages] == [N_RESULTS] * 4
    assert [page["next"] for page in pages] == [
        endpoint + "?limit=7&offset=7", endpoint + "?limit=7&offset=14",
        endpoint + "?limit=7&offset=21", None,
    ]
    # As DRF does: the link back to the first page carries no offset.
    assert [page["previous"] for page in pages] == [
        None, endpoint + "?limit=7", endpoint + "?limit=7&offset=7", endpoint + "?limit=7&offset=14",
    ]
    default = requests.get(lb.http_base + "/mermaid-api/v1/benthicattributes/").json()
    assert len(default["results"]) == N_RESULTS and default["next"] is None
    capped = requests.get(lb.http_base + "/mermaid-api/v1/benthicattributes/?limit=99999&offset=1").json()
    assert capped["previous"] == lb.http_base + "/mermaid-api/v1/benthicattributes/?limit=5000"


def test_http_base_substitution_and_directory_index(lb, upstream):
    record = requests.get(lb.http_base + "/zenodo/api/records/13951614").json()
    link = record["files"][0]["links"]["self"]
    assert link == lb.http_base + "/zenodo/api/records/13951614/files/gbif_class_mapping.csv/content"
    assert requests.get(link).content == b"class,gbif\nA,1\n"
    assert requests.get(lb.http_base + "/zenodo/api/records/13951614/").json() == record
    page = requests.get(lb.http_base + "/mermaid-api/v1/benthicattributes/?limit=1").json()
    assert page["results"][0]["link"] == lb.http_base + "/x"
    choices = requests.get(lb.http_base + "/mermaid-api/v1/choices/")
    assert choices.headers["Content-Type"] == "application/json"
    assert choices.json()[0]["name"] == "growthforms"


@pytest.mark.parametrize(("header", "expected"), [
    (None, None), ("bytes=0-0", (0, 0)), ("bytes=5-", (5, 9)), ("bytes=-3", (7, 9)),
    ("bytes=-30", (0, 9)), ("bytes=3-1", None), ("bytes=1-2,4-5", None), ("items=1-2", None),
    ("bytes=x-y", None),
])
def test_parse_range(header, expected):
    assert parse_range(header, 10) == expected


@pytest.mark.parametrize("header", ["bytes=10-", "bytes=-0", "bytes=10-20"])
def test_parse_range_unsatisfiable(header):
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 10)


# -- faults -------------------------------------------------------------------------------------


def test_http_status_fault_fires_once_then_real_response(lb):
    url = lb.http_base + "/coasttrain/NAIP_6_001.zip"
    fault = lb.faults.add("http", "/coasttrain/NAIP_6_001.zip", kind="status", status=500, times=1)
    assert requests.get(url).status_code == 500
    assert requests.get(url).status_code == 200
    assert fault.hits == 1


def test_http_drop_fault_cuts_body_after_given_bytes(lb, upstream):
    fault = lb.faults.add("http", "NAIP_6_001", kind="drop", after_bytes=4096, times=2)
    conn, resp = _raw_get(lb.http_base, "/coasttrain/NAIP_6_001.zip")
    assert resp.status == 200 and resp.getheader("Content-Length") == str(ZIP_SIZE)
    with pytest.raises(http.client.IncompleteRead) as err:
        resp.read()
    conn.close()
    assert err.value.partial == (upstream / "http/coasttrain/NAIP_6_001.zip").read_bytes()[:4096]
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(lb.http_base + "/coasttrain/NAIP_6_001.zip", headers={"Range": "bytes=10-"})
    assert requests.get(lb.http_base + "/coasttrain/NAIP_6_001.zip").content.__len__() == ZIP_SIZE
    assert fault.hits == 2


def test_s3_status_fault_fires_once_then_real_response(lb):
    fault = lb.faults.add("s3", "mermaid/", kind="status", status=500, times=1)
    s3 = _anon(lb, retries=0)
    with pytest.raises(ClientError) as err:
        s3.get_object(Bucket="coral-reef-training", Key="mermaid/img-1.png")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert err.value.response["Error"]["Code"] == "InternalError"
    assert len(s3.get_object(Bucket="coral-reef-training", Key="mermaid/img-1.png")["Body"].read()) == 5000
    assert fault.hits == 1
    # A retrying client rides over a transient 503 on its own.
    fault = lb.faults.add("s3", "/coral-reef-training/s2012/", kind="status", status=503, times=1)
    retrying = _anon(lb, retries=2)
    assert retrying.get_object(Bucket="coral-reef-training", Key="s2012/annotations.csv")["Body"].read()
    assert fault.hits == 1


def test_s3_drop_fault_cuts_body(lb):
    fault = lb.faults.add("s3", "/coral-reef-training/mermaid/img-1.png", kind="drop", after_bytes=1000)
    s3 = _anon(lb)
    obj = s3.get_object(Bucket="coral-reef-training", Key="mermaid/img-1.png")
    assert obj["ContentLength"] == 5000
    with pytest.raises(ResponseStreamingError):
        obj["Body"].read()
    assert fault.hits == 1
    assert len(s3.get_object(Bucket="coral-reef-training", Key="mermaid/img-1.png")["Body"].read()) == 5000


def test_fault_without_limit_fires_until_cleared(lb):
    url = lb.http_base + "/mermaid-api/v1/choices/"
    fault = lb.faults.add("http", "/choices/", kind="status", status=503, times=None)
    assert [requests.get(url).status_code for _ in range(3)] == [503, 503, 503]
    assert fault.hits == 3
    lb.faults.clear()
    assert requests.get(url).status_code == 200
    with pytest.raises(ValueError):
        lb.faults.add("ftp", "/x")


def test_s3_if_match_is_honoured_as_aws_does(lb):
    s3 = _anon(lb)
    key = "mermaid/img-1.png"
    etag = s3.head_object(Bucket="coral-reef-training", Key=key)["ETag"]
    assert s3.get_object(Bucket="coral-reef-training", Key=key, IfMatch=etag)["Body"].read()
    ranged = s3.get_object(Bucket="coral-reef-training", Key=key, IfMatch=etag, Range="bytes=10-")
    assert len(ranged["Body"].read()) == 4990
    with pytest.raises(ClientError) as err:
        s3.get_object(Bucket="coral-reef-training", Key=key, IfMatch='"0123"', Range="bytes=10-")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert err.value.response["Error"]["Code"] == "PreconditionFailed"


def test_http_if_match_is_honoured(lb):
    url = lb.http_base + "/coasttrain/NAIP_6_001.zip"
    etag = requests.head(url).headers["ETag"]
    assert requests.get(url, headers={"If-Match": etag, "Range": "bytes=0-9"}).status_code == 206
    assert requests.get(url, headers={"If-Match": f'"other", {etag}'}).status_code == 200
    assert requests.get(url, headers={"If-Match": "*"}).status_code == 200
    assert requests.get(url, headers={"If-Match": '"other"'}).status_code == 412
    assert requests.get(url, headers={"If-Match": "W/" + etag}).status_code == 412  # strong only


def test_faults_filter_by_method_and_skip(lb):
    url = lb.http_base + "/coasttrain/NAIP_6_001.zip"
    fault = lb.faults.add("http", "NAIP_6_001", kind="status", status=405, times=None, method="HEAD")
    assert requests.head(url).status_code == 405 and requests.get(url).status_code == 200
    lb.faults.remove(fault)
    fault = lb.faults.add("http", "NAIP_6_001", kind="status", status=503, skip=2, times=1)
    assert [requests.get(url).status_code for _ in range(4)] == [200, 200, 503, 200]
    assert fault.hits == 1


def test_http_no_length_fault_ends_the_body_by_closing(lb, upstream):
    lb.faults.add("http", "NAIP_6_001", kind="no_length", after_bytes=1000, times=1)
    conn, resp = _raw_get(lb.http_base, "/coasttrain/NAIP_6_001.zip")
    assert resp.status == 200 and resp.getheader("Content-Length") is None
    body = resp.read()  # no error: without a length, a cut-off body looks complete
    conn.close()
    assert body == (upstream / "http/coasttrain/NAIP_6_001.zip").read_bytes()[:1000]


def test_http_grow_fault_serves_a_newer_version(lb, upstream):
    url = lb.http_base + "/coasttrain/NAIP_6_001.zip"
    listed = requests.head(url).headers["ETag"]
    lb.faults.add("http", "NAIP_6_001", kind="grow", grow_bytes=10, times=None, method="GET")
    r = requests.get(url)
    data = (upstream / "http/coasttrain/NAIP_6_001.zip").read_bytes()
    assert r.content == data + bytes(10) and r.headers["ETag"] == f'"{hashlib.md5(r.content).hexdigest()}"'
    assert requests.get(url, headers={"If-Match": listed}).status_code == 412
    assert requests.head(url).headers["ETag"] == listed


@pytest.mark.parametrize("server", ["http", "s3"])
def test_trickle_fault_still_sends_the_whole_body(lb, upstream, server):
    fault = lb.faults.add(
        server, "mermaid/img-1.png" if server == "s3" else "gbif_class_mapping",
        kind="trickle", after_bytes=3, trickle_bytes=4, interval_seconds=0.001, times=1,
    )
    if server == "s3":
        body = _anon(lb).get_object(Bucket="coral-reef-training", Key="mermaid/img-1.png")["Body"]
        assert body.read() == (upstream / "s3/coral-reef-training/mermaid/img-1.png").read_bytes()
    else:
        link = "/zenodo/api/records/13951614/files/gbif_class_mapping.csv/content"
        assert requests.get(lb.http_base + link).content == b"class,gbif\nA,1\n"
    # (That it is slow shows in test_net: the throughput floor trips on it.)
    assert fault.hits == 1


def test_requests_are_logged_with_method_range_and_connection(lb):
    url = lb.http_base + "/coasttrain/NAIP_6_001.zip"
    with requests.Session() as session:
        session.head(url)
        session.get(url, headers={"Range": "bytes=5-", "If-Match": '"x"'})
    requests.get(url)  # another connection
    _anon(lb).get_object(Bucket="coral-reef-training", Key="mermaid/img-1.png", Range="bytes=1-")
    seen = lb.faults.requests("http", "NAIP_6_001")
    assert [(r.method, r.range, r.if_match) for r in seen] == [
        ("HEAD", None, None), ("GET", "bytes=5-", '"x"'), ("GET", None, None),
    ]
    assert seen[0].peer == seen[1].peer != seen[2].peer
    [s3_get] = lb.faults.requests("s3", "/coral-reef-training/mermaid/img-1.png", method="GET")
    assert s3_get.range == "bytes=1-" and s3_get.peer.startswith("127.0.0.1:")
    lb.faults.clear()
    assert lb.faults.requests() == []


# -- overlay, env, lifecycle ----------------------------------------------------------------------


def test_overlay_env_and_config_merge(lb, upstream, tmp_path, monkeypatch):
    endpoints = lb.overlay()["endpoints"]
    assert set(endpoints) == {"s3_endpoint_url", "s3_region", "mermaid_api", "coasttrain_base",
                              "zenodo_api", "coralnet_local_root", "known_md5"}
    assert endpoints["s3_endpoint_url"] == lb.s3_endpoint
    assert endpoints["mermaid_api"] == lb.http_base + "/mermaid-api/v1/"
    assert endpoints["known_md5"] == {"coasttrain/NAIP_6_001.zip": "0" * 32}
    assert Path(endpoints["coralnet_local_root"]) == (upstream / "coralnet").resolve()
    path = lb.write_overlay(tmp_path / "cfg/endpoints.yaml")
    assert yaml.safe_load(path.read_text()) == lb.overlay()
    env = lb.env(path)
    assert env["TIDEPOOL_ENDPOINTS"] == str(path.resolve())
    assert env["AWS_ACCESS_KEY_ID"] == env["AWS_SECRET_ACCESS_KEY"] == "testing"
    assert env["AWS_DEFAULT_REGION"] == "us-east-1" and "127.0.0.1" in env["NO_PROXY"]
    monkeypatch.setenv("TIDEPOOL_ENDPOINTS", env["TIDEPOOL_ENDPOINTS"])
    params = load_params(REPO / "params.yaml")
    assert params["endpoints"]["zenodo_api"] == lb.http_base + "/zenodo/api/"
    assert params["endpoints"]["known_md5"]["coasttrain/NAIP_6_001.zip"] == "0" * 32


def _loopback_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("loopback")]


def test_start_stop_start_in_one_process(upstream):
    first = Loopback(upstream).start()
    try:
        session = requests.Session()  # keeps a connection (and its server thread) alive
        assert session.get(first.http_base + "/coasttrain/NAIP_6_001.zip").status_code == 200
        assert _anon(first).list_objects_v2(Bucket="coral-reef-training")["KeyCount"] == 3
        with pytest.raises(TidepoolError, match="already running"):
            Loopback(upstream).start()
        # The refused second instance must not have disturbed the running one.
        assert _anon(first).list_objects_v2(Bucket="coral-reef-training")["KeyCount"] == 3
        ports = (first.s3_endpoint, first.http_base)
    finally:
        first.stop()
    assert _loopback_threads() == []
    for base in ports:
        with pytest.raises(requests.ConnectionError):
            requests.get(base + "/", timeout=5)
    with Loopback(upstream) as second:
        s3 = _anon(second)
        assert s3.list_objects_v2(Bucket="coral-reef-training")["KeyCount"] == 3
        assert second.s3_client().list_objects_v2(Bucket="tidepool-dvc")["KeyCount"] == 0
    assert _loopback_threads() == []


def _hand_made_dvc_repo(repo: Path) -> Path:
    """A DVC repo without git, written by hand: `dvc init` would cost a second per test."""
    _write(repo / ".dvc/config", "[core]\n    no_scm = True\n    remote = storage\n"
           "['remote \"storage\"']\n    url = s3://tidepool-dvc/store\n    region = us-east-1\n")
    return repo


def test_configure_dvc_remote_writes_only_config_local(lb, tmp_path):
    repo = _hand_made_dvc_repo(tmp_path / "repo")
    before = (repo / ".dvc/config").read_text()
    lb.configure_dvc_remote(repo)
    assert (repo / ".dvc/config").read_text() == before
    local = (repo / ".dvc/config.local").read_text()
    assert f"endpointurl = {lb.s3_endpoint}" in local
    assert "testing" not in local


@pytest.mark.slow
def test_real_dvc_push_and_pull_through_loopback(lb, tmp_path):
    repo = _hand_made_dvc_repo(tmp_path / "repo")
    lb.configure_dvc_remote(repo)
    env = {**os.environ, **lb.env(lb.write_overlay(tmp_path / "endpoints.yaml"))}
    payload = _blob("dvc-data", 10_000)
    _write(repo / "data.bin", payload)

    def dvc(*args: str) -> None:
        subprocess.run([*dvc_command(), *args], cwd=repo, env=env, check=True, capture_output=True)

    dvc("add", "data.bin")
    dvc("push")
    md5 = hashlib.md5(payload).hexdigest()
    stored = lb.s3_client().get_object(Bucket="tidepool-dvc", Key=f"store/files/md5/{md5[:2]}/{md5[2:]}")
    assert stored["Body"].read() == payload
    (repo / "data.bin").unlink()
    subprocess.run(["rm", "-rf", str(repo / ".dvc/cache")], check=True)
    dvc("pull")
    assert (repo / "data.bin").read_bytes() == payload


# -- CLI ----------------------------------------------------------------------------------------

EXEC_SCRIPT = """
import os, sys, yaml, boto3, requests
from botocore import UNSIGNED
from botocore.config import Config
ep = yaml.safe_load(open(os.environ["TIDEPOOL_ENDPOINTS"]))["endpoints"]
s3 = boto3.client("s3", endpoint_url=ep["s3_endpoint_url"], region_name=ep["s3_region"],
                  config=Config(signature_version=UNSIGNED))
body = s3.get_object(Bucket="coral-reef-training", Key="mermaid/img-1_annotations.csv")["Body"].read()
assert body == b"id,row,col\\n1,2,3\\n", body
assert requests.get(ep["coasttrain_base"] + "NAIP_6_001.zip").status_code == 200
local = open(".dvc/config.local").read()
assert "endpointurl = " + ep["s3_endpoint_url"] in local, local
sys.exit(int(sys.argv[1]))
"""


def _cli(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "stages.loopback", *args], cwd=cwd, env=env, **kwargs)


def test_exec_cli_runs_command_and_propagates_status(upstream, tmp_path):
    repo = _hand_made_dvc_repo(tmp_path / "repo")
    overlay = tmp_path / "endpoints.yaml"
    proc = _cli(["exec", "--upstream", str(upstream), "--overlay", str(overlay), "--",
                 sys.executable, "-c", EXEC_SCRIPT, "3"], cwd=repo,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert yaml.safe_load(overlay.read_text())["endpoints"]["s3_region"] == "us-east-1"
    # The loopback endpoint does not outlive the servers in the repo's local DVC config.
    assert not (repo / ".dvc/config.local").exists()


def test_serve_cli_prints_endpoints_and_stops_on_sigterm(upstream, tmp_path):
    overlay = tmp_path / "endpoints.yaml"
    proc = _cli(["serve", "--upstream", str(upstream), "--overlay", str(overlay)], cwd=tmp_path,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving"):
                break
        http_base = next(line.split()[1] for line in lines if line.startswith("http:"))
        assert requests.get(http_base + "/coasttrain/NAIP_6_001.zip").status_code == 200
        endpoints = yaml.safe_load(overlay.read_text())["endpoints"]
        assert endpoints["coasttrain_base"] == http_base + "/coasttrain/"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(requests.ConnectionError):
        requests.get(http_base + "/", timeout=5)
