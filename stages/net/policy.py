"""How hard and how long one transfer may try: the `net:` settings, the retry budget, the
minimum-throughput floor and the per-file deadline.

Every rule here ends a transfer that cannot finish with one FetchError naming the URL:
- `retries` counts consecutive attempts that brought no new byte; an attempt that moved the
  file forward resets it, so a flaky link that keeps making progress keeps going;
- `retries_per_file` caps all retries of one file, with progress or without, so a link that
  delivers a few bytes per connection cannot go on for ever;
- the throughput floor fails a connection that delivers fewer than `min_bytes_per_window` bytes
  in any `throughput_window_seconds` (a trickling server), counted as an attempt without progress;
- the deadline fails a file not finished `file_deadline_seconds` after its transfer began.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stages.errors import ConfigError, FetchError

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 60.0


def _number(net: dict[str, Any], key: str, default: float, kind: type, minimum: float) -> Any:
    value = net.get(key, default)
    if value is None:
        value = 0 if key == "file_deadline_seconds" else default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"params.yaml: net.{key} must be a number, not {value!r}")
    if value < minimum:
        raise ConfigError(f"params.yaml: net.{key} must be >= {minimum:g}, not {value!r}")
    return kind(value)


@dataclass(frozen=True)
class NetSettings:
    """The `net:` section of params.yaml."""

    retries: int = 5  # consecutive retries without progress
    backoff_seconds: float = 0.5
    timeout_seconds: float = 60.0  # one socket read or connect
    chunk_bytes: int = 8 << 20
    retries_per_file: int = 50  # all retries of one file, with progress or without
    min_bytes_per_window: int = 64 << 10
    throughput_window_seconds: float = 60.0
    file_deadline_seconds: float = 86400.0  # 0 = no deadline
    accept_unverified: bool = False

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> NetSettings:
        net = params.get("net") or {}
        accept = net.get("accept_unverified", cls.accept_unverified)
        if not isinstance(accept, bool):
            raise ConfigError(f"params.yaml: net.accept_unverified must be true or false, not {accept!r}")
        return cls(
            retries=_number(net, "retries", cls.retries, int, 0),
            backoff_seconds=_number(net, "backoff_seconds", cls.backoff_seconds, float, 0),
            timeout_seconds=_number(net, "timeout_seconds", cls.timeout_seconds, float, 0.001),
            chunk_bytes=max(1, _number(net, "chunk_bytes", cls.chunk_bytes, int, 1)),
            retries_per_file=_number(net, "retries_per_file", cls.retries_per_file, int, 0),
            min_bytes_per_window=_number(net, "min_bytes_per_window", cls.min_bytes_per_window, int, 0),
            throughput_window_seconds=_number(
                net, "throughput_window_seconds", cls.throughput_window_seconds, float, 0.001
            ),
            file_deadline_seconds=_number(net, "file_deadline_seconds", cls.file_deadline_seconds, float, 0),
            accept_unverified=accept,
        )


class Transient(Exception):
    """A failure worth retrying (5xx, 429, a dropped or timed-out connection). Internal to net/."""


class Stalled(Transient):
    """The connection is alive but below the throughput floor: retried, never counted as progress."""


class RetryCount:
    """Retries spent on one file, shared by the connections that fetch its segments."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.spent = 0

    def spend(self) -> int:
        with self._lock:
            self.spent += 1
            return self.spent


