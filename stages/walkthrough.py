"""`make walkthrough`: the whole release story on loopback, step by step, as a newcomer would run it.

    python -m stages.walkthrough [--workdir build/walkthrough] [--scale 1] [--grow-scale 1.5]

In a scratch project (a copy of this repository's files, its own git history) under `--workdir`:

 1. generate the sample upstreams at `--scale` and serve them on loopback (S3 + HTTP), the DVC
    remote bucket kept in `<workdir>/s3-store`;
 2. `dvc repro`, commit, `make release VERSION=0.1.0`;
 3. grow the sources (the generator at `--grow-scale`: a superset, existing files unchanged), bump
    every snapshot in params.yaml, `dvc repro`, commit, `make release VERSION=0.2.0`;
 4. stop the loopback and start a new one from the store (new ports): the pushed releases survive;
 5. a fresh `git clone`, `git checkout v0.1.0 && dvc pull`, then `dvc status` must be clean;
 6. `dvc import` of one product into an empty DVC project, `dvc get` of another;
 7. `make diff A=v0.1.0 B=v0.2.0 > diff.md` (with the pictures in `build/diff/`).

Each step prints one line saying what it runs and one saying what came of it; the commands' own
output goes to `<workdir>/logs/NN-<step>.log` (the last lines are shown when a step fails).

DVC finds the loopback S3 through the environment only (`AWS_ENDPOINT_URL_S3`,
`Loopback.remote_env`), never through `.dvc/config.local`: no file is left naming a port that
died with the servers, and `dvc import` records no endpoint in the `.dvc` file it writes. For a
real non-AWS endpoint, `--remote-config endpointurl=<url>` does the same per command and is
recorded in the import's `.dvc` file (docs/releases.md).

The functions below are the steps; tests/test_release.py runs steps 5 to 7 on its own two-release
build, so CI walks the same path without a second pair of builds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from stages.cli import run_main
from stages.errors import TidepoolError
from stages.fsutil import repo_root

GIT_ID = {
    "GIT_AUTHOR_NAME": "tidepool walkthrough",
    "GIT_AUTHOR_EMAIL": "walkthrough@tidepool.invalid",
    "GIT_COMMITTER_NAME": "tidepool walkthrough",
    "GIT_COMMITTER_EMAIL": "walkthrough@tidepool.invalid",
}
GROWN_SNAPSHOT = "2099-01-01"  # any new value: a snapshot bump is what makes fetch run again
IMPORT_PRODUCT = "reef-points"
GET_PRODUCT = "coast-seg"
MARKER = ".tidepool-walkthrough"


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for the commands: this interpreter's bin first on PATH (dvc runs stage
    commands through the shell), no progress bars in logs, no parent make's flags."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["TIDEPOOL_PROGRESS"] = "0"
    env.update(GIT_ID)
    env.update(extra or {})
    return env


def dvc_cmd() -> list[str]:
    from stages.loopback import dvc_command

    return dvc_command()


def make_cmd(*args: str) -> list[str]:
    """`make ARGS` with this interpreter's venv, so the project copy does not build a venv of its own."""
    venv = Path(sys.prefix)
    return ["make", "--no-print-directory", f"VENV={venv}", f"PY={sys.executable}", *args]


def display(cmd: list[str]) -> str:
    """`cmd` as a person types it: the venv's dvc and python by name, make without our overrides."""
    dvc = dvc_cmd()
    if cmd[: len(dvc)] == dvc:
        cmd = ["dvc", *cmd[len(dvc):]]
    elif cmd[:1] == [sys.executable]:
        cmd = ["python", *cmd[1:]]
    elif cmd[:1] == ["make"]:
        cmd = ["make", *(a for a in cmd[1:] if not a.startswith(("VENV=", "PY=", "--no-print-directory")))]
    return " ".join(f"'{a}'" if (" " in a or not a) else a for a in cmd)


def _venv_ready() -> bool:
    return (Path(sys.prefix) / ".requirements-installed").exists() and shutil.which("make") is not None


