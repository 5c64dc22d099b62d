"""`make bench`: the pipeline's cost on a generated corpus, against the codec floor.

    python -m bench.run [--images 10000 | --scale S] [--jobs 2] [--workdir DIR] [--keep]
                        [--rss-images 1000 100000] [--skip-100k] [--skip-scaling] [--skip-growth]
                        [--out bench/results/bench.json]

What it does, in a scratch folder (`--workdir`, default a new folder under the system temp dir):

1. `python -m stages.samplegen --scale S`: the five sample upstreams. Images are counted as the
   image files the build decodes, i.e. in the fetched `data/raw/`: MERMAID PNGs, CoralNet images,
   Coast Train npz files, the iNat JPEGs of the configured supercategories, Seatizen frames. About
   318 per unit of scale (+18 planted), so `--images N` picks S = (N - 18) / 318.
2. A fresh clone of this repository (`tests.conftest.make_project`) wired to the loopback servers
   (`tests.conftest.Pipeline`), with every stage command of its dvc.yaml prefixed by
   `python -m bench.measure --` (CPU seconds and peak RSS of the stage and all its processes; see
   bench/measure.py) and `jobs` set in its params.yaml.
3. Full build: `dvc repro` with `jobs: --jobs`.
4. Codec floor: `python -m bench.floor` in the built project (bench/floor.py): one single-process
   loop that decodes each packed image once and cuts and encodes the same outputs.
   Ratio = pipeline CPU (ingest@*, dedup, split, pack@*) / floor CPU; target <= 1.3.
5. Scaling: `jobs: 1`, then `dvc repro -f -s <stage>` for each stage from ingest to pack; wall
   against the build's. Outputs must be byte-identical to the `jobs: 2` build (checked). A
   calibration (zlib in one vs two processes) measures how much a second process can gain on the
   machine at that moment: on a shared box it is far from 2.
6. Growth: the release step (split and pack ledgers refreshed, as `stages.release_cut` does), the
   generator at S * 1.01 into the same upstream (a superset), the loopback reseeded, every
   `sources.<s>.snapshot` bumped, `dvc repro`: wall against the full build, and the bytes of
   shards whose md5 (from the wids indexes) is new.
7. Peak RSS per stage at further sizes (`--rss-images`, default 1000 and 100000): a build only, run
   only when the disk can hold it (estimated from the main build's bytes per image).

Prints a table (each figure with the command behind it) and writes `--out` as JSON. Timings are
wall-clock on whatever else the machine runs: the JSON records the load average around each
phase. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.measure import LOG_ENV
from stages.executor import parallel_map
from stages.fsutil import repo_root, write_json

SOURCES = ("mermaid", "coralnet", "coasttrain", "inat2017", "seatizen")
PRODUCTS = ("reef-points", "reef-images", "coast-seg", "inat2017")
WORK_STAGES = (*(f"ingest@{s}" for s in SOURCES), "dedup", "split", *(f"pack@{p}" for p in PRODUCTS))
IMAGES_PER_SCALE = 318  # measured: scale 1 -> 336 images, scale 5 -> 1590 (see count_images)
PLANTED_IMAGES = 18  # planted images exist at every scale
GROWTH = 1.01
GiB = 1 << 30
MiB = 1 << 20
TIMEOUT_S = 24 * 3600


def scale_for(images: int) -> float:
    return round(max(0.05, (images - PLANTED_IMAGES) / IMAGES_PER_SCALE), 4)


def count_images(raw: Path) -> dict[str, int]:
    """Image files the build decodes, per source, in a fetched `data/raw/`."""
    counts = {
        "mermaid": sum(1 for _ in (raw / "mermaid").glob("*.png")),
        "coralnet": sum(1 for p in (raw / "coralnet").glob("*/images/*") if p.is_file()),
        "coasttrain": sum(1 for _ in (raw / "coasttrain").rglob("*.npz")),
        "inat2017": sum(1 for p in (raw / "inat2017" / "train_val_images").rglob("*") if p.is_file()),
        "seatizen": sum(1 for p in (raw / "seatizen" / "2024_dataset").rglob("*") if p.is_file()),
    }
    counts["total"] = sum(counts.values())
    return counts


def stage_name(argv: list[str]) -> str:
    """`python -m stages.ingest mermaid` -> `ingest@mermaid`; `python -m stages.dedup` -> `dedup`."""
    try:
        i = argv.index("-m")
    except ValueError:
        return " ".join(argv)
    module = argv[i + 1].removeprefix("stages.")
    rest = [a for a in argv[i + 2 :] if not a.startswith("-")]
    if module in ("fetch", "ingest", "pack") and rest:
        return f"{module}@{rest[0]}"
    return module


def read_log(path: Path) -> dict[str, dict[str, Any]]:
    """bench.measure records by stage name (the last record of a stage wins)."""
    out: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            out[stage_name(record["argv"])] = record
    return out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- calibration: how much a second process can gain on this machine right now ---------------------

_CALIBRATION_DATA = random.Random(0).randbytes(1 << 20)


def _zlib_work(rounds: int) -> float:
    started = time.process_time()
    for _ in range(rounds):
        zlib.compress(_CALIBRATION_DATA, 6)
    return time.process_time() - started


def parallel_headroom(rounds: int = 60) -> dict[str, Any]:
    """The same CPU-bound task in one process, then twice in two processes: throughput ratio."""
    list(parallel_map(_zlib_work, [1, 1], jobs=2, chunksize=1))  # start the forkserver first
    started = time.perf_counter()
    _zlib_work(rounds)
    one = time.perf_counter() - started
    started = time.perf_counter()
    list(parallel_map(_zlib_work, [rounds, rounds], jobs=2, chunksize=1))
    two = time.perf_counter() - started
    return {
        "one_process_s": round(one, 2),
        "two_processes_s": round(two, 2),
        "throughput_ratio": round(2 * one / two, 2),
        "loadavg": load(),
    }


# --- one scratch build -------------------------------------------------------------------------------


@dataclass
class Build:
    """A generated upstream, its loopback servers and a scratch DVC project at one size."""

    workdir: Path
    scale: float
    jobs: int
    results: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.upstream = self.workdir / "upstream"
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    # -- helpers
    def measured(self, label: str, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> dict:
        """Run `argv` under bench.measure; its record (raises on failure)."""
        import subprocess

        log = self.logs / f"{label}.jsonl"
        log.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "bench.measure", "--log", str(log), "--label", label, "--", *argv]
        env = {**(env or os.environ), "PYTHONPATH": str(cwd), "TIDEPOOL_PROGRESS": "0"}
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        if proc.returncode != 0:
            raise SystemExit(
                f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        record = json.loads(log.read_text(encoding="utf-8").splitlines()[-1])
        record["stdout_tail"] = proc.stdout[-500:]
        return record

    def generate(self, scale: float, label: str) -> dict[str, Any]:
        argv = [
            sys.executable,
            "-m",
            "stages.samplegen",
            "--out",
            str(self.upstream),
            "--scale",
            str(scale),
            "--jobs",
            str(self.jobs),
        ]
        record = self.measured(label, argv, repo_root())
        record["command"] = (
            f"python -m stages.samplegen --out <workdir>/upstream --scale {scale} --jobs {self.jobs}"
        )
        return record

    @contextmanager
    def project(self) -> Iterator[Any]:
        """The loopback servers and a fresh, instrumented clone of the repository."""
        from stages.loopback import Loopback
        from tests.conftest import Pipeline, make_project

        root = self.workdir / "project"
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        make_project(root)
        dvc_yaml = root / "dvc.yaml"
        text = dvc_yaml.read_text(encoding="utf-8")
        instrumented = re.sub(
            r"cmd: python -m stages\.", "cmd: python -m bench.measure -- python -m stages.", text
        )
        dvc_yaml.write_text(instrumented, encoding="utf-8")
        self.set_jobs(root, self.jobs)
        with Loopback(upstream=self.upstream) as lb:
            pipeline = Pipeline(root, lb, lb.write_overlay(self.workdir / "endpoints.yaml"))
            pipeline.env["PYTHONPATH"] = str(root)
            # DVC's analytics daemon would outlive `dvc repro` and be waited for by bench.measure.
            pipeline.env["DVC_NO_ANALYTICS"] = "1"
            # The work cache starts empty: the first build is a cold one, and growth measures reuse.
            cache = self.workdir / "work-cache"
            shutil.rmtree(cache, ignore_errors=True)
            pipeline.env["TIDEPOOL_CACHE_DIR"] = str(cache)
            yield pipeline

    @staticmethod
    def set_jobs(root: Path, jobs: int) -> None:
        params = root / "params.yaml"
        text, n = re.subn(r"(?m)^jobs: *\d+", f"jobs: {jobs}", params.read_text(encoding="utf-8"))
        if n != 1:
            raise SystemExit(f"{params}: no top-level `jobs:` line to set")
        params.write_text(text, encoding="utf-8")

    def dvc(self, pipeline: Any, label: str, *args: str) -> dict[str, Any]:
        """`dvc <args>` under bench.measure (everything, DVC included), stages logged apart."""
        stage_log = self.logs / f"{label}.stages.jsonl"
        stage_log.unlink(missing_ok=True)
        outer = self.logs / f"{label}.jsonl"
        outer.unlink(missing_ok=True)
        pipeline.env[LOG_ENV] = str(stage_log)
        before = load()
        proc = pipeline.run(
            sys.executable,
            "-m",
            "bench.measure",
            "--log",
            str(outer),
            "--label",
            label,
            "--",
            *pipeline.dvc_cmd,
            *args,
            timeout=TIMEOUT_S,
        )
        del proc
        record = json.loads(outer.read_text(encoding="utf-8").splitlines()[-1])
        record["stages"] = read_log(stage_log)
        record["command"] = "dvc " + " ".join(args)
        record["loadavg"] = {"before": before, "after": load()}
        return record


def stage_sum(stages: dict[str, dict[str, Any]], names: tuple[str, ...], key: str) -> float:
    return round(sum(stages[n][key] for n in names if n in stages), 3)


def work_units(stats: dict[str, Any]) -> dict[str, int]:
    """{"computed", "reused"} of one stage's work-cache stats file (ingest: per namespace; pack:
    units_computed / units_reused)."""
    if "units_computed" in stats or "units_reused" in stats:
        return {"computed": int(stats.get("units_computed", 0)), "reused": int(stats.get("units_reused", 0))}
    out = {"computed": 0, "reused": 0}
    for counters in (stats.get("namespaces") or {}).values():
        for k in out:
            out[k] += int(counters.get(k, 0))
    return out


def output_digests(root: Path) -> dict[str, str]:
    """md5 of every ingest, dedup and release output (shards from their wids indexes)."""
    import hashlib

    out: dict[str, str] = {}
    for top in ("data/interim", "data/dedup", "data/release"):
        for path in sorted((root / top).rglob("*")):
            if not path.is_file() or path.suffix == ".tar":
                continue
            rel = path.relative_to(root).as_posix()
            out[rel] = hashlib.md5(path.read_bytes()).hexdigest()
            if path.name.endswith(".index.json"):
                for shard in json.loads(path.read_text(encoding="utf-8"))["shardlist"]:
                    out[f"{path.parent.relative_to(root).as_posix()}/{shard['url']}"] = shard["md5sum"]
    return out


def shard_table(root: Path) -> dict[str, tuple[str, int]]:
    """Every shard of every product: path -> (md5, bytes), from the wids indexes pack wrote."""
    out = {}
    for index in sorted((root / "data" / "release").glob("*/*.index.json")):
        for shard in json.loads(index.read_text(encoding="utf-8"))["shardlist"]:
            out[f"{index.parent.name}/{shard['url']}"] = (shard["md5sum"], int(shard["filesize"]))
    return out


def rewritten(before: dict[str, tuple[str, int]], after: dict[str, tuple[str, int]]) -> dict[str, Any]:
    """Shards of `after` whose content no shard of `before` had: what `dvc push` uploads."""
    old = {md5 for md5, _ in before.values()}
    per: dict[str, dict[str, int]] = {}
    for name, (md5, size) in after.items():
        p = per.setdefault(
            name.split("/")[0], {"shards": 0, "bytes": 0, "shards_rewritten": 0, "bytes_rewritten": 0}
        )
        p["shards"] += 1
        p["bytes"] += size
        if md5 not in old:
            p["shards_rewritten"] += 1
            p["bytes_rewritten"] += size
    total = {
        k: sum(p[k] for p in per.values()) for k in ("shards", "bytes", "shards_rewritten", "bytes_rewritten")
    }
    total["fraction_bytes_rewritten"] = (
        round(total["bytes_rewritten"] / total["bytes"], 4) if total["bytes"] else 0.0
    )
    return {"total": total, "products": per}


def bump_snapshots(root: Path, value: str) -> None:
    params = root / "params.yaml"
    text, n = re.subn(r'(?m)^(    snapshot: )"[^"]*"', rf'\g<1>"{value}"', params.read_text(encoding="utf-8"))
    if n != len(SOURCES):
        raise SystemExit(f"{params}: expected {len(SOURCES)} sources.<s>.snapshot lines, found {n}")
    params.write_text(text, encoding="utf-8")


def refresh_ledgers(pipeline: Any) -> list[str]:
    """What stages.release_cut does before tagging: record split and pack ledgers of this build."""
    import yaml

    params = yaml.safe_load((pipeline.root / "params.yaml").read_text(encoding="utf-8"))
    done = ["python -m stages.split --update-ledger"]
    pipeline.run(sys.executable, "-m", "stages.split", "--update-ledger", timeout=TIMEOUT_S)
    for product, spec in sorted((params.get("products") or {}).items()):
        if (spec or {}).get("ledger"):
            pipeline.run(sys.executable, "-m", "stages.pack", product, "--update-ledger", timeout=TIMEOUT_S)
            done.append(f"python -m stages.pack {product} --update-ledger")
    return done


# --- the phases ----------------------------------------------------------------------------------------


def main_build(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    b = Build(workdir / "main", args.scale, args.jobs)
    r: dict[str, Any] = {"scale": args.scale, "jobs": args.jobs}
    log(f"generating the corpus at scale {args.scale}")
    r["generate"] = b.generate(args.scale, "generate")
    with b.project() as pipeline:
        root = pipeline.root
        r["headroom_before_build"] = parallel_headroom()
        log("full build: dvc repro")
        r["build"] = b.dvc(pipeline, "build", "repro")
        r["images"] = count_images(root / "data" / "raw")
        r["bytes"] = {
            "upstream": dir_bytes(b.upstream),
            "raw": dir_bytes(root / "data" / "raw"),
            "release": dir_bytes(root / "data" / "release"),
            "workdir": dir_bytes(b.workdir),
        }
        stages = r["build"]["stages"]
        r["pipeline_cpu_s"] = stage_sum(stages, WORK_STAGES, "cpu_s")
        r["pipeline_stage_wall_s"] = stage_sum(stages, WORK_STAGES, "wall_s")
        log(f"build done: {r['images']['total']} images, pipeline CPU {r['pipeline_cpu_s']:.0f}s")

        log("codec floor")
        floor = b.measured(
            "floor",
            [sys.executable, "-m", "bench.floor", "--root", str(root), "--out", str(b.logs / "floor.json")],
            root,
        )
        floor["detail"] = json.loads((b.logs / "floor.json").read_text(encoding="utf-8"))
        floor["command"] = "python -m bench.floor (in the built project)"
        r["floor"] = floor
        r["ratio"] = round(r["pipeline_cpu_s"] / floor["cpu_s"], 3) if floor["cpu_s"] else None

        if not args.skip_scaling:
            log("scaling: jobs=1, dvc repro -f -s <stage> for ingest..pack")
            digests = output_digests(root)
            Build.set_jobs(root, 1)
            r["headroom_before_jobs1"] = parallel_headroom()
            runs = {}
            # Without the work cache: a forced rerun must do the work again to be timed.
            pipeline.env["TIDEPOOL_CACHE"] = "0"
            for stage in WORK_STAGES:
                runs[stage] = b.dvc(pipeline, f"jobs1-{stage}", "repro", "-f", "-s", stage)
            del pipeline.env["TIDEPOOL_CACHE"]
            Build.set_jobs(root, args.jobs)
            jobs1 = {s: runs[s]["stages"][s] for s in WORK_STAGES if s in runs[s]["stages"]}
            after = output_digests(root)
            r["scaling"] = {
                "jobs1_stage_wall_s": stage_sum(jobs1, WORK_STAGES, "wall_s"),
                "jobs1_cpu_s": stage_sum(jobs1, WORK_STAGES, "cpu_s"),
                f"jobs{args.jobs}_stage_wall_s": r["pipeline_stage_wall_s"],
                "stages": {
                    s: {
                        "jobs1_wall_s": jobs1[s]["wall_s"],
                        "jobs1_cpu_s": jobs1[s]["cpu_s"],
                        f"jobs{args.jobs}_wall_s": stages[s]["wall_s"],
                        f"jobs{args.jobs}_cpu_s": stages[s]["cpu_s"],
                    }
                    for s in WORK_STAGES
                    if s in jobs1 and s in stages
                },
                "identical_outputs": digests == after,
                "differing_outputs": sorted(
                    k for k in set(digests) | set(after) if digests.get(k) != after.get(k)
                ),
                "command": "dvc repro -f -s <stage> per stage, jobs: 1 in params.yaml",
            }
            r["scaling"]["speedup"] = (
                round(r["scaling"]["jobs1_stage_wall_s"] / r["pipeline_stage_wall_s"], 3)
                if r["pipeline_stage_wall_s"]
                else None
            )

        if not args.skip_growth:
            log("growth: release ledgers, generator at scale x1.01, snapshot bump, dvc repro")
            r["growth"] = {"release_step": refresh_ledgers(pipeline)}
            before = shard_table(root)
            images_before = r["images"]["total"]
            grown = round(args.scale * GROWTH, 6)
            r["growth"]["generate"] = b.generate(grown, "generate-grown")
            seeded = pipeline.lb.reseed()
            # The overlay carries the upstream's published md5s (checksums.json), which growth changed.
            pipeline.lb.write_overlay(b.workdir / "endpoints.yaml")
            r["growth"]["reseeded"] = repr(seeded)
            bump_snapshots(root, "2099-01-01")
            stats_dir = Path(pipeline.env["TIDEPOOL_CACHE_DIR"]) / "stats"
            shutil.rmtree(stats_dir, ignore_errors=True)
            r["growth"]["repro"] = b.dvc(pipeline, "growth", "repro")
            r["growth"]["cache"] = {
                p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(stats_dir.glob("*.json"))
            }
            r["growth"]["cpu_vs_build"] = round(r["growth"]["repro"]["cpu_s"] / r["build"]["cpu_s"], 4)
            r["growth"]["images_after"] = count_images(root / "data" / "raw")
            r["growth"]["images_added"] = r["growth"]["images_after"]["total"] - images_before
            r["growth"]["shards"] = rewritten(before, shard_table(root))
            r["growth"]["wall_vs_build"] = round(r["growth"]["repro"]["wall_s"] / r["build"]["wall_s"], 3)
            r["growth"]["scale"] = grown
    r["bytes"]["workdir_end"] = dir_bytes(b.workdir)
    if not args.keep:
        shutil.rmtree(b.workdir, ignore_errors=True)
    return r


def rss_build(args: argparse.Namespace, workdir: Path, images: int, bytes_per_image: float) -> dict[str, Any]:
    """A build only, for peak RSS per stage at another size; skipped when the disk can't hold it."""
    scale = scale_for(images)
    need = bytes_per_image * images * 1.2
    free = shutil.disk_usage(workdir).free
    r: dict[str, Any] = {
        "images_requested": images,
        "scale": scale,
        "disk_needed_bytes": int(need),
        "disk_free_bytes": free,
    }
    if need > free:
        r["skipped"] = f"needs about {need / GiB:.0f} GiB of disk, {free / GiB:.0f} GiB free"
        return r
    b = Build(workdir / f"rss-{images}", scale, args.jobs)
    log(f"RSS build at {images} images (scale {scale})")
    r["generate"] = b.generate(scale, "generate")
    with b.project() as pipeline:
        r["build"] = b.dvc(pipeline, "build", "repro", "--no-commit")
        r["images"] = count_images(pipeline.root / "data" / "raw")
    if not args.keep:
        shutil.rmtree(b.workdir, ignore_errors=True)
    return r


