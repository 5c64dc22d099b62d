"""fetch@coasttrain: the Coast Train zips, downloaded with resume, verified, extracted safely.

`<endpoints.coasttrain_base><Record>.zip` for each record in `sources.coasttrain.records` is
downloaded into scratch, checked (size; md5 when `endpoints.known_md5["coasttrain/<Record>.zip"]`
is known), extracted into `data/raw/coasttrain/<Record>/` (which then holds exactly the zip's
members) and deleted. `archives.csv` remembers each zip's size/md5/ETag so a re-run against an
unchanged upstream downloads nothing.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from stages.config import require
from stages.errors import ConfigError
from stages.fetch import download_http_archive
from stages.fetch.manifest import (
    ArchiveRow,
    FetchReport,
    ManifestRow,
    archive_unchanged,
    prune,
    read_archives,
    read_manifest,
    rows_present,
    with_url,
    write_archives,
    write_manifest,
)
from stages.net import UNVERIFIED, NetSettings, known_md5, verification
from stages.net.archives import ArchiveLimits, safe_extract_zip
from stages.net.http import HttpClient

log = logging.getLogger(__name__)

SOURCE = "coasttrain"


def _records(params: dict[str, Any]) -> list[str]:
    records = require(params, f"sources.{SOURCE}.records")
    if not isinstance(records, list) or not records:
        raise ConfigError("params.yaml: `sources.coasttrain.records` must be a non-empty list")
    for record in records:
        if (
            not isinstance(record, str)
            or not record
            or "/" in record
            or "\\" in record
            or record.startswith(".")
        ):
            raise ConfigError(f"params.yaml: bad Coast Train record name {record!r}")
    return sorted(set(records))


def member_url(zip_url: str, member: str) -> str:
    """The manifest URL of a file that came out of an archive: the archive URL + `#member`."""
    return f"{zip_url}#{member}"


def fetch(params: dict[str, Any], out_dir: Path, scratch_dir: Path) -> FetchReport:
    """Mirror the configured Coast Train records into `out_dir/<Record>/`."""
    records = _records(params)
    base = str(require(params, "endpoints.coasttrain_base"))
    if not base.endswith("/"):
        base += "/"
    limits = ArchiveLimits.from_params(params)
    report = FetchReport(SOURCE)
    out_dir = Path(out_dir)
    scratch_dir = Path(scratch_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch_dir.mkdir(parents=True, exist_ok=True)
    previous = read_manifest(out_dir)
    previous_archives = read_archives(out_dir)
    rows: dict[str, ManifestRow] = {}
    archives: dict[str, ArchiveRow] = {}

    settings = NetSettings.from_params(params)
    with HttpClient(settings) as http:
        for record in records:
            name = f"{record}.zip"
            url = base + name
            expected_md5 = known_md5(params, SOURCE, name)
            info = http.head(url)
            prefix = f"{record}/"
            prev_rows = [r for key, r in previous.items() if key.startswith(prefix)]
            prev_archive = previous_archives.get(name)
            # A legacy archives.csv has no `verified`: what the same HEAD would give now.
            level = (prev_archive.verified if prev_archive else "") or verification(expected_md5, info.size)
            if (
                archive_unchanged(prev_archive, info.size, info.etag, expected_md5)
                and (level != UNVERIFIED or settings.accept_unverified)
                and prev_rows
                and rows_present(out_dir, prev_rows)
            ):
                for r in prev_rows:
                    rows[r.key] = with_url(r, member_url(url, r.key[len(prefix) :]), level)
                archives[name] = replace(prev_archive, url=url, verified=level)
                report.unchanged += 1
                continue
            got = download_http_archive(
                http,
                url,
                scratch_dir,
                name,
                expected_size=info.size,
                expected_md5=expected_md5,
                etag=info.etag,
            )
            try:
                files = safe_extract_zip(got.path, out_dir / record, limits, replace=True, name=url)
            finally:
                got.path.unlink(missing_ok=True)
            for f in files:
                key = prefix + f.name
                rows[key] = ManifestRow(key, f.size, f.md5, "", member_url(url, f.name), got.verified)
            archives[name] = ArchiveRow(name, got.size, got.md5, got.etag, url, got.verified)
            report.downloaded += 1
            report.bytes_downloaded += got.transferred
            report.extracted += len(files)
            log.info("%s: %d files extracted into %s", url, len(files), out_dir / record)

    report.removed += len(prune(out_dir, set(rows)))
    write_manifest(out_dir, rows.values())
    write_archives(out_dir, archives.values())
    return report
