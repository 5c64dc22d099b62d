"""ingest@<source>: raw upstream files -> the common sample, point and quarantine tables."""

from __future__ import annotations

import importlib
from typing import Any

from stages.ingest.context import IngestContext


def ingest_source(ctx: IngestContext) -> dict[str, Any]:
    """Run the adapter of `ctx.source`, write its tables under `ctx.out_dir`, return the metrics."""
    from stages.ingest import runner

    adapter = importlib.import_module(f"stages.ingest.{ctx.source}")
    if hasattr(adapter, "records"):
        return runner.run(ctx, adapter)
    # An adapter not yet on the record protocol (stages/ingest/records.py).
    tables, extra = adapter.ingest(ctx)
    tables.write(ctx.out_dir)
    return tables.metrics(extra)
