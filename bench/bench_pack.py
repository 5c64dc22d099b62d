"""pack: throughput against webdataset.ShardWriter and tarfile, and shard bytes rewritten by growth.

    python -m bench.bench_pack [--root .] [--products reef-points reef-images coast-seg inat2017]
                               [--jobs 2] [--growth 0.01] [--generator-scale 2] [--skip-throughput]
                               [--out bench/results/pack.json]

Inputs: a project root holding the ingest tables (`data/interim`), the raw data they point at and
the taxonomy snapshot, e.g. this repository after `make demo`. Dedup and split outputs are taken
from the root when present, else computed into a scratch copy with their own code. Shard sizes
are the product's params, or the demo sizes below when params.yaml has none.

Throughput, per product, on the same samples in the same order:
- `tidepool jobs=N` / `jobs=1`: `pack_product` end to end (decode, crop/resize, encode, write,
  index, manifest);
- `encode only`: the product's encoder, in-process, members kept in memory;
- writers on those pre-encoded members: `tidepool writer` (sample_bytes + TarWriter + the cut
  rule + md5), `webdataset.ShardWriter` (maxsize = target_bytes), `tarfile` (TarFile.addfile
  with fixed TarInfo, the same shard boundaries as ours: the I/O floor);
- `encode + ShardWriter`: the serial pipeline a script around ShardWriter would be.

Growth, per product (`--growth`): a fraction of the product's units (images for reef-points),
chosen by a hash of their key, is taken out of the ingest tables; the product is packed without
and with them (split assignments held fixed, as the split ledger holds them). Reported: bytes of
the grown build's shards whose content (sha256) the smaller build does not have, i.e. what `dvc
push` uploads, for the content-defined sharder as built, for a fixed-count sharder with the same
mean samples per shard on the same order (computed from the manifests), and for the content-
defined sharder with a generations ledger recorded from the smaller build.
`--generator-scale S` also runs the real chain (sample generator, loopback fetch, ingest, dedup,
split, pack) at scale S and S*1.01 and measures the same on those two builds.

Timings are wall-clock on a shared machine: read ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import io
import math
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from stages import dedup, split
from stages.config import load_params
from stages.fsutil import repo_root, write_json, write_parquet
from stages.ingest import ingest_source
from stages.pack import (
    KINDS,
    SPLITS,
    PackContext,
    pack_product,
    product_settings,
    record_generations,
    shard_order,
)
from stages.pack.sharding import (
    Cutter,
    ShardSizes,
    key_hashes,
    order_keys,
    plan,
    plan_fixed_count,
    rewritten,
    shard_contents,
)
from stages.pack.tarwriter import TarWriter, end_of_archive, sample_bytes

KiB, MiB = 1024, 1 << 20
PRODUCTS = ("reef-points", "reef-images", "coast-seg", "inat2017")
# Used when params.yaml sets no shard sizes: several shards per split at the demo's scale.
DEMO_SHARDS = {
    "reef-points": {"min_bytes": 4 * MiB, "target_bytes": 8 * MiB, "max_bytes": 24 * MiB},
    "reef-images": {"min_bytes": 256 * KiB, "target_bytes": 1 * MiB, "max_bytes": 4 * MiB},
    "coast-seg": {"min_bytes": 64 * KiB, "target_bytes": 256 * KiB, "max_bytes": 1 * MiB},
    "inat2017": {"min_bytes": 128 * KiB, "target_bytes": 384 * KiB, "max_bytes": 1536 * KiB},
}
SOURCES = ("mermaid", "coralnet", "coasttrain", "inat2017", "seatizen")


# --- roots ---------------------------------------------------------------------------------------


def scratch_root(src: Path, dest: Path, interim: Path | None = None) -> Path:
    """A project-shaped dir over `src`'s raw data, taxonomy and ingest tables (symlinks)."""
    (dest / "data").mkdir(parents=True, exist_ok=True)
    (dest / "dvc.yaml").write_text("stages: {}\n", encoding="utf-8")
    for name in ("raw", "taxonomy", "tables"):
        if (src / "data" / name).exists():
            (dest / "data" / name).symlink_to((src / "data" / name).resolve(), target_is_directory=True)
    (dest / "data" / "interim").symlink_to(
        (interim or src / "data" / "interim").resolve(), target_is_directory=True
    )
    return dest


