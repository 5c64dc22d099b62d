"""Example pictures of a product: the card's grid (`examples.png`) and the viewer's thumbnails.

Examples are the samples with the smallest hash of (class, key) per class (info.scan_shards), so the
choice is deterministic and mostly survives growth. Pixels are drawn with fixed resampling and
encoder settings: the same shards give the same bytes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from stages.card.info import ReleaseInfo, SampleRef
from stages.errors import UpstreamFormatError

GRID_FILE = "examples.png"
GRID_CLASSES = 12  # rows of the card's grid: the classes with most samples
GRID_PER_CLASS = 4
GRID_CELL = 80
GRID_LABEL = 180
GRID_COLOURS = 128  # a palette PNG keeps the grid small
RESAMPLE = Image.Resampling.BILINEAR
MASK_ALPHA = 110
# Distinct colours for mask classes (Okabe-Ito, then Tableau), repeated past 18 classes.
PALETTE = [
    (0, 114, 178), (230, 159, 0), (0, 158, 115), (213, 94, 0), (204, 121, 167), (86, 180, 233),
    (240, 228, 66), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0),
]  # fmt: skip


def colour(value: int) -> tuple[int, int, int]:
    return PALETTE[value % len(PALETTE)]


@dataclass(frozen=True)
class MaskLegend:
    """Mask value -> class name, and the values drawn transparent (ignore / unlabelled)."""

    names: dict[int, str]
    transparent: frozenset[int]


def mask_legend(classes: dict[str, Any], kind: str) -> MaskLegend | None:
    seg = classes.get("seg")
    if isinstance(seg, dict):  # reef-images: the Seatizen mask classes, value 0 unlabelled
        names = {int(c["value"]): str(c.get("name", c["value"])) for c in seg.get("classes") or []}
        return MaskLegend(names, frozenset(v for v, n in names.items() if n == "unlabelled"))
    if classes.get("task") == "segmentation" or kind == "coast-seg":
        names = {int(e["index"]): str(e.get("name")) for e in classes.get("classes") or []}
        return MaskLegend(names, frozenset({int(classes.get("ignore_index", 255))}))
    return None


def decode(data: bytes, where: str, mode: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UpstreamFormatError(where, f"member does not decode as an image: {exc}") from exc
    return img.convert(mode) if mode == "RGB" and img.mode != "RGB" else img


def fit(size: tuple[int, int], side: int) -> tuple[int, int]:
    w, h = size
    scale = side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def picture(info: ReleaseInfo, out_dir: Path, ref: SampleRef, side: int) -> Image.Image:
    """The sample's image scaled so its longer side is `side` (RGB)."""
    ext = next((e for e in info.image_exts if e in ref.members), None)
    if ext is None:
        raise UpstreamFormatError(out_dir / ref.shard, f"sample {ref.key} has no image member")
    img = decode(ref.read(out_dir, ext), f"{out_dir / ref.shard}: {ref.key}.{ext}", "RGB")
    return img.resize(fit(img.size, side), RESAMPLE)


def mask_overlay(
    info: ReleaseInfo, out_dir: Path, ref: SampleRef, size: tuple[int, int], legend: MaskLegend
) -> Image.Image | None:
    """The sample's mask as an RGBA picture of `size`: class colours, transparent where ignored."""
    if "seg.png" not in ref.members:
        return None
    mask = decode(ref.read(out_dir, "seg.png"), f"{out_dir / ref.shard}: {ref.key}.seg.png", "L")
    if mask.mode != "L":
        raise UpstreamFormatError(out_dir / ref.shard, f"{ref.key}.seg.png is mode {mask.mode}, expected L")
    mask = mask.resize(size, Image.Resampling.NEAREST)
    lut_rgb = [colour(v) for v in range(256)]
    rgba = Image.merge(
        "RGBA",
        (
            mask.point([c[0] for c in lut_rgb]),
            mask.point([c[1] for c in lut_rgb]),
            mask.point([c[2] for c in lut_rgb]),
            mask.point([0 if v in legend.transparent else MASK_ALPHA for v in range(256)]),
        ),
    )
    return rgba


def point_marks(doc: dict[str, Any]) -> list[tuple[float, float]]:
    """Where the sample's annotated points are, as (x, y) fractions of its picture."""
    point, patch = doc.get("point"), doc.get("patch")
    if isinstance(point, dict) and isinstance(patch, dict) and patch.get("size"):
        size = float(patch["size"])
        return [((point["col"] - patch["left"]) / size, (point["row"] - patch["top"]) / size)]
    points, image = doc.get("points"), doc.get("image")
    if isinstance(points, list) and isinstance(image, dict) and image.get("width") and image.get("height"):
        w = float(image.get("original_width") or image["width"])
        h = float(image.get("original_height") or image["height"])
        return [(p["col"] / w, p["row"] / h) for p in points if isinstance(p, dict) and "row" in p][:200]
    return []


def draw_marks(img: Image.Image, marks: list[tuple[float, float]]) -> None:
    draw = ImageDraw.Draw(img)
    r = max(2, img.width // 24)
    for x, y in marks:
        cx, cy = x * img.width, y * img.height
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=(255, 255, 0), width=2)


def grid_rows(info: ReleaseInfo, limit: int = GRID_CLASSES) -> list[tuple[int, str, int]]:
    """(class index, name, samples) of the classes with most samples (ties by index)."""
    totals = [
        (int(e["index"]), str(e.get("name", e["index"])), sum((e.get("count") or {}).values()))
        for e in info.classes.get("classes") or []
    ]
    ranked = sorted((t for t in totals if t[2] and info.scan.examples.get(t[0])), key=lambda t: (-t[2], t[0]))
    return ranked[:limit]


def example_grid(info: ReleaseInfo, out_dir: Path) -> Image.Image | None:
    """A few examples per class, one row per class, masks overlaid and points marked (palette PNG)."""
    rows = grid_rows(info)
    if not rows or info.image_ext is None:
        return None
    legend = mask_legend(info.classes, info.kind)
    font = ImageFont.load_default()
    width = GRID_LABEL + GRID_PER_CLASS * (GRID_CELL + 4)
    grid = Image.new("RGB", (width, len(rows) * (GRID_CELL + 4) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (index, name, total) in enumerate(rows):
        top = 4 + r * (GRID_CELL + 4)
        draw.text((6, top + GRID_CELL // 2 - 12), name[:34], fill=(0, 0, 0), font=font)
        draw.text((6, top + GRID_CELL // 2 + 2), f"{total} samples", fill=(90, 90, 90), font=font)
        for c, ref in enumerate(info.scan.examples[index][:GRID_PER_CLASS]):
            img = picture(info, out_dir, ref, GRID_CELL)
            if legend is not None and (overlay := mask_overlay(info, out_dir, ref, img.size, legend)):
                img = Image.alpha_composite(img.convert("RGBA"), overlay).convert("RGB")
            draw_marks(img, point_marks(ref.doc))
            left = GRID_LABEL + c * (GRID_CELL + 4) + (GRID_CELL - img.width) // 2
            grid.paste(img, (left, top + (GRID_CELL - img.height) // 2))
    # Median cut without dithering: deterministic, and a quarter of the RGB PNG's size.
    return grid.quantize(GRID_COLOURS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=9, optimize=False)
    return buf.getvalue()


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=82, subsampling=2, optimize=False, progressive=False)
    return buf.getvalue()
