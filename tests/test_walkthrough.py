"""`make walkthrough`'s whole story, run as written (stages.walkthrough) at a small scale: build,
release v0.1.0, grow the sources, build, release v0.2.0, restart the loopback from its store, fresh
clone + `dvc pull` of v0.1.0, `dvc import`, `dvc get`, `make diff`. test_release.py checks the
consumer steps in detail on planted changes; this checks the story a newcomer follows holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_walkthrough_runs_end_to_end(tmp_path: Path):
    work = tmp_path / "walk"
    args = ["--workdir", str(work), "--scale", "0.5", "--grow-scale", "0.8"]
    proc = subprocess.run(
        [sys.executable, "-m", "stages.walkthrough", *args],
        cwd=REPO, capture_output=True, text=True, timeout=2400, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    out = proc.stdout
    for step in range(1, 13):
        assert f"[{step}] " in out, step
    assert "`dvc status` clean; no .dvc/config.local" in out
    assert "md5s match the index; reef-points.dvc pins rev v0.1.0" in out
    assert "no .dvc/config.local in the project." in out
    text = (work / "diff.md").read_text(encoding="utf-8")
    assert text.startswith("## Dataset diff `v0.1.0` → `v0.2.0`")
    # the sources grew, so every product gained samples, and the pictures were drawn
    for product in ("reef-points", "reef-images", "coast-seg", "inat2017"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {product} |"))
        assert int(row.split("|")[5]) > 0, row  # the `added` column
        assert f"{product}-changes.png" in out
