"""Work units: what the main process plans, what a worker encodes, what comes back."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stages.errors import TidepoolError


@dataclass(frozen=True)
class SampleRow:
    """What the main process knows of one sample before it is encoded: its manifest fields and
    the class indices it counts for in classes.json. Never sent to a worker."""

    key: str
    row: dict[str, Any]  # manifest fields known before the shard is (see index.MANIFEST_SCHEMA)
    counts: tuple[int, ...] = ()


@dataclass(frozen=True)
class Unit:
    """One piece of work: the payload is everything a worker needs, nothing it must look up.

    `rows` and `inputs` stay in the main process (the writer strips them before a unit is sent):
    `rows` describe the samples the unit yields, in member order; `inputs` is the JSON-able digest
    of the unit's input content that its work key is computed over (None: never cached).
    """

    key: str  # orders the unit and draws its cut (the image's sample id)
    split: str
    payload: Any
    rows: tuple[SampleRow, ...] = ()
    inputs: Any = None


@dataclass(frozen=True)
class SampleOut:
    """One sample as it goes into a shard."""

    key: str
    data: bytes  # the sample's members as tar bytes (tarwriter.sample_bytes)


@dataclass(frozen=True)
class UnitOut:
    key: str
    split: str
    samples: tuple[SampleOut, ...] = ()
    decodes: int = 0  # images decoded for this unit (the "decode once" bound is checked on it)
    error: str | None = None  # a TidepoolError message from the worker
    sha256: str = ""  # of the unit's bytes (all samples, in order): computed where they were made


def guarded(fn: Callable[[Unit], UnitOut], unit: Unit) -> UnitOut:
    """Run a product's encoder on `unit`, turning a TidepoolError into an error result, and add
    the sha256 of the unit's bytes (hashed here, in the worker, so the writer does not).

    Our error classes take several constructor arguments and do not survive pickling back from a
    worker process; a plain message does, and the main process raises it naming the unit.
    """
    try:
        out = fn(unit)
    except TidepoolError as exc:
        return UnitOut(unit.key, unit.split, error=str(exc))
    h = hashlib.sha256()
    for sample in out.samples:
        h.update(sample.data)
    return UnitOut(out.key, out.split, out.samples, out.decodes, out.error, h.hexdigest())


def run_unit(item: tuple[Callable[[Unit], UnitOut], Unit] | None) -> UnitOut | None:
    """The executor's work function: `(encode, unit)`, or None, a no-op the writer sends to let
    results flow back while it has enough units ahead (see writer.Resolver)."""
    if item is None:
        return None
    encode, unit = item
    return encode(unit)


@dataclass
class ProductPlan:
    """What a product module hands the writer."""

    keys: dict[str, list[str]]  # split -> unit keys, any order
    make_unit: Callable[[str, str], Unit]  # (key, split) -> Unit, built lazily in shard order
    encode: Callable[[Unit], UnitOut]  # module-level, picklable
    classes: dict[str, Any]  # classes.json; entries under "classes" get per-split counts
    fields: dict[str, str]  # member extension -> what it holds (product.json, docs)
    skipped: dict[str, int] = field(default_factory=dict)
    chunksize: int = 4
    extra_metrics: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 0  # size of the per-split class count vectors (0: counted sparsely)
    code_modules: tuple[str, ...] = ()  # modules besides pack's own that shape unit bytes
    settings: dict[str, Any] = field(default_factory=dict)  # what shapes unit bytes (work key)
