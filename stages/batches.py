"""Reading parquet tables one record batch at a time, with batches sized by bytes, not rows.

Table stages must not hold a whole table (issue 11): they iterate record batches. A fixed row
count is the wrong bound: a batch of 65k Seatizen samples carries ~650 MB of `labels` JSON, a
batch of 65k points ~8 MB. Arrow's parquet decoder needs a few times a batch's bytes while
decoding it, so the batch size is what bounds a stage's memory; `batch_rows` derives it from the
file's own column sizes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

MAX_ROWS = 1 << 16  # rows per record batch, at most
TARGET_BYTES = 8 << 20  # uncompressed bytes of the read columns per batch, about


def batch_rows(pf: pq.ParquetFile, columns: list[str]) -> int:
    """Rows per batch so one batch of `columns` holds about TARGET_BYTES (from the file's metadata)."""
    meta = pf.metadata
    if not meta.num_rows:
        return MAX_ROWS
    wanted = set(columns)
    size = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        size += sum(
            group.column(k).total_uncompressed_size
            for k in range(group.num_columns)
            if group.column(k).path_in_schema in wanted
        )
    per_row = max(1.0, size / meta.num_rows)
    return int(min(MAX_ROWS, max(256, TARGET_BYTES // per_row)))


def iter_batches(
    path: Path | pq.ParquetFile, columns: list[str], dictionary: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """The `columns` of a parquet file, one record batch at a time; `dictionary` columns arrive
    dictionary-encoded (for repetitive strings such as a points table's sample ids and class
    names: several times faster to decode, and smaller)."""
    pf = path if isinstance(path, pq.ParquetFile) else pq.ParquetFile(path, read_dictionary=dictionary)
    yield from pf.iter_batches(batch_size=batch_rows(pf, columns), columns=columns)


class Positions:
    """Positions of ids in one array of unique ids, batch after batch.

    `pc.index_in(batch, value_set=ids)` hashes all of `ids` on every call (65 ms per batch at
    113k samples, whatever the batch size). A column read with `read_dictionary` arrives
    dictionary-encoded with one dictionary per row group (a few hundred images for a points
    table), so the ids are probed against that small dictionary once per distinct dictionary
    and every row maps through it.
    """

    def __init__(self, ids: pa.Array) -> None:
        self.ids = ids
        self._dictionary: pa.Array | None = None
        self._map = np.zeros(0, dtype=np.int64)

    def __call__(self, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Per row, its position in `ids` (-1 where it has none)."""
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if not pa.types.is_dictionary(column.type):
            return pc.fill_null(pc.index_in(column, value_set=self.ids), -1).to_numpy().astype(np.int64)
        dictionary = column.dictionary
        if self._dictionary is None or not dictionary.equals(self._dictionary):
            at = pc.index_in(self.ids, value_set=dictionary)  # per id: its dictionary index
            found = pc.is_valid(at).to_numpy(zero_copy_only=False)
            mapping = np.full(len(dictionary), -1, dtype=np.int64)
            mapping[pc.drop_null(at).to_numpy()] = np.flatnonzero(found)
            self._dictionary, self._map = dictionary, mapping
        indices = pc.fill_null(column.indices, -1).to_numpy().astype(np.int64)
        return np.where(indices >= 0, self._map[np.maximum(indices, 0)], -1)
