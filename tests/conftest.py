"""Shared fixtures: params pointed at a running Loopback, and stage CLIs run as subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from stages.config import ENDPOINTS_ENV, load_params

REPO = Path(__file__).resolve().parents[1]

# Fast retries and a tiny streaming chunk, so a dropped connection keeps most of its bytes and a
# test of the retry path takes milliseconds.
FAST_NET = {"retries": 3, "backoff_seconds": 0.0, "timeout_seconds": 20, "chunk_bytes": 1024}


@pytest.fixture
def loopback_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict[str, Any]]:
    """`make(lb, **net)`: params.yaml + the loopback's endpoints overlay (merged exactly as
    `load_params` merges it), with fast `net` settings."""

    def make(lb: Any, **net: Any) -> dict[str, Any]:
        with monkeypatch.context() as m:
            m.setenv(ENDPOINTS_ENV, str(lb.write_overlay(tmp_path / "endpoints-overlay.yaml")))
            params = load_params(REPO / "params.yaml")
        params["net"] = {**params["net"], **FAST_NET, **net}
        return params

    return make


@pytest.fixture
def aws_test_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials for in-process signed S3 clients (the loopback accepts any)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture
def run_stage(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`run(lb, params, *args)`: `python -m <args>` from the repo root with the loopback env.

    `params` is written to a temp params.yaml passed as `--params`; endpoints come from the
    overlay named by $TIDEPOOL_ENDPOINTS, as under `stages.loopback exec`.
    """

    def run(lb: Any, params: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
        params_path = tmp_path / "cli-params.yaml"
        params_path.write_text(yaml.safe_dump(params), encoding="utf-8")
        overlay = lb.write_overlay(tmp_path / "cli-endpoints.yaml")
        env = {**os.environ, **lb.env(overlay), "TIDEPOOL_PROGRESS": "0"}
        return subprocess.run(
            [sys.executable, "-m", *args, "--params", str(params_path)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    return run
