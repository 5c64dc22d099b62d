"""`dvc push` under the licence policy.

`python -m stages.push [-r REMOTE] [--skip-restricted] [--check] [TARGET ...]`

Some sources may not be redistributed (iNaturalist 2017: "research only, images not
redistributable"). params.yaml says so per source (`sources.<s>.redistributable: false`) and says
per DVC remote whether the world can read it (`remotes.<name>.public`). This module refuses to
send anything derived from a non-redistributable source to a public remote:

- `data/raw/<s>` (the upstream images themselves) and `data/interim/<s>` (its ingest tables) for
  every non-redistributable source `s`;
- `data/release/<p>` (shards, manifest, card) for every product `p` with such a source.

A remote that params.yaml does not declare is refused outright: an unknown remote might be public.

Two layers protect the data (docs/releases.md, "Licence policy"):

1. This command. It resolves the remote (`-r`, else DVC's default), and for a public remote refuses
   the push, naming every restricted output it would send, unless `--skip-restricted` is given;
   then it pushes every other cached output as explicit targets. `make demo` and
   `make release` push through it.
2. DVC itself, for a bare `dvc push -r <public>`. DVC skips an output whose dvc.yaml entry carries
   `remote: <name>` when a *different* remote is requested (`dvc/repo/fetch.py`, `outs_filter`:
   `not (remote and out.remote and remote != out.remote)`), and sends it to `<name>` when none is.
   So restricted outputs pinned to a private remote never leave for another remote through
   `dvc push`, whatever `-r` says. `--check` verifies that every restricted output is pinned to a
   declared, non-public remote. What DVC does not guard: pushes of old revisions that predate the
   pin (`--all-commits`, `--all-tags`), a pinned remote that is itself made public, copying the
   cache by other means.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from stages.cli import run_main
from stages.config import load_params, require
from stages.errors import ConfigError, TidepoolError
from stages.fsutil import repo_root


@dataclass(frozen=True)
class Restricted:
    """A path prefix that may not reach a public remote, and why."""

    path: str  # relative to the repo root, POSIX
    reason: str


@dataclass(frozen=True)
class PipelineOutput:
    path: str  # relative to the repo root, POSIX
    stage: str  # the stage's address, e.g. fetch@inat2017
    remote: str | None  # the dvc.yaml `remote:` pin (None when absent or empty)
    cached: bool  # False for `cache: false` outputs (git tracks those; DVC never pushes them)
    can_push: bool  # False for `push: false`


@dataclass(frozen=True)
class RemoteInfo:
    names: tuple[str, ...]  # remotes configured in .dvc/config (+ config.local)
    default: str | None


# --- policy ---------------------------------------------------------------------------------------


def redistributable(params: dict[str, Any], source: str) -> bool:
    """A source is redistributable unless params say `redistributable: false` (as pack reads it)."""
    return bool(require(params, f"sources.{source}").get("redistributable", True))


def restricted_paths(params: dict[str, Any]) -> list[Restricted]:
    """Every path prefix the policy keeps off public remotes, sorted by path."""
    sources = require(params, "sources")
    closed = {s: sources[s] for s in sources if not redistributable(params, s)}
    out: list[Restricted] = []
    for source, spec in closed.items():
        terms = spec.get("license") or "no licence stated"
        why = f"source {source} is not redistributable ({terms})"
        out.append(Restricted(f"data/raw/{source}", f"{why}: its upstream files"))
        out.append(Restricted(f"data/interim/{source}", f"{why}: its ingest tables"))
    for name, spec in (params.get("products") or {}).items():
        holding = sorted(set(spec.get("sources") or []) & set(closed))
        if holding:
            out.append(
                Restricted(
                    f"data/release/{name}",
                    f"product {name} holds images of non-redistributable source(s) {', '.join(holding)}",
                )
            )
    return sorted(out, key=lambda r: r.path)


def remote_is_public(params: dict[str, Any], remote: str) -> bool:
    """`remotes.<remote>.public` from params; an undeclared remote is a ConfigError."""
    declared = params.get("remotes") or {}
    if not isinstance(declared, dict) or remote not in declared:
        raise ConfigError(
            f"params.yaml: DVC remote {remote!r} is not declared under `remotes:`; declare it with "
            f"`remotes: {{{remote}: {{public: true}}}}` (or false) so the licence policy knows "
            "who can read it"
        )
    spec = declared[remote]
    public = spec.get("public") if isinstance(spec, dict) else None
    if not isinstance(public, bool):
        raise ConfigError(f"params.yaml: remotes.{remote}.public must be true or false, got {public!r}")
    return public


def _inside(path: str, prefix: str) -> bool:
    p, q = PurePosixPath(path), PurePosixPath(prefix)
    return p == q or q in p.parents


def _overlaps(a: str, b: str) -> bool:
    return _inside(a, b) or _inside(b, a)


def restricted_hits(paths: Iterable[str], rules: Sequence[Restricted]) -> list[tuple[str, Restricted]]:
    """(path, rule) for every path that is, contains or lies inside a restricted prefix."""
    return sorted(
        {(p, r) for p in paths for r in rules if _overlaps(p, r.path)}, key=lambda pr: (pr[0], pr[1].path)
    )


def pin_problems(params: dict[str, Any], outputs: Sequence[PipelineOutput], remotes: RemoteInfo) -> list[str]:
    """What keeps DVC's own guard (per-output `remote:` pins) from covering the policy."""
    problems = []
    for name in remotes.names:
        try:
            remote_is_public(params, name)
        except ConfigError as exc:
            problems.append(str(exc))
    pushable = [o.path for o in outputs if o.cached and o.can_push]
    for path, rule in restricted_hits(pushable, restricted_paths(params)):
        out = next(o for o in outputs if o.path == path)
        if out.remote is None:
            problems.append(
                f"{path} ({out.stage}): {rule.reason}, but dvc.yaml does not pin it to a private remote "
                f"(`remote: <private remote>`), so a bare `dvc push -r <public remote>` would send it"
            )
        elif out.remote not in remotes.names:
            problems.append(f"{path} ({out.stage}): pinned to remote {out.remote!r}, which is not configured")
        else:
            try:
                if remote_is_public(params, out.remote):
                    problems.append(
                        f"{path} ({out.stage}): {rule.reason}, but is pinned to public remote {out.remote!r}"
                    )
            except ConfigError:
                pass  # reported above
    return problems


