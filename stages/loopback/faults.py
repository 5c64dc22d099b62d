"""Fault plan shared by the loopback servers: scripted failures for retry and resume tests.

Tests need to see the fetchers survive the failures real upstreams produce (a 500 from S3, a
connection that dies halfway through a 4 GB zip) without relying on luck or timing. A fault is
matched against each request by substring and fires a fixed number of times, so a test can say
"the first GET of this zip dies after 4 KiB" and then check `fault.hits`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

SERVERS = ("s3", "http")
KINDS = ("status", "drop")


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

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times


class FaultPlan:
    """Thread-safe list of faults; both servers consult it on every request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(
        self,
        server: str,
        path_contains: str,
        kind: str = "status",
        status: int = 500,
        after_bytes: int = 0,
        times: int | None = 1,
    ) -> Fault:
        """Schedule a fault on `server` ("s3" or "http") for requests whose path contains `path_contains`.

        kind="status" answers `status` instead of the real response; kind="drop" sends the real
        headers (full Content-Length), `after_bytes` bytes of body, then closes the connection.
        `times` is how many matching requests it fires on (None = every one).
        """
        if server not in SERVERS:
            raise ValueError(f"fault server must be one of {SERVERS}, not {server!r}")
        if kind not in KINDS:
            raise ValueError(f"fault kind must be one of {KINDS}, not {kind!r}")
        if kind == "status" and not 100 <= status <= 599:
            raise ValueError(f"fault status must be an HTTP status code, not {status!r}")
        if after_bytes < 0:
            raise ValueError(f"after_bytes must be >= 0, not {after_bytes}")
        if times is not None and times < 1:
            raise ValueError(f"times must be >= 1 or None, not {times}")
        fault = Fault(server, path_contains, kind, status, after_bytes, times)
        with self._lock:
            self._faults.append(fault)
        return fault

    def remove(self, fault: Fault) -> None:
        with self._lock:
            self._faults = [f for f in self._faults if f is not fault]

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def faults(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def take(self, server: str, path: str) -> Fault | None:
        """The first live fault matching this request, counted as fired; None if none applies.

        Counting under the lock means `times=1` fires exactly once even when a client sends
        parallel ranged requests for the same file.
        """
        with self._lock:
            for fault in self._faults:
                if fault.server == server and fault.path_contains in path and not fault.exhausted:
                    fault.hits += 1
                    return fault
        return None
