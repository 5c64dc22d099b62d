"""Dataset card, Croissant metadata and class-distribution plot data for one release product.

The pack stage calls `write_docs` at its end, so that beside the shards of
`data/release/<product>/` lie

- `README.md`: a Hugging Face dataset card (YAML header: licence, task categories, size category,
  configs/splits; sections: sources with attribution and licences, counts per split and class,
  dedup and quarantine summary, split method, how to load);
- `croissant.json`: Croissant 1.1 JSON-LD (`conformsTo` http://mlcommons.org/croissant/1.1): one
  FileObject per shard with its sha256, the manifest and class map as FileObjects, a FileSet per
  member type inside the shards, and record sets for the splits, the samples (from the manifest)
  and the shard members;

and, outside the product, the class counts per split as CSV for `dvc plots`
(`metrics/plots/classes/<product>/<split>.csv`, columns `class,count`).

`dvc import <repo> data/release/<product>` therefore brings the card and the Croissant file along.
Everything is a pure function of the files pack wrote, the ingest quarantine tables, the dedup
clusters and params: no clock, no host, sorted throughout, so the files hash the same on every build.

Builders (`dataset_card`, `croissant`, `class_distribution`) take a `ReleaseInfo` and return text or
data; `gather` reads the inputs; `write_docs` does both and writes the files.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from stages.errors import TidepoolError, UpstreamFormatError
from stages.fsutil import atomic_path, file_digest, write_json, write_text

SPLITS = ("train", "val", "test")
CARD = "README.md"
CROISSANT = "croissant.json"
CROISSANT_VERSION = "http://mlcommons.org/croissant/1.1"
DEFAULT_REPO_URL = "https://github.com/tidepool-data/tidepool"

# The JSON-LD @context of Croissant 1.1, as mlcroissant 1.1 writes it (`mlcroissant._src.core.rdf.
# make_context` for a 1.1 document). Spelled out so that pack does not need mlcroissant at build time.
CROISSANT_CONTEXT: dict[str, Any] = {
    "@language": "en",
    "@vocab": "https://schema.org/",
    "arrayShape": "cr:arrayShape",
    "citeAs": "cr:citeAs",
    "column": "cr:column",
    "conformsTo": "dct:conformsTo",
    "containedIn": "cr:containedIn",
    "cr": "http://mlcommons.org/croissant/",
    "rai": "http://mlcommons.org/croissant/RAI/",
    "data": {"@id": "cr:data", "@type": "@json"},
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "dct": "http://purl.org/dc/terms/",
    "equivalentProperty": "cr:equivalentProperty",
    "examples": {"@id": "cr:examples", "@type": "@json"},
    "extract": "cr:extract",
    "field": "cr:field",
    "fileProperty": "cr:fileProperty",
    "fileObject": "cr:fileObject",
    "fileSet": "cr:fileSet",
    "format": "cr:format",
    "includes": "cr:includes",
    "isArray": "cr:isArray",
    "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath",
    "key": "cr:key",
    "md5": "cr:md5",
    "parentField": "cr:parentField",
    "path": "cr:path",
    "recordSet": "cr:recordSet",
    "references": "cr:references",
    "regex": "cr:regex",
    "repeated": "cr:repeated",
    "replace": "cr:replace",
    "samplingRate": "cr:samplingRate",
    "sc": "https://schema.org/",
    "separator": "cr:separator",
    "source": "cr:source",
    "subField": "cr:subField",
    "transform": "cr:transform",
}

MEDIA_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "json": "application/json",
    "cls": "text/plain",
    "seg.png": "image/png",
}

# Hugging Face licence identifiers for the SPDX ids our sources use; anything else is `other`.
HF_LICENSES = {"cc-by-nc-sa-4.0": "cc-by-nc-sa-4.0", "cc-by-4.0": "cc-by-4.0", "cc0-1.0": "cc0-1.0"}
LICENSE_URLS = {
    "cc-by-nc-sa-4.0": "https://creativecommons.org/licenses/by-nc-sa/4.0/",
    "cc-by-4.0": "https://creativecommons.org/licenses/by/4.0/",
    "cc0-1.0": "https://creativecommons.org/publicdomain/zero/1.0/",
}

# What one sample is and which tasks it serves, per pack kind.
KINDS: dict[str, dict[str, Any]] = {
    "reef-points": {
        "what": "a patch centred on one annotated point of a benthic photo-quadrat (pyspacer-compatible)",
        "task_categories": ["image-classification"],
        "task_ids": ["multi-class-image-classification"],
        "tags": ["coral-reef", "benthic", "point-annotation"],
    },
    "reef-images": {
        "what": "a whole benthic image with multilabel presence in the MERMAID taxonomy, point cover "
        "fractions and, where one exists, a segmentation mask",
        "task_categories": ["image-classification", "image-segmentation"],
        "task_ids": ["multi-label-image-classification", "semantic-segmentation"],
        "tags": ["coral-reef", "benthic", "multilabel"],
    },
    "coast-seg": {
        "what": "a coastal aerial or satellite image with a dense mask of the 7 common Coast Train classes",
        "task_categories": ["image-segmentation"],
        "task_ids": ["semantic-segmentation"],
        "tags": ["coastal", "remote-sensing", "land-cover"],
    },
    "inat2017": {
        "what": "an iNaturalist 2017 photo of a marine species with its category, bounding boxes and "
        "location where known",
        "task_categories": ["image-classification", "object-detection"],
        "task_ids": ["multi-class-image-classification"],
        "tags": ["species", "fish", "mollusca"],
    },
}

# What each products.<name>.dedup policy keeps of a duplicate cluster (stages/products.py).
KEEP_POLICIES = {
    "all": "every copy stays; the whole cluster is in one split.",
    "one": "one copy per cluster stays, the best-ranked among this product's sources.",
    "cover": "in rank order, a member stays unless its perceptual hash is within the dedup radius of "
    "a member already kept: near copies go, the distinct ends of a chained cluster (video frames) stay.",
}

SIZE_CATEGORIES = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
    (10_000_000_000, "1B<n<10B"),
    (100_000_000_000, "10B<n<100B"),
    (1_000_000_000_000, "100B<n<1T"),
)


@dataclass(frozen=True)
class ShardFile:
    name: str
    split: str
    nsamples: int
    size: int
    md5: str
    sha256: str


@dataclass
class ReleaseInfo:
    """Everything the card and the Croissant file say, read once."""

    name: str
    product: dict[str, Any]  # product.json
    classes: dict[str, Any]  # classes.json
    shards: list[ShardFile]
    files: dict[str, dict[str, Any]]  # manifest.parquet / classes.json -> {size, sha256}
    by_source: dict[str, dict[str, int]]  # source -> split -> samples (manifest)
    members: list[str]  # member extensions of a sample, e.g. ["cls", "json", "png"]
    manifest_columns: list[tuple[str, str]]  # (name, arrow type) of manifest.parquet
    quarantine: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> "kind: reason" -> n
    dedup: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # pack metrics `skipped`
    split_params: dict[str, Any] = field(default_factory=dict)
    repo_url: str = DEFAULT_REPO_URL

    @property
    def kind(self) -> str:
        return str(self.product.get("kind", self.name))

    @property
    def sources(self) -> dict[str, dict[str, Any]]:
        return dict(sorted((self.product.get("sources") or {}).items()))

    @property
    def redistributable(self) -> bool:
        return bool(self.product.get("redistributable", True))

    def split_counts(self) -> dict[str, dict[str, int]]:
        """split -> {samples, shards, bytes} from product.json."""
        splits = self.product.get("splits") or {}
        return {
            s: {k: int((splits.get(s) or {}).get(k, 0)) for k in ("samples", "shards", "bytes")}
            for s in SPLITS
        }

    @property
    def total_samples(self) -> int:
        return sum(v["samples"] for v in self.split_counts().values())


# --- reading the inputs ---------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise TidepoolError(f"{path}: missing; the pack stage writes it before the card") from exc
    except ValueError as exc:
        raise UpstreamFormatError(path, f"not valid JSON: {exc}") from exc


def _members(out_dir: Path, shards: list[ShardFile]) -> list[str]:
    """Member extensions of the first sample of the first non-empty shard, e.g. ["cls", "json", "png"]."""
    for shard in shards:
        try:
            with tarfile.open(out_dir / shard.name, "r:") as tar:
                exts: list[str] = []
                key = None
                for member in tar:
                    stem, _, ext = member.name.partition(".")
                    key = stem if key is None else key
                    if stem != key:
                        break
                    exts.append(ext)
        except tarfile.TarError as exc:
            raise UpstreamFormatError(out_dir / shard.name, f"not a readable tar: {exc}") from exc
        if exts:
            return sorted(exts)
    return []


def gather(
    out_dir: Path,
    root: Path | None = None,
    params: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> ReleaseInfo:
    """Read what pack wrote in `out_dir` (and, with `root`, the quarantine tables and dedup clusters)."""
    product = _read_json(out_dir / "product.json")
    name = str(product.get("product", out_dir.name))
    classes = _read_json(out_dir / "classes.json")
    shards: list[ShardFile] = []
    for split in SPLITS:
        index = _read_json(out_dir / f"{split}.index.json")
        for entry in index.get("shardlist", []):
            path = out_dir / entry["url"]
            if not path.is_file():
                raise UpstreamFormatError(
                    out_dir / f"{split}.index.json", f"lists {entry['url']}, which is missing"
                )
            shards.append(
                ShardFile(
                    name=entry["url"],
                    split=split,
                    nsamples=int(entry["nsamples"]),
                    size=path.stat().st_size,
                    md5=str(entry["md5sum"]),
                    sha256=file_digest(path, "sha256"),
                )
            )
    files = {}
    for fname in ("manifest.parquet", "classes.json"):
        path = out_dir / fname
        if not path.is_file():
            raise TidepoolError(f"{path}: missing; the pack stage writes it before the card")
        files[fname] = {"size": path.stat().st_size, "sha256": file_digest(path, "sha256")}
    try:
        manifest = pq.read_table(out_dir / "manifest.parquet", columns=["source", "split"])
    except (OSError, ValueError) as exc:  # pyarrow: ArrowInvalid is a ValueError
        raise UpstreamFormatError(
            out_dir / "manifest.parquet", f"no readable source/split columns: {exc}"
        ) from exc
    by_source: dict[str, Counter[str]] = {}
    for source, split in zip(manifest.column("source").to_pylist(), manifest.column("split").to_pylist()):
        by_source.setdefault(str(source), Counter())[str(split)] += 1
    schema = pq.read_schema(out_dir / "manifest.parquet")
    info = ReleaseInfo(
        name=name,
        product=product,
        classes=classes,
        shards=shards,
        files=files,
        by_source={s: {sp: c[sp] for sp in SPLITS} for s, c in sorted(by_source.items())},
        members=_members(out_dir, shards),
        manifest_columns=[(f.name, str(f.type)) for f in schema],
        skipped=dict(sorted(((metrics or {}).get("skipped") or {}).items())),
    )
    if params is not None:
        info.split_params = dict(params.get("split") or {})
        info.repo_url = str((params.get("release") or {}).get("repo_url") or DEFAULT_REPO_URL)
    if root is not None:
        sources = sorted(info.sources)
        info.quarantine = quarantine_summary(root, sources)
        info.dedup = dedup_summary(root, sources)
    return info


def quarantine_summary(root: Path, sources: list[str]) -> dict[str, dict[str, int]]:
    """source -> "record kind: reason" -> count, from the ingest quarantine tables."""
    out = {}
    for source in sources:
        path = root / "data" / "interim" / source / "quarantine.parquet"
        if not path.exists():
            continue
        table = pq.read_table(path, columns=["record_kind", "reason"])
        counts = Counter(
            f"{k}: {r}"
            for k, r in zip(table.column("record_kind").to_pylist(), table.column("reason").to_pylist())
        )
        out[source] = dict(sorted(counts.items()))
    return out


def dedup_summary(root: Path, sources: list[str]) -> dict[str, Any]:
    """Duplicate clusters that touch the product's sources, from data/dedup/clusters.parquet."""
    path = root / "data" / "dedup" / "clusters.parquet"
    if not path.exists():
        return {}
    table = pq.read_table(path, columns=["cluster_id", "sample_id", "source"])
    members: dict[str, list[str]] = {}
    for cid, src in zip(table.column("cluster_id").to_pylist(), table.column("source").to_pylist()):
        members.setdefault(str(cid), []).append(str(src))
    mine = {cid: srcs for cid, srcs in members.items() if set(srcs) & set(sources)}
    return {
        "clusters": len(mine),
        "members": sum(sum(1 for s in srcs if s in sources) for srcs in mine.values()),
        "cross_source": sum(1 for srcs in mine.values() if len(set(srcs)) > 1),
        "with_other_products_sources": sum(1 for srcs in mine.values() if set(srcs) - set(sources)),
    }


