"""Dataset card, Croissant JSON-LD and plot data for a small product written the way pack writes one."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from stages import card
from stages.errors import TidepoolError, UpstreamFormatError
from stages.fsutil import write_json
from stages.pack.index import MANIFEST_SCHEMA, ShardInfo, wids_index
from stages.pack.tarwriter import TarWriter, sample_bytes

SPLITS = ("train", "val", "test")
CLASSES = ["Acropora", "Sand", "Turf algae", "Porites"]  # Porites never occurs
# (key, split, class, source); no val sample, so val has no shard
SAMPLES = [
    ("mermaid-p1", "train", "Acropora", "mermaid"),
    ("mermaid-p2", "train", "Sand", "mermaid"),
    ("coralnet-p3", "train", "Sand", "coralnet"),
    ("mermaid-p4", "train", "Turf algae", "mermaid"),
    ("coralnet-p5", "test", "Sand", "coralnet"),
    ("mermaid-p6", "test", "Acropora", "mermaid"),
]
NC_SA = "CC-BY-NC-SA-4.0"
SOURCES = {
    "coralnet": {"license": NC_SA, "attribution": "CoralNet contributors", "redistributable": True},
    "mermaid": {"license": NC_SA, "attribution": "MERMAID contributors", "redistributable": True},
}


def png(seed: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (seed * 40 % 256, 80, 120)).save(buf, "PNG")
    return buf.getvalue()


def make_product(folder: Path, sources: dict[str, Any] = SOURCES, name: str = "reef-points") -> Path:
    """A product folder as pack leaves it: shards, indexes, manifest, classes.json, product.json."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, infos = [], {s: [] for s in SPLITS}
    for split in SPLITS:
        mine = [s for s in SAMPLES if s[1] == split]
        if not mine:
            continue
        shard = f"{split}-000000.tar"
        with open(folder / shard, "wb") as fh:
            tar = TarWriter(fh)
            for i, (key, _, cls, source) in enumerate(mine):
                meta = json.dumps({"class": cls, "source": source}).encode()
                offset = tar.write_sample(
                    sample_bytes(key, {"png": png(i), "json": meta, "cls": str(CLASSES.index(cls)).encode()})
                )
                rows.append({"key": key, "sample_id": key, "point_id": key, "split": split, "shard": shard,
                             "position": i, "offset": offset, "nbytes": 0, "source": source,
                             "license": sources[source]["license"], "cls": CLASSES.index(cls), "label": cls,
                             "labels": json.dumps({"benthic_attribute_name": cls})})  # fmt: skip
            md5 = tar.close()
        infos[split].append(ShardInfo(shard, len(mine), (folder / shard).stat().st_size, md5))
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), folder / "manifest.parquet")
    for split in SPLITS:
        write_json(folder / f"{split}.index.json", wids_index(name, split, infos[split]))
    counts = Counter((s[1], s[2]) for s in SAMPLES)
    entries = [
        {"index": i, "name": c, "count": {s: counts[(s, c)] for s in SPLITS}} for i, c in enumerate(CLASSES)
    ]
    classes = {"level": "attribute", "num_classes": len(CLASSES), "classes": entries}
    write_json(folder / "classes.json", classes)
    splits = {
        s: {"samples": len([x for x in SAMPLES if x[1] == s]), "shards": len(infos[s]),
            "bytes": sum(i.filesize for i in infos[s]), "units": 0, "index": f"{s}.index.json"}
        for s in SPLITS
    }  # fmt: skip
    write_json(
        folder / "product.json",
        {"product": name, "kind": "reef-points", "sources": sources,
         "redistributable": all(v["redistributable"] for v in sources.values()),
         "licenses": sorted({v["license"] for v in sources.values()}),
         "fields": {"png": "the patch", "json": "labels", "cls": "class index"},
         "splits": splits, "params": {"dedup": "all", "sources": sorted(sources)}},
    )  # fmt: skip
    return folder


def make_root(root: Path) -> Path:
    """Quarantine tables and dedup clusters for the card's summary."""
    quarantined = {
        "mermaid": [("point", "a", "point_outside_image"), ("image", "b", "corrupt_image")],
        "coralnet": [("annotation_row", "c", "unmapped_label")],
    }
    for source, rows in quarantined.items():
        folder = root / "data" / "interim" / source
        folder.mkdir(parents=True)
        pq.write_table(
            pa.table({"record_kind": [r[0] for r in rows], "record_id": [r[1] for r in rows],
                      "reason": [r[2] for r in rows]}),
            folder / "quarantine.parquet",
        )  # fmt: skip
    (root / "data" / "dedup").mkdir(parents=True)
    pq.write_table(
        pa.table({"cluster_id": ["m1", "m1", "s9", "s9"], "sample_id": ["m1", "c7", "s9", "s10"],
                  "source": ["mermaid", "coralnet", "seatizen", "seatizen"]}),
        root / "data" / "dedup" / "clusters.parquet",
    )  # fmt: skip
    return root


