"""What the split stage reports: metrics/split.json, data/split/report.md and per-class plot data.

- `metrics/split.json` keeps totals (per split, per source, per product) and compact warnings, so
  `dvc exp show` fits a screen;
- `metrics/plots/split/<product>.csv`: one row per class with its count and share in each split
  (columns `class,train,val,test,train_share,val_share,test_share`), so one chart per product
  overlays the splits (DVC plots several `y` columns of one file as series);
- `data/split/report.md`: the same for people, with the split-quality warnings spelled out and
  every sample that changed split.

Split quality (per product): a split left empty, and classes without a val or a test sample,
are warnings. A split whose ratio is 0 is not expected to hold anything, so it warns of nothing.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from stages import products as prod
from stages.fsutil import write_text
from stages.split_inputs import SPLITS

if TYPE_CHECKING:
    from stages.split import Assignment, SplitParams

ASSIGNED_BY = ("ledger", "official", "hash", "merge")  # why a sample has its split (provenance)
MAX_LISTED_MOVES = 1000
MAX_LISTED_CLASSES = 50  # class names spelled out per warning in report.md
PLOT_COLUMNS = ("class", *SPLITS, *(f"{s}_share" for s in SPLITS))

Counts = dict[str, tuple[np.ndarray, prod.ClassCounts]]  # product -> (images per split, classes)


def _per_split(counts: np.ndarray) -> dict[str, int]:
    return {s: int(counts[k]) for k, s in enumerate(SPLITS)}


def quality(cc: prod.ClassCounts, ratios: dict[str, float]) -> dict[str, Any]:
    """Split-quality warnings of one product: empty splits, classes without val/test samples."""
    expected = [k for k, s in enumerate(SPLITS) if ratios[s] > 0 or cc.totals[k] > 0]
    no = {
        s: [c for c, row in zip(cc.names, cc.counts) if row[k] == 0] if k in expected else []
        for k, s in enumerate(SPLITS)
        if s != "train"
    }
    return {
        "empty_splits": [SPLITS[k] for k in expected if cc.totals[k] == 0],
        "classes_without_val": len(no["val"]),
        "classes_without_test": len(no["test"]),
        "_names": no,  # for report.md; dropped from the metrics
    }


def product_metrics(counts: Counts, ratios: dict[str, float]) -> dict[str, Any]:
    """Per product: images and samples per split, the number of classes, split-quality warnings."""
    out: dict[str, Any] = {}
    for name, (images, cc) in counts.items():
        out[name] = {
            "images": _per_split(images),
            "samples": _per_split(cc.totals),
            "classes": len(cc.names),
            "warnings": quality(cc, ratios),
        }
    return out


def split_metrics(
    result: Assignment,
    overlap: dict[str, Any],
    per_product: dict[str, Any],
    ledger: pd.DataFrame | pa.Table,
    would_move: int,
    checked: dict[str, Any] | None = None,
) -> dict[str, Any]:
    t = result.table
    split = result.decision.split
    sizes = np.bincount(result.components.index, minlength=len(result.components))
    by_source = {}
    sources = t.column("source")
    for name in sorted(pc.unique(sources).to_pylist()):
        mask = pc.equal(sources, name).to_numpy(zero_copy_only=False)
        by_source[name] = _per_split(np.bincount(split[mask], minlength=len(SPLITS)))
    largest = None
    if len(sizes):
        biggest = np.flatnonzero(sizes == sizes.max())
        largest = min(result.components.public.take(pa.array(biggest)).to_pylist())
    moved = result.moved
    in_ledger = pc.is_valid(t.column("ledger_split")).to_numpy(zero_copy_only=False)
    how = np.bincount(result.decision.how, minlength=len(ASSIGNED_BY))
    products = {
        name: {**entry, "warnings": {k: v for k, v in entry["warnings"].items() if not k.startswith("_")}}
        for name, entry in per_product.items()
    }
    warnings = sum(
        len(w["empty_splits"]) + w["classes_without_val"] + w["classes_without_test"]
        for w in (e["warnings"] for e in products.values())
    )
    out = {
        "samples": t.num_rows,
        "by_split": _per_split(np.bincount(split, minlength=len(SPLITS))),
        "by_source": by_source,
        "assigned_by": {k: int(how[i]) for i, k in enumerate(ASSIGNED_BY)},
        "components": int(len(sizes)),
        "largest_component": {"component": largest, "size": int(sizes.max()) if len(sizes) else 0},
        "official": overlap,
        "ledger": {
            "entries": len(ledger),
            "samples_in_ledger": int(in_ledger.sum()),
            "new_samples": int((~in_ledger).sum()),
            "moved": len(moved),
            "moved_by_reason": dict(sorted(Counter(moved["reason"].tolist()).items())),
            "would_move_without_ledger": would_move,
        },
        "moved": [
            {k: r[k] for k in ("sample_id", "source", "component", "from_split", "to_split", "reason")}
            for r in moved.head(MAX_LISTED_MOVES).to_dict("records")
        ],
        "moved_listed_in_full": len(moved) <= MAX_LISTED_MOVES,
        "warnings": warnings,
        "products": products,
    }
    if checked is not None:
        out["independent_check"] = checked
    return out


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join("" if v is None else str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED_CLASSES])
    more = len(names) - MAX_LISTED_CLASSES
    return shown + (f" … and {more} more" if more > 0 else "")


def quality_markdown(per_product: dict[str, Any]) -> list[str]:
    """The split-quality section of report.md (class names from `quality`'s `_names`)."""
    parts = ["## Split quality\n"]
    lines = []
    for name, entry in per_product.items():
        w = entry["warnings"]
        names = w.get("_names", {})
        found = []
        if w["empty_splits"]:
            found.append(f"split(s) left empty: {', '.join(w['empty_splits'])}")
        for split in ("val", "test"):
            n = w[f"classes_without_{split}"]
            if n:
                listed = _listed(names.get(split, [])) if names else ""
                found.append(
                    f"{n} of {entry['classes']} classes have no {split} sample"
                    + (f" ({listed})" if listed else "")
                )
        if found:
            lines.append(f"- **{name}**: " + "; ".join(found) + ".")
    if lines:
        parts += [*lines, "", "Per-class counts per split: `metrics/plots/split/<product>.csv`."]
    else:
        parts.append("No warnings: every product has samples in every split and every class in val and test.")
    return parts


def report_markdown(
    m: dict[str, Any], moved: pd.DataFrame, sp: SplitParams, per_product: dict[str, Any] | None = None
) -> str:
    ratios = ", ".join(f"{s} {sp.ratios[s]:.3g}" for s in SPLITS)
    parts = [
        "# Split assignments\n",
        f"Salt `{sp.salt}`, ratios {ratios}; {m['samples']} samples in {m['components']} components "
        f"(largest: {m['largest_component']['size']}).\n",
        _md_table(
            ["", *SPLITS],
            [["all samples", *m["by_split"].values()]]
            + [[src, *v.values()] for src, v in m["by_source"].items()],
        ),
        "",
        "## How splits were decided\n",
        _md_table(list(m["assigned_by"]), [list(m["assigned_by"].values())]),
        "",
        "## Products\n",
    ]
    rows = []
    for name, entry in m["products"].items():
        rows.append([name, "samples", *entry["samples"].values()])
        if entry["samples"] != entry["images"]:
            rows.append([name, "images", *entry["images"].values()])
    parts.append(_md_table(["product", "unit", *SPLITS], rows))
    parts += ["", *quality_markdown(per_product or m["products"])]
    overlap = m["official"]
    parts += [
        "",
        "## Upstream official-split overlap\n",
        "Components that span splits because upstream's own train/val split puts their members on "
        "both sides (e.g. one iNat observer in train and val). Allowed and counted; test only where "
        "upstream put a member in test.\n",
        _md_table(
            ["splits", "components"],
            [[k, v] for k, v in overlap["components_spanning_official_splits"].items()],
        )
        if overlap["components_spanning_official_splits"]
        else "None.",
        "",
        "## Ledger\n",
        f"{m['ledger']['samples_in_ledger']} samples were in the ledger ({m['ledger']['entries']} entries), "
        f"{m['ledger']['new_samples']} are new. Moved: {m['ledger']['moved']}. Without the ledger "
        f"{m['ledger']['would_move_without_ledger']} ledger samples would be in another split.\n",
    ]
    if len(moved):
        parts.append(
            _md_table(
                ["sample", "source", "component", "from", "to", "reason"],
                moved[
                    ["sample_id", "source", "component", "from_split", "to_split", "reason"]
                ].values.tolist(),
            )
        )
    else:
        parts.append("No sample changed split.")
    return "\n".join(parts).rstrip() + "\n"


def plot_csv(cc: prod.ClassCounts) -> str:
    """One row per class: its count and share of the split's samples in each split."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PLOT_COLUMNS)
    for name, row in zip(cc.names, cc.counts):
        shares = [f"{row[k] / cc.totals[k]:.6f}" if cc.totals[k] else "0" for k in range(len(SPLITS))]
        writer.writerow([name, *(int(v) for v in row), *shares])
    return buf.getvalue()


def write_plots(folder: Path, counts: Counts) -> list[Path]:
    """metrics/plots/split/<product>.csv for every product; stale files of other products go."""
    written = []
    for name, (_, cc) in counts.items():
        path = folder / f"{name}.csv"
        write_text(path, plot_csv(cc))
        written.append(path)
    if folder.exists():
        for stale in folder.glob("*.csv"):
            if stale not in written:
                stale.unlink()
    return written
