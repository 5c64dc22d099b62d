"""Fault plan shared by the loopback servers: scripted failures for retry and resume tests.

Tests need to see the fetchers survive the failures real upstreams produce (a 500 from S3, a
connection that dies halfway through a 4 GB zip, a server that trickles, a file that changes
while it is read) without relying on luck or timing. A fault is matched against each request
by path substring (and method, when given) and fires a fixed number of times, so a test can say
"the first GET of this zip dies after 4 KiB" and then check `fault.hits`.

The plan also keeps a log of the last requests both servers saw (`requests()`), so a test can
count GETs or connections at the server instead of trusting the client's word.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

SERVERS = ("s3", "http")
# status: answer `status` instead of the real response.
# drop: real headers (full Content-Length), `after_bytes` of body, then the connection is cut.
# trickle: real headers, `after_bytes` at once, then `trickle_bytes` every `interval_seconds`.
# no_length (http): no Content-Length, body ends when the connection closes (cut after
#   `after_bytes` when that is > 0): a truncated body then looks complete.
# grow (http): the file as if `grow_bytes` had been appended since it was listed (new ETag).
# pass: the real response; with `ignores_conditions` models a server that ignores If-Match.
KINDS = ("status", "drop", "trickle", "no_length", "grow", "pass")
HTTP_ONLY = ("no_length", "grow")
REQUEST_LOG = 50_000


@dataclass
class Fault:
    """One scripted failure. `hits` counts the requests it fired on (read it, don't set it)."""

    server: str
    path_contains: str
    kind: str = "status"
    status: int = 500
    after_bytes: int = 0
    times: int | None = 1
    hits: int = 0
    method: str | None = None  # only requests with this method (e.g. "HEAD"); None = any
    skip: int = 0  # let this many matching requests through untouched first
    trickle_bytes: int = 1
    interval_seconds: float = 0.05
    grow_bytes: int = 0
    ignores_conditions: bool = False  # the server ignores If-Match/If-Range while this fires
    seen: int = 0

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times


@dataclass(frozen=True)
class Request:
    """One request as a loopback server saw it."""

    server: str
    method: str
    path: str
    peer: str  # "host:port" of the client end: one value per connection
    range: str | None
    if_match: str | None


class FaultPlan:
    """Thread-safe list of faults and log of requests; both servers consult it on every request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._log: collections.deque[Request] = collections.deque(maxlen=REQUEST_LOG)

    def add(
        self,
        server: str,
        path_contains: str,
        kind: str = "status",
        status: int = 500,
        after_bytes: int = 0,
        times: int | None = 1,
        *,
        method: str | None = None,
        skip: int = 0,
        trickle_bytes: int = 1,
        interval_seconds: float = 0.05,
        grow_bytes: int = 0,
        ignores_conditions: bool = False,
    ) -> Fault:
        """Schedule a fault on `server` ("s3" or "http") for requests whose path contains `path_contains`.

        See KINDS for what each kind does. `times` is how many matching requests it fires on
        (None = every one), after the first `skip` matching requests went through untouched.
        """
        if server not in SERVERS:
            raise ValueError(f"fault server must be one of {SERVERS}, not {server!r}")
        if kind not in KINDS:
            raise ValueError(f"fault kind must be one of {KINDS}, not {kind!r}")
        if kind in HTTP_ONLY and server != "http":
            raise ValueError(f"fault kind {kind!r} exists only on the http server")
        if kind == "status" and not 100 <= status <= 599:
            raise ValueError(f"fault status must be an HTTP status code, not {status!r}")
        if after_bytes < 0 or skip < 0 or grow_bytes < 0:
            raise ValueError("after_bytes, skip and grow_bytes must be >= 0")
        if trickle_bytes < 1 or interval_seconds < 0:
            raise ValueError("trickle_bytes must be >= 1 and interval_seconds >= 0")
        if times is not None and times < 1:
            raise ValueError(f"times must be >= 1 or None, not {times}")
        fault = Fault(
            server,
            path_contains,
            kind,
            status,
            after_bytes,
            times,
            method=method.upper() if method else None,
            skip=skip,
            trickle_bytes=trickle_bytes,
            interval_seconds=interval_seconds,
            grow_bytes=grow_bytes,
            ignores_conditions=ignores_conditions,
        )
        with self._lock:
            self._faults.append(fault)
        return fault

    def remove(self, fault: Fault) -> None:
        with self._lock:
            self._faults = [f for f in self._faults if f is not fault]

    def clear(self) -> None:
        """Drop every fault and forget the logged requests."""
        with self._lock:
            self._faults.clear()
            self._log.clear()

    def faults(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def take(self, server: str, path: str, method: str = "GET") -> Fault | None:
        """The first live fault matching this request, counted as fired; None if none applies.

        Counting under the lock means `times=1` fires exactly once even when a client sends
        parallel ranged requests for the same file.
        """
        with self._lock:
            for fault in self._faults:
                if (
                    fault.server != server
                    or fault.path_contains not in path
                    or (fault.method is not None and fault.method != method.upper())
                    or fault.exhausted
                ):
                    continue
                fault.seen += 1
                if fault.seen <= fault.skip:
                    continue
                fault.hits += 1
                return fault
        return None

    def log(self, request: Request) -> None:
        with self._lock:
            self._log.append(request)

    def requests(
        self, server: str | None = None, path_contains: str = "", method: str | None = None
    ) -> list[Request]:
        """The logged requests (the last REQUEST_LOG of them) matching the filters, oldest first."""
        with self._lock:
            return [
                r
                for r in self._log
                if (server is None or r.server == server)
                and path_contains in r.path
                and (method is None or r.method == method.upper())
            ]
