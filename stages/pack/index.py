"""What sits beside the shards: wids index per split, parquet manifest, class map, product card data.

File names in `data/release/<product>/`:

- `<split>-NNNNNN.tar`        the shards (GUIDE "Shards");
- `<split>.index.json`        wids shard index of one split. One file per split because a split
                              is what a trainer opens (`wids.ShardListDataset("train.index.json")`);
                              the dotted name never matches `<split>-*.tar` globs or brace
                              patterns, and sorts next to the split's shards. `url` is the bare
                              shard file name: wids resolves it against the index's own location,
                              so the index stays valid wherever the folder is copied or served;
- `manifest.parquet`          one row per sample: key -> shard, split, position, labels;
- `classes.json`              the class map (what `cls` and label vectors index);
- `product.json`              sources, licences, `redistributable`, encoder and shard settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stages.fsutil import atomic_path, write_json

INDEX_KIND = "wids-shard-index-v1"
MANIFEST = "manifest.parquet"
CLASSES = "classes.json"
PRODUCT = "product.json"
MANIFEST_ROW_GROUP = 64 * 1024

MANIFEST_SCHEMA = pa.schema(
    [
        # The WebDataset __key__: the point id for reef-points patches, else the sample id;
        # ids over 84 bytes shortened by tarwriter.tar_key (sample_id / point_id hold them in full).
        ("key", pa.string()),
        ("sample_id", pa.string()),  # the image's sample id (sample table, split assignments)
        ("point_id", pa.string()),  # reef-points only
        ("split", pa.string()),
        ("shard", pa.string()),  # file name of the shard, beside the manifest
        ("position", pa.int32()),  # index of the sample inside its shard
        ("offset", pa.int64()),  # byte offset of the sample's first tar header in the shard
        ("nbytes", pa.int64()),  # bytes of all its members, headers and padding included
        ("source", pa.string()),
        ("upstream_id", pa.string()),
        ("license", pa.string()),
        ("cls", pa.int32()),  # the `cls` member where the product has one
        ("label", pa.string()),  # the class name `cls` stands for
        ("row", pa.int32()),  # reef-points: the point, pixels from the top
        ("col", pa.int32()),  # reef-points: pixels from the left
        ("labels", pa.string()),  # JSON: the labels the sample carries (see docs/pack.md)
        # Typed, so a query needs no JSON parsing:
        ("classes", pa.list_(pa.string())),  # names of the product classes the sample carries, sorted
        ("benthic_attribute", pa.string()),  # reef-points patches: the point's MERMAID attribute
        ("growth_form", pa.string()),  # reef-points patches: its growth form, where given
        ("top_level_category", pa.string()),  # reef-points patches
        ("source_label", pa.string()),  # reef-points patches: the label as the source wrote it
        ("attribution", pa.string()),
        ("width", pa.int32()),  # the upstream image, pixels (before any resize)
        ("height", pa.int32()),
        ("lat", pa.float64()),  # WGS84 degrees, where the source gives a position
        ("lon", pa.float64()),
        ("captured_at", pa.string()),  # ISO 8601 as the source gives it (date or date and time)
        ("site", pa.string()),  # the source's site / survey / session, what splits group by
    ]
)


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def index_name(split: str) -> str:
    return f"{split}.index.json"


@dataclass
class ShardInfo:
    name: str
    nsamples: int
    filesize: int
    md5sum: str


def wids_index(product: str, split: str, shards: Sequence[ShardInfo]) -> dict[str, Any]:
    return {
        "__kind__": INDEX_KIND,
        "wids_version": 1,
        "name": f"{product}-{split}",
        "shardlist": [
            {"url": s.name, "nsamples": s.nsamples, "filesize": s.filesize, "md5sum": s.md5sum}
            for s in shards
        ],
    }


def write_index(out_dir: Path, product: str, split: str, shards: Sequence[ShardInfo]) -> Path:
    path = out_dir / index_name(split)
    write_json(path, wids_index(product, split, shards))
    return path


@dataclass
class ManifestWriter:
    """Streams manifest rows to parquet in fixed-size row groups, so a product of any size is
    written without holding every row; the settings are those of fsutil.write_parquet, and the
    row-group cut depends on the row count only, so equal rows give equal bytes."""

    path: Path
    rows: dict[str, list[Any]] = field(default_factory=lambda: {n: [] for n in MANIFEST_SCHEMA.names})
    count: int = 0

    def __post_init__(self) -> None:
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        self._writer = pq.ParquetWriter(
            tmp,
            MANIFEST_SCHEMA,
            compression="zstd",
            compression_level=3,
            version="2.6",
            data_page_version="1.0",
            write_statistics=True,
            store_schema=True,
        )

    def add(self, row: dict[str, Any]) -> None:
        for name in MANIFEST_SCHEMA.names:
            self.rows[name].append(row.get(name))
        self.count += 1
        if len(self.rows["key"]) >= MANIFEST_ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if not self.rows["key"]:
            return
        table = pa.Table.from_pydict(self.rows, schema=MANIFEST_SCHEMA)
        self._writer.write_table(table, row_group_size=MANIFEST_ROW_GROUP)
        self.rows = {n: [] for n in MANIFEST_SCHEMA.names}

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._ctx.__exit__(None, None, None)

    def abort(self, exc: BaseException) -> None:
        try:
            self._writer.close()
        finally:
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)


def write_classes(out_dir: Path, classes: dict[str, Any]) -> None:
    write_json(out_dir / CLASSES, classes)


def write_product(out_dir: Path, card: dict[str, Any]) -> None:
    write_json(out_dir / PRODUCT, card)
