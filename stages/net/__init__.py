"""Transfer layer shared by HTTP (`stages.net.http`) and S3 (`stages.net.s3`).

What lives here is what both transports need to agree on: the retry policy, the resumable
`.part` files in the scratch folder (with a small JSON state beside them), verification of
size and md5, and the final rename into place. Nothing in a scratch folder is ever an output:
a file reaches its destination only complete and verified.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from stages.errors import ChecksumMismatch, FetchError
from stages.fsutil import atomic_path, file_digest

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 60.0
_MD5_RE = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class NetSettings:
    """The `net:` section of params.yaml."""

    retries: int = 5
    backoff_seconds: float = 0.5
    timeout_seconds: float = 60.0
    chunk_bytes: int = 8 << 20

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> NetSettings:
        net = params.get("net") or {}
        return cls(
            retries=int(net.get("retries", cls.retries)),
            backoff_seconds=float(net.get("backoff_seconds", cls.backoff_seconds)),
            timeout_seconds=float(net.get("timeout_seconds", cls.timeout_seconds)),
            chunk_bytes=max(1, int(net.get("chunk_bytes", cls.chunk_bytes))),
        )


class Transient(Exception):
    """A failure worth retrying (5xx, 429, a dropped or timed-out connection). Internal to net/."""


class RemoteNotFound(FetchError):
    """The URL or object does not exist upstream (HTTP 404, S3 NoSuchKey)."""


class RetryBudget:
    """Counts consecutive transient failures of one transfer and sleeps the backoff between them.

    The count resets whenever bytes arrive, so a long download over a flaky link keeps going as
    long as it makes progress, while a server that keeps failing gives up after `retries`.
    """

    def __init__(self, url: str, settings: NetSettings, sleep: Callable[[float], None] = time.sleep) -> None:
        self.url = url
        self.settings = settings
        self.failures = 0
        self._sleep = sleep

    def failed(self, cause: str) -> None:
        """Record a transient failure: sleep and return, or raise FetchError when retries are spent."""
        if self.failures >= self.settings.retries:
            raise FetchError(self.url, f"{cause} (gave up after {self.settings.retries} retries)")
        delay = min(self.settings.backoff_seconds * (2**self.failures), MAX_BACKOFF_SECONDS)
        self.failures += 1
        log.info("%s: %s; retry %d/%d in %.2fs", self.url, cause, self.failures, self.settings.retries, delay)
        if delay > 0:
            self._sleep(delay)

    def progressed(self) -> None:
        self.failures = 0


def md5_from_etag(etag: str | None) -> str | None:
    """The md5 an ETag stands for, when it is a plain one (not multipart `…-N`, not weak)."""
    if not etag:
        return None
    value = etag.strip()
    if value.startswith("W/"):
        return None
    value = value.strip('"').lower()
    return value if _MD5_RE.fullmatch(value) else None


def clean_etag(etag: str | None) -> str:
    """ETag without the surrounding quotes, as the manifests record it ('' when there is none)."""
    return (etag or "").strip().strip('"')


@dataclass(frozen=True)
class Downloaded:
    """What a finished transfer produced."""

    path: Path
    size: int
    md5: str
    etag: str
    transferred: int  # bytes that crossed the network in this run (less than size after a resume)


class PartFile:
    """A resumable partial download: `<scratch>/<name>.part` plus `<name>.part.json`.

    The JSON records what the partial bytes belong to (size, ETag, and for parallel downloads
    the progress of each segment); a part whose upstream changed is thrown away, never resumed.
    """

    def __init__(self, scratch: Path, name: str) -> None:
        self.path = Path(scratch) / f"{name}.part"
        self.state_path = Path(scratch) / f"{name}.part.json"

    def load_state(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) else None

    def save_state(self, state: dict[str, Any]) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.state_path) as tmp:
            tmp.write_text(json.dumps(state, sort_keys=True), encoding="utf-8")

    def size_on_disk(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.state_path.unlink(missing_ok=True)

    def matches(self, state: dict[str, Any] | None, **expected: Any) -> bool:
        """True when the saved state describes the same upstream bytes as `expected`."""
        if state is None:
            return False
        return all(state.get(k) == v for k, v in expected.items())


def verify_part(part: PartFile, url: str, expected_size: int | None, expected_md5: str | None) -> str:
    """Check a complete part file; return its md5. A mismatch deletes the bytes and raises."""
    actual_size = part.size_on_disk()
    if expected_size is not None and actual_size != expected_size:
        part.discard()
        raise ChecksumMismatch(url, "size", f"{expected_size} bytes", f"{actual_size} bytes")
    actual_md5 = file_digest(part.path, "md5")
    if expected_md5 and actual_md5 != expected_md5.lower():
        part.discard()
        raise ChecksumMismatch(url, "md5", expected_md5.lower(), actual_md5)
    return actual_md5


def place_file(src: Path, dest: Path) -> None:
    """Move a verified file into place atomically (copy + rename when scratch is another device)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        Path(src).unlink()


def replace_tree(src: Path, dest: Path) -> None:
    """Put directory `src` at `dest`, replacing what was there, with only one rename exposed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    trash = None
    if dest.exists() or dest.is_symlink():
        trash = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(dest, trash)
    try:
        os.replace(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            if trash is not None:
                os.replace(trash, dest)
            raise
        staged = dest.with_name(f".{dest.name}.new-{os.getpid()}")
        shutil.copytree(src, staged)
        os.replace(staged, dest)
        shutil.rmtree(src)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


class HashingReader:
    """A read-only file wrapper that md5s and counts every byte that passes through it."""

    def __init__(self, raw: IO[bytes], on_bytes: Callable[[int], Any] | None = None) -> None:
        self._raw = raw
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._on_bytes = on_bytes
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        if data:
            self._md5.update(data)
            self.count += len(data)
            if self._on_bytes is not None:
                self._on_bytes(len(data))
        return data

    def drain(self, chunk: int = 1 << 20) -> None:
        """Read to the end: a tar reader stops at the end-of-archive marker, the checksum does not."""
        while self.read(chunk):
            pass

    def hexdigest(self) -> str:
        return self._md5.hexdigest()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._raw.close()


def known_md5(params: dict[str, Any], source: str, name: str) -> str | None:
    """`endpoints.known_md5["<source>/<name>"]`, lower-cased, or None."""
    table = (params.get("endpoints") or {}).get("known_md5") or {}
    value = table.get(f"{source}/{name}")
    return str(value).strip().lower() if value else None
