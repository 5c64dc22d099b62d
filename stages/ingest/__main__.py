"""`python -m stages.ingest <source>`: run one source adapter and write its tables and metrics."""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

from stages.cli import run_main
from stages.config import load_params
from stages.executor import executor_settings
from stages.fsutil import repo_root
from stages.ingest.common import write_metrics
from stages.ingest.context import IngestContext

ADAPTERS = ("mermaid", "coralnet", "coasttrain", "inat2017", "seatizen")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.ingest", description=__doc__)
    parser.add_argument("source", choices=ADAPTERS)
    parser.add_argument("--params", type=Path, default=None)
    args = parser.parse_args(argv)

    params = load_params(args.params)
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
    adapter = importlib.import_module(f"stages.ingest.{args.source}")
    started = time.monotonic()
    tables, extra = adapter.ingest(ctx)
    tables.write(ctx.out_dir)
    metrics = tables.metrics(extra)
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
