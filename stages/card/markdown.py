"""README.md of a product: the Hugging Face dataset card (YAML header, then the sections)."""

from __future__ import annotations

from typing import Any

import yaml

from stages.card.examples import GRID_FILE, GRID_PER_CLASS
from stages.card.features import json_fields, member_features
from stages.card.info import SPLITS, ReleaseInfo
from stages.card.licences import bibtex, header_licence, headline, product_bibtex, source_terms
from stages.card.plots import class_distribution
from stages.card.readers import REEF_PATCHES
from stages.card.text import KEEP_POLICIES, KIND_LIMITATIONS, KINDS, size_category

VIEWER = "viewer/index.html"
LIST_LIMIT = 20  # class names listed in a warning before "and N more"


# --- header ---------------------------------------------------------------------------------------


def card_header(info: ReleaseInfo) -> dict[str, Any]:
    kind = KINDS.get(info.kind, {})
    present = info.present_splits
    header: dict[str, Any] = {
        "pretty_name": f"tidepool {info.name}",
        **header_licence(info),
        "task_categories": kind.get("task_categories", []),
        "task_ids": kind.get("task_ids", []),
        "size_categories": [size_category(info.total_samples)],
        "tags": ["webdataset", "marine", *kind.get("tags", [])],
        # An empty split gets no entry: a config naming files that do not exist breaks HF's loader.
        "configs": [
            {"config_name": "default", "data_files": [{"split": s, "path": f"{s}-*.tar"} for s in present]}
        ],
    }
    if info.shards:
        header["dataset_info"] = {
            "config_name": "default",
            "features": member_features(info.members, info.scan.json_types),
        }
    if not info.redistributable:
        header["tags"].append("not-redistributable")
    return header


# --- helpers --------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += [
        "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows
    ]
    return out


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:LIST_LIMIT])
    return shown + (f" and {len(names) - LIST_LIMIT} more" if len(names) > LIST_LIMIT else "")


# --- split quality and limitations ------------------------------------------------------------------


def split_warnings(info: ReleaseInfo) -> list[str]:
    """One line per problem: an empty split, classes with training samples but none in val or test."""
    counts = info.split_counts()
    out = []
    for split in SPLITS:
        if not counts[split]["samples"]:
            out.append(f"The **{split}** split is empty: no sample was assigned to it.")
    entries = [e for e in info.classes.get("classes") or [] if any((e.get("count") or {}).values())]
    for split in ("val", "test"):
        if not counts[split]["samples"]:
            continue
        missing = [str(e.get("name")) for e in entries if not (e.get("count") or {}).get(split)]
        if missing:
            out.append(
                f"{len(missing)} of {len(entries)} classes have no **{split}** sample: {_names(missing)}."
            )
    return out


def group_lines(info: ReleaseInfo) -> list[str]:
    group_by = (info.split_params or {}).get("group_by") or {}
    rows = [
        [s, ", ".join(f"`{g}`" for g in group_by.get(s) or []) or "image and duplicate cluster only"]
        for s in info.sources
    ]
    return _table(["source", "split groups (besides the image and its duplicate cluster)"], rows)


def mixed_levels(info: ReleaseInfo) -> list[tuple[str, str]]:
    """(class, ancestor) pairs where both are classes with samples: one label space holding a taxon
    and one of its ancestors (genus and species, a top-level category and an attribute under it)."""
    entries = info.classes.get("classes") or []
    by_id = {e.get("id"): e for e in entries if e.get("id")}
    used = {e.get("id") for e in entries if e.get("id") and any((e.get("count") or {}).values())}
    pairs = []
    for e in entries:
        if e.get("id") not in used:
            continue
        parent, seen = e.get("parent"), set()
        while parent and parent not in seen:
            seen.add(parent)
            if parent in used:
                pairs.append((str(e.get("name")), str(by_id[parent].get("name"))))
                break
            parent = (by_id.get(parent) or {}).get("parent")
    return sorted(pairs)


def limitations(info: ReleaseInfo) -> list[str]:
    out = []
    pairs = mixed_levels(info)
    if pairs:
        shown = "; ".join(f"{c} under {a}" for c, a in pairs[:LIST_LIMIT])
        more = f" and {len(pairs) - LIST_LIMIT} more" if len(pairs) > LIST_LIMIT else ""
        out.append(
            f"- **Mixed taxonomic levels in one label space.** Annotators label at different depths, so "
            f"{len(pairs)} classes sit under another class that also has samples ({shown}{more}). A point "
            "labelled with the parent may show the child; treat these as hierarchical, not exclusive."
        )
    warnings = split_warnings(info)
    if warnings:
        out.append("- **Split coverage.** " + " ".join(warnings) + " See *Split quality*.")
    out += [f"- {line}" for line in KIND_LIMITATIONS.get(info.kind, [])]
    if info.skipped:
        out.append(
            "- Samples were left out when packing (counts under *Deduplication and quarantine*); "
            "quarantined upstream records are listed there with their reasons."
        )
    return out or ["- None known beyond the counts above."]