class Walkthrough:
    """Runs commands for the steps, logging their output, and reports each step in two lines."""

    def __init__(self, work: Path, env: dict[str, str], echo: Callable[[str], None] = print) -> None:
        self.work = work
        self.env = env
        self.echo = echo
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.number = 0
        self._log: Path | None = None

    # -- plumbing --------------------------------------------------------------------------------

    @contextmanager
    def step(self, title: str) -> Iterator[dict[str, str]]:
        """Print `[n] title`, run the block, print its outcome (`result["ok"]`) or why it failed."""
        self.number += 1
        slug = "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")[:40]
        self._log = self.logs / f"{self.number:02d}-{slug}.log"
        self._log.write_text("", encoding="utf-8")
        self.echo(f"[{self.number}] {title}")
        result: dict[str, str] = {}
        started = time.monotonic()
        try:
            yield result
        except TidepoolError as exc:
            self.echo(f"    FAILED: {exc}")
            self.echo(f"    log: {self._log}")
            raise
        seconds = time.monotonic() - started
        self.echo(f"    ok ({seconds:.0f}s): {result.get('ok', 'done')}")

    def sh(self, cmd: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True,
           stdout: Path | None = None, quiet: bool = False) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run `cmd`; its output goes to the step's log (stdout to `stdout` when given). The command
        is printed as a person would type it (`dvc`, `make`, `python`), unless `quiet`."""
        shown = display(cmd)
        if not quiet:
            self.echo(f"    $ {shown}" + (f" > {stdout.name}" if stdout is not None else ""))
        log = self._log or (self.logs / "commands.log")
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"$ (cd {cwd} && {shown})\n")
        proc = subprocess.run(cmd, cwd=cwd, env=env or self.env, capture_output=True, text=True, check=False)
        with open(log, "a", encoding="utf-8") as fh:
            if stdout is None:
                fh.write(proc.stdout)
            fh.write(proc.stderr)
        if stdout is not None:
            stdout.write_text(proc.stdout, encoding="utf-8")
        if check and proc.returncode != 0:
            tail = " | ".join((proc.stderr + proc.stdout).strip().splitlines()[-4:])
            raise TidepoolError(f"`{shown}` exited {proc.returncode}: {tail}")
        return proc

    def make(self, cwd: Path, *args: str, stdout: Path | None = None) -> subprocess.CompletedProcess[str]:
        """`make ARGS` in `cwd`, or the module the target runs when no installed venv is at hand."""
        if _venv_ready():
            return self.sh(make_cmd(*args), cwd, stdout=stdout)
        target, *rest = args
        values = dict(a.split("=", 1) for a in rest)
        if target == "release":
            cmd = [sys.executable, "-m", "stages.release_cut", values["VERSION"]]
        elif target == "diff":
            cmd = [sys.executable, "-m", "stages.diff", values["A"], values["B"], "--pictures", "build/diff"]
        else:
            raise TidepoolError(f"no fallback for make {target}")
        return self.sh(cmd, cwd, stdout=stdout)

    def git(self, cwd: Path, *args: str, quiet: bool = False) -> str:
        return self.sh(["git", *args], cwd, quiet=quiet).stdout

    def dvc(self, cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
        return self.sh([*dvc_cmd(), *args], cwd, env=env).stdout

    # -- producer side ---------------------------------------------------------------------------

    def new_project(self, dest: Path, source: Path) -> Path:
        """Copy `source`'s files (tracked and new, not ignored) into `dest` and commit them."""
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                                cwd=source, capture_output=True, check=True).stdout.decode()  # fmt: skip
        for rel in sorted(p for p in listed.split("\0") if p):
            src = source / rel
            if src.is_file():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)
        self.git(dest, "init", "-q", "-b", "main", quiet=True)
        self.git(dest, "add", "-A", quiet=True)
        self.git(dest, "commit", "-q", "-m", "tidepool (walkthrough copy)", quiet=True)
        return dest

    def build(self, project: Path, message: str) -> int:
        """`dvc repro`, then commit what it changed; returns how many stages ran."""
        out = self.dvc(project, "repro")
        self.git(project, "add", "-A", quiet=True)
        if self.git(project, "status", "--porcelain", quiet=True).strip():
            self.git(project, "commit", "-q", "-m", message)
        return sum(1 for line in out.splitlines() if line.startswith("Running stage '"))

    def release(self, project: Path, version: str) -> str:
        self.make(project, "release", f"VERSION={version}")
        tag = f"v{version}"
        return self.git(project, "rev-parse", "--short", tag, quiet=True).strip()

    def grow(self, project: Path, upstream: Path, scale: float, lb: Any, overlay: Path) -> dict[str, int]:
        """Grow the sample upstreams to `scale`, re-seed the loopback, bump every snapshot and
        commit; returns how many upstream files are new, rewritten and unchanged."""
        from stages.samplegen.__main__ import generate_all

        before = _digests(upstream)
        generate_all(upstream, scale=scale, jobs=os.cpu_count() or 1)
        lb.reseed()
        lb.write_overlay(overlay)  # the overlay carries the upstream checksums, which grew too
        after = _digests(upstream)
        params_path = project / "params.yaml"
        params = yaml.safe_load(params_path.read_text(encoding="utf-8"))
        bumped = bump_snapshots(params)
        # Edit the lines, not a YAML round trip: the file's comments are documentation.
        text = params_path.read_text(encoding="utf-8")
        lines = [_bump_line(line) for line in text.splitlines(keepends=True)]
        params_path.write_text("".join(lines), encoding="utf-8")
        if yaml.safe_load(params_path.read_text(encoding="utf-8")) != bumped:
            raise TidepoolError(f"{params_path}: bumping the snapshots changed more than the snapshots")
        self.git(project, "commit", "-q", "-am", f"sources grew (scale {scale}); snapshots bumped")
        return {
            "new": len(set(after) - set(before)),
            "rewritten": sum(1 for k in before if k in after and after[k] != before[k]),
            "unchanged": sum(1 for k in before if after.get(k) == before[k]),
            "gone": len(set(before) - set(after)),
        }

    # -- consumer side (tests/test_release.py runs these on its own build) ------------------------

    def fresh_clone_pull(self, project: Path, tag: str, dest: Path) -> dict[str, Any]:
        """`git clone`, `git checkout <tag>`, `dvc pull`; `dvc status` must then be clean."""
        self.git(project.parent, "clone", "-q", str(project), str(dest))
        self.git(dest, "checkout", "-q", tag)
        self.dvc(dest, "pull")
        status = json.loads(self.dvc(dest, "status", "--json") or "{}")
        if status:
            raise TidepoolError(f"{dest}: `dvc status` after pulling {tag} is not clean: {sorted(status)}")
        files = sum(1 for p in (dest / "data").rglob("*") if p.is_file())
        return {"files": files, "status": status, "config_local": (dest / ".dvc" / "config.local").exists()}

    def import_product(self, project: Path, product: str, rev: str, dest: Path) -> dict[str, Any]:
        """An empty DVC project, then `dvc import <project> data/release/<product> --rev <rev>`."""
        dest.mkdir(parents=True, exist_ok=True)
        self.git(dest, "init", "-q", "-b", "main")
        self.dvc(dest, "init", "-q")
        self.dvc(dest, "import", str(project), f"data/release/{product}", "--rev", rev, "-o", product)
        record = yaml.safe_load((dest / f"{product}.dvc").read_text(encoding="utf-8"))
        checked = verify_shards(dest / product)
        return {"record": record, **checked}

    def get_product(self, project: Path, product: str, rev: str, dest: Path) -> dict[str, Any]:
        """`dvc get <project> data/release/<product> --rev <rev>`: a plain copy."""
        target = f"data/release/{product}"
        self.dvc(project.parent, "get", str(project), target, "--rev", rev, "-o", str(dest))
        return verify_shards(dest)

    def release_diff(self, project: Path, a: str, b: str, out: Path) -> dict[str, Any]:
        """`make diff A=a B=b > out`: stdout must be the markdown alone; pictures in build/diff/."""
        self.make(project, "diff", f"A={a}", f"B={b}", stdout=out)
        text = out.read_text(encoding="utf-8")
        if not text.startswith("## Dataset diff"):
            raise TidepoolError(f"{out}: `make diff` printed something before the diff: {text[:120]!r}")
        pictures = sorted(p.name for p in (project / "build" / "diff").glob("*") if p.is_file())
        return {"markdown": text, "pictures": pictures}


