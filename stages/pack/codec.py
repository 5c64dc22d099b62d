"""Pixels in and bytes out for pack: bounded opens, reduced decodes, patch cuts, fixed encoders.

Everything that shapes the encoded bytes of a sample lives here (and in the product modules), so
the work cache can key units on this module's source (stages/pack/cache.py): an edit to an encoder
re-encodes what it touches, an edit to the shard writer does not.

- `open_image`: header checked against `limits.max_image_pixels` without global state
  (`stages.imaging.open_bounded`), then decoded; errors name the file.
- `decode_for_size`: the same, but a JPEG that will be shrunk is decoded at the smallest DCT
  scale (libjpeg's 1/2, 1/4, 1/8) that still covers the output size (`Image.draft`), which skips
  most of the IDCT and colour conversion work; the resize then uses `reducing_gap`.
- `cut_patch`: pyspacer's window out of the *unpadded* image; only windows that cross the border
  get their reflected pixels, computed with the index arithmetic of `np.pad(mode="reflect")`, so
  no padded copy of the whole image is ever made.
- `encode_rgb`: png (zlib level), webp (lossless; method and effort) or jpg (quality, 4:2:0,
  baseline). Deterministic for a given Pillow build: Pillow bundles zlib-ng, libwebp and
  libjpeg-turbo, whose versions go into the work key and product.json.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, features

from stages.errors import UpstreamFormatError
from stages.imaging import ImageProblem, open_bounded, to_rgb8

IMAGE_FORMATS = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp"}
LOSSLESS_FORMATS = ("png", "webp")
JPEG_SUBSAMPLING = 2  # 4:2:0, libjpeg's default, pinned so a Pillow default change can't move bytes
RESAMPLE = Image.Resampling.LANCZOS
# Resize in two steps when shrinking by more than this factor: an integer box reduce, then LANCZOS
# over the last `REDUCING_GAP` of the way (Pillow's `reducing_gap`). The result is within a grey
# level of a single LANCZOS pass and several times cheaper on 12 MP sources.
REDUCING_GAP = 2.0
# A JPEG is decoded at a reduced DCT scale only down to DRAFT_MARGIN x the output size, so LANCZOS
# still does the last 1.5x or more of the shrink and sets the look of the result. Measured on real
# photos (docs/pack.md): 12 MP -> 1024 decodes at 1/2 scale, 2.4x cheaper, mean difference 0.8 grey
# levels from a full decode; decoding right down to the output size (margin 1) differed by up to 5.
DRAFT_MARGIN = 1.5


@dataclass(frozen=True)
class ImageSettings:
    """How pixels become bytes. Fixed by params so two builds encode identically."""

    image_format: str  # png | jpg | webp
    jpeg_quality: int
    png_compress_level: int
    max_side: int | None  # bound on the longer side; None keeps the original size
    max_pixels: int  # decompression-bomb bound (limits.max_image_pixels)
    webp_method: int = 0  # libwebp effort/speed trade-off, 0 (fastest) .. 6
    webp_quality: int = 0  # lossless WebP: compression effort 0..100 (not a fidelity setting)

    @property
    def ext(self) -> str:
        return self.image_format

    @property
    def lossless(self) -> bool:
        return self.image_format in LOSSLESS_FORMATS

    def describe(self) -> dict[str, object]:
        """What product.json records and the work key hashes: every setting that shapes bytes."""
        out: dict[str, object] = {"image_format": self.image_format, "max_side": self.max_side}
        if self.image_format == "png":
            out["png_compress_level"] = self.png_compress_level
        elif self.image_format == "webp":
            out.update(webp_lossless=True, webp_method=self.webp_method, webp_quality=self.webp_quality)
        else:
            out.update(jpeg_quality=self.jpeg_quality, jpeg_subsampling="4:2:0")
        return out


def codec_versions() -> dict[str, str | None]:
    """The codec libraries inside Pillow whose versions can move encoded bytes."""
    return {
        "pillow": Image.__version__,
        "zlib": features.version("zlib"),
        "libwebp": features.version("webp"),
        "libjpeg_turbo": features.version("libjpeg_turbo"),
    }


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UpstreamFormatError(path, f"cannot read image: {exc}") from exc


def read_verified(path: Path, sha256: str | None) -> bytes:
    """The file's bytes, refused when they are not the ones ingest recorded (`sha256`; None: not
    recorded): shipping upstream bytes unchanged must ship the bytes the tables describe."""
    data = _read(path)
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise UpstreamFormatError(path, "file changed since ingest (sha256 differs from the sample table)")
    return data


def _opened(data: bytes, path: Path | str, max_pixels: int) -> Image.Image:
    try:
        return open_bounded(data, max_pixels)
    except ImageProblem as exc:
        if exc.reason == "image_too_large":
            raise UpstreamFormatError(path, f"image over limits.max_image_pixels: {exc.detail}") from exc
        # Ingest decoded this file; failing now means it changed or broke since.
        raise UpstreamFormatError(path, f"image does not decode: {exc.detail}") from exc


def _load(img: Image.Image, path: Path | str) -> Image.Image:
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UpstreamFormatError(path, f"image does not decode: {exc}") from exc
    return img


def open_image(path: Path, max_pixels: int) -> Image.Image:
    """Decode an image file completely, bounded by `max_pixels`; errors name the file."""
    return _load(_opened(_read(path), path, max_pixels), path)


def decode_for_size(
    path: Path, max_pixels: int, expected: tuple[int, int], out_size: tuple[int, int]
) -> np.ndarray:
    """RGB pixels of `path` at `out_size` (w, h), decoding no more than that needs.

    `expected` is the (w, h) the sample table recorded; a file of another size is refused
    (check_size). A JPEG shrunk by 3x or more is decoded at a reduced DCT scale (1/2, 1/4, 1/8)
    that still covers DRAFT_MARGIN x `out_size`, so the final LANCZOS step always shrinks.
    """
    img = _opened(_read(path), path, max_pixels)
    if img.size != tuple(expected):
        raise UpstreamFormatError(
            path, f"image is {img.size[0]}x{img.size[1]}, the sample table says {expected[0]}x{expected[1]}"
        )
    if out_size != img.size and img.format == "JPEG":
        request = (math.ceil(out_size[0] * DRAFT_MARGIN), math.ceil(out_size[1] * DRAFT_MARGIN))
        img.draft(img.mode, request)  # scale only; the mode stays what convert("RGB") expects
    img = _load(img, path)
    if img.mode != "RGB":
        img = Image.fromarray(rgb_array(img, path), "RGB")
    if img.size != tuple(out_size):
        # Resized as a PIL image: the same pixels as resize_rgb(rgb_array(img)), two copies fewer.
        img = img.resize(out_size, RESAMPLE, reducing_gap=REDUCING_GAP)
    return np.asarray(img)


def rgb_array(img: Image.Image, path: Path | str = "<image>") -> np.ndarray:
    """HxWx3 uint8 by imaging.to_rgb8, the rule ingest hashed the pixels with: `convert("RGB")`
    as pyspacer does for 8-bit modes (palette expanded, alpha dropped, L replicated), the high
    byte for 16-bit grey, where `convert` would clip to white. No EXIF orientation is applied:
    points are given in stored-raster coordinates."""
    try:
        return to_rgb8(img)
    except ImageProblem as exc:
        # Ingest quarantines these; meeting one here means the file changed since.
        raise UpstreamFormatError(path, f"{exc.reason}: {exc.detail}") from exc


def check_size(rgb: np.ndarray, expected: tuple[int, int], path: Path | str) -> None:
    """Refuse pixels whose (width, height) differ from the sample table's: the file changed after
    ingest, and the points, masks and boxes recorded for it would land in the wrong place."""
    if (rgb.shape[1], rgb.shape[0]) != tuple(expected):
        raise UpstreamFormatError(
            path, f"image is {rgb.shape[1]}x{rgb.shape[0]}, the sample table says {expected[0]}x{expected[1]}"
        )


def fit_max_side(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(w, h) scaled so the longer side is at most `max_side`, integer rounding half up."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    if width >= height:
        return max_side, max(1, (2 * height * max_side + width) // (2 * width))
    return max(1, (2 * width * max_side + height) // (2 * height)), max_side


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (rgb.shape[1], rgb.shape[0]) == size:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize(size, RESAMPLE, reducing_gap=REDUCING_GAP))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour: class ids must stay class ids."""
    if (mask.shape[1], mask.shape[0]) == size:
        return mask
    return np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))


