"""Dataset card, Croissant JSON-LD and plot data for a small product written the way pack writes one."""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from stages import card
from stages.card.croissant import content_url, member_globs
from stages.card.features import TypeNode, feature, member_features
from stages.card.licences import header_licence, headline, terms_of
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
    plots = root / "metrics" / "plots" / "classes" / "reef-points.csv"
    metrics = {"skipped": {"no_kept_points": 2}}
    paths = card.write_docs(folder, root, PARAMS, metrics, plots)
    return {"root": root, "folder": folder, "plots": plots, "paths": paths}


def header_and_body(text: str) -> tuple[dict[str, Any], str]:
    assert text.startswith("---\n")
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body




def test_card_has_the_hf_header_and_every_section(written):
    folder = written["folder"]
    assert [p.name for p in written["paths"][:3]] == ["README.md", "croissant.json", "examples.png"]
    header, body = header_and_body((folder / "README.md").read_text())
    assert header["license"] == "cc-by-nc-sa-4.0"  # one SPDX licence across sources
    assert "license_name" not in header
    assert header["task_categories"] == ["image-classification"]
    assert header["size_categories"] == ["n<1K"]
    assert header["pretty_name"] == "tidepool reef-points"
    # val has no shard: a config that names files which do not exist would break HF's loader.
    assert header["configs"] == [
        {"config_name": "default",
         "data_files": [{"split": "train", "path": "train-*.tar"}, {"split": "test", "path": "test-*.tar"}]}
    ]  # fmt: skip
    info = header["dataset_info"]
    assert set(info) == {"config_name", "features"}  # HF wants num_bytes with splits: none is known here
    assert [f["name"] for f in info["features"]] == ["cls", "json", "png", "__key__", "__url__"]
    json_struct = [{"name": "class", "dtype": "string"}, {"name": "source", "dtype": "string"}]
    assert info["features"][1] == {"name": "json", "struct": json_struct}
    sections = ["## Licence", "## Contents", "## Split quality", "## Classes", "## Structure", "## Fields",
                "## How to load", "## Deduplication and quarantine", "## Split method", "## Limitations",
                "## Citation"]  # fmt: skip
    assert [line for line in body.splitlines() if line.startswith("## ")] == sections
    assert "> **Non-commercial use only**: coralnet (CC-BY-NC-SA-4.0), mermaid (CC-BY-NC-SA-4.0)" in body
    assert ("| mermaid | `CC-BY-NC-SA-4.0` | [terms](https://creativecommons.org/licenses/by-nc-sa/4.0/) | "
            "MERMAID contributors | yes | 4 |") in body  # fmt: skip
    assert "| train | 4 | 1 |" in body and "| val | 0 | 0 | 0 B |" in body
    assert "> **Warning:** The **val** split is empty: no sample was assigned to it." in body
    assert "1 of 3 classes have no **test** sample: Turf algae." in body  # Porites has no sample at all
    assert "| mermaid | image and duplicate cluster only |" in body
    assert "| Sand | 2 | 0 | 1 |" in body and "Porites" not in body.split("## Classes")[1].split("##")[0]
    assert "| `png` | image | the patch | 6 of 6 |" in body and "| `class` | string |" in body
    assert "| mermaid | point: point_outside_image | 1 |" in body
    assert "| coralnet | annotation_row: unmapped_label | 1 |" in body
    assert "| no_kept_points | 2 |" in body
    assert "1 clusters touch this product's sources" in body  # m1 (mermaid + coralnet); s9 is seatizen only
    assert "salt `tidepool-split-v1`" in body
    assert "dvc import https://example.org/tidepool data/release/reef-points --rev vX.Y.Z" in body
    assert 'sample["png"]' in body and "![Examples" in body and "(viewer/index.html)" in body
    citation = body.split("## Citation")[1]
    assert "@misc{tidepool_reef_points," in citation
    assert "@inproceedings{coralnet," in citation and "@misc{mermaid," in citation


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
        # contentUrl resolves to the file from the product folder, through the cache-key folder
        assert (folder / files[path.name]["contentUrl"]).resolve() == path.resolve()
    sets = {d["@id"]: d for d in doc["distribution"] if d["@type"] == "cr:FileSet"}
    assert set(sets) == {"members-cls", "members-json", "members-png"}
    assert sets["members-png"]["encodingFormat"] == "image/png"
    assert sets["members-png"]["includes"] == ["*.png"]  # no longer member: nothing to exclude
    record_sets = [r["@id"] for r in doc["recordSet"]]
    assert record_sets == ["splits", "samples", "member-cls", "member-json", "member-png"]
    sample_fields = [f["name"] for f in doc["recordSet"][1]["field"]]
    assert sample_fields == MANIFEST_SCHEMA.names


