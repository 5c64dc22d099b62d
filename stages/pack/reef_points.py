"""reef-points product: pyspacer patches around annotated points, or whole images with their points.

Work unit = one image with all its points (in (row, col, point_id) order): the image is decoded
once and every patch is cut from that one decode, so units, shard order and cut points are by the
image's sample id, not the point's. Points of an image therefore sit together in one shard (a
shuffle buffer of a few hundred samples mixes them; they share a split anyway).

`layout: patches` (default): one sample per kept point. The patch is pyspacer's
(`spacer.extract_features.crop_patches`): the RGB image reflect-padded by `patch_size` on every
side (`np.pad(..., mode="reflect")`), and the `patch_size` square whose top-left is
`int(row + patch_size - patch_size / 2)`, `int(col + ...)` in padded coordinates, unresized. For
the default 224 that is `(row + 112, col + 112)`, i.e. SOURCES §2's `(row+224-112, col+224-112)`;
for an odd size pyspacer's truncation gives `row + patch_size // 2`. Images are converted to RGB
first (palette expanded, alpha dropped). Only windows that cross the border get reflected pixels
(codec.cut_patch): the same pixels, without padding the whole image.
Members: `webp`, `png` or `jpg` (the patch, product encoder settings), `cls` (class index at
`label_level`, see ReefClasses), `json`: key, point_id, sample_id, image_id (upstream), source,
split, license, attribution, point {row, col}, image {width, height}, patch {size, top, left}
(window in image coordinates; may extend past the border, where pixels are reflected), labels
{benthic_attribute_id/name, growth_form_id/name, top_level_category, source_label_id,
source_label}, class {level, index, name}, region, lat, lon, captured_at.

`layout: images`: one sample per image (key = the image's sample id). Members: `jpg` or `png`,
the upstream file's bytes unchanged (checked against the sha256 ingest recorded; an image in
another format is decoded and stored losslessly, as `webp` or `png`), and `json`: sample_id,
image_id, source, split, license, attribution, image {width, height, format}, patch_size,
points [{point_id, row, col, labels, class}] in (row, col, point_id) order, region, lat, lon,
captured_at. No `cls`. The reader in docs/pack.md cuts pyspacer's patches from it on the fly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages import products as prod
from stages.errors import UpstreamFormatError
from stages.imaging import ImageProblem, open_bounded
from stages.pack import (
    ImageSettings,
    PackContext,
    ProductPlan,
    SampleOut,
    SampleRow,
    Unit,
    UnitOut,
    check_key,
    check_size,
    cut_patch,
    digest,
    encode_rgb,
    guarded,
    manifest_facts,
    num,
    open_image,
    read_arrow,
    release_memory,
    rgb_array,
    sample_json,
    select_samples,
)
from stages.pack.codec import read_verified, window
from stages.pack.tarwriter import sample_bytes
from stages.taxonomy_index import TOP_LEVEL_CATEGORIES, Taxonomy

COLUMNS = [
    "upstream_id",
    "image_path",
    "image_format",
    "file_sha256",
    "width",
    "height",
    "license",
    "attribution",
    "region",
    "lat",
    "lon",
    "captured_at",
    "site",
]
POINT_COLUMNS = [
    "point_id",
    "sample_id",
    "row",
    "col",
    "source_label_id",
    "source_label",
    "benthic_attribute_id",
    "benthic_attribute_name",
    "growth_form_id",
    "growth_form_name",
    "top_level_category",
]
# Repeated strings: dictionary-encoded, so the points table costs a few bytes per point per
# column instead of a string each (5M points stay well under a GiB).
DICTIONARY_COLUMNS = (
    "sample_id",
    "source_label_id",
    "source_label",
    "benthic_attribute_id",
    "benthic_attribute_name",
    "growth_form_id",
    "growth_form_name",
    "top_level_category",
)
UPSTREAM_EXT = {"JPEG": "jpg", "PNG": "png"}


class ReefClasses:
    """Class indices in the MERMAID taxonomy, fixed by the taxonomy snapshot, not by the data.

    - `top_level`: the 12 top-level categories in their fixed order (0..11).
    - `attribute`: every attribute of the snapshot, sorted by (top-level category, name, id), so
      indices of one category are contiguous. Adding samples never renumbers; a snapshot that
      adds attributes renumbers those sorted after them.
    - `attribute_growth_form`: `attribute index * (G + 1) + slot`, slot 0 = no growth form and
      1..G = the snapshot's growth forms by name: every pair has an index, present or not.
    `classes.json` lists the whole space with per-split counts, so a trainer can size a head or
    compact to the classes present.
    """

    def __init__(self, taxonomy: Taxonomy, level: str) -> None:
        if level not in prod.LABEL_LEVELS:
            raise ValueError(level)
        self.level = level
        self.taxonomy = taxonomy
        top_rank = {name: i for i, name in enumerate(TOP_LEVEL_CATEGORIES)}

        def top_of(attr_id: str) -> str | None:
            try:
                return taxonomy.top_level(attr_id)
            except (KeyError, UpstreamFormatError):
                return None  # a broken chain elsewhere in the snapshot must not stop this product

        attrs = []
        for attr_id, attr in taxonomy.attributes.items():
            top = top_of(attr_id)
            attrs.append(
                (
                    top_rank.get(top, len(top_rank)),
                    str(attr["name"]).casefold(),
                    str(attr["name"]),
                    attr_id,
                    top,
                )
            )
        attrs.sort()
        self.attributes = [
            {
                "id": a[3],
                "name": a[2],
                "top_level_category": a[4],
                "parent": taxonomy.attributes[a[3]].get("parent"),
            }
            for a in attrs
        ]
        self.attribute_index = {a["id"]: i for i, a in enumerate(self.attributes)}
        self.growth_forms = sorted(
            taxonomy.growth_forms.items(), key=lambda kv: (kv[1].casefold(), kv[1], kv[0])
        )
        self.slot = {gf_id: k + 1 for k, (gf_id, _) in enumerate(self.growth_forms)}
        self.top_index = top_rank

    @property
    def num_classes(self) -> int:
        if self.level == "top_level":
            return len(TOP_LEVEL_CATEGORIES)
        if self.level == "attribute":
            return len(self.attributes)
        return len(self.attributes) * (len(self.growth_forms) + 1)

    def index(self, attr_id: str | None, gf_id: str | None, top: str | None, where: str) -> int:
        if self.level == "top_level":
            if top not in self.top_index:
                raise UpstreamFormatError(where, f"top-level category {top!r} is not one of the 12")
            return self.top_index[top]
        if attr_id not in self.attribute_index:
            raise UpstreamFormatError(where, f"benthic attribute {attr_id!r} is not in the taxonomy snapshot")
        a = self.attribute_index[attr_id]
        if self.level == "attribute":
            return a
        if gf_id is not None and gf_id not in self.slot:
            raise UpstreamFormatError(where, f"growth form {gf_id!r} is not in the taxonomy snapshot")
        return a * (len(self.growth_forms) + 1) + (self.slot[gf_id] if gf_id is not None else 0)

    def name(self, index: int) -> str:
        if self.level == "top_level":
            return TOP_LEVEL_CATEGORIES[index]
        if self.level == "attribute":
            return self.attributes[index]["name"]
        a, slot = divmod(index, len(self.growth_forms) + 1)
        attr = self.attributes[a]["name"]
        return attr if slot == 0 else f"{attr} / {self.growth_forms[slot - 1][1]}"

    def entries(self) -> list[dict[str, Any]]:
        if self.level == "top_level":
            return [{"index": i, "name": n} for i, n in enumerate(TOP_LEVEL_CATEGORIES)]
        if self.level == "attribute":
            return [{"index": i, **a} for i, a in enumerate(self.attributes)]
        out = []
        for a, attr in enumerate(self.attributes):
            for slot, (gf_id, gf_name) in enumerate([(None, None), *self.growth_forms]):
                index = a * (len(self.growth_forms) + 1) + slot
                out.append(
                    {
                        "index": index,
                        "name": self.name(index),
                        "attribute_id": attr["id"],
                        "attribute": attr["name"],
                        "growth_form_id": gf_id,
                        "growth_form": gf_name,
                        "top_level_category": attr["top_level_category"],
                    }
                )
        return out

    def class_map(self) -> dict[str, Any]:
        return {
            "task": "classification",
            "level": self.level,
            "index": {
                "top_level": "the 12 MERMAID top-level categories in their fixed order",
                "attribute": "every benthic attribute of the taxonomy snapshot, sorted by "
                "(top-level category, name, id)",
                "attribute_growth_form": "attribute index * (growth forms + 1) + slot; "
                "slot 0 = no growth form, 1.. = growth forms by name",
            }[self.level],
            "num_classes": self.num_classes,
            "growth_forms": [
                {"slot": k + 1, "id": i, "name": n} for k, (i, n) in enumerate(self.growth_forms)
            ],
            "classes": self.entries(),
        }


def load_points(ctx: PackContext, selected_ids: list[str]) -> tuple[pa.Table, dict[str, tuple[int, int]]]:
    """The points of the selected images in (sample_id, row, col, point_id) order, kept in Arrow,
    and each image's span of rows [start, end) in that table."""
    tables = [
        read_arrow(
            ctx.interim(s) / "points.parquet", POINT_COLUMNS, f"point table of {s}", DICTIONARY_COLUMNS
        )
        for s in ctx.product.sources
    ]
    wanted = pa.array(selected_ids, pa.string())
    tables = [t.filter(pc.is_in(t.column("sample_id"), value_set=wanted)) for t in tables if t.num_rows]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in POINT_COLUMNS}), {}
    table = pa.concat_tables(tables, promote_options="permissive").unify_dictionaries().combine_chunks()
    del tables
    sample = table.column("sample_id").chunk(0) if table.num_rows else None
    if not isinstance(sample, pa.DictionaryArray):
        sample = pc.dictionary_encode(table.column("sample_id")).combine_chunks()
    names = sample.dictionary
    indices = sample.indices.to_numpy(zero_copy_only=False)
    keep_name = pc.is_in(names, value_set=pa.array(selected_ids, pa.string())).to_numpy(zero_copy_only=False)
    rank_of_name = np.empty(len(names), dtype=np.int64)
    rank_of_name[pc.sort_indices(names).to_numpy()] = np.arange(len(names))
    mask = keep_name[indices]
    table = table.filter(pa.array(mask)).append_column("_rank", pa.array(rank_of_name[indices[mask]]))
    table = table.sort_by(
        [("_rank", "ascending"), ("row", "ascending"), ("col", "ascending"), ("point_id", "ascending")]
    )
    ranks = table.column("_rank").to_numpy()
    table = table.drop_columns(["_rank"])
    spans: dict[str, tuple[int, int]] = {}
    if len(ranks):
        starts = np.flatnonzero(np.r_[True, ranks[1:] != ranks[:-1]])
        ends = np.r_[starts[1:], len(ranks)]
        name_of_rank = pc.sort_indices(names).to_numpy()
        for start, end in zip(starts.tolist(), ends.tolist()):
            spans[names[int(name_of_rank[ranks[start]])].as_py()] = (start, end)
    release_memory()  # the read and sort copies are done with
    return table, spans


