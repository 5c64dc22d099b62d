"""Decode an image and derive everything ingest needs from it.

- the file's sha256 (identical files),
- a pixel sha256 over the decoded 8-bit RGB raster (identical pixels in different files: a PNG
  made by decoding a JPEG links to that JPEG), for every format,
- a 64-bit DCT perceptual hash, bit-compatible with `imagehash.phash` (near duplicates),
- width and height, and whether the file decodes at all (truncated, zero-byte, bombs).

Pixels: `to_rgb8(img)` is the one place that turns any PIL mode into the HxWx3 uint8 raster the
project works on (hashes here, patches and re-encodes in pack), so ingest and pack see the same
pixels. Its per-mode rules are in its docstring.

JPEG (MPO camera files included: their first frame is the picture every JPEG reader shows) is
decoded twice: fully, for the pixel hash, and reduced (PIL draft mode, DCT scaling inside
libjpeg) for the pHash. The reduced decode is what the pHash has always been computed from, and a
pHash of the full decode differs in a few bits for about one JPEG in six, so keeping it keeps
every existing pHash (and every near-duplicate decision built on it) as it was.
"""

from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

PHASH_SIZE = 32
PHASH_LOW = 8

# Unnormalised DCT-II basis, the convention of scipy.fftpack.dct used by imagehash.phash:
# X[k] = 2 * sum_n x[n] cos(pi * k * (2n + 1) / (2N)). Only the 8 lowest frequencies are needed.
_n = np.arange(PHASH_SIZE)
_DCT_LOW = 2.0 * np.cos(np.pi * np.arange(PHASH_LOW)[:, None] * (2 * _n[None, :] + 1) / (2 * PHASH_SIZE))
_BIT_WEIGHTS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


