"""pack's codec on real photos: every lossless setting is lossless, WebDataset decodes every format,
windows cut without padding the image equal pyspacer's padded ones, shrinking JPEGs decode reduced."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, JpegImagePlugin

from stages.errors import UpstreamFormatError
from stages.pack.codec import (
    ImageSettings,
    cut_patch,
    decode_for_size,
    encode_rgb,
    fit_max_side,
    resize_rgb,
    rgb_array,
    window,
)
from stages.pack.tarwriter import TarWriter, sample_bytes

REFERENCE = Path(__file__).resolve().parent / "reference"
# Real photos (tests/reference/*/NOTICE.md): a CoralNet camera JPEG, a Seatizen 12 MP still, a UAV
# orthophoto tile (PNG) and a Sentinel-2 tile as Coast Train has them.
PHOTOS = [
    REFERENCE / "coralnet-toolbox" / "D3" / "T_S04856.jpg",
    REFERENCE / "seatizen" / "dinovdeau" / "fs_ml_images" / "20150611_REU-St-Gilles_scuba_G0043959.JPG",
    REFERENCE / "seatizen" / "dinovdeau" / "drone_images" / "odm_orthophoto_317335_7665595.png",
    REFERENCE / "doodler" / "2015-11-17-18-56-44_S2_rgb_00.jpg",
]
MAX_PIXELS = 178956970


def settings_for(fmt: str, **kw: int) -> ImageSettings:
    return ImageSettings(fmt, kw.get("quality", 90), kw.get("level", 6), None, MAX_PIXELS,
                         kw.get("method", 0), kw.get("effort", 0))  # fmt: skip


def pyspacer_crop(rgb: np.ndarray, row: int, col: int, size: int) -> np.ndarray:
    """spacer.extract_features.crop_patches for one point, restated: pad the whole image, slice."""
    padded = np.pad(rgb, ((size, size), (size, size), (0, 0)), mode="reflect")
    top, left = int(row + size - size / 2), int(col + size - size / 2)
    return padded[top : top + size, left : left + size]


@pytest.fixture(scope="module")
def patches() -> list[np.ndarray]:
    """Patches of every photo: a 224 px one at the centre, 96 px ones at corners and edges
    (reflected windows included; small, because the slow WebP methods are all tried)."""
    out = []
    for path in PHOTOS:
        rgb = rgb_array(Image.open(path))
        h, w = rgb.shape[:2]
        out.append(np.ascontiguousarray(cut_patch(rgb, h // 2, w // 2, 224)))
        for row, col in ((0, 0), (h - 1, w - 1), (5, w // 3)):
            out.append(np.ascontiguousarray(cut_patch(rgb, row, col, 96)))
    return out


LOSSLESS = [("png", {"level": level}) for level in range(10)] + [
    ("webp", {"method": method, "effort": effort}) for method in range(7) for effort in (0, 50, 100)
]


@pytest.mark.parametrize(("fmt", "kw"), LOSSLESS, ids=[f"{f}-{sorted(k.items())}" for f, k in LOSSLESS])
def test_every_lossless_setting_gives_back_the_pixels_of_real_photos(
    patches: list[np.ndarray], fmt: str, kw: dict[str, int]
):
    s = settings_for(fmt, **kw)
    assert s.lossless
    for patch in patches:
        data = encode_rgb(patch, s)
        assert data == encode_rgb(patch, s)  # deterministic
        back = Image.open(io.BytesIO(data))
        assert back.format == {"png": "PNG", "webp": "WEBP"}[fmt] and not back.info.get("exif")
        assert np.array_equal(np.asarray(back.convert("RGB")), patch)


def test_jpeg_is_lossy_and_marked_so(patches: list[np.ndarray]):
    s = settings_for("jpg", quality=90)
    assert not s.lossless
    back = np.asarray(Image.open(io.BytesIO(encode_rgb(patches[0], s))))
    assert back.shape == patches[0].shape and not np.array_equal(back, patches[0])
    assert np.abs(back.astype(int) - patches[0]).mean() < 4


def test_webdataset_decodes_webp_png_and_jpg_members(patches: list[np.ndarray], tmp_path: Path):
    shard = tmp_path / "codecs-000000.tar"
    with open(shard, "wb") as fh:
        writer = TarWriter(fh)
        for i, fmt in enumerate(("webp", "png", "jpg")):
            members = {fmt: encode_rgb(patches[i], settings_for(fmt)), "cls": b"3"}
            writer.write_sample(sample_bytes(f"s{i}", members))
        writer.close()
    decoded = list(wds.WebDataset(str(shard), shardshuffle=False).decode("pil"))
    assert [sorted(k for k in s if not k.startswith("__")) for s in decoded] == [
        ["cls", "webp"], ["cls", "png"], ["cls", "jpg"]
    ]  # fmt: skip
    assert all(isinstance(s[f], Image.Image) for s, f in zip(decoded, ("webp", "png", "jpg")))
    assert np.array_equal(np.asarray(decoded[0]["webp"].convert("RGB")), patches[0])
    assert np.array_equal(np.asarray(decoded[1]["png"].convert("RGB")), patches[1])
    rgb8 = list(wds.WebDataset(str(shard), shardshuffle=False).decode("rgb8"))
    assert rgb8[0]["webp"].shape == patches[0].shape and np.array_equal(rgb8[0]["webp"], patches[0])


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    size=st.integers(1, 50),
    data=st.data(),
)
def test_windows_cut_from_the_unpadded_image_equal_pyspacers_padded_crop(height, width, size, data):
    # Odd and even sizes, patches larger than the image (numpy reflects several times), 1-pixel
    # axes, and every border: the point is anywhere in the image.
    rgb = np.arange(height * width * 3, dtype=np.uint32).reshape(height, width, 3).astype(np.uint8)
    rgb = (rgb * 7 + np.arange(3, dtype=np.uint8)).astype(np.uint8)
    row = data.draw(st.integers(0, height - 1))
    col = data.draw(st.integers(0, width - 1))
    got = cut_patch(rgb, row, col, size)
    assert got.shape == (size, size, 3)
    assert np.array_equal(got, pyspacer_crop(rgb, row, col, size))


def test_windows_at_every_border_position_of_a_real_photo():
    rgb = rgb_array(Image.open(PHOTOS[2]))  # 164x164: a 224 patch is wider than the image
    h, w = rgb.shape[:2]
    for size in (224, 63, 64):
        for row in (0, 1, size // 2 - 1, size // 2, h // 2, h - size // 2, h - 2, h - 1):
            for col in (0, 1, w // 2, w - 2, w - 1):
                row_c, col_c = min(max(row, 0), h - 1), min(max(col, 0), w - 1)
                want = pyspacer_crop(rgb, row_c, col_c, size)
                assert np.array_equal(cut_patch(rgb, row_c, col_c, size), want)
    assert window(10, 20, 224) == (122, 132)


def test_a_jpeg_shrunk_for_max_side_is_decoded_reduced_and_stays_close_to_a_full_decode(
    monkeypatch: pytest.MonkeyPatch,
):
    path = PHOTOS[0]  # 2159x1619, a detailed camera JPEG
    with Image.open(path) as img:
        original = img.size
    decoded_at: list[tuple[int, int]] = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self: Image.Image, mode: str | None, size: tuple[int, int] | None) -> object:
        result = real_draft(self, mode, size)
        decoded_at.append(self.size)  # the size it will decode at
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    for max_side, scaled in ((1024, False), (256, True)):
        out = fit_max_side(*original, max_side)
        decoded_at.clear()
        reduced = decode_for_size(path, MAX_PIXELS, original, out)
        full = resize_rgb(rgb_array(Image.open(path)), out)
        assert reduced.shape == full.shape == (out[1], out[0], 3)
        assert len(decoded_at) == 1 and (decoded_at[0] != original) == scaled
        # never decoded below 1.5x the output: LANCZOS does the last step
        assert decoded_at[0][0] >= 1.5 * out[0] and decoded_at[0][1] >= 1.5 * out[1]
        if scaled:  # within 2 grey levels (a q90 re-encode of the result moves pixels ~4)
            assert np.abs(reduced.astype(int) - full).mean() < 2.0
        else:  # a 2.1x shrink: not worth a reduced decode, so exactly the full decode's pixels
            assert np.array_equal(reduced, full)
    decoded_at.clear()
    same = decode_for_size(path, MAX_PIXELS, original, original)  # no resize: no draft
    assert not decoded_at and same.shape == (original[1], original[0], 3)


def test_a_file_whose_size_differs_from_the_sample_table_is_refused_naming_it():
    with pytest.raises(UpstreamFormatError) as err:
        decode_for_size(PHOTOS[3], MAX_PIXELS, (10, 10), (5, 5))
    assert PHOTOS[3].name in str(err.value) and "the sample table says 10x10" in str(err.value)
    with pytest.raises(UpstreamFormatError, match="limits.max_image_pixels"):
        decode_for_size(PHOTOS[3], 1000, (306, 172), (100, 56))