def plan(ctx: PackContext) -> ProductPlan:
    # The ingest labels JSON is the largest column; only the images layout's manifest uses it.
    selected, skipped = select_samples(ctx, COLUMNS, labels=ctx.settings.layout == "images")
    selected = selected.drop(columns=["phash", "mask_path"])
    points, spans = load_points(ctx, [str(s) for s in selected["sample_id"]])
    classes = ReefClasses(Taxonomy.load(ctx.taxonomy_dir), ctx.settings.label_level)
    size = int(ctx.settings.patch_size or 224)
    rows = {sid: row for sid, row in zip(selected["sample_id"], selected.to_dict("records"))}
    del selected
    keys: dict[str, list[str]] = {}
    no_points = 0
    for sid in sorted(rows):
        if sid not in spans:
            no_points += 1  # usable per its labels, yet no point row: counted, not packed
            continue
        keys.setdefault(rows[sid]["split"], []).append(check_key(sid, f"reef-points image {sid}"))
    if no_points:
        skipped = dict(sorted({**skipped, "no_point_rows": no_points}.items()))
    layout = ctx.settings.layout
    settings = ctx.settings.image
    ext = settings.ext

    def point_records(key: str) -> list[dict[str, Any]]:
        start, end = spans[key]
        img = rows[key]
        out = []
        for p in points.slice(start, end - start).to_pylist():
            point_id = check_key(p["point_id"], f"reef-points point of {key}")
            where = f"data/interim/{img['source']}/points.parquet point {point_id}"
            attr_id, gf_id, top = p["benthic_attribute_id"], p["growth_form_id"], p["top_level_category"]
            cls = classes.index(attr_id, gf_id, top, where)
            labels = {
                "benthic_attribute_id": attr_id,
                "benthic_attribute_name": p["benthic_attribute_name"],
                "growth_form_id": gf_id,
                "growth_form_name": p["growth_form_name"],
                "top_level_category": top,
                "source_label_id": p["source_label_id"],
                "source_label": p["source_label"],
            }
            out.append(
                {
                    "point_id": point_id,
                    "row": int(p["row"]),
                    "col": int(p["col"]),
                    "cls": cls,
                    "labels": labels,
                }
            )
        return out

    def common(img: dict[str, Any], key: str, split: str) -> dict[str, Any]:
        return {
            "sample_id": key,
            "image_id": img["upstream_id"],
            "source": img["source"],
            "split": split,
            "license": img["license"],
            "attribution": img["attribution"],
            "region": img["region"],
            "lat": num(img["lat"]),
            "lon": num(img["lon"]),
            "captured_at": img["captured_at"],
        }

    def make_patches_unit(key: str, split: str) -> Unit:
        img = rows[key]
        base = common(img, key, split)
        width, height = int(img["width"]), int(img["height"])
        samples, sample_rows = [], []
        facts = manifest_facts(img)
        for p in point_records(key):
            point_id, row, col, cls = p["point_id"], p["row"], p["col"], p["cls"]
            top_pad, left_pad = window(row, col, size)
            doc = {
                **base,
                "key": point_id,
                "point_id": point_id,
                "point": {"row": row, "col": col},
                "image": {"width": width, "height": height},
                "patch": {"size": size, "top": top_pad - size, "left": left_pad - size},
                "labels": p["labels"],
                "class": {"level": classes.level, "index": cls, "name": classes.name(cls)},
            }
            meta = {
                "sample_id": key,
                "point_id": point_id,
                "source": img["source"],
                "upstream_id": img["upstream_id"],
                "license": img["license"],
                "cls": cls,
                "label": classes.name(cls),
                "row": row,
                "col": col,
                "labels": sample_json(p["labels"]).decode(),
                "benthic_attribute": p["labels"]["benthic_attribute_name"],
                "growth_form": p["labels"]["growth_form_name"],
                "top_level_category": p["labels"]["top_level_category"],
                "source_label": p["labels"]["source_label"],
                **facts,
            }
            samples.append((point_id, row, col, sample_json(doc), cls))
            sample_rows.append(SampleRow(point_id, meta, (cls,)))
        payload = (str(ctx.path(img["image_path"])), width, height, size, ext, settings, tuple(samples))
        inputs = None
        if img["file_sha256"]:
            inputs = {
                "image": img["file_sha256"],
                "size": [width, height],
                "samples": digest(*(part for s in samples for part in s)),
            }
        return Unit(key, split, payload, tuple(sample_rows), inputs)

    def make_images_unit(key: str, split: str) -> Unit:
        img = rows[key]
        width, height = int(img["width"]), int(img["height"])
        pts = point_records(key)
        doc = {
            **common(img, key, split),
            "image": {"width": width, "height": height, "format": img["image_format"]},
            "patch_size": size,
            "label_level": classes.level,
            "points": [
                {
                    "point_id": p["point_id"],
                    "row": p["row"],
                    "col": p["col"],
                    "labels": p["labels"],
                    "class": {"index": p["cls"], "name": classes.name(p["cls"])},
                }
                for p in pts
            ],
        }
        meta = {
            "sample_id": key,
            "source": img["source"],
            "upstream_id": img["upstream_id"],
            "license": img["license"],
            "labels": img.get("labels"),
            **manifest_facts(img),
        }
        doc_bytes = sample_json(doc)
        payload = (str(ctx.path(img["image_path"])), img["file_sha256"], width, height, settings, doc_bytes)
        row = SampleRow(key, meta, tuple(p["cls"] for p in pts))
        inputs = (
            {"image": img["file_sha256"], "size": [width, height], "json": digest(doc_bytes)}
            if img["file_sha256"]
            else None
        )
        return Unit(key, split, payload, (row,), inputs)

    n_points = sum(spans[k][1] - spans[k][0] for ks in keys.values() for k in ks)
    if layout == "images":
        fields = {
            "jpg": "the whole image: the upstream JPEG bytes, unchanged",
            "png": "the whole image: the upstream PNG bytes, unchanged",
            "json": f"all points of the image with their labels and classes; cut the {size}x{size} "
            "pyspacer patches with the reader in the dataset card",
        }
        if ext == "webp":
            fields["webp"] = "the whole image, lossless WebP (upstream formats other than JPEG and PNG)"
        encode, make_unit, chunksize = encode_images, make_images_unit, 4
    else:
        fields = {
            ext: f"the {size}x{size} pyspacer patch centred on the point (reflect padding, no resize)",
            "cls": f"class index at label level `{classes.level}` (classes.json)",
            "json": "point, image id, all labels of the point, source, licence and attribution",
        }
        encode, make_unit, chunksize = encode_patches, make_patches_unit, 1  # a unit is tens of patches
    return ProductPlan(
        keys=keys,
        make_unit=make_unit,
        encode=encode,
        classes=classes.class_map(),
        fields=fields,
        skipped=skipped,
        chunksize=chunksize,
        extra_metrics={"points": n_points, "images": sum(len(v) for v in keys.values())},
        num_classes=classes.num_classes,
    )


