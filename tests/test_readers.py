"""Every reader the cards advertise, with the library itself, on every product and split of a real build
(the module build of test_pack_products: ingest, dedup, split and pack of the sample corpus):

- mlcroissant: every record set of every product, all products (and a second release of one) read
  through one shared cache, against what `webdataset` yields;
- Hugging Face `datasets`: the product folder through the card's configs and typed features;
- the reading snippets of the cards, run as written (masks come out as class ids);
- the static viewer and the offline `dvc plots show` page, in headless Chromium.

Readers run in subprocesses: mlcroissant and datasets read their cache locations at import, and each
test gives them a private one (and no network: HF offline).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import make_project
from PIL import Image
from test_pack_products import PRODUCTS
from test_pack_products import corpus as corpus  # noqa: F401  (the module build, reused)

from stages import card
from stages.card.info import key_rank
from stages.pack.index import ShardInfo, wids_index

SPLITS = ("train", "val", "test")
IMAGE_EXTS = ("jpg", "png", "webp", "seg.png")


def product_dir(corpus: dict[str, Any], product: str) -> Path:
    return corpus["root"] / "data" / "release" / product


def summary(ext: str, data: bytes) -> Any:
    """What a reader must give back for a member, comparable across libraries."""
    if ext in IMAGE_EXTS:
        img = Image.open(io.BytesIO(data))
        return [img.width, img.height, img.mode, hashlib.sha256(np.asarray(img).tobytes()).hexdigest()]
    if ext == "json":
        return json.loads(data)
    return data.decode()


def ground_truth(folder: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """split -> key -> ext -> summary, read with webdataset itself (no decoding: raw member bytes)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for split in SPLITS:
        index = folder / f"{split}.index.json"
        shards = json.loads(index.read_text())["shardlist"] if index.exists() else []
        urls = [str(folder / s["url"]) for s in shards]
        out[split] = {}
        for sample in wds.WebDataset(urls, shardshuffle=False) if urls else []:
            exts = {k: v for k, v in sample.items() if not k.startswith("__")}
            out[split][sample["__key__"]] = {ext: summary(ext, data) for ext, data in exts.items()}
    return out


@pytest.fixture(scope="module")
def truth(corpus: dict[str, Any]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    return {p: ground_truth(product_dir(corpus, p)) for p in PRODUCTS}


def run_python(code: str, cwd: Path, env: dict[str, str], *args: str, timeout: int = 600) -> Any:
    """Run `code` in a fresh interpreter; its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same(a: Any, b: Any) -> bool:
    """Equal, floats to 1e-10: HF's `Json` feature writes floats with 10 decimal places (pandas'
    ujson), which the card says; typed fields are exact."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and math.isclose(a, b, abs_tol=1e-10)
    return a == b


def prune(value: Any) -> Any:
    """Drop None-valued keys (HF loads a key a sample lacks as None) and normalise numbers."""
    if isinstance(value, dict):
        return {k: prune(v) for k, v in sorted(value.items()) if v is not None}
    if isinstance(value, list):
        return [prune(v) for v in value]
    return value


# --- mlcroissant ----------------------------------------------------------------------------------

MLC_SCRIPT = r"""
import hashlib, io, json, sys
import numpy as np
import mlcroissant as mlc

def text(value):
    return value.decode() if isinstance(value, bytes) else value

def summary(ext, value):
    if hasattr(value, "mode"):
        digest = hashlib.sha256(np.asarray(value).tobytes()).hexdigest()
        return [value.width, value.height, value.mode, digest]
    value = value.decode() if isinstance(value, bytes) else value
    return json.loads(value) if ext == "json" else value

out = {}
for name, path in json.loads(sys.argv[1]).items():
    ds = mlc.Dataset(path)
    result = {"record_sets": [r.name for r in ds.metadata.record_sets]}
    result["splits"] = [text(r["splits/name"]) for r in ds.records("splits")]
    result["samples"] = sorted(text(r["samples/key"]) for r in ds.records("samples"))
    members = {}
    for rs in result["record_sets"]:
        if not rs.startswith("member-"):
            continue
        ext = rs[len("member-"):].replace("-", ".")
        members[ext] = {}
        for r in ds.records(rs):
            key = text(r[rs + "/key"])
            assert key not in members[ext], (name, rs, key)
            members[ext][key] = summary(ext, r[rs + "/content"])
    result["members"] = members
    out[name] = result
print(json.dumps(out))
"""