def with_dedup_split(src: Path, root: Path, params: dict[str, Any]) -> None:
    """Dedup and split outputs in `root`: copied from `src` when it has them, else computed."""
    have = (src / "data" / "dedup" / "clusters.parquet").exists() and (
        src / "data" / "split" / "assignments.parquet"
    ).exists()
    if have:
        for stage in ("dedup", "split"):
            shutil.copytree(src / "data" / stage, root / "data" / stage)
    else:
        dedup.run(params, root)
        split.run(params, root)


def bench_params(params_path: Path, products: list[str], jobs: int) -> dict[str, Any]:
    params = load_params(params_path)
    params["jobs"] = jobs
    for name in products:
        spec = params["products"][name]
        spec.setdefault("shard", copy.deepcopy(DEMO_SHARDS[name]))
    return params


# --- throughput ----------------------------------------------------------------------------------


def members_of(key: str, data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data + end_of_archive(len(data)))) as tar:
        return {m.name[len(key) + 1 :]: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def encoded_units(
    params: dict[str, Any], root: Path, product: str
) -> tuple[list[tuple[str, str, list]], float]:
    """Every unit encoded in-process (jobs=1), in shard order; (split, unit key, [(key, members, bytes)])."""
    prod, settings = product_settings(params, product)
    module = importlib.import_module(KINDS[settings.kind])
    plan = module.plan(PackContext(params, prod, settings, root))
    out = []
    started = time.perf_counter()
    for split_name in SPLITS:
        for key in shard_order(plan.keys.get(split_name, []), {}):
            res = plan.encode(plan.make_unit(key, split_name))
            if res.error:
                raise SystemExit(res.error)
            out.append((split_name, key, [(s.key, s.data) for s in res.samples]))
    seconds = time.perf_counter() - started
    return [(sp, k, [(sk, members_of(sk, d), d) for sk, d in ss]) for sp, k, ss in out], seconds


def write_tidepool(units: list, out: Path, sizes: Any) -> None:
    shard = fh = writer = None
    current = None
    number = 0

    def close() -> None:
        nonlocal fh, writer
        if writer is not None:
            writer.close()
            fh.close()  # type: ignore[union-attr]
        fh = writer = None

    cutter = None
    for split_name, key, samples in units:
        if split_name != current:
            close()
            current, number, cutter = split_name, 0, Cutter(sizes)
        datas = [sample_bytes(k, m) for k, m, _ in samples]
        nbytes = sum(len(d) for d in datas)
        if cutter.before(nbytes):
            close()
        if writer is None:
            fh = open(out / f"{split_name}-{number:06d}.tar", "wb")  # noqa: SIM115
            writer = TarWriter(fh)
            number += 1
        for d in datas:
            writer.write_sample(d)
        if cutter.after(key_hashes(key)[1], nbytes):
            close()
    close()
    del shard


def write_shardwriter(units: list, out: Path, sizes: Any) -> None:
    for split_name in SPLITS:
        samples = [(k, m) for sp, _, ss in units if sp == split_name for k, m, _ in ss]
        if not samples:
            continue
        with wds.ShardWriter(
            str(out / f"{split_name}-%06d.tar"), maxcount=10**9, maxsize=sizes.target_bytes, verbose=0
        ) as sink:
            for key, members in samples:
                sink.write({"__key__": key, **members})


def write_tarfile(units: list, out: Path, sizes: Any) -> None:
    """Plain tarfile with fixed TarInfo and our boundaries: the cost of just getting bytes on disk."""
    tar = None
    current = None
    number = 0
    cutter = None
    for split_name, key, samples in units:
        if split_name != current:
            if tar is not None:
                tar.close()
                tar = None
            current, number, cutter = split_name, 0, Cutter(sizes)
        nbytes = sum(len(d) for _, _, d in samples)
        if cutter.before(nbytes) and tar is not None:
            tar.close()
            tar = None
        if tar is None:
            tar = tarfile.open(out / f"{split_name}-{number:06d}.tar", "w", format=tarfile.PAX_FORMAT)
            number += 1
        for k, members, _ in samples:
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{k}.{ext}")
                info.size, info.mtime, info.mode = len(members[ext]), 0, 0o644
                tar.addfile(info, io.BytesIO(members[ext]))
        if cutter.after(key_hashes(key)[1], nbytes):
            tar.close()
            tar = None
    if tar is not None:
        tar.close()


def timed(fn: Any, *args: Any) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def throughput(params: dict[str, Any], root: Path, product: str, jobs: int, tmp: Path) -> dict[str, Any]:
    _, settings = product_settings(params, product)
    rows: dict[str, Any] = {}
    for label, j in ((f"tidepool jobs={jobs}", jobs), ("tidepool jobs=1", 1)):
        out = tmp / f"{product}-pack-{j}"
        started = time.perf_counter()
        m = pack_product(params, product, root, out_dir=out, metrics_path=tmp / "m.json", jobs=j)
        rows[label] = {"seconds": time.perf_counter() - started, "samples": m["samples"], "bytes": m["bytes"]}
        shutil.rmtree(out)
    units, encode_s = encoded_units(params, root, product)
    n = sum(len(ss) for _, _, ss in units)
    payload = sum(len(d) for _, _, ss in units for _, _, d in ss)
    rows["encode only (jobs=1)"] = {"seconds": encode_s, "samples": n, "bytes": payload}
    for label, fn in (
        ("tidepool writer", write_tidepool),
        ("webdataset.ShardWriter", write_shardwriter),
        ("tarfile (I/O floor)", write_tarfile),
    ):
        out = tmp / f"{product}-{label.split()[0]}"
        out.mkdir()
        seconds = timed(fn, units, out, settings.shard)
        size = sum(p.stat().st_size for p in out.glob("*.tar"))
        rows[label] = {
            "seconds": seconds,
            "samples": n,
            "bytes": size,
            "shards": len(list(out.glob("*.tar"))),
        }
        shutil.rmtree(out)
    sw = rows["webdataset.ShardWriter"]
    rows["encode + ShardWriter (jobs=1)"] = {
        "seconds": encode_s + sw["seconds"],
        "samples": n,
        "bytes": sw["bytes"],
    }
    for r in rows.values():
        r["samples_per_s"] = r["samples"] / r["seconds"] if r["seconds"] else math.inf
        r["mb_per_s"] = r["bytes"] / MiB / r["seconds"] if r["seconds"] else math.inf
    return rows


# --- growth --------------------------------------------------------------------------------------


def digests(out: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size) for p in out.glob("*.tar")}


