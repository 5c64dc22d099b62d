"""`make release VERSION=x.y.z` (`python -m stages.release_cut x.y.z [-r REMOTE]`): cut a release.

In order, stopping with a one-line reason at the first problem:

1. refuse a version that is not `x.y.z`, whose tag exists, or that is not newer than every
   `vX.Y.Z` tag;
2. refuse a dirty git tree (modified or untracked files) and a pipeline that is not up to date
   (`dvc status` not clean): a release is the build of a commit, nothing else;
3. refuse, before touching anything, a push the licence policy forbids (`stages.push`: a public
   remote and a non-redistributable product);
4. refresh the split ledger (`python -m stages.split --update-ledger`) and the pack generations
   ledger of every product with `ledger:` (`python -m stages.pack <product> --update-ledger`;
   recording does not change a shard, so the pack stages are `dvc commit`ted, not rerun), then
   `dvc repro`: split reruns with the same assignments (`assigned_by` becomes `ledger`), no pack
   stage follows; `dvc status` must then be clean;
5. push every output through the licence policy;
6. write a CHANGELOG.md entry from the release diff against the previous tag (or the whole
   release, as added samples, for the first one);
7. commit dvc.lock, metrics, ledgers and CHANGELOG.md as "Release vX.Y.Z" and tag `vX.Y.Z`
   (annotated). Pushing git (`git push --follow-tags`) is left to the person: it publishes.

If step 5 or later fails, the working tree holds the refreshed ledger and dvc.lock; `git checkout
-- . && dvc checkout` returns to the released commit's state.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from stages import diff as release_diff
from stages import push as policy
from stages.cli import run_main
from stages.config import load_params
from stages.errors import TidepoolError
from stages.fsutil import repo_root, write_text

VERSION = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
TAG = re.compile(r"^v(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
CHANGELOG = "CHANGELOG.md"
CHANGELOG_HEADER = """# Changelog

Dataset releases of tidepool, newest first. Each entry is written by `make release` from the
release diff against the previous tag (`python -m stages.diff <previous> <this>` shows it again).
"""
# Git-tracked files a release may change; anything else changing means something is wrong.
RELEASE_PATHS = re.compile(r"^(dvc\.lock|CHANGELOG\.md|metrics/.*|data/ledger/.*|(.*/)?\.gitignore)$")


def tool_env() -> dict[str, str]:
    """The environment for dvc and the stages: this interpreter's bin first on PATH (dvc runs
    stage commands through the shell, and they must find the project's python)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def run(cmd: list[str], root: Path, what: str, capture: bool = True) -> str:
    """Run `cmd` in `root`; on failure raise a TidepoolError naming `what` and the last output lines."""
    try:
        proc = subprocess.run(cmd, cwd=root, env=tool_env(), capture_output=capture, text=True, check=False)
    except OSError as exc:
        raise TidepoolError(f"{what}: could not run {cmd[0]}: {exc}") from exc
    if proc.returncode != 0:
        detail = ((proc.stderr or "") + (proc.stdout or "")).strip().splitlines() if capture else []
        tail = " | ".join(detail[-5:]) if detail else f"exit status {proc.returncode}"
        raise TidepoolError(f"{what} failed: {tail}")
    return proc.stdout or ""


def git(root: Path, *args: str, what: str | None = None) -> str:
    return run(["git", *args], root, what or f"git {args[0]}")


def dvc(root: Path, *args: str, capture: bool = True) -> str:
    return run([*policy.dvc_executable(), *args], root, f"dvc {args[0]}", capture=capture)


# --- checks ---------------------------------------------------------------------------------------


def parse_version(version: str) -> tuple[int, int, int]:
    match = VERSION.match(version)
    if not match:
        raise TidepoolError(
            f"version {version!r} is not x.y.z (three non-negative integers, no leading zeros)"
        )
    return int(match[1]), int(match[2]), int(match[3])


