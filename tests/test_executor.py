"""stages.executor: order, bounded look-ahead and failures of the local pool; the same ingest and pack
outputs, byte for byte, when the per-image work runs on a Dask distributed LocalCluster."""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ingest_context
from test_dedup import ingest_all
from test_pack_products import make_root, pack_params

from stages import dedup, split
from stages.errors import ConfigError, TidepoolError
from stages.executor import (
    SCHEDULER_ENV,
    effective_chunksize,
    executor_settings,
    parallel_map,
    preload_modules,
    resolve_jobs,
)
from stages.ingest import ingest_source
from stages.pack import pack_product

# --- work functions (module level: they are pickled by reference) -----------------------------------


def _jittered_square(x: int) -> int:
    # Later items often finish first (chunks of 1-3 on two workers), so order is really tested.
    time.sleep(((x * 7919) % 7) / 2000)
    return x * x


def _pid_and_value(x: int) -> tuple[int, int]:
    return os.getpid(), x


def _die(x: int) -> int:
    if x == 3:
        os._exit(7)  # a worker killed without a Python exception, as the OOM killer does
    return x


def _raise(x: int) -> int:
    if x == 2:
        raise ValueError(f"bad item {x}")
    return x


# --- local pool ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunksize", [1, 3, 16])
def test_results_come_back_in_input_order(chunksize: int):
    items = list(range(40))
    assert list(parallel_map(_jittered_square, items, jobs=2, chunksize=chunksize)) == [x * x for x in items]


def test_jobs_1_runs_inline_in_this_process():
    pids = {pid for pid, _ in parallel_map(_pid_and_value, range(5), jobs=1)}
    assert pids == {os.getpid()}


def test_jobs_2_runs_in_worker_processes():
    out = list(parallel_map(_pid_and_value, range(8), jobs=2, chunksize=1))
    assert [v for _, v in out] == list(range(8))
    assert os.getpid() not in {pid for pid, _ in out}


def test_a_generator_is_drawn_lazily_with_a_bounded_look_ahead():
    drawn: list[int] = []

    def items() -> Iterator[int]:
        for i in range(100):
            drawn.append(i)
            yield i

    results = parallel_map(_jittered_square, items(), jobs=2, chunksize=2, max_in_flight=3)
    first = next(results)
    # Three chunks of two are submitted before the first result is waited for; no more.
    assert first == 0 and len(drawn) == 6
    assert [first, *results] == [x * x for x in range(100)]


def test_short_inputs_are_cut_so_every_worker_gets_several_chunks():
    assert effective_chunksize(10, 2, 16) == 2
    assert effective_chunksize(1000, 2, 16) == 16
    assert effective_chunksize(None, 2, 16) == 16  # a generator: length unknown
    assert effective_chunksize(3, 4, 16) == 1


def test_empty_and_single_inputs():
    assert list(parallel_map(_jittered_square, [], jobs=2)) == []
    assert list(parallel_map(_jittered_square, [3], jobs=2)) == [9]


def test_the_forkserver_preloads_the_work_function_module():
    """Workers must start with the work function's module already imported by the forkserver.

    The probe module records the pid that imported it: a worker forked from a forkserver that
    preloaded it inherits the forkserver's pid, a worker that had to import it itself has its own.
    A fresh interpreter, because the preload only takes effect for a process's first pool.
    """
    import subprocess
    import sys

    tests = Path(__file__).resolve().parent
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import _preload_probe\n"
        "from stages.executor import parallel_map\n"
        "print(sorted(set(parallel_map(_preload_probe.where, range(8), jobs=2, chunksize=1))))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    proc = subprocess.run([sys.executable, "-c", script, str(tests)], cwd=tests.parent, env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    pairs = eval(proc.stdout.strip())  # noqa: S307 - our own script's printed list of int pairs
    assert len({worker for _, worker in pairs}) >= 1
    for imported_in, worker in pairs:
        assert imported_in != worker, "a worker imported the work function's module itself"
    assert preload_modules(_jittered_square)[:3] == ["__main__", "numpy", "PIL.Image"]


def test_a_worker_that_dies_is_a_clear_error_not_a_pool_traceback():
    with pytest.raises(TidepoolError, match=r"worker process running _die died abruptly.*smaller `jobs`"):
        list(parallel_map(_die, range(8), jobs=2, chunksize=1))


