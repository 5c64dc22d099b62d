"""`python -m stages.ingest <source>`: run one source adapter and write its tables and metrics."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from stages.cli import run_main
from stages.config import load_params, require
from stages.errors import ConfigError
from stages.executor import executor_settings
from stages.fsutil import repo_root
from stages.ingest import ingest_source
from stages.ingest.common import write_metrics
from stages.ingest.context import IngestContext


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.ingest", description=__doc__)
    parser.add_argument("source", help="a source declared in params.yaml `sources:`")
    parser.add_argument("--params", type=Path, default=None)
    args = parser.parse_args(argv)

    params = load_params(args.params)
    declared = sorted(require(params, "sources"))
    if args.source not in declared:
        raise ConfigError(f"params.yaml: no source {args.source!r} under `sources:`; declared: {declared}")
    jobs, scheduler = executor_settings(params)
    root = repo_root()
    ctx = IngestContext(
        source=args.source,
        params=params,
        root=root,
        raw_dir=root / "data" / "raw" / args.source,
        out_dir=root / "data" / "interim" / args.source,
        taxonomy_dir=root / "data" / "taxonomy",
        tables_dir=root / "data" / "tables",
        jobs=jobs,
        scheduler=scheduler,
    )
    started = time.monotonic()
    metrics = ingest_source(ctx)
    write_metrics(root / "metrics" / "ingest" / f"{args.source}.json", metrics)
    seconds = time.monotonic() - started
    rate = metrics["samples"] / seconds if seconds > 0 else 0.0
    print(
        f"ingest {args.source}: {metrics['samples']} samples, {metrics['points']} points, "
        f"{metrics['quarantined']} quarantined in {seconds:.1f}s ({rate:.1f} images/s)"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