# --- reading snippets -----------------------------------------------------------------------------


def _urls_lines(info: ReleaseInfo, split: str) -> list[str]:
    return [
        f'release = "data/release/{info.name}"',
        f'shards = json.load(open(f"{{release}}/{split}.index.json"))["shardlist"]',
        "urls = [f\"{release}/{s['url']}\" for s in shards]",
    ]


def snippets(info: ReleaseInfo) -> dict[str, str]:
    """The card's reading snippets by name; each runs as written from the folder holding `data/`."""
    split = next(iter(info.present_splits), "train")
    image = info.image_ext or "png"
    has_mask = "seg.png" in info.members
    optional_mask = has_mask and info.scan.member_counts.get("seg.png", 0) < info.scan.samples
    out: dict[str, str] = {}
    if has_mask:
        get_mask = 'sample.get("seg.png")  # None where the sample has no mask' if optional_mask else (
            'sample["seg.png"]')  # fmt: skip
        out["webdataset"] = "\n".join(
            [
                "import io",
                "import json",
                "",
                "import numpy as np",
                "import webdataset as wds",
                "from PIL import Image",
                "",
                "",
                "def class_ids(data: bytes) -> np.ndarray:",
                "    return np.asarray(Image.open(io.BytesIO(data)))  # mode L kept: class ids",
                "",
                "",
                *_urls_lines(info, split),
                '# The seg.png handler comes first: "pil" alone would convert the mask to RGB.',
                'dataset = wds.WebDataset(urls, shardshuffle=False).decode(wds.handle_extension("seg.png", '
                'class_ids), "pil")',
                "for sample in dataset:",
                f'    image, meta = sample["{image}"], sample["json"]  # PIL RGB image, labels',
                f"    mask = {get_mask}",
            ]
        )
    elif (info.product.get("encoding") or {}).get("layout") == "images":  # reef-points: cut by the reader
        out["webdataset"] = "\n".join(
            [
                "import json",
                REEF_PATCHES.rstrip("\n"),
                "",
                "",
                *_urls_lines(info, split),
                "for patch, point, meta in reef_patches(urls):",
                '    label = point["class"]  # patch: uint8 array (patch_size, patch_size, 3)',
            ]
        )
    else:
        out["webdataset"] = "\n".join(
            [
                "import json",
                "",
                "import webdataset as wds",
                "",
                *_urls_lines(info, split),
                'dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil")',
                "for sample in dataset:",
                f'    image, meta = sample["{image}"], sample["json"]  # PIL RGB image, labels'
                + (', class index: sample["cls"]' if "cls" in info.members else ""),
            ]
        )
    hf = [
        "import numpy as np",
        "from datasets import load_dataset",
        "",
        f'ds = load_dataset("data/release/{info.name}")  # the configs and typed features of this card',
        f'sample = ds["{split}"][0]',
        f'image, meta = sample["{image}"], sample["json"]',
    ]
    if has_mask:
        hf.append(
            'mask = np.asarray(sample["seg.png"]) if sample["seg.png"] is not None else None  # class ids'
        )
    out["datasets"] = "\n".join(hf)
    out["datasets_files"] = "\n".join(
        [
            "import glob",
            "",
            "import yaml",
            "from datasets import Features, load_dataset",
            "",
            f'release = "data/release/{info.name}"',
            'header = open(f"{release}/README.md", encoding="utf-8").read().split("---")[1]',
            'features = Features._from_yaml_list(yaml.safe_load(header)["dataset_info"]["features"])',
            f'files = {{"{split}": sorted(glob.glob(f"{{release}}/{split}-*.tar"))}}',
            'ds = load_dataset("webdataset", data_files=files, features=features)',
        ]
    )
    rs = "member-seg-png" if has_mask else f"member-{image.replace('.', '-')}"
    mlc = [
        "import mlcroissant as mlc",
        "import numpy as np",
        "",
        f'dataset = mlc.Dataset("data/release/{info.name}/croissant.json")',
        f'for record in dataset.records("{rs}"):',
        f'    key = record["{rs}/key"].decode()',
        f'    {"mask" if has_mask else "image"} = np.asarray(record["{rs}/content"])'
        + ("  # class ids" if has_mask else ""),
    ]
    out["mlcroissant"] = "\n".join(mlc)
    return out


