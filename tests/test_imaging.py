"""The image probe: hashes, sizes, how bad images are classified, and the pixels of every PIL mode."""

import io

import numpy as np
import pytest
from PIL import Image

from stages.imaging import ImageProblem, phash_array, phash_image, probe_array, probe_image_bytes, to_rgb8


def _pattern() -> np.ndarray:
    y, x = np.mgrid[0:120, 0:160]
    a = ((np.sin(x / 7.0) + np.cos(y / 5.0) + (x * y) / 9000.0) * 60 + 128).clip(0, 255).astype(np.uint8)
    return np.stack([a, a[::-1], np.roll(a, 17, axis=1)], -1)


def _encode(rgb: np.ndarray, fmt: str, **kw) -> bytes:
    return _encode_image(Image.fromarray(rgb), fmt, **kw)


def _encode_image(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
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
    assert jpg.format == "jpeg"
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


# --- pixels: to_rgb8 per PIL mode, on real files ---------------------------------------------------


def _file(img: Image.Image, fmt: str, mode: str) -> Image.Image:
    """`img` written as a `fmt` file and opened again: the mode PIL really returns for such files."""
    buf = io.BytesIO()
    img.save(buf, fmt)
    out = Image.open(io.BytesIO(buf.getvalue()))
    out.load()
    assert out.mode == mode, f"{fmt} gave mode {out.mode}, not {mode}"
    return out


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values.astype(np.uint8)[:, :, None], 3, axis=2)


_RAMP = (np.arange(48 * 64).reshape(48, 64) * 5 % 256).astype(np.uint8)
_RGB = _pattern()[:48, :64]
_PALETTE = (np.arange(256 * 3) * 7 % 256).astype(np.uint8)


def _paletted() -> Image.Image:
    img = Image.fromarray(_RAMP, "L").convert("P")
    img.putpalette(_PALETTE.tolist())
    return img


def _palette_rgb() -> np.ndarray:
    return _PALETTE.reshape(256, 3)[_RAMP]


@pytest.mark.parametrize(
    ("mode", "fmt", "make", "expected"),
    [
        ("1", "PNG", lambda: Image.fromarray(_RAMP > 127).convert("1"), lambda: _grey((_RAMP > 127) * 255)),
        ("L", "PNG", lambda: Image.fromarray(_RAMP, "L"), lambda: _grey(_RAMP)),
        ("LA", "PNG", lambda: Image.merge("LA", [Image.fromarray(_RAMP), Image.fromarray(_RAMP[::-1])]),
         lambda: _grey(_RAMP)),  # alpha dropped, the stored grey stays
        ("P", "PNG", _paletted, _palette_rgb),
        ("P", "GIF", _paletted, _palette_rgb),
        ("PA", "TIFF", lambda: _paletted().convert("PA"), _palette_rgb),
        ("RGB", "PNG", lambda: Image.fromarray(_RGB), lambda: _RGB),
        ("RGBA", "PNG", lambda: Image.fromarray(np.dstack([_RGB, _RAMP])), lambda: _RGB),
    ],
)
def test_to_rgb8_of_8_bit_files_is_their_stored_colour(mode, fmt, make, expected):
    out = to_rgb8(_file(make(), fmt, mode))
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3)
    assert np.array_equal(out, expected())


