"""Photo-like synthetic images: multi-octave noise, colour ramps and blobs, fully determined by a key.

Flat colours would make perceptual hashes and JPEG sizes meaningless; these textures have the
edge and frequency content of real reef and coast photos, so hashing, dedup and codec costs in
tests and benchmarks behave like they would on real data. Every image derives from a string key,
not from a shared RNG stream, so a corpus generated at a larger scale contains the smaller one
byte for byte.
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

PALETTES: dict[str, list[tuple[int, int, int]]] = {
    # dark water -> coral/algae -> sand
    "reef": [(12, 38, 64), (30, 90, 110), (120, 110, 70), (180, 120, 90), (220, 200, 160)],
    # water -> wet sand -> dry sand -> vegetation -> built
    "coast": [(20, 50, 90), (60, 110, 140), (200, 190, 150), (90, 120, 60), (150, 150, 150)],
    "wildlife": [(30, 60, 80), (70, 100, 90), (140, 130, 110), (200, 170, 120), (240, 230, 210)],
}


def rng_for(*key: object) -> np.random.Generator:
    """A generator seeded from the key's text: the same key always gives the same stream."""
    digest = hashlib.sha256("\x1f".join(str(k) for k in key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _noise_octave(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    gh = max(2, cells * h // max(h, w) + 1)
    gw = max(2, cells * w // max(h, w) + 1)
    grid = rng.random((gh, gw), dtype=np.float32)
    up = Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(up, dtype=np.float32)


def fractal_noise(rng: np.random.Generator, h: int, w: int, octaves: int = 6) -> np.ndarray:
    """Value noise summed over octaves with 1/f amplitude, scaled to [0, 1]."""
    acc = np.zeros((h, w), dtype=np.float32)
    amp, total = 1.0, 0.0
    for octave in range(octaves):
        acc += amp * _noise_octave(rng, h, w, 3 * 2**octave)
        total += amp
        amp *= 0.55
    acc /= total
    lo, hi = float(acc.min()), float(acc.max())
    return (acc - lo) / (hi - lo + 1e-6)


def _ramp(values: np.ndarray, palette: list[tuple[int, int, int]]) -> np.ndarray:
    stops = np.linspace(0.0, 1.0, len(palette))
    colours = np.asarray(palette, dtype=np.float32)
    out = np.empty(values.shape + (3,), dtype=np.float32)
    for c in range(3):
        out[..., c] = np.interp(values, stops, colours[:, c])
    return out


def photo(key: str, h: int, w: int, palette: str = "reef") -> np.ndarray:
    """An HxWx3 uint8 image that looks like a photograph of a textured scene."""
    rng = rng_for("photo", key)
    base = fractal_noise(rng, h, w)
    img = _ramp(base, PALETTES[palette])
    # Blobs (coral heads, rocks, bushes) with their own texture give strong local edges.
    for _ in range(int(rng.integers(4, 12))):
        cy, cx = rng.random() * h, rng.random() * w
        ry, rx = (0.04 + 0.12 * rng.random()) * h, (0.04 + 0.12 * rng.random()) * w
        tint = rng.integers(0, 256, 3).astype(np.float32)
        y0, y1 = max(0, int(cy - ry)), min(h, int(cy + ry) + 1)
        x0, x1 = max(0, int(cx - rx)), min(w, int(cx + rx) + 1)
        if y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0
        patch = img[y0:y1, x0:x1]
        patch[mask] = 0.45 * patch[mask] + 0.55 * tint
    detail = fractal_noise(rng, h, w, octaves=3)[..., None]
    img = img * (0.75 + 0.5 * detail)
    # Sensor noise; integers are much cheaper to draw than normals at image sizes.
    img += rng.integers(-6, 7, img.shape, dtype=np.int8).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def video_frame(scene: np.ndarray, key: str, index: int, out_h: int, out_w: int) -> np.ndarray:
    """Frame `index` of a slow pan across `scene`: consecutive frames are near-duplicates."""
    rng = rng_for("frame", key, index)
    max_y, max_x = scene.shape[0] - out_h, scene.shape[1] - out_w
    y = min(max_y, index * 2)
    x = min(max_x, index * 3)
    frame = scene[y : y + out_h, x : x + out_w].astype(np.float32)
    frame += rng.integers(-4, 5, frame.shape, dtype=np.int8).astype(np.float32)
    return np.clip(frame, 0, 255).astype(np.uint8)
