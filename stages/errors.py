"""Errors the pipeline reports to people, as one clear line instead of a library traceback."""

from __future__ import annotations

from pathlib import Path


class TidepoolError(Exception):
    """An error with a message meant for the person running the pipeline."""


class ConfigError(TidepoolError):
    """params.yaml or an endpoints overlay is missing a key or has a bad value."""


class UpstreamFormatError(TidepoolError):
    """An upstream file no longer looks the way the adapter expects: name the file and what was expected."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class FetchError(TidepoolError):
    """A download failed for good (after the last retry): names the URL and the cause."""

    def __init__(self, url: str, cause: str) -> None:
        self.url = url
        self.cause = cause
        super().__init__(f"fetching {url} failed: {cause}")


class ChecksumMismatch(FetchError):
    """Downloaded bytes do not match the checksum upstream published."""

    def __init__(self, url: str, algorithm: str, expected: str, actual: str) -> None:
        self.algorithm = algorithm
        self.expected = expected
        self.actual = actual
        super().__init__(url, f"{algorithm} mismatch: expected {expected}, got {actual}")


class UnsafeArchiveError(TidepoolError):
    """An archive member would escape its folder, is a link, or would decompress beyond the bounds."""

    def __init__(self, archive: str | Path, member: str, problem: str) -> None:
        self.archive = str(archive)
        self.member = member
        super().__init__(f"{self.archive}: member {member!r} refused: {problem}")