# --- builders -------------------------------------------------------------------------------------


def class_distribution(classes: dict[str, Any]) -> dict[str, list[tuple[str, int]]]:
    """split -> [(class name, count)] for every class with a sample in some split, in class-map order.

    A class absent from one split stays in that split's list with 0: the plot then shows the gap.
    """
    entries = [e for e in classes.get("classes") or [] if any((e.get("count") or {}).values())]
    return {
        split: [
            (str(e.get("name", e.get("index"))), int((e.get("count") or {}).get(split, 0))) for e in entries
        ]
        for split in SPLITS
    }


def _spdx(text: str) -> str:
    match = re.match(r"[A-Za-z0-9.\-]+", text.strip())
    return match.group(0).lower() if match else ""


def hf_license(info: ReleaseInfo) -> dict[str, Any]:
    """The card header's licence keys: an HF id when every source has the same known licence."""
    ids = {_spdx(str(t.get("license") or "")) for t in info.sources.values()}
    if len(ids) == 1 and (only := ids.pop()) in HF_LICENSES:
        return {"license": HF_LICENSES[only]}
    return {"license": "other", "license_name": f"tidepool-{info.name}-combined-source-terms"}


def size_category(n: int) -> str:
    for bound, label in SIZE_CATEGORIES:
        if n < bound:
            return label
    return "n>1T"