def drop_first_sample(folder: Path, shard: str) -> str:
    """Rewrite `shard` without its first sample (a later release's shard) and fix the split's index."""
    path = folder / shard
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    dropped = members[0][0].name.split(".", 1)[0]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            if m.name.split(".", 1)[0] != dropped:
                tar.addfile(m, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    split = shard.split("-")[0]
    index = json.loads((folder / f"{split}.index.json").read_text())
    infos = [ShardInfo(e["url"], e["nsamples"], e["filesize"], e["md5sum"]) for e in index["shardlist"]]
    for info in infos:
        if info.name == shard:
            data = path.read_bytes()
            info.nsamples, info.filesize = info.nsamples - 1, len(data)
            info.md5sum = hashlib.md5(data).hexdigest()
    (folder / f"{split}.index.json").write_text(json.dumps(wids_index(index["name"], split, infos)))
    return dropped


def _expected_members(samples: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        for key, members in samples[split].items():
            for ext, value in members.items():
                out.setdefault(ext, {})[key] = value
    return out


def test_mlcroissant_record_sets_give_each_products_own_samples(corpus, truth, tmp_path):
    # A second release of coast-seg: same shard names, one sample fewer in train-000000.tar.
    v2 = tmp_path / "v2" / "coast-seg"
    shutil.copytree(product_dir(corpus, "coast-seg"), v2)
    dropped = drop_first_sample(v2, "train-000000.tar")
    card.write_docs(v2)
    paths = {p: str(product_dir(corpus, p) / "croissant.json") for p in PRODUCTS}
    paths["coast-seg-v2"] = str(v2 / "croissant.json")
    # One process, one cache, products one after another: no product may be served another's
    # extraction (every product's first shard is train-000000.tar).
    got = run_python(MLC_SCRIPT, tmp_path, {"CROISSANT_CACHE": str(tmp_path / "cache")}, json.dumps(paths))
    for product in PRODUCTS:
        folder = product_dir(corpus, product)
        result = got[product]
        plan = sorted(json.loads((folder / "product.json").read_text())["fields"])
        assert result["record_sets"] == [
            "splits",
            "samples",
            *(f"member-{m.replace('.', '-')}" for m in plan),
        ]
        assert result["splits"] == list(SPLITS)
        manifest = pq.read_table(folder / "manifest.parquet", columns=["key"]).column("key").to_pylist()
        assert result["samples"] == sorted(manifest)
        expected = _expected_members(truth[product])
        assert sorted(result["members"]) == sorted(expected) == plan, product
        for ext in plan:
            assert result["members"][ext] == expected[ext], (product, ext)
    # reef-images: the optional mask has its record set, with exactly the samples that have one.
    masks = got["reef-images"]["members"]["seg.png"]
    assert 0 < len(masks) < len(got["reef-images"]["samples"])
    assert {m[2] for m in masks.values()} == {"L"}
    # coast-seg: the image records are the images only, not the masks too (a `*.png` include
    # would also match `*.seg.png`; test_card checks the globs for png images).
    coast_members = got["coast-seg"]["members"]
    (image_ext,) = {e for e in coast_members if e in IMAGE_EXTS} - {"seg.png"}
    assert len(coast_members[image_ext]) == len(coast_members["seg.png"]) == len(got["coast-seg"]["samples"])
    # The later release is read from its own shards, not from the first release's cached extraction.
    v2_json = got["coast-seg-v2"]["members"]["json"]
    assert dropped not in v2_json and set(v2_json) == set(got["coast-seg"]["members"]["json"]) - {dropped}


# --- wids -----------------------------------------------------------------------------------------

WIDS_SCRIPT = r"""
import hashlib, io, json, os, sys
import numpy as np
import wids
from PIL import Image

def summary(ext, data):
    if ext in ("jpg", "png", "webp", "seg.png"):
        img = Image.open(io.BytesIO(data))
        return [img.width, img.height, img.mode, hashlib.sha256(np.asarray(img).tobytes()).hexdigest()]
    return json.loads(data) if ext == "json" else data.decode()

out = {}
for name, folder in json.loads(sys.argv[1]).items():
    out[name] = {}
    for split in ("train", "val", "test"):
        path = os.path.join(folder, split + ".index.json")
        if not os.path.exists(path):
            continue
        # The default local names (WIDS_CACHE): `cache_dir=` would name cached shards by their
        # basename, and every product has a train-000000.tar.
        ds = wids.ShardListDataset(path, transformations=[])
        rows = {}
        for i in range(len(ds)):  # by index: what a sampler asks for
            sample = ds[i]
            # wids names members by their extension with its dot (".json")
            members = {k.removeprefix("."): v for k, v in sample.items() if not k.startswith("__")}
            rows[sample["__key__"]] = {k: summary(k, v.read()) for k, v in members.items()}
        out[name][split] = {"len": len(ds), "rows": rows}
print(json.dumps(out))
"""


def test_wids_gives_every_sample_by_index_and_member_names_fit_the_ustar_field(corpus, truth, tmp_path):
    paths = {p: str(product_dir(corpus, p)) for p in PRODUCTS}
    got = run_python(WIDS_SCRIPT, tmp_path, {"WIDS_CACHE": str(tmp_path / "wids-cache")}, json.dumps(paths))
    longest = 0
    for product in PRODUCTS:
        folder = product_dir(corpus, product)
        planned = json.loads((folder / "product.json").read_text())["splits"]
        present = [s for s in SPLITS if truth[product][s]]
        assert sorted(got[product]) == sorted(present), product
        for split in SPLITS:
            # An empty split has no index (wids refuses one with no shards), and says so.
            has_index = (folder / f"{split}.index.json").exists()
            assert has_index == bool(planned[split]["samples"]), (product, split)
        for split in present:
            assert got[product][split]["len"] == len(truth[product][split])
            assert got[product][split]["rows"] == truth[product][split], (product, split)
        for shard in folder.glob("*.tar"):
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    # wids reads only the ustar name field: no name may need a pax header.
                    assert not member.pax_headers and len(member.name.encode()) <= 100, (shard, member.name)
                    longest = max(longest, len(member.name.encode()))
    # The corpus has ids long enough to be shortened (coast-seg's), so the rule was exercised.
    manifest = pq.read_table(
        product_dir(corpus, "coast-seg") / "manifest.parquet", columns=["key", "sample_id"]
    )
    shortened = [(k, s) for k, s in zip(*manifest.to_pydict().values()) if k != s]
    assert shortened and all(k[:40] == s[:40] and len(k) <= 84 for k, s in shortened)
    assert longest > 90


# --- Hugging Face datasets ------------------------------------------------------------------------

HF_PRELUDE = r"""
import glob, hashlib, json, os, sys
import numpy as np
import yaml
from datasets import Features, load_dataset

def summary(value):
    if hasattr(value, "mode"):
        digest = hashlib.sha256(np.asarray(value).tobytes()).hexdigest()
        return [value.width, value.height, value.mode, digest]
    return value

def rows(ds):
    return {
        split: {row["__key__"]: {k: summary(v) for k, v in row.items() if not k.startswith("__")}
                for row in ds[split]}
        for split in ds
    }
"""

HF_SCRIPT = HF_PRELUDE + r"""
out = {name: rows(load_dataset(path)) for name, path in json.loads(sys.argv[1]).items()}
print(json.dumps(out))
"""

HF_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def test_hugging_face_loads_every_product_through_the_card_configs(corpus, truth, tmp_path):
    paths = {p: str(product_dir(corpus, p)) for p in PRODUCTS}
    got = run_python(HF_SCRIPT, tmp_path, {**HF_ENV, "HF_HOME": str(tmp_path / "hf")}, json.dumps(paths))
    check_hf_rows(got, truth)


def check_hf_rows(got: dict[str, Any], truth: dict[str, Any]) -> None:
    """What `datasets` loaded equals what webdataset reads, for every product and non-empty split."""
    for product in PRODUCTS:
        expected = truth[product]
        present = [s for s in SPLITS if expected[s]]
        assert sorted(got[product]) == sorted(present), product  # empty splits have no config entry
        for split in present:
            rows = got[product][split]
            assert sorted(rows) == sorted(expected[split]), (product, split)
            for key, members in expected[split].items():
                row = rows[key]
                for ext, value in members.items():
                    if ext == "json":
                        assert same(prune(row["json"]), prune(value)), (product, key)
                    elif ext == "cls":
                        assert int(row["cls"]) == int(value)
                    else:
                        assert row[ext] == value, (product, key, ext)  # same pixels, same mode (L masks)
                for ext in set(row) - set(members):
                    assert row[ext] is None, (product, key, ext)  # an optional member it lacks


HF_DIRECT_SCRIPT = HF_PRELUDE + r"""
out = {}
for name, folder in json.loads(sys.argv[1]).items():
    files = {s: sorted(glob.glob(os.path.join(folder, s + "-*.tar"))) for s in ("train", "val", "test")}
    # The card's typed features, as its `datasets_files` snippet passes them.
    header = open(os.path.join(folder, "README.md"), encoding="utf-8").read().split("---")[1]
    features = Features._from_yaml_list(yaml.safe_load(header)["dataset_info"]["features"])
    data_files = {s: f for s, f in files.items() if f}
    out[name] = rows(load_dataset("webdataset", data_files=data_files, features=features))
print(json.dumps(out))
"""


def test_hugging_face_webdataset_builder_loads_the_shards_with_the_cards_features(corpus, truth, tmp_path):
    # load_dataset("webdataset", data_files=...) alone infers features from the first 5 samples,
    # which cannot see an optional member (reef-images' seg.png), a field null in those five, or
    # maps keyed by ids: the card publishes the features, and its snippet passes them.
    paths = {p: str(product_dir(corpus, p)) for p in PRODUCTS}
    env = {**HF_ENV, "HF_HOME": str(tmp_path / "hf")}
    check_hf_rows(run_python(HF_DIRECT_SCRIPT, tmp_path, env, json.dumps(paths)), truth)


# --- the cards' snippets, as written ----------------------------------------------------------------

SNIPPET_ORDER = ("webdataset", "datasets", "datasets_files", "mlcroissant")


def card_snippets(folder: Path) -> dict[str, str]:
    text = (folder / "README.md").read_text()
    how = text.split("## How to load", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", how, flags=re.S)
    assert len(blocks) == len(SNIPPET_ORDER), blocks
    return dict(zip(SNIPPET_ORDER, blocks))


OBSERVE = {
    # Appended inside the snippet's loop: what each iteration leaves in `mask` / `image`.
    "webdataset": "    seen.append(observe(mask) if 'mask' in dir() else observe(image))\n",
    "datasets": "seen.append(observe(mask) if 'mask' in dir() else observe(image))\n",
    "mlcroissant": "    seen.append(observe(mask) if 'mask' in dir() else observe(image))\n",
}
PRELUDE = r"""
import json as _json
import numpy as _np
seen = []
def observe(value):
    if value is None:
        return None
    a = _np.asarray(value)
    return {"dtype": a.dtype.str, "ndim": a.ndim, "values": sorted(set(_np.unique(a).tolist()))[:300]}
"""


@pytest.mark.parametrize(("product", "reader"), [
    ("coast-seg", "webdataset"), ("coast-seg", "datasets"), ("coast-seg", "mlcroissant"),
    ("reef-images", "webdataset"), ("reef-points", "webdataset"), ("inat2017", "webdataset"),
])  # fmt: skip
def test_card_snippets_run_as_written_and_masks_are_class_ids(corpus, truth, tmp_path, product, reader):
    folder = product_dir(corpus, product)
    code = PRELUDE + card_snippets(folder)[reader] + OBSERVE[reader] + "print(_json.dumps(seen))\n"
    env = {**HF_ENV, "HF_HOME": str(tmp_path / "hf"), "CROISSANT_CACHE": str(tmp_path / "mlc")}
    seen = run_python(code, corpus["root"], env)  # the snippets name data/release/<product> from the root
    classes = json.loads((folder / "classes.json").read_text())
    has_mask = "seg.png" in json.loads((folder / "product.json").read_text())["fields"]
    if not has_mask:
        assert seen and all(s["ndim"] == 3 for s in seen)  # RGB images
        return
    masks = [s for s in seen if s is not None]
    assert masks, product
    if product == "coast-seg":
        allowed = {e["index"] for e in classes["classes"]} | {classes["ignore_index"]}
    else:
        allowed = {c["value"] for c in classes["seg"]["classes"]}
    for m in masks:
        assert m["dtype"] == "|u1" and m["ndim"] == 2, m  # one class id per pixel, not RGB
        assert set(m["values"]) <= allowed, m
    if reader == "webdataset":
        split = next(s for s in SPLITS if truth[product][s])  # the split the snippet reads
        n_masks = sum("seg.png" in members for members in truth[product][split].values())
        assert len(masks) == n_masks and len(seen) == len(truth[product][split])


# --- headless Chromium --------------------------------------------------------------------------

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1000")  # fmt: skip


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Debian's Chromium driven by selenium through chromedriver (.ci/run installs both)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        reason = "no chromium/chromedriver on PATH (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; .ci/run installs them, so CI must have them")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def load_page(browser: Any, path: Path) -> list[dict[str, Any]]:
    """Open a local page; return the browser console entries it produced."""
    browser.get_log("browser")  # drop what earlier pages logged
    browser.get(path.resolve().as_uri())
    browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "Promise.all(Array.from(document.images).map(i => i.complete ? 0 : new Promise(r => "
        "{ i.onload = i.onerror = r; }))).then(() => done(0));"
    )
    return browser.get_log("browser")


def expected_thumbnails(folder: Path, k: int = card.info.EXAMPLES_PER_CLASS) -> dict[str, list[str]]:
    """class name -> the keys the viewer must show: the k smallest hashes of (class, key)."""
    classes = json.loads((folder / "classes.json").read_text())
    members: dict[int, list[str]] = {}
    for shard in sorted(folder.glob("*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            doc = json.loads(sample["json"])
            if "cls" in sample:
                found: tuple[int, ...] = (int(sample["cls"]),)
            elif "multilabel" in doc:
                found = tuple(i for i, v in enumerate(doc["multilabel"]["values"]) if v == 1)
            else:
                names = {e["name"]: e["index"] for e in classes["classes"]}
                found = tuple(names[p] for p in doc["present"] if p in names)
            for c in found:
                members.setdefault(c, []).append(sample["__key__"])
    names = {e["index"]: e["name"] for e in classes["classes"]}
    return {names[c]: sorted(keys, key=lambda x: (key_rank(x, c), x))[:k] for c, keys in members.items()}


def test_viewer_renders_every_thumbnail_without_console_errors(corpus, truth, browser, tmp_path):
    for product in PRODUCTS:
        folder = product_dir(corpus, product)
        page = folder / "viewer" / "index.html"
        html = page.read_text()
        assert "http://" not in html and "https://" not in html  # nothing outside the folder
        logs = load_page(browser, page)
        assert [e for e in logs if e["level"] in ("SEVERE", "ERROR")] == [], (product, logs)
        shown = browser.execute_script(
            "return Array.from(document.querySelectorAll('section')).map(s => ({"
            " name: s.querySelector('h2').firstChild.textContent.trim(),"
            " thumbs: Array.from(s.querySelectorAll('figure.thumb')).map(f => ({"
            "  key: f.querySelector('img.image').alt,"
            "  width: f.querySelector('img.image').naturalWidth,"
            "  mask: f.querySelector('img.mask') ? f.querySelector('img.mask').naturalWidth : null,"
            "  points: f.querySelectorAll('.point').length }))}))"
        )
        expected = expected_thumbnails(folder)
        assert {s["name"]: [t["key"] for t in s["thumbs"]] for s in shown} == expected, product
        thumbs = [t for s in shown for t in s["thumbs"]]
        assert thumbs and all(t["width"] > 0 for t in thumbs), product  # every thumbnail decoded
        with_mask = {k for split in truth[product].values() for k, m in split.items() if "seg.png" in m}
        for t in thumbs:
            assert (t["mask"] is not None) == (t["key"] in with_mask), (product, t)
            assert t["mask"] is None or t["mask"] > 0
            assert t["points"] == (1 if product == "reef-points" else 0), (product, t)
        if product == "coast-seg":
            browser.save_screenshot(str(tmp_path / "viewer-coast-seg.png"))
            assert Image.open(tmp_path / "viewer-coast-seg.png").size[0] > 0


def test_dvc_plots_show_renders_offline(corpus, browser, tmp_path):
    from stages.loopback import dvc_command

    project = make_project(tmp_path / "project")
    for product in PRODUCTS:
        src = corpus["root"] / "metrics" / "plots" / "classes" / f"{product}.csv"
        dest = project / "metrics" / "plots" / "classes" / f"{product}.csv"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    proc = subprocess.run([*dvc_command(), "plots", "show", "-o", "plots-out"], cwd=project,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = (project / "plots-out" / "index.html").read_text()
    assert re.findall(r"<script[^>]*\bsrc\s*=", page) == []  # nothing loaded: every script is inline
    assert "cdn.jsdelivr" not in page and "vegaEmbed(" in page
    logs = load_page(browser, project / "plots-out" / "index.html")
    assert [e for e in logs if e["level"] in ("SEVERE", "ERROR")] == [], logs
    # vega-embed draws on a canvas: each chart's canvas must exist and have a size.
    charts = browser.execute_script(
        "return Array.from(document.querySelectorAll('.vega-embed')).map(d => "
        "Array.from(d.querySelectorAll('canvas, svg')).map(c => c.getBoundingClientRect().height))"
    )
    assert len(charts) == len(PRODUCTS) and all(c and max(c) > 100 for c in charts), charts
    for product in PRODUCTS:  # the titles dvc.yaml gives, in the specs DVC embedded
        assert f'"{product}: samples per class and split"' in page
    rows = Counter(line.split(",")[-2] for line in (project / "metrics/plots/classes/reef-points.csv")
                   .read_text().splitlines()[1:])  # fmt: skip
    assert rows["train"] == rows["val"] == rows["test"] > 0  # every class has a row per split
