"""Reader code the cards print for layouts no generic reader understands.

reef-points `layout: images` stores each upstream image once with all its points; a reader cuts the
patches. The function below is printed in the card and in docs/pack.md (a test checks both print
these exact lines and that its patches equal the `patches` layout's pixel for pixel), so it must run
with webdataset and numpy alone: no project import.
"""

from __future__ import annotations

REEF_PATCHES = '''\
import numpy as np
import webdataset as wds


def reef_patches(urls):
    """(patch, point, image json) for every point of reef-points `layout: images` shards: pyspacer's
    crop (the RGB image reflect-padded by the patch size, the window at row, col), no resizing."""
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        meta = sample["json"]
        image = next(sample[ext] for ext in ("jpg", "png", "webp") if ext in sample)
        size = meta["patch_size"]
        rgb = np.pad(np.asarray(image.convert("RGB")), ((size, size), (size, size), (0, 0)), mode="reflect")
        for point in meta["points"]:
            top, left = int(point["row"] + size - size / 2), int(point["col"] + size - size / 2)
            yield rgb[top : top + size, left : left + size], point, meta
'''
