"""The whole pipeline through real DVC, against the loopback servers, in a fresh project copy."""

from __future__ import annotations

import csv
import json

import pytest

pytestmark = pytest.mark.slow

SOURCES = ("mermaid", "coralnet", "coasttrain", "inat2017", "seatizen")


def _stages_run(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def test_repro_fetches_every_source_then_has_nothing_to_do(pipeline):
    first = pipeline.dvc("repro")
    ran = _stages_run(first.stdout)
    assert {f"fetch@{s}" for s in SOURCES} | {"taxonomy"} <= set(ran)

    for source in SOURCES:
        raw = pipeline.root / "data" / "raw" / source
        with open(raw / "manifest.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert rows, source
        assert [r["key"] for r in rows] == sorted(r["key"] for r in rows)
        for row in rows:
            assert (raw / row["key"]).stat().st_size == int(row["size"])
            # Upstream URLs only: a loopback port in an output would change its hash every run.
            assert "127.0.0.1" not in row["url"], row
    attributes = json.loads((pipeline.root / "data/taxonomy/benthicattributes.json").read_text())
    assert len(attributes) > 12

    second = pipeline.dvc("repro")
    assert _stages_run(second.stdout) == []
    assert "Data and pipelines are up to date." in second.stdout
    status = pipeline.dvc("status", "--json")
    assert json.loads(status.stdout) == {}

    pipeline.dvc("push")
    remote = pipeline.dvc("status", "--cloud", "--json")
    assert json.loads(remote.stdout) == {}