# --- the repository -------------------------------------------------------------------------------


def pipeline_outputs(root: Path) -> list[PipelineOutput]:
    """Every output of every stage (and .dvc file) in the project, from DVC's own index."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(os.fspath(root)) as repo:
            outs = []
            for out in repo.index.outs:
                rel = Path(out.fs_path).resolve().relative_to(root.resolve()).as_posix()
                outs.append(
                    PipelineOutput(
                        path=rel,
                        stage=out.stage.addressing,
                        remote=out.remote or None,
                        cached=bool(out.use_cache),
                        can_push=bool(out.can_push),
                    )
                )
    except DvcException as exc:
        raise TidepoolError(f"{root}: DVC could not read the pipeline: {exc}") from exc
    return sorted(outs, key=lambda o: o.path)


def remote_info(root: Path) -> RemoteInfo:
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(os.fspath(root)) as repo:
            names = tuple(sorted(repo.config.get("remote", {})))
            default = repo.config.get("core", {}).get("remote")
    except DvcException as exc:
        raise TidepoolError(f"{root}: DVC could not read its config: {exc}") from exc
    return RemoteInfo(names, default)


def dvc_executable() -> list[str]:
    """The venv's dvc (beside this interpreter), else `python -m dvc`."""
    exe = Path(sys.executable).parent / "dvc"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dvc"]


def _stage_targets(targets: Sequence[str], outputs: Sequence[PipelineOutput]) -> list[str]:
    """Targets as output paths: a stage address (`fetch@inat2017`, `dvc.yaml:pack@x`) becomes its outputs."""
    paths = []
    for target in targets:
        address = target.split(":", 1)[1] if target.startswith("dvc.yaml:") else target
        outs = [o.path for o in outputs if o.stage == address]
        paths.extend(outs or [PurePosixPath(Path(target).as_posix()).as_posix().rstrip("/")])
    return paths


# --- push -----------------------------------------------------------------------------------------


@dataclass
class PushPlan:
    remote: str
    public: bool
    targets: list[str] | None  # for `dvc push`: None = everything, [] = nothing the policy allows
    skipped: list[tuple[str, Restricted]]  # restricted outputs left out (--skip-restricted)


