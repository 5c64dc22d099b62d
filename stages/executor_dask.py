"""parallel_map on a Dask distributed cluster: same results, same order, more machines.

DVC still runs the stages; Dask only runs the per-item work inside them. Workers need the
repository's code on their path and the data paths visible under the same names (a shared
filesystem), exactly like the local process pool.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from stages.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")


def _run_chunk(fn: Callable[[Any], Any], chunk: list[Any]) -> list[Any]:
    return [fn(item) for item in chunk]


def dask_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    scheduler: str,
    chunksize: int = 16,
    max_in_flight: int | None = None,
) -> Iterator[R]:
    """Submit chunks to the cluster at `scheduler`, yielding results in input order."""
    try:
        from distributed import Client
    except ImportError as exc:  # pragma: no cover - distributed is in requirements.txt
        raise ConfigError("executor.scheduler is set but dask.distributed is not installed") from exc
    try:
        client = Client(scheduler, timeout="30s", set_as_default=False)
    except OSError as exc:
        raise ConfigError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc
    try:
        workers = max(1, sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values()))
        limit = max_in_flight or workers * 3
        pending: deque[Any] = deque()
        chunk: list[T] = []
        for item in items:
            chunk.append(item)
            if len(chunk) >= chunksize:
                # pure=False: identical chunks (same fn, same args) must still run; results are
                # collected positionally, never deduplicated by key.
                pending.append(client.submit(_run_chunk, fn, chunk, pure=False))
                chunk = []
                while len(pending) >= limit:
                    yield from pending.popleft().result()
        if chunk:
            pending.append(client.submit(_run_chunk, fn, chunk, pure=False))
        while pending:
            yield from pending.popleft().result()
    finally:
        client.close()
