"""fetch@coralnet: CoralNet source exports, from the bucket or from local export folders.

Each `sources.coralnet.exports` entry names a source id and where its export lives:
`location: s3` reads `s3://<bucket>/s<id>/`, `location: local` reads
`<endpoints.coralnet_local_root>/s<id>/`. Mirrored into `data/raw/coralnet/s<id>/`, in one layout
whatever the upstream's: `annotations.csv`, every other CSV at the top of the export under its own
name (the labelset, whatever it is called: ingest picks it by its header and names it), and
`images/...` (everything under the images folder, sub-folders included: ingest counts what no
record uses). `features/` and other files are not mirrored; a local export's skipped files are
logged and listed in the report's notes.

A local export need not be laid out as CoralNet's own (CoralNet-Toolbox writes
`CoralNet_Annotations.csv` beside an image folder such as `D3/`):
- the annotations CSV is the entry's `annotations:` file, else `annotations.csv`, else the one
  top-level CSV whose header is an annotations header (`stages.coralnet_format`);
- the images are under the entry's `images:` folder, else `images/`, else the one top-level folder
  that holds image files (or the export folder itself, when only it holds them);
- none or several candidates: an UpstreamFormatError listing them, naming the key to set.
Local files are copied only when their size or md5 differ from the mirror.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from stages.config import require
from stages.coralnet_format import IMAGE_SUFFIXES, is_annotations_header, read_header
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
IMAGES = "images/"


def _top_csv(rel: str) -> bool:
    return "/" not in rel and rel.lower().endswith(".csv")


def _wanted(rel: str) -> bool:
    """Is this path inside a bucket export folder one we mirror?"""
    return _top_csv(rel) or (rel.startswith(IMAGES) and len(rel) > len(IMAGES))


def _exports(params: dict[str, Any]) -> list[tuple[int, str, dict[str, Any]]]:
    exports = require(params, f"sources.{SOURCE}.exports")
    if not isinstance(exports, list):
        raise ConfigError("params.yaml: `sources.coralnet.exports` must be a list of {id, location}")
    out: list[tuple[int, str, dict[str, Any]]] = []
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
        out.append((source_id, location, dict(entry)))
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


def _local_files(folder: Path) -> tuple[list[str], list[str]]:
    """Every file of a local export (relative posix paths) and the linked folders in it (os.walk
    does not descend into those)."""
    rels: list[str] = []
    linked: list[str] = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        linked += [(here / d).relative_to(folder).as_posix() for d in dirs if (here / d).is_symlink()]
        for name in files:
            rels.append((here / name).relative_to(folder).as_posix())
    return sorted(rels), sorted(linked)


def _real_file(folder: Path, rel: str, real_root: Path) -> Path:
    """The file to read for a mirrored path.

    A symbolic link is followed only when it resolves (through any chain of links) to a file
    inside the export folder: anything else would copy a host file into data/raw, which DVC
    pushes. Such a link, or a broken one, is an error naming it.
    """
    path = folder / rel
    real = _resolve_link(path, real_root) if path.is_symlink() else path
    if not real.is_file():
        raise UpstreamFormatError(path, "is not a regular file")
    return real


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


def _one(found: list[str], folder: Path, what: str, key: str) -> str | None:
    if len(found) > 1:
        raise UpstreamFormatError(
            folder,
            f"ambiguous CoralNet export: several {what} ({', '.join(found)}); name the one to use "
            f"with `{key}:` in its sources.coralnet.exports entry",
        )
    return found[0] if found else None


def _local_layout(folder: Path, rels: list[str], entry: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """{mirror path in the export: local path} and the local files left out (module docstring)."""
    source = f"CoralNet export s{entry['id']}"
    for key in ("annotations", "images"):
        value = entry.get(key)
        if value is not None and (
            not isinstance(value, str) or Path(value).is_absolute() or ".." in Path(value).parts
        ):
            raise ConfigError(f"params.yaml: {source}: `{key}` must be a path inside the export folder")
    named = entry.get("annotations")
    if named:
        annotations = str(named)
        if annotations not in rels:
            raise UpstreamFormatError(
                folder / annotations, f"{source}: the annotations CSV its entry names is missing"
            )
    elif ANNOTATIONS in rels:
        annotations = ANNOTATIONS
    else:
        csvs = [r for r in rels if _top_csv(r)]
        found = _one([r for r in csvs if is_annotations_header(read_header(folder / r))], folder,
                     "annotations CSVs", "annotations")
        if found is None:
            raise UpstreamFormatError(
                folder / ANNOTATIONS,
                f"{source} has no {ANNOTATIONS} and no other CSV with a CoralNet annotations header "
                f"(Name or Image ID, Row, Column, Label...); CSVs: {', '.join(csvs) or 'none'}",
            )
        annotations = found
    image_dirs = sorted({r.split("/", 1)[0] for r in rels if "/" in r and r.lower().endswith(IMAGE_SUFFIXES)})
    named = entry.get("images")
    if named:
        images: str | None = str(named).strip("/")
        if not (folder / images).is_dir():
            raise UpstreamFormatError(
                folder / images, f"{source}: the images folder its entry names is missing"
            )
    elif "images" in image_dirs or (folder / "images").is_dir():
        images = "images"
    else:
        flat = [r for r in rels if "/" not in r and r.lower().endswith(IMAGE_SUFFIXES)]
        images = _one(image_dirs + (["."] if flat else []), folder, "image folders", "images")
    mirror: dict[str, str] = {ANNOTATIONS: annotations}
    for rel in rels:
        if _top_csv(rel) and rel != annotations:
            mirror.setdefault(rel, rel)
        elif images == "." and "/" not in rel and rel.lower().endswith(IMAGE_SUFFIXES):
            mirror[f"{IMAGES}{rel}"] = rel
        elif images not in (None, ".") and rel.startswith(f"{images}/"):
            mirror[f"{IMAGES}{rel[len(images) + 1 :]}"] = rel
    used = set(mirror.values())
    return mirror, [r for r in rels if r not in used]


def _fetch_local_export(
    root: Path,
    entry: dict[str, Any],
    out_dir: Path,
    previous: dict[str, ManifestRow],
    report: FetchReport,
) -> dict[str, ManifestRow]:
    source_id = int(entry["id"])
    folder = root / f"s{source_id}"
    if not folder.is_dir():
        raise UpstreamFormatError(
            folder,
            f"CoralNet export folder for source {source_id} not found "
            "(export it from CoralNet and unpack it there, or change endpoints.coralnet_local_root)",
        )
    rels, linked = _local_files(folder)
    mirror, skipped = _local_layout(folder, rels, entry)
    real_root = folder.resolve()
    images = {rel.split("/", 1)[0] for rel in mirror.values() if rel != mirror[ANNOTATIONS] and "/" in rel}
    for rel in linked:
        # A linked folder is not descended into; one where images live must not lead out either.
        if rel.split("/", 1)[0] in images or rel == "images":
            _resolve_link(folder / rel, real_root)
    files = {dest_rel: (rel, _real_file(folder, rel, real_root)) for dest_rel, rel in mirror.items()}
    if skipped:
        note = f"coralnet s{source_id}: not part of the export, not mirrored: {', '.join(skipped)}"
        log.warning("%s", note)
        report.notes.append(note)
    rows: dict[str, ManifestRow] = {}
    with bar(total=len(files), desc=f"coralnet s{source_id}", unit="file") as pbar:
        for dest_rel, (rel, real) in sorted(files.items()):
            src = folder / rel
            key = f"s{source_id}/{dest_rel}"
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
    for source_id, location, entry in exports:
        if location == "s3":
            if bucket is None:
                bucket = S3Bucket.from_params(
                    params, require(params, f"sources.{SOURCE}.bucket"), anonymous=True
                )
            rows.update(_fetch_s3_export(params, bucket, source_id, out_dir, scratch_dir, previous, report))
        else:
            root = Path(require(params, "endpoints.coralnet_local_root"))
            rows.update(_fetch_local_export(root, entry, out_dir, previous, report))
    report.removed += len(prune(out_dir, set(rows)))
    write_manifest(out_dir, rows.values())
    return report
