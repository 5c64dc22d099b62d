"""Loopback HTTP server for the sample upstreams: static files, DRF-style paging, Range, faults.

It stands in for three real services at once (the MERMAID API, the USGS Coast Train file folder
and Zenodo), so it implements just the parts of HTTP the fetchers rely on upstream: HEAD,
single byte ranges (resume and parallel ranged download), Content-Length, a strong ETag,
If-Match / If-Range, and Django REST Framework LimitOffset pagination for the MERMAID endpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mimetypes
import re
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from stages.fsutil import file_digest
from stages.loopback.faults import Fault, FaultPlan, Request

log = logging.getLogger(__name__)

BASE_PLACEHOLDER = b"{{BASE}}"
DEFAULT_LIMIT = 100
MAX_LIMIT = 5000
SEND_CHUNK = 1 << 20
# `.json` files get {{BASE}} substituted in memory; anything bigger is not an API document and is
# streamed untouched so a large data file can never be pulled into RAM by accident.
MAX_SUBSTITUTED_JSON = 64 << 20
IDLE_TIMEOUT_SECONDS = 120


class TrackedThreadsMixin:
    """Handler threads the server can end and join on stop.

    socketserver's ThreadingMixIn either leaves daemon threads running or (non-daemon) blocks
    server_close() until every keep-alive client hangs up. We keep daemon threads, so a forgotten
    stop() never blocks interpreter exit, but remember each connection so stop() can shut the
    sockets down and join the threads: nothing keeps serving after stop() returns.
    """

    def _init_tracking(self) -> None:
        self._conn_lock = threading.Lock()
        self._conns: dict[Any, threading.Thread] = {}

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread,  # type: ignore[attr-defined]
            args=(request, client_address),
            name="loopback-conn",
            daemon=True,
        )
        with self._conn_lock:
            self._conns[request] = thread
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        with self._conn_lock:
            self._conns.pop(request, None)
        super().shutdown_request(request)  # type: ignore[misc]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-transfer is routine here (faults, cancelled downloads).
        log.debug("connection from %s ended with an error", client_address, exc_info=True)

    def close_connections(self, timeout: float = 10.0) -> None:
        with self._conn_lock:
            conns = list(self._conns.items())
        for sock, _ in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, thread in conns:
            thread.join(timeout)


class ServerThread:
    """Runs a socketserver in a daemon thread; stop() shuts it down and joins every thread."""

    def __init__(self, server: socketserver.BaseServer, name: str) -> None:
        self.server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.server.shutdown()
            self._thread.join()
        self.server.server_close()
        close = getattr(self.server, "close_connections", None)
        if close is not None:
            close()


def if_match_fails(header: str | None, etag: str) -> bool:
    """RFC 9110 If-Match: true when the header is there and names neither `*` nor `etag` (strong)."""
    if header is None:
        return False
    tags = [t.strip() for t in header.split(",")]
    return "*" not in tags and etag not in [t for t in tags if not t.startswith("W/")]


def trickled(pieces: Iterator[bytes], fault: Fault) -> Iterator[bytes]:
    """The body `pieces` as a trickle fault sends it: `after_bytes` at once, then drop by drop."""
    fast = fault.after_bytes
    for piece in pieces:
        while piece:
            if fast > 0:
                head, piece = piece[:fast], piece[fast:]
                fast -= len(head)
                yield head
                continue
            time.sleep(fault.interval_seconds)
            head, piece = piece[: fault.trickle_bytes], piece[fault.trickle_bytes :]
            yield head


def close_abruptly(sock: socket.socket) -> None:
    """End a connection mid-body: the peer sees EOF before Content-Length bytes arrived."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class RangeNotSatisfiable(Exception):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte positions of a single `bytes=` range, or None to send the whole body.

    Follows RFC 9110: a syntactically invalid or multi-range header is ignored (full 200), a
    valid range that starts beyond the end raises RangeNotSatisfiable (416).
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    match = re.fullmatch(r"\s*(\d*)\s*-\s*(\d*)\s*", spec)
    if not match or (not match.group(1) and not match.group(2)):
        return None
    first_s, last_s = match.groups()
    if not first_s:
        suffix = int(last_s)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(0, size - suffix), size - 1
    first = int(first_s)
    last = int(last_s) if last_s else size - 1
    if last_s and last < first:
        return None
    if first >= size:
        raise RangeNotSatisfiable
    return first, min(last, size - 1)


@dataclass
class Resource:
    """A response body: either bytes in memory or a file streamed from disk."""

    size: int
    etag: str
    content_type: str
    data: bytes | None = None
    path: Path | None = None


def grown(res: Resource, extra: int) -> Resource:
    """`res` as if `extra` bytes had been appended to it since it was listed (its ETag changes)."""
    body = res.data if res.data is not None else (res.path.read_bytes() if res.path is not None else b"")
    data = body + b"\x00" * extra
    return replace(res, size=len(data), etag=_bytes_etag(data), data=data, path=None)


