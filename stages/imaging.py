"""Decode an image once and derive everything ingest needs from that one decode.

- the file's sha256 (identical files),
- a pixel sha256 over the decoded RGB raster (identical pixels in different files) for lossless
  formats, where it is free because the full raster is decoded anyway,
- a 64-bit DCT perceptual hash, bit-compatible with `imagehash.phash` (near duplicates),
- width and height, and whether the file decodes at all (truncated, zero-byte, bombs).

For JPEG only a reduced decode is done (PIL draft mode, DCT scaling inside libjpeg), which is
all a 32x32 perceptual hash needs and several times cheaper than a full decode.
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
    h.update(arr.tobytes())
    return h.hexdigest()


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
    """Decode once (reduced for JPEG) and hash; raise ImageProblem for unusable images."""
    img = _open_checked(data, max_pixels)
    fmt = (img.format or "").lower()
    width, height = img.size
    try:
        if fmt == "jpeg":
            # The draft decode still walks the whole entropy-coded stream, so truncation is caught.
            img.draft("L", (max(PHASH_SIZE * 2, width // 8), max(PHASH_SIZE * 2, height // 8)))
            img.load()
            pixel_digest = None
            phash = phash_image(img)
        elif fmt == "png" or fmt in ("tiff", "bmp", "webp", "gif"):
            img.load()
            rgb = np.asarray(img.convert("RGB"))
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
        format="jpeg" if fmt == "jpeg" else fmt,
        width=width,
        height=height,
        file_sha256=hashlib.sha256(data).hexdigest(),
        file_size=len(data),
        pixel_sha256=pixel_digest,
        phash=phash,
    )


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
