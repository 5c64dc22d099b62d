"""Scenes shared between source generators, so cross-source duplicates are real duplicates."""

from __future__ import annotations

import numpy as np

from stages.samplegen.texture import photo

# One reef scene appears in MERMAID (lossless PNG), CoralNet (JPEG) and, resized and re-encoded,
# in Seatizen: dedup must find all three.
CROSS_SOURCE_SCENE_KEY = "planted-cross-source-scene"
CROSS_SOURCE_SCENE_SIZE = (480, 640)  # (height, width)


def cross_source_scene() -> np.ndarray:
    h, w = CROSS_SOURCE_SCENE_SIZE
    return photo(CROSS_SOURCE_SCENE_KEY, h, w, "reef")
