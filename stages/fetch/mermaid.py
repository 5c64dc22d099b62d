"""fetch@mermaid: the confirmed-annotations parquet and the PNG images it references.

The bucket also holds thumbnails, per-image CSVs and feature vectors; only `<image_id>.png`
for image ids in the parquet is mirrored. The bucket grows daily, so each run lists it and
downloads only objects that are new or whose ETag/size changed; local images no longer
referenced are removed. A referenced image that the bucket lacks is logged and counted, not an
error: ingest quarantines its points.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.config import require
from stages.errors import UpstreamFormatError
from stages.fetch import sync_s3_objects
from stages.fetch.manifest import FetchReport, prune, read_manifest, write_manifest
from stages.net import known_md5
from stages.net.s3 import S3Bucket

log = logging.getLogger(__name__)

SOURCE = "mermaid"


def referenced_image_ids(parquet: Path, where: str) -> list[str]:
    """Distinct non-null `image_id` values of the annotations parquet, sorted (reads one column)."""
    try:
        names = pq.read_schema(parquet).names
        if "image_id" not in names:
            raise UpstreamFormatError(where, f"no `image_id` column (columns: {', '.join(names)})")
        column = pq.read_table(parquet, columns=["image_id"]).column("image_id")
    except (pa.ArrowException, OSError) as exc:
        raise UpstreamFormatError(where, f"not a readable parquet file: {exc}") from None
    values = pc.unique(column.cast(pa.string())).to_pylist()
    return sorted(v for v in values if v)


def _is_plain_id(image_id: str) -> bool:
    # The id becomes an object key and a local file name: no separators, no dot tricks.
    return bool(image_id) and "/" not in image_id and "\\" not in image_id and image_id not in (".", "..")


def fetch(params: dict[str, Any], out_dir: Path, scratch_dir: Path) -> FetchReport:
    """Mirror the MERMAID bucket prefix into `out_dir` (see module doc)."""
    cfg = require(params, f"sources.{SOURCE}")
    bucket_name = require(params, f"sources.{SOURCE}.bucket")
    prefix = str(cfg.get("prefix", "mermaid/"))
    annotations = str(require(params, f"sources.{SOURCE}.annotations"))
    report = FetchReport(SOURCE)
    out_dir = Path(out_dir)
    scratch_dir = Path(scratch_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    bucket = S3Bucket.from_params(params, bucket_name, anonymous=True)
    listing = {obj.key: obj for obj in bucket.list(prefix)}
    parquet_key = prefix + annotations
    if parquet_key not in listing:
        raise UpstreamFormatError(
            bucket.url(parquet_key), "the annotations parquet is not in the bucket listing"
        )
    previous = read_manifest(out_dir)

    def known(rel: str) -> str | None:
        return known_md5(params, SOURCE, rel)

    rows = sync_s3_objects(
        bucket,
        {annotations: listing[parquet_key]},
        out_dir,
        scratch_dir,
        previous,
        report,
        "mermaid parquet",
        known,
    )
    image_ids = referenced_image_ids(out_dir / annotations, bucket.url(parquet_key))

    wanted = {}
    missing: list[str] = []
    for image_id in image_ids:
        key = f"{prefix}{image_id}.png"
        if _is_plain_id(image_id) and key in listing:
            wanted[f"{image_id}.png"] = listing[key]
        else:
            missing.append(image_id)
    if missing:
        report.missing += len(missing)
        log.warning(
            "%d image(s) referenced by %s are not in %s (ingest quarantines their points), e.g. %s",
            len(missing),
            annotations,
            bucket.url(prefix),
            ", ".join(missing[:5]),
        )
    rows.update(
        sync_s3_objects(bucket, wanted, out_dir, scratch_dir, previous, report, "mermaid images", known)
    )
    report.removed += len(prune(out_dir, set(rows)))
    write_manifest(out_dir, rows.values())
    return report
