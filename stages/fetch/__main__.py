"""`python -m stages.fetch <source> [--params params.yaml] [--out data/raw/<source>]`.

Mirrors one upstream source into its raw folder; partial downloads go to
`data/.downloads/<source>/` (or `--scratch`). The report goes to stderr, never into outputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stages.cli import run_main
from stages.config import load_params
from stages.fetch import SOURCES, fetch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.fetch", description=__doc__)
    parser.add_argument("source", choices=SOURCES)
    parser.add_argument("--params", type=Path, default=None, help="params.yaml (default: the repo's)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: data/raw/<source>)")
    parser.add_argument(
        "--scratch", type=Path, default=None, help="partial downloads (default: data/.downloads/<source>)"
    )
    args = parser.parse_args(argv)
    params = load_params(args.params)
    out = args.out or Path("data/raw") / args.source
    scratch = args.scratch or Path("data/.downloads") / args.source
    report = fetch(args.source, params, out, scratch)
    print(report.summary(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
