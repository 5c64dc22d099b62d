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


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (an empty IDAT: enough to open, not to decode)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_bounded_open_checks_the_header_against_the_callers_limit_without_global_state():
    import warnings

    from stages.imaging import open_bounded

    # 100M pixels: over PIL's default MAX_IMAGE_PIXELS (89.5M, where Image.open warns) and under
    # the project's bound; the bound is ours, PIL's process-wide one is neither used nor changed.
    big = _png_header_only(10_000, 10_000)
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any DecompressionBombWarning would fail here
        img = open_bounded(big, 178_956_970)
        assert img.size == (10_000, 10_000) and img.format == "PNG"
        with pytest.raises(ImageProblem) as err:
            open_bounded(big, 99_999_999)
    assert err.value.reason == "image_too_large" and "10000x10000" in err.value.detail
    assert Image.MAX_IMAGE_PIXELS == before
    bad = ((b"", "empty_file"), (b"GIF89a" + b"\0" * 4, "corrupt_image"), (b"xx" * 20, "corrupt_image"))
    for data, reason in bad:
        with pytest.raises(ImageProblem) as err:
            open_bounded(data, 10**8)
        assert err.value.reason == reason


def test_bounded_open_gives_each_thread_its_own_limit():
    # Dask workers run tasks in threads: with a bound swapped in and out of Image.MAX_IMAGE_PIXELS,
    # a thread with a high limit could refuse (or one with a low limit accept) another's image.
    # Another thread keeps rewriting PIL's global bound meanwhile: the outcomes must not move.
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from stages.imaging import open_bounded

    small = _encode(_pattern(), "PNG")  # 160x120 = 19,200 pixels
    big = _png_header_only(10_000, 10_000)
    cases = [(small, 19_200, True), (small, 19_199, False), (big, 10**8, True), (big, 10**8 - 1, False)] * 200

    def attempt(case: tuple[bytes, int, bool]) -> bool:
        data, limit, _ = case
        try:
            open_bounded(data, limit).load() if data is small else open_bounded(data, limit)
        except ImageProblem as exc:
            assert exc.reason == "image_too_large"
            return False
        return True

    before = Image.MAX_IMAGE_PIXELS
    stop = threading.Event()

    def meddle() -> None:
        while not stop.is_set():
            for value in (1000, 10**12, None):
                Image.MAX_IMAGE_PIXELS = value

    meddler = threading.Thread(target=meddle)
    meddler.start()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            outcomes = list(pool.map(attempt, cases))
    finally:
        stop.set()
        meddler.join()
        Image.MAX_IMAGE_PIXELS = before
    assert outcomes == [ok for _, _, ok in cases]
