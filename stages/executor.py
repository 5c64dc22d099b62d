"""One way to run per-item work (decode, hash, crop, encode) in parallel.

`parallel_map` yields results in input order whatever the backend, so outputs do not depend on
scheduling. Work is submitted in chunks with a bounded number in flight, which keeps memory flat
when the item list is long and results are large.

Backends:
- `jobs == 1`: inline, in the calling process (easy to profile and debug);
- `jobs > 1`: a local process pool (forkserver start method: safe when the parent has threads,
  as pyarrow and moto give it);
- `scheduler` set: the Dask distributed cluster at that address (stages/executor_dask.py).

Why the pool is set up the way it is (measured, docs/performance.md "Executor"):
- Workers fork from a forkserver that has already imported the work function's module (and
  through it numpy, PIL, pandas, pyarrow). Without the preload every worker imported those itself,
  0.5-1 CPU second per worker per pool: on the demo corpus that start-up was larger than the work,
  which is why jobs=2 measured slower than jobs=1 there.
- A short input is cut into at least four chunks per worker, so a few dozen heavy items (Coast
  Train npz, reef images) still spread over every worker instead of landing in one chunk.
- At most `max_in_flight` chunks are submitted ahead of the one being consumed; the consumer
  (pack's shard writer) works while the workers encode the next chunks.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from stages.errors import TidepoolError

T = TypeVar("T")
R = TypeVar("R")

SCHEDULER_ENV = "TIDEPOOL_DASK_SCHEDULER"
# Imported once by the forkserver, so that pool workers start with them loaded.
BASE_PRELOAD = ("numpy", "PIL.Image")
CHUNKS_PER_WORKER = 4  # lower bound on chunks per worker for short inputs (load balance)
IN_FLIGHT_PER_WORKER = 3  # chunks submitted per worker ahead of the one being consumed


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


def effective_chunksize(total: int | None, workers: int, chunksize: int) -> int:
    """`chunksize`, shrunk for short inputs so each worker gets at least CHUNKS_PER_WORKER chunks."""
    if total is None:
        return max(1, chunksize)
    return max(1, min(chunksize, math.ceil(total / (workers * CHUNKS_PER_WORKER))))


def item_count(items: Iterable[Any]) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None  # a generator: items are drawn lazily, never materialised


def preload_modules(fn: Callable[..., Any]) -> list[str]:
    """Modules the forkserver imports before forking workers: numpy, PIL and `fn`'s module.

    '__main__' stays first, as in multiprocessing's default, so a script's own functions keep
    working; for `python -m` runs it is skipped by multiprocessing itself.
    """
    mods = ["__main__", *BASE_PRELOAD]
    module = getattr(fn, "__module__", None)
    if module and module not in mods:
        mods.append(module)
    return mods


def _local_pool(fn: Callable[..., Any], workers: int, extra: Sequence[str] = ()) -> ProcessPoolExecutor:
    ctx = multiprocessing.get_context("forkserver")
    # Only effective before the process's forkserver starts (the first pool); later pools reuse
    # that server and its preloaded modules.
    mods = preload_modules(fn)
    ctx.set_forkserver_preload([*mods, *(m for m in extra if m not in mods)])
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def _broken(fn: Callable[..., Any], exc: BaseException) -> TidepoolError:
    # A worker died without a Python exception: killed by the OS (out of memory) or a crash in
    # a C library. The pool's own message says neither what ran nor what to do.
    return TidepoolError(
        f"a worker process running {getattr(fn, '__qualname__', fn)} died abruptly (killed by "
        f"the OS, e.g. out of memory, or crashed in native code); retry with a smaller `jobs`"
    )


class Executor:
    """A pool kept for a whole stage, so that work submitted in several rounds (the cache's
    windows, see `cached_map`) does not start workers again each round.

    `with Executor(jobs, scheduler) as ex: ex.map(fn, items)`; `map` has parallel_map's contract.
    The pool (or the Dask client) is created on the first map that needs one. `preload` names
    modules the forkserver imports besides the first mapped function's (work functions that live
    in other modules than the trampoline that calls them).
    """

    def __init__(
        self, jobs: int | None = 1, scheduler: str | None = None, preload: Sequence[str] = ()
    ) -> None:
        self.jobs = resolve_jobs(jobs)
        self.scheduler = scheduler
        self.preload = tuple(preload)
        self._pool: ProcessPoolExecutor | None = None
        self._client: Any = None

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def map(
        self,
        fn: Callable[[T], R],
        items: Iterable[T],
        chunksize: int = 16,
        max_in_flight: int | None = None,
    ) -> Iterator[R]:
        total = item_count(items)
        if self.scheduler:
            from stages.executor_dask import connect, dask_map  # lazily: Dask is optional at run time

            if self._client is None:
                self._client = connect(self.scheduler)
            yield from dask_map(
                fn, items, scheduler=self.scheduler, chunksize=chunksize, max_in_flight=max_in_flight,
                client=self._client,
            )
            return
        n = self.jobs
        if total is not None:
            n = min(n, max(1, total))
        if n == 1:
            for item in items:
                yield fn(item)
            return
        if self._pool is None:
            self._pool = _local_pool(fn, self.jobs, self.preload)
        size = effective_chunksize(total, n, chunksize)
        limit = max(1, max_in_flight or n * IN_FLIGHT_PER_WORKER)
        pending: deque[Future[list[R]]] = deque()
        try:
            for chunk in _chunks(items, size):
                pending.append(self._pool.submit(_run_chunk, fn, chunk))
                while len(pending) >= limit:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        except BrokenProcessPool as exc:
            self._pool = None
            raise _broken(fn, exc) from exc
        finally:
            # On an error or an abandoned generator, queued chunks are dropped instead of run.
            for future in pending:
                future.cancel()


def parallel_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    jobs: int | None = 1,
    chunksize: int = 16,
    scheduler: str | None = None,
    max_in_flight: int | None = None,
) -> Iterator[R]:
    """Apply `fn` to every item, yielding results in input order.

    `fn` must be a module-level function (it is pickled by reference) and should return problems
    as values rather than raise: an exception from a worker does propagate, but as the worker's
    traceback. `jobs` 0/None means one per CPU. `scheduler` (a Dask scheduler address such as
    tcp://host:8786) runs the chunks on that cluster instead; `jobs` is then ignored.
    `max_in_flight` bounds the chunks submitted ahead (default 3 per worker).
    """
    with Executor(jobs, scheduler) as ex:
        yield from ex.map(fn, items, chunksize=chunksize, max_in_flight=max_in_flight)