def rewritten_files(before: Path, after: Path) -> dict[str, Any]:
    old = {d for d, _ in digests(before).values()}
    new = digests(after)
    changed = [size for d, size in new.values() if d not in old]
    total = sum(size for _, size in new.values())
    return {
        "shards": len(new),
        "shards_rewritten": len(changed),
        "bytes": total,
        "bytes_rewritten": sum(changed),
        "fraction_bytes_rewritten": sum(changed) / total if total else 0.0,
    }


def manifest_samples(out: Path) -> dict[str, list[tuple[str, int]]]:
    per: dict[str, list[tuple[str, int]]] = {}
    for row in pq.read_table(out / "manifest.parquet", columns=["split", "key", "nbytes"]).to_pylist():
        per.setdefault(row["split"], []).append((row["key"], row["nbytes"]))
    return per


def manifest_samples_sizes(out: Path) -> list[list[tuple[str, int]]]:
    return list(manifest_samples(out).values())


def fixed_count_rewritten(before: Path, after: Path) -> dict[str, Any]:
    """A fixed-count sharder with the content-defined build's mean samples per shard, same orders."""
    old, new = manifest_samples(before), manifest_samples(after)
    shards_after = {s: len(list(after.glob(f"{s}-*.tar"))) for s in new}
    totals = {"shards": 0, "shards_rewritten": 0, "bytes": 0, "bytes_rewritten": 0}
    for split_name, a in new.items():
        per = max(1, round(len(a) / max(1, shards_after[split_name])))
        b = old.get(split_name, [])
        r = rewritten(
            shard_contents(b, plan_fixed_count(b, per)), shard_contents(a, plan_fixed_count(a, per))
        )
        for k in totals:
            totals[k] += r[k]
    totals["fraction_bytes_rewritten"] = (
        totals["bytes_rewritten"] / totals["bytes"] if totals["bytes"] else 0.0
    )
    return totals


