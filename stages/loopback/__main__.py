"""Run the loopback servers from the command line.

    python -m stages.loopback serve --upstream build/upstream [--overlay build/endpoints.yaml] [--store DIR]
    python -m stages.loopback exec --upstream build/upstream [--overlay PATH] [--store DIR] -- cmd args...

`serve` prints the endpoints and blocks until Ctrl-C / SIGTERM. `exec` runs one command against
the servers (with the overlay and the test credentials in its environment) and exits with the
command's status; the servers stop whatever way the command ends.

`--store DIR` keeps the DVC remote bucket (`tidepool-dvc`) in DIR across runs: loaded at start,
saved at stop (`make demo` and `make walkthrough` use `build/loopback-s3`). `serve` prints the
`export` lines that point DVC at it by environment (`AWS_ENDPOINT_URL_S3`), so no config file
keeps a port that dies with the server.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from stages.cli import run_main
from stages.errors import TidepoolError
from stages.loopback import Loopback

DEFAULT_OVERLAY = Path("build/endpoints.yaml")
# After an interrupt the command gets this long to exit on its own before it is terminated,
# and as long again before it is killed.
GRACE_SECONDS = 5.0
STORE_HELP = "keep the DVC remote bucket in this folder across runs (e.g. build/loopback-s3)"


@contextmanager
def _signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def _check_upstream(upstream: Path) -> None:
    if not upstream.is_dir():
        raise TidepoolError(
            f"{upstream}: upstream folder not found (generate it with "
            "`python -m stages.samplegen --out build/upstream`)"
        )


def serve(args: argparse.Namespace) -> int:
    _check_upstream(args.upstream)
    stop = threading.Event()
    with Loopback(args.upstream, store=args.store) as lb:
        print(f"s3:   {lb.s3_endpoint}")
        print(f"http: {lb.http_base}")
        if lb.store is not None:
            print(f"store: {lb.store.folder} ({lb.restored} object(s) restored; saved again on Ctrl-C)")
        if args.overlay:
            overlay = lb.write_overlay(args.overlay)
            print(f"overlay: {overlay}")
            print("# in another shell, for dvc pull/push/import/get and the stages:")
            for name, value in sorted({**lb.env(overlay), **lb.remote_env()}.items()):
                print(f"export {name}={value}")
        else:
            print(yaml.safe_dump(lb.overlay(), sort_keys=True), end="")
            print("# for dvc pull/push/import/get in another shell:")
            for name, value in sorted(lb.remote_env().items()):
                print(f"export {name}={value}")
        print("serving; Ctrl-C to stop", flush=True)
        with _signals(lambda signum, frame: stop.set()):
            while not stop.wait(0.5):
                pass
    return 0


def _wait(proc: subprocess.Popen, interrupted: list[int]) -> int:
    """Wait for the command; once interrupted, escalate to terminate and kill if it lingers."""
    escalations = [proc.terminate, proc.kill]
    deadline: float | None = None
    while True:
        try:
            return proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
        if not interrupted:
            continue
        now = time.monotonic()
        if deadline is None:
            deadline = now + GRACE_SECONDS
        elif now >= deadline and escalations:
            escalations.pop(0)()
            deadline = now + GRACE_SECONDS


@contextmanager
def _restored(path: Path) -> Iterator[None]:
    """Put `path` back as it was: the loopback endpoint must not outlive the servers."""
    before = path.read_bytes() if path.exists() else None
    try:
        yield
    finally:
        if before is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(before)


def run_command(args: argparse.Namespace) -> int:
    _check_upstream(args.upstream)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise TidepoolError("exec: no command given (usage: exec --upstream DIR -- cmd args...)")
    repo = Path.cwd()
    configure_dvc = not args.no_dvc_remote and (repo / ".dvc").is_dir()
    with Loopback(args.upstream, store=args.store) as lb:
        overlay = lb.write_overlay(args.overlay)
        env = {**os.environ, **lb.env(overlay)}
        local_config = repo / ".dvc" / "config.local"
        with _restored(local_config) if configure_dvc else _nothing():
            if configure_dvc:
                lb.configure_dvc_remote(repo)
            interrupted: list[int] = []
            procs: list[subprocess.Popen] = []

            def on_signal(signum: int, frame: Any) -> None:
                interrupted.append(signum)
                # Ctrl-C reaches the command through the terminal's process group already;
                # SIGTERM is sent to us alone, so pass it on.
                if signum == signal.SIGTERM and procs:
                    procs[0].send_signal(signal.SIGTERM)

            with _signals(on_signal):
                try:
                    proc = subprocess.Popen(command, env=env)
                except OSError as exc:
                    print(f"error: cannot run {command[0]!r}: {exc.strerror or exc}", file=sys.stderr)
                    return 127
                procs.append(proc)
                if signal.SIGTERM in interrupted:
                    proc.send_signal(signal.SIGTERM)
                status = _wait(proc, interrupted)
    # A command killed by a signal exits like a shell reports it: 128 + signal number.
    return 128 - status if status < 0 else status


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.loopback", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    p_serve = sub.add_parser("serve", help="run the servers until Ctrl-C")
    p_serve.add_argument("--upstream", type=Path, default=Path("build/upstream"))
    p_serve.add_argument("--overlay", type=Path, default=None, help="also write the endpoints overlay here")
    p_serve.add_argument("--store", type=Path, default=None, help=STORE_HELP)
    p_exec = sub.add_parser("exec", help="run one command against the servers")
    p_exec.add_argument("--upstream", type=Path, default=Path("build/upstream"))
    p_exec.add_argument("--overlay", type=Path, default=DEFAULT_OVERLAY)
    p_exec.add_argument("--store", type=Path, default=None, help=STORE_HELP)
    p_exec.add_argument("--no-dvc-remote", action="store_true",
                        help="do not point the cwd repo's DVC remote at the loopback S3")
    p_exec.add_argument("command", nargs=argparse.REMAINDER, help="-- cmd args...")
    args = parser.parse_args(argv)
    if args.action == "serve":
        return serve(args)
    return run_command(args)


if __name__ == "__main__":
    run_main(main)
