"""The inputs an adapter gets: resolved paths and parameters, so tests can call adapters directly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class IngestContext:
    source: str
    params: dict[str, Any]  # the whole params.yaml (adapters read sources.<source>, ingest, limits)
    root: Path  # repo root: image paths in the tables are relative to it
    raw_dir: Path  # data/raw/<source>
    out_dir: Path  # data/interim/<source>
    taxonomy_dir: Path  # data/taxonomy (MERMAID API snapshot)
    tables_dir: Path  # data/tables (hand-written crosswalk and remap tables, git-tracked)
    jobs: int = 1
    scheduler: str | None = None

    @property
    def source_params(self) -> dict[str, Any]:
        return self.params["sources"][self.source]

    @property
    def max_pixels(self) -> int:
        return int(self.params["limits"]["max_image_pixels"])

    def rel(self, path: Path) -> str:
        """A path as stored in the tables: relative to the repo root, POSIX separators.

        The last component is not followed: a symlink in data/raw is named where it sits (and
        quarantined by the probe), whatever it points to, even outside the repository.
        """
        path = Path(path)
        where = path.parent.resolve() / path.name
        return where.relative_to(self.root.resolve()).as_posix()

    def out_rel(self, path: Path) -> str:
        """An output path (under out_dir) as stored in the tables: `data/interim/<source>/...`.

        Derived from out_dir rather than the repo root, so it names the same place whether the
        outputs sit in the project (a real run) or in a test's scratch copy of data/interim.
        """
        inner = Path(path).resolve().relative_to(self.out_dir.resolve()).as_posix()
        return f"data/interim/{self.source}/{inner}"
