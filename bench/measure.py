"""Run one command and record the CPU time and peak RSS of it and every process it starts.

    python -m bench.measure [--label NAME] [--log FILE] -- <command ...>

Appends one JSON line to `--log` (default `$TIDEPOOL_BENCH_LOG`; without either, prints it to
stderr) and exits with the command's status:

    {"label", "argv", "wall_s", "user_s", "sys_s", "cpu_s", "max_rss_bytes", "returncode"}

How: this process makes itself a *child subreaper* (Linux `prctl(PR_SET_CHILD_SUBREAPER)`), runs
the command, then reaps every descendant until none is left, and reads
`getrusage(RUSAGE_CHILDREN)`. Linux adds a reaped child's own totals (including the descendants it
reaped) to its parent's, so the figures cover the command, its process pool workers and the
forkserver. The forkserver matters: pool workers are *its* children, and it outlives the stage
process by a moment; without the subreaper it would be reparented to init and its CPU lost.
`max_rss_bytes` is the largest peak RSS of any single one of those processes (ru_maxrss is a max,
not a sum), i.e. the memory the biggest process of the stage needed.

The bench puts this in front of each stage command of its scratch project's dvc.yaml, so the
figures are per DVC stage and exclude DVC's own hashing and caching.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LOG_ENV = "TIDEPOOL_BENCH_LOG"
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux only); False where the call is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_all() -> None:
    """Wait for every remaining descendant (adopted orphans included)."""
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return
        except InterruptedError:  # pragma: no cover - retried by Python since 3.5, kept for safety
            continue


def run_measured(argv: list[str], label: str | None = None) -> dict[str, Any]:
    """Run `argv` to completion with its descendants; their summed CPU and largest peak RSS."""
    become_subreaper()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(argv)
    returncode = proc.wait()
    reap_all()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    user = after.ru_utime - before.ru_utime
    system = after.ru_stime - before.ru_stime
    return {
        "label": label or " ".join(argv),
        "argv": argv,
        "wall_s": round(wall, 3),
        "user_s": round(user, 3),
        "sys_s": round(system, 3),
        "cpu_s": round(user + system, 3),
        # ru_maxrss is in KiB on Linux. Taken over every descendant reaped so far, so one
        # measure process per stage (as the bench runs it) gives that stage's peak.
        "max_rss_bytes": int(after.ru_maxrss) * 1024,
        "returncode": returncode,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.measure", description=__doc__.split("\n")[0])
    parser.add_argument("--label", default=None)
    parser.add_argument("--log", type=Path, default=None)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    record = run_measured(command, args.label)
    log = args.log or (Path(os.environ[LOG_ENV]) if os.environ.get(LOG_ENV) else None)
    line = json.dumps(record, sort_keys=True)
    if log is None:
        print(line, file=sys.stderr)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
    return record["returncode"]


if __name__ == "__main__":
    sys.exit(main())
