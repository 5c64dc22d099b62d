"""A trivial pack encoder that worker processes can import (tests/test_pack_sharding.py)."""

from __future__ import annotations

from stages.pack.units import Unit, UnitOut


def echo(unit: Unit) -> UnitOut:
    return UnitOut(unit.key, unit.split)
