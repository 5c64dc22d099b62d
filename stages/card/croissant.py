"""Croissant 1.1 JSON-LD for one product (`croissant.json` beside the shards).

One FileObject per shard with its sha256, the manifest and class map as FileObjects, one FileSet per
member extension of the product's plan (product.json `fields`, so an optional member such as
reef-images' `seg.png` has its record set even when the first sample lacks it), and record sets for
the splits, the samples (from the manifest) and each member.

Two properties mlcroissant needs that the obvious document lacks:

- **Exact includes.** A FileSet's `includes` is an fnmatch glob, where `*` also matches dots:
  `*.png` takes `<key>.seg.png` too. Keys have no dots, so `<key>.<ext>` is exactly "ends with
  `.<ext>` and not with the extension of a longer member"; `includes` spells that as a union of
  globs with character classes (`member_globs`).
- **contentUrls unique per product and release.** mlcroissant extracts an archive once into a cache
  folder named by a hash of its contentUrl, so a second product (or a second release of the same one)
  whose first shard is also `train-000000.tar` would be read from the first one's extraction. Each
  shard's contentUrl therefore passes through a folder named after the product and a digest of its
  shards: `croissant/<product>-<digest>/../../train-000000.tar`. As a URL reference that resolves to
  `train-000000.tar` (RFC 3986 dot segments); on disk the folder exists (write_docs creates it with a
  README saying why), so mlcroissant's file check passes wherever the product folder is copied.
"""

from __future__ import annotations

from typing import Any

from stages.card.info import ReleaseInfo
from stages.card.licences import croissant_licences, product_bibtex
from stages.card.text import KINDS

CROISSANT_VERSION = "http://mlcommons.org/croissant/1.1"
CACHE_KEY_DIR = "croissant"

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
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "json": "application/json",
    "cls": "text/plain",
    "seg.png": "image/png",
}
ARROW_TYPES = {
    "string": "sc:Text",
    "large_string": "sc:Text",
    "int32": "sc:Integer",
    "int64": "sc:Integer",
    "double": "sc:Float",
    "float": "sc:Float",
    "bool": "sc:Boolean",
}


def cache_key_dir(info: ReleaseInfo) -> str:
    return f"{CACHE_KEY_DIR}/{info.name}-{info.digest}"


def content_url(info: ReleaseInfo, shard_name: str) -> str:
    return f"{cache_key_dir(info)}/../../{shard_name}"


def member_globs(ext: str, members: list[str]) -> list[str]:
    """fnmatch globs matching exactly the names `<key>.<ext>` (keys without dots) among members
    whose extensions are `members`: names ending in `.<ext>` minus those of longer extensions that
    end in it (`png` must not take `seg.png`).

    The complement of a set of forbidden suffixes is spelled as a union: for each proper suffix s
    of a forbidden prefix, `*[!c]` + s + `.<ext>` where c are the characters that would continue s
    towards a forbidden one, plus s + `.<ext>` alone for a name that is nothing but s.
    """
    forbidden = sorted("." + m[: -len(ext) - 1] for m in members if m != ext and m.endswith("." + ext))
    if not forbidden:
        return [f"*.{ext}"]
    globs: list[str] = []
    seen: set[str] = set()
    for f in forbidden:
        for i in range(len(f)):
            tail = f[len(f) - i :]  # the last i characters of the forbidden prefix, already matched
            if tail in seen:
                continue
            seen.add(tail)
            nexts = sorted({g[-i - 1] for g in forbidden if len(g) > i and g.endswith(tail)})
            globs.append(f"*[!{''.join(nexts)}]{tail}.{ext}")
            if tail:
                globs.append(f"{tail}.{ext}")
    return globs


def _field(rs: str, name: str, dtype: str, source: dict[str, Any], description: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"@type": "cr:Field", "@id": f"{rs}/{name}", "name": name, "dataType": dtype}
    if description:
        out["description"] = description
    out["source"] = source
    return out


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
                "contentUrl": content_url(info, shard.name),
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
    for ext in info.members if info.shards else []:
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
                "includes": member_globs(ext, info.members),
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
        "data": [{"splits/name": s} for s in ("train", "val", "test")],
    }
    sample_fields = []
    for name, arrow in info.manifest_columns:
        src = {"fileObject": {"@id": "manifest.parquet"}, "extract": {"column": name}}
        f = _field("samples", name, ARROW_TYPES.get(arrow, "sc:Text"), src)
        if name == "split":
            f["references"] = {"field": {"@id": "splits/name"}}
        sample_fields.append(f)
    samples_rs = {
        "@type": "cr:RecordSet",
        "@id": "samples",
        "name": "samples",
        "description": "One record per sample, from manifest.parquet: the WebDataset key, its shard and "
        "split, class and labels, source and licence.",
        "key": {"@id": "samples/key"},
        "field": sample_fields,
    }
    record_sets = [splits_rs, samples_rs]
    for ext, set_id in member_sets:
        rs = f"member-{ext.replace('.', '-')}"
        content_type = "sc:ImageObject" if MEDIA_TYPES.get(ext, "").startswith("image/") else "sc:Text"
        optional = info.scan.member_counts.get(ext, 0) < info.scan.samples
        record_sets.append(
            {
                "@type": "cr:RecordSet",
                "@id": rs,
                "name": rs,
                "description": f"The `.{ext}` member of each sample"
                + (" that has one" if optional else "")
                + ", keyed by the sample key.",
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
        "license": croissant_licences(info),
        "citeAs": product_bibtex(info),
        "creator": {"@type": "sc:Organization", "name": "tidepool", "url": info.repo_url},
        "keywords": ["webdataset", "marine", *kind.get("tags", [])],
        "isAccessibleForFree": True,
        "distribution": distribution,
        "recordSet": record_sets,
    }
