"""`python -m stages.samplegen --out build/upstream --scale 1`: write all five sample upstreams."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from stages.cli import run_main
from stages.fsutil import write_json


def generate_all(out: Path, scale: float = 1.0, jobs: int = 1) -> dict:
    """Generate every sample upstream under `out`; returns the planted-case registry."""
    from stages.samplegen import coasttrain, inat, reef, seatizen

    out.mkdir(parents=True, exist_ok=True)
    planted: dict = {"scale": scale}
    checksums: dict[str, str] = {}
    modules = (("reef", reef), ("coasttrain", coasttrain), ("inat2017", inat), ("seatizen", seatizen))
    for name, module in modules:
        result = module.generate(out, scale=scale, jobs=jobs)
        planted[name] = result.get("planted", {})
        checksums.update(result.get("checksums", {}))
    write_json(out / "checksums.json", dict(sorted(checksums.items())))
    write_json(out / "PLANTED.json", planted)
    return planted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.samplegen", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("build/upstream"))
    parser.add_argument("--scale", type=float, default=1.0, help="1 = demo size; 25 ~ 10k images")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    started = time.monotonic()
    generate_all(args.out, scale=args.scale, jobs=args.jobs)
    print(f"sample upstreams written to {args.out} in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    run_main(main)
