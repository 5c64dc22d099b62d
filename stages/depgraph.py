"""The code deps of every dvc.yaml stage, generated from the import closure of its command.

DVC reruns a stage when one of its `deps` changes, so a module that shapes a stage's outputs but
is missing from its deps lets `dvc status` say "up to date" while a rebuild would give other bytes.
Lists kept by hand drift; this module derives them:

- A stage's command `python -m stages.<module> ...` runs `stages/<module>.py` or the package's
  `__main__.py`; its closure is every `stages.*` module reachable by `import` statements (module
  level or inside functions, optional paths such as the Dask backend included; `if TYPE_CHECKING:`
  blocks excluded, they never run), plus the packages' `__init__.py` that importing them runs.
- Imports by name at run time (`importlib.import_module`) are declared in DYNAMIC: per call site,
  which modules it can load. `check_dynamic` fails when a call site is not declared, so a new one
  cannot silently escape the closure. A declared call site is followed only in the stages whose
  command lives in its package (`stages.fetch` loads fetchers for fetch@*, not for ingest, which
  imports fetch's manifest reader but never fetches).
- A `foreach` stage gets one list for all its keys: modules every key needs as they are, the
  per-key module as `stages/<package>/${key}.py`, anything else that only some keys need listed
  for all (a spurious rerun costs time, a missing dep costs correctness).

Only `stages/...` entries of `deps` are generated; data deps (`data/...`) stay as written.
`python -m stages.depgraph` rewrites dvc.yaml in place (`make deps`), keeping comments;
`--check` prints the differences and exits 1 (the test suite runs the check).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.cli import run_main
from stages.fsutil import repo_root

PACKAGE = "stages"

# Call sites that import by name, and what each can load: "{key}" is the foreach key of the
# stage running it; a list names the modules outright.
DYNAMIC: dict[str, str | list[str]] = {
    "stages.fetch": "stages.fetch.{key}",
    "stages.ingest": "stages.ingest.{key}",
    "stages.pack": [
        "stages.pack.reef_points",
        "stages.pack.reef_images",
        "stages.pack.coast_seg",
        "stages.pack.inat2017",
    ],
}


def module_path(root: Path, module: str) -> Path | None:
    """The file of a `stages.*` module (a package's `__init__.py`), or None if there is none."""
    base = root.joinpath(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool) -> None:
        self.module = module
        self.is_package = is_package
        self.found: set[str] = set()
        self.dynamic = False

    def visit_If(self, node: ast.If) -> None:  # noqa: N802 - ast.NodeVisitor's naming
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:  # noqa: N802
        for alias in node.names:
            if alias.name.split(".")[0] == PACKAGE:
                self.found.add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:  # noqa: N802
        base = node.module or ""
        if node.level:
            parts = self.module.split(".")
            keep = len(parts) - node.level + (1 if self.is_package else 0)
            base = ".".join([*parts[:keep], *([base] if base else [])])
        if base.split(".")[0] != PACKAGE:
            return
        self.found.add(base)
        for alias in node.names:
            self.found.add(f"{base}.{alias.name}")  # a submodule, if one exists by that name

    def visit_Call(self, node: ast.Call) -> None:  # noqa: N802
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name == "import_module":
            self.dynamic = True
        self.generic_visit(node)


@dataclass
class ModuleInfo:
    imports: set[str]
    dynamic: bool


def scan(root: Path, module: str) -> ModuleInfo:
    path = module_path(root, module)
    assert path is not None
    visitor = _Imports(module, path.name == "__init__.py")
    visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return ModuleInfo(visitor.found, visitor.dynamic)


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def closure(root: Path, entry: str, key: str | None = None) -> set[str]:
    """Modules `python -m <entry>` runs (for a package, its `__main__`), with `key` for DYNAMIC."""
    path = module_path(root, entry)
    todo = [entry, f"{entry}.__main__"] if path is not None and path.name == "__init__.py" else [entry]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen or module_path(root, module) is None:
            continue
        seen.add(module)
        todo.extend(_parents(module))
        info = scan(root, module)
        todo.extend(info.imports)
        if info.dynamic and entry.startswith(module):
            declared = DYNAMIC.get(module)
            if isinstance(declared, str):
                if key is not None:
                    todo.append(declared.format(key=key))
            elif declared:
                todo.extend(declared)
    return seen


def check_dynamic(root: Path) -> list[str]:
    """Modules that import by name without a DYNAMIC entry."""
    missing = []
    for path in sorted((root / PACKAGE).rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        module = ".".join(parts)
        if module != __name__ and scan(root, module).dynamic and module not in DYNAMIC:
            missing.append(module)
    return missing


def files(root: Path, modules: Iterable[str]) -> list[str]:
    return sorted(module_path(root, m).relative_to(root).as_posix() for m in modules)  # type: ignore[union-attr]


def _entry(cmd: str) -> str | None:
    words = cmd.split()
    for i, word in enumerate(words[:-1]):
        if word == "-m" and words[i + 1].split(".")[0] == PACKAGE:
            return words[i + 1]
    return None


def _keys(foreach: Any, params: dict[str, Any]) -> list[str]:
    if isinstance(foreach, str) and foreach.startswith("${") and foreach.endswith("}"):
        node: Any = params
        for part in foreach[2:-1].split("."):
            node = node[part]
        foreach = node
    if isinstance(foreach, dict):
        return [str(k) for k in foreach]
    return [str(k) for k in foreach]


def stage_code_deps(root: Path, stage: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The generated `stages/...` deps of one dvc.yaml stage definition (templated for foreach)."""
    body = stage.get("do", stage)
    entry = _entry(str(body.get("cmd", "")))
    if entry is None:
        return []
    if "foreach" not in stage:
        return files(root, closure(root, entry))
    keys = _keys(stage["foreach"], params)
    per_key = {k: set(files(root, closure(root, entry, k))) for k in keys}
    common = set.intersection(*per_key.values()) if per_key else set()
    out = set(common)
    templated = set()
    for k, fs in per_key.items():
        for f in fs - common:
            parent, name = f.rsplit("/", 1)
            if name == f"{k}.py":
                templated.add(f"{parent}/${{key}}.py")
            else:
                out.add(f)
    return sorted(out) + sorted(templated)


def _load_yaml(path: Path) -> Any:
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml, yaml.load(path.read_text(encoding="utf-8"))


@dataclass
class Drift:
    stage: str
    missing: list[str]  # in the closure, not in dvc.yaml
    extra: list[str]  # in dvc.yaml, not in the closure


def compare(root: Path) -> list[Drift]:
    from stages.config import load_params

    _, doc = _load_yaml(root / "dvc.yaml")
    params = load_params(root / "params.yaml")
    out = []
    for name, stage in doc["stages"].items():
        body = stage.get("do", stage)
        have = {str(d) for d in body.get("deps") or [] if str(d).startswith(f"{PACKAGE}/")}
        want = set(stage_code_deps(root, stage, params))
        if have != want:
            out.append(Drift(name, sorted(want - have), sorted(have - want)))
    return out


def rewrite(root: Path) -> list[str]:
    """Replace the `stages/...` deps of every stage by the generated ones; returns changed stages."""
    from stages.config import load_params

    yaml, doc = _load_yaml(root / "dvc.yaml")
    params = load_params(root / "params.yaml")
    changed = []
    for name, stage in doc["stages"].items():
        body = stage.get("do", stage)
        want = stage_code_deps(root, stage, params)
        if not want and not body.get("deps"):
            continue
        if body.get("deps") is None:
            from ruamel.yaml.comments import CommentedSeq

            body["deps"] = CommentedSeq()
        deps = body["deps"]
        have = [str(d) for d in deps if str(d).startswith(f"{PACKAGE}/")]
        if have == want:
            continue
        data = [d for d in deps if not str(d).startswith(f"{PACKAGE}/")]
        deps.clear()
        deps.extend([*data, *want])
        changed.append(name)
    if changed:
        import io

        buf = io.StringIO()
        yaml.dump(doc, buf)
        (root / "dvc.yaml").write_text(buf.getvalue(), encoding="utf-8")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.depgraph", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="report drift and exit 1, change nothing")
    args = parser.parse_args(argv)
    root = repo_root()
    undeclared = check_dynamic(root)
    if undeclared:
        print(f"error: import by name without a stages.depgraph.DYNAMIC entry: {undeclared}", file=sys.stderr)
        return 1
    if args.check:
        drift = compare(root)
        for d in drift:
            print(f"{d.stage}: missing {d.missing or '-'}; not imported {d.extra or '-'}")
        if drift:
            print("dvc.yaml code deps differ from the import closure: run `make deps`", file=sys.stderr)
            return 1
        print("dvc.yaml code deps match the import closure")
        return 0
    changed = rewrite(root)
    print(f"dvc.yaml: regenerated code deps of {', '.join(changed)}" if changed else "dvc.yaml: up to date")
    return 0


if __name__ == "__main__":
    run_main(main)