def test_shard_content_urls_differ_between_products_and_releases(written, tmp_path):
    folder = written["folder"]
    info = card.gather(folder)
    url = content_url(info, "train-000000.tar")
    assert url.startswith("croissant/reef-points-") and url.endswith("/../../train-000000.tar")
    assert (folder / url).resolve() == (folder / "train-000000.tar").resolve()
    other = make_product(tmp_path / "other" / "coast-seg", name="coast-seg")
    assert content_url(card.gather(other), "train-000000.tar") != url  # another product
    changed = tmp_path / "v2" / "reef-points"
    shutil.copytree(folder, changed)
    with open(changed / "test-000000.tar", "ab") as fh:  # a later release: other shard bytes
        fh.write(b"\0" * 512)
    assert content_url(card.gather(changed), "train-000000.tar") != url
    # The folder the URLs pass through exists, says why, and earlier builds' folders are removed.
    readme = folder / info.digest.join(("croissant/reef-points-", "/README.md"))
    assert "contentUrl" in readme.read_text()
    card.write_docs(changed)
    digest = card.gather(changed).digest
    assert [p.name for p in (changed / "croissant").iterdir()] == [f"reef-points-{digest}"]


@pytest.mark.parametrize(
    ("ext", "members", "matches", "rejects"),
    [
        ("png", ["json", "png", "seg.png"], ["k.png", "a-b_c.png", "seg.png", "eg.png", "xseg.png"],
         ["k.seg.png", "seg.seg.png", "k.json", "k.png.json"]),
        ("seg.png", ["json", "png", "seg.png"], ["k.seg.png"], ["k.png", "k.json"]),
        ("jpg", ["jpg", "json"], ["k.jpg"], ["k.json"]),
        ("png", ["a.png", "ba.png", "png"], ["k.png", "b.png", "a.png", "k.xa.png"],
         ["k.a.png", "k.ba.png"]),
    ],
)  # fmt: skip
def test_member_globs_take_exactly_one_extension(ext, members, matches, rejects):
    globs = member_globs(ext, members)

    def hit(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, g) for g in globs)

    assert [n for n in matches if not hit(n)] == []
    assert [n for n in rejects if hit(n)] == []


def test_features_follow_the_types_of_every_sample():
    node = TypeNode()
    docs = [
        {"lat": None, "n": 1, "x": 1, "flag": True, "tags": [], "name": "a", "mixed": 1,
         "by_id": {"3de1e929-1b0b": 1}, "nested": {"a": 1}, "always_null": None},
        {"lat": 1.5, "n": 2, "x": 2.5, "flag": False, "tags": ["t"], "name": "b", "mixed": "one",
         "by_id": {"49c0b8cd-2be0": 2}, "nested": {"b": [1, 2]}, "always_null": None},
    ]  # fmt: skip
    for doc in docs:
        node.add(doc)
    spec = {f["name"]: {k: v for k, v in f.items() if k != "name"} for f in feature(node)["struct"]}
    assert spec["lat"] == {"dtype": "float64"}  # null in the first sample, a float later
    assert spec["n"] == {"dtype": "int64"}
    assert spec["x"] == {"dtype": "float64"}  # int and float: float
    assert spec["flag"] == {"dtype": "bool"}
    assert spec["tags"] == {"list": "string"}
    assert spec["mixed"] == {"dtype": "json"}  # conflicting types load as written
    assert spec["by_id"] == {"dtype": "json"}  # keys that are data: a map, not a struct
    assert spec["always_null"] == {"dtype": "json"}
    assert spec["nested"] == {"struct": [{"name": "a", "dtype": "int64"}, {"name": "b", "list": "int64"}]}
    datasets = pytest.importorskip("datasets", reason="datasets is not installed (see requirements.txt)")
    features = datasets.Features._from_yaml_list(member_features(["cls", "json", "seg.png", "webp"], node))
    assert isinstance(features["seg.png"], datasets.Image) and isinstance(features["webp"], datasets.Image)
    assert features["cls"] == datasets.Value("int64") and isinstance(features["json"]["mixed"], datasets.Json)