PARAMS = {
    "split": {"salt": "tidepool-split-v1", "ratios": {"train": 0.8, "val": 0.1, "test": 0.1},
              "group_by": {"mermaid": [], "coralnet": []}, "ledger": "data/ledger/splits.parquet"},
    "release": {"repo_url": "https://example.org/tidepool"},
}  # fmt: skip


@pytest.fixture
def written(tmp_path: Path) -> dict[str, Any]:
    root = make_root(tmp_path)
    folder = make_product(root / "data" / "release" / "reef-points")
    plots = root / "metrics" / "plots" / "classes" / "reef-points"
    metrics = {"skipped": {"no_kept_points": 2}}
    paths = card.write_docs(folder, root, PARAMS, metrics, plots)
    return {"root": root, "folder": folder, "plots": plots, "paths": paths}


def header_and_body(text: str) -> tuple[dict[str, Any], str]:
    assert text.startswith("---\n")
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def test_card_has_the_hf_header_and_every_section(written):
    folder = written["folder"]
    assert [p.name for p in written["paths"][:2]] == ["README.md", "croissant.json"]
    header, body = header_and_body((folder / "README.md").read_text())
    assert header["license"] == "cc-by-nc-sa-4.0"  # one known licence across sources
    assert header["task_categories"] == ["image-classification"]
    assert header["size_categories"] == ["n<1K"]
    assert header["pretty_name"] == "tidepool reef-points"
    # val has no shard: a config that names files which do not exist would break HF's loader.
    assert header["configs"] == [
        {"config_name": "default",
         "data_files": [{"split": "train", "path": "train-*.tar"}, {"split": "test", "path": "test-*.tar"}]}
    ]  # fmt: skip
    for section in ("## Sources and licences", "## Contents", "## Classes", "## Deduplication and quarantine",
                    "## Split method", "## How to load"):  # fmt: skip
        assert section in body, section
    assert "| mermaid | CC-BY-NC-SA-4.0 | MERMAID contributors | yes | 4 |" in body
    assert "| train | 4 | 1 |" in body and "| val | 0 | 0 | 0 B |" in body
    assert "| Sand | 2 | 0 | 1 |" in body and "Porites" not in body.split("## Classes")[1].split("##")[0]
    assert "| mermaid | point: point_outside_image | 1 |" in body
    assert "| coralnet | annotation_row: unmapped_label | 1 |" in body
    assert "| no_kept_points | 2 |" in body
    assert "1 clusters touch this product's sources" in body  # m1 (mermaid + coralnet); s9 is seatizen only
    assert "salt `tidepool-split-v1`" in body
    assert "dvc import https://example.org/tidepool data/release/reef-points --rev vX.Y.Z" in body
    assert 'sample["png"]' in body


def test_croissant_lists_every_shard_with_its_sha256(written):
    folder = written["folder"]
    doc = json.loads((folder / "croissant.json").read_text())
    assert doc["conformsTo"] == "http://mlcommons.org/croissant/1.1"
    assert doc["@context"]["cr"] == "http://mlcommons.org/croissant/"
    assert doc["license"] == ["https://creativecommons.org/licenses/by-nc-sa/4.0/"]
    assert "MERMAID contributors" in doc["citeAs"] and doc["citeAs"].startswith("@misc{")
    files = {d["@id"]: d for d in doc["distribution"] if d["@type"] == "cr:FileObject"}
    tars = sorted(folder.glob("*.tar"))
    assert {n for n in files if n.endswith(".tar")} == {t.name for t in tars}
    for path in [*tars, folder / "manifest.parquet", folder / "classes.json"]:
        assert files[path.name]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert files[path.name]["contentSize"] == f"{path.stat().st_size} B"
    sets = {d["@id"]: d for d in doc["distribution"] if d["@type"] == "cr:FileSet"}
    assert set(sets) == {"members-cls", "members-json", "members-png"}
    assert sets["members-png"]["encodingFormat"] == "image/png"
    record_sets = [r["@id"] for r in doc["recordSet"]]
    assert record_sets == ["splits", "samples", "member-cls", "member-json", "member-png"]
    sample_fields = [f["name"] for f in doc["recordSet"][1]["field"]]
    assert sample_fields == MANIFEST_SCHEMA.names


