"""One way to run per-item work (decode, hash, crop, encode) in parallel.

`parallel_map` yields results in input order whatever the backend, so outputs do not depend on
scheduling. Work is submitted in chunks with a bounded number in flight, which keeps memory flat
when the item list is long and results are large.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def _run_chunk(fn: Callable[[Any], Any], chunk: Sequence[Any]) -> list[Any]:
    return [fn(item) for item in chunk]


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


SCHEDULER_ENV = "TIDEPOOL_DASK_SCHEDULER"


def executor_settings(params: dict[str, Any]) -> tuple[int, str | None]:
    """(jobs, scheduler) from params, with $TIDEPOOL_DASK_SCHEDULER overriding the scheduler.

    Neither is a DVC-tracked parameter: where the work runs does not change what it produces.
    """
    jobs = resolve_jobs(params.get("jobs"))
    scheduler = os.environ.get(SCHEDULER_ENV) or (params.get("executor") or {}).get("scheduler")
    return jobs, scheduler or None


def resolve_jobs(jobs: int | None) -> int:
    """`jobs` from params: a positive count, or 0/None for one per CPU."""
    if not jobs or jobs < 1:
        return os.cpu_count() or 1
    return int(jobs)


def parallel_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    jobs: int | None = 1,
    chunksize: int = 16,
    scheduler: str | None = None,
) -> Iterator[R]:
    """Apply `fn` to every item, yielding results in input order.

    jobs == 1 runs inline (easy to profile and debug). `fn` must be a module-level function so it
    pickles. `scheduler`, when set, is reserved for a Dask distributed cluster address.
    """
    if scheduler:
        from stages.executor_dask import dask_map  # imported lazily: Dask is optional at run time

        yield from dask_map(fn, items, scheduler=scheduler, chunksize=chunksize)
        return
    n = resolve_jobs(jobs)
    if n == 1:
        for item in items:
            yield fn(item)
        return
    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=n, mp_context=ctx) as pool:
        pending: deque[Future[list[R]]] = deque()
        max_in_flight = n * 3
        for chunk in _chunks(items, chunksize):
            pending.append(pool.submit(_run_chunk, fn, chunk))
            while len(pending) >= max_in_flight:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