# --- report ----------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fmt_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / MiB:.0f}"


def summary_rows(results: dict[str, Any]) -> list[list[str]]:
    m = results["main"]
    build, img, f = m["build"], m["images"], m["floor"]
    fd = f["detail"]
    rows = [["figure", "value", "target", "command"]]
    by_source = ", ".join(f"{s} {img[s]}" for s in SOURCES)
    rows.append(
        ["images decoded by the build", f"{img['total']} ({by_source})", "10k", m["generate"]["command"]]
    )
    rows.append(
        [
            "corpus generation",
            f"{m['generate']['wall_s']:.0f} s wall, {m['generate']['cpu_s']:.0f} CPU s",
            "",
            m["generate"]["command"],
        ]
    )
    rows.append(
        [
            "full build",
            f"{build['wall_s']:.0f} s wall, {build['cpu_s']:.0f} CPU s (DVC, fetch included)",
            "",
            "dvc repro, under python -m bench.measure",
        ]
    )
    rows.append(
        [
            "pipeline CPU ingest..pack",
            f"{m['pipeline_cpu_s']:.0f} CPU s",
            "",
            "sum over ingest@*, dedup, split, pack@* of the build",
        ]
    )
    rows.append(
        [
            "codec floor",
            f"{f['cpu_s']:.0f} CPU s: {fd['images']} images decoded once, "
            f"{fd['patches']} patches + {fd['whole_images']} images encoded "
            f"({fd['verified']['samples'] - fd['verified']['mismatched']}/{fd['verified']['samples']} "
            "checked equal to the shards)",
            "",
            f["command"],
        ]
    )
    rows.append(["pipeline CPU / codec floor", f"{m['ratio']:.3f}", "<= 1.3", "the two figures above"])
    if "scaling" in m:
        sc, j = m["scaling"], m["jobs"]
        gains = (
            m["headroom_before_build"]["throughput_ratio"],
            m["headroom_before_jobs1"]["throughput_ratio"],
        )
        headroom = f"{gains[0]:.2f}/{gains[1]:.2f}"
        rows.append(
            [
                f"wall ingest..pack, jobs={j}",
                f"{m['pipeline_stage_wall_s']:.0f} s",
                "",
                "dvc repro (sum of stage walls)",
            ]
        )
        rows.append(["wall ingest..pack, jobs=1", f"{sc['jobs1_stage_wall_s']:.0f} s", "", sc["command"]])
        rows.append(
            [f"speedup jobs={j} / jobs=1", f"{sc['speedup']:.2f}x", "scales", "the two figures above"]
        )
        rows.append(
            [
                "2nd process gain on this machine",
                f"{headroom}x (before the jobs={j} / jobs=1 runs)",
                "2.00x",
                "zlib in 1 vs 2 processes (bench.run parallel_headroom)",
            ]
        )
        same = "yes" if sc["identical_outputs"] else f"NO: {', '.join(sc['differing_outputs'][:3])}"
        rows.append(
            [f"outputs jobs=1 == jobs={j}", same, "yes", "md5 of data/interim, data/dedup, data/release"]
        )
    if "growth" in m:
        g = m["growth"]
        t = g["shards"]["total"]
        rows.append(
            [
                f"growth: +{g['images_added']} images (scale x{GROWTH})",
                f"{g['repro']['cpu_s']:.0f} CPU s = {g.get('cpu_vs_build', float('nan')):.3f} x the full "
                f"build's CPU ({g['repro']['wall_s']:.0f} s wall = {g['wall_vs_build']:.2f} x)",
                "<= 0.05",
                "refresh ledgers; samplegen at scale x1.01; bump sources.*.snapshot; dvc repro",
            ]
        )
        units = {stage: work_units(doc) for stage, doc in (g.get("cache") or {}).items()}
        computed = sum(u.get("computed", 0) for u in units.values())
        reused = sum(u.get("reused", 0) for u in units.values())
        rows.append(
            [
                "growth: work units recomputed / reused",
                f"{computed} / {reused} ("
                + ", ".join(
                    f"{s} {u.get('computed', 0)}/{u.get('reused', 0)}" for s, u in sorted(units.items())
                )
                + ")",
                "new and changed only",
                "the stages' work-cache stats (.tidepool-cache/stats)",
            ]
        )
        rows.append(
            [
                "growth: shard bytes rewritten",
                f"{100 * t['fraction_bytes_rewritten']:.1f}% "
                f"({t['shards_rewritten']}/{t['shards']} shards, "
                f"{_mib(t['bytes_rewritten'])}/{_mib(t['bytes'])} MiB)",
                "few",
                "md5 of every shard (wids indexes) before/after",
            ]
        )
    for r in results.get("rss", []):
        if "skipped" in r:
            rows.append(
                [f"peak RSS at {r['images_requested']} images", f"not run: {r['skipped']}", "< 1 GiB", ""]
            )
            continue
        st = r["build"]["stages"]
        peak = max((st[n]["max_rss_bytes"], n) for n in WORK_STAGES if n in st)
        rows.append(
            [
                f"peak RSS at {r['images']['total']} images",
                f"{_mib(peak[0])} MiB ({peak[1]})",
                "< 1 GiB, flat",
                "dvc repro --no-commit (per stage below)",
            ]
        )
    st = build["stages"]
    peak = max((st[n]["max_rss_bytes"], n) for n in WORK_STAGES if n in st)
    rows.append(
        [
            f"peak RSS at {img['total']} images",
            f"{_mib(peak[0])} MiB ({peak[1]})",
            "< 1 GiB, flat",
            "dvc repro (per stage below)",
        ]
    )
    trend = results.get("rss_trend")
    if trend:
        worst = max(trend["stages"].items(), key=lambda kv: kv[1]["predicted_bytes"])
        rows.append(
            [
                f"peak RSS at {trend['target_images']} images, extrapolated",
                f"{_mib(worst[1]['predicted_bytes'])} MiB ({worst[0]}; "
                f"+{worst[1]['mib_per_10k_images']:.0f} MiB per 10k images)",
                "< 1 GiB",
                f"linear through the builds at {trend['from_images']} images",
            ]
        )
    return rows