class Deadline:
    """The moment a file's transfer must have finished by (`net.file_deadline_seconds`)."""

    def __init__(self, url: str, settings: NetSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.seconds = settings.file_deadline_seconds
        self._clock = clock
        self._end = clock() + self.seconds if self.seconds > 0 else None

    def check(self) -> None:
        if self._end is not None and self._clock() > self._end:
            raise FetchError(
                self.url,
                f"not finished within net.file_deadline_seconds={self.seconds:g} "
                "(the bytes received so far are kept for the next run)",
            )


class ThroughputFloor:
    """Fails one connection that delivers fewer than `min_bytes_per_window` in a window.

    Fed after every read; reads return as soon as any bytes arrive (see `read_some`), so a server
    trickling a byte every few seconds is measured, not waited on.
    """

    def __init__(self, settings: NetSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_bytes = settings.min_bytes_per_window
        self.window = settings.throughput_window_seconds
        self._clock = clock
        self.restart()

    def restart(self) -> None:
        """A new connection starts a fresh window (its time to first byte counts)."""
        self._start = self._clock()
        self._bytes = 0

    def add(self, nbytes: int) -> None:
        """Count bytes that arrived (never raises: the caller has taken them)."""
        self._bytes += nbytes

    def check(self) -> None:
        """Raise Stalled when a full window passed with fewer bytes than the floor."""
        now = self._clock()
        elapsed = now - self._start
        if elapsed < self.window:
            return
        if self._bytes < self.min_bytes:
            raise Stalled(
                f"too slow: {self._bytes} bytes in {elapsed:.1f} s, below "
                f"net.min_bytes_per_window={self.min_bytes} per "
                f"net.throughput_window_seconds={self.window:g}"
            )
        self._start, self._bytes = now, 0


class RetryBudget:
    """The retry rules of one transfer (see the module doc); sleeps the backoff between attempts.

    Call `reached(position)` as bytes land: an attempt that takes the file past the furthest
    point reached before counts as progress. `failed(cause)` records a failed attempt: it sleeps
    and returns, or raises FetchError when a rule says stop.
    """

    def __init__(
        self,
        url: str,
        settings: NetSettings,
        sleep: Callable[[float], None] = time.sleep,
        *,
        spent: RetryCount | None = None,
        deadline: Deadline | None = None,
    ) -> None:
        self.url = url
        self.settings = settings
        self.failures = 0
        self._sleep = sleep
        self._spent = spent or RetryCount()
        self._deadline = deadline
        self._best = -1
        self._progress = False

    def reached(self, position: int) -> None:
        if position > self._best:
            self._best = position
            self._progress = True

    def progressed(self) -> None:
        """Progress without a position (a request that succeeded)."""
        self._progress = True

    def check_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.check()

    def failed(self, cause: str, *, stalled: bool = False) -> None:
        if self._progress and not stalled:
            self.failures = 0
        self._progress = False
        if self.failures >= self.settings.retries:
            raise FetchError(
                self.url, f"{cause} (gave up after {self.settings.retries} retries without progress)"
            )
        spent = self._spent.spend()
        if spent > self.settings.retries_per_file:
            raise FetchError(
                self.url,
                f"{cause} (gave up after net.retries_per_file={self.settings.retries_per_file} "
                "retries of this file)",
            )
        delay = min(self.settings.backoff_seconds * (2**self.failures), MAX_BACKOFF_SECONDS)
        self.failures += 1
        log.info(
            "%s: %s; retry %d/%d (%d of this file) in %.2fs",
            self.url,
            cause,
            self.failures,
            self.settings.retries,
            spent,
            delay,
        )
        if delay > 0:
            self._sleep(delay)
        self.check_deadline()


def read_some(body: Any, size: int, *, decode: bool = False) -> bytes:
    """Up to `size` bytes of a response body, returned as soon as any have arrived.

    A plain `read(size)` waits until `size` bytes are there: a trickling server then stalls it
    for hours, and a connection that drops mid-chunk loses the partial chunk. urllib3's `read1`
    returns what one socket read gave. botocore's StreamingBody wraps a urllib3 response.
    `decode` undoes a Content-Encoding the server applied anyway (HTTP only; S3 bytes are raw).
    """
    raw = getattr(body, "_raw_stream", body)
    read1 = getattr(raw, "read1", None)
    if read1 is None:
        return body.read(size)
    return read1(size, decode_content=True) if decode else read1(size)