def card_header(info: ReleaseInfo) -> dict[str, Any]:
    kind = KINDS.get(info.kind, {})
    counts = info.split_counts()
    present = [s for s in SPLITS if counts[s]["shards"]]
    header: dict[str, Any] = {
        "pretty_name": f"tidepool {info.name}",
        **hf_license(info),
        "task_categories": kind.get("task_categories", []),
        "task_ids": kind.get("task_ids", []),
        "size_categories": [size_category(info.total_samples)],
        "tags": ["webdataset", "marine", *kind.get("tags", [])],
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": s, "path": f"{s}-*.tar"} for s in present],
            }
        ],
    }
    if not info.redistributable:
        header["tags"].append("not-redistributable")
    return header


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _split_method(info: ReleaseInfo) -> list[str]:
    sp = info.split_params
    ratios = sp.get("ratios") or {}
    group_by = sp.get("group_by") or {}
    lines = [
        "Splits are assigned per connected component of samples that could share pixels or a scene "
        "(`stages/split.py`, docs/dedup-split.md): all points of an image, every member of a duplicate "
        "cluster (across all sources), and the group keys below. A component goes to one split; "
        "official upstream splits are respected; the rest is drawn from "
        f"`sha256(salt, component key)` with salt `{sp.get('salt', '?')}` and ratios "
        + ", ".join(f"{k} {v}" for k, v in ratios.items())
        + ". Samples of earlier releases keep their split (the ledger `"
        + str(sp.get("ledger", "data/ledger/splits.parquet"))
        + "`).",
        "",
    ]
    rows = [[s, ", ".join(group_by.get(s) or []) or "image and duplicate cluster only"] for s in info.sources]
    return lines + _table(["source", "grouped by"], rows)


