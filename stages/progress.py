"""Progress bars for long work: shown on a terminal, silent in logs unless TIDEPOOL_PROGRESS=1."""

from __future__ import annotations

import os
from typing import Any

from tqdm import tqdm


def _enabled() -> bool | None:
    forced = os.environ.get("TIDEPOOL_PROGRESS")
    if forced is not None:
        return forced not in ("0", "false", "no", "")
    # None lets tqdm decide: bars on a TTY, nothing when stderr is a pipe (CI logs stay readable).
    return None


def bar(total: int | None = None, desc: str = "", unit: str = "it", **kwargs: Any) -> tqdm:
    """A tqdm bar; `unit="B"` gives byte counts scaled to KB/MB/GB."""
    disable = _enabled()
    scale = unit == "B"
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=scale,
        unit_divisor=1024 if scale else 1000,
        disable=None if disable is None else not disable,
        dynamic_ncols=True,
        leave=False,
        **kwargs,
    )