def test_to_rgb8_of_cmyk_follows_the_naive_formula():
    cmyk = np.stack([_RAMP, _RAMP[::-1], np.roll(_RAMP, 9, axis=1), _RAMP // 3], -1)
    for fmt in ("TIFF", "JPEG"):
        img = _file(Image.fromarray(cmyk, "CMYK"), fmt, "CMYK")
        stored = np.asarray(img).astype(np.float64)  # JPEG is lossy: compare to what it holds
        k = stored[..., 3:]
        expected = np.rint((255 - stored[..., :3]) * (255 - k) / 255)
        assert np.abs(to_rgb8(img).astype(np.float64) - expected).max() <= 1, fmt


def test_to_rgb8_of_ycbcr_and_lab_tiffs():
    ycc = _file(Image.fromarray(_RGB).convert("YCbCr"), "TIFF", "YCbCr")
    assert np.abs(to_rgb8(ycc).astype(int) - _RGB.astype(int)).max() <= 3  # JFIF round trip
    # PIL's LAB holds a* and b* as signed bytes (as TIFF CIELab does): a = b = 0 is grey.
    neutral = np.stack([_RAMP, np.zeros_like(_RAMP), np.zeros_like(_RAMP)], -1)
    lab = to_rgb8(_file(Image.fromarray(neutral, "LAB"), "TIFF", "LAB")).astype(int)
    # grey stays grey (equal channels), lighter stays lighter, and L* = 78.4 is sRGB grey 194
    assert np.abs(lab[..., 0] - lab[..., 1]).max() <= 2 and np.abs(lab[..., 0] - lab[..., 2]).max() <= 2
    order = np.argsort(_RAMP.ravel(), kind="stable")
    assert np.all(np.diff(lab[..., 1].ravel()[order]) >= 0)
    assert lab.max() >= 250 and lab.min() <= 5
    assert np.abs(lab[_RAMP == 200] - 194).max() <= 2


def test_to_rgb8_of_modes_no_file_format_stores():
    # HSV, RGBa, La and RGBX only exist in memory (PIL writes none of them to a file).
    hsv = Image.fromarray(np.array([[[0, 255, 255], [85, 255, 255], [0, 0, 128]]], np.uint8), "HSV")
    assert to_rgb8(hsv).tolist() == [[[255, 0, 0], [0, 255, 0], [128, 128, 128]]]
    rgba = Image.new("RGBA", (1, 1), (200, 100, 50, 128))
    assert to_rgb8(rgba.convert("RGBa")).tolist() == [[[199, 99, 49]]]  # premultiplication undone
    assert to_rgb8(Image.new("LA", (1, 1), (200, 128)).convert("La")).tolist() == [[[199, 199, 199]]]
    assert to_rgb8(Image.new("RGBX", (1, 1), (1, 2, 3, 4))).tolist() == [[[1, 2, 3]]]


_WORDS = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491


@pytest.mark.parametrize(
    ("mode", "fmt", "make"),
    [
        ("I;16", "PNG", lambda: Image.fromarray(_WORDS)),
        ("I;16", "TIFF", lambda: Image.fromarray(_WORDS)),
        ("I;16B", "TIFF", lambda: Image.frombytes("I;16B", (64, 48), _WORDS.astype(">u2").tobytes())),
        ("I;16N", None, lambda: Image.frombytes("I;16N", (64, 48), _WORDS.tobytes())),
    ],
)
def test_16_bit_greyscale_keeps_its_high_byte_not_white(mode, fmt, make):
    img = make() if fmt is None else _file(make(), fmt, mode)
    out = to_rgb8(img)
    assert np.array_equal(out, _grey(_WORDS >> 8))
    assert (out == 255).mean() < 0.01  # convert("RGB") made 99.9% of this ramp white


def test_a_16_bit_png_probes_as_its_8_bit_picture():
    sixteen = _encode_image(Image.fromarray(_WORDS), "PNG")
    eight = _encode_image(Image.fromarray((_WORDS >> 8).astype(np.uint8), "L"), "PNG")
    a, b = probe_image_bytes(sixteen, 10**8), probe_image_bytes(eight, 10**8)
    assert a.file_sha256 != b.file_sha256
    assert (a.pixel_sha256, a.phash) == (b.pixel_sha256, b.phash)


@pytest.mark.parametrize(
    ("mode", "make"),
    [
        ("I", lambda: Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 1000).astype(np.int32))),
        ("F", lambda: Image.fromarray(np.linspace(0, 1, 48 * 64, dtype=np.float32).reshape(48, 64))),
    ],
)
def test_32_bit_rasters_are_refused_as_unsupported_bit_depth(mode, make):
    data = _encode_image(make(), "TIFF")
    with pytest.raises(ImageProblem) as err:
        to_rgb8(_file(make(), "TIFF", mode))
    assert err.value.reason == "unsupported_bit_depth" and mode in err.value.detail
    with pytest.raises(ImageProblem) as err:
        probe_image_bytes(data, 10**8)
    assert err.value.reason == "unsupported_bit_depth"


# --- JPEG: a pixel hash from a full decode; the pHash as it always was ------------------------------


def test_a_png_made_by_decoding_a_jpeg_has_the_jpegs_pixel_hash():
    jpeg = _encode(_pattern(), "JPEG", quality=85)
    with Image.open(io.BytesIO(jpeg)) as img:
        decoded = np.asarray(img.convert("RGB"))
    png = _encode(decoded, "PNG")
    a, b = probe_image_bytes(jpeg, 10**8), probe_image_bytes(png, 10**8)
    assert (a.format, b.format) == ("jpeg", "png")
    assert a.file_sha256 != b.file_sha256
    assert a.pixel_sha256 is not None and a.pixel_sha256 == b.pixel_sha256
    assert probe_image_bytes(jpeg, 10**8, lossless_pixel_hash=False).pixel_sha256 is None


def test_jpeg_phash_is_still_the_reduced_decodes():
    # Values the probe gave before JPEGs were fully decoded (stages/imaging.py at 71c48cc), with
    # the pinned Pillow/libjpeg-turbo. The 1600x1200 one is a JPEG whose full-decode pHash differs.
    small = _encode(_pattern(), "JPEG", quality=85)
    large = _encode_image(Image.fromarray(_pattern()).resize((1600, 1200), Image.Resampling.BICUBIC), "JPEG",
                          quality=85)
    assert f"{probe_image_bytes(small, 10**8).phash:016x}" == "bf805f032b2b2b2b"
    assert f"{probe_image_bytes(large, 10**8).phash:016x}" == "bf805f092b2b2b2b"
    with Image.open(io.BytesIO(large)) as img:
        img.load()
        assert f"{phash_image(img):016x}" != "bf805f092b2b2b2b"


def test_an_mpo_camera_jpeg_is_a_jpeg_of_its_first_frame():
    first, second = _pattern(), _pattern()[::-1, ::-1].copy()
    buf = io.BytesIO()
    Image.fromarray(first).save(
        buf, "MPO", save_all=True, append_images=[Image.fromarray(second)], quality=90
    )
    with Image.open(io.BytesIO(buf.getvalue())) as img:
        assert img.format == "MPO" and img.n_frames == 2
    info = probe_image_bytes(buf.getvalue(), 10**8)
    alone = probe_image_bytes(_encode(first, "JPEG", quality=90), 10**8)
    assert (info.format, info.width, info.height) == ("jpeg", 160, 120)
    assert (info.pixel_sha256, info.phash) == (alone.pixel_sha256, alone.phash)

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
