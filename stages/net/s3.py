"""S3 transfers: paginated listing, resumable verified downloads, and a self-healing read stream.

Public buckets (coral-reef-training) are read with unsigned requests; requester-pays buckets
(inaturalist-datasets) with signed requests carrying `RequestPayer=requester`. botocore's own
retries are switched off so that `net.retries` is the one knob and every retry resumes from the
bytes already received instead of starting the object again.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions as bce
import urllib3.exceptions
from botocore import UNSIGNED
from botocore.config import Config

from stages.errors import FetchError
from stages.net import (
    Deadline,
    Downloaded,
    NetSettings,
    PartFile,
    RemoteChanged,
    RemoteNotFound,
    RetryBudget,
    Stalled,
    ThroughputFloor,
    Transient,
    clean_etag,
    md5_from_etag,
    place_file,
    read_some,
    verification,
    verify_part,
)
from stages.progress import bar

log = logging.getLogger(__name__)

_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
}
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    bce.EndpointConnectionError,
    bce.ConnectionClosedError,
    bce.ConnectTimeoutError,
    bce.ReadTimeoutError,
    bce.ResponseStreamingError,
    bce.IncompleteReadError,
    bce.ConnectionError,
    urllib3.exceptions.HTTPError,
    ConnectionError,
    TimeoutError,
)


_session_lock = threading.Lock()
_session: Any = None


def _s3_client(**kwargs: Any) -> Any:
    """An S3 client from one process-wide boto3 session: the session caches the parsed service
    model, which otherwise costs a good fraction of a second for every bucket opened. Creating
    clients from a shared session is not thread-safe, hence the lock."""
    global _session
    with _session_lock:
        if _session is None:
            _session = boto3.session.Session()
        return _session.client("s3", **kwargs)


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str  # without quotes


class S3Bucket:
    """One bucket, read anonymously or as a paying requester, with the `net:` retry policy."""

    def __init__(
        self,
        bucket: str,
        settings: NetSettings,
        *,
        endpoint_url: str | None = None,
        region: str | None = "us-east-1",
        anonymous: bool = True,
        requester_pays: bool = False,
        max_connections: int = 16,
    ) -> None:
        self.bucket = bucket
        self.settings = settings
        self.anonymous = anonymous
        self.requester_pays = requester_pays
        config = Config(
            signature_version=UNSIGNED if anonymous else None,
            # A custom endpoint (moto, MinIO, a mirror) rarely resolves bucket subdomains.
            s3={"addressing_style": "path"} if endpoint_url else {},
            retries={"total_max_attempts": 1},
            connect_timeout=settings.timeout_seconds,
            read_timeout=settings.timeout_seconds,
            max_pool_connections=max_connections,
            # We verify md5 ourselves; botocore's CRC validation of whole objects would also
            # misfire on the ranged GETs that resume a transfer.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client = _s3_client(endpoint_url=endpoint_url or None, region_name=region or None, config=config)

    @classmethod
    def from_params(
        cls, params: dict[str, Any], bucket: str, *, anonymous: bool = True, requester_pays: bool = False
    ) -> S3Bucket:
        endpoints = params.get("endpoints") or {}
        return cls(
            bucket,
            NetSettings.from_params(params),
            endpoint_url=endpoints.get("s3_endpoint_url"),
            region=endpoints.get("s3_region") or "us-east-1",
            anonymous=anonymous,
            requester_pays=requester_pays,
        )

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"

    @property
    def _payer(self) -> dict[str, str]:
        return {"RequestPayer": "requester"} if self.requester_pays else {}

    def _translate(self, exc: BaseException, url: str) -> BaseException:
        """Map a botocore failure to Transient (retry) or a FetchError that says what to do."""
        if isinstance(exc, bce.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            message = error.get("Message") or code
            if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
                return Transient(f"S3 {status} {code}")
            if status == 404 or code in _NOT_FOUND_CODES:
                return RemoteNotFound(url, f"S3 {code or status}: no such object or bucket")
            if status == 403 or code == "AccessDenied":
                if self.requester_pays:
                    hint = (
                        "access denied although the request carried RequestPayer=requester; "
                        "check that the AWS credentials are valid and may read this bucket"
                    )
                else:
                    hint = (
                        "access denied to "
                        + ("an unsigned (anonymous) request" if self.anonymous else "this request")
                        + "; if the bucket is requester-pays, requests must be signed with AWS credentials "
                        "and send RequestPayer=requester"
                    )
                return FetchError(url, f"S3 403 {code}: {hint}")
            return FetchError(url, f"S3 {status} {code}: {message}")
        if isinstance(exc, bce.NoCredentialsError):
            return FetchError(
                url,
                "no AWS credentials found; the requester-pays bucket bills the requester, so set "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile",
            )
        if isinstance(exc, TRANSIENT_ERRORS):
            return Transient(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, bce.BotoCoreError):
            return FetchError(url, f"{type(exc).__name__}: {exc}")
        return exc

    def _call(self, url: str, fn: Callable[[], Any]) -> Any:
        """Run one S3 request with retries on transient failures."""
        budget = RetryBudget(url, self.settings)
        while True:
            try:
                return fn()
            except (bce.BotoCoreError, bce.ClientError, *TRANSIENT_ERRORS) as exc:
                translated = self._translate(exc, url)
                if not isinstance(translated, Transient):
                    raise translated from None
                budget.failed(str(translated))

    def list(self, prefix: str, page_size: int = 1000) -> list[S3Object]:
        """Every object under `prefix`, following continuation tokens, sorted by key."""
        url = self.url(prefix)
        objects: list[S3Object] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {
                "Bucket": self.bucket,
                "Prefix": prefix,
                "MaxKeys": page_size,
                **self._payer,
            }
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call(url, lambda kwargs=kwargs: self.client.list_objects_v2(**kwargs))
            for item in page.get("Contents", []):
                objects.append(S3Object(item["Key"], int(item["Size"]), clean_etag(item.get("ETag"))))
            if not page.get("IsTruncated"):
                break
            token = page.get("NextContinuationToken")
            if not token:
                break
        objects.sort(key=lambda o: o.key)
        return objects

    def head(self, key: str) -> S3Object:
        """Size and ETag of one object; RemoteNotFound if it is not there."""
        url = self.url(key)
        resp = self._call(url, lambda: self.client.head_object(Bucket=self.bucket, Key=key, **self._payer))
        return S3Object(key, int(resp["ContentLength"]), clean_etag(resp.get("ETag")))

    def _get(self, key: str, start: int = 0, etag: str | None = None) -> Any:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, **self._payer}
        if start:
            kwargs["Range"] = f"bytes={start}-"
        if etag:
            # On every GET, the first too: an object that changed since it was listed is a 412,
            # never bytes of another version (or of a grown object read for ever).
            kwargs["IfMatch"] = f'"{etag}"'
        return self.client.get_object(**kwargs)

    def _open_body(self, obj: S3Object, start: int) -> Any:
        """The body of a GET of `obj` from byte `start`, checked to be the listed version."""
        url = self.url(obj.key)
        try:
            resp = self._get(obj.key, start, obj.etag)
        except bce.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in ("PreconditionFailed", "412") or status == 412:
                raise RemoteChanged(url, f"If-Match on ETag {obj.etag} failed (S3 412)") from None
            raise
        body = resp["Body"]
        sent = clean_etag(resp.get("ETag"))
        total = _listed_total(resp)
        problem = None
        if obj.etag and sent and sent != obj.etag:
            problem = f"S3 sends ETag {sent}, not the listed {obj.etag}"
        elif total is not None and total != obj.size:
            problem = f"S3 now has {total} bytes, not the listed {obj.size}"
        if problem:
            body.close()
            raise RemoteChanged(url, problem)
        return body

    def download(
        self,
        obj: S3Object,
        dest: Path,
        scratch: Path,
        *,
        name: str | None = None,
        expected_md5: str | None = None,
        progress: Any = None,
    ) -> Downloaded:
        """Download `obj` to `dest` via `<scratch>/<name>.part`, resuming and verifying.

        md5 is checked against `expected_md5`, else against the ETag when it is a plain md5.
        Every GET is pinned to the listed ETag: an object that changed is RemoteChanged.
        `progress` is a shared byte bar for many small objects; without one the object gets its own.
        """
        dest = Path(dest)
        url = self.url(obj.key)
        part = PartFile(Path(scratch), name or dest.name)
        part.path.parent.mkdir(parents=True, exist_ok=True)
        if not part.matches(part.load_state(), size=obj.size, etag=obj.etag):
            part.discard()
        part.save_state({"mode": "single", "size": obj.size, "etag": obj.etag})
        budget = RetryBudget(url, self.settings, deadline=Deadline(url, self.settings))
        floor = ThroughputFloor(self.settings)
        transferred = 0
        own_bar = progress is None
        progress = bar(total=obj.size, desc=dest.name, unit="B") if own_bar else progress
        try:
            while True:
                budget.check_deadline()
                have = part.size_on_disk()
                if have > obj.size:
                    part.path.unlink()
                    have = 0
                if have == obj.size and part.path.exists():
                    break
                budget.reached(have)
                if own_bar:
                    progress.reset(total=obj.size)
                    progress.update(have)
                try:
                    if obj.size == 0:
                        part.path.write_bytes(b"")
                        break
                    body = self._open_body(obj, have)
                    floor.restart()
                    pos = have
                    with open(part.path, "ab" if have else "wb") as fh:
                        try:
                            while chunk := read_some(body, self.settings.chunk_bytes):
                                if pos + len(chunk) > obj.size:
                                    raise RemoteChanged(url, f"S3 sent more than the {obj.size} bytes listed")
                                # Written at once: a drop after this read keeps every byte that came.
                                fh.write(chunk)
                                pos += len(chunk)
                                transferred += len(chunk)
                                progress.update(len(chunk))
                                budget.reached(pos)
                                floor.add(len(chunk))
                                floor.check()
                                budget.check_deadline()
                        finally:
                            body.close()
                    if pos < obj.size:
                        raise Transient(f"stream ended after {pos} of {obj.size} bytes")
                except Stalled as exc:
                    budget.failed(str(exc), stalled=True)
                except Transient as exc:
                    budget.failed(str(exc))
                except (bce.BotoCoreError, bce.ClientError, *TRANSIENT_ERRORS) as exc:
                    translated = self._translate(exc, url)
                    if not isinstance(translated, Transient):
                        raise translated from None
                    budget.failed(str(translated))
        except RemoteChanged:
            part.discard()  # bytes of a version that is gone: never resumed
            raise
        finally:
            if own_bar:
                progress.close()
        expected = expected_md5 or md5_from_etag(obj.etag)
        md5 = verify_part(part, url, obj.size, expected)
        place_file(part.path, dest)
        part.discard()
        return Downloaded(
            path=dest,
            size=obj.size,
            md5=md5,
            etag=obj.etag,
            transferred=transferred,
            verified=verification(expected, obj.size),
        )

    def open_stream(self, obj: S3Object) -> ObjectStream:
        """A raw read stream over the whole object that re-opens at its offset when a read fails."""
        return ObjectStream(self, obj)


class ObjectStream(io.RawIOBase):
    """Sequential reader of one S3 object that survives dropped connections.

    On a transient failure it re-issues GET with `Range: bytes=<offset>-` (If-Match on the
    listed ETag, so it never splices two versions) and carries on, within the `net:` retry
    budget, the throughput floor and the deadline. Wrap it in io.BufferedReader for small reads.
    """

    def __init__(self, bucket: S3Bucket, obj: S3Object) -> None:
        super().__init__()
        self._bucket = bucket
        self.obj = obj
        self.url = bucket.url(obj.key)
        self.pos = 0
        self._body: Any = None
        settings = bucket.settings
        self._budget = RetryBudget(self.url, settings, deadline=Deadline(self.url, settings))
        self._floor = ThroughputFloor(settings)
        self.reopened = 0

    def readable(self) -> bool:
        return True

    def _drop_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail; nothing to do
                pass
            self._body = None

    def readinto(self, buffer: Any) -> int:
        if self.pos >= self.obj.size:
            return 0
        view = memoryview(buffer).cast("B")
        while True:
            try:
                # Checked before reading, not after: bytes already read belong to the caller.
                self._budget.check_deadline()
                if self._body is None:
                    self._budget.reached(self.pos)
                    self._body = self._bucket._open_body(self.obj, self.pos)
                    self._floor.restart()
                    if self.pos:
                        self.reopened += 1
                else:
                    self._floor.check()
                data = read_some(self._body, min(len(view), self.obj.size - self.pos))
                if not data:
                    raise Transient(f"stream ended after {self.pos} of {self.obj.size} bytes")
                n = len(data)
                view[:n] = data
                self.pos += n
                self._budget.reached(self.pos)
                self._floor.add(n)
                return n
            except Stalled as exc:
                self._drop_body()
                self._budget.failed(str(exc), stalled=True)
            except Transient as exc:
                self._drop_body()
                self._budget.failed(str(exc))
            except (bce.BotoCoreError, bce.ClientError, *TRANSIENT_ERRORS) as exc:
                self._drop_body()
                translated = self._bucket._translate(exc, self.url)
                if not isinstance(translated, Transient):
                    raise translated from None
                self._budget.failed(str(translated))

    def close(self) -> None:
        self._drop_body()
        super().close()


def _listed_total(resp: dict[str, Any]) -> int | None:
    """The whole object's size as a GET response states it (ContentRange total, else length)."""
    content_range = resp.get("ContentRange")
    if content_range:
        total = str(content_range).rpartition("/")[2]
        return int(total) if total.isdigit() else None
    length = resp.get("ContentLength")
    return int(length) if length is not None else None