def rss_trend(results: dict[str, Any], target: int = 100_000) -> dict[str, Any] | None:
    """Per stage, peak RSS extrapolated linearly to `target` images from the smallest and largest build."""
    points = [(results["main"]["images"]["total"], results["main"]["build"]["stages"])]
    points += [(r["images"]["total"], r["build"]["stages"]) for r in results.get("rss", []) if "build" in r]
    points.sort(key=lambda p: p[0])
    if len(points) < 2 or points[-1][0] >= target or points[0][0] == points[-1][0]:
        return None
    (n0, s0), (n1, s1) = points[0], points[-1]
    stages = {}
    for name in WORK_STAGES:
        if name in s0 and name in s1:
            slope = (s1[name]["max_rss_bytes"] - s0[name]["max_rss_bytes"]) / (n1 - n0)
            stages[name] = {
                "mib_per_10k_images": round(slope * 10_000 / MiB, 1),
                "predicted_bytes": int(s1[name]["max_rss_bytes"] + slope * (target - n1)),
            }
    return {"target_images": target, "from_images": [n0, n1], "stages": stages}


def stage_rows(results: dict[str, Any]) -> list[list[str]]:
    m = results["main"]
    j = m["jobs"]
    st = m["build"]["stages"]
    sizes = [
        (f"RSS MiB @{r['images']['total']}", r["build"]["stages"])
        for r in results.get("rss", [])
        if "build" in r
    ]
    sizes.insert(0, (f"RSS MiB @{m['images']['total']}", st))
    sizes.sort(key=lambda x: int(x[0].split("@")[1]))
    jobs1 = m.get("scaling", {}).get("stages", {})
    head = ["stage", f"CPU s (jobs={j})", f"wall s (jobs={j})", "wall s (jobs=1)", *(s for s, _ in sizes)]
    rows = [head]
    for name in ("taxonomy", *(f"fetch@{s}" for s in SOURCES), *WORK_STAGES):
        if name not in st:
            continue
        w1 = jobs1.get(name, {}).get("jobs1_wall_s")
        rows.append(
            [
                name,
                f"{st[name]['cpu_s']:.1f}",
                f"{st[name]['wall_s']:.1f}",
                "" if w1 is None else f"{w1:.1f}",
                *(_mib(s[name]["max_rss_bytes"]) if name in s else "" for _, s in sizes),
            ]
        )
    return rows