def units_of(params: dict[str, Any], root: Path, product: str) -> list[str]:
    prod, settings = product_settings(params, product)
    plan = importlib.import_module(KINDS[settings.kind]).plan(PackContext(params, prod, settings, root))
    return sorted(k for keys in plan.keys.values() for k in keys)


def smaller_root(
    src_root: Path, tmp: Path, params: dict[str, Any], drop: set[str], sources: tuple[str, ...]
) -> Path:
    """`src_root` without the samples `drop` (split assignments and clusters filtered, not recomputed)."""
    interim = tmp / "interim"
    interim.mkdir(parents=True)
    for entry in (src_root / "data" / "interim").resolve().iterdir():
        if entry.name not in sources:
            (interim / entry.name).symlink_to(entry, target_is_directory=True)
            continue
        (interim / entry.name).mkdir()
        for f in entry.iterdir():
            if f.name in ("samples.parquet", "points.parquet"):
                t = pq.read_table(f)
                keep = pa.array([s not in drop for s in t.column("sample_id").to_pylist()], type=pa.bool_())
                write_parquet(interim / entry.name / f.name, t.filter(keep))
            else:
                (interim / entry.name / f.name).symlink_to(f, target_is_directory=f.is_dir())
    root = scratch_root(src_root, tmp / "root", interim)
    for stage, name in (("dedup", "clusters.parquet"), ("split", "assignments.parquet")):
        (root / "data" / stage).mkdir(parents=True)
        t = pq.read_table(src_root / "data" / stage / name)
        keep = pa.array([s not in drop for s in t.column("sample_id").to_pylist()], type=pa.bool_())
        write_parquet(root / "data" / stage / name, t.filter(keep))
    return root


def ledger_build(
    params: dict[str, Any], product: str, before_root: Path, after_root: Path, tmp: Path
) -> dict:
    """Pack with a generations ledger recorded from the smaller build, then the grown one."""
    p = copy.deepcopy(params)
    ledger = tmp / "ledger.parquet"
    p["products"][product]["ledger"] = str(ledger)
    before, after = tmp / "ledger-before", tmp / "ledger-after"
    pack_product(p, product, before_root, out_dir=before, metrics_path=tmp / "m.json")
    record_generations(p, product, before_root, out_dir=before)
    pack_product(p, product, after_root, out_dir=after, metrics_path=tmp / "m.json")
    return rewritten_files(before, after)


def growth_holdout(
    params: dict[str, Any], root: Path, product: str, fraction: float, tmp: Path
) -> dict[str, Any]:
    units = units_of(params, root, product)
    k = max(1, round(fraction * len(units)))
    drop = set(sorted(units, key=lambda u: key_hashes("growth:" + u)[1])[:k])
    sources = tuple(params["products"][product]["sources"])
    before_root = smaller_root(root, tmp / "smaller", params, drop, sources)
    before, after = tmp / "before", tmp / "after"
    pack_product(params, product, before_root, out_dir=before, metrics_path=tmp / "m.json")
    m = pack_product(params, product, root, out_dir=after, metrics_path=tmp / "m.json")
    out = {
        "units_before": len(units) - k,
        "units_added": k,
        "samples_after": m["samples"],
        "content_defined": rewritten_files(before, after),
        "fixed_count": fixed_count_rewritten(before, after),
        "content_defined_with_ledger": ledger_build(params, product, before_root, root, tmp),
    }
    n_shards = out["content_defined"]["shards"]
    out["expected_shards_touched"] = n_shards * (1 - math.exp(-k / n_shards)) if n_shards else 0.0
    return out


