"""`python -m stages.pack <product> [--params P] [--out DIR] [--metrics FILE] [--update-ledger]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from stages.cli import run_main
from stages.config import load_params
from stages.fsutil import repo_root
from stages.pack import pack_product, record_generations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stages.pack", description="Write the WebDataset shards of one product."
    )
    parser.add_argument("product", help="a product declared under `products:` in params.yaml")
    parser.add_argument("--params", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="default data/release/<product>")
    parser.add_argument("--metrics", type=Path, default=None, help="default metrics/pack/<product>.json")
    parser.add_argument(
        "--plots",
        type=Path,
        default=None,
        help="folder of the class-count CSV for dvc plots (<product>.csv); default metrics/plots/classes",
    )
    parser.add_argument(
        "--update-ledger",
        action="store_true",
        help="do not pack: record the units of the built release in products.<product>.ledger "
        "(release process, after the release is cut)",
    )
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if args.update_ledger:
        path = record_generations(params, args.product, repo_root(), out_dir=args.out)
        print(f"pack {args.product}: ledger {path} updated from the release manifest")
        return 0
    m = pack_product(
        params, args.product, repo_root(), out_dir=args.out, metrics_path=args.metrics, plots_dir=args.plots
    )
    per = ", ".join(f"{s} {v['samples']} in {v['shards']}" for s, v in m["by_split"].items())
    skipped = f"; skipped {m['skipped_total']} ({m['skipped']})" if m["skipped_total"] else ""
    print(
        f"pack {args.product}: {m['samples']} samples in {m['shards']} shards ({per}), "
        f"{m['bytes']} bytes{skipped}"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
