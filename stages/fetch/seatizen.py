"""fetch@seatizen: the Seatizen Atlas files of one Zenodo record.

`<endpoints.zenodo_api>records/<record>` lists each file with its size, `checksum: "md5:…"` and
download link. The files named in `sources.seatizen.files` are downloaded with parallel ranged
requests (`sources.seatizen.connections`, like aria2's --split) and md5-verified. Zips
(`images.zip`) are extracted safely into `data/raw/seatizen/` (giving `2024_dataset/…`) and
deleted; `archives.csv` remembers them so a re-run against an unchanged record downloads nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stages.config import require
from stages.errors import ConfigError, UpstreamFormatError
from stages.fetch import download_http_archive
from stages.fetch.manifest import (
    ArchiveRow,
    FetchReport,
    ManifestRow,
    archive_unchanged,
    local_size,
    prune,
    read_archives,
    read_manifest,
    rows_present,
    safe_key,
    with_url,
    write_archives,
    write_manifest,
)
from stages.net import NetSettings, known_md5, verification
from stages.net.archives import ArchiveLimits, check_zip, safe_extract_zip
from stages.net.http import HttpClient

log = logging.getLogger(__name__)

SOURCE = "seatizen"


@dataclass(frozen=True)
class RecordFile:
    """One file of a Zenodo record as the API lists it."""

    key: str
    size: int
    md5: str | None
    url: str


def parse_record(record: Any, record_url: str) -> dict[str, RecordFile]:
    """The record's files by name; UpstreamFormatError naming the record URL if the shape is off."""
    if not isinstance(record, dict):
        raise UpstreamFormatError(record_url, "expected a JSON object for the record")
    files = record.get("files")
    if isinstance(files, dict):  # InvenioRDM's files endpoint shape: {"entries": [...]}
        files = files.get("entries")
    if not isinstance(files, list):
        raise UpstreamFormatError(record_url, "the record has no `files` list")
    out: dict[str, RecordFile] = {}
    for i, entry in enumerate(files):
        if not isinstance(entry, dict):
            raise UpstreamFormatError(record_url, f"files[{i}] is not an object")
        key = entry.get("key") or entry.get("filename")
        size = entry.get("size", entry.get("filesize"))
        links = entry.get("links") if isinstance(entry.get("links"), dict) else {}
        link = links.get("self") or links.get("content") or links.get("download")
        missing = [n for n, v in (("key", key), ("size", size), ("links.self", link)) if v in (None, "")]
        if missing:
            raise UpstreamFormatError(record_url, f"files[{i}] lacks {', '.join(missing)}")
        try:
            size = int(size)
        except (TypeError, ValueError):
            raise UpstreamFormatError(
                record_url, f"files[{i}] ({key}): size {size!r} is not a number"
            ) from None
        checksum = str(entry.get("checksum") or "")
        algorithm, _, digest = checksum.partition(":")
        md5 = digest.strip().lower() if algorithm.strip().lower() == "md5" and digest else None
        out[str(key)] = RecordFile(str(key), size, md5, str(link))
    return out


def member_url(archive_url: str, member: str) -> str:
    return f"{archive_url}#{member}"


def fetch(params: dict[str, Any], out_dir: Path, scratch_dir: Path) -> FetchReport:
    """Mirror the configured files of the Seatizen Zenodo record into `out_dir`."""
    record_id = str(require(params, f"sources.{SOURCE}.record"))
    names = require(params, f"sources.{SOURCE}.files")
    if not isinstance(names, list) or not names:
        raise ConfigError("params.yaml: `sources.seatizen.files` must be a non-empty list")
    connections = int(require(params, f"sources.{SOURCE}").get("connections", 1) or 1)
    api = str(require(params, "endpoints.zenodo_api"))
    if not api.endswith("/"):
        api += "/"
    record_url = f"{api}records/{record_id}"
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

    with HttpClient(NetSettings.from_params(params)) as http:
        listed = parse_record(http.get_json(record_url), record_url)
        plain = [n for n in sorted(set(map(str, names))) if not n.lower().endswith(".zip")]
        zips = [n for n in sorted(set(map(str, names))) if n.lower().endswith(".zip")]
        for name in plain + zips:
            if name not in listed:
                raise UpstreamFormatError(
                    record_url,
                    f"expected file {name!r} is not in the record (it lists: {', '.join(sorted(listed))})",
                )
            safe_key(name, record_url)
            if "/" in name:
                raise UpstreamFormatError(record_url, f"unexpected folder in file name {name!r}")

        for name in plain:
            f = listed[name]
            expected_md5 = f.md5 or known_md5(params, SOURCE, name)
            prev = previous.get(name)
            if (
                prev is not None
                and prev.size == f.size
                and (not expected_md5 or prev.md5 == expected_md5)
                and local_size(out_dir / name) == f.size
            ):
                rows[name] = with_url(prev, f.url, verification(expected_md5, f.size))
                report.unchanged += 1
                continue
            got = http.download(
                f.url,
                out_dir / name,
                scratch_dir,
                name=name,
                expected_size=f.size,
                expected_md5=expected_md5,
                connections=connections,
            )
            rows[name] = ManifestRow(name, got.size, got.md5, got.etag, f.url, got.verified)
            report.downloaded += 1
            report.bytes_downloaded += got.transferred

        for name in zips:
            f = listed[name]
            expected_md5 = f.md5 or known_md5(params, SOURCE, name)
            prev_archive = previous_archives.get(name)
            # Members are the rows whose URL was this archive's in the previous run.
            prev_url = prev_archive.url if prev_archive else None
            prev_rows = [r for r in previous.values() if r.url.partition("#")[0] == prev_url]
            if (
                archive_unchanged(prev_archive, f.size, "", expected_md5)
                and prev_rows
                and rows_present(out_dir, prev_rows)
            ):
                level = verification(expected_md5, f.size)
                for r in prev_rows:
                    rows[r.key] = with_url(r, member_url(f.url, r.key), level)
                archives[name] = replace(prev_archive, url=f.url, verified=level)
                report.unchanged += 1
                continue
            got = download_http_archive(
                http,
                f.url,
                scratch_dir,
                name,
                expected_size=f.size,
                expected_md5=expected_md5,
                connections=connections,
            )
            try:
                tops = {n.split("/", 1)[0] for _info, n in check_zip(got.path, limits, name=f.url) if n}
                clash = sorted(tops & (set(listed) | set(rows)))
                if clash:
                    raise UpstreamFormatError(f.url, f"archive entries {clash} would overwrite record files")
                files = safe_extract_zip(got.path, out_dir, limits, replace=False, name=f.url)
            finally:
                got.path.unlink(missing_ok=True)
            for x in files:
                rows[x.name] = ManifestRow(
                    x.name, x.size, x.md5, "", member_url(f.url, x.name), got.verified
                )
            archives[name] = ArchiveRow(name, got.size, got.md5, got.etag, f.url, got.verified)
            report.downloaded += 1
            report.bytes_downloaded += got.transferred
            report.extracted += len(files)

    report.removed += len(prune(out_dir, set(rows)))
    write_manifest(out_dir, rows.values())
    write_archives(out_dir, archives.values())
    return report
