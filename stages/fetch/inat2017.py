"""fetch@inat2017: the iNaturalist 2017 annotation JSONs and the images of chosen supercategories.

The bucket is requester-pays: requests are signed and carry `RequestPayer=requester`. The four
JSON zips are downloaded, extracted safely and reduced to the flat JSON names of the
architecture table. The 186 GB `train_val_images.tar.gz` is streamed once and never stored:
only regular files under `train_val_images/<supercategory>/` for the configured supercategories
are written (into a staging folder in scratch), while the md5 of the whole compressed stream is
computed as it passes; only when it matches the published md5 does the staging folder replace
`data/raw/inat2017/train_val_images/`. A re-run skips the stream when the object's size/ETag are
unchanged and the configured supercategories were all extracted before (`archives.csv`).
"""

from __future__ import annotations

import io
import logging
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from stages.config import require
from stages.errors import ChecksumMismatch, ConfigError, FetchError, UpstreamFormatError
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
from stages.net import (
    HashingReader,
    NetSettings,
    known_md5,
    md5_from_etag,
    place_file,
    replace_tree,
    verification,
)
from stages.net.archives import ArchiveLimits, extract_tar_stream, safe_extract_zip
from stages.net.s3 import S3Bucket, S3Object
from stages.progress import bar

log = logging.getLogger(__name__)

SOURCE = "inat2017"
IMAGES_DIR = "train_val_images"
IMAGES_TAR = "train_val_images.tar.gz"
# Each JSON zip and the JSON files (by base name) it must contain.
JSON_ZIPS: dict[str, tuple[str, ...]] = {
    "train_val2017.zip": ("train2017.json", "val2017.json"),
    "train_2017_bboxes.zip": ("train_2017_bboxes.json",),
    "val_2017_bboxes.zip": ("val_2017_bboxes.json",),
    "inat2017_locations.zip": ("train2017_locations.json", "val2017_locations.json"),
}
_SUPERCATEGORY = re.compile(rb'"supercategory"\s*:\s*"([^"\\]*)"')


def member_url(archive_url: str, member: str) -> str:
    return f"{archive_url}#{member}"


def _supercategories(params: dict[str, Any]) -> list[str]:
    values = require(params, f"sources.{SOURCE}.supercategories")
    if not isinstance(values, list) or not values:
        raise ConfigError("params.yaml: `sources.inat2017.supercategories` must be a non-empty list")
    for value in values:
        if not isinstance(value, str) or not value or "/" in value or value in (".", ".."):
            raise ConfigError(f"params.yaml: bad iNat supercategory {value!r}")
    return sorted(set(values))


def _fetch_json_zip(
    bucket: S3Bucket,
    prefix: str,
    zip_name: str,
    members: tuple[str, ...],
    params: dict[str, Any],
    out_dir: Path,
    scratch_dir: Path,
    limits: ArchiveLimits,
    previous: dict[str, ManifestRow],
    previous_archives: dict[str, ArchiveRow],
    report: FetchReport,
) -> tuple[dict[str, ManifestRow], ArchiveRow]:
    obj = bucket.head(prefix + zip_name)
    url = bucket.url(obj.key)
    expected = known_md5(params, SOURCE, zip_name) or md5_from_etag(obj.etag)
    level = verification(expected, obj.size)
    prev_archive = previous_archives.get(zip_name)
    prev_rows = [previous[m] for m in members if m in previous]
    if (
        archive_unchanged(prev_archive, obj.size, obj.etag, expected)
        and len(prev_rows) == len(members)
        and rows_present(out_dir, prev_rows)
    ):
        report.unchanged += 1
        rows = {
            r.key: with_url(r, member_url(url, r.url.partition("#")[2] or r.key), level) for r in prev_rows
        }
        return rows, replace(prev_archive, url=url, verified=level)

    got = bucket.download(obj, scratch_dir / zip_name, scratch_dir, name=zip_name, expected_md5=expected)
    unpacked = scratch_dir / f"{zip_name}.unpacked"
    shutil.rmtree(unpacked, ignore_errors=True)
    try:
        files = safe_extract_zip(got.path, unpacked, limits, replace=True, name=url)
        by_base: dict[str, list[str]] = {}
        for f in files:
            by_base.setdefault(f.name.rsplit("/", 1)[-1], []).append(f.name)
        rows: dict[str, ManifestRow] = {}
        for member in members:
            found = by_base.get(member, [])
            if len(found) != 1:
                raise UpstreamFormatError(
                    url,
                    f"expected exactly one {member} in the archive, found {len(found)} "
                    f"(members: {', '.join(sorted(f.name for f in files)[:10])})",
                )
            info = next(f for f in files if f.name == found[0])
            place_file(unpacked / info.name, out_dir / member)
            rows[member] = ManifestRow(
                member, info.size, info.md5, "", member_url(url, info.name), got.verified
            )
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)
        got.path.unlink(missing_ok=True)
    report.downloaded += 1
    report.bytes_downloaded += got.transferred
    report.extracted += len(members)
    return rows, ArchiveRow(zip_name, got.size, got.md5, got.etag, url, got.verified)


def categories_in(json_path: Path) -> set[str]:
    """Supercategory names mentioned in a COCO-style iNat JSON (a byte scan, no full parse)."""
    try:
        data = json_path.read_bytes()
    except OSError:
        return set()
    return {m.group(1).decode("utf-8", "replace") for m in _SUPERCATEGORY.finditer(data)}


