"""parallel_map on a Dask distributed cluster: same results, same order, more machines.

DVC still runs the stages; Dask only runs the per-item work inside them. Workers need the
repository's code on their path (same commit) and the data paths visible under the same absolute
names (a shared filesystem), because work items carry absolute paths exactly as they do for the
local process pool.

The connection timeout is Dask's own setting, `distributed.comm.timeouts.connect` (30 s by
default; e.g. `DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=5s`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from stages.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")

WAIT_FOR_WORKERS_S = 60.0  # a cluster with no worker at all would otherwise hang the stage silently


def _run_chunk(fn: Callable[[Any], Any], chunk: list[Any]) -> list[Any]:
    return [fn(item) for item in chunk]


def connect(scheduler: str) -> Any:
    """A distributed.Client for `scheduler`, or a ConfigError naming the address and the problem."""
    try:
        from distributed import Client
    except ImportError as exc:  # pragma: no cover - distributed is in requirements.txt
        raise ConfigError(
            f"executor.scheduler is {scheduler!r} but dask.distributed is not installed"
        ) from exc
    try:
        client = Client(scheduler, set_as_default=False)
    except (OSError, ValueError, TypeError) as exc:
        # OSError: refused or timed out; ValueError/TypeError: not an address at all.
        raise ConfigError(
            f"cannot reach the Dask scheduler at {scheduler!r} (executor.scheduler or "
            f"$TIDEPOOL_DASK_SCHEDULER): {exc}"
        ) from exc
    try:
        client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS_S)
    except (OSError, TimeoutError) as exc:
        client.close()
        raise ConfigError(
            f"the Dask scheduler at {scheduler!r} has no workers (waited {WAIT_FOR_WORKERS_S:.0f}s)"
        ) from exc
    return client


def dask_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    scheduler: str,
    chunksize: int = 16,
    max_in_flight: int | None = None,
    client: Any = None,
) -> Iterator[R]:
    """Submit chunks to the cluster at `scheduler`, yielding results in input order.

    At most `max_in_flight` chunks (default 3 per worker thread) are on the cluster at a time, so
    a long input neither floods the scheduler nor piles results up in this process. `client`
    reuses a connection the caller keeps (stages.executor.Executor); otherwise one is made here.
    """
    from stages.executor import effective_chunksize, item_count

    own = client is None
    if own:
        client = connect(scheduler)
    try:
        workers = max(1, sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values()))
        size = effective_chunksize(item_count(items), workers, chunksize)
        limit = max(1, max_in_flight or workers * 3)
        pending: deque[Any] = deque()
        chunk: list[T] = []
        for item in items:
            chunk.append(item)
            if len(chunk) >= size:
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
        if own:
            client.close()