def plan_push(
    params: dict[str, Any],
    outputs: Sequence[PipelineOutput],
    remotes: RemoteInfo,
    remote: str | None = None,
    targets: Sequence[str] = (),
    skip_restricted: bool = False,
) -> PushPlan:
    """Decide what `dvc push` may send where, or raise a TidepoolError saying why not."""
    name = remote or remotes.default
    if not name:
        raise ConfigError("no DVC remote given (-r) and no default remote (`dvc remote default`) configured")
    if name not in remotes.names:
        configured = list(remotes.names) or "none"
        raise ConfigError(f"DVC remote {name!r} is not configured (configured: {configured})")
    public = remote_is_public(params, name)
    given = list(targets) or None
    if not public:
        return PushPlan(name, False, given, [])
    pushable = [o.path for o in outputs if o.cached and o.can_push]
    wanted = _stage_targets(targets, outputs) if targets else pushable
    # Only prefixes some output overlaps matter: a restricted path no stage writes is no risk, and
    # a target like `data` is caught because it contains a restricted output.
    rules = [r for r in restricted_paths(params) if any(_overlaps(o, r.path) for o in pushable)]
    hits = restricted_hits(wanted, rules)
    if not hits:
        return PushPlan(name, True, given, [])
    if not skip_restricted:
        blocked = sorted({r for _, r in hits}, key=lambda r: r.path)
        lines = "\n".join(f"  - {r.path}: {r.reason}" for r in blocked)
        raise TidepoolError(
            f"licence policy: refusing to push to remote {name!r}, which params.yaml marks public "
            f"(remotes.{name}.public: true). These outputs may not be redistributed:\n{lines}\n"
            "Push them to a private remote, or rerun with --skip-restricted to push everything else."
        )
    blocked_paths = {r.path for _, r in hits}
    allowed = [
        o
        for o in pushable
        if not any(_overlaps(o, b) for b in blocked_paths) and any(_overlaps(o, t) for t in wanted)
    ]
    skipped = [(o, r) for o in pushable for r in rules if r.path in blocked_paths and _overlaps(o, r.path)]
    return PushPlan(name, True, allowed, sorted(set(skipped), key=lambda pr: pr[0]))


def push(
    root: Path,
    params: dict[str, Any],
    remote: str | None = None,
    targets: Sequence[str] = (),
    skip_restricted: bool = False,
    jobs: int | None = None,
    env: dict[str, str] | None = None,
) -> PushPlan:
    """Check the policy, then run `dvc push -r <remote> [targets]` in `root`."""
    outputs = pipeline_outputs(root)
    plan = plan_push(params, outputs, remote_info(root), remote, targets, skip_restricted)
    for path, rule in plan.skipped:
        print(f"push: leaving out {path}: {rule.reason}", file=sys.stderr)
    if plan.targets == []:
        print(f"push: nothing the licence policy allows to send to {plan.remote!r}", file=sys.stderr)
        return plan
    cmd = [*dvc_executable(), "push", "-r", plan.remote, *(["-j", str(jobs)] if jobs else [])]
    cmd += plan.targets or []
    what = (
        " ".join(plan.targets)
        if plan.targets and len(plan.targets) <= 8
        else (f"<{len(plan.targets)} outputs>" if plan.targets else "(everything)")
    )
    print(f"$ dvc push -r {plan.remote} {what}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=root, env=env, check=False)
    if proc.returncode != 0:
        raise TidepoolError(f"`dvc push -r {plan.remote}` exited with status {proc.returncode}")
    return plan


def check(root: Path, params: dict[str, Any]) -> list[str]:
    """Policy report lines and problems (`--check`)."""
    outputs = pipeline_outputs(root)
    remotes = remote_info(root)
    for name in remotes.names:
        try:
            kind = "public" if remote_is_public(params, name) else "private"
        except ConfigError:
            kind = "UNDECLARED"
        default = " (default)" if name == remotes.default else ""
        print(f"remote {name}{default}: {kind}")
    for path, rule in restricted_hits([o.path for o in outputs if o.cached], restricted_paths(params)):
        out = next(o for o in outputs if o.path == path)
        print(f"restricted {path} ({out.stage}): pinned to {out.remote or 'NOTHING'}; {rule.reason}")
    return pin_problems(params, outputs, remotes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.push", description=__doc__.split("\n")[0])
    parser.add_argument("targets", nargs="*", help="outputs or stages to push (default: all)")
    parser.add_argument("-r", "--remote", default=None, help="DVC remote (default: DVC's default remote)")
    parser.add_argument("-j", "--jobs", type=int, default=None)
    parser.add_argument(
        "--skip-restricted",
        action="store_true",
        help="on a public remote, push everything the policy allows and leave the rest out",
    )
    parser.add_argument(
        "--check", action="store_true", help="report the policy and the dvc.yaml pins; exit 1 on a problem"
    )
    parser.add_argument("--params", type=Path, default=None)
    args = parser.parse_args(argv)
    root = repo_root()
    params = load_params(args.params)
    if args.check:
        problems = check(root, params)
        for problem in problems:
            print(f"problem: {problem}", file=sys.stderr)
        return 1 if problems else 0
    push(root, params, args.remote, args.targets, args.skip_restricted, args.jobs)
    return 0


if __name__ == "__main__":
    run_main(main)
