"""What the CSVs of a CoralNet export look like, shared by fetch (which finds the files of a local
export) and ingest (which reads them).

Header names are compared after `norm` (case, repeated spaces and a BOM ignored). An annotations
CSV has an image key (`Name` or `Image ID`), `Row`, `Column` and a label column: `Label code`
and/or `Label ID` (exports since December 2024) or `Label` (the short code, as exports before
then and CoralNet-Toolbox write it). A labelset CSV has `Label ID` and `Short Code`, whatever its
file name (`labelset.csv`, `label_set.csv`, a pandas dump with an unnamed index column, ...).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path

KEY_COLUMNS = ("name", "image id")
LABEL_COLUMNS = ("label id", "label code", "label")
LABELSET_COLUMNS = ("label id", "short code")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".mpo")
_SNIFF_BYTES = 1 << 20


def norm(name: str) -> str:
    return " ".join(name.replace("\ufeff", "").split()).casefold()


def is_annotations_header(cells: Iterable[str]) -> bool:
    names = {norm(c) for c in cells}
    return bool(names & set(KEY_COLUMNS)) and {"row", "column"} <= names and bool(names & set(LABEL_COLUMNS))


def is_labelset_header(cells: Iterable[str]) -> bool:
    return set(LABELSET_COLUMNS) <= {norm(c) for c in cells}


def read_header(path: Path) -> list[str]:
    """The first non-blank record of a CSV, read leniently (for telling the files apart only)."""
    with open(path, "rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    text = head.decode("utf-8-sig", errors="replace")
    try:
        for cells in csv.reader(io.StringIO(text, newline="")):
            if cells:
                return cells
    except csv.Error:
        return []
    return []
