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
from hypothesis import settings as hypothesis_settings

from stages.config import ENDPOINTS_ENV, load_params

REPO = Path(__file__).resolve().parents[1]

# A property test that passes on one CI run and fails on the next with no change is a red CI that
# nobody can reproduce from the commit. `make test` therefore draws a fixed sequence of examples
# per test (derandomize) and keeps no example database; `HYPOTHESIS_PROFILE=explore make test`
# searches afresh, and whatever it finds is pinned with `@example` before it lands.
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
hypothesis_settings.register_profile("explore", derandomize=False)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

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


# --- end-to-end: a real DVC project in a temp dir, fed by the loopback servers -------------------

E2E_SCALE = 0.5  # small, but every planted case (Coast Train plants at npz index <= 2) exists


@pytest.fixture(scope="session")
def sample_upstream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample upstreams at E2E_SCALE, generated once per test session."""
    from stages.samplegen.__main__ import generate_all

    out = tmp_path_factory.mktemp("upstream")
    generate_all(out, scale=E2E_SCALE, jobs=2)
    return out


def _project_files() -> list[str]:
    """What a fresh clone would hold: tracked files plus new, not-ignored ones (during development)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted(p for p in listed.split("\0") if p and (REPO / p).is_file())


def make_project(dest: Path) -> Path:
    """Copy the repository's files into `dest` and commit them, like `git clone` would give."""
    import shutil

    for rel in _project_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    git = ["git", "-c", "user.email=test@tidepool", "-c", "user.name=test"]
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "fresh clone"], cwd=dest, check=True)
    return dest


class Pipeline:
    """A DVC project plus the environment that points it at a running Loopback."""

    def __init__(self, root: Path, lb: Any, overlay: Path) -> None:
        from stages.loopback import dvc_command

        self.root = root
        self.lb = lb
        self.env = {
            **os.environ,
            **lb.env(overlay),
            "TIDEPOOL_PROGRESS": "0",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.dvc_cmd = dvc_command()
        lb.configure_dvc_remote(root)

    def run(self, *args: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            list(args), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                f"stderr:\n{proc.stderr[-4000:]}"
            )
        return proc

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(*self.dvc_cmd, *args, check=check)

    def git(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("git", "-c", "user.email=test@tidepool", "-c", "user.name=test", *args)


@pytest.fixture
def pipeline(tmp_path: Path, sample_upstream: Path) -> Any:
    """A fresh project wired to a Loopback serving the session's sample upstreams."""
    from stages.loopback import Loopback

    root = make_project(tmp_path / "project")
    with Loopback(upstream=sample_upstream) as lb:
        yield Pipeline(root, lb, lb.write_overlay(tmp_path / "endpoints.yaml"))


# --- ingest: raw data fetched once per session from the sample upstreams -----------------------

FETCH_SOURCES = ("mermaid", "coralnet", "coasttrain", "inat2017", "seatizen")


def fetch_project(upstream: Path, root: Path) -> Path:
    """Make `root` project-shaped (data/raw/<source>/, data/taxonomy/, data/tables/) by fetching
    every source of `upstream` through the real fetch code from the loopback servers."""
    import shutil

    from stages.fetch import fetch
    from stages.loopback import Loopback
    from stages.taxonomy import snapshot

    (root / "dvc.yaml").write_text("stages: {}\n", encoding="utf-8")  # marks the project root
    shutil.copytree(REPO / "data" / "tables", root / "data" / "tables")
    with Loopback(upstream=upstream) as lb, pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENDPOINTS_ENV, str(lb.write_overlay(root / "endpoints.yaml")))
        for key, value in lb.env(root / "endpoints.yaml").items():
            mp.setenv(key, value)
        params = load_params(REPO / "params.yaml")
        for source in FETCH_SOURCES:
            fetch(source, params, root / "data" / "raw" / source, root / "data" / ".downloads" / source)
        snapshot(params, root / "data" / "taxonomy")
    return root


@pytest.fixture(scope="session")
def fetched_root(tmp_path_factory: pytest.TempPathFactory, sample_upstream: Path) -> Path:
    """A project-shaped dir fetched from the session's sample upstreams (see `fetch_project`).
    Treat it as read-only: it is shared."""
    return fetch_project(sample_upstream, tmp_path_factory.mktemp("fetched"))


GROWN_SCALE = round(E2E_SCALE * 1.1, 4)


@pytest.fixture(scope="session")
def grown_fetched_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample upstreams at 1.1x the session scale (a superset of `fetched_root`'s, every
    existing file byte-identical), fetched the same way. Read-only: it is shared."""
    from stages.samplegen.__main__ import generate_all

    upstream = tmp_path_factory.mktemp("upstream-grown")
    generate_all(upstream, scale=GROWN_SCALE, jobs=2)
    return fetch_project(upstream, tmp_path_factory.mktemp("fetched-grown"))


def ingest_context(source: str, root: Path, out_root: Path | None = None, **overrides: Any) -> Any:
    """An IngestContext reading `root`'s raw data; outputs go under `out_root` (default: root)."""
    from stages.ingest.context import IngestContext

    params = load_params(REPO / "params.yaml")
    for dotted, value in overrides.items():
        node = params
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    out_root = out_root or root
    return IngestContext(
        source=source,
        params=params,
        root=root,
        raw_dir=root / "data" / "raw" / source,
        out_dir=out_root / "data" / "interim" / source,
        taxonomy_dir=root / "data" / "taxonomy",
        tables_dir=root / "data" / "tables",
        jobs=2,
    )