def report(results: dict[str, Any]) -> str:
    return (
        fmt_table(summary_rows(results))
        + "\n\nper stage (each stage command of dvc.yaml run under `python -m bench.measure`: CPU of the "
        "stage and all its processes, peak RSS of the largest one)\n" + fmt_table(stage_rows(results))
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--images", type=int, default=None, help="corpus size in images (default 10000)")
    size.add_argument("--scale", type=float, default=None, help="generator scale instead of --images")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the scratch builds")
    parser.add_argument("--rss-images", type=int, nargs="*", default=[1000, 100_000])
    parser.add_argument("--skip-100k", action="store_true", help="drop --rss-images sizes of 100000 and more")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-growth", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results/bench.json"))
    args = parser.parse_args(argv)
    if args.scale is None:
        args.scale = scale_for(args.images or 10_000)
    rss_sizes = [n for n in args.rss_images if not (args.skip_100k and n >= 100_000)]

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="tidepool-bench-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    estimate = 1.3 * MiB * IMAGES_PER_SCALE * args.scale * 2.2
    if shutil.disk_usage(workdir).free < estimate:
        log(
            f"warning: {workdir} has {shutil.disk_usage(workdir).free / GiB:.0f} GiB free; "
            f"the build needs about {estimate / GiB:.0f} GiB"
        )
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_start": load(),
        },
        "workdir": str(workdir),
        "argv": sys.argv[1:] if argv is None else argv,
    }
    started = time.perf_counter()
    results["main"] = main_build(args, workdir)
    per_image = results["main"]["bytes"]["workdir_end"] / max(1, results["main"]["images"]["total"])
    results["rss"] = [rss_build(args, workdir, n, per_image) for n in rss_sizes]
    results["rss_trend"] = rss_trend(results)
    results["machine"]["loadavg_end"] = load()
    results["bench_wall_s"] = round(time.perf_counter() - started, 1)
    table = report(results)
    results["table"] = table.splitlines()
    write_json(args.out, results)
    print(table)
    print(f"\nwrote {args.out}")
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
