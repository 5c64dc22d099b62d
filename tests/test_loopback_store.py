"""The loopback S3's on-disk store: the DVC remote bucket survives a restart, exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.loopback import Loopback
from stages.loopback.persist import BucketStore, safe_key

BUCKET = "tidepool-dvc"


def keys(lb: Loopback) -> dict[str, bytes]:
    client = lb.s3_client()
    listing = client.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listing}


def test_bucket_survives_restarts_with_deletions_and_only_changes_written(tmp_path):
    upstream, store = tmp_path / "upstream", tmp_path / "store"
    upstream.mkdir()
    with Loopback(upstream, store=store) as lb:
        assert lb.restored == 0
        client = lb.s3_client()
        for name, body in (("a", b"alpha"), ("b", b"beta"), ("sub/c", b"gamma")):
            client.put_object(Bucket=BUCKET, Key=f"store/files/md5/{name}", Body=body)
        # A key that would leave the store is kept in the bucket but never written to disk.
        client.put_object(Bucket=BUCKET, Key="../escape", Body=b"x")
        client.put_object(Bucket="coral-reef-training", Key="not-kept", Body=b"re-seeded, not kept")
    assert not (tmp_path / "escape").exists() and not (store / "escape").exists()
    stored = ["store/files/md5/a", "store/files/md5/b", "store/files/md5/sub/c"]
    assert BucketStore(store, BUCKET).keys() == stored

    with Loopback(upstream, store=store) as lb:
        assert lb.restored == 3
        assert keys(lb) == {"store/files/md5/a": b"alpha", "store/files/md5/b": b"beta",
                            "store/files/md5/sub/c": b"gamma"}  # fmt: skip
        client = lb.s3_client()
        assert client.list_objects_v2(Bucket="coral-reef-training").get("KeyCount") == 0
        client.delete_object(Bucket=BUCKET, Key="store/files/md5/sub/c")  # e.g. `dvc gc -c`
        client.put_object(Bucket=BUCKET, Key="store/files/md5/b", Body=b"beta, rewritten")
        saved = lb.save()
        assert saved is not None
        assert (saved.written, saved.deleted, saved.unchanged) == (
            ["store/files/md5/b"], ["store/files/md5/sub/c"], 1)  # fmt: skip
        again = lb.save()
        assert again is not None and (again.written, again.deleted, again.unchanged) == ([], [], 2)
    assert not (store / BUCKET / "store" / "files" / "md5" / "sub").exists()  # emptied folders go too

    with Loopback(upstream, store=store) as lb:
        assert keys(lb) == {"store/files/md5/a": b"alpha", "store/files/md5/b": b"beta, rewritten"}
    # Without a store nothing is kept.
    with Loopback(upstream) as lb:
        assert lb.store is None and keys(lb) == {} and lb.save() is None


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "..", "a//b", "a/./b", "dir/", "back\\slash"])
def test_unsafe_keys(key):
    assert not safe_key(key)


def test_safe_keys():
    assert safe_key("store/files/md5/ab/cdef0123") and safe_key("x.dir") and safe_key(".hidden")


def test_serve_prints_how_to_reach_the_store_and_saves_on_sigterm(tmp_path):
    """`python -m stages.loopback serve --store`: restores, prints the export lines, saves on SIGTERM."""
    import signal
    import time

    upstream, store = tmp_path / "upstream", tmp_path / "store"
    upstream.mkdir()
    env = {**os.environ, "TIDEPOOL_PROGRESS": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.loopback", "serve", "--upstream", str(upstream), "--store", str(store),
         "--overlay", str(tmp_path / "endpoints.yaml")],
        cwd=Path(__file__).resolve().parents[1], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if line.startswith("serving"):
                break
        exports = [line.split("=", 1)[1] for line in lines if line.startswith("export AWS_ENDPOINT_URL_S3=")]
        endpoint = exports[0]
        assert any(line.startswith("store: ") and "0 object(s) restored" in line for line in lines)
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")  # fmt: skip
        client.put_object(Bucket=BUCKET, Key="store/files/md5/zz", Body=b"kept")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    assert (store / BUCKET / "store" / "files" / "md5" / "zz").read_bytes() == b"kept"


def test_demo_removes_a_stale_loopback_endpoint_and_keeps_a_real_one(tmp_path):
    from stages.demo import clear_loopback_endpoint
    from stages.loopback import dvc_command

    def dvc(*args: str) -> str:
        return subprocess.run([*dvc_command(), *args], cwd=tmp_path, capture_output=True, text=True,
                              check=True).stdout  # fmt: skip

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc("init", "-q")
    dvc("remote", "add", "-d", "storage", "s3://tidepool-dvc/store")
    assert clear_loopback_endpoint(tmp_path) is None  # nothing set: nothing to do
    dvc("remote", "modify", "--local", "storage", "endpointurl", "http://127.0.0.1:40401")
    assert clear_loopback_endpoint(tmp_path) == "http://127.0.0.1:40401"
    assert "endpointurl" not in (tmp_path / ".dvc" / "config.local").read_text()
    dvc("remote", "modify", "--local", "storage", "endpointurl", "https://s3.example.org")
    assert clear_loopback_endpoint(tmp_path) is None
    assert "https://s3.example.org" in (tmp_path / ".dvc" / "config.local").read_text()
