"""dvc.yaml's code deps are the import closure of each stage's command, and drift fails."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stages import depgraph

REPO = Path(__file__).resolve().parents[1]


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(REPO / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(REPO / name, root / name)
    return root


def test_committed_dvc_yaml_matches_the_import_closure():
    assert depgraph.check_dynamic(REPO) == []
    drift = depgraph.compare(REPO)
    assert drift == [], "run `make deps`: " + "; ".join(f"{d.stage}: +{d.missing} -{d.extra}" for d in drift)


def test_every_resolved_dep_exists_for_every_key():
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        stages = list(repo.index.stages)
    names = {s.addressing for s in stages}
    assert {"ingest@mermaid", "ingest@seatizen", "fetch@coasttrain", "pack@reef-points"} <= names
    for stage in stages:
        for dep in stage.deps:
            rel = Path(dep.def_path)
            if rel.parts[0] == "stages":
                assert (REPO / rel).exists(), f"{stage.addressing}: {rel}"
    ingest = next(s for s in stages if s.addressing == "ingest@coralnet")
    paths = {d.def_path for d in ingest.deps}
    assert "stages/ingest/coralnet.py" in paths and "stages/ingest/mermaid.py" not in paths
    assert {"stages/ingest/runner.py", "stages/cache.py", "stages/imaging.py"} <= paths


def test_a_new_import_is_drift_until_make_deps(tmp_path: Path):
    root = _copy(tmp_path)
    (root / "stages" / "newhelper.py").write_text("VALUE = 1\n", encoding="utf-8")
    split = root / "stages" / "split.py"
    text = split.read_text(encoding="utf-8")
    # Inside a function, as lazy imports are: they still run, so they still shape outputs.
    split.write_text(
        text + "\n\ndef _uses_helper() -> int:\n    from stages import newhelper\n\n"
        "    return newhelper.VALUE\n",
        encoding="utf-8",
    )
    drift = {d.stage: d for d in depgraph.compare(root)}
    assert set(drift) == {"split"} and drift["split"].missing == ["stages/newhelper.py"]

    check = subprocess.run(
        [sys.executable, "-m", "stages.depgraph", "--check"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 1 and "split: missing ['stages/newhelper.py']" in check.stdout

    assert depgraph.rewrite(root) == ["split"]
    assert depgraph.compare(root) == []
    assert "- stages/newhelper.py" in (root / "dvc.yaml").read_text(encoding="utf-8")
    # Comments and data deps survive the rewrite.
    assert "# Every source's tables" in (root / "dvc.yaml").read_text(encoding="utf-8")


def test_a_removed_import_is_drift_too(tmp_path: Path):
    root = _copy(tmp_path)
    dedup = root / "stages" / "dedup.py"
    dedup.write_text(
        dedup.read_text(encoding="utf-8").replace(
            "from stages import hamming\n", "from stages import hamming_gone as hamming\n"
        ),
        encoding="utf-8",
    )
    drift = {d.stage: d for d in depgraph.compare(root)}
    assert "stages/hamming.py" in drift["dedup"].extra


def test_an_undeclared_import_by_name_is_refused(tmp_path: Path):
    root = _copy(tmp_path)
    (root / "stages" / "plugin_loader.py").write_text(
        "import importlib\n\n\ndef load(name: str) -> object:\n"
        "    return importlib.import_module(f'stages.plugins.{name}')\n",
        encoding="utf-8",
    )
    assert depgraph.check_dynamic(root) == ["stages.plugin_loader"]


@pytest.mark.parametrize("source", ["mermaid", "coasttrain"])
def test_per_key_modules_are_templated(source: str):
    from stages.config import load_params

    params = load_params(REPO / "params.yaml")
    closure = depgraph.files(REPO, depgraph.closure(REPO, "stages.ingest", key=source))
    assert f"stages/ingest/{source}.py" in closure
    assert "stages/ingest/inat2017.py" not in closure or source == "inat2017"
    import yaml

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["ingest"]
    assert "stages/ingest/${key}.py" in depgraph.stage_code_deps(REPO, stage, params)


def test_every_declared_product_has_its_plot():
    """Top-level `plots:` cannot iterate params (DVC has no foreach there): the one list kept by
    hand, so a product added to params.yaml without its chart fails here."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    charted = {next(iter(p)).removeprefix("metrics/plots/classes/").removesuffix(".csv") for p in plots}
    assert charted == set(params["products"])