class HTTPProblem(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _content_type(name: str) -> str:
    if name.endswith(".json"):
        return "application/json"
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream"


def _bytes_etag(data: bytes) -> str:
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


def _positive_int(raw: str | None, default: int, strict: bool, cutoff: int | None = None) -> int:
    """DRF's `_positive_int` as LimitOffsetPagination applies it: bad values fall back to the default."""
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        return default
    if value < 0 or (strict and value == 0):
        return default
    return min(value, cutoff) if cutoff is not None else value


class LoopbackHTTPServer(TrackedThreadsMixin, ThreadingHTTPServer):
    """Serves `root` (the upstream's `http/` folder) on 127.0.0.1."""

    daemon_threads = True

    def __init__(self, root: Path, faults: FaultPlan, host: str = "127.0.0.1", port: int = 0) -> None:
        self._init_tracking()
        super().__init__((host, port), _Handler)
        self.root = Path(root).resolve()
        self.faults = faults
        self.base = f"http://{host}:{self.server_port}"
        self._cache_lock = threading.Lock()
        self._etags: dict[tuple[str, int, int], str] = {}
        self._etag_locks: dict[str, threading.Lock] = {}
        self._json: dict[tuple[str, int, int], bytes] = {}
        self._results: dict[tuple[str, int, int], list[Any]] = {}

    # -- path mapping -------------------------------------------------------------------------

    def locate(self, raw_path: str) -> Path:
        """The file or folder a URL path names, refusing anything that could leave `root`."""
        path = unquote(raw_path, errors="strict")
        if "\x00" in path or "\\" in path:
            raise HTTPProblem(400, "bad characters in path")
        segments = path.split("/")
        if any(seg in (".", "..") for seg in segments):
            raise HTTPProblem(400, "path traversal refused")
        rel = "/".join(seg for seg in segments if seg)
        target = self.root / rel if rel else self.root
        # Symlinks inside the upstream tree must not lead out of it either.
        try:
            resolved = target.resolve()
        except OSError as exc:
            raise HTTPProblem(404, "Not found.") from exc
        if not resolved.is_relative_to(self.root):
            raise HTTPProblem(404, "Not found.")
        return resolved

    def resource(self, raw_path: str, query: str) -> Resource:
        target = self.locate(raw_path)
        if target.is_dir():
            index = target / "index.json"
            results = target / "results.json"
            if index.is_file():
                return self._json_resource(index)
            if results.is_file():
                return self._page(results, raw_path, query)
            raise HTTPProblem(404, "Not found.")
        if not target.is_file():
            raise HTTPProblem(404, "Not found.")
        if target.suffix == ".json":
            return self._json_resource(target)
        st = target.stat()
        return Resource(st.st_size, self._file_etag(target, st), _content_type(target.name), path=target)

    # -- bodies -------------------------------------------------------------------------------

    def _file_etag(self, path: Path, st: Any) -> str:
        """md5 of the file, computed once per (size, mtime) even under parallel first requests."""
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._cache_lock:
            if key in self._etags:
                return self._etags[key]
            lock = self._etag_locks.setdefault(str(path), threading.Lock())
        with lock:
            with self._cache_lock:
                if key in self._etags:
                    return self._etags[key]
            etag = '"' + file_digest(path, "md5") + '"'
            with self._cache_lock:
                self._etags[key] = etag
        return etag

    def _json_bytes(self, path: Path) -> bytes:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._cache_lock:
            cached = self._json.get(key)
        if cached is None:
            cached = path.read_bytes().replace(BASE_PLACEHOLDER, self.base.encode("ascii"))
            with self._cache_lock:
                self._json[key] = cached
        return cached

    def _json_resource(self, path: Path) -> Resource:
        st = path.stat()
        if st.st_size > MAX_SUBSTITUTED_JSON:
            return Resource(st.st_size, self._file_etag(path, st), "application/json", path=path)
        data = self._json_bytes(path)
        return Resource(len(data), _bytes_etag(data), "application/json", data=data)

    def _page(self, results_path: Path, raw_path: str, query: str) -> Resource:
        """One LimitOffset page of `results.json`, shaped and linked the way DRF does it."""
        st = results_path.stat()
        key = (str(results_path), st.st_size, st.st_mtime_ns)
        with self._cache_lock:
            results = self._results.get(key)
        if results is None:
            try:
                results = json.loads(self._json_bytes(results_path))
            except ValueError as exc:
                raise HTTPProblem(500, f"{results_path}: not valid JSON: {exc}") from exc
            if not isinstance(results, list):
                raise HTTPProblem(500, f"{results_path}: expected a JSON array of results")
            with self._cache_lock:
                self._results[key] = results
        params = dict(parse_qsl(query, keep_blank_values=True))
        limit = _positive_int(params.get("limit"), DEFAULT_LIMIT, strict=True, cutoff=MAX_LIMIT)
        offset = _positive_int(params.get("offset"), 0, strict=False)
        count = len(results)

        def link(new_offset: int | None) -> str:
            # DRF's replace_query_param/remove_query_param: other params kept, keys sorted.
            q = {k: v for k, v in params.items() if k != "offset"}
            q["limit"] = str(limit)
            if new_offset is not None:
                q["offset"] = str(new_offset)
            return f"{self.base}{raw_path}?{urlencode(sorted(q.items()))}"

        next_url = link(offset + limit) if offset + limit < count else None
        if offset <= 0:
            prev_url = None
        elif offset - limit <= 0:
            prev_url = link(None)
        else:
            prev_url = link(offset - limit)
        page = {"count": count, "next": next_url, "previous": prev_url,
                "results": results[offset:offset + limit]}
        data = json.dumps(page, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
        return Resource(len(data), _bytes_etag(data), "application/json", data=data)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: fetchers reuse connections for many small files
    server_version = "tidepool-loopback"
    sys_version = ""

    def version_string(self) -> str:
        return self.server_version
    timeout = IDLE_TIMEOUT_SECONDS
    server: LoopbackHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("http %s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _serve(self, head: bool) -> None:
        try:
            self._respond(head)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            # The client went away (or a drop fault cut it off): nothing left to say to it.
            self.close_connection = True

    def _respond(self, head: bool) -> None:
        method = "HEAD" if head else "GET"
        self.server.faults.log(
            Request(
                "http",
                method,
                self.path,
                f"{self.client_address[0]}:{self.client_address[1]}",
                self.headers.get("Range"),
                self.headers.get("If-Match"),
            )
        )
        fault = self.server.faults.take("http", self.path, method)
        if fault is not None and fault.kind == "status":
            self._send_problem(fault.status, f"injected fault: status {fault.status}", head, None)
            return
        split = urlsplit(self.path)
        try:
            res = self.server.resource(split.path, split.query)
        except HTTPProblem as problem:
            self._send_problem(problem.status, problem.detail, head, fault)
            return
        except (UnicodeDecodeError, ValueError):
            self._send_problem(400, "bad path", head, fault)
            return
        except OSError as exc:
            log.warning("http %s: %s", split.path, exc)
            self._send_problem(500, f"cannot read {split.path}: {exc.strerror or exc}", head, fault)
            return

        if fault is not None and fault.kind == "grow":
            res = grown(res, fault.grow_bytes)
        conditions = not (fault is not None and fault.ignores_conditions)
        if conditions and if_match_fails(self.headers.get("If-Match"), res.etag):
            self._send_problem(412, "Precondition Failed: If-Match does not match the ETag", head, None)
            return
        headers = {
            "Content-Type": res.content_type,
            "ETag": res.etag,
            "Accept-Ranges": "bytes",
        }
        if_range = self.headers.get("If-Range") if conditions else None
        range_header = self.headers.get("Range") if if_range in (None, res.etag) else None
        try:
            byte_range = parse_range(range_header, res.size)
        except RangeNotSatisfiable:
            headers["Content-Range"] = f"bytes */{res.size}"
            self._send(416, headers, b"", 0, 0, head, fault, res=None)
            return
        if byte_range is None:
            self._send(200, headers, res.data, 0, res.size, head, fault, res=res)
            return
        first, last = byte_range
        headers["Content-Range"] = f"bytes {first}-{last}/{res.size}"
        self._send(206, headers, res.data, first, last - first + 1, head, fault, res=res)

    def _send_problem(self, status: int, detail: str, head: bool, fault: Fault | None) -> None:
        body = json.dumps({"detail": detail}).encode("utf-8")
        self._send(status, {"Content-Type": "application/json"}, body, 0, len(body), head, fault, res=None)

    def _send(
        self,
        status: int,
        headers: dict[str, str],
        data: bytes | None,
        start: int,
        length: int,
        head: bool,
        fault: Fault | None,
        res: Resource | None,
    ) -> None:
        kind = fault.kind if fault is not None else None
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if kind == "no_length":
            self.send_header("Connection", "close")
        else:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        cut = kind == "drop" or (kind == "no_length" and fault is not None and fault.after_bytes > 0)
        send = min(length, fault.after_bytes) if cut and fault is not None else length
        if kind == "trickle" and fault is not None and not head and send:
            for piece in trickled(self._pieces(data, res, start, send), fault):
                self.wfile.write(piece)
                self.wfile.flush()
        elif not head and send:
            if data is not None:
                self.wfile.write(data[start:start + send])
            elif res is not None and res.path is not None:
                with open(res.path, "rb") as fh:
                    # sendfile streams from the page cache: archives of hundreds of MB never
                    # pass through Python memory.
                    self.connection.sendfile(fh, offset=start, count=send)
        if cut or kind == "no_length":
            self.wfile.flush()
            close_abruptly(self.connection)
            self.close_connection = True

    @staticmethod
    def _pieces(data: bytes | None, res: Resource | None, start: int, length: int) -> Iterator[bytes]:
        if data is not None:
            yield data[start : start + length]
            return
        if res is None or res.path is None:
            return
        with open(res.path, "rb") as fh:
            fh.seek(start)
            while length > 0 and (piece := fh.read(min(SEND_CHUNK, length))):
                length -= len(piece)
                yield piece
