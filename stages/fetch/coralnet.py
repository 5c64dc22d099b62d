"""fetch@coralnet: CoralNet source exports, from the bucket or from local export folders.

Each `sources.coralnet.exports` entry names a source id and where its export lives:
`location: s3` reads `s3://<bucket>/s<id>/`, `location: local` reads
`<endpoints.coralnet_local_root>/s<id>/`. Only `annotations.csv`, `labelset.csv` (when there is
one) and `images/…` are mirrored into `data/raw/coralnet/s<id>/`; `features/` and anything else
are skipped. Local files are copied only when their size or md5 differ from the mirror.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from stages.config import require
from stages.errors import ConfigError, UpstreamFormatError
from stages.fetch import sync_s3_objects
from stages.fetch.manifest import (
    FetchReport,
    ManifestRow,
    local_size,
    prune,
    read_manifest,
    safe_key,
    write_manifest,
)
from stages.fsutil import atomic_path, file_digest
from stages.net import VERIFIED_MD5, known_md5
from stages.net.s3 import S3Bucket, S3Object
from stages.progress import bar

log = logging.getLogger(__name__)

SOURCE = "coralnet"
ANNOTATIONS = "annotations.csv"
LABELSET = "labelset.csv"
IMAGES = "images/"


def _wanted(rel: str) -> bool:
    """Is this path inside an export folder one we mirror?"""
    return rel in (ANNOTATIONS, LABELSET) or (rel.startswith(IMAGES) and len(rel) > len(IMAGES))


def _exports(params: dict[str, Any]) -> list[tuple[int, str]]:
    exports = require(params, f"sources.{SOURCE}.exports")
    if not isinstance(exports, list):
        raise ConfigError("params.yaml: `sources.coralnet.exports` must be a list of {id, location}")
    out: list[tuple[int, str]] = []
    for entry in exports:
        try:
            source_id = int(entry["id"])
            location = str(entry["location"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(
                f"params.yaml: bad CoralNet export entry {entry!r}; expected {{id, location}}"
            ) from None
        if location not in ("s3", "local"):
            raise ConfigError(f"params.yaml: CoralNet export s{source_id}: location must be s3 or local")
        out.append((source_id, location))
    return out


def _fetch_s3_export(
    params: dict[str, Any],
    bucket: S3Bucket,
    source_id: int,
    out_dir: Path,
    scratch_dir: Path,
    previous: dict[str, ManifestRow],
    report: FetchReport,
) -> dict[str, ManifestRow]:
    folder = f"s{source_id}/"
    wanted: dict[str, S3Object] = {}
    for obj in bucket.list(folder):
        rel = obj.key[len(folder) :]
        if _wanted(rel):
            safe_key(rel, bucket.url(obj.key))
            wanted[folder + rel] = obj
    if folder + ANNOTATIONS not in wanted:
        raise UpstreamFormatError(
            bucket.url(folder + ANNOTATIONS), f"CoralNet export s{source_id} has no {ANNOTATIONS}"
        )
    return sync_s3_objects(
        bucket,
        wanted,
        out_dir,
        scratch_dir,
        previous,
        report,
        f"coralnet s{source_id}",
        lambda rel: known_md5(params, SOURCE, rel),
    )


def _local_files(folder: Path) -> dict[str, Path]:
    """The mirrored files of a local export: relative posix path -> the real file to read.

    A symbolic link among them is followed only when it resolves (through any chain of links)
    to a file inside the export folder: anything else would copy a host file into data/raw,
    which DVC pushes. Such a link, or a broken one, is an error naming it. Linked folders are
    not descended into (as before), but one that leads out of the export is refused too.
    """
    real_root = folder.resolve()
    files: dict[str, Path] = {}
    for root, dirs, names in os.walk(folder):
        here = Path(root)
        for d in dirs:
            link = here / d
            if link.is_symlink() and _wanted(link.relative_to(folder).as_posix() + "/x"):
                _resolve_link(link, real_root)
        for name in names:
            path = here / name
            rel = path.relative_to(folder).as_posix()
            if not _wanted(rel):
                continue
            real = _resolve_link(path, real_root) if path.is_symlink() else path
            if not real.is_file():
                raise UpstreamFormatError(path, "is not a regular file")
            files[rel] = real
    return dict(sorted(files.items()))


def _resolve_link(link: Path, real_root: Path) -> Path:
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError):
        raise UpstreamFormatError(link, f"broken symbolic link (to {os.readlink(link)!r})") from None
    if not target.is_relative_to(real_root):
        raise UpstreamFormatError(
            link,
            f"symbolic link to {target}, outside the export folder {real_root}; refused "
            "(it would copy a host file into data/raw)",
        )
    return target


def _fetch_local_export(
    root: Path,
    source_id: int,
    out_dir: Path,
    previous: dict[str, ManifestRow],
    report: FetchReport,
) -> dict[str, ManifestRow]:
    folder = root / f"s{source_id}"
    if not folder.is_dir():
        raise UpstreamFormatError(
            folder,
            f"CoralNet export folder for source {source_id} not found "
            "(export it from CoralNet and unpack it there, or change endpoints.coralnet_local_root)",
        )
    files = _local_files(folder)
    if ANNOTATIONS not in files:
        raise UpstreamFormatError(folder / ANNOTATIONS, f"CoralNet export s{source_id} has no {ANNOTATIONS}")
    rows: dict[str, ManifestRow] = {}
    with bar(total=len(files), desc=f"coralnet s{source_id}", unit="file") as pbar:
        for rel, real in files.items():
            src = folder / rel
            key = f"s{source_id}/{rel}"
            dest = out_dir / key
            url = str(src)
            size = real.stat().st_size
            md5 = file_digest(real, "md5")
            prev = previous.get(key)
            if local_size(dest) == size:
                local_md5 = prev.md5 if prev is not None and prev.size == size else file_digest(dest, "md5")
                if local_md5 == md5:
                    rows[key] = ManifestRow(key, size, md5, "", url, VERIFIED_MD5)
                    report.unchanged += 1
                    pbar.update(1)
                    continue
            with atomic_path(dest) as tmp:
                shutil.copyfile(real, tmp)
            if file_digest(dest, "md5") != md5:
                dest.unlink()
                raise UpstreamFormatError(src, "changed while it was being copied; run the fetch again")
            rows[key] = ManifestRow(key, size, md5, "", url, VERIFIED_MD5)
            report.downloaded += 1
            report.bytes_downloaded += size
            pbar.update(1)
    return rows


def fetch(params: dict[str, Any], out_dir: Path, scratch_dir: Path) -> FetchReport:
    """Mirror every configured CoralNet export into `out_dir/s<id>/`."""
    exports = _exports(params)
    report = FetchReport(SOURCE)
    out_dir = Path(out_dir)
    scratch_dir = Path(scratch_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = read_manifest(out_dir)
    rows: dict[str, ManifestRow] = {}
    bucket: S3Bucket | None = None
    for source_id, location in exports:
        if location == "s3":
            if bucket is None:
                bucket = S3Bucket.from_params(
                    params, require(params, f"sources.{SOURCE}.bucket"), anonymous=True
                )
            rows.update(_fetch_s3_export(params, bucket, source_id, out_dir, scratch_dir, previous, report))
        else:
            root = Path(require(params, "endpoints.coralnet_local_root"))
            rows.update(_fetch_local_export(root, source_id, out_dir, previous, report))
    report.removed += len(prune(out_dir, set(rows)))
    write_manifest(out_dir, rows.values())
    return report
