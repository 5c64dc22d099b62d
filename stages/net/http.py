"""HTTP transfers: JSON GETs and resumable, verified, optionally parallel ranged downloads.

`download()` writes into `<scratch>/<name>.part` and resumes it with `Range` after a dropped
connection or an interrupted run. With `connections > 1` and a server that honours ranges, the
file is cut into segments fetched by threads into one preallocated part file (like aria2's
--split); the per-segment progress sits in `<name>.part.json`, so a re-run resumes each
segment where it stopped.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import urllib3.exceptions

from stages.errors import FetchError, UpstreamFormatError
from stages.net import (
    UNVERIFIED,
    Deadline,
    Downloaded,
    NetSettings,
    PartFile,
    RemoteChanged,
    RemoteNotFound,
    RetryBudget,
    RetryCount,
    Stalled,
    ThroughputFloor,
    Transient,
    clean_etag,
    place_file,
    read_some,
    verification,
    verify_part,
)
from stages.progress import bar

log = logging.getLogger(__name__)

USER_AGENT = "tidepool-fetch/1"
# Sizes, ranges and checksums refer to the file's own bytes: ask for them unencoded.
DOWNLOAD_HEADERS = {"Accept-Encoding": "identity"}

# Failures of the connection rather than of the request: worth a retry that resumes.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
)

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def describe(exc: BaseException) -> str:
    """A one-line cause for a log or an error message."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


def check_status(url: str, resp: requests.Response) -> None:
    """Raise Transient for 5xx/429, a FetchError for other 4xx, nothing for success."""
    code = resp.status_code
    if code < 400:
        return
    reason = f"HTTP {code} {resp.reason or ''}".strip()
    if code >= 500 or code == 429:
        raise Transient(reason)
    if code in (404, 410):
        raise RemoteNotFound(url, f"{reason}: no such file upstream")
    if code in (401, 403):
        raise FetchError(url, f"{reason}: access denied (check the URL, or whether it needs credentials)")
    raise FetchError(url, reason)


@dataclass(frozen=True)
class RemoteFile:
    """What a HEAD request tells about a file (None where the server did not say)."""

    url: str
    size: int | None
    etag: str
    accepts_ranges: bool | None


class _RangeIgnored(Exception):
    """The server answered a ranged request with the whole file."""


def _content_range_start(resp: requests.Response) -> int | None:
    match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


