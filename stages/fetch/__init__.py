"""Fetch stages: mirror one upstream source into `data/raw/<source>/` with a manifest.

Each source module exposes `fetch(params, out_dir, scratch_dir) -> FetchReport`; partial
downloads live in `scratch_dir` (`data/.downloads/<source>/`) so an interrupted run resumes.
`python -m stages.fetch <source>` is the CLI (see `__main__`).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import Any

from stages.config import canonical_url
from stages.errors import ConfigError
from stages.fetch.manifest import (
    FetchReport,
    ManifestRow,
    local_size,
    read_archives,
    read_manifest,
    with_url,
    write_archives,
    write_manifest,
)
from stages.fsutil import file_digest
from stages.net import Downloaded, RemoteNotFound, md5_from_etag, verification
from stages.net.http import HttpClient
from stages.net.s3 import S3Bucket, S3Object
from stages.progress import bar

log = logging.getLogger(__name__)

SOURCES = ("mermaid", "coralnet", "coasttrain", "inat2017", "seatizen")

# Concurrent object downloads for buckets of many small files (MERMAID and CoralNet images).
OBJECT_WORKERS = 8

__all__ = ["SOURCES", "FetchReport", "download_http_archive", "fetch", "sync_s3_objects"]


def fetch(source: str, params: dict[str, Any], out_dir: str | Path, scratch_dir: str | Path) -> FetchReport:
    """Run the fetch for `source`: mirror it into `out_dir`, using `scratch_dir` for partial files."""
    if source not in SOURCES:
        raise ConfigError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    module = importlib.import_module(f"stages.fetch.{source}")
    report = module.fetch(params, Path(out_dir), Path(scratch_dir))
    _canonicalise_urls(params, Path(out_dir))
    return report


def _canonicalise_urls(params: dict[str, Any], out_dir: Path) -> None:
    """Record upstream URLs, not mirror locations, so the raw output's hash depends on content only."""
    rows = read_manifest(out_dir)
    fixed = [with_url(r, canonical_url(params, r.url)) for r in rows.values()]
    if fixed != list(rows.values()):
        write_manifest(out_dir, fixed)
    archives = read_archives(out_dir)
    if archives:
        fixed_archives = [replace(a, url=canonical_url(params, a.url)) for a in archives.values()]
        if fixed_archives != list(archives.values()):
            write_archives(out_dir, fixed_archives)


def sync_s3_objects(
    bucket: S3Bucket,
    wanted: dict[str, S3Object],
    out_dir: Path,
    scratch_dir: Path,
    previous: dict[str, ManifestRow],
    report: FetchReport,
    desc: str,
    known: Callable[[str], str | None] | None = None,
) -> dict[str, ManifestRow]:
    """Bring `out_dir/<rel>` up to date with each wanted object; returns the manifest rows.

    An object is downloaded only when it is missing locally or its ETag or size differ from the
    previous manifest. Downloads are checked against `known(rel)` (a published md5) when it has
    one, else against a plain-md5 ETag. An object that vanished between listing and download
    counts as missing.
    """
    rows: dict[str, ManifestRow] = {}
    todo: list[tuple[str, S3Object]] = []
    for rel, obj in sorted(wanted.items()):
        url = bucket.url(obj.key)
        prev = previous.get(rel)
        if (
            prev is not None
            and prev.etag == obj.etag
            and prev.size == obj.size
            and local_size(out_dir / rel) == obj.size
        ):
            # What a download now would have checked: the same value whether or not it ran.
            expected = (known(rel) if known is not None else None) or md5_from_etag(obj.etag)
            rows[rel] = with_url(prev, url, verification(expected, obj.size))
            report.unchanged += 1
        else:
            todo.append((rel, obj))
    if not todo:
        return rows
    total_bytes = sum(obj.size for _rel, obj in todo)
    with (
        bar(total=len(todo), desc=f"{desc} files", unit="file") as files_bar,
        bar(total=total_bytes, desc=f"{desc} bytes", unit="B") as bytes_bar,
    ):

        def one(item: tuple[str, S3Object]) -> tuple[str, Any]:
            rel, obj = item
            try:
                expected = known(rel) if known is not None else None
                got = bucket.download(
                    obj, out_dir / rel, scratch_dir, name=rel, expected_md5=expected, progress=bytes_bar
                )
                return rel, got
            except RemoteNotFound:
                return rel, None

        with ThreadPoolExecutor(max_workers=OBJECT_WORKERS, thread_name_prefix="s3get") as pool:
            futures = [pool.submit(one, item) for item in todo]
            try:
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in done:
                        rel, result = fut.result()
                        files_bar.update(1)
                        if result is None:
                            log.warning(
                                "%s vanished from the bucket during the fetch", bucket.url(wanted[rel].key)
                            )
                            report.missing += 1
                            continue
                        rows[rel] = ManifestRow(
                            rel,
                            result.size,
                            result.md5,
                            result.etag,
                            bucket.url(wanted[rel].key),
                            result.verified,
                        )
                        report.downloaded += 1
                        report.bytes_downloaded += result.transferred
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    return rows


def download_http_archive(
    http: HttpClient,
    url: str,
    scratch_dir: Path,
    name: str,
    *,
    expected_size: int | None,
    expected_md5: str | None,
    etag: str = "",
    connections: int = 1,
) -> Downloaded:
    """Download an archive into `scratch_dir/name` (not an output: it is extracted, then deleted).

    A complete archive already in scratch (a run that died while extracting) is reused when it
    matches the expected size and md5; it was verified before it was renamed there. `etag` is
    what HEAD reported, recorded for a reused file.
    """
    path = scratch_dir / name
    if path.is_file() and expected_size is not None and path.stat().st_size == expected_size:
        md5 = file_digest(path, "md5")
        if not expected_md5 or md5 == expected_md5:
            log.info("%s: reusing the complete download in %s", url, path)
            return Downloaded(
                path=path,
                size=expected_size,
                md5=md5,
                etag=etag,
                transferred=0,
                verified=verification(expected_md5, expected_size),
            )
        path.unlink()
    return http.download(
        url,
        path,
        scratch_dir,
        name=name,
        expected_size=expected_size,
        expected_md5=expected_md5,
        connections=connections,
        desc=name,
    )