class ImageProblem(Exception):
    """A record-level image failure: becomes a quarantine row with `reason`, not a crash."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")

    def __reduce__(self) -> tuple[type[ImageProblem], tuple[str, str]]:
        # Problems come back from worker processes as results; the default Exception pickling
        # would call __init__ with the one formatted message and fail in the parent.
        return (type(self), (self.reason, self.detail))


@dataclass(frozen=True)
class ImageInfo:
    format: str  # "png" | "jpeg" | "raw" (arrays from npz)
    width: int
    height: int
    file_sha256: str | None
    file_size: int | None
    pixel_sha256: str | None
    phash: int  # unsigned 64-bit


def phash_gray(gray32: np.ndarray) -> int:
    """pHash of a 32x32 greyscale array: bits of the 8x8 low-frequency DCT above their median."""
    pixels = gray32.astype(np.float64)
    low = _DCT_LOW @ pixels @ _DCT_LOW.T
    bits = (low > np.median(low)).reshape(-1)
    return int(np.sum(_BIT_WEIGHTS[bits], dtype=np.uint64))


def phash_image(img: Image.Image) -> int:
    """pHash of a PIL image, computed exactly as imagehash.phash does (L, LANCZOS to 32x32)."""
    small = img.convert("L").resize((PHASH_SIZE, PHASH_SIZE), Image.Resampling.LANCZOS)
    return phash_gray(np.asarray(small))


def phash_array(rgb: np.ndarray) -> int:
    return phash_image(Image.fromarray(rgb))


def pixel_sha256(rgb: np.ndarray) -> str:
    """Hash of shape plus raster, so equal pixels in different containers hash equal."""
    arr = np.ascontiguousarray(rgb, dtype=np.uint8)
    h = hashlib.sha256(f"{arr.shape}".encode())
    h.update(memoryview(arr).cast("B"))  # the raster's bytes without a copy (36 MB at 12 MP)
    return h.hexdigest()


# to_rgb8's rules. Modes PIL converts to RGB faithfully: pyspacer's own `convert("RGB")`.
# `La` (premultiplied) only converts through LA.
_CONVERT = frozenset(
    {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
)
_VIA = {"La": "LA"}
# Unsigned 16-bit greyscale: PIL's own convert("L") clips every value above 255 to white.
_UINT16 = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# No defined display range: a 32-bit integer or float raster is measurement data, not a photo,
# and any scaling (min-max, clip, >> 24) would invent one.
_NO_RANGE = {"I": "32-bit integer", "F": "32-bit float"}


def to_rgb8(img: Image.Image) -> np.ndarray:
    """The HxWx3 uint8 raster of a decoded image, or ImageProblem when there is no faithful one.

    Per PIL mode:
    - 1, L, LA, La, P, PA, RGB, RGBA, RGBa, RGBX, CMYK, YCbCr, LAB, HSV: `convert("RGB")`, as
      pyspacer does: grey replicated, palettes expanded, alpha dropped without compositing (the
      stored colour stays; premultiplied alpha is undone first), CMYK by PIL's naive formula and
      no ICC profile (none is applied for any mode), LAB and HSV by PIL's conversions;
    - I;16, I;16L, I;16B, I;16N (16-bit greyscale PNG/TIFF): the high byte (`v >> 8`),
      replicated; the same rule by which PIL itself reads 16-bit RGB PNGs as 8-bit RGB, so a
      16-bit grey and a 16-bit RGB file of the same picture give the same grey levels;
    - I (32-bit integer), F (32-bit float), signed or 32-bit I;* modes: ImageProblem
      `unsupported_bit_depth`;
    - any other mode: ImageProblem `unsupported_format`.
    No EXIF orientation is applied: annotations are given in stored-raster coordinates.
    """
    mode = img.mode
    if mode in _UINT16:
        high = (np.asarray(img).astype(np.uint16, copy=False) >> 8).astype(np.uint8)
        return np.repeat(high[:, :, None], 3, axis=2)
    if mode in _NO_RANGE or mode.startswith("I;"):
        what = _NO_RANGE.get(mode, f"mode {mode}")
        raise ImageProblem(
            "unsupported_bit_depth", f"{what} pixels (PIL mode {mode}) have no defined 8-bit scaling"
        )
    if mode == "RGB":
        return np.asarray(img)
    if mode in _VIA:
        img = img.convert(_VIA[mode])
    elif mode not in _CONVERT:
        raise ImageProblem("unsupported_format", f"PIL mode {mode} has no RGB conversion")
    try:
        return np.asarray(img.convert("RGB"))
    except ValueError as exc:
        raise ImageProblem("unsupported_format", f"PIL mode {mode}: {exc}") from exc


# Formats the project reads. Opening through this list instead of everything PIL knows keeps
# exotic parsers away from hostile files; ingest refuses other formats anyway.
ACCEPTED_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF")


def _openers() -> list[tuple[Any, Any]]:
    # Importing a plugin registers it in Image.OPEN; done here, lazily, so that importing this
    # module stays cheap and the registry is complete whatever else the process imported.
    from PIL import (  # noqa: F401 - imported for their registration
        BmpImagePlugin,
        GifImagePlugin,
        JpegImagePlugin,
        PngImagePlugin,
        TiffImagePlugin,
        WebPImagePlugin,
    )

    return [Image.OPEN[f] for f in ACCEPTED_FORMATS if f in Image.OPEN]


def open_bounded(data: bytes, max_pixels: int) -> Image.Image:
    """Open an image from its bytes (header only, no pixel decode) and refuse it when its header
    declares more than `max_pixels` pixels.

    Thread-safe by construction: `Image.open` compares the size against the process-wide
    `Image.MAX_IMAGE_PIXELS` and reports through the process-wide warnings filters, so a bound
    set by swapping those races between the threads of a Dask worker. This opens through the
    format plugins directly (what `Image.open` does, minus its global check) and compares the
    header's size with the caller's bound, touching no global state.
    Raises ImageProblem: empty_file, corrupt_image (unknown format or a header that does not
    parse) or image_too_large.
    """
    if not data:
        raise ImageProblem("empty_file", "file has zero bytes")
    prefix = data[:16]
    fp = io.BytesIO(data)
    img: Image.Image | None = None
    failure = ""
    for factory, accept in _openers():
        if accept is not None and not accept(prefix):
            continue
        fp.seek(0)
        try:
            img = factory(fp, "")
            break
        except (SyntaxError, IndexError, TypeError, struct.error) as exc:
            failure = str(exc)  # a header this plugin claimed but could not parse
        except (OSError, ValueError, EOFError) as exc:
            # A file cut off inside its header (a JPEG marker segment, a PNG chunk) fails while
            # the header is parsed, before any decode: a bad record, not a crash of the stage.
            raise ImageProblem("corrupt_image", f"header does not parse: {exc}") from exc
    if img is None:
        if failure:
            raise ImageProblem("corrupt_image", f"header does not parse: {failure}")
        raise ImageProblem("corrupt_image", "not a recognisable image")
    w, h = img.size
    if w * h > max_pixels:
        raise ImageProblem("image_too_large", f"{w}x{h} exceeds limits.max_image_pixels={max_pixels}")
    return img


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    return open_bounded(data, max_pixels)


def probe_image_bytes(data: bytes, max_pixels: int, *, lossless_pixel_hash: bool = True) -> ImageInfo:
    """Decode and hash; raise ImageProblem for unusable images.

    `lossless_pixel_hash=False` skips the pixel hash (and, for JPEG, the full decode it needs)."""
    img = _open_checked(data, max_pixels)
    fmt = (img.format or "").lower()
    width, height = img.size
    try:
        if fmt in _JPEG_FORMATS:
            pixel_digest, phash = _hash_jpeg(data, img, max_pixels, lossless_pixel_hash)
            fmt = "jpeg"
        elif fmt in _DECODED_FORMATS:
            img.load()
            rgb = to_rgb8(img)
            pixel_digest = pixel_sha256(rgb) if lossless_pixel_hash else None
            phash = phash_image(Image.fromarray(rgb))
        else:
            raise ImageProblem("unsupported_format", f"format {img.format!r} is not an accepted image type")
    except ImageProblem:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL reports truncation and broken chunks as OSError/SyntaxError from deep in the decoder.
        raise ImageProblem("corrupt_image", f"decoding failed: {exc}") from exc
    return ImageInfo(
        format=fmt,
        width=width,
        height=height,
        file_sha256=hashlib.sha256(data).hexdigest(),
        file_size=len(data),
        pixel_sha256=pixel_digest,
        phash=phash,
    )


# An MPO (multi-picture JPEG from stereo and many phone cameras) is a baseline JPEG with more
# pictures appended; its first frame is the picture, and it is what any JPEG reader shows.
_JPEG_FORMATS = ("jpeg", "mpo")
_DECODED_FORMATS = ("png", "tiff", "bmp", "webp", "gif")


def _hash_jpeg(data: bytes, img: Image.Image, max_pixels: int, pixel_hash: bool) -> tuple[str | None, int]:
    """(pixel sha256 of the full decode, pHash of the reduced decode) of a JPEG's first frame."""
    digest = None
    if pixel_hash:
        img.load()
        digest = pixel_sha256(to_rgb8(img))
        img = _open_checked(data, max_pixels)  # a loaded image cannot be drafted again
    width, height = img.size
    # The draft decode still walks the whole entropy-coded stream, so truncation is caught.
    img.draft("L", (max(PHASH_SIZE * 2, width // 8), max(PHASH_SIZE * 2, height // 8)))
    img.load()
    return digest, phash_image(img)


def probe_image_file(path: str | Path, max_pixels: int, *, lossless_pixel_hash: bool = True) -> ImageInfo:
    """probe_image_bytes for a file; a missing file is an ImageProblem("missing_image")."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ImageProblem("missing_image", "file not found") from exc
    return probe_image_bytes(data, max_pixels, lossless_pixel_hash=lossless_pixel_hash)


def probe_array(rgb: np.ndarray) -> ImageInfo:
    """Hashes for an image that arrives as an array (Coast Train npz)."""
    if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.dtype != np.uint8:
        raise ImageProblem("corrupt_image", f"expected uint8 HxWx3 array, got {rgb.dtype} {rgb.shape}")
    rgb = rgb[..., :3]
    return ImageInfo(
        format="raw",
        width=int(rgb.shape[1]),
        height=int(rgb.shape[0]),
        file_sha256=None,
        file_size=None,
        pixel_sha256=pixel_sha256(rgb),
        phash=phash_array(rgb),
    )
