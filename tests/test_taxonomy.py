"""The MERMAID taxonomy snapshot against a paginating loopback API."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from stages.errors import UpstreamFormatError
from stages.loopback import Loopback
from stages.taxonomy import snapshot


def uid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))


ATTRIBUTES = [
    {
        "id": uid(n),
        "name": n,
        "parent": uid(p) if p else None,
        "top_level_category": uid(t),
        "regions": [],
        "life_histories": [],
        "growth_form_life_histories": [],
        "status": 90,
    }
    for n, p, t in [
        ("Hard coral", None, "Hard coral"),
        ("Acropora", "Hard coral", "Hard coral"),
        ("Porites", "Hard coral", "Hard coral"),
        ("Sand", None, "Sand"),
        ("Macroalgae", None, "Macroalgae"),
        ("Halimeda", "Macroalgae", "Macroalgae"),
        ("Sponge", None, "Other invertebrates"),
    ]
]
GROWTH_FORMS = [{"id": uid(g), "name": g} for g in ("Massive", "Branching", "Encrusting")]
MAPPINGS = [
    {
        "id": uid(f"m{i}"),
        "benthic_attribute_id": ATTRIBUTES[i % 7]["id"] if i != 4 else None,
        "benthic_attribute_name": ATTRIBUTES[i % 7]["name"] if i != 4 else None,
        "growth_form_id": None,
        "growth_form_name": None,
        "provider": provider,
        "provider_id": str(100 - i),
        "provider_label": f"label {i}",
    }
    for i, provider in enumerate(["CoralNet", "ReefCloud"] * 5)
]


def write_api(root: Path, attributes=ATTRIBUTES, mappings=MAPPINGS, choices=None) -> None:
    api = root / "http/mermaid-api/v1"
    for rel, data in (("benthicattributes", attributes), ("classification/labelmappings", mappings)):
        (api / rel).mkdir(parents=True, exist_ok=True)
        (api / rel / "results.json").write_text(json.dumps(data))
    (api / "choices").mkdir(parents=True, exist_ok=True)
    if choices is None:
        choices = [
            {"name": "countries", "data": [{"id": "x", "name": "Kenya"}]},
            {"name": "growthforms", "data": GROWTH_FORMS},
        ]
    (api / "choices/index.json").write_text(json.dumps(choices))


@pytest.fixture
def upstream(tmp_path):
    write_api(tmp_path / "upstream")
    return tmp_path / "upstream"


@pytest.fixture
def lb(upstream):
    with Loopback(upstream=upstream) as loop:
        yield loop


@pytest.fixture
def params(lb, loopback_params):
    p = loopback_params(lb)
    p["taxonomy"]["page_limit"] = 3  # several pages per endpoint
    return p


def load(path: Path):
    return json.loads(path.read_text())


def test_pagination_collects_every_record_once_sorted(lb, params, tmp_path):
    pages = lb.faults.add("http", "/mermaid-api/v1/benthicattributes/", kind="status", status=500, times=1)
    out = tmp_path / "taxonomy"
    counts = snapshot(params, out)
    assert counts == {"benthicattributes": 7, "growthforms": 3, "labelmappings": 10}
    assert pages.hits == 1  # the first page failed once and was retried
    attributes = load(out / "benthicattributes.json")
    assert attributes == sorted(ATTRIBUTES, key=lambda r: r["id"])
    assert load(out / "growthforms.json") == sorted(GROWTH_FORMS, key=lambda r: r["id"])
    mappings = load(out / "labelmappings.json")
    assert [(m["provider"], m["provider_id"]) for m in mappings] == sorted(
        (m["provider"], m["provider_id"]) for m in MAPPINGS
    )
    assert len({m["id"] for m in mappings}) == 10
    # Canonical JSON: a second snapshot of the same API is byte-identical.
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    snapshot(params, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first


def test_missing_field_names_the_url_and_field(lb, params, tmp_path, upstream):
    broken = [dict(m) for m in MAPPINGS]
    del broken[7]["provider_id"]
    write_api(upstream, mappings=broken)
    with pytest.raises(UpstreamFormatError) as err:
        snapshot(params, tmp_path / "taxonomy")
    message = str(err.value)
    assert f"{lb.http_base}/mermaid-api/v1/classification/labelmappings/" in message
    assert "missing field(s) provider_id" in message and broken[7]["id"] in message
    assert not (tmp_path / "taxonomy/labelmappings.json").exists()


def test_choices_without_growthforms_is_an_error(lb, params, tmp_path, upstream):
    write_api(upstream, choices=[{"name": "countries", "data": []}])
    with pytest.raises(UpstreamFormatError, match="no choice set named `growthforms`"):
        snapshot(params, tmp_path / "taxonomy")


def test_cli_writes_snapshot_and_fails_with_exit_2(lb, params, run_stage, tmp_path, upstream):
    out = tmp_path / "taxonomy"
    ok = run_stage(lb, params, "stages.taxonomy", "--out", str(out))
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "benthicattributes.json",
        "growthforms.json",
        "labelmappings.json",
    ]
    broken = [dict(a) for a in ATTRIBUTES]
    broken[2]["name"] = None
    write_api(upstream, attributes=broken)
    bad = run_stage(lb, params, "stages.taxonomy", "--out", str(out))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        f"error: {lb.http_base}/mermaid-api/v1/benthicattributes/: "
        f"record id={broken[2]['id']!r}: empty field(s) name"
    )