def _digests(folder: Path) -> dict[str, str]:
    from stages.fsutil import file_digest

    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): file_digest(p, "md5") for p in files}


def bump_snapshots(params: dict[str, Any]) -> dict[str, Any]:
    """params with `taxonomy.snapshot` and every `sources.<s>.snapshot` set to GROWN_SNAPSHOT."""
    out = json.loads(json.dumps(params))
    if "snapshot" in (out.get("taxonomy") or {}):
        out["taxonomy"]["snapshot"] = GROWN_SNAPSHOT
    for spec in (out.get("sources") or {}).values():
        if isinstance(spec, dict) and "snapshot" in spec:
            spec["snapshot"] = GROWN_SNAPSHOT
    return out


def _bump_line(line: str) -> str:
    stripped = line.lstrip()
    if not stripped.startswith("snapshot:"):
        return line
    indent = line[: len(line) - len(stripped)]
    comment = line[line.index("#"):].rstrip("\n") if "#" in line else ""
    tail = f"   {comment}" if comment else ""
    return f'{indent}snapshot: "{GROWN_SNAPSHOT}"{tail}\n'


def verify_shards(folder: Path) -> dict[str, Any]:
    """Check every shard a wids index lists against its md5; (shards, samples, bytes)."""
    shards = samples = size = 0
    indexes = sorted(folder.glob("*.index.json"))
    if not indexes:
        raise TidepoolError(f"{folder}: no <split>.index.json: not a release product folder")
    for index in indexes:
        for entry in json.loads(index.read_text(encoding="utf-8")).get("shardlist", []):
            path = folder / entry["url"]
            if not path.is_file():
                raise TidepoolError(f"{path}: listed in {index.name} but missing")
            data = path.read_bytes()
            if hashlib.md5(data).hexdigest() != entry["md5sum"]:  # noqa: S324 - the index's checksum
                raise TidepoolError(f"{path}: md5 differs from {index.name}")
            shards += 1
            samples += int(entry["nsamples"])
            size += len(data)
    return {"shards": shards, "samples": samples, "bytes": size}


