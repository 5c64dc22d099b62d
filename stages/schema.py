"""The common sample table: the contract between ingest and everything after it.

Each `ingest@<source>` writes, under data/interim/<source>/:
  samples.parquet     one row per image (SAMPLES)
  points.parquet      one row per annotated point, point sources only (POINTS)
  quarantine.parquet  one row per input record that could not be used (QUARANTINE)

The README documents the columns; keep the two in step.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import pyarrow as pa

SAMPLES = pa.schema(
    [
        ("sample_id", pa.string()),  # "<source>-<upstream id slug>": ASCII, no dots, stable across builds
        ("source", pa.string()),
        ("upstream_id", pa.string()),  # the image's id upstream (uuid, s<id>/<name>, record/npz, ...)
        ("image_path", pa.string()),  # relative to the repo root, under data/raw/<source>/
        ("image_format", pa.string()),  # png | jpeg | npz
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("file_size", pa.int64()),
        ("file_sha256", pa.string()),
        ("pixel_sha256", pa.string()),  # sha256 of the decoded 8-bit RGB raster (imaging.to_rgb8)
        ("phash", pa.uint64()),  # 64-bit DCT hash, imagehash.phash-compatible
        # group keys for splitting (null where the source has none)
        ("region", pa.string()),
        ("session", pa.string()),
        ("spatial_block", pa.string()),
        ("observer", pa.string()),
        ("official_split", pa.string()),  # train | val | test where upstream defines one
        ("captured_at", pa.string()),  # ISO 8601 date or datetime, when known
        ("lat", pa.float64()),
        ("lon", pa.float64()),
        ("license", pa.string()),
        ("attribution", pa.string()),
        ("native_labels", pa.string()),  # JSON: labels exactly as upstream has them
        ("labels", pa.string()),  # JSON: labels in the project's label spaces
        ("mask_path", pa.string()),  # class-id mask (PNG, mode L) where one exists
        ("n_points", pa.int32()),
        # A site or survey where the source names one (CoralNet's aux metadata, per the source's
        # params): a group key for splits, like session.
        ("site", pa.string()),
    ]
)

POINTS = pa.schema(
    [
        ("point_id", pa.string()),  # upstream point id, or "<sample_id>-r<row>-c<col>"
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("row", pa.int32()),  # pixels from the top
        ("col", pa.int32()),  # pixels from the left
        ("source_label_id", pa.string()),  # CoralNet Label ID / MERMAID attribute id
        ("source_label", pa.string()),  # CoralNet short code / MERMAID attribute name
        ("benthic_attribute_id", pa.string()),
        ("benthic_attribute_name", pa.string()),
        ("growth_form_id", pa.string()),
        ("growth_form_name", pa.string()),
        ("top_level_category", pa.string()),
    ]
)

QUARANTINE = pa.schema(
    [
        ("source", pa.string()),
        ("record_kind", pa.string()),  # image | point | annotation_row | file | class
        ("record_id", pa.string()),
        ("file", pa.string()),  # the file the record came from, relative to the repo root
        ("reason", pa.string()),  # one of REASONS
        ("detail", pa.string()),
    ]
)

REASONS = {
    "missing_image": "the annotation refers to an image that is not in the fetched data",
    "not_a_regular_file": "a folder, a symbolic link or a special file where an image file is expected",
    "empty_file": "zero-byte file",
    "corrupt_image": "the image does not decode (truncated, garbage, broken chunks)",
    "image_too_large": "more pixels than limits.max_image_pixels (decompression-bomb bound)",
    "unsupported_format": "not an image type the pipeline accepts",
    "unsupported_bit_depth": "32-bit integer or float pixels (PIL mode I or F): no defined 8-bit scaling",
    "point_outside_image": "point row/col not inside 0 <= row < H, 0 <= col < W",
    "geometry_mismatch": "more than ingest.max_outside_share of an image's points fall outside it: "
    "the annotations were made for another image (the image and all its points)",
    "duplicate_point": "same (row, col) already annotated in this image; first kept",
    "unconfirmed_annotation": "machine (robot) or not-Confirmed annotation",
    "unmapped_label": "no label mapping into the MERMAID taxonomy",
    "ambiguous_mapping": "label maps to several MERMAID attribute/growth-form pairs",
    "unknown_class": "class name not in the remap/crosswalk table",
    "unreadable_npz": "npz missing required keys or malformed",
    "npz_needs_pickle": "npz holds object arrays that only load with pickle",
    "npz_too_large": "npz arrays declaring more bytes than ingest.coasttrain_max_npz_bytes (a memory bomb)",
    "not_one_hot": "an npz label that sets several classes at one pixel (not one-hot)",
    "superseded": "an earlier Doodler session's copy of an npz that a newer session labelled again",
    "image_unusable": "the record's image was quarantined (see its image row)",
    "no_annotation": "an image with no annotation record",
    "bad_record": "a record with missing or malformed required fields",
    "encoding_error": "a CSV record with bytes that are not in the file's encoding (UTF-8 unless declared)",
    "unreferenced_file": "a file of an export that no record uses (no row names it, not the labelset in use)",
    "bad_export": "a whole export that cannot be parsed, quarantined by ingest.on_bad_export: quarantine",
}

_SLUG_BAD = re.compile(r"[^A-Za-z0-9_-]+")
_PART_BAD = re.compile(r"[^A-Za-z0-9_]+")  # a part that is not the last may not hold `-` either


def digest_suffixed(slug: str, text: str) -> str:
    """`<slug>-<8 hex of sha256(text)>`: the form of an id whose text had to change (or could be
    mistaken for another id's), so that two upstream texts never share an id."""
    return f"{slug}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:8]}"


def _slug(text: str, bad: re.Pattern[str]) -> str:
    slug = bad.sub("_", text)
    if slug == text and text:
        return text
    # Slugging lost information (or the part is empty): a short hash of the exact text keeps two
    # upstream ids that slug alike (`pt.1`, `pt 1`, `pt/1`, `pt_1`) apart, and depends on nothing else.
    return digest_suffixed(slug, text)


def make_sample_id(source: str, *parts: object) -> str:
    """`<source>-<part>-...-<part>`: ASCII `[A-Za-z0-9_-]`, injective in the parts' text.

    A part that is already plain (`[A-Za-z0-9_-]`, and no `-` unless it is the last part) is kept
    as it is; any other part is slugged (runs of other characters become `_`) and suffixed with 8
    hex of the sha256 of its exact text, so distinct upstream ids never share an id. WebDataset
    splits keys at the first dot, so ids carry none; ids come from upstream ids only, never from
    row order, so a sample keeps its id as the sources grow.
    """
    texts = [unicodedata.normalize("NFC", str(p)) for p in parts]
    slugs = [_slug(t, _PART_BAD if i < len(texts) - 1 else _SLUG_BAD) for i, t in enumerate(texts)]
    return "-".join([source, *slugs])
