"""Loopback S3: moto's server in a thread of this process, behind a small WSGI middleware.

moto gives a faithful S3 API (the same stand-in dvc-s3 and s3fs test against) but does not
enforce requester pays, and has no way to script failures. The middleware adds both, so the
fetchers meet the same refusals and broken connections they would meet on AWS.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

from stages.errors import TidepoolError
from stages.fsutil import file_digest
from stages.loopback.faults import Fault, FaultPlan, Request
from stages.loopback.http import ServerThread, TrackedThreadsMixin, close_abruptly, trickled
from stages.progress import bar

log = logging.getLogger(__name__)

REGION = "us-east-1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
PUBLIC_BUCKET = "coral-reef-training"
REQUESTER_PAYS_BUCKET = "inaturalist-datasets"
DVC_BUCKET = "tidepool-dvc"
BUCKETS = (PUBLIC_BUCKET, REQUESTER_PAYS_BUCKET, DVC_BUCKET)

SOCKET_KEY = "tidepool.socket"
# Files above this size are seeded one at a time: each is read into memory once on its way into
# moto, and several archives of hundreds of MB at once could exhaust RAM at benchmark scale.
LARGE_FILE = 64 << 20
# Bucket-configuration subresources: reading them is not a paid data transfer, so requester pays
# does not apply (AWS charges the requester for object reads and listings only).
CONFIG_SUBRESOURCES = frozenset({
    "accelerate", "acl", "analytics", "cors", "encryption", "intelligent-tiering", "inventory",
    "lifecycle", "location", "logging", "metrics", "notification", "object-lock",
    "ownershipControls", "policy", "policyStatus", "publicAccessBlock", "replication",
    "requestPayment", "tagging", "versioning", "website",
})
ERROR_CODES = {
    400: ("BadRequest", "Bad Request"),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}

# moto keeps S3 state in module globals, and bucket names are one namespace per process: two
# servers would share (and clobber) the same buckets. So one S3Service runs at a time.
_active_lock = threading.Lock()
_active: S3Service | None = None
_session_lock = threading.Lock()
_boto_session: Any = None


def public_read_policy(bucket: str) -> str:
    return json.dumps({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "PublicRead",
            "Effect": "Allow",
            "Principal": "*",
            # AWS authorises HEAD with s3:GetObject; moto checks a separate s3:HeadObject action,
            # so it is listed too or anonymous HEAD requests would be refused.
            "Action": ["s3:GetObject", "s3:HeadObject", "s3:ListBucket"],
            "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
        }],
    })


def _request_path(environ: dict[str, Any]) -> str:
    """`/<bucket>/<key>` as text, also for virtual-host requests to `<bucket>.localhost`."""
    raw = environ.get("PATH_INFO", "") or "/"
    path = raw.encode("latin-1").decode("utf-8", "replace") if isinstance(raw, str) else raw.decode()
    host = environ.get("HTTP_HOST", "").rsplit(":", 1)[0]
    if host.endswith(".localhost"):
        path = "/" + host[: -len(".localhost")] + path
    return path


def error_response(
    start_response: Callable[..., Any], status: int, resource: str, head: bool, code: str | None = None,
) -> list[bytes]:
    """An S3-style XML error, so botocore parses it (and retries 5xx) exactly as it would on AWS."""
    default_code, message = ERROR_CODES.get(status, ("InjectedFault", "Injected fault"))
    code = code or default_code
    request_id = uuid.uuid4().hex[:16].upper()
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>"
        f"<Resource>{escape(resource)}</Resource><RequestId>{request_id}</RequestId></Error>"
    ).encode()
    if head:
        body = b""
    reason = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 500: "Internal Server Error",
              503: "Service Unavailable"}.get(status, "Error")
    start_response(f"{status} {reason}", [
        ("Content-Type", "application/xml"),
        ("Content-Length", str(len(body))),
        ("x-amz-request-id", request_id),
    ])
    return [body]


class S3Middleware:
    """WSGI wrapper around moto: what moto does not do, done the way AWS does it.

    - Requester pays: moto 5.2 ignores Put/GetBucketRequestPayment (the PUT falls through to
      CreateBucket), so the middleware keeps the setting itself and refuses object reads and
      listings of such a bucket without `x-amz-request-payer: requester` (403 AccessDenied).
    - Anonymous access: moto lets unsigned clients list any bucket; AWS refuses them unless a
      policy allows it, so unsigned requests reach only the `public` buckets.
    - Faults from the shared FaultPlan, and a log of every request in it.
    (moto itself honours If-Match on GET and HEAD with a 412, as AWS does.)
    """

    def __init__(self, app: Callable[..., Any], faults: FaultPlan, public: Iterable[str] = ()) -> None:
        self.app = app
        self.faults = faults
        self.public = frozenset(public)
        self._lock = threading.Lock()
        self._requester_pays: set[str] = set()

    def _payer_missing(self, environ: dict[str, Any], bucket: str, key: str, query: dict[str, str]) -> bool:
        with self._lock:
            if bucket not in self._requester_pays:
                return False
        method = environ.get("REQUEST_METHOD", "GET")
        # Only reads are charged to the requester; writes here are the owner seeding the bucket.
        if method not in ("GET", "HEAD"):
            return False
        if not key and (method == "HEAD" or CONFIG_SUBRESOURCES & query.keys()):
            return False
        header = environ.get("HTTP_X_AMZ_REQUEST_PAYER", "")
        presigned = query.get("x-amz-request-payer", "")
        return "requester" not in (header.lower(), presigned.lower())

    @staticmethod
    def _signed(environ: dict[str, Any], query: dict[str, str]) -> bool:
        return bool(environ.get("HTTP_AUTHORIZATION")) or "X-Amz-Signature" in query or "Signature" in query

    def _request_payment(
        self, environ: dict[str, Any], start_response: Callable[..., Any], bucket: str,
    ) -> list[bytes]:
        """Put/GetBucketRequestPayment, which moto does not implement."""
        if environ.get("REQUEST_METHOD") == "PUT":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length).decode("utf-8", "replace") if length else ""
            match = re.search(r"<Payer>\s*(\w+)\s*</Payer>", body)
            if not match or match.group(1) not in ("Requester", "BucketOwner"):
                return error_response(start_response, 400, f"/{bucket}", False, code="MalformedXML")
            with self._lock:
                if match.group(1) == "Requester":
                    self._requester_pays.add(bucket)
                else:
                    self._requester_pays.discard(bucket)
            start_response("200 OK", [("Content-Length", "0")])
            return [b""]
        with self._lock:
            payer = "Requester" if bucket in self._requester_pays else "BucketOwner"
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<RequestPaymentConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<Payer>{payer}</Payer></RequestPaymentConfiguration>"
        ).encode()
        start_response("200 OK", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
        return [body]

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = _request_path(environ)
        bucket, _, key = path.lstrip("/").partition("/")
        method = environ.get("REQUEST_METHOD", "GET")
        head = method == "HEAD"
        query = dict(parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True))
        peer = f"{environ.get('REMOTE_ADDR', '')}:{environ.get('REMOTE_PORT', '')}"
        self.faults.log(
            Request("s3", method, path, peer, environ.get("HTTP_RANGE"), environ.get("HTTP_IF_MATCH"))
        )
        fault = self.faults.take("s3", path, method)
        if fault is not None and fault.kind == "status":
            return error_response(start_response, fault.status, path, head)
        if fault is not None and fault.ignores_conditions:
            for name in ("HTTP_IF_MATCH", "HTTP_IF_NONE_MATCH", "HTTP_IF_RANGE", "HTTP_IF_UNMODIFIED_SINCE"):
                environ.pop(name, None)
        result: Iterable[bytes]
        if bucket and bucket not in self.public and not self._signed(environ, query):
            result = error_response(start_response, 403, path, head)
        elif self._payer_missing(environ, bucket, key, query):
            result = error_response(start_response, 403, path, head)
        elif bucket and not key and "requestPayment" in query and method in ("GET", "PUT"):
            result = self._request_payment(environ, start_response, bucket)
        else:
            result = self.app(environ, start_response)
        if fault is not None and fault.kind == "drop":
            return self._truncated(result, fault.after_bytes, environ.get(SOCKET_KEY))
        if fault is not None and fault.kind == "trickle" and not head:
            return self._trickled(result, fault)
        return result

    @staticmethod
    def _trickled(result: Iterable[bytes], fault: Fault) -> Iterator[bytes]:
        """The body as a trickle fault sends it (status and headers first, as for a drop)."""
        try:
            yield b""
            yield from trickled(iter(result), fault)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()

    @staticmethod
    def _truncated(result: Iterable[bytes], limit: int, sock: Any) -> Iterator[bytes]:
        """Yield `limit` body bytes, then cut the connection (headers already promised more)."""
        sent = 0
        try:
            # An empty first chunk makes werkzeug send the real status and headers now, even
            # when no body byte is to follow.
            yield b""
            for chunk in result:
                part = chunk[: limit - sent]
                if part:
                    yield part
                    sent += len(part)
                if sent >= limit:
                    break
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if sock is not None:
            close_abruptly(sock)


def _quiet_handler() -> type:
    from moto.moto_server.werkzeug_app import MotoRequestHandler

    class Handler(MotoRequestHandler):
        # Set explicitly: werkzeug would otherwise patch it onto the class on first server.
        protocol_version = "HTTP/1.1"

        def make_environ(self) -> dict[str, Any]:
            environ = super().make_environ()
            # The drop fault needs the raw socket to end the connection mid-body.
            environ[SOCKET_KEY] = self.connection
            return environ

        def log(self, type: str, message: str, *args: Any) -> None:  # noqa: A002 - werkzeug signature
            (log.warning if type == "error" else log.debug)("s3 " + message.rstrip("\n"), *args)

    return Handler


def _server_class() -> type:
    from werkzeug.serving import ThreadedWSGIServer

    class S3Server(TrackedThreadsMixin, ThreadedWSGIServer):
        def __init__(self, host: str, port: int, app: Any, handler: type) -> None:
            self._init_tracking()
            super().__init__(host, port, app, handler=handler)

        def log(self, type: str, message: str, *args: Any) -> None:  # noqa: A002 - werkzeug signature
            (log.warning if type == "error" else log.debug)("s3 " + message, *args)

    return S3Server


def _reset_moto_s3() -> None:
    from moto.s3.models import s3_backends

    for account_backends in list(s3_backends.values()):
        for backend in list(account_backends.values()):
            backend.reset()


@dataclass
class _Seeded:
    size: int
    mtime_ns: int
    md5: str


@dataclass
class SeedResult:
    """What a seed/reseed did: `bucket/key` lists, sorted."""

    uploaded: list[str] = field(default_factory=list)
    unchanged: int = 0
    deleted: list[str] = field(default_factory=list)


class S3Service:
    """moto S3 on a free 127.0.0.1 port, with the three tidepool buckets."""

    def __init__(self, faults: FaultPlan, host: str = "127.0.0.1") -> None:
        self.faults = faults
        self.host = host
        self._runner: ServerThread | None = None
        self._client: Any = None
        self._state: dict[tuple[str, str], _Seeded] = {}
        self._state_lock = threading.Lock()
        self._buckets: set[str] = set()

    @property
    def endpoint(self) -> str:
        if self._runner is None:
            raise RuntimeError("S3 loopback server is not running")
        return f"http://{self.host}:{self._runner.server.server_port}"  # type: ignore[attr-defined]

    def start(self) -> None:
        global _active
        with _active_lock:
            if _active is not None:
                raise TidepoolError(
                    "a loopback S3 server is already running in this process (moto keeps one S3 "
                    "state per process); stop it before starting another"
                )
            _active = self
        try:
            from moto.server import create_backend_app

            _reset_moto_s3()
            app = S3Middleware(create_backend_app("s3"), self.faults, public=[PUBLIC_BUCKET])
            server = _server_class()(self.host, 0, app, _quiet_handler())
            self._runner = ServerThread(server, "loopback-s3")
            self._runner.start()
            self._client = self.client()
            for bucket in BUCKETS:
                self.ensure_bucket(bucket)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        global _active
        if self._runner is not None:
            self._runner.stop()
            self._runner = None
        self._client = None
        self._state.clear()
        self._buckets.clear()
        with _active_lock:
            if _active is self:
                _reset_moto_s3()  # frees moto's copies of the objects (memory and temp files)
                _active = None

    def client(self, **config: Any) -> Any:
        """A boto3 client signed as the bucket owner (the loopback's fixed test credentials)."""
        import boto3
        from botocore.config import Config

        settings: dict[str, Any] = {
            "s3": {"addressing_style": "path"},
            # No flexible checksums: objects keep plain md5 ETags, as the upstream files have.
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
            "retries": {"max_attempts": 3, "mode": "standard"},
            "max_pool_connections": 32,
        }
        cfg = Config(**{**settings, **config})
        global _boto_session
        with _session_lock:
            # One session for the process: it caches the parsed S3 service model, which otherwise
            # costs a good part of each start() (tests start servers many times).
            if _boto_session is None:
                _boto_session = boto3.session.Session(
                    aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION,
                )
            session = _boto_session
            return session.client("s3", endpoint_url=self.endpoint, config=cfg)

    def ensure_bucket(self, bucket: str) -> None:
        if bucket in self._buckets:
            return
        try:
            self._client.create_bucket(Bucket=bucket)
            if bucket == PUBLIC_BUCKET:
                self._client.put_bucket_policy(Bucket=bucket, Policy=public_read_policy(bucket))
            if bucket == REQUESTER_PAYS_BUCKET:
                self._client.put_bucket_request_payment(
                    Bucket=bucket, RequestPaymentConfiguration={"Payer": "Requester"},
                )
        except Exception as exc:  # botocore raises many types; all mean the same thing here
            raise TidepoolError(f"loopback S3: creating bucket {bucket!r} failed: {exc}") from exc
        self._buckets.add(bucket)

    @staticmethod
    def _backend(bucket: str) -> Any:
        """moto's in-process backend holding `bucket`.

        Seeding writes objects straight into it rather than through the HTTP API: several hundred
        signed PUTs cost seconds, direct inserts milliseconds, and the objects (md5 ETags, sizes)
        are the same. Buckets and their settings still go through the API.
        """
        from moto.s3.models import s3_backends

        partition, account = s3_backends.bucket_accounts[bucket]
        return s3_backends[account][partition]

    def seed(self, s3_root: Path, workers: int = 16) -> SeedResult:
        """Make the buckets hold exactly the files under `s3_root/<bucket>/`; upload only changes."""
        if self._runner is None:
            raise RuntimeError("S3 loopback server is not running")
        wanted: dict[tuple[str, str], Path] = {}
        if s3_root.is_dir():
            for bucket_dir in sorted(p for p in s3_root.iterdir() if p.is_dir()):
                self.ensure_bucket(bucket_dir.name)
                for path in sorted(bucket_dir.rglob("*")):
                    if path.is_file():
                        wanted[(bucket_dir.name, path.relative_to(bucket_dir).as_posix())] = path
        result = SeedResult()
        todo: list[tuple[tuple[str, str], Path, Any]] = []
        for ident, path in wanted.items():
            st = path.stat()
            prev = self._state.get(ident)
            if prev is not None and (prev.size, prev.mtime_ns) == (st.st_size, st.st_mtime_ns):
                result.unchanged += 1
            else:
                todo.append((ident, path, st))

        def upload(item: tuple[tuple[str, str], Path, Any]) -> bool:
            (bucket, key), path, st = item
            md5 = file_digest(path, "md5")
            prev = self._state.get((bucket, key))
            if prev is None or prev.md5 != md5:
                try:
                    self._backend(bucket).put_object(bucket, key, path.read_bytes())
                except Exception as exc:
                    raise TidepoolError(
                        f"loopback S3: uploading {path} to s3://{bucket}/{key} failed: {exc}"
                    ) from exc
                changed = True
            else:
                changed = False  # rewritten with identical bytes: the object (and its ETag) stays
            with self._state_lock:
                self._state[(bucket, key)] = _Seeded(st.st_size, st.st_mtime_ns, md5)
            return changed

        small = [item for item in todo if item[2].st_size <= LARGE_FILE]
        large = [item for item in todo if item[2].st_size > LARGE_FILE]
        with bar(total=len(todo), desc="seeding loopback S3", unit="file") as progress:
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                for item, changed in zip(small, pool.map(upload, small)):
                    progress.update(1)
                    if changed:
                        result.uploaded.append(f"{item[0][0]}/{item[0][1]}")
            for item in large:
                if upload(item):
                    result.uploaded.append(f"{item[0][0]}/{item[0][1]}")
                progress.update(1)
        result.unchanged += len(todo) - len(result.uploaded)

        for bucket, key in sorted(set(self._state) - set(wanted)):
            try:
                self._backend(bucket).delete_object(bucket, key)
            except Exception as exc:
                raise TidepoolError(f"loopback S3: deleting s3://{bucket}/{key} failed: {exc}") from exc
            del self._state[(bucket, key)]
            result.deleted.append(f"{bucket}/{key}")
        result.uploaded.sort()
        return result
