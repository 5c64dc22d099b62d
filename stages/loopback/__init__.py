"""Local stand-ins for the network: S3 (moto) and HTTP servers on 127.0.0.1 serving the sample upstreams.

Tests and the demo never reach the internet. `Loopback` starts both servers as threads of the
calling process, seeds the buckets from `build/upstream/s3/`, and hands out the endpoints overlay
and environment that point the pipeline at them (see docs/architecture.md, "Loopback services").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from stages.errors import TidepoolError
from stages.fsutil import write_text
from stages.loopback.faults import Fault, FaultPlan
from stages.loopback.http import LoopbackHTTPServer, ServerThread
from stages.loopback.persist import BucketStore, DumpResult
from stages.loopback.s3 import ACCESS_KEY, DVC_BUCKET, REGION, SECRET_KEY, S3Service, SeedResult

__all__ = ["DumpResult", "Fault", "FaultPlan", "Loopback", "SeedResult"]

HOST = "127.0.0.1"
DVC_REMOTE = "storage"


def dvc_command() -> list[str]:
    """The venv's dvc: the executable beside this interpreter, else `python -m dvc`."""
    exe = Path(sys.executable).parent / "dvc"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dvc"]


class Loopback:
    """Both loopback servers; use as a context manager or call start()/stop()."""

    def __init__(self, upstream: str | Path, seed_workers: int = 16, store: str | Path | None = None) -> None:
        """`store`: a folder that keeps the DVC remote bucket across restarts (stages.loopback.persist):
        loaded at start, written back at stop and by `save()`. None keeps it in memory only."""
        self.upstream = Path(upstream).resolve()
        self.seed_workers = seed_workers
        self.faults = FaultPlan()
        self._s3 = S3Service(self.faults, HOST)
        self._http: ServerThread | None = None
        self.store = BucketStore(store, DVC_BUCKET) if store is not None else None
        self.restored = 0  # objects the last start() loaded from the store

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Loopback:
        if self._http is not None:
            raise RuntimeError("Loopback is already running")
        try:
            self._s3.start()
            server = LoopbackHTTPServer(self.upstream / "http", self.faults, HOST, 0)
            self._http = ServerThread(server, "loopback-http")
            self._http.start()
            self.reseed()
            if self.store is not None:
                backend = self._s3._backend(DVC_BUCKET)
                self.restored = self.store.restore(
                    lambda key, data: backend.put_object(DVC_BUCKET, key, data)
                )
        except BaseException:
            self.stop(save=False)  # a half-restored bucket must not overwrite the store
            raise
        return self

    def save(self) -> DumpResult | None:
        """Write the DVC remote bucket to the store now (only what changed); None without a store."""
        if self.store is None or self._http is None:
            return None
        from stages.loopback.persist import moto_objects

        return self.store.dump(moto_objects(self._s3._backend(DVC_BUCKET), DVC_BUCKET))

    def stop(self, save: bool = True) -> None:
        """Shut both servers down, close their connections and join every thread. With a store,
        the DVC remote bucket is saved first."""
        try:
            if save:
                self.save()
        finally:
            if self._http is not None:
                self._http.stop()
                self._http = None
            self._s3.stop()

    def __enter__(self) -> Loopback:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._http is not None

    # -- endpoints ------------------------------------------------------------------------------

    @property
    def s3_endpoint(self) -> str:
        return self._s3.endpoint

    @property
    def http_base(self) -> str:
        if self._http is None:
            raise RuntimeError("Loopback is not running")
        return self._http.server.base  # type: ignore[attr-defined]

    def s3_client(self, **config: Any) -> Any:
        """A boto3 S3 client signed with the loopback credentials (the bucket owner)."""
        return self._s3.client(**config)

    def known_md5(self) -> dict[str, str]:
        path = self.upstream / "checksums.json"
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise TidepoolError(f"{path}: not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise TidepoolError(f"{path}: expected an object mapping '<source>/<file>' to md5 strings")
        return dict(sorted(data.items()))

    def overlay(self) -> dict[str, Any]:
        """The `{"endpoints": {...}}` overlay that points params.yaml's endpoints here."""
        base = self.http_base
        return {
            "endpoints": {
                "s3_endpoint_url": self.s3_endpoint,
                "s3_region": REGION,
                "mermaid_api": f"{base}/mermaid-api/v1/",
                "coasttrain_base": f"{base}/coasttrain/",
                "zenodo_api": f"{base}/zenodo/api/",
                "coralnet_local_root": str(self.upstream / "coralnet"),
                "known_md5": self.known_md5(),
            }
        }

    def write_overlay(self, path: str | Path) -> Path:
        path = Path(path)
        write_text(path, yaml.safe_dump(self.overlay(), sort_keys=True, default_flow_style=False))
        return path

    def env(self, overlay_path: str | Path) -> dict[str, str]:
        """Environment additions for a process that should use the loopback servers."""
        no_proxy = ",".join(
            part for part in (os.environ.get("NO_PROXY", ""), "127.0.0.1,localhost") if part
        )
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "TIDEPOOL_ENDPOINTS": str(Path(overlay_path).resolve()),
            # Both spellings: requests reads the lower-case one first when it is set.
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }

    def remote_env(self) -> dict[str, str]:
        """Environment that points DVC's S3 remotes at the loopback without writing any config.

        botocore reads `AWS_ENDPOINT_URL_S3` when a client is given no endpoint, and dvc-s3 passes
        none unless `endpointurl` is configured: so `dvc push/pull/import/get` reach the loopback
        while this variable is set, and nothing on disk names a port that dies with the server.
        An `endpointurl` in a project's config still wins over it.
        """
        return {"AWS_ENDPOINT_URL_S3": self.s3_endpoint}

    def configure_dvc_remote(self, repo: str | Path) -> None:
        """Point the repo's DVC remote at the loopback S3, in `.dvc/config.local` only.

        The endpoint is machine-local state; writing it to the tracked `.dvc/config` would leak
        a dead port into git. Credentials come from env(), never from a config file.
        """
        cmd = [*dvc_command(), "remote", "modify", "--local", DVC_REMOTE, "endpointurl", self.s3_endpoint]
        try:
            proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise TidepoolError(f"{repo}: could not run dvc ({cmd[0]}): {exc}") from exc
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise TidepoolError(
                f"{repo}: `dvc remote modify --local {DVC_REMOTE} endpointurl` failed: "
                f"{detail[-1] if detail else f'exit status {proc.returncode}'}"
            )

    # -- content --------------------------------------------------------------------------------

    def reseed(self) -> SeedResult:
        """Upload S3 objects that are new or changed under `<upstream>/s3/`, delete vanished ones."""
        return self._s3.seed(self.upstream / "s3", workers=self.seed_workers)
