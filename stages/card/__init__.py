"""Dataset card, Croissant metadata, example grid, viewer and plot data for one release product.

The pack stage calls `write_docs` at its end, so that beside the shards of `data/release/<product>/`
lie

- `README.md`: a Hugging Face dataset card (YAML header: licence with SPDX ids and links, task
  categories, size, configs per non-empty split, typed `dataset_info.features`; sections: licence,
  contents, split quality, classes, structure, fields, how to load, dedup and quarantine, split
  method, limitations, citation) (`markdown.py`);
- `examples.png`: a few examples per class for the card (`examples.py`);
- `croissant.json`: Croissant 1.1 JSON-LD (`croissant.py`), and the `croissant/<product>-<digest>/`
  folder its contentUrls pass through (see croissant.py for why);
- `viewer/`: a static page of examples per class (`viewer.py`);

and, outside the product, the class counts for `dvc plots` (`metrics/plots/classes/<product>.csv`,
columns `class,split,count`; `plots.py`).

`dvc import <repo> data/release/<product>` therefore brings all of them along. Everything is a pure
function of the files pack wrote, the ingest quarantine tables, the dedup clusters and params: no
clock, no host, sorted throughout, so the files hash the same on every build.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from stages.card.croissant import CACHE_KEY_DIR, cache_key_dir, croissant
from stages.card.examples import GRID_FILE, example_grid, png_bytes
from stages.card.info import ReleaseInfo, gather
from stages.card.markdown import card_header, dataset_card, snippets
from stages.card.plots import class_distribution, write_plot
from stages.card.viewer import write_viewer
from stages.fsutil import write_bytes, write_json, write_text

CARD = "README.md"
CROISSANT = "croissant.json"

__all__ = [
    "CARD",
    "CROISSANT",
    "ReleaseInfo",
    "card_header",
    "class_distribution",
    "croissant",
    "dataset_card",
    "gather",
    "snippets",
    "write_docs",
]

CACHE_KEY_README = """# Why this folder exists

mlcroissant extracts each archive a Croissant file names once, into a cache folder named by a hash of
the archive's contentUrl. Every product's first shard is `train-000000.tar`, so plain contentUrls
would make a second product, or a later release of this one, read the first one's cached members.
`croissant.json` therefore names each shard as `{folder}/../../<shard>`: the same file, through
this folder, whose name holds the product and a digest of its shards. Keep it with the product.
"""


def _write_cache_key_dir(info: ReleaseInfo, out_dir: Path) -> list[Path]:
    """Create croissant/<product>-<digest>/ (with a README) and remove the folders of earlier builds."""
    parent = out_dir / CACHE_KEY_DIR
    current = out_dir / cache_key_dir(info)
    if parent.is_dir():
        for old in sorted(parent.iterdir()):
            if old != current and old.is_dir():
                shutil.rmtree(old)
    if not info.shards:
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
        return []
    readme = current / "README.md"
    write_text(readme, CACHE_KEY_README.format(folder=cache_key_dir(info)))
    return [readme]


def write_docs(
    out_dir: Path,
    root: Path | None = None,
    params: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    plots_file: Path | None = None,
) -> list[Path]:
    """Write the card, its example grid, croissant.json, the viewer into `out_dir` (and the plot CSV
    to `plots_file`). Returns the paths written."""
    info = gather(out_dir, root, params, metrics)
    grid = example_grid(info, out_dir)
    if grid is not None:
        write_bytes(out_dir / GRID_FILE, png_bytes(grid))
    else:
        (out_dir / GRID_FILE).unlink(missing_ok=True)
    write_text(out_dir / CARD, dataset_card(info, has_grid=grid is not None))
    write_json(out_dir / CROISSANT, croissant(info))
    written = [out_dir / CARD, out_dir / CROISSANT]
    if grid is not None:
        written.append(out_dir / GRID_FILE)
    written += _write_cache_key_dir(info, out_dir)
    written += write_viewer(info, out_dir)
    if plots_file is not None:
        written.append(write_plot(plots_file, info.classes))
    return written
