"""Two builds in two processes with different hash seeds give the same bytes (GUIDE property 1).

Tests elsewhere build twice in one interpreter, where a set or dict order that depends on string
hashing would repeat itself and hide; here every stage runs as its own process, once with
PYTHONHASHSEED=1 and once with 2, the work cache off so each build computes everything.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = ("data/interim", "data/dedup", "data/split", "data/release", "metrics")


def _project(fetched: Path, dest: Path) -> Path:
    for part in ("raw", "taxonomy"):
        shutil.copytree(fetched / "data" / part, dest / "data" / part, symlinks=True)
    shutil.copytree(REPO / "data" / "tables", dest / "data" / "tables")
    shutil.copytree(REPO / "data" / "ledger", dest / "data" / "ledger")
    shutil.copy2(REPO / "dvc.yaml", dest / "dvc.yaml")
    shutil.copy2(REPO / "params.yaml", dest / "params.yaml")
    return dest


def _build(root: Path, seed: str) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    env = {
        **os.environ,
        "PYTHONHASHSEED": seed,
        "PYTHONPATH": str(REPO),
        "TIDEPOOL_CACHE": "0",
        "TIDEPOOL_PROGRESS": "0",
    }
    commands = [["stages.ingest", s] for s in params["sources"]]
    commands += [["stages.dedup"], ["stages.split"]] + [["stages.pack", p] for p in params["products"]]
    for cmd in commands:
        proc = subprocess.run(
            [sys.executable, "-m", *cmd], cwd=root, env=env, capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, f"{cmd}: {proc.stderr[-2000:]}"


def _digests(root: Path) -> dict[str, str]:
    out = {}
    for part in OUTPUTS:
        for path in sorted((root / part).rglob("*")):
            if path.is_file():
                out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def test_two_processes_with_different_hash_seeds_build_identical_bytes(fetched_root: Path, tmp_path: Path):
    first = _project(fetched_root, tmp_path / "one")
    second = _project(fetched_root, tmp_path / "two")
    _build(first, "1")
    _build(second, "2")
    a, b = _digests(first), _digests(second)
    assert any(k.endswith(".tar") for k in a) and any(k.startswith("data/interim/") for k in a)
    differing = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    assert differing == []