def build_corpus(scale: float, dest: Path, jobs: int) -> Path:
    """The real chain at `scale`: generate, serve on loopback, fetch, snapshot, ingest, dedup, split."""
    import os

    from stages.config import ENDPOINTS_ENV
    from stages.fetch import fetch
    from stages.ingest.context import IngestContext
    from stages.loopback import Loopback
    from stages.samplegen.__main__ import generate_all
    from stages.taxonomy import snapshot

    upstream = dest / "upstream"
    generate_all(upstream, scale=scale, jobs=jobs)
    root = dest / "project"
    (root / "data").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n", encoding="utf-8")
    shutil.copytree(repo_root() / "data" / "tables", root / "data" / "tables")
    saved = dict(os.environ)
    try:
        with Loopback(upstream=upstream) as lb:
            overlay = lb.write_overlay(dest / "endpoints.yaml")
            os.environ.update(lb.env(overlay))
            os.environ[ENDPOINTS_ENV] = str(overlay)
            params = load_params(repo_root() / "params.yaml")
            for source in SOURCES:
                fetch(source, params, root / "data" / "raw" / source, root / "data" / ".downloads" / source)
            snapshot(params, root / "data" / "taxonomy")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    params = load_params(repo_root() / "params.yaml")
    for source in SOURCES:
        ctx = IngestContext(
            source=source, params=params, root=root, raw_dir=root / "data" / "raw" / source,
            out_dir=root / "data" / "interim" / source, taxonomy_dir=root / "data" / "taxonomy",
            tables_dir=root / "data" / "tables", jobs=jobs,
        )  # fmt: skip
        ingest_source(ctx)
    dedup.run(params, root)
    split.run(params, root)
    return root


def growth_generator(
    params: dict[str, Any], scale: float, products: list[str], jobs: int, tmp: Path
) -> dict[str, Any]:
    small = build_corpus(scale, tmp / "gen-small", jobs)
    large = build_corpus(scale * 1.01, tmp / "gen-large", jobs)
    out: dict[str, Any] = {"scale": scale, "grown_scale": scale * 1.01}
    for product in products:
        before, after = tmp / f"gen-{product}-before", tmp / f"gen-{product}-after"
        mb = pack_product(params, product, small, out_dir=before, metrics_path=tmp / "m.json")
        ma = pack_product(params, product, large, out_dir=after, metrics_path=tmp / "m.json")
        out[product] = {
            "units_before": mb["units"],
            "units_after": ma["units"],
            "samples_before": mb["samples"],
            "samples_after": ma["samples"],
            "content_defined": rewritten_files(before, after),
            "fixed_count": fixed_count_rewritten(before, after),
            "content_defined_with_ledger": ledger_build(
                params, product, small, large, tmp / f"gen-{product}-l"
            ),
        }
    return out