def test_an_exception_in_the_work_function_propagates():
    with pytest.raises(ValueError, match="bad item 2"):
        list(parallel_map(_raise, range(6), jobs=2, chunksize=1))


def test_executor_settings_from_params_and_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(SCHEDULER_ENV, raising=False)
    assert executor_settings({"jobs": 3, "executor": {"scheduler": None}}) == (3, None)
    assert executor_settings({"jobs": 0}) == (os.cpu_count() or 1, None)
    assert executor_settings({"jobs": 2, "executor": {"scheduler": "tcp://a:8786"}}) == (2, "tcp://a:8786")
    monkeypatch.setenv(SCHEDULER_ENV, "tcp://b:8786")
    assert executor_settings({"jobs": 2, "executor": {"scheduler": "tcp://a:8786"}}) == (2, "tcp://b:8786")
    assert resolve_jobs(None) == (os.cpu_count() or 1)


# --- Dask -------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:{port}", "not-an-address"])
def test_an_unreachable_scheduler_is_a_config_error_naming_it(address: str):
    import dask
    import distributed  # noqa: F401 - loads its config defaults before one of them is overridden

    address = address.format(port=_free_port())
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(ConfigError, match=f"cannot reach the Dask scheduler at '{address}'"):
            list(parallel_map(_jittered_square, range(4), jobs=2, scheduler=address))


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A two-worker distributed.LocalCluster of separate processes; yields its scheduler address."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as lc:
        yield lc.scheduler_address


def test_dask_results_come_back_in_input_order(cluster: str):
    items = list(range(50))
    out = list(parallel_map(_jittered_square, items, scheduler=cluster, chunksize=3))
    assert out == [x * x for x in items]
    pids = {pid for pid, _ in parallel_map(_pid_and_value, range(20), scheduler=cluster, chunksize=1)}
    assert os.getpid() not in pids


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_tree(local: Path, remote: Path) -> None:
    a, b = tree(local), tree(remote)
    assert sorted(a) == sorted(b)
    assert a, local
    different = [name for name in a if a[name] != b[name]]
    assert different == []


# Sources whose adapters call parallel_map with every kind of work function: image probes
# (mermaid PNGs, seatizen JPEGs), npz decoding (coasttrain) and mask rasterising (seatizen).
INGEST_SOURCES = ("mermaid", "coasttrain", "seatizen")


@pytest.mark.parametrize("source", INGEST_SOURCES)
def test_ingest_on_dask_equals_the_local_build_byte_for_byte(
    source: str, cluster: str, fetched_root: Path, tmp_path: Path
):
    outs = {}
    for name, scheduler in (("local", None), ("dask", cluster)):
        ctx = dataclasses.replace(ingest_context(source, fetched_root, tmp_path / name), scheduler=scheduler)
        outs[name] = (ctx.out_dir, ingest_source(ctx))
    assert outs["local"][1] == outs["dask"][1]
    assert_same_tree(outs["local"][0], outs["dask"][0])


@pytest.fixture(scope="module")
def pack_root(fetched_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    ingested = ingest_all(fetched_root, tmp_path_factory.getbasetemp() / "dedup-split-ingested")
    root = make_root(tmp_path_factory.mktemp("executor-pack"), fetched_root, ingested / "data" / "interim")
    params = pack_params()
    dedup.run(params, root)
    split.run(params, root)
    return root, params


@pytest.mark.parametrize("product", ["reef-points", "coast-seg"])
def test_pack_on_dask_equals_the_local_build_byte_for_byte(
    product: str, cluster: str, pack_root: tuple[Path, dict[str, Any]], tmp_path: Path
):
    root, params = pack_root
    metrics = {}
    for name, scheduler in (("local", None), ("dask", cluster)):
        metrics[name] = pack_product(
            params,
            product,
            root,
            out_dir=tmp_path / name / "release",
            metrics_path=tmp_path / name / "metrics.json",
            plots_dir=tmp_path / name / "plots",
            jobs=2,
            scheduler=scheduler,
        )
    assert metrics["local"]["samples"] > 0 and metrics["local"]["shards"] > 1
    assert_same_tree(tmp_path / "local", tmp_path / "dask")


# --- bench helpers: the measuring wrapper and the codec floor ---------------------------------------

ORPHAN = """
import subprocess, sys
# A grandchild that outlives this process (a new session: nobody waits for it) and holds 300 MiB,
# like a forkserver that exits after the stage process.
HOLD = "import time; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.5)"
subprocess.Popen([sys.executable, "-c", HOLD], start_new_session=True)
sys.exit(3)
"""


def test_measure_waits_for_orphaned_descendants_and_keeps_the_exit_status(tmp_path: Path):
    import json
    import subprocess
    import sys

    log = tmp_path / "log.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.measure", "--log", str(log), "--label", "orphan", "--",
         sys.executable, "-c", ORPHAN],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    record = json.loads(log.read_text())
    assert record["label"] == "orphan" and record["returncode"] == 3
    # Only the orphan ever held 300 MiB: its peak is in the record, so it was adopted and reaped.
    assert record["max_rss_bytes"] >= 300 << 20