def dataset_card(info: ReleaseInfo) -> str:
    """README.md: the HF YAML header, then the card's sections."""
    kind = KINDS.get(info.kind, {})
    header = yaml.safe_dump(card_header(info), sort_keys=False, allow_unicode=True, width=1000)
    counts = info.split_counts()
    out = ["---", header.rstrip("\n"), "---", "", f"# tidepool {info.name}", ""]
    out.append(
        f"One sample is {kind.get('what', 'a sample')}. Built by the tidepool pipeline ({info.repo_url}) "
        "as WebDataset shards; the manifest, class map and this card are generated with them."
    )
    if not info.redistributable:
        out += [
            "",
            "> **Not redistributable.** This product holds images whose terms forbid redistribution. "
            "It is never pushed to a public remote; build it yourself from the upstream with `dvc repro`.",
        ]

    out += ["", "## Sources and licences", ""]
    rows = []
    for source, terms in info.sources.items():
        n = sum((info.by_source.get(source) or {}).values())
        rows.append(
            [
                source,
                terms.get("license") or "–",
                terms.get("attribution") or "–",
                "yes" if terms.get("redistributable", True) else "**no**",
                n,
            ]
        )
    out += _table(["source", "licence", "attribution", "redistributable", "samples"], rows)
    out += [
        "",
        "Each sample carries its source's licence and attribution (`json` member; manifest column "
        "`license`). Using the product means following the terms of every source in it.",
    ]

    out += ["", "## Contents", ""]
    rows = [[s, v["samples"], v["shards"], _human(v["bytes"])] for s, v in counts.items()]
    rows.append(
        [
            "**total**",
            info.total_samples,
            sum(v["shards"] for v in counts.values()),
            _human(sum(v["bytes"] for v in counts.values())),
        ]
    )
    out += _table(["split", "samples", "shards", "size"], rows)
    if len(info.sources) > 1:
        out += [""] + _table(
            ["source", *SPLITS], [[s, *(v.get(sp, 0) for sp in SPLITS)] for s, v in info.by_source.items()]
        )
    fields = info.product.get("fields") or {}
    if fields:
        out += ["", "Members of a sample (`<key>.<ext>`):", ""]
        out += _table(["ext", "holds"], [[f"`{k}`", v] for k, v in sorted(fields.items())])

    dist = class_distribution(info.classes)
    task = info.classes.get("task", "classification")
    level = info.classes.get("level", "")
    out += ["", "## Classes", ""]
    out.append(
        f"Level: {level or '–'}; task: {task}; {info.classes.get('num_classes', '?')} indices in the class "
        f"map (`classes.json`), {len(dist['train'])} with samples. Counts are samples "
        + ("in which the class is present" if task in ("multilabel", "segmentation") else "per class")
        + "."
    )
    names = [n for n, _ in dist["train"]]
    rows = [[name, *(dist[s][i][1] for s in SPLITS)] for i, name in enumerate(names)]
    if rows:
        out += [""] + _table(["class", *SPLITS], rows)

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

    patterns = {
        s: f"{s}-{{000000..{counts[s]['shards'] - 1:06d}}}.tar" for s in SPLITS if counts[s]["shards"]
    }
    first = next(iter(patterns), "train")
    ext = next((m for m in info.members if m not in ("json", "cls", "seg.png")), "png")
    out += [
        "",
        "## How to load",
        "",
        "```sh",
        f"dvc get {info.repo_url} data/release/{info.name} --rev vX.Y.Z        # a copy",
        f"dvc import {info.repo_url} data/release/{info.name} --rev vX.Y.Z     # a tracked dependency",
        "```",
        "",
        "```python",
        "import webdataset as wds",
        f'ds = wds.WebDataset("data/release/{info.name}/{patterns.get(first, "train-000000.tar")}", '
        'shardshuffle=True).decode("pil")',
        "for sample in ds:",
        f'    image, meta = sample["{ext}"], sample["json"]',
        "```",
        "",
        f'Random access: `wids.ShardListDataset("data/release/{info.name}/{first}.index.json")`. '
        f'Croissant: `mlcroissant.Dataset("data/release/{info.name}/{CROISSANT}")` '
        "(record sets `splits`, `samples`, and one per shard member).",
        "",
        "## Files",
        "",
        f"{len(info.shards)} shards (`<split>-NNNNNN.tar`, POSIX ustar, byte-reproducible), a wids index "
        "per split (`<split>.index.json`), `manifest.parquet` (one row per sample: key, shard, split, "
        "labels, licence), `classes.json`, `product.json` (build settings), `croissant.json` (sha256 "
        "of every shard).",
    ]
    return "\n".join(out) + "\n"


