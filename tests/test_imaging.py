"""The single-decode image probe: hashes, sizes, and how bad images are classified."""

import io

import numpy as np
import pytest
from PIL import Image

from stages.imaging import ImageProblem, phash_array, probe_array, probe_image_bytes


def _pattern() -> np.ndarray:
    y, x = np.mgrid[0:120, 0:160]
    a = ((np.sin(x / 7.0) + np.cos(y / 5.0) + (x * y) / 9000.0) * 60 + 128).clip(0, 255).astype(np.uint8)
    return np.stack([a, a[::-1], np.roll(a, 17, axis=1)], -1)


def _encode(rgb: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **kw)
    return buf.getvalue()


def test_phash_matches_imagehash_reference_value():
    # Value printed by imagehash 4.3 `str(imagehash.phash(img))` for this exact array.
    assert f"{phash_array(_pattern()):016x}" == "bf805f012b2b2b3b"


def test_png_probe_reports_size_hashes_and_pixels():
    rgb = _pattern()
    info = probe_image_bytes(_encode(rgb, "PNG"), 10**8)
    assert (info.format, info.width, info.height) == ("png", 160, 120)
    # Same pixels through another lossless container and compression level hash equal.
    other = probe_image_bytes(_encode(rgb, "PNG", compress_level=1), 10**8)
    assert other.file_sha256 != info.file_sha256
    assert other.pixel_sha256 == info.pixel_sha256 == probe_array(rgb).pixel_sha256


def test_jpeg_reduced_decode_keeps_phash_close_to_the_lossless_original():
    rgb = _pattern()
    png = probe_image_bytes(_encode(rgb, "PNG"), 10**8)
    jpg = probe_image_bytes(_encode(rgb, "JPEG", quality=85), 10**8)
    assert jpg.format == "jpeg" and jpg.pixel_sha256 is None
    assert bin(png.phash ^ jpg.phash).count("1") <= 4


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_file"),
        (b"not an image at all" * 4, "corrupt_image"),
    ],
)
def test_unusable_bytes_are_classified(data, reason):
    with pytest.raises(ImageProblem) as err:
        probe_image_bytes(data, 10**8)
    assert err.value.reason == reason


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_corrupt_not_crashes(fmt):
    data = _encode(_pattern(), fmt)
    with pytest.raises(ImageProblem) as err:
        probe_image_bytes(data[: len(data) // 2], 10**8)
    assert err.value.reason == "corrupt_image"


def test_pixel_bound_refuses_large_images():
    with pytest.raises(ImageProblem) as err:
        probe_image_bytes(_encode(_pattern(), "PNG"), 5000)
    assert err.value.reason == "image_too_large"