def _stream_images(
    bucket: S3Bucket,
    obj: S3Object,
    wanted: list[str],
    expected: str | None,
    out_dir: Path,
    scratch_dir: Path,
    limits: ArchiveLimits,
    chunk_bytes: int,
) -> tuple[dict[str, ManifestRow], ArchiveRow, int]:
    url = bucket.url(obj.key)
    staging = scratch_dir / f"{IMAGES_DIR}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    selected = set(wanted)
    seen: set[str] = set()

    def keep(name: str) -> bool:
        parts = name.split("/")
        return len(parts) >= 3 and parts[0] == IMAGES_DIR and parts[1] in selected

    def on_member(name: str) -> None:
        parts = name.split("/")
        if len(parts) >= 3 and parts[0] == IMAGES_DIR:
            seen.add(parts[1])

    try:
        stream = bucket.open_stream(obj)
        with bar(total=obj.size, desc=IMAGES_TAR, unit="B") as pbar:
            reader = HashingReader(io.BufferedReader(stream, buffer_size=chunk_bytes), on_bytes=pbar.update)
            try:
                files = extract_tar_stream(reader, staging, keep, limits, url, on_member)
                reader.drain()
            finally:
                reader.close()
        if reader.count != obj.size:
            raise FetchError(url, f"the stream gave {reader.count} bytes, the object has {obj.size}")
        actual = reader.hexdigest()
        if expected and actual != expected:
            raise ChecksumMismatch(url, "md5", expected, actual)
        absent = sorted(selected - seen)
        if absent:
            raise UpstreamFormatError(
                url,
                f"no images for supercategories {absent} (the archive has: {', '.join(sorted(seen))})",
            )
        if (staging / IMAGES_DIR).is_dir():
            replace_tree(staging / IMAGES_DIR, out_dir / IMAGES_DIR)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "%s: kept %d images of %s (re-opened the stream %d times)", url, len(files), wanted, stream.reopened
    )
    level = verification(expected, obj.size)
    rows = {f.name: ManifestRow(f.name, f.size, f.md5, "", member_url(url, f.name), level) for f in files}
    archive = ArchiveRow(IMAGES_TAR, obj.size, actual, obj.etag, url, level, ",".join(wanted))
    return rows, archive, reader.count


def fetch(params: dict[str, Any], out_dir: Path, scratch_dir: Path) -> FetchReport:
    """Mirror the iNat 2017 JSONs and the chosen supercategories' images into `out_dir`."""
    bucket_name = require(params, f"sources.{SOURCE}.bucket")
    prefix = str(require(params, f"sources.{SOURCE}").get("prefix", "2017/"))
    wanted = _supercategories(params)
    selection = ",".join(wanted)
    limits = ArchiveLimits.from_params(params)
    report = FetchReport(SOURCE)
    out_dir = Path(out_dir)
    scratch_dir = Path(scratch_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch_dir.mkdir(parents=True, exist_ok=True)
    previous = read_manifest(out_dir)
    previous_archives = read_archives(out_dir)
    bucket = S3Bucket.from_params(params, bucket_name, anonymous=False, requester_pays=True)
    rows: dict[str, ManifestRow] = {}
    archives: dict[str, ArchiveRow] = {}

    for zip_name, members in JSON_ZIPS.items():
        zip_rows, archive = _fetch_json_zip(
            bucket,
            prefix,
            zip_name,
            members,
            params,
            out_dir,
            scratch_dir,
            limits,
            previous,
            previous_archives,
            report,
        )
        rows.update(zip_rows)
        archives[zip_name] = archive

    # Catch a misspelt supercategory before a 186 GB stream, not after it.
    # (val2017.json lists every category and is the smaller file; train2017.json only if needed.)
    known = categories_in(out_dir / "val2017.json")
    if set(wanted) - known:
        known |= categories_in(out_dir / "train2017.json")
    unknown = sorted(set(wanted) - known)
    if known and unknown:
        raise ConfigError(
            f"params.yaml: iNat supercategories {unknown} do not exist; "
            f"the dataset has: {', '.join(sorted(known))}"
        )

    tar_key = prefix + IMAGES_TAR
    obj = bucket.head(tar_key)
    url = bucket.url(tar_key)
    expected = known_md5(params, SOURCE, IMAGES_TAR) or md5_from_etag(obj.etag)
    prev_archive = previous_archives.get(IMAGES_TAR)
    extracted_before = (
        set(prev_archive.selection.split(",")) if prev_archive and prev_archive.selection else set()
    )
    same_object = prev_archive is not None and archive_unchanged(
        prev_archive, obj.size, obj.etag, expected, selection=prev_archive.selection
    )
    kept_rows = [
        r for key, r in previous.items() if key.startswith(IMAGES_DIR + "/") and key.split("/")[1] in wanted
    ]
    if same_object and set(wanted) <= extracted_before and rows_present(out_dir, kept_rows):
        # Narrowing the selection needs no stream: the dropped supercategories are pruned below.
        level = verification(expected, obj.size)
        for r in kept_rows:
            rows[r.key] = with_url(r, member_url(url, r.key), level)
        archives[IMAGES_TAR] = replace(prev_archive, url=url, selection=selection, verified=level)
        report.unchanged += 1
    else:
        image_rows, archive, nbytes = _stream_images(
            bucket,
            obj,
            wanted,
            expected,
            out_dir,
            scratch_dir,
            limits,
            NetSettings.from_params(params).chunk_bytes,
        )
        rows.update(image_rows)
        archives[IMAGES_TAR] = archive
        report.downloaded += 1
        report.bytes_downloaded += nbytes
        report.extracted += len(image_rows)

    report.removed += len(prune(out_dir, set(rows)))
    write_manifest(out_dir, rows.values())
    write_archives(out_dir, archives.values())
    return report
