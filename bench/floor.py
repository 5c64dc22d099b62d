"""The codec floor: the least CPU the build can take with its codecs, as a bare single-process loop.

    python -m bench.floor [--root .] [--out floor.json] [--verify 5]

Run in a project that has been built (it reads each product's `data/release/<product>/manifest.parquet`
and the ingest sample tables for the image and mask paths). For every image that some product
packs, in path order, once:

- read the file and decode it once: a full decode (PIL, converted to RGB as pack converts it) where
  a product re-encodes its pixels; a Coast Train npz is inflated and its RGB array taken exactly as
  pack takes it; an iNat JPEG that no product re-encodes (`resize: null` copies the upstream bytes)
  gets only the reduced draft decode that its perceptual hash needs, as ingest does it;
- reef-points: cut every point's patch (`cut_patch`: the window, reflected only where it crosses
  the border, as pack does) and encode each with the product's settings;
- reef-images: fit to `max_side` and encode (a JPEG that shrinks is decoded again at a reduced
  DCT scale, `decode_for_size`, exactly as pack does); decode, resize and encode its mask if any;
- coast-seg: encode the image, decode and re-encode the mask;
- nothing else: no hashing, labels, JSON, tar, md5, manifest, parquet, dedup or split, no process
  pool, and one decode where the pipeline has one per stage that touches the image.

The encoders are `stages.pack`'s own (`encode_rgb`, `encode_mask`, `resize_rgb`, ...: thin wrappers
over Pillow with the product's fixed settings), so the floor encodes exactly what pack encodes;
`--verify N` checks that for the first N samples of each product the floor's image bytes equal the
member in the shard. Timers per phase (process CPU) are in the output, to say where a ratio's
excess goes (e.g. a decode repeated by ingest and by each product).
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from stages.config import load_params
from stages.fsutil import write_json
from stages.imaging import PHASH_SIZE
from stages.ingest.coasttrain import load_coasttrain_image
from stages.pack import (
    ImageSettings,
    cut_patch,
    decode_for_size,
    encode_mask,
    encode_rgb,
    fit_max_side,
    load_mask,
    open_image,
    product_settings,
    resize_mask,
    resize_rgb,
    rgb_array,
)

PRODUCTS = ("reef-points", "reef-images", "coast-seg", "inat2017")


@dataclass
class ImageWork:
    """What the products need from one image file."""

    path: str
    patches: list[tuple[str, int, int]] = field(default_factory=list)  # reef-points: (key, row, col)
    whole: list[tuple[str, str, str | None, tuple[int, int]]] = field(default_factory=list)
    # (product, key, mask path or None, output size) for reef-images, coast-seg, re-encoded inat2017
    hash_only: bool = False  # iNat bytes copied as they are: only the pHash decode is needed


class Timers:
    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.count: dict[str, int] = defaultdict(int)

    def add(self, phase: str, started: float, n: int = 1) -> float:
        now = time.process_time()
        self.cpu[phase] += now - started
        self.count[phase] += n
        return now


def _table(path: Path, columns: list[str]) -> list[dict[str, Any]]:
    names = pq.read_schema(path).names
    return pq.read_table(path, columns=[c for c in columns if c in names]).to_pylist()


def plan_work(root: Path, params: dict[str, Any]) -> tuple[dict[str, ImageWork], dict[str, ImageSettings]]:
    """Per image path, the patches and whole-image outputs of every product that was built."""
    samples: dict[str, dict[str, Any]] = {}
    for interim in sorted((root / "data" / "interim").iterdir()):
        if (interim / "samples.parquet").exists():
            for row in _table(
                interim / "samples.parquet", ["sample_id", "image_path", "mask_path", "width", "height"]
            ):
                samples[row["sample_id"]] = row
    work: dict[str, ImageWork] = {}
    settings: dict[str, ImageSettings] = {}
    for product in PRODUCTS:
        manifest = root / "data" / "release" / product / "manifest.parquet"
        if not manifest.exists():
            continue
        _, s = product_settings(params, product)
        settings[product] = s.image
        for row in _table(manifest, ["key", "sample_id", "row", "col"]):
            sample = samples[row["sample_id"]]
            path = str(root / sample["image_path"])
            item = work.setdefault(path, ImageWork(path))
            size = fit_max_side(int(sample["width"]), int(sample["height"]), s.image.max_side)
            mask = str(root / sample["mask_path"]) if sample.get("mask_path") else None
            if product == "reef-points":
                item.patches.append((row["key"], int(row["row"]), int(row["col"])))
            elif product == "inat2017" and size == (int(sample["width"]), int(sample["height"])):
                item.hash_only = True
            else:
                item.whole.append((product, row["key"], mask if product != "inat2017" else None, size))
    return work, settings


def _hash_decode(path: Path) -> None:
    """The reduced JPEG decode ingest does for a pHash (stages.imaging.probe_image_bytes)."""
    with Image.open(io.BytesIO(path.read_bytes())) as img:
        w, h = img.size
        img.draft("L", (max(PHASH_SIZE * 2, w // 8), max(PHASH_SIZE * 2, h // 8)))
        img.load()


def run_floor(root: Path, params: dict[str, Any], keep: set[str] | None = None) -> tuple[dict, dict]:
    """Run the loop; returns (summary, {key: image bytes} for the keys in `keep`)."""
    work, settings = plan_work(root, params)
    max_pixels = int(params["limits"]["max_image_pixels"])
    patch = 0
    if "reef-points" in settings:
        patch = int(product_settings(params, "reef-points")[1].patch_size or 224)
    t = Timers()
    kept: dict[str, bytes] = {}
    out_bytes = 0
    wall = time.perf_counter()
    now = time.process_time()
    for path_str in sorted(work):
        item = work[path_str]
        path = Path(path_str)
        if not item.patches and not item.whole:
            _hash_decode(path)
            now = t.add("decode.jpeg_draft", now)
            continue
        if path.suffix == ".npz":
            rgb = load_coasttrain_image(path, max_pixels)
            now = t.add("decode.npz", now)
        else:
            rgb = rgb_array(open_image(path, max_pixels))  # pack's own decode
            fmt = path.suffix.lower().lstrip(".")
            now = t.add(f"decode.{'jpeg' if fmt in ('jpg', 'jpeg') else fmt}", now)
        if item.patches:
            s, size = settings["reef-points"], patch
            for key, row, col in item.patches:
                data = encode_rgb(cut_patch(rgb, row, col, size), s)
                out_bytes += len(data)
                if keep is not None and key in keep:
                    kept[key] = data
            now = t.add("reef-points.crop_encode", now, len(item.patches))
        for product, key, mask_path, size_out in item.whole:
            s = settings[product]
            full = (rgb.shape[1], rgb.shape[0])
            if size_out != full and path.suffix.lower() in (".jpg", ".jpeg"):
                pixels = decode_for_size(path, max_pixels, full, size_out)  # pack's reduced decode
            else:
                pixels = resize_rgb(rgb, size_out)
            data = encode_rgb(pixels, s)
            out_bytes += len(data)
            if keep is not None and key in keep:
                kept[key] = data
            now = t.add(f"{product}.resize_encode", now)
            if mask_path is not None:
                mask = load_mask(Path(mask_path), (rgb.shape[1], rgb.shape[0]), max_pixels)
                out_bytes += len(encode_mask(resize_mask(mask, size_out), s))
                now = t.add(f"{product}.mask", now)
    summary = {
        "images": len(work),
        "patches": sum(len(w.patches) for w in work.values()),
        "whole_images": sum(len(w.whole) for w in work.values()),
        "hash_only_images": sum(1 for w in work.values() if w.hash_only and not (w.patches or w.whole)),
        "encoded_bytes": out_bytes,
        "cpu_s": round(sum(t.cpu.values()), 3),
        "wall_s": round(time.perf_counter() - wall, 3),
        "phases": {k: {"cpu_s": round(v, 3), "count": t.count[k]} for k, v in sorted(t.cpu.items())},
    }
    return summary, kept


def shard_member(shard: Path, offset: int, key: str, ext: str) -> bytes | None:
    """The `<key>.<ext>` member of the sample starting at `offset` in `shard`."""
    with open(shard, "rb") as fh:
        fh.seek(offset)
        with tarfile.open(fileobj=fh, mode="r|") as tar:
            for member in tar:
                stem, _, member_ext = member.name.partition(".")
                if stem != key:
                    return None
                if member_ext == ext:
                    f = tar.extractfile(member)
                    return f.read() if f else None
    return None


def verify_samples(root: Path, params: dict[str, Any], per_product: int) -> dict[str, Any]:
    """Keys of the first `per_product` samples of each product, compared after the floor ran."""
    picks: dict[str, list[dict[str, Any]]] = {}
    for product in PRODUCTS:
        manifest = root / "data" / "release" / product / "manifest.parquet"
        if manifest.exists() and product != "inat2017":
            rows = _table(manifest, ["key", "shard", "offset"])
            picks[product] = sorted(rows, key=lambda r: r["key"])[:per_product]
    return picks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path.cwd())
    parser.add_argument("--params", type=Path, default=None, help="default <root>/params.yaml")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--verify", type=int, default=5, help="samples per product checked against the shards"
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    params = load_params(args.params or root / "params.yaml")
    picks = verify_samples(root, params, args.verify) if args.verify else {}
    keep = {r["key"] for rows in picks.values() for r in rows}
    summary, kept = run_floor(root, params, keep)
    checked = mismatched = 0
    for product, rows in picks.items():
        ext = product_settings(params, product)[1].image.ext
        release = root / "data" / "release" / product
        for r in rows:
            checked += 1
            if shard_member(release / r["shard"], int(r["offset"]), r["key"], ext) != kept.get(r["key"]):
                mismatched += 1
    summary["verified"] = {"samples": checked, "mismatched": mismatched}
    if args.out:
        write_json(args.out, summary)
    print(
        f"codec floor: {summary['images']} images, {summary['patches']} patches, "
        f"{summary['whole_images']} whole images: {summary['cpu_s']:.1f} CPU s "
        f"(verified {checked} samples against the shards, {mismatched} differ)"
    )
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