def _human(n: int) -> str:
    from stages.diff import human_bytes

    return human_bytes(n)


def run_walkthrough(work: Path, scale: float, grow_scale: float, echo: Callable[[str], None] = print) -> None:
    from stages.loopback import Loopback
    from stages.loopback.persist import describe
    from stages.samplegen.__main__ import generate_all

    if grow_scale <= scale:
        raise TidepoolError(f"--grow-scale ({grow_scale}) must be larger than --scale ({scale})")
    root = repo_root()
    if work.exists():
        # Only a folder an earlier walkthrough made (or an empty one) is emptied.
        if not (work / MARKER).exists() and any(work.iterdir()):
            raise TidepoolError(f"{work}: exists and is not a walkthrough folder; choose another --workdir")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARKER).write_text("made by python -m stages.walkthrough; emptied by the next run\n")
    upstream, store, project = work / "upstream", work / "s3-store", work / "project"
    w = Walkthrough(work, base_env(), echo)
    echo(f"walkthrough in {work} (commands' output: {w.logs}/)")

    with w.step(f"generate the sample upstreams (scale {scale})") as r:
        generate_all(upstream, scale=scale, jobs=os.cpu_count() or 1)
        r["ok"] = f"{sum(1 for p in upstream.rglob('*') if p.is_file())} files in {upstream}"
    with w.step("copy the repository into a new project") as r:
        w.new_project(project, root)
        r["ok"] = f"{project} (git: 1 commit, no tags)"

    lb = Loopback(upstream=upstream, store=store).start()
    try:
        overlay = lb.write_overlay(work / "endpoints.yaml")
        w.env = base_env({**lb.env(overlay), **lb.remote_env()})
        echo(f"    loopback S3 {lb.s3_endpoint}, HTTP {lb.http_base}; DVC remote kept in {store}")
        with w.step("build: dvc repro") as r:
            ran = w.build(project, "build")
            r["ok"] = f"{ran} stages ran; outputs committed in dvc.lock"
        with w.step("release v0.1.0: make release VERSION=0.1.0") as r:
            sha = w.release(project, "0.1.0")
            lb.save()
            r["ok"] = f"tagged v0.1.0 at {sha}; pushed and saved: {describe(lb.store)}"
        with w.step(f"grow the sources (scale {scale} -> {grow_scale}) and bump the snapshots") as r:
            g = w.grow(project, upstream, grow_scale, lb, overlay)
            r["ok"] = (f"upstream: {g['new']} new files, {g['rewritten']} rewritten (tables and indexes "
                       f"that list the new items), {g['unchanged']} unchanged")  # fmt: skip
        with w.step("build again: dvc repro") as r:
            ran = w.build(project, "build after growth")
            r["ok"] = f"{ran} stages ran"
        with w.step("release v0.2.0: make release VERSION=0.2.0") as r:
            sha = w.release(project, "0.2.0")
            r["ok"] = f"tagged v0.2.0 at {sha}; CHANGELOG.md has both entries"
        with w.step("restart the loopback from its store (the demo ending and starting again)") as r:
            old = lb.s3_endpoint
            lb.stop()
            lb = Loopback(upstream=upstream, store=store).start()
            overlay = lb.write_overlay(work / "endpoints.yaml")
            w.env = base_env({**lb.env(overlay), **lb.remote_env()})
            r["ok"] = f"S3 {old} -> {lb.s3_endpoint}; {lb.restored} objects restored from {store}"

        with w.step("fresh clone: git clone, git checkout v0.1.0 && dvc pull, dvc status") as r:
            got = w.fresh_clone_pull(project, "v0.1.0", work / "clone")
            local = "a .dvc/config.local" if got["config_local"] else "no .dvc/config.local"
            r["ok"] = f"{got['files']} files under data/; `dvc status` clean; {local}"
        with w.step(f"dvc import {IMPORT_PRODUCT} @ v0.1.0 into an empty DVC project") as r:
            got = w.import_product(project, IMPORT_PRODUCT, "v0.1.0", work / "consumer")
            r["ok"] = (f"{got['shards']} shards, {got['samples']} samples, {_human(got['bytes'])}, "
                       f"md5s match the index; {IMPORT_PRODUCT}.dvc pins rev v0.1.0")  # fmt: skip
        with w.step(f"dvc get {GET_PRODUCT} @ v0.2.0") as r:
            got = w.get_product(project, GET_PRODUCT, "v0.2.0", work / f"{GET_PRODUCT}-v0.2.0")
            r["ok"] = f"{got['shards']} shards, {got['samples']} samples, md5s match the index"
        with w.step("make diff A=v0.1.0 B=v0.2.0 > diff.md") as r:
            got = w.release_diff(project, "v0.1.0", "v0.2.0", work / "diff.md")
            r["ok"] = f"{work / 'diff.md'} ({len(got['markdown'].splitlines())} lines); pictures: " + (
                ", ".join(got["pictures"]) or "none")
        echo("")
        echo("the diff's summary:")
        for line in got["markdown"].splitlines()[2:]:
            if not line.startswith("|"):
                break
            echo(f"    {line}")
    finally:
        lb.stop()
    leftover = (project / ".dvc" / "config.local").exists()
    echo("")
    echo(f"done. DVC remote saved in {describe(lb.store) if lb.store else store}; "
         f"{'a' if leftover else 'no'} .dvc/config.local in the project.")  # fmt: skip
    echo(f"serve it again: python -m stages.loopback serve --upstream {upstream} --store {store}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.walkthrough", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("build/walkthrough"),
                        help="scratch folder, emptied first (default: build/walkthrough)")  # fmt: skip
    parser.add_argument("--scale", type=float, default=1.0, help="sample upstream size of v0.1.0 (1 = demo)")
    parser.add_argument("--grow-scale", type=float, default=1.5, help="sample upstream size of v0.2.0")
    args = parser.parse_args(argv)
    run_walkthrough(args.workdir.resolve(), args.scale, args.grow_scale)
    return 0


if __name__ == "__main__":
    run_main(main)
