"""ingest@<source>: raw upstream files -> the common sample, point and quarantine tables."""

from __future__ import annotations

import importlib
from typing import Any

from stages.ingest.context import IngestContext


def ingest_source(ctx: IngestContext) -> dict[str, Any]:
    """Run the adapter of `ctx.source`, write its tables under `ctx.out_dir`, return the metrics."""
    from stages.ingest import runner

    adapter = importlib.import_module(f"stages.ingest.{ctx.source}")
    return runner.run(ctx, adapter)