class HttpClient:
    """Retried HTTP GETs and downloads with the `net:` settings."""

    def __init__(self, settings: NetSettings, session: requests.Session | None = None) -> None:
        self.settings = settings
        self.session = session or self._new_session()

    @staticmethod
    def _new_session() -> requests.Session:
        session = requests.Session()
        session.headers["User-Agent"] = USER_AGENT
        return session

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _timeout(self) -> tuple[float, float]:
        return (self.settings.timeout_seconds, self.settings.timeout_seconds)

    def get_json(self, url: str) -> Any:
        """GET a JSON document, retrying transient failures (with the throughput floor and deadline)."""
        budget = RetryBudget(url, self.settings, deadline=Deadline(url, self.settings))
        floor = ThroughputFloor(self.settings)
        while True:
            try:
                with self.session.get(url, stream=True, timeout=self._timeout) as resp:
                    check_status(url, resp)
                    floor.restart()
                    parts: list[bytes] = []
                    while chunk := read_some(resp.raw, self.settings.chunk_bytes, decode=True):
                        parts.append(chunk)
                        floor.add(len(chunk))
                        floor.check()
                        budget.check_deadline()
                    body = b"".join(parts)
                break
            except Stalled as exc:
                budget.failed(str(exc), stalled=True)
            except Transient as exc:
                budget.failed(str(exc))
            except TRANSIENT_ERRORS as exc:
                budget.failed(describe(exc))
        try:
            return json.loads(body)
        except ValueError as exc:
            raise UpstreamFormatError(url, f"expected a JSON document: {exc}") from None

    def head(self, url: str) -> RemoteFile:
        """Size, ETag and range support of `url` (follows redirects)."""
        budget = RetryBudget(url, self.settings)
        while True:
            try:
                with self.session.head(
                    url, headers=DOWNLOAD_HEADERS, allow_redirects=True, timeout=self._timeout
                ) as resp:
                    if resp.status_code in (403, 405, 501):
                        # Some servers refuse HEAD (presigned storage URLs answer 403): plan the
                        # download without knowing the size; a real refusal shows on the GET.
                        return RemoteFile(url, None, "", None)
                    check_status(url, resp)
                    length = resp.headers.get("Content-Length")
                    ranges = resp.headers.get("Accept-Ranges")
                    return RemoteFile(
                        url=url,
                        size=int(length) if length and length.isdigit() else None,
                        etag=clean_etag(resp.headers.get("ETag")),
                        accepts_ranges=None if ranges is None else ranges.strip().lower() == "bytes",
                    )
            except Transient as exc:
                budget.failed(str(exc))
            except TRANSIENT_ERRORS as exc:
                budget.failed(describe(exc))

    def download(
        self,
        url: str,
        dest: Path,
        scratch: Path,
        *,
        name: str | None = None,
        expected_size: int | None = None,
        expected_md5: str | None = None,
        connections: int = 1,
        desc: str | None = None,
    ) -> Downloaded:
        """Download `url` to `dest` through `<scratch>/<name>.part`, verified, resuming what is there.

        `expected_size`/`expected_md5` are what upstream published; a mismatch raises
        ChecksumMismatch and deletes the bytes. Every GET carries If-Match on the ETag the HEAD
        gave, so a file that changes mid-transfer is RemoteChanged, never two versions spliced.
        A file whose size and md5 are both unknown is refused unless `net.accept_unverified`.
        `dest` appears only once verified.
        """
        dest = Path(dest)
        name = name or dest.name
        part = PartFile(Path(scratch), name)
        part.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = Deadline(url, self.settings)
        info = self.head(url)
        if expected_size is not None and info.size is not None and info.size != expected_size:
            # Downloading would only end in a size mismatch: say so before spending the bandwidth.
            raise FetchError(url, f"the server reports {info.size} bytes, {expected_size} were expected")
        size = info.size if info.size is not None else expected_size
        state = part.load_state()
        if not part.matches(state, size=size, etag=info.etag):
            part.discard()
            state = None
        nseg = self._segment_count(size, connections, info.accepts_ranges)
        spent = RetryCount()
        fetched = _Fetched(0, size, info.etag)
        try:
            with bar(total=size, desc=desc or name, unit="B") as pbar:
                if nseg > 1 and size is not None:
                    try:
                        moved = self._fetch_parallel(
                            url, part, size, info.etag, nseg, state, pbar, spent, deadline
                        )
                        fetched = _Fetched(moved, size, info.etag)
                    except _RangeIgnored:
                        log.info("%s: server ignores Range; downloading over one connection", url)
                        part.discard()
                        state = None
                        nseg = 1
                if nseg <= 1:
                    if state is not None and state.get("mode") != "single":
                        part.discard()
                        state = None
                    # Without an ETag from HEAD, the one the first GET gave (saved with the part)
                    # pins the resume of those bytes in a later run too.
                    learnt = ""
                    if state is not None and not info.etag and part.size_on_disk():
                        learnt = str(state.get("get_etag") or "")
                    part.save_state({"mode": "single", "size": size, "etag": info.etag, "get_etag": learnt})
                    fetched = self._fetch_single(
                        url, part, size, info.etag or learnt, pbar, spent, deadline
                    )
        except RemoteChanged:
            part.discard()  # bytes of a version that is gone: never resumed
            raise
        check_size = expected_size if expected_size is not None else fetched.size
        verified = verification(expected_md5, check_size)
        if verified == UNVERIFIED and not self.settings.accept_unverified:
            part.discard()
            raise FetchError(
                url,
                "the server gave no size (HEAD refused or no Content-Length) and no checksum is known, "
                "so a cut-off download cannot be told from a complete one; refused (publish its md5 "
                "in endpoints.known_md5, or set net.accept_unverified: true to keep it marked "
                "verified=none in the manifest)",
            )
        md5 = verify_part(part, url, check_size, expected_md5)
        final_size = part.size_on_disk()
        place_file(part.path, dest)
        part.discard()
        return Downloaded(
            path=dest,
            size=final_size,
            md5=md5,
            etag=fetched.etag,
            transferred=fetched.transferred,
            verified=verified,
        )

    def _segment_count(self, size: int | None, connections: int, accepts_ranges: bool | None) -> int:
        if connections <= 1 or size is None or accepts_ranges is False:
            return 1
        # Segments no smaller than the streaming chunk: splitting a small file only adds requests.
        return max(1, min(connections, size // self.settings.chunk_bytes))

    def _open(
        self, session: requests.Session, url: str, etag: str, first: int, last: int | None = None
    ) -> requests.Response:
        """A streamed GET of bytes `first`..`last` (None: to the end), pinned to `etag`."""
        headers = dict(DOWNLOAD_HEADERS)
        if etag and not etag.startswith("W/"):
            # Strong comparison: a weak ETag can never satisfy If-Match, so it is not sent.
            headers["If-Match"] = f'"{etag}"'
        if first or last is not None:
            headers["Range"] = f"bytes={first}-{'' if last is None else last}"
        return session.get(url, headers=headers, stream=True, timeout=self._timeout)

    @staticmethod
    def _check_response(url: str, resp: requests.Response, etag: str, size: int | None) -> str:
        """Raise for a failed status or a response that is not the version listed; return its ETag."""
        if resp.status_code == 412:
            raise RemoteChanged(url, f"If-Match on ETag {etag} failed (HTTP 412)")
        check_status(url, resp)
        sent = clean_etag(resp.headers.get("ETag"))
        if etag and sent and sent != etag:
            # A server that ignores If-Match still says which version it sends.
            raise RemoteChanged(url, f"the server sends ETag {sent}, not the listed {etag}")
        total = _announced_total(resp)
        if size is not None and total is not None and total != size:
            raise RemoteChanged(url, f"the server now announces {total} bytes, not the listed {size}")
        return sent

    def _fetch_single(
        self,
        url: str,
        part: PartFile,
        size: int | None,
        etag: str,
        pbar: Any,
        spent: RetryCount,
        deadline: Deadline,
    ) -> _Fetched:
        budget = RetryBudget(url, self.settings, spent=spent, deadline=deadline)
        floor = ThroughputFloor(self.settings)
        transferred = 0
        while True:
            budget.check_deadline()
            have = part.size_on_disk()
            if size is not None and have > size:
                part.path.unlink()
                have = 0
            if size is not None and have == size and (have > 0 or part.path.exists()):
                return _Fetched(transferred, size, etag)
            budget.reached(have)
            pbar.reset(total=size)
            pbar.update(have)
            try:
                with self._open(self.session, url, etag, have) as resp:
                    if resp.status_code == 416 and have:
                        # Our part runs past the end of the (unknown-size) file: start again,
                        # spending a retry so that a server answering 416 to everything ends.
                        part.path.unlink()
                        raise Transient(f"HTTP 416 for the bytes from {have}")
                    sent = self._check_response(url, resp, etag, size)
                    if not etag and sent:
                        etag = sent  # learnt from the first GET: pins the resumes after it
                        state = part.load_state() or {}
                        part.save_state({**state, "get_etag": sent})
                    if size is None:
                        size = _announced_total(resp)
                    if have and resp.status_code == 206:
                        start = _content_range_start(resp)
                        if start is not None and start != have:
                            raise FetchError(url, f"asked for bytes from {have}, server sent from {start}")
                        mode = "ab"
                    else:
                        # A 200 to a ranged request is the whole file: the server ignores Range.
                        have, mode = 0, "wb"
                        pbar.reset(total=size)
                    length = resp.headers.get("Content-Length")
                    expected = int(length) if length and length.isdigit() else None
                    got = 0
                    floor.restart()
                    with open(part.path, mode) as fh:
                        while chunk := read_some(resp.raw, self.settings.chunk_bytes, decode=True):
                            if size is not None and have + got + len(chunk) > size:
                                raise RemoteChanged(url, f"the server sent more than the {size} bytes listed")
                            # Written at once: a drop after this read keeps every byte that came.
                            fh.write(chunk)
                            got += len(chunk)
                            transferred += len(chunk)
                            pbar.update(len(chunk))
                            budget.reached(have + got)
                            floor.add(len(chunk))
                            floor.check()
                            budget.check_deadline()
                    if (expected is not None and got < expected) or (
                        size is not None and have + got < size
                    ):
                        raise Transient(f"connection closed after {have + got} bytes")
                return _Fetched(transferred, size, etag)
            except Stalled as exc:
                budget.failed(str(exc), stalled=True)
            except Transient as exc:
                budget.failed(str(exc))
            except TRANSIENT_ERRORS as exc:
                budget.failed(describe(exc))

    def _fetch_parallel(
        self,
        url: str,
        part: PartFile,
        size: int,
        etag: str,
        nseg: int,
        state: dict[str, Any] | None,
        pbar: Any,
        spent: RetryCount,
        deadline: Deadline,
    ) -> int:
        segments = (state or {}).get("segments")
        valid = (
            state is not None
            and state.get("mode") == "segments"
            and isinstance(segments, list)
            and len(segments) == nseg
            and part.size_on_disk() == size
        )
        if not valid:
            part.discard()
            segments = [[size * i // nseg, size * (i + 1) // nseg, size * i // nseg] for i in range(nseg)]
            with open(part.path, "wb") as fh:
                fh.truncate(size)  # preallocate: every segment writes at its own offset
        state = {"mode": "segments", "size": size, "etag": etag, "segments": segments}
        part.save_state(state)
        pbar.update(sum(pos - start for start, _end, pos in segments))
        lock = threading.Lock()
        stop = threading.Event()
        transferred = [0]

        def record(i: int, pos: int, nbytes: int) -> None:
            with lock:
                segments[i][2] = pos
                transferred[0] += nbytes
                # Saved after the bytes are written, so the state never claims bytes we lack.
                part.save_state(state)
            pbar.update(nbytes)

        def worker(i: int) -> None:
            session = self._new_session()
            budget = RetryBudget(url, self.settings, spent=spent, deadline=deadline)
            floor = ThroughputFloor(self.settings)
            try:
                while not stop.is_set():
                    with lock:
                        _start, end, pos = segments[i]
                    if pos >= end:
                        return
                    budget.reached(pos)
                    try:
                        self._fetch_segment(
                            session, url, part, etag, size, i, pos, end, stop, budget, floor, record
                        )
                    except Stalled as exc:
                        budget.failed(str(exc), stalled=True)
                    except Transient as exc:
                        budget.failed(str(exc))
                    except TRANSIENT_ERRORS as exc:
                        budget.failed(describe(exc))
            finally:
                session.close()

        pool = ThreadPoolExecutor(max_workers=nseg, thread_name_prefix="segment")
        futures = [pool.submit(worker, i) for i in range(nseg)]
        try:
            done, _pending = wait(futures, return_when=FIRST_EXCEPTION)
            errors = [f.exception() for f in done if f.exception() is not None]
            if errors:
                stop.set()
                wait(futures)
                raise errors[0]
        except BaseException:
            stop.set()
            raise
        finally:
            pool.shutdown(wait=True)
            with lock:
                part.save_state(state)
        return transferred[0]

    def _fetch_segment(
        self,
        session: requests.Session,
        url: str,
        part: PartFile,
        etag: str,
        size: int,
        i: int,
        pos: int,
        end: int,
        stop: threading.Event,
        budget: RetryBudget,
        floor: ThroughputFloor,
        record: Any,
    ) -> None:
        with self._open(session, url, etag, pos, end - 1) as resp:
            self._check_response(url, resp, etag, size)
            if resp.status_code != 206:
                raise _RangeIgnored()
            start = _content_range_start(resp)
            if start is not None and start != pos:
                raise FetchError(url, f"asked for bytes from {pos}, server sent from {start}")
            floor.restart()
            with open(part.path, "r+b") as fh:
                fh.seek(pos)
                while chunk := read_some(resp.raw, self.settings.chunk_bytes, decode=True):
                    if stop.is_set():
                        return
                    chunk = chunk[: end - pos]
                    fh.write(chunk)
                    fh.flush()
                    pos += len(chunk)
                    record(i, pos, len(chunk))
                    budget.reached(pos)
                    if pos >= end:
                        return
                    floor.add(len(chunk))
                    floor.check()
                    budget.check_deadline()
        if pos < end:
            raise Transient(f"connection closed at byte {pos} (segment {i} ends at {end})")


@dataclass(frozen=True)
class _Fetched:
    """What one single-connection transfer learnt: bytes moved, the size, the ETag."""

    transferred: int
    size: int | None
    etag: str


def _announced_total(resp: requests.Response) -> int | None:
    """The whole file's size as this response states it (Content-Range total, or a 200's length)."""
    if resp.status_code == 206:
        match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        return int(match.group(3)) if match and match.group(3) != "*" else None
    if resp.status_code == 200:
        length = resp.headers.get("Content-Length")
        return int(length) if length and length.isdigit() else None
    return None
