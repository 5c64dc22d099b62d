"""Content-defined shard boundaries: where a shard ends depends on the samples, not on counts.

Order: the work units of a split are sorted by a 64-bit hash of their key (ties, which need a
sha256 collision in 64 bits, by the key itself). A shard is therefore a uniform draw from the
split, whatever order the sources list their records in, and a new sample lands at a position
fixed by its own id.

Cuts: the units are appended in that order and a shard is closed

- *after* a unit when the shard holds at least `min_bytes` and the unit is a cut point: a
  second, independent hash of its key, read as u in [0, 1), is below `nbytes / (target_bytes -
  min_bytes)`. The cut chance is proportional to the unit's bytes, so cut points fall at a
  constant rate per byte (not per sample) and the expected shard size is about `target_bytes`
  whether samples are 20 KB patches or 2 MB images;
- *before* a unit that would take a non-empty shard past `max_bytes` (a forced cut). A unit
  larger than `max_bytes` gets a shard of its own.

Why this survives growth: whether a unit is a cut point depends on its own key and bytes only.
A new unit changes the bytes of the shard it lands in; the following cut points are the same
units as before, so the shards after it come out identical unless the insertion pushes a
formerly-too-early cut point over `min_bytes` (chance about `inserted bytes / (target - min)`),
or a forced cut moves. A fixed-count sharder instead shifts every later sample by one, which
rewrites every shard after the insertion. With hash order, k new units spread over S shards
still touch about S * (1 - exp(-k / S)) shards: see docs/pack.md for what that means at scale.

The same rules are exposed as pure functions over (key, nbytes) lists (`plan`,
`plan_fixed_count`, `rewritten`) so tests and the benchmark can compare sharders on the sizes
of real builds without writing bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from stages.errors import ConfigError

MiB = 1 << 20
# Part of both hashes. Changing it reorders every product and moves every boundary: it is a
# format version, not a tuning knob, so it lives in code (and is recorded in product.json).
SALT = b"tidepool-pack-v1\0"
_TWO64 = float(1 << 64)


@dataclass(frozen=True)
class ShardSizes:
    """Shard size bounds in bytes. The defaults are production sizes; the demo sets small ones."""

    min_bytes: int = 64 * MiB
    target_bytes: int = 256 * MiB
    max_bytes: int = 512 * MiB

    def __post_init__(self) -> None:
        if not 0 <= self.min_bytes < self.target_bytes <= self.max_bytes:
            raise ConfigError(
                f"shard sizes must satisfy 0 <= min_bytes < target_bytes <= max_bytes, got "
                f"min={self.min_bytes} target={self.target_bytes} max={self.max_bytes}"
            )

    @classmethod
    def from_spec(cls, spec: Any, where: str = "shard") -> ShardSizes:
        """From a params mapping `{min_bytes, target_bytes, max_bytes}`; absent keys keep defaults."""
        if spec is None:
            return cls()
        if not isinstance(spec, dict):
            raise ConfigError(f"params.yaml: {where} must be a mapping of min_bytes/target_bytes/max_bytes")
        unknown = sorted(set(spec) - {"min_bytes", "target_bytes", "max_bytes"})
        if unknown:
            raise ConfigError(f"params.yaml: {where} has unknown keys {unknown}")
        values = {}
        for name in ("min_bytes", "target_bytes", "max_bytes"):
            if name in spec:
                value = spec[name]
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ConfigError(
                        f"params.yaml: {where}.{name} must be a non-negative integer, got {value!r}"
                    )
                values[name] = value
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"params.yaml: {where}: {exc}") from exc

    @property
    def cut_span(self) -> int:
        return self.target_bytes - self.min_bytes


def key_hashes(key: str) -> tuple[int, float]:
    """(order hash, cut draw u in [0, 1)) of a unit key: two independent halves of one sha256.

    They must be independent: units are sorted by the first, so a cut rule on the same value
    would fire only at the start of the order.
    """
    digest = hashlib.sha256(SALT + key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:16], "big") / _TWO64


def order_keys(keys: Iterable[str]) -> list[str]:
    """`keys` in shard order."""
    return sorted(keys, key=lambda k: (key_hashes(k)[0], k))


def is_cut_point(u: float, nbytes: int, sizes: ShardSizes) -> bool:
    return u * sizes.cut_span < nbytes


class Cutter:
    """The streaming form of the cut rule: ask `before` a unit is written, `after` it is."""

    def __init__(self, sizes: ShardSizes) -> None:
        self.sizes = sizes
        self.bytes = 0
        self.forced = 0

    def before(self, nbytes: int) -> bool:
        """True when the shard must be closed before a unit of `nbytes` goes in."""
        if self.bytes > 0 and self.bytes + nbytes > self.sizes.max_bytes:
            self.forced += 1
            self.bytes = 0
            return True
        return False

    def after(self, u: float, nbytes: int) -> bool:
        """Account for a written unit; True when the shard ends after it."""
        self.bytes += nbytes
        if self.bytes >= self.sizes.min_bytes and is_cut_point(u, nbytes, self.sizes):
            self.bytes = 0
            return True
        return False


def plan(units: Sequence[tuple[str, int]], sizes: ShardSizes) -> list[int]:
    """Shard number of every (key, nbytes) unit, the units already in shard order."""
    cutter = Cutter(sizes)
    shard, out = 0, []
    for key, nbytes in units:
        if cutter.before(nbytes):
            shard += 1
        out.append(shard)
        if cutter.after(key_hashes(key)[1], nbytes):
            shard += 1
    return out


def plan_fixed_count(units: Sequence[tuple[str, int]], per_shard: int) -> list[int]:
    """What a fixed-count sharder (webdataset.ShardWriter with maxcount) does: n // per_shard."""
    return [i // per_shard for i in range(len(units))]


def shard_contents(
    units: Sequence[tuple[str, int]], shards: Sequence[int]
) -> list[tuple[tuple[str, ...], int]]:
    """Per shard: its ordered unit keys and its bytes."""
    out: list[tuple[list[str], int]] = []
    for (key, nbytes), shard in zip(units, shards):
        while len(out) <= shard:
            out.append(([], 0))
        keys, total = out[shard]
        keys.append(key)
        out[shard] = (keys, total + nbytes)
    return [(tuple(keys), total) for keys, total in out if keys]


def rewritten(
    old: Sequence[tuple[tuple[str, ...], int]], new: Sequence[tuple[tuple[str, ...], int]]
) -> dict[str, float | int]:
    """Shards (and bytes) of `new` whose exact unit sequence no shard of `old` has.

    With deterministic sample bytes a shard's content is a function of its unit sequence, so
    this is the set of files `dvc push` must upload: DVC stores files by content hash, and a
    shard that only changed its number is already in the remote.
    """
    before = {keys for keys, _ in old}
    changed = [(keys, size) for keys, size in new if keys not in before]
    total = sum(size for _, size in new)
    changed_bytes = sum(size for _, size in changed)
    return {
        "shards": len(new),
        "shards_rewritten": len(changed),
        "bytes": total,
        "bytes_rewritten": changed_bytes,
        "fraction_bytes_rewritten": (changed_bytes / total) if total else 0.0,
    }
