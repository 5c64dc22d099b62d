"""A work function whose module records which process imported it (tests/test_executor.py)."""

from __future__ import annotations

import os

IMPORTED_IN = os.getpid()


def where(_: int) -> tuple[int, int]:
    return IMPORTED_IN, os.getpid()