@pytest.fixture(scope="module")
def packed_root(pack_root: tuple[Path, dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    root, params = pack_root
    for product in ("reef-points", "reef-images", "coast-seg", "inat2017"):
        pack_product(params, product, root, jobs=2)
    return root, params


def test_codec_floor_encodes_exactly_what_pack_wrote(packed_root: tuple[Path, dict[str, Any]]):
    from bench.floor import run_floor, shard_member, verify_samples
    from stages.pack import product_settings

    root, params = packed_root
    picks = verify_samples(root, params, 10_000)  # every sample of the products that re-encode
    keep = {r["key"] for rows in picks.values() for r in rows}
    summary, kept = run_floor(root, params, keep)
    assert summary["patches"] == len(picks["reef-points"]) > 0
    assert summary["hash_only_images"] > 0  # iNat: bytes copied, only the pHash decode counted
    for product, rows in picks.items():
        ext = product_settings(params, product)[1].image.ext
        for r in rows:
            member = shard_member(
                root / "data" / "release" / product / r["shard"], r["offset"], r["key"], ext
            )
            assert member is not None and member == kept[r["key"]], (product, r["key"])


@pytest.mark.slow
def test_make_bench_runs_end_to_end_on_a_tiny_corpus(tmp_path: Path):
    """`python -m bench.run` on a fresh clone: build, floor, jobs=1 rerun, growth, a second size."""
    import json
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--images", "60", "--rss-images", "90",
         "--workdir", str(tmp_path / "work"), "--out", str(out)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    main = results["main"]
    assert main["images"]["total"] > 0 and main["ratio"] > 0
    assert main["floor"]["detail"]["verified"]["mismatched"] == 0
    assert main["scaling"]["identical_outputs"], main["scaling"]["differing_outputs"]
    from bench.run import work_units

    growth = main["growth"]
    shards = growth["shards"]["total"]
    assert growth["images_added"] > 0  # the generator at a larger scale really added images
    assert 0 < shards["shards_rewritten"] < shards["shards"]  # some shards change, not all
    # The rebuild after growth takes unchanged work from the cache: every ingest and pack stage
    # reused units, and ingest decoded no more units than there are new images.
    units = {stage: work_units(doc) for stage, doc in growth["cache"].items()}
    ingest = {s: u for s, u in units.items() if s.startswith("ingest@")}
    pack = {s: u for s, u in units.items() if s.startswith("pack@")}
    sources = ("mermaid", "coralnet", "coasttrain", "inat2017", "seatizen")
    # (a source that did not grow leaves its fetch output unchanged, and DVC skips its ingest)
    assert ingest and set(ingest) <= {f"ingest@{s}" for s in sources} and pack
    assert all(u["reused"] > 0 for u in [*ingest.values(), *pack.values()]), units
    assert 0 < sum(u["computed"] for u in ingest.values()) <= growth["images_added"], units
    assert results["rss"][0]["build"]["stages"]["pack@reef-points"]["max_rss_bytes"] > 0
    assert "pipeline CPU / codec floor" in proc.stdout and "dvc repro" in proc.stdout
    assert not (tmp_path / "work" / "main").exists()  # scratch builds are removed unless --keep