def test_licences_per_product():
    coast = terms_of("Public domain (USGS)")
    assert (coast.spdx, coast.hf, coast.slug) == (None, "other", "us-public-domain")
    assert coast.url.startswith("https://www.usgs.gov/")
    seatizen = terms_of("CC-BY-4.0 (unverified: as listed on Zenodo record 13951614)")
    assert (seatizen.spdx, seatizen.hf) == ("CC-BY-4.0", "cc-by-4.0")
    assert terms_of("CoralNet source terms (per source)").slug == "coralnet-source-terms"
    assert terms_of("x", override_url="https://example.org/terms").url == "https://example.org/terms"

    def info(sources: dict[str, Any]) -> card.ReleaseInfo:
        product = {"product": "p", "sources": sources, "redistributable": all(
            v.get("redistributable", True) for v in sources.values())}  # fmt: skip
        return card.ReleaseInfo("p", product, {}, [], {}, {}, ["json"], [])

    coast_seg = info({"coasttrain": {"license": "Public domain (USGS)"}})
    assert header_licence(coast_seg) == {
        "license": "other", "license_name": "us-public-domain",
        "license_link": "https://www.usgs.gov/information-policies-and-instructions/copyrights-and-credits",
    }  # fmt: skip
    assert headline(coast_seg).startswith("**Public domain**")
    reef = info({"coralnet": {"license": "CoralNet source terms (per source)"},
                 "mermaid": {"license": "CC-BY-NC-SA-4.0"}})  # fmt: skip
    assert header_licence(reef) == {
        "license": ["cc-by-nc-sa-4.0", "other"],
        "license_name": "coralnet-source-terms",
        "license_link": "https://coralnet.ucsd.edu/",
    }
    assert headline(reef).startswith("**Non-commercial use only**: mermaid (CC-BY-NC-SA-4.0)")
    inat = info({"inat2017": {"license": "iNaturalist 2017 competition terms: research only, images not "
                              "redistributable", "redistributable": False}})  # fmt: skip
    assert headline(inat).startswith("**Research use only; not redistributable** (inat2017)")


def test_plot_data_is_one_file_of_class_split_count(written):
    plots = written["plots"]
    assert plots.read_text().splitlines() == [
        "class,split,count",
        "Acropora,train,1", "Acropora,val,0", "Acropora,test,1",
        "Sand,train,2", "Sand,val,0", "Sand,test,1",
        "Turf algae,train,1", "Turf algae,val,0", "Turf algae,test,0",
    ]  # fmt: skip  (class-map order; Porites has no sample)


def test_example_grid_and_viewer(written):
    folder = written["folder"]
    grid = Image.open(folder / "examples.png")
    assert grid.mode == "P" and grid.height == 3 * (80 + 4) + 4  # one row per class with samples
    page = (folder / "viewer" / "index.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page
    thumbs = sorted(p.name for p in (folder / "viewer" / "thumbs").iterdir())
    assert len(thumbs) == len(SAMPLES)  # every sample is an example of its one class here
    assert page.count('<img class="image"') == len(SAMPLES)
    for key, split, cls, source in SAMPLES:
        assert f"<code>{key}</code><br>{source} · {split}<br>{cls}" in page


def test_outputs_are_deterministic_and_location_independent(written, tmp_path):
    folder = written["folder"]

    def files(base: Path) -> dict[str, bytes]:
        skip = (".tar", ".parquet", ".index.json")
        return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*"))
                if p.is_file() and not p.name.endswith(skip)}  # fmt: skip

    before = files(folder)
    assert "viewer/index.html" in before and "examples.png" in before
    card.write_docs(folder, written["root"], PARAMS, {"skipped": {"no_kept_points": 2}}, written["plots"])
    assert files(folder) == before
    moved = tmp_path / "elsewhere" / "reef-points"
    shutil.copytree(folder, moved)
    card.write_docs(moved, written["root"], PARAMS, {"skipped": {"no_kept_points": 2}})
    assert files(moved) == before


def test_non_redistributable_and_mixed_licences(tmp_path):
    sources = {
        "inat2017": {"license": "research only", "attribution": "Van Horn et al.", "redistributable": False},
        "mermaid": {"license": NC_SA, "attribution": "MERMAID contributors", "redistributable": True},
    }
    folder = make_product(tmp_path / "p", sources={**sources, "coralnet": {**sources["mermaid"]}})
    card.write_docs(folder)
    header, body = header_and_body((folder / "README.md").read_text())
    assert header["license"] == ["cc-by-nc-sa-4.0", "other"]
    assert header["license_name"] == "inat2017-research-only"
    assert "not-redistributable" in header["tags"]
    assert "**Not redistributable.**" in body and "**Research use only; not redistributable**" in body
    assert "| inat2017 | iNaturalist 2017 competition terms" in body and "| **no** |" in body
    doc = json.loads((folder / "croissant.json").read_text())
    assert "Not redistributable" in doc["description"]
    assert doc["license"] == ["https://creativecommons.org/licenses/by-nc-sa/4.0/",
                              "https://github.com/visipedia/inat_comp/tree/master/2017"]  # fmt: skip


def test_missing_or_inconsistent_inputs_fail_naming_the_file(tmp_path):
    folder = make_product(tmp_path / "p")
    shard = folder / "train-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data.replace(b'{"class": "Acropora"', b'{"class": Acropora!!', 1))
    with pytest.raises(UpstreamFormatError, match=r"train-000000.tar: member mermaid-p1.json is not valid"):
        card.write_docs(folder)
    shard.write_bytes(data)
    (folder / "test-000000.tar").unlink()
    with pytest.raises(UpstreamFormatError, match="test.index.json: lists test-000000.tar, which is missing"):
        card.write_docs(folder)
    (folder / "product.json").unlink()
    with pytest.raises(TidepoolError, match="product.json: missing"):
        card.write_docs(folder)
