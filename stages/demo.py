"""`make demo`: generate the sample upstreams, serve them on loopback, `dvc repro`, `dvc push`, summarise.

The pipeline code that runs here is the code that runs against the real upstreams: only the
endpoints overlay (build/endpoints.yaml) and, for DVC, the environment (`AWS_ENDPOINT_URL_S3`,
`Loopback.remote_env`) point it at the loopback servers. Nothing is written to
`.dvc/config.local`, so no config names a port that dies with the demo; an endpoint an older demo
left there is removed. The DVC remote bucket is kept in `build/loopback-s3/` (STORE): the pushed
data survives the demo, and `make serve` serves it again.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from stages.cli import run_main
from stages.errors import TidepoolError
from stages.fsutil import repo_root

SOURCES = ("mermaid", "coralnet", "coasttrain", "inat2017", "seatizen")
STORE = Path("build/loopback-s3")
DVC_REMOTE = "storage"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def clear_loopback_endpoint(root: Path, remote: str = DVC_REMOTE) -> str | None:
    """Remove `remote`'s endpointurl from `.dvc/config.local` when it names a loopback address.

    Earlier demos wrote the loopback S3's port there; once that server is gone every `dvc pull`
    would hang on a dead port. A non-loopback endpoint is the user's own setting and stays.
    Returns the removed URL, or None.
    """
    from urllib.parse import urlsplit

    from stages.loopback import dvc_command

    if not (root / ".dvc" / "config.local").exists():
        return None
    get = subprocess.run([*dvc_command(), "config", "--local", f"remote.{remote}.endpointurl"],
                         cwd=root, capture_output=True, text=True, check=False)  # fmt: skip
    url = get.stdout.strip()
    if get.returncode != 0 or not url:
        return None
    host = urlsplit(url).hostname or ""
    if host not in {h.strip("[]") for h in LOOPBACK_HOSTS}:
        return None
    unset = subprocess.run([*dvc_command(), "remote", "modify", "--local", "--unset", remote, "endpointurl"],
                           cwd=root, capture_output=True, text=True, check=False)  # fmt: skip
    if unset.returncode != 0:
        raise TidepoolError(
            f"{root / '.dvc' / 'config.local'}: could not remove the stale loopback endpoint {url}: "
            f"{(unset.stderr or unset.stdout).strip()}"
        )
    return url


def tool_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment for dvc and the stages: the venv's bin first on PATH, plus `extra`."""
    env = dict(os.environ)
    env.update(extra)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    return env


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> None:
    print(f"$ {' '.join(cmd)}", flush=True)
    status = subprocess.call(cmd, env=env, cwd=cwd)
    if status != 0:
        raise TidepoolError(f"`{' '.join(cmd)}` exited with status {status}")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def fetched_summary(root: Path) -> list[tuple[str, int, int]]:
    """(source, files, bytes) from each raw manifest."""
    rows = []
    for source in SOURCES:
        manifest = root / "data" / "raw" / source / "manifest.csv"
        if not manifest.exists():
            continue
        with open(manifest, newline="", encoding="utf-8") as fh:
            entries = list(csv.DictReader(fh))
        rows.append((source, len(entries), sum(int(e["size"]) for e in entries)))
    return rows


def print_summary(root: Path, seconds: float) -> None:
    print("\n== tidepool demo summary ==")
    print(f"wall time: {seconds:.1f}s")
    print("fetched (data/raw/<source>/):")
    for source, files, size in fetched_summary(root):
        print(f"  {source:<11} {files:>6} files  {_human(size):>10}")
    metrics_dir = root / "metrics"
    if metrics_dir.is_dir():
        print("metrics (dvc metrics show):")
        for path in sorted(metrics_dir.rglob("*.json")):
            data = json.loads(path.read_text())
            headline = {k: v for k, v in data.items() if isinstance(v, int | float)}
            print(f"  {path.relative_to(root)}: {headline}")
    release = root / "data" / "release"
    if release.is_dir():
        print("release shards (data/release/<product>/):")
        for product in sorted(p for p in release.iterdir() if p.is_dir()):
            shards = sorted(product.glob("*.tar"))
            size = sum(s.stat().st_size for s in shards)
            print(f"  {product.name:<12} {len(shards):>4} shards  {_human(size)}")

def print_store(root: Path, pushed: bool) -> None:
    from stages.loopback.persist import BucketStore, describe
    from stages.loopback.s3 import DVC_BUCKET

    if pushed:
        print(f"pushed to the loopback S3 remote s3://{DVC_BUCKET}/store, kept on disk in "
              f"{describe(BucketStore(root / STORE, DVC_BUCKET))}")  # fmt: skip
    print("serve it again with `make serve` (python -m stages.loopback serve --store build/loopback-s3 ...);")
    print("it prints the `export AWS_ENDPOINT_URL_S3=...` line that points dvc pull/import/get at it.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.demo", description=__doc__)
    parser.add_argument("--scale", type=float, default=1.0, help="sample upstream size (1 = demo)")
    parser.add_argument("--upstream", type=Path, default=Path("build/upstream"))
    parser.add_argument("--no-push", action="store_true", help="skip `dvc push`")
    args = parser.parse_args(argv)

    from stages.loopback import Loopback
    from stages.samplegen.__main__ import generate_all

    root = repo_root()
    started = time.monotonic()
    upstream = (root / args.upstream).resolve()
    print(f"generating sample upstreams (scale {args.scale}) in {upstream} ...", flush=True)
    generate_all(upstream, scale=args.scale, jobs=os.cpu_count() or 1)
    stale = clear_loopback_endpoint(root)
    if stale:
        print(f"removed the stale loopback endpoint {stale} from .dvc/config.local", flush=True)
    with Loopback(upstream=upstream, store=root / STORE) as lb:
        overlay = lb.write_overlay(root / "build" / "endpoints.yaml")
        # DVC finds the loopback through the environment only: nothing on disk keeps the port.
        env = tool_env({**lb.env(overlay), **lb.remote_env()})
        print(f"loopback S3 at {lb.s3_endpoint}, HTTP at {lb.http_base}", flush=True)
        if lb.restored:
            print(f"restored {lb.restored} object(s) of the DVC remote from {root / STORE}", flush=True)
        dvc = str(Path(sys.executable).parent / "dvc")
        run([dvc, "repro"], env, root)
        if not args.no_push:
            # Through the licence policy: refuses non-redistributable data on a public remote.
            run([sys.executable, "-m", "stages.push"], env, root)
    print_summary(root, time.monotonic() - started)
    print_store(root, pushed=not args.no_push)
    return 0


if __name__ == "__main__":
    run_main(main)