# --- the card -------------------------------------------------------------------------------------


def dataset_card(info: ReleaseInfo, has_grid: bool) -> str:
    """README.md: the HF YAML header, then the card's sections."""
    kind = KINDS.get(info.kind, {})
    header = yaml.safe_dump(card_header(info), sort_keys=False, allow_unicode=True, width=1000)
    counts = info.split_counts()
    out = ["---", header.rstrip("\n"), "---", "", f"# tidepool {info.name}", ""]
    out.append(
        f"One sample is {kind.get('what', 'a sample')}. Built by the tidepool pipeline ({info.repo_url}) "
        "as WebDataset shards; the manifest, class map and this card are generated with them."
    )
    out += ["", f"> {headline(info)}"]
    if not info.redistributable:
        out += [
            "",
            "> **Not redistributable.** This product holds images whose terms forbid redistribution. "
            "It is never pushed to a public remote; build it yourself from the upstream with `dvc repro`.",
        ]
    if has_grid:
        out += [
            "",
            f"![Examples: up to {GRID_PER_CLASS} per class for the most frequent classes]({GRID_FILE})",
            "",
            f"Examples are chosen by a hash of the class and sample key (stable across builds). Browse "
            f"more in [{VIEWER}]({VIEWER}) (a static page: open it from the folder, no server needed).",
        ]

    out += ["", "## Licence", ""]
    terms = source_terms(info)
    rows = []
    for source, t in info.sources.items():
        n = sum((info.by_source.get(source) or {}).values())
        spdx = terms[source].spdx
        name = f"`{spdx}`" if spdx else terms[source].title
        link = f"[terms]({terms[source].url})" if terms[source].url else "–"
        rows.append([source, name, link, t.get("attribution") or "–",
                     "yes" if t.get("redistributable", True) else "**no**", n])  # fmt: skip
    out += _table(["source", "licence (SPDX id where one exists)", "link", "attribution", "redistributable",
                   "samples"], rows)  # fmt: skip
    out += [
        "",
        "Each sample carries its source's licence and attribution (`json` member; manifest column "
        "`license`). Using the product means following the terms of every source in it.",
    ]

    out += ["", "## Contents", ""]
    rows = [[s, v["samples"], v["shards"], _human(v["bytes"])] for s, v in counts.items()]
    rows.append(["**total**", info.total_samples, sum(v["shards"] for v in counts.values()),
                 _human(sum(v["bytes"] for v in counts.values()))])  # fmt: skip
    out += _table(["split", "samples", "shards", "size"], rows)
    if len(info.sources) > 1:
        out += [""] + _table(
            ["source", *SPLITS], [[s, *(v.get(sp, 0) for sp in SPLITS)] for s, v in info.by_source.items()]
        )

    out += ["", "## Split quality", ""]
    warnings = split_warnings(info)
    out += [f"> **Warning:** {w}" + "\n" for w in warnings] or ["Every split has samples of every class.", ""]
    out += ["Samples that could share pixels or a scene share a split. The groups, per source:", ""]
    out += group_lines(info)

    dist = class_distribution(info.classes)
    task = info.classes.get("task", "classification")
    out += ["", "## Classes", ""]
    out.append(
        f"Level: {info.classes.get('level') or '–'}; task: {task}; {info.classes.get('num_classes', '?')} "
        f"indices in the class map (`classes.json`), {len(dist['train'])} with samples. Counts are samples "
        + ("in which the class is present" if task in ("multilabel", "segmentation") else "per class")
        + "."
    )
    names = [n for n, _ in dist["train"]]
    rows = [[name, *(dist[s][i][1] for s in SPLITS)] for i, name in enumerate(names)]
    if rows:
        out += [""] + _table(["class", *SPLITS], rows)

    out += ["", "## Structure", ""]
    out += [
        f"`data/release/{info.name}/` holds {len(info.shards)} shards `<split>-NNNNNN.tar` (POSIX ustar, "
        "byte-reproducible, a sample's members adjacent and sorted), a wids index per non-empty split "
        "(`<split>.index.json`), `manifest.parquet` (one row per sample: key, shard, split, position, "
        "labels, licence), `classes.json` (the class map), `product.json` (build settings), "
        "`croissant.json` (Croissant 1.1, sha256 of every shard), this card and its `examples.png`, and "
        "`viewer/` (a static page of examples). Sample keys are ASCII without dots; a sample is the "
        "members `<key>.<ext>` listed under *Fields*.",
    ]

    out += ["", "## Fields", ""]
    fields = info.product.get("fields") or {}
    types = {f["name"]: f.get("dtype") or ("struct" if "struct" in f else "list") for f in
             member_features(info.members, info.scan.json_types)}  # fmt: skip
    rows = [
        [f"`{ext}`", types.get(ext, "binary"), fields.get(ext, ""),
         f"{info.scan.member_counts.get(ext, 0)} of {info.scan.samples}"]
        for ext in info.members
    ]  # fmt: skip
    out += _table(["member", "type (HF features)", "holds", "samples with it"], rows)
    jf = json_fields(info.scan.json_types)
    if jf:
        out += [
            "",
            "Fields of the `json` member (two levels). `json` marks free-form values (maps keyed by ids or "
            "names, mixed types): Hugging Face loads them with its `Json` feature, which keeps floats to 10 "
            "decimal places; the shard's `json` member has them in full.",
            "",
        ]
        out += _table(["field", "type"], [[f"`{p}`", t] for p, t in jf])

    out += ["", "## How to load", ""]
    out += [
        "```sh",
        f"dvc get {info.repo_url} data/release/{info.name} --rev vX.Y.Z        # a copy",
        f"dvc import {info.repo_url} data/release/{info.name} --rev vX.Y.Z     # a tracked dependency",
        "```",
    ]
    snip = snippets(info)
    out += ["", "With `webdataset`:", "", "```python", snip["webdataset"], "```"]
    out += ["", "With Hugging Face `datasets` (reads this card's `configs` and `dataset_info.features`):",
            "", "```python", snip["datasets"], "```"]  # fmt: skip
    out += ["", "The shards alone through `datasets`' webdataset builder: it infers types from the first "
            "five samples, which cannot see optional members, fields null in those five or maps keyed by "
            "ids, so pass this card's features:", "", "```python", snip["datasets_files"], "```"]  # fmt: skip
    out += ["", "With `mlcroissant` (record sets `splits`, `samples`, and one per member, "
            + ", ".join(f"`member-{m.replace('.', '-')}`" for m in info.members) + "):",
            "", "```python", snip["mlcroissant"], "```"]  # fmt: skip
    if info.present_splits:
        out += ["", f'Random access: `wids.ShardListDataset("data/release/{info.name}/'
                f'{info.present_splits[0]}.index.json")`.']  # fmt: skip

    out += ["", "## Deduplication and quarantine", ""]
    policy = (info.product.get("params") or {}).get("dedup", "one")
    d = info.dedup
    if d:
        out.append(
            f"Duplicate images (exact file, exact pixels, or perceptual hash within the radius) were "
            f"clustered across all sources: {d['clusters']} clusters touch this product's sources "
            f"({d['members']} of their members are from them; {d['cross_source']} clusters span several "
            f"sources). Keep policy `{policy}`: {KEEP_POLICIES.get(policy, 'see docs/dedup-split.md')}"
        )
    else:
        out.append(f"Keep policy for duplicates: `{policy}`.")
    if info.skipped:
        out += ["", "Samples left out when packing:", ""]
        out += _table(["reason", "samples"], [[k, v] for k, v in info.skipped.items()])
    if info.quarantine:
        out += [
            "",
            "Quarantined upstream records (ingest; each with a reason, nothing dropped silently):",
            "",
        ]
        rows = [[s, reason, n] for s, per in info.quarantine.items() for reason, n in per.items()]
        out += _table(["source", "record: reason", "count"], rows)

    out += ["", "## Split method", ""]
    out += _split_method(info) if info.split_params else ["See docs/dedup-split.md."]

    out += ["", "## Limitations", ""]
    out += limitations(info)

    out += ["", "## Citation", "", "This product:", "", "```bibtex", product_bibtex(info), "```"]
    out += ["", "And each source it is built from:", "", "```bibtex"]
    out += ["\n\n".join(bibtex(s, str(t.get("attribution") or s)) for s, t in info.sources.items()), "```"]
    return "\n".join(out) + "\n"


def _split_method(info: ReleaseInfo) -> list[str]:
    sp = info.split_params
    ratios = sp.get("ratios") or {}
    return [
        "Splits are assigned per connected component of samples that could share pixels or a scene "
        "(`stages/split.py`, docs/dedup-split.md): all points of an image, every member of a duplicate "
        "cluster (across all sources), and the group keys under *Split quality*. A component goes to one "
        "split; official upstream splits are respected; the rest is drawn from "
        f"`sha256(salt, component key)` with salt `{sp.get('salt', '?')}` and ratios "
        + ", ".join(f"{k} {v}" for k, v in ratios.items())
        + ". Samples of earlier releases keep their split (the ledger `"
        + str(sp.get("ledger", "data/ledger/splits.parquet"))
        + "`).",
    ]