def projection(sample_sizes: list[int], counts: list[int], growth: float) -> list[dict[str, Any]]:
    """The planner alone at production shard sizes (code defaults) on `counts` samples whose sizes
    cycle through `sample_sizes` (a real build's), before and after `growth` new samples: how the
    three sharders scale where the demo corpus is too small to show it."""
    sizes = ShardSizes()
    out = []
    for n in counts:
        total = round(n * (1 + growth))
        keys = [f"s{i:08d}" for i in range(total)]
        size_of = {k: sample_sizes[i % len(sample_sizes)] for i, k in enumerate(keys)}
        cut = growth / (1 + growth)
        new = {k for k in keys if key_hashes("new:" + k)[1] < cut}
        old_keys = [k for k in keys if k not in new]
        before = [(k, size_of[k]) for k in order_keys(old_keys)]
        after = [(k, size_of[k]) for k in order_keys(keys)]
        ledger = {k: 0 for k in old_keys}
        with_ledger = [(k, size_of[k]) for k in shard_order(keys, ledger)]
        old_cdc = shard_contents(before, plan(before, sizes))
        cdc = rewritten(old_cdc, shard_contents(after, plan(after, sizes)))
        per = max(1, len(before) // max(1, len(old_cdc)))
        fixed = rewritten(
            shard_contents(before, plan_fixed_count(before, per)),
            shard_contents(after, plan_fixed_count(after, per)),
        )
        led = rewritten(old_cdc, shard_contents(with_ledger, plan(with_ledger, sizes)))
        out.append(
            {
                "samples": n,
                "added": len(new),
                "shards": len(old_cdc),
                "content_defined": cdc,
                "fixed_count": fixed,
                "content_defined_with_ledger": led,
                "expected_shards_touched": len(old_cdc) * (1 - math.exp(-len(new) / len(old_cdc))),
            }
        )
    return out


# --- report --------------------------------------------------------------------------------------


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def growth_rows(name: str, g: dict[str, Any]) -> Iterator[list[str]]:
    for label, key in (("content-defined", "content_defined"), ("fixed-count", "fixed_count"),
                       ("content-defined + ledger", "content_defined_with_ledger")):  # fmt: skip
        r = g[key]
        yield [
            name,
            label,
            f"{r['shards_rewritten']}/{r['shards']}",
            f"{r['bytes_rewritten'] / MiB:.1f}/{r['bytes'] / MiB:.1f}",
            f"{100 * r['fraction_bytes_rewritten']:.1f}%",
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=repo_root())
    parser.add_argument("--params", type=Path, default=None, help="default <root>/params.yaml")
    parser.add_argument("--products", nargs="+", default=list(PRODUCTS), choices=PRODUCTS)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--growth", type=float, default=0.01)
    parser.add_argument("--generator-scale", type=float, default=None)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-holdout", action="store_true", help="skip the hold-out growth on --root")
    parser.add_argument(
        "--projection",
        type=int,
        nargs="*",
        default=[100_000, 1_000_000],
        help="sample counts for the planner-only projection at production shard sizes (reef-points sizes)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/pack.json"))
    parser.add_argument("--tmp", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args(argv)

    params = bench_params(args.params or args.root / "params.yaml", args.products, args.jobs)
    tmp = Path(tempfile.mkdtemp(prefix="bench-pack-", dir=args.tmp))
    results: dict[str, Any] = {"jobs": args.jobs, "growth_fraction": args.growth, "products": {}}
    try:
        root = scratch_root(args.root, tmp / "root")
        with_dedup_split(args.root, root, params)
        for product in args.products:
            entry: dict[str, Any] = {"shard": params["products"][product]["shard"]}
            if not args.skip_throughput:
                entry["throughput"] = throughput(params, root, product, args.jobs, tmp / f"tp-{product}")
            if not args.skip_holdout:
                entry["growth"] = growth_holdout(params, root, product, args.growth, tmp / f"gr-{product}")
            results["products"][product] = entry
            print(f"[{product} done]", file=sys.stderr, flush=True)
        if args.projection and "reef-points" in args.products and not args.skip_holdout:
            sizes = [n for _, n in sum(manifest_samples_sizes(tmp / "gr-reef-points" / "after"), [])]
            results["projection"] = projection(sizes, args.projection, args.growth)
        if args.generator_scale:
            results["generator_growth"] = growth_generator(
                params, args.generator_scale, args.products, args.jobs, tmp / "generator"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if not args.skip_throughput:
        rows = [["product", "method", "samples", "MiB", "seconds", "samples/s", "MiB/s"]]
        for product, entry in results["products"].items():
            for label, r in entry["throughput"].items():
                rows.append(
                    [
                        product,
                        label,
                        str(r["samples"]),
                        f"{r['bytes'] / MiB:.1f}",
                        f"{r['seconds']:.2f}",
                        f"{r['samples_per_s']:.0f}",
                        f"{r['mb_per_s']:.1f}",
                    ]
                )
        print(table(rows))
        print()
    rows = [["product", "sharder", "shards rewritten", "MiB rewritten/total", "bytes rewritten"]]
    for product, entry in results["products"].items():
        if "growth" not in entry:
            continue
        g = entry["growth"]
        rows += list(growth_rows(f"{product} (+{g['units_added']} of {g['units_before']} units)", g))
    print(table(rows))
    if "generator_growth" in results:
        gg = results["generator_growth"]
        print(f"\ngenerator growth: scale {gg['scale']} -> {gg['grown_scale']:.4g}")
        rows = [["product", "sharder", "shards rewritten", "MiB rewritten/total", "bytes rewritten"]]
        for product in args.products:
            g = gg[product]
            rows += list(growth_rows(f"{product} ({g['units_before']} -> {g['units_after']} units)", g))
        print(table(rows))
    if "projection" in results:
        print(
            "\nprojection: the planner at production shard sizes (64/256/512 MiB), reef-points sample sizes"
        )
        rows = [["product", "sharder", "shards rewritten", "MiB rewritten/total", "bytes rewritten"]]
        for p in results["projection"]:
            rows += list(growth_rows(f"{p['samples']} samples (+{p['added']})", p))
        print(table(rows))
    write_json(args.out, results)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
