"""File helpers that keep outputs atomic and deterministic."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

READ_CHUNK = 1 << 20


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# mkstemp creates files 0600; outputs are shared (DVC cache, remotes, other users), so they get
# the permissions an ordinary open() would have given them.
_FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `dest`; rename it over `dest` only if the block succeeds.

    A crash or interrupt leaves either the old file or no file, never a truncated one that
    looks complete. The temp file sits in the same directory so the rename is atomic.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, dest)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes(dest: str | Path, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text(dest: str | Path, text: str) -> None:
    write_bytes(dest, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """Canonical JSON: sorted keys, fixed separators, trailing newline, so equal data is equal bytes."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_json(dest: str | Path, obj: Any) -> None:
    write_text(dest, dumps_json(obj))


def write_parquet(dest: str | Path, table: pa.Table) -> None:
    """Write parquet with settings fixed so the same table gives the same bytes on every build.

    pyarrow stores no timestamps, but the writer version, compression and row-group size would
    otherwise follow library defaults; pinning them keeps dvc.lock hashes stable.
    """
    with atomic_path(dest) as tmp:
        pq.write_table(
            table,
            tmp,
            compression="zstd",
            compression_level=3,
            row_group_size=128 * 1024,
            version="2.6",
            data_page_version="1.0",
            write_statistics=True,
            store_schema=True,
        )


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while chunk := fh.read(READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def repo_root() -> Path:
    """The project root: the nearest parent holding dvc.yaml (stages run from there under DVC)."""
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").exists():
            return candidate
    return here


# The writer settings of write_parquet, shared by the streaming writer so both give stable bytes.
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "version": "2.6",
    "data_page_version": "1.0",
    "write_statistics": True,
    "store_schema": True,
}


class ParquetStream:
    """Write a parquet file row by row in fixed-size row groups, without holding the table.

    Rows are turned into Arrow record batches every `batch_rows` rows and written as a row group
    every `rows_per_group` rows, so memory is bounded by one row group and the file's layout (hence
    its bytes) depends only on the rows, never on timing. The file appears atomically on `close`;
    `abort` leaves no trace.
    """

    def __init__(
        self, dest: str | Path, schema: pa.Schema, rows_per_group: int = 65536, batch_rows: int = 4096
    ) -> None:
        self.dest = Path(dest)
        self.schema = schema
        self.rows_per_group = rows_per_group
        self.batch_rows = min(batch_rows, rows_per_group)
        self.rows = 0
        self._pending: list[dict[str, Any]] = []
        self._batches: list[pa.RecordBatch] = []
        self._batched = 0
        self._ctx = atomic_path(self.dest)
        self._tmp = self._ctx.__enter__()
        self._writer = pq.ParquetWriter(self._tmp, schema, **PARQUET_OPTIONS)

    def add(self, row: dict[str, Any]) -> None:
        self._pending.append(row)
        self.rows += 1
        # Batches end exactly on row-group boundaries, so every group holds rows_per_group rows.
        if len(self._pending) >= min(self.batch_rows, self.rows_per_group - self._batched):
            self._to_batch()
            if self._batched >= self.rows_per_group:
                self._flush()

    def _to_batch(self) -> None:
        if self._pending:
            self._batches.append(pa.RecordBatch.from_pylist(self._pending, schema=self.schema))
            self._batched += len(self._pending)
            self._pending = []

    def _flush(self) -> None:
        if self._batches:
            table = pa.Table.from_batches(self._batches, schema=self.schema)
            self._writer.write_table(table, row_group_size=self.rows_per_group)
            self._batches, self._batched = [], 0

    def close(self) -> int:
        self._to_batch()
        self._flush()
        self._writer.close()
        self._ctx.__exit__(None, None, None)
        return self.rows

    def abort(self, exc: BaseException) -> None:
        try:
            self._writer.close()
        finally:
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)
