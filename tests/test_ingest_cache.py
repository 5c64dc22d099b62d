"""Ingest costs what grew: probes are cached by the content they read, and a cached build gives the
bytes of a clean one. Counts come from the stats file the runner writes beside the cache."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import ingest_context

from stages.ingest import ingest_source, probe

TABLES = ("samples.parquet", "points.parquet", "quarantine.parquet")
# Sources on the record protocol, and how their probed input files are named in data/raw/<source>.
PORTED = {
    "mermaid": lambda key: key.endswith(".png") and not key.endswith("_thumbnail.png"),
    # Files directly in an export's images/ (the sample upstream references all of them).
    "coralnet": lambda key: key.count("/") == 2 and key.split("/")[1] == "images",
    # every file of images.zip but the raster mask and its colour table (an image and its mask
    # are one unit)
    "seatizen": lambda key: key.startswith("2024_dataset/")
    and not key.rsplit("/", 1)[-1].startswith("annotation_mask_")
    and not key.endswith("/color.txt"),
    "inat2017": lambda key: key.startswith("train_val_images/"),
    "coasttrain": lambda key: key.endswith(".npz"),
}


def _stats(cache: Path, source: str) -> dict:
    """Counters over every namespace of the stage (a plain image probe, an image with its mask)."""
    doc = json.loads((cache / "stats" / f"ingest@{source}.json").read_text())
    total: dict[str, int] = {}
    for counters in doc["namespaces"].values():
        for key, n in counters.items():
            total[key] = total.get(key, 0) + n
    return total


def _manifest(root: Path, source: str) -> dict[str, str]:
    with open(root / "data" / "raw" / source / "manifest.csv", newline="") as fh:
        return {r["key"]: r["md5"] for r in csv.DictReader(fh)}


def _tables(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in TABLES}


def _run(source: str, root: Path, out: Path) -> dict:
    return ingest_source(ingest_context(source, root, out_root=out))


@pytest.mark.parametrize("source", sorted(PORTED))
def test_growth_probes_exactly_the_new_images_and_equals_a_clean_build(
    source: str, fetched_root: Path, grown_fetched_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TIDEPOOL_CACHE_DIR", str(cache))
    _run(source, fetched_root, tmp_path / "small")
    first = _stats(cache, source)
    assert first.get("reused", 0) == 0 and first["computed"] > 0

    metrics = _run(source, grown_fetched_root, tmp_path / "grown")
    second = _stats(cache, source)
    small, grown = _manifest(fetched_root, source), _manifest(grown_fetched_root, source)
    is_image = PORTED[source]
    new = {k for k, md5 in grown.items() if is_image(k) and small.get(k) != md5}
    assert new, "the grown corpus adds images"
    # Every image probed in the small build is unchanged, so it is reused; only the new ones are
    # decoded (plus any the cache could not know: files absent upstream).
    assert second["reused"] == first["computed"]
    assert second["computed"] == len(new)
    assert second["items"] == second["reused"] + second["computed"] + second.get("uncached", 0)

    monkeypatch.setenv("TIDEPOOL_CACHE", "0")
    clean_metrics = _run(source, grown_fetched_root, tmp_path / "clean")
    assert _tables(tmp_path / "grown" / "data" / "interim" / source) == _tables(
        tmp_path / "clean" / "data" / "interim" / source
    )
    assert metrics == clean_metrics


def test_a_tampered_entry_is_recomputed_and_a_changed_image_is_seen(
    fetched_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TIDEPOOL_CACHE_DIR", str(cache))
    _run("mermaid", fetched_root, tmp_path / "a")
    entries = sorted((cache / probe.IMAGE_NAMESPACE).rglob("*"))
    entries = [p for p in entries if p.is_file()]
    data = bytearray(entries[0].read_bytes())
    data[-2] ^= 0xFF
    entries[0].write_bytes(bytes(data))
    entries[1].write_bytes(entries[1].read_bytes()[:50])
    _run("mermaid", fetched_root, tmp_path / "b")
    stats = _stats(cache, "mermaid")
    assert stats["corrupt"] == 2 and stats["computed"] == 2
    assert _tables(tmp_path / "a" / "data" / "interim" / "mermaid") == _tables(
        tmp_path / "b" / "data" / "interim" / "mermaid"
    )


def test_a_changed_setting_or_code_version_recomputes_every_probe(
    fetched_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TIDEPOOL_CACHE_DIR", str(cache))
    _run("mermaid", fetched_root, tmp_path / "a")
    n = _stats(cache, "mermaid")["computed"]

    ctx = ingest_context("mermaid", fetched_root, out_root=tmp_path / "b")
    params = {**ctx.params, "limits": {**ctx.params["limits"], "max_image_pixels": 10**8}}
    ingest_source(replace(ctx, params=params))
    assert _stats(cache, "mermaid")["computed"] == n and _stats(cache, "mermaid").get("reused", 0) == 0

    monkeypatch.setattr(probe, "_image_code", lambda: "another version of the probe code")
    _run("mermaid", fetched_root, tmp_path / "c")
    assert _stats(cache, "mermaid")["computed"] == n and _stats(cache, "mermaid").get("reused", 0) == 0

    monkeypatch.undo()
    monkeypatch.setenv("TIDEPOOL_CACHE_DIR", str(cache))
    _run("mermaid", fetched_root, tmp_path / "d")
    assert _stats(cache, "mermaid")["reused"] == n  # the first build's entries are still good


def test_an_image_rewritten_in_place_is_probed_again_whatever_the_manifest_says(
    fetched_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import shutil

    from PIL import Image

    root = tmp_path / "root"
    for part in ("raw/mermaid", "taxonomy", "tables"):
        shutil.copytree(fetched_root / "data" / part, root / "data" / part)
    (root / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.setenv("TIDEPOOL_CACHE_DIR", str(tmp_path / "cache"))
    _run("mermaid", root, root)
    png = next(p for p in sorted((root / "data/raw/mermaid").glob("*.png")) if "thumbnail" not in p.name)
    with Image.open(png) as img:
        flipped = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    flipped.save(png)  # the manifest still lists the old md5: the probe must not trust it
    _run("mermaid", root, root)
    assert _stats(tmp_path / "cache", "mermaid")["computed"] == 1
