"""What the documents say about each product kind and dedup policy (shared by card, Croissant, viewer)."""

from __future__ import annotations

from typing import Any

# What one sample is and which tasks it serves, per pack kind.
KINDS: dict[str, dict[str, Any]] = {
    "reef-points": {
        "what": "a patch centred on one annotated point of a benthic photo-quadrat (pyspacer-compatible)",
        "task_categories": ["image-classification"],
        "task_ids": ["multi-class-image-classification"],
        "tags": ["coral-reef", "benthic", "point-annotation"],
    },
    "reef-images": {
        "what": "a whole benthic image with multilabel presence in the MERMAID taxonomy, point cover "
        "fractions and, where one exists, a segmentation mask",
        "task_categories": ["image-classification", "image-segmentation"],
        "task_ids": ["multi-label-image-classification", "semantic-segmentation"],
        "tags": ["coral-reef", "benthic", "multilabel"],
    },
    "coast-seg": {
        "what": "a coastal aerial or satellite image with a dense mask of the 7 common Coast Train classes",
        "task_categories": ["image-segmentation"],
        "task_ids": ["semantic-segmentation"],
        "tags": ["coastal", "remote-sensing", "land-cover"],
    },
    "inat2017": {
        "what": "an iNaturalist 2017 photo of a marine species with its category, bounding boxes and "
        "location where known",
        "task_categories": ["image-classification", "object-detection"],
        "task_ids": ["multi-class-image-classification"],
        "tags": ["species", "fish", "mollusca"],
    },
}

# What each products.<name>.dedup policy keeps of a duplicate cluster (stages/products.py).
KEEP_POLICIES = {
    "all": "every copy stays; the whole cluster is in one split.",
    "one": "one copy per cluster stays, the best-ranked among this product's sources.",
    "cover": "in rank order, a member stays unless its perceptual hash is within the dedup radius of "
    "a member already kept: near copies go, the distinct ends of a chained cluster (video frames) stay.",
}

# Known limitations of each kind, beyond what the counts show.
KIND_LIMITATIONS: dict[str, list[str]] = {
    "reef-points": [
        "Patches of one image share its scene, light and camera: they are kept in one split, but they are "
        "not independent samples (the effective sample size is nearer the number of images).",
        "Points near the image border are kept: their patch is completed by reflect padding, as pyspacer "
        "does.",
    ],
    "reef-images": [
        "Cover fractions come from the annotated points (tens per image), not from pixel counts.",
        "Segmentation masks exist only for the Seatizen images that have one; the other samples have no "
        "`seg.png`.",
        "Seatizen frames of one session are near duplicates; they share a split but are several samples.",
    ],
    "coast-seg": [
        "Masks are Doodler outputs remapped to 7 common classes; 255 marks pixels with no class (nodata).",
        "Image sources differ in resolution (Landsat, Sentinel-2, NAIP, orthophotos, quadrangles).",
    ],
    "inat2017": [
        "Images may not be redistributed; each carries its own licence and rights holder in `json`.",
        "The class index is the iNat 2017 category id: sparse, with most ids absent from this subset.",
    ],
}

SIZE_CATEGORIES = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
    (10_000_000_000, "1B<n<10B"),
    (100_000_000_000, "10B<n<100B"),
    (1_000_000_000_000, "100B<n<1T"),
)


def size_category(n: int) -> str:
    for bound, label in SIZE_CATEGORIES:
        if n < bound:
            return label
    return "n>1T"