# --- patches -----------------------------------------------------------------------------------


def window(row: int, col: int, size: int) -> tuple[int, int]:
    """Top-left of the patch in reflect-padded coordinates, exactly pyspacer's `crop_simple`."""
    return int(row + size - size / 2), int(col + size - size / 2)


def reflect_index(index: np.ndarray, n: int) -> np.ndarray:
    """Where `np.pad(mode="reflect")` takes padded position `index` (relative to the first real
    pixel) from: the edge pixel is not repeated, so positions fold with period 2(n-1); numpy
    reflects repeatedly when the pad is wider than the axis, which is the same fold."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    folded = np.mod(index, period)
    return np.where(folded < n, folded, period - folded)


def cut_patch(rgb: np.ndarray, row: int, col: int, size: int) -> np.ndarray:
    """pyspacer's `size` patch around (row, col): the window of the image reflect-padded by `size`
    on every side, taken from the unpadded image (a view when it lies inside)."""
    height, width = rgb.shape[:2]
    top, left = window(row, col, size)
    top -= size  # image coordinates; may be negative or run past the far border
    left -= size
    if 0 <= top and top + size <= height and 0 <= left and left + size <= width:
        return rgb[top : top + size, left : left + size]
    rows = reflect_index(np.arange(top, top + size), height)
    cols = reflect_index(np.arange(left, left + size), width)
    return rgb[rows[:, None], cols[None, :]]


# --- encoders ----------------------------------------------------------------------------------


def encode_rgb(rgb: np.ndarray, settings: ImageSettings) -> bytes:
    """Encode pixels with the product's fixed settings. The image is rebuilt from the array, so
    no metadata of the source (EXIF, ICC profile, text chunks) reaches the shard."""
    img = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    buf = io.BytesIO()
    if settings.image_format == "png":
        img.save(buf, "PNG", compress_level=settings.png_compress_level, optimize=False)
    elif settings.image_format == "webp":
        # exact: keep RGB values as they are (only matters under alpha, pinned anyway).
        img.save(
            buf,
            "WEBP",
            lossless=True,
            quality=settings.webp_quality,
            method=settings.webp_method,
            exact=True,
        )
    else:
        img.save(
            buf,
            "JPEG",
            quality=settings.jpeg_quality,
            subsampling=JPEG_SUBSAMPLING,
            optimize=False,
            progressive=False,
        )
    return buf.getvalue()


def encode_mask(mask: np.ndarray, settings: ImageSettings) -> bytes:
    """`seg.png`: PNG mode L holding the class ids."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), "L").save(
        buf, "PNG", compress_level=settings.png_compress_level, optimize=False
    )
    return buf.getvalue()


def load_mask(path: Path, size: tuple[int, int], max_pixels: int) -> np.ndarray:
    """A class-id mask (PNG mode L) that must match the image size (w, h)."""
    img = open_image(path, max_pixels)
    if img.mode != "L":
        raise UpstreamFormatError(path, f"mask must be PNG mode L (class ids), found mode {img.mode}")
    if img.size != size:
        raise UpstreamFormatError(path, f"mask is {img.size[0]}x{img.size[1]}, image is {size[0]}x{size[1]}")
    return np.asarray(img)
