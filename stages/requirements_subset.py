"""Write requirements-diff.txt: the part of requirements.txt that `python -m stages.diff` needs.

    python -m stages.requirements_subset > requirements-diff.txt

The pull-request workflow installs this instead of the whole of requirements.txt (no moto, Dask,
mlcroissant, test tools). It is the dependency closure of ROOTS as the installed distributions
declare it (markers evaluated for this interpreter), each pinned exactly as requirements.txt pins
it, so the diff in CI runs the same versions as everywhere else. tests/test_diff.py checks that the
file equals this script's output.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

from stages.cli import run_main
from stages.errors import TidepoolError
from stages.fsutil import repo_root

# What stages.diff (and stages.diff_pictures, stages.pr_check) import, plus dvc's S3 plugin.
ROOTS = ("dvc", "dvc-s3", "pandas", "pyarrow", "PyYAML", "pillow", "tqdm")
# Installed with pip itself on every runner; requirements.txt does not pin it either.
BUILD_TOOLS = frozenset({"pip", "setuptools", "wheel"})
HEADER = """\
# The subset of requirements.txt that the release diff needs (python -m stages.diff, pr_check):
# installed by .github/workflows/dataset-diff.yml. Generated; do not edit by hand:
#   python -m stages.requirements_subset > requirements-diff.txt
# roots: {roots}
"""


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, tuple[str, str]]:
    """normalised name -> (name as written, version) of every `name==version` line."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" not in line:
            continue
        name, version = (part.strip() for part in line.split("==", 1))
        name = name.split("[", 1)[0]
        pins[normalise(name)] = (name, version.split(";", 1)[0].strip())
    return pins


def closure(roots: tuple[str, ...] = ROOTS) -> set[str]:
    """Normalised names of `roots` and everything they require, with extras and markers applied."""
    env = default_environment()
    extras_of: dict[str, set[str]] = {}
    todo: list[tuple[str, set[str]]] = [(r, set()) for r in roots]
    while todo:
        name, extras = todo.pop()
        key = normalise(name)
        if key in extras_of and extras <= extras_of[key]:
            continue
        extras_of[key] = extras_of.get(key, set()) | extras
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError as exc:
            raise TidepoolError(f"{name} is not installed: run `make venv` first") from exc
        for text in dist.requires or []:
            req = Requirement(text)
            wanted = any(
                req.marker is None or req.marker.evaluate({**env, "extra": extra})
                for extra in (extras_of[key] or {""})
            )
            if wanted:
                todo.append((req.name, set(req.extras)))
    return set(extras_of)


def subset_text(requirements: Path) -> str:
    pins = read_pins(requirements)
    needed = closure() - BUILD_TOOLS
    unpinned = sorted(needed - set(pins))
    if unpinned:
        raise TidepoolError(f"{requirements}: does not pin {unpinned}, which the diff needs")
    lines = [f"{pins[k][0]}=={pins[k][1]}" for k in sorted(needed)]
    return HEADER.format(roots=" ".join(ROOTS)) + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    del argv
    sys.stdout.write(subset_text(repo_root() / "requirements.txt"))
    return 0


if __name__ == "__main__":
    run_main(main)
