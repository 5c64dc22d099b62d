"""Transfer layer shared by HTTP (`stages.net.http`) and S3 (`stages.net.s3`).

What lives here is what both transports need to agree on: the retry policy (`policy`,
re-exported here), what a file was verified against, the resumable `.part` files in the
scratch folder (with a small JSON state beside them), verification of size and md5, and the
final rename into place. Nothing in a scratch folder is ever an output:
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from stages.errors import ChecksumMismatch, FetchError
from stages.fsutil import atomic_path, file_digest, write_json
from stages.net.policy import (
    Deadline,
    NetSettings,
    RetryBudget,
    RetryCount,
    Stalled,
    ThroughputFloor,
    Transient,
    read_some,
)

log = logging.getLogger(__name__)

__all__ = [
    "UNVERIFIED",
    "VERIFIED_MD5",
    "VERIFIED_SIZE",
    "Deadline",
    "Downloaded",
    "HashingReader",
    "NetSettings",
    "PartFile",
    "RemoteChanged",
    "RemoteNotFound",
    "RetryBudget",
    "RetryCount",
    "Stalled",
    "ThroughputFloor",
    "Transient",
    "clean_etag",
    "known_md5",
    "md5_from_etag",
    "place_file",
    "read_some",
    "replace_tree",
    "verification",
    "verify_part",
]

_MD5_RE = re.compile(r"[0-9a-f]{32}")

# What a file's bytes were checked against, as manifest.csv's `verified` column says it.
VERIFIED_MD5 = "md5"  # a checksum the source gave: a published md5, a plain-md5 ETag, the local file
VERIFIED_SIZE = "size"  # only the size upstream announced
UNVERIFIED = "none"  # nothing: accepted only with net.accept_unverified


def verification(md5: str | None, size: int | None) -> str:
    """The `verified` value of a file checked against `md5` and/or `size` (None = not known)."""
    if md5:
        return VERIFIED_MD5
    return VERIFIED_SIZE if size is not None else UNVERIFIED


class RemoteNotFound(FetchError):
    """The URL or object does not exist upstream (HTTP 404, S3 NoSuchKey)."""


class RemoteChanged(FetchError):
    """The file changed upstream since it was listed (ETag or size no longer match)."""

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(url, f"{detail}: it changed upstream since it was listed; run the fetch again")


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
    verified: str  # VERIFIED_MD5, VERIFIED_SIZE or UNVERIFIED


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
        write_json(self.state_path, state)

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
