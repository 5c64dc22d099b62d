"""Checks of a pull request's head commit, for the dataset-diff comment: is it a build, is it pushed?

    python -m stages.pr_check [--repo PATH] [--no-remote REASON] [--json]

Both work on a bare checkout (no `dvc pull`: CI has no data and should not download a dataset):

- **dvc.lock is current**: `dvc status` of the pipeline, keeping only what data cannot explain:
  a code or table dependency that changed, was added or deleted, and params that changed. A
  dependency that is, lies inside or contains another stage's output (`data/raw/mermaid`,
  `data/raw`) differs only because the data is not pulled, so it is not a finding; instead
  dvc.lock must agree with itself: every dependency on another stage's output records that
  output's hash.
- **outputs are pushed**: `dvc status -c` (each output against its remote): a file that is
  `new` (only in a local cache) or `missing` (nowhere) is not in the remote, so reviewers and
  users could not pull the head commit. Needs the remote's credentials; `--no-remote REASON`
  reports it as not checked instead (pull requests from forks get no secrets).

Prints a markdown block (or `--json`); exits 1 when a check fails, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from stages.cli import run_main
from stages.errors import TidepoolError
from stages.fsutil import dumps_json, repo_root

SHOWN = 10  # findings listed per check


def _dvc(root: Path, *args: str) -> Any:
    exe = Path(sys.executable).parent / "dvc"  # the venv's dvc; CI's python has it on PATH too
    cmd = [str(exe) if exe.exists() else "dvc", *args]
    shown = f"dvc {' '.join(args)}"
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise TidepoolError(f"`{shown}` in {root} failed: {detail[-1] if detail else proc.returncode}")
    try:
        return json.loads(proc.stdout or "{}")
    except ValueError as exc:
        raise TidepoolError(f"`{shown}` printed something that is not JSON: {proc.stdout[:200]!r}") from exc


def lock_outputs(lock: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    """output path -> (stage, md5) for every output recorded in dvc.lock."""
    out = {}
    for stage, entry in (lock.get("stages") or {}).items():
        for o in entry.get("outs") or []:
            out[o["path"]] = (stage, o.get("md5"))
    return out


def _overlaps_output(path: str, outputs: dict[str, Any]) -> bool:
    """True when `path` is, lies inside or contains an output recorded in dvc.lock."""
    prefix = path.rstrip("/") + "/"
    return any(path == out or path.startswith(out.rstrip("/") + "/") or out.startswith(prefix)
               for out in outputs)  # fmt: skip


def lock_self_consistency(lock: dict[str, Any]) -> list[str]:
    """Dependencies on another stage's output whose hash is not that output's hash in dvc.lock."""
    outputs = lock_outputs(lock)
    problems = []
    for stage, entry in sorted((lock.get("stages") or {}).items()):
        for dep in entry.get("deps") or []:
            producer = outputs.get(dep["path"])
            if producer and dep.get("md5") != producer[1]:
                problems.append(f"`{stage}` used `{dep['path']}` at {str(dep.get('md5'))[:12]}, but "
                                f"`{producer[0]}` recorded {str(producer[1])[:12]}")  # fmt: skip
    return problems


def stale_stages(status: dict[str, Any], lock: dict[str, Any]) -> list[str]:
    """From `dvc status --json`: stages whose code, tables or params differ from dvc.lock."""
    outputs = lock_outputs(lock)
    findings = []
    for stage, changes in sorted(status.items()):
        reasons = []
        for change in changes if isinstance(changes, list) else [changes]:
            if change == "always changed" or not isinstance(change, dict):
                continue
            for path, what in (change.get("changed deps") or {}).items():
                if isinstance(what, dict):  # params: {key: "modified" | "new" | "deleted"}
                    reasons += [f"param `{key}` {state}" for key, state in sorted(what.items())]
                elif _overlaps_output(path, outputs):
                    continue  # data: absent or partial where nothing is pulled (see the docstring)
                else:
                    reasons.append(f"`{path}` {what}")
            for path, what in (change.get("changed outs") or {}).items():
                if what not in ("deleted", "not in cache"):
                    reasons.append(f"output `{path}` {what}")
        if reasons:
            findings.append(f"`{stage}`: " + ", ".join(reasons[:4]) + (" ..." if len(reasons) > 4 else ""))
    return findings


def unpushed(cloud: dict[str, Any]) -> list[str]:
    """From `dvc status -c --json`: files in no remote (`new`: only in a cache; `missing`: nowhere)."""
    return sorted(path for path, state in cloud.items() if state in ("new", "missing"))


def check(root: Path, no_remote: str | None = None) -> dict[str, Any]:
    lock_path = root / "dvc.lock"
    if not lock_path.exists():
        raise TidepoolError(f"{lock_path}: not found; the head commit has no build to check")
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
    stale = stale_stages(_dvc(root, "status", "--json"), lock) + lock_self_consistency(lock)
    result: dict[str, Any] = {"lock": {"ok": not stale, "findings": stale}}
    if no_remote:
        result["pushed"] = {"ok": None, "reason": no_remote, "findings": []}
    else:
        missing = unpushed(_dvc(root, "status", "--cloud", "--json"))
        result["pushed"] = {"ok": not missing, "findings": missing}
    return result


def _listed(findings: list[str]) -> list[str]:
    lines = [f"  - {f}" if f.startswith("`") else f"  - `{f}`" for f in findings[:SHOWN]]
    if len(findings) > SHOWN:
        lines.append(f"  - ... and {len(findings) - SHOWN} more")
    return lines


def to_markdown(result: dict[str, Any]) -> str:
    lock, pushed = result["lock"], result["pushed"]
    out = ["### Checks of the head commit", ""]
    if lock["ok"]:
        out.append("- ✅ `dvc.lock` is current: no stage's code, tables or params differ from it "
                   "(`dvc status`).")  # fmt: skip
    else:
        out.append(f"- ❌ `dvc.lock` is not current ({len(lock['findings'])}): run `dvc repro` and "
                   "commit dvc.lock.")  # fmt: skip
        out += _listed(lock["findings"])
    if pushed["ok"] is None:
        out.append(f"- ⚪ Outputs pushed: not checked ({pushed['reason']}).")
    elif pushed["ok"]:
        out.append("- ✅ Every output in `dvc.lock` is in the DVC remote (`dvc status -c`).")
    else:
        out.append(f"- ❌ {len(pushed['findings'])} output file(s) are not in the DVC remote: run "
                   "`python -m stages.push` (reviewers cannot pull them).")  # fmt: skip
        out += _listed(pushed["findings"])
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.pr_check", description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, default=None, help="the project (default: the current one)")
    parser.add_argument("--no-remote", metavar="REASON", default=None,
                        help="do not check the remote; say REASON instead")  # fmt: skip
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = check((args.repo or repo_root()).resolve(), args.no_remote)
    sys.stdout.write(dumps_json(result) if args.json else to_markdown(result))
    return 0 if result["lock"]["ok"] and result["pushed"]["ok"] is not False else 1


if __name__ == "__main__":
    run_main(main)
