"""Read what pack wrote into one `ReleaseInfo`: product.json, classes.json, the indexes, the manifest,
and one streaming pass over every shard (member counts, the json schema, example samples)."""

from __future__ import annotations

import hashlib
import heapq
import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from stages.card.features import TypeNode
from stages.errors import TidepoolError, UpstreamFormatError
from stages.fsutil import file_digest
from stages.progress import bar

SPLITS = ("train", "val", "test")
DEFAULT_REPO_URL = "https://github.com/tidepool-data/tidepool"
EXAMPLES_PER_CLASS = 6  # what the viewer shows per class; the card's grid uses the first few


@dataclass(frozen=True)
class ShardFile:
    name: str
    split: str
    nsamples: int
    size: int
    md5: str
    sha256: str


@dataclass
class SampleRef:
    """One sample chosen as an example: where its members are, and its json document."""

    key: str
    split: str
    shard: str
    classes: tuple[int, ...]
    doc: dict[str, Any]
    members: dict[str, tuple[int, int]]  # ext -> (offset of the data in the shard, size)

    @property
    def source(self) -> str:
        return str(self.doc.get("source", ""))

    def read(self, out_dir: Path, ext: str) -> bytes:
        offset, size = self.members[ext]
        with open(out_dir / self.shard, "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
        if len(data) != size:
            raise UpstreamFormatError(out_dir / self.shard, f"member {self.key}.{ext} is truncated")
        return data


@dataclass
class Scan:
    samples: int = 0
    member_counts: dict[str, int] = field(default_factory=dict)  # ext -> samples that carry it
    json_types: TypeNode | None = None
    examples: dict[int, list[SampleRef]] = field(default_factory=dict)  # class -> by key hash


@dataclass
class ReleaseInfo:
    """Everything the card, the Croissant file and the viewer say, read once."""

    name: str
    product: dict[str, Any]  # product.json
    classes: dict[str, Any]  # classes.json
    shards: list[ShardFile]
    files: dict[str, dict[str, Any]]  # manifest.parquet / classes.json -> {size, sha256}
    by_source: dict[str, dict[str, int]]  # source -> split -> samples (manifest)
    members: list[str]  # member extensions pack writes for this product (product.json `fields`)
    manifest_columns: list[tuple[str, str]]  # (name, arrow type) of manifest.parquet
    scan: Scan = field(default_factory=Scan)
    quarantine: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> "kind: reason" -> n
    dedup: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # pack metrics `skipped`
    split_params: dict[str, Any] = field(default_factory=dict)
    source_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # params `sources.<s>`
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

    @property
    def present_splits(self) -> list[str]:
        return [s for s, v in self.split_counts().items() if v["shards"]]

    @property
    def image_exts(self) -> list[str]:
        """The members that can hold the picture (jpg, png or webp; never the mask). reef-points'
        `images` layout lists both jpg and png: each sample carries the one upstream gave."""
        return [m for m in self.members if m.rsplit(".", 1)[-1] in ("jpg", "png", "webp") and m != "seg.png"]

    @property
    def image_ext(self) -> str | None:
        """The first picture member of the plan."""
        return next(iter(self.image_exts), None)

    @property
    def digest(self) -> str:
        """A digest of the release's shards: differs between products and between releases."""
        h = hashlib.sha256(self.name.encode())
        for shard in self.shards:
            h.update(f"\0{shard.name}\0{shard.sha256}".encode())
        return h.hexdigest()[:16]

    def class_names(self) -> dict[int, str]:
        return {int(e["index"]): str(e.get("name", e["index"])) for e in self.classes.get("classes") or []}


# --- reading --------------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise TidepoolError(f"{path}: missing; the pack stage writes it before the card") from exc
    except ValueError as exc:
        raise UpstreamFormatError(path, f"not valid JSON: {exc}") from exc


def plan_members(product: dict[str, Any], out_dir: Path) -> list[str]:
    """The member extensions of the product's plan (product.json `fields`), sorted.

    Pack lists there every extension it writes for the product, optional ones included (reef-images'
    `seg.png`), so record sets and features do not depend on which sample happens to come first.
    """
    fields = product.get("fields")
    if not isinstance(fields, dict) or not fields:
        raise UpstreamFormatError(out_dir / "product.json", "no `fields` (member extension -> what it holds)")
    return sorted(str(k) for k in fields)


def key_rank(key: str, cls: int) -> int:
    """The deterministic order examples of class `cls` are chosen in: a hash of the class and the
    sample key, so a release that adds samples keeps most of its examples, and a multilabel sample
    is not the first example of every class it has."""
    return int.from_bytes(hashlib.sha256(f"{cls}\0{key}".encode()).digest()[:8], "big")


def sample_classes(doc: dict[str, Any], cls: int | None, names: dict[str, int]) -> tuple[int, ...]:
    """Class indices (classes.json) a sample counts for, from what each product kind writes."""
    if cls is not None:
        return (cls,)
    multilabel = doc.get("multilabel")
    if isinstance(multilabel, dict) and isinstance(multilabel.get("values"), list):
        return tuple(i for i, v in enumerate(multilabel["values"]) if v == 1)
    present = doc.get("present")
    if isinstance(present, list):
        return tuple(sorted({names[p] for p in present if p in names}))
    points = doc.get("points")
    if isinstance(points, list):  # reef-points with `layout: images`: the classes of its points
        found = set()
        for p in points:
            c = p.get("class") if isinstance(p, dict) else None
            if isinstance(c, dict) and isinstance(c.get("index"), int):
                found.add(c["index"])
        return tuple(sorted(found))
    c = doc.get("class")
    if isinstance(c, dict) and isinstance(c.get("index"), int):
        return (c["index"],)
    return ()


class _Examples:
    """Per class, the `k` samples with the smallest `key_rank` (a bounded max-heap each)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.heaps: dict[int, list[tuple[int, str, SampleRef]]] = {}

    def offer(self, ref: SampleRef) -> None:
        for c in ref.classes:
            heap = self.heaps.setdefault(c, [])
            item = (-key_rank(ref.key, c), ref.key, ref)
            if len(heap) < self.k:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)

    def result(self) -> dict[int, list[SampleRef]]:
        return {
            c: [ref for _, _, ref in sorted(heap, key=lambda t: (-t[0], t[1]))]
            for c, heap in sorted(self.heaps.items())
        }


def _samples(
    tar: tarfile.TarFile, path: Path
) -> Iterator[tuple[str, dict[str, tuple[int, int]], dict[str, Any], int | None]]:
    """(key, ext -> (data offset, size), json document, cls) per sample, in shard order."""
    key: str | None = None
    members: dict[str, tuple[int, int]] = {}
    doc: dict[str, Any] = {}
    cls: int | None = None
    for member in tar:
        if not member.isfile():
            continue
        stem, _, ext = member.name.partition(".")
        if stem != key:
            if key is not None:
                yield key, members, doc, cls
            key, members, doc, cls = stem, {}, {}, None
        members[ext] = (member.offset_data, member.size)
        if ext == "json":
            doc = _load_doc(tar, member, path)
        elif ext == "cls":
            cls = _load_cls(tar, member, path)
    if key is not None:
        yield key, members, doc, cls


def scan_shards(out_dir: Path, shards: list[ShardFile], classes: dict[str, Any], k: int) -> Scan:
    """One streaming pass over every shard: which members samples carry, the union schema of their
    json members, and `k` example samples per class. Memory is bounded by the examples kept."""
    names = {str(e.get("name")): int(e["index"]) for e in classes.get("classes") or []}
    scan = Scan()
    types = TypeNode()
    counts: Counter[str] = Counter()
    examples = _Examples(k)
    with bar(total=len(shards), desc="card: reading shards", unit="shard") as progress:
        for shard in shards:
            path = out_dir / shard.name
            try:
                with tarfile.open(path, "r:") as tar:
                    for key, members, doc, cls in _samples(tar, path):
                        scan.samples += 1
                        counts.update(members.keys())
                        if "json" in members:
                            types.add(doc)
                        classes_of = sample_classes(doc, cls, names)
                        examples.offer(SampleRef(key, shard.split, shard.name, classes_of, doc, members))
            except tarfile.TarError as exc:
                raise UpstreamFormatError(path, f"not a readable tar: {exc}") from exc
            progress.update(1)
    scan.member_counts = dict(sorted(counts.items()))
    scan.examples = examples.result()
    scan.json_types = types if counts.get("json") else None
    return scan


def _load_doc(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> dict[str, Any]:
    fh = tar.extractfile(member)
    try:
        doc = json.loads(fh.read()) if fh is not None else None
    except ValueError as exc:
        raise UpstreamFormatError(path, f"member {member.name} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise UpstreamFormatError(path, f"member {member.name} is not a JSON object")
    return doc


def _load_cls(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> int:
    fh = tar.extractfile(member)
    text = fh.read().decode("ascii", "replace").strip() if fh is not None else ""
    try:
        return int(text)
    except ValueError as exc:
        raise UpstreamFormatError(path, f"member {member.name} is not a class index: {text[:20]!r}") from exc


def gather(
    out_dir: Path,
    root: Path | None = None,
    params: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    examples_per_class: int = EXAMPLES_PER_CLASS,
) -> ReleaseInfo:
    """Read what pack wrote in `out_dir` (and, with `root`, the quarantine tables and dedup clusters)."""
    product = read_json(out_dir / "product.json")
    name = str(product.get("product", out_dir.name))
    classes = read_json(out_dir / "classes.json")
    shards: list[ShardFile] = []
    for split in SPLITS:
        index_path = out_dir / f"{split}.index.json"
        if not index_path.exists() and not int(
            ((product.get("splits") or {}).get(split) or {}).get("shards", 0)
        ):
            continue  # an empty split has no index
        index = read_json(index_path)
        for entry in index.get("shardlist", []):
            path = out_dir / entry["url"]
            if not path.is_file():
                raise UpstreamFormatError(index_path, f"lists {entry['url']}, which is missing")
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
        manifest = pq.ParquetFile(out_dir / "manifest.parquet").read(
            columns=["source", "split"], use_threads=False
        )
        schema = pq.read_schema(out_dir / "manifest.parquet")
    except (OSError, ValueError) as exc:  # pyarrow: ArrowInvalid is a ValueError
        raise UpstreamFormatError(
            out_dir / "manifest.parquet", f"no readable source/split columns: {exc}"
        ) from exc
    by_source: dict[str, Counter[str]] = {}
    for source, split in zip(manifest.column("source").to_pylist(), manifest.column("split").to_pylist()):
        by_source.setdefault(str(source), Counter())[str(split)] += 1
    info = ReleaseInfo(
        name=name,
        product=product,
        classes=classes,
        shards=shards,
        files=files,
        by_source={s: {sp: c[sp] for sp in SPLITS} for s, c in sorted(by_source.items())},
        members=plan_members(product, out_dir),
        manifest_columns=[(f.name, str(f.type)) for f in schema],
        scan=scan_shards(out_dir, shards, classes, examples_per_class),
        skipped=dict(sorted(((metrics or {}).get("skipped") or {}).items())),
    )
    if params is not None:
        info.split_params = dict(params.get("split") or {})
        info.repo_url = str((params.get("release") or {}).get("repo_url") or DEFAULT_REPO_URL)
        info.source_params = {s: dict((params.get("sources") or {}).get(s) or {}) for s in info.sources}
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
        table = pq.ParquetFile(path).read(columns=["record_kind", "reason"], use_threads=False)
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
    table = pq.ParquetFile(path).read(columns=["cluster_id", "sample_id", "source"], use_threads=False)
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