def test_plot_data_per_split_matches_the_class_map(written):
    plots = written["plots"]
    assert sorted(p.name for p in plots.iterdir()) == ["test.csv", "train.csv", "val.csv"]
    train = plots.joinpath("train.csv").read_text().splitlines()
    assert train == ["class,count", "Acropora,1", "Sand,2", "Turf algae,1"]  # class-map order; Porites absent
    assert plots.joinpath("val.csv").read_text().splitlines()[1:] == ["Acropora,0", "Sand,0", "Turf algae,0"]


def test_outputs_are_deterministic_and_location_independent(written, tmp_path):
    folder = written["folder"]
    before = {p.name: p.read_bytes() for p in written["paths"]}
    card.write_docs(folder, written["root"], PARAMS, {"skipped": {"no_kept_points": 2}}, written["plots"])
    assert {p.name: p.read_bytes() for p in written["paths"]} == before
    moved = tmp_path / "elsewhere" / "reef-points"
    shutil.copytree(folder, moved)
    card.write_docs(moved, written["root"], PARAMS, {"skipped": {"no_kept_points": 2}})
    assert (moved / "croissant.json").read_bytes() == (folder / "croissant.json").read_bytes()
    assert (moved / "README.md").read_bytes() == (folder / "README.md").read_bytes()


def test_non_redistributable_and_mixed_licences(tmp_path):
    sources = {
        "inat2017": {"license": "research only", "attribution": "Van Horn et al.", "redistributable": False},
        "mermaid": {"license": NC_SA, "attribution": "MERMAID contributors", "redistributable": True},
    }
    folder = make_product(tmp_path / "p", sources={**sources, "coralnet": {**sources["mermaid"]}})
    card.write_docs(folder)
    header, body = header_and_body((folder / "README.md").read_text())
    assert header["license"] == "other"
    assert header["license_name"] == "tidepool-reef-points-combined-source-terms"
    assert "not-redistributable" in header["tags"]
    assert "**Not redistributable.**" in body
    assert "| inat2017 | research only | Van Horn et al. | **no** |" in body
    doc = json.loads((folder / "croissant.json").read_text())
    assert "Not redistributable" in doc["description"]
    assert doc["license"] == ["https://creativecommons.org/licenses/by-nc-sa/4.0/", "research only"]


def test_missing_or_inconsistent_inputs_fail_naming_the_file(tmp_path):
    folder = make_product(tmp_path / "p")
    (folder / "test-000000.tar").unlink()
    with pytest.raises(UpstreamFormatError, match="test.index.json: lists test-000000.tar, which is missing"):
        card.write_docs(folder)
    (folder / "product.json").unlink()
    with pytest.raises(TidepoolError, match="product.json: missing"):
        card.write_docs(folder)


def test_mlcroissant_validates_and_loads_the_records(written, tmp_path):
    mlc = pytest.importorskip("mlcroissant", reason="mlcroissant is not installed (see requirements.txt)")
    folder = written["folder"]
    dataset = mlc.Dataset(str(folder / "croissant.json"))  # raises ValidationError on any error
    assert dataset.metadata.name == "tidepool-reef-points"
    # Loading records extracts the tars into mlcroissant's cache: give it a private one, in a child
    # process because mlcroissant reads CROISSANT_CACHE once, at import.
    script = """
import json, sys, mlcroissant as mlc
ds = mlc.Dataset(sys.argv[1])
out = {rs: [{k: (v.decode() if isinstance(v, bytes) else getattr(v, "size", v)) for k, v in r.items()}
            for r in ds.records(rs)] for rs in ("splits", "samples", "member-png", "member-cls")}
print(json.dumps(out, default=list))
"""
    env = {**os.environ, "CROISSANT_CACHE": str(tmp_path / "croissant-cache")}
    proc = subprocess.run([sys.executable, "-c", script, str(folder / "croissant.json")],
                          capture_output=True, text=True, env=env, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["splits/name"] for r in records["splits"]] == list(SPLITS)
    keys = sorted(s[0] for s in SAMPLES)
    assert sorted(r["samples/key"] for r in records["samples"]) == keys
    assert sorted(r["member-png/key"] for r in records["member-png"]) == keys
    assert all(r["member-png/content"] == [8, 8] for r in records["member-png"])
    by_key = {r["member-cls/key"]: r["member-cls/content"] for r in records["member-cls"]}
    assert by_key == {s[0]: str(CLASSES.index(s[2])) for s in SAMPLES}