def cite_as(info: ReleaseInfo) -> str:
    attributions = "; ".join(str(t.get("attribution")) for t in info.sources.values() if t.get("attribution"))
    key = re.sub(r"[^A-Za-z0-9]+", "_", info.name)
    return (
        f"@misc{{tidepool_{key},\n"
        f"  title = {{tidepool {info.name}: a WebDataset release built from public marine image sources}},\n"
        f"  howpublished = {{{info.repo_url}}},\n"
        f"  note = {{Built from: {attributions}}}\n"
        "}"
    )


def _license_values(info: ReleaseInfo) -> list[str]:
    out = []
    for terms in info.sources.values():
        text = str(terms.get("license") or "unknown")
        out.append(LICENSE_URLS.get(_spdx(text), text))
    return sorted(set(out))


def _field(rs: str, name: str, dtype: str, source: dict[str, Any], description: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"@type": "cr:Field", "@id": f"{rs}/{name}", "name": name, "dataType": dtype}
    if description:
        out["description"] = description
    out["source"] = source
    return out


ARROW_TYPES = {"string": "sc:Text", "int32": "sc:Integer", "int64": "sc:Integer", "double": "sc:Float"}


def croissant(info: ReleaseInfo) -> dict[str, Any]:
    """The Croissant 1.1 JSON-LD document of the product (paths relative to the product folder)."""
    distribution: list[dict[str, Any]] = []
    for shard in info.shards:
        distribution.append(
            {
                "@type": "cr:FileObject",
                "@id": shard.name,
                "name": shard.name,
                "description": f"{shard.split} shard, {shard.nsamples} samples",
                "contentUrl": shard.name,
                "contentSize": f"{shard.size} B",
                "encodingFormat": "application/x-tar",
                "sha256": shard.sha256,
            }
        )
    for fname, fmt, what in (
        ("manifest.parquet", "application/x-parquet", "one row per sample: key, shard, split, labels"),
        ("classes.json", "application/json", "the class map"),
    ):
        distribution.append(
            {
                "@type": "cr:FileObject",
                "@id": fname,
                "name": fname,
                "description": what,
                "contentUrl": fname,
                "contentSize": f"{info.files[fname]['size']} B",
                "encodingFormat": fmt,
                "sha256": info.files[fname]["sha256"],
            }
        )
    fields_doc = info.product.get("fields") or {}
    member_sets = []
    for ext in info.members:
        if not info.shards:
            break
        set_id = f"members-{ext.replace('.', '-')}"
        member_sets.append((ext, set_id))
        distribution.append(
            {
                "@type": "cr:FileSet",
                "@id": set_id,
                "name": set_id,
                "description": f"`.{ext}` members of the shards: {fields_doc.get(ext, '')}".rstrip(": "),
                "containedIn": [{"@id": s.name} for s in info.shards],
                "encodingFormat": MEDIA_TYPES.get(ext, "application/octet-stream"),
                "includes": f"*.{ext}",
            }
        )

    splits_rs = {
        "@type": "cr:RecordSet",
        "@id": "splits",
        "name": "splits",
        "description": "The splits: components of samples that could share a scene never straddle them.",
        "dataType": "cr:Split",
        "key": {"@id": "splits/name"},
        "field": [
            {"@type": "cr:Field", "@id": "splits/name", "name": "name", "dataType": "sc:Text"},
        ],
        "data": [{"splits/name": s} for s in SPLITS],
    }
    sample_fields = []
    for name, arrow in info.manifest_columns:
        src = {"fileObject": {"@id": "manifest.parquet"}, "extract": {"column": name}}
        dtype = ARROW_TYPES.get(arrow, "sc:Text")
        f = _field("samples", name, dtype, src)
        if name == "split":
            f["references"] = {"field": {"@id": "splits/name"}}
        sample_fields.append(f)
    samples_rs = {
        "@type": "cr:RecordSet",
        "@id": "samples",
        "name": "samples",
        "description": "One record per sample, from manifest.parquet: the WebDataset key, its shard and "
        "split, class and labels (JSON text), source and licence.",
        "key": {"@id": "samples/key"},
        "field": sample_fields,
    }
    record_sets = [splits_rs, samples_rs]
    for ext, set_id in member_sets:
        rs = f"member-{ext.replace('.', '-')}"
        content_type = "sc:ImageObject" if MEDIA_TYPES.get(ext, "").startswith("image/") else "sc:Text"
        record_sets.append(
            {
                "@type": "cr:RecordSet",
                "@id": rs,
                "name": rs,
                "description": f"The `.{ext}` member of each sample, keyed by the sample key.",
                "key": {"@id": f"{rs}/key"},
                "field": [
                    _field(
                        rs,
                        "key",
                        "sc:Text",
                        {
                            "fileSet": {"@id": set_id},
                            "extract": {"fileProperty": "filename"},
                            "transform": {"regex": r"^([^.]+)\..*$"},
                        },
                        "the sample key (`__key__`), joins `samples/key`",
                    ),
                    _field(
                        rs,
                        "content",
                        content_type,
                        {"fileSet": {"@id": set_id}, "extract": {"fileProperty": "content"}},
                        fields_doc.get(ext, ""),
                    ),
                ],
            }
        )
    kind = KINDS.get(info.kind, {})
    description = (
        f"tidepool {info.name}: WebDataset shards where one sample is {kind.get('what', 'a sample')}. "
        f"{info.total_samples} samples in {len(info.shards)} shards."
    )
    if not info.redistributable:
        description += " Not redistributable: holds images whose terms forbid redistribution."
    return {
        "@context": CROISSANT_CONTEXT,
        "@type": "sc:Dataset",
        "conformsTo": CROISSANT_VERSION,
        "name": f"tidepool-{info.name}",
        "description": description,
        "url": info.repo_url,
        "license": _license_values(info),
        "citeAs": cite_as(info),
        "creator": {"@type": "sc:Organization", "name": "tidepool", "url": info.repo_url},
        "keywords": ["webdataset", "marine", *kind.get("tags", [])],
        "isAccessibleForFree": True,
        "distribution": distribution,
        "recordSet": record_sets,
    }


# --- writing --------------------------------------------------------------------------------------


def write_plots(plots_dir: Path, classes: dict[str, Any]) -> list[Path]:
    """`<plots_dir>/<split>.csv` (class,count) for `dvc plots`; stale split files are removed."""
    written = []
    for split, rows in class_distribution(classes).items():
        path = plots_dir / f"{split}.csv"
        lines = ["class,count"] + [f"{_csv(name)},{n}" for name, n in rows]
        with atomic_path(path) as tmp:
            tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(path)
    return written


def _csv(value: str) -> str:
    return f'"{value.replace(chr(34), chr(34) * 2)}"' if any(c in value for c in ',"\n') else value


def write_docs(
    out_dir: Path,
    root: Path | None = None,
    params: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    plots_dir: Path | None = None,
) -> list[Path]:
    """Write README.md and croissant.json into `out_dir` (and the plot CSVs into `plots_dir`)."""
    info = gather(out_dir, root, params, metrics)
    write_text(out_dir / CARD, dataset_card(info))
    write_json(out_dir / CROISSANT, croissant(info))
    written = [out_dir / CARD, out_dir / CROISSANT]
    if plots_dir is not None:
        written += write_plots(plots_dir, info.classes)
    return written