def release_tags(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every `vX.Y.Z` tag -> its version."""
    out = {}
    for tag in git(root, "tag", "--list", "v*").split():
        match = TAG.match(tag)
        if match:
            out[tag] = (int(match[1]), int(match[2]), int(match[3]))
    return out


def check_version(root: Path, version: str) -> tuple[str, str | None]:
    """(new tag, previous tag or None), or a TidepoolError."""
    wanted = parse_version(version)
    tag = f"v{version}"
    tags = release_tags(root)
    if tag in tags:
        raise TidepoolError(f"tag {tag} already exists; a release is never re-cut (choose a new version)")
    newer = sorted((v, t) for t, v in tags.items() if v > wanted)
    if newer:
        raise TidepoolError(f"{tag} is not newer than the existing tag {newer[-1][1]}")
    older = sorted((v, t) for t, v in tags.items() if v < wanted)
    return tag, older[-1][1] if older else None


def check_clean_tree(root: Path) -> None:
    status = git(root, "status", "--porcelain", "--untracked-files=normal", what="git status")
    lines = [line for line in status.splitlines() if line.strip()]
    if lines:
        shown = ", ".join(line[3:] for line in lines[:8]) + (
            f" and {len(lines) - 8} more" if len(lines) > 8 else ""
        )
        raise TidepoolError(
            f"the git tree is not clean ({len(lines)} changed or untracked: {shown}); "
            "a release is the build of a commit: commit or remove these first"
        )


def dvc_status(root: Path) -> dict[str, Any]:
    raw = dvc(root, "status", "--json")
    try:
        status = json.loads(raw or "{}")
    except ValueError as exc:
        raise TidepoolError(f"`dvc status --json` printed something that is not JSON: {raw[:200]!r}") from exc
    return status if isinstance(status, dict) else {}


def check_pipeline_up_to_date(root: Path) -> None:
    status = dvc_status(root)
    if status:
        stages = sorted(status)
        shown = ", ".join(stages[:8]) + (f" and {len(stages) - 8} more" if len(stages) > 8 else "")
        raise TidepoolError(
            f"the pipeline is not up to date ({shown} changed or missing their outputs); run `dvc repro` "
            "(or `dvc pull`) and commit dvc.lock first"
        )


# --- steps ----------------------------------------------------------------------------------------


def ledger_products(params: dict[str, Any]) -> list[str]:
    return sorted(p for p, spec in (params.get("products") or {}).items() if (spec or {}).get("ledger"))


def refresh_ledgers(root: Path, params: dict[str, Any]) -> list[str]:
    """Record this release's split assignments and pack generations; returns the ledger paths.

    The split ledger is a dependency of split: the next `dvc repro` reruns split, which writes the
    same assignments, so no pack stage follows. A pack generations ledger is a dependency of its
    pack stage, but recording a built release does not change its order (docs/pack.md,
    "Growth"): packing again would write the very same shards. So the pack stages are not rerun:
    `dvc commit` records the new ledger hash in dvc.lock, after checking that the ledger is the
    only thing that changed for them.
    """
    run(
        [sys.executable, "-m", "stages.split", "--update-ledger"],
        root,
        "python -m stages.split --update-ledger",
    )
    paths = [str(params["split"]["ledger"])]
    packs = ledger_products(params)
    for product in packs:
        run(
            [sys.executable, "-m", "stages.pack", product, "--update-ledger"],
            root,
            f"pack {product} --update-ledger",
        )
        paths.append(str(params["products"][product]["ledger"]))
    if packs:
        status = dvc_status(root)
        stages = []
        for product in packs:
            stage = f"pack@{product}"
            ledger = str(params["products"][product]["ledger"])
            changes = status.get(stage, [])
            if not changes:
                continue
            if changes != [{"changed deps": {ledger: "modified"}}]:
                raise TidepoolError(
                    f"after recording its ledger, {stage} shows changes besides {ledger}: {changes}; "
                    "nothing was committed"
                )
            stages.append(stage)
        if stages:
            dvc(root, "commit", "--force", *stages)
    return paths


def changelog_entry(root: Path, tag: str, previous: str | None) -> str:
    """The CHANGELOG section of `tag`: the release diff against `previous` (or against nothing)."""
    d = release_diff.release_diff(root, previous or release_diff.EMPTY, release_diff.WORKSPACE)
    d["b"]["rev"] = tag
    body = release_diff.to_markdown(d, heading="###")
    # The diff's own title line repeats what the entry heading says.
    body = body.split("\n", 2)[2] if body.startswith("### Dataset diff") else body
    if previous:
        intro = f"Changes since {previous} (`{d['a']['commit'][:10]}`)."
    else:
        intro = "Initial release: everything below is new."
    return f"## {tag}\n\n{intro}\n\n{body.strip()}\n"


def insert_entry(text: str, entry: str) -> str:
    """CHANGELOG.md with `entry` above the newest entry (the header is kept or created)."""
    if not text.strip():
        text = CHANGELOG_HEADER
    lines = text.split("\n")
    first = next((i for i, line in enumerate(lines) if line.startswith("## ")), None)
    if first is None:
        return text.rstrip("\n") + "\n\n" + entry
    head = "\n".join(lines[:first]).rstrip("\n")
    rest = "\n".join(lines[first:])
    return head + "\n\n" + entry + "\n" + rest.rstrip("\n") + "\n"


def release(
    root: Path,
    version: str,
    remote: str | None = None,
    skip_restricted: bool = False,
    push: bool = True,
) -> str:
    """Cut release `version` in `root`; returns the tag."""
    params = load_params(root / "params.yaml")
    tag, previous = check_version(root, version)
    check_clean_tree(root)
    check_pipeline_up_to_date(root)
    if push:
        # The licence check needs nothing but params and dvc.yaml: refuse before changing a file.
        policy.plan_push(
            params, policy.pipeline_outputs(root), policy.remote_info(root), remote, (), skip_restricted
        )
    print(f"release {tag}: refreshing the ledgers", flush=True)
    ledgers = refresh_ledgers(root, params)
    print(f"release {tag}: dvc repro", flush=True)
    dvc(root, "repro", capture=False)
    check_pipeline_up_to_date(root)
    if push:
        print(f"release {tag}: pushing through the licence policy", flush=True)
        policy.push(root, params, remote, (), skip_restricted, env=tool_env())
    print(f"release {tag}: writing {CHANGELOG}", flush=True)
    path = root / CHANGELOG
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    write_text(path, insert_entry(text, changelog_entry(root, tag, previous)))

    changed = [
        line[3:] for line in git(root, "status", "--porcelain", "--untracked-files=all").splitlines() if line
    ]
    unexpected = [p for p in changed if not (RELEASE_PATHS.match(p.strip('"')) or p.strip('"') in ledgers)]
    if unexpected:
        raise TidepoolError(
            f"release {tag}: files outside dvc.lock, metrics/, the ledgers and {CHANGELOG} changed: "
            f"{unexpected[:8]}; nothing was committed (a stage wrote where it should not)"
        )
    git(root, "add", "--", *sorted({"dvc.lock", CHANGELOG, *ledgers, *(p.strip('"') for p in changed)}))
    git(root, "commit", "--quiet", "-m", f"Release {tag}", what="git commit")
    git(root, "tag", "-a", tag, "-m", f"tidepool {tag}", what="git tag")
    print(f"release {tag}: committed and tagged. Publish with: git push --follow-tags", flush=True)
    return tag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.release_cut", description=__doc__.split("\n")[0])
    parser.add_argument("version", help="x.y.z; the tag is vX.Y.Z")
    parser.add_argument("-r", "--remote", default=None, help="DVC remote to push to (default: DVC's default)")
    parser.add_argument(
        "--skip-restricted",
        action="store_true",
        help="on a public remote, push what the licence policy allows and leave the rest out",
    )
    parser.add_argument("--no-push", action="store_true", help="do not push (tests, dry runs)")
    args = parser.parse_args(argv)
    release(repo_root(), args.version, args.remote, args.skip_restricted, push=not args.no_push)
    return 0


if __name__ == "__main__":
    run_main(main)
