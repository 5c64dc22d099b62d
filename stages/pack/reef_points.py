"""reef-points product: one sample per annotated point, the pyspacer patch around it.

Work unit = one image with all its points (in (row, col, point_id) order): the image is decoded
once and every patch is cut from that one decode, so units, shard order and cut points are by the
image's sample id, not the point's. Points of an image therefore sit together in one shard (a
shuffle buffer of a few hundred samples mixes them; they share a split anyway).

The patch is pyspacer's (`spacer.extract_features.crop_patches`): the RGB image is reflect-padded
by `patch_size` on every side (`np.pad(..., mode="reflect")`) and the window of `patch_size`
square whose top-left is `int(row + patch_size - patch_size / 2)`, `int(col + ...)` in padded
coordinates is taken, unresized. For the default 224 that is `(row + 112, col + 112)`, i.e.
SOURCES §2's `(row+224-112, col+224-112)`; for an odd size pyspacer's truncation gives
`row + patch_size // 2`. Images are converted to RGB first (palette expanded, alpha dropped).

Members: `png` or `jpg` (the patch, product encoder settings), `cls` (class index at
`label_level`, see ReefClasses), `json`: key, point_id, sample_id, image_id (upstream), source,
split, license, attribution, point {row, col}, image {width, height}, patch {size, top, left}
(window in image coordinates; may extend past the border, where pixels are reflected), labels
{benthic_attribute_id/name, growth_form_id/name, top_level_category, source_label_id,
source_label}, class {level, index, name}, region, lat, lon, captured_at.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages import products as prod
from stages.errors import UpstreamFormatError
from stages.pack import (
    PackContext,
    ProductPlan,
    SampleOut,
    Unit,
    UnitOut,
    check_key,
    check_size,
    encode_rgb,
    guarded,
    num,
    open_image,
    read_table,
    rgb_array,
    sample_json,
    select_samples,
)
from stages.pack.tarwriter import sample_bytes
from stages.taxonomy_index import TOP_LEVEL_CATEGORIES, Taxonomy

COLUMNS = [
    "upstream_id",
    "image_path",
    "width",
    "height",
    "license",
    "attribution",
    "region",
    "lat",
    "lon",
    "captured_at",
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


def load_points(ctx: PackContext, selected: pd.DataFrame) -> pd.DataFrame:
    frames = [
        read_table(ctx.interim(s) / "points.parquet", POINT_COLUMNS, f"point table of {s}")
        for s in ctx.product.sources
    ]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in POINT_COLUMNS})
    points = prod.product_points(ctx.product, pd.concat(frames, ignore_index=True), selected)
    return points.sort_values(["sample_id", "row", "col", "point_id"], kind="stable").reset_index(drop=True)


def window(row: int, col: int, size: int) -> tuple[int, int]:
    """Top-left of the patch in reflect-padded coordinates, exactly pyspacer's `crop_simple`."""
    return int(row + size - size / 2), int(col + size - size / 2)


def plan(ctx: PackContext) -> ProductPlan:
    selected, skipped = select_samples(ctx, COLUMNS)
    points = load_points(ctx, selected)
    classes = ReefClasses(Taxonomy.load(ctx.taxonomy_dir), ctx.settings.label_level)
    size = int(ctx.settings.patch_size or 224)
    rows = {sid: row for sid, row in zip(selected["sample_id"], selected.to_dict("records"))}
    cols = {c: points[c].tolist() for c in POINT_COLUMNS}
    spans: dict[str, tuple[int, int]] = {}
    for i, sid in enumerate(cols["sample_id"]):
        start, _ = spans.get(sid, (i, i))
        spans[sid] = (start, i + 1)
    keys: dict[str, list[str]] = {}
    no_points = 0
    for sid, split in zip(selected["sample_id"], selected["split"]):
        if sid not in spans:
            no_points += 1  # usable per its labels, yet no point row: counted, not packed
            continue
        keys.setdefault(split, []).append(check_key(sid, f"reef-points image {sid}"))
    if no_points:
        skipped = dict(sorted({**skipped, "no_point_rows": no_points}.items()))
    ext = ctx.settings.image.ext

    def make_unit(key: str, split: str) -> Unit:
        img = rows[key]
        start, end = spans[key]
        samples = []
        for i in range(start, end):
            point_id = check_key(cols["point_id"][i], f"reef-points point of {key}")
            row, col = int(cols["row"][i]), int(cols["col"][i])
            attr_id, gf_id, top = (
                cols["benthic_attribute_id"][i],
                cols["growth_form_id"][i],
                cols["top_level_category"][i],
            )
            where = f"data/interim/{img['source']}/points.parquet point {point_id}"
            cls = classes.index(attr_id, gf_id, top, where)
            labels = {
                "benthic_attribute_id": attr_id,
                "benthic_attribute_name": cols["benthic_attribute_name"][i],
                "growth_form_id": gf_id,
                "growth_form_name": cols["growth_form_name"][i],
                "top_level_category": top,
                "source_label_id": cols["source_label_id"][i],
                "source_label": cols["source_label"][i],
            }
            top_pad, left_pad = window(row, col, size)
            doc = {
                "key": point_id,
                "point_id": point_id,
                "sample_id": key,
                "image_id": img["upstream_id"],
                "source": img["source"],
                "split": split,
                "license": img["license"],
                "attribution": img["attribution"],
                "point": {"row": row, "col": col},
                "image": {"width": int(img["width"]), "height": int(img["height"])},
                "patch": {"size": size, "top": top_pad - size, "left": left_pad - size},
                "labels": labels,
                "class": {"level": classes.level, "index": cls, "name": classes.name(cls)},
                "region": img["region"],
                "lat": num(img["lat"]),
                "lon": num(img["lon"]),
                "captured_at": img["captured_at"],
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
                "labels": sample_json(labels).decode(),
            }
            samples.append((point_id, row, col, sample_json(doc), cls, meta))
        payload = (
            str(ctx.path(img["image_path"])),
            int(img["width"]),
            int(img["height"]),
            size,
            ext,
            ctx.settings.image,
            tuple(samples),
        )
        return Unit(key, split, payload)

    n_points = sum(e - s for s, e in spans.values())
    return ProductPlan(
        keys=keys,
        make_unit=make_unit,
        encode=encode,
        classes=classes.class_map(),
        fields={
            ext: f"the {size}x{size} pyspacer patch centred on the point (reflect padding, no resize)",
            "cls": f"class index at label level `{classes.level}` (classes.json)",
            "json": "point, image id, all labels of the point, source, licence and attribution",
        },
        skipped=skipped,
        chunksize=1,  # a unit is already tens of patches
        extra_metrics={"points": n_points, "images": sum(len(v) for v in keys.values())},
    )


def _encode(unit: Unit) -> UnitOut:
    path_str, width, height, size, ext, settings, samples = unit.payload
    path = Path(path_str)
    rgb = rgb_array(open_image(path, settings.max_pixels))
    check_size(rgb, (width, height), path)
    padded = np.pad(rgb, ((size, size), (size, size), (0, 0)), mode="reflect")
    out = []
    for key, row, col, doc, cls, meta in samples:
        top, left = window(row, col, size)
        patch = padded[top : top + size, left : left + size]
        members = {ext: encode_rgb(patch, settings), "cls": b"%d" % cls, "json": doc}
        out.append(SampleOut(key, sample_bytes(key, members), meta, (cls,)))
    return UnitOut(unit.key, unit.split, tuple(out), decodes=1)


def encode(unit: Unit) -> UnitOut:
    return guarded(_encode, unit)
