"""The ingest probe's cost per JPEG: one process, one image size, the median of a few runs.

    python -m bench.probe_jpeg [--megapixels 12] [--runs 7] [--quality 90]

Builds one photo-like JPEG deterministically (texture at 1/4 resolution, upscaled, plus sensor
grain, as the sample generators make them), then times `stages.imaging.probe_image_bytes` on its
bytes, and its parts on their own: the reduced (draft) decode the pHash uses, and a full decode
to RGB plus its sha256 (what the pixel hash costs). Process CPU time, milliseconds per image.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from stages.imaging import PHASH_SIZE, probe_image_bytes


def make_jpeg(megapixels: float, quality: int) -> bytes:
    from stages.samplegen.texture import photo, rng_for

    h = int(round((megapixels * 1e6 * 3 / 4) ** 0.5))
    w = h * 4 // 3
    small = photo("bench/probe-jpeg", h // 4, w // 4, "reef")
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    img += rng_for("bench", "probe-jpeg-grain").integers(-6, 7, img.shape, dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _draft(data: bytes) -> None:
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    img.draft("L", (max(PHASH_SIZE * 2, w // 8), max(PHASH_SIZE * 2, h // 8)))
    img.load()


def _full(data: bytes) -> None:
    img = Image.open(io.BytesIO(data))
    img.load()
    hashlib.sha256(np.asarray(img.convert("RGB")).tobytes()).hexdigest()


def _time(fn: Callable[[], object], runs: int) -> float:
    samples = []
    for _ in range(runs):
        t0 = time.process_time()
        fn()
        samples.append(time.process_time() - t0)
    return statistics.median(samples) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--megapixels", type=float, default=12.0)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--quality", type=int, default=90)
    args = ap.parse_args()
    data = make_jpeg(args.megapixels, args.quality)
    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
    print(f"jpeg {w}x{h} ({w * h / 1e6:.1f} MP), {len(data) / 1e6:.2f} MB, quality {args.quality}")
    probe = _time(lambda: probe_image_bytes(data, 10**9), args.runs)
    draft = _time(lambda: _draft(data), args.runs)
    full = _time(lambda: _full(data), args.runs)
    print(f"probe_image_bytes        {probe:8.1f} ms/image (median of {args.runs}, process CPU)")
    print(f"  draft decode (pHash)   {draft:8.1f} ms")
    print(f"  full decode + sha256   {full:8.1f} ms")


if __name__ == "__main__":
    main()