def _encode_patches(unit: Unit) -> UnitOut:
    path_str, width, height, size, ext, settings, samples = unit.payload
    path = Path(path_str)
    rgb = rgb_array(open_image(path, settings.max_pixels), path)
    check_size(rgb, (width, height), path)
    out = []
    for key, row, col, doc, cls in samples:
        members = {ext: encode_rgb(cut_patch(rgb, row, col, size), settings), "cls": b"%d" % cls, "json": doc}
        out.append(SampleOut(key, sample_bytes(key, members)))
    return UnitOut(unit.key, unit.split, tuple(out), decodes=1)


def encode_patches(unit: Unit) -> UnitOut:
    return guarded(_encode_patches, unit)


def _encode_images(unit: Unit) -> UnitOut:
    path_str, sha256, width, height, settings, doc = unit.payload
    settings: ImageSettings
    path = Path(path_str)
    data = read_verified(path, sha256)
    try:
        header = open_bounded(data, settings.max_pixels)
    except ImageProblem as exc:
        raise UpstreamFormatError(path, f"image does not open: {exc.detail}") from exc
    if header.size != (width, height):
        raise UpstreamFormatError(
            path, f"image is {header.size[0]}x{header.size[1]}, the sample table says {width}x{height}"
        )
    decodes = 0
    ext = UPSTREAM_EXT.get(str(header.format))
    if ext is None:
        # Not a JPEG or PNG: keep it lossless in the product's lossless codec (PNG unless WebP).
        rgb = rgb_array(open_image(path, settings.max_pixels), path)
        lossless = (
            settings
            if settings.lossless
            else ImageSettings(
                "png", settings.jpeg_quality, settings.png_compress_level, None, settings.max_pixels
            )
        )
        ext, data, decodes = lossless.ext, encode_rgb(rgb, lossless), 1
    members = {ext: data, "json": doc}
    return UnitOut(
        unit.key, unit.split, (SampleOut(unit.key, sample_bytes(unit.key, members)),), decodes=decodes
    )


def encode_images(unit: Unit) -> UnitOut:
    return guarded(_encode_images, unit)


# Kept for callers of the patches encoder under its old name.
encode = encode_patches
