"""Sample iNaturalist 2017 bucket: `s3/inaturalist-datasets/2017/` laid out as SOURCES §5.

Objects: `train_val_images.tar.gz` (`train_val_images/<supercategory>/<category>/<32 hex>.jpg`),
`train_val2017.zip` (COCO-style `train2017.json`, `val2017.json`), `train_2017_bboxes.zip` and
`val_2017_bboxes.zip` (the same plus `bbox`, `area`, `iscrowd`), `inat2017_locations.zip`
(`train2017_locations.json`, `val2017_locations.json`). No `.md5` side files: the real bucket has none.

Image `i` (id `i`) is derived only from the key ("inat2017", i): its category, split, observer,
size, pixels and location never depend on how many images are generated, so a larger scale is a
superset of a smaller one. This module also holds the deterministic archive writers the other
sample generators use (`zip_bytes`, `targz_bytes`).
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import json
import math
import tarfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from stages.executor import parallel_map
from stages.fsutil import write_bytes
from stages.progress import bar
from stages.samplegen.texture import photo, rng_for

# ---------------------------------------------------------------------------------------------
# Deterministic archives (shared by the Coast Train and Seatizen generators)

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
# Already-compressed payloads are stored: deflating them again costs time and saves nothing.
_STORED_SUFFIXES = (".jpg", ".jpeg", ".png", ".npz", ".gz", ".zip")


def zip_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A zip whose bytes depend only on `members`: names sorted, fixed timestamps and modes."""
    items = sorted(members, key=lambda m: m[0])
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise ValueError("duplicate zip member names")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in items:
            info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            info.create_system = 3  # unix, whatever platform generates it
            stored = name.lower().endswith(_STORED_SUFFIXES)
            info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
            zf.writestr(info, data, compresslevel=None if stored else 6)
    return buf.getvalue()


def _tarinfo(name: str, size: int, is_dir: bool) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 0 if is_dir else size
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.mode = 0o755 if is_dir else 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def targz_bytes(files: Iterable[tuple[str, bytes]], with_dirs: bool = True) -> bytes:
    """A tar.gz whose bytes depend only on `files`.

    Members sorted by name (directories as `name/` entries, as `tar czf` writes them, sorted
    with the files so a parent precedes its children), mtime 0, uid/gid 0, empty owner names,
    and a gzip header without a timestamp or file name.
    """
    files = list(files)
    entries: dict[str, bytes | None] = {}
    for name, data in files:
        if name in entries:
            raise ValueError(f"duplicate tar member {name!r}")
        entries[name] = data
        if with_dirs:
            parts = name.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                entries.setdefault("/".join(parts[:depth]) + "/", None)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(entries):
                data = entries[name]
                if data is None:
                    tar.addfile(_tarinfo(name.rstrip("/"), 0, True))
                else:
                    tar.addfile(_tarinfo(name, len(data), False), io.BytesIO(data))
    return buf.getvalue()


def count_for(base: int, scale: float) -> int:
    """`ceil(base * scale)`, the item count every sample generator uses."""
    return max(0, math.ceil(base * scale - 1e-9))


# ---------------------------------------------------------------------------------------------
# iNaturalist 2017

BUCKET_DIR = Path("s3") / "inaturalist-datasets" / "2017"
BASE_IMAGES = 120
CORRUPT_INDEX = 2  # a low index so the planted corrupt JPEG exists at every scale >= 0.03
MARINE = ("Actinopterygii", "Mollusca")
# Supercategories without boxes in the real bbox files (only 9 of the 13 have them).
NO_BBOX = frozenset({"Plantae", "Fungi", "Protozoa", "Chromista"})

# Fixed category list: ids are positions, so they never move when the corpus grows.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("Actinopterygii", "Amphiprion ocellaris"),
    ("Actinopterygii", "Chromis viridis"),
    ("Actinopterygii", "Lutjanus kasmira"),
    ("Actinopterygii", "Thalassoma bifasciatum"),
    ("Actinopterygii", "Pterois volitans"),
    ("Actinopterygii", "Scarus iseri"),
    ("Mollusca", "Chromodoris willani"),
    ("Mollusca", "Tridacna maxima"),
    ("Mollusca", "Octopus vulgaris"),
    ("Mollusca", "Haliotis rufescens"),
    ("Mollusca", "Mytilus californianus"),
    ("Aves", "Ardea herodias"),
    ("Aves", "Anas platyrhynchos"),
    ("Aves", "Haliaeetus leucocephalus"),
    ("Aves", "Cardinalis cardinalis"),
    ("Plantae", "Lupinus arcticus"),
    ("Plantae", "Quercus agrifolia"),
    ("Plantae", "Eschscholzia californica"),
    ("Insecta", "Danaus plexippus"),
    ("Insecta", "Apis mellifera"),
    ("Insecta", "Coccinella septempunctata"),
    ("Reptilia", "Chelonia mydas"),
    ("Mammalia", "Enhydra lutris"),
    ("Fungi", "Amanita muscaria"),
    ("Arachnida", "Argiope aurantia"),
)
_MARINE_IDS = [i for i, (sup, _) in enumerate(CATEGORIES) if sup in MARINE]
_OTHER_IDS = [i for i, (sup, _) in enumerate(CATEGORIES) if sup not in MARINE]

LICENSES = [
    {"id": 1, "name": "Attribution-NonCommercial-ShareAlike License",
     "url": "http://creativecommons.org/licenses/by-nc-sa/2.0/"},
    {"id": 2, "name": "Attribution-NonCommercial License", "url": "http://creativecommons.org/licenses/by-nc/2.0/"},
    {"id": 3, "name": "Attribution-NonCommercial-NoDerivs License",
     "url": "http://creativecommons.org/licenses/by-nc-nd/2.0/"},
    {"id": 4, "name": "Attribution License", "url": "http://creativecommons.org/licenses/by/2.0/"},
    {"id": 5, "name": "Attribution-ShareAlike License", "url": "http://creativecommons.org/licenses/by-sa/2.0/"},
    {"id": 6, "name": "Attribution-NoDerivs License", "url": "http://creativecommons.org/licenses/by-nd/2.0/"},
]
INFO = {
    "year": 2017,
    "version": "1.0",
    "description": "The 2017 iNaturalist competition dataset (tidepool sample stand-in)",
    "contributor": "iNaturalist",
    "url": "https://github.com/visipedia/inat_comp",
    "date_created": "2017-03-03 00:00:00",
}

_SYLLABLES = ("ka", "lo", "mi", "ra", "ne", "to", "su", "vi", "an", "el", "jo", "sé", "ma", "ri", "do")


def _observer(uid: int) -> tuple[str, float, float]:
    """(display name, home lat, home lon) of one observer: their photos cluster around home."""
    rng = rng_for("inat2017", "observer", uid)
    first = "".join(rng.choice(_SYLLABLES, 2)).capitalize()
    last = "".join(rng.choice(_SYLLABLES, 3)).capitalize()
    lat = float(rng.uniform(-40, 60))
    lon = float(rng.uniform(-160, 150))
    return f"{first} {last}", lat, lon


def _image_spec(i: int) -> dict:
    """Everything about image `i` except its pixels; a pure function of `i`."""
    rng = rng_for("inat2017", "image", i)
    marine = i == CORRUPT_INDEX or rng.random() < 0.4
    if i == CORRUPT_INDEX:
        cat_id = 0  # Actinopterygii: the planted corrupt JPEG must sit inside the marine subset
    else:
        pool = _MARINE_IDS if marine else _OTHER_IDS
        cat_id = int(pool[int(rng.integers(len(pool)))])
    supercategory, name = CATEGORIES[cat_id]
    split = "val" if rng.random() < 0.25 else "train"
    # The observer pool grows slowly with the index, so early observers own several images each
    # and many appear in both splits (the official split is per image, not per observer).
    uid = 1000 + int(rng.integers(6 + i // 10))
    long_side = int(rng.choice([800, 800, 640, 500]))
    aspect = [(4, 3), (3, 4), (1, 1), (3, 2), (2, 3)][int(rng.integers(5))]
    if aspect[0] >= aspect[1]:
        w, h = long_side, long_side * aspect[1] // aspect[0]
    else:
        h, w = long_side, long_side * aspect[0] // aspect[1]
    hexname = hashlib.md5(f"inat2017-image-{i}".encode()).hexdigest()
    boxes = []
    if supercategory not in NO_BBOX and rng.random() < 0.9:
        for _ in range(1 + int(rng.random() < 0.2)):
            bw = int(w * rng.uniform(0.2, 0.6))
            bh = int(h * rng.uniform(0.2, 0.6))
            bx = int(rng.integers(0, w - bw))
            by = int(rng.integers(0, h - bh))
            boxes.append([bx, by, bw, bh])
    holder, home_lat, home_lon = _observer(uid)
    lat: float | None = round(home_lat + float(rng.normal(0, 0.3)), 6)
    lon: float | None = round(home_lon + float(rng.normal(0, 0.3)), 6)
    if rng.random() < 0.08:
        lat = lon = None
    day = dt.date(2010, 1, 1) + dt.timedelta(days=int(rng.integers(0, 2500)))
    date: str | None = f"{day.isoformat()} {int(rng.integers(6, 20)):02d}:{int(rng.integers(60)):02d}:00"
    if rng.random() < 0.05:
        date = None
    return {
        "id": i,
        "category_id": cat_id,
        "supercategory": supercategory,
        "category": name,
        "split": split,
        "user_id": uid,
        "rights_holder": holder,
        "license": int(rng.integers(1, 7)),
        "width": w,
        "height": h,
        "file_name": f"train_val_images/{supercategory}/{name}/{hexname}.jpg",
        "boxes": boxes,
        "lat": lat,
        "lon": lon,
        "date": date,
        "marine": supercategory in MARINE,
    }


def _render(i: int) -> tuple[dict, bytes]:
    """(spec, JPEG bytes) for image `i`; module level so a process pool can run it."""
    spec = _image_spec(i)
    h, w = spec["height"], spec["width"]
    # Texture at half resolution, upscaled, plus fresh sensor noise: 800 px photos cost a quarter
    # as much (this module dominated generation time at scale 10) and still look like photos.
    half = photo(f"inat2017/{i}", h // 2, w // 2, "reef" if spec["marine"] else "wildlife")
    img = np.asarray(Image.fromarray(half).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    img += rng_for("inat2017", "grain", i).integers(-5, 6, img.shape, dtype=np.int8).astype(np.float32)
    # The organism: a tinted, textured ellipse inside each box, so boxes frame real content.
    rng = rng_for("inat2017", "organism", i)
    for bx, by, bw, bh in spec["boxes"] or [[w // 4, h // 4, w // 2, h // 2]]:
        tint = rng.integers(30, 256, 3).astype(np.float32)
        yy, xx = np.ogrid[by : by + bh, bx : bx + bw]
        cy, cx = by + bh / 2, bx + bw / 2
        mask = ((yy - cy) / (bh / 2)) ** 2 + ((xx - cx) / (bw / 2)) ** 2 < 1.0
        patch = img[by : by + bh, bx : bx + bw]
        patch[mask] = 0.35 * patch[mask] + 0.65 * tint
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=88)
    data = buf.getvalue()
    if i == CORRUPT_INDEX:
        # Truncated mid-scan like an interrupted upload: the header parses, decoding fails.
        data = data[: int(len(data) * 0.55)]
    return spec, data


def _coco(specs: list[dict], with_boxes: bool) -> dict:
    images, annotations = [], []
    for s in specs:
        if with_boxes and not s["boxes"]:
            continue
        images.append({
            "id": s["id"], "width": s["width"], "height": s["height"], "file_name": s["file_name"],
            "license": s["license"], "rights_holder": s["rights_holder"],
        })
        if with_boxes:
            for k, (bx, by, bw, bh) in enumerate(s["boxes"]):
                annotations.append({
                    "id": s["id"] * 10 + k, "image_id": s["id"], "category_id": s["category_id"],
                    "bbox": [bx, by, bw, bh], "area": bw * bh, "iscrowd": 0,
                })
        else:
            annotations.append({"id": s["id"], "image_id": s["id"], "category_id": s["category_id"]})
    # The bbox files list only the categories of the supercategories that have boxes.
    categories = [
        {"id": cid, "name": name, "supercategory": sup}
        for cid, (sup, name) in enumerate(CATEGORIES)
        if not with_boxes or sup not in NO_BBOX
    ]
    return {"info": INFO, "images": images, "categories": categories,
            "annotations": annotations, "licenses": LICENSES}


def _locations(specs: list[dict]) -> list[dict]:
    return [
        {"id": s["id"], "lat": s["lat"], "lon": s["lon"], "user_id": s["user_id"], "date": s["date"]}
        for s in specs
    ]


def _json_bytes(obj: object) -> bytes:
    # Compact like the real competition files; key order is fixed by construction.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def generate(out: Path, scale: float = 1.0, jobs: int = 1) -> dict:
    """Write the iNat 2017 sample objects under `out/s3/inaturalist-datasets/2017/`."""
    n = count_for(BASE_IMAGES, scale)
    specs: list[dict] = []
    files: list[tuple[str, bytes]] = []
    with bar(total=n, desc="samplegen inat2017", unit="img") as progress:
        for spec, data in parallel_map(_render, range(n), jobs=jobs, chunksize=8):
            specs.append(spec)
            files.append((spec["file_name"], data))
            progress.update(1)
    by_split = {split: [s for s in specs if s["split"] == split] for split in ("train", "val")}

    objects: dict[str, bytes] = {
        "train_val_images.tar.gz": targz_bytes(files),
        "train_val2017.zip": zip_bytes(
            [(f"{split}2017.json", _json_bytes(_coco(by_split[split], False))) for split in by_split]
        ),
        "train_2017_bboxes.zip": zip_bytes(
            [("train_2017_bboxes.json", _json_bytes(_coco(by_split["train"], True)))]
        ),
        "val_2017_bboxes.zip": zip_bytes(
            [("val_2017_bboxes.json", _json_bytes(_coco(by_split["val"], True)))]
        ),
        "inat2017_locations.zip": zip_bytes(
            [(f"{split}2017_locations.json", _json_bytes(_locations(by_split[split]))) for split in by_split]
        ),
    }
    checksums = {}
    for name, data in objects.items():
        write_bytes(out / BUCKET_DIR / name, data)
        checksums[f"inat2017/{name}"] = hashlib.md5(data).hexdigest()

    corrupt = specs[CORRUPT_INDEX] if n > CORRUPT_INDEX else None
    users = {split: {s["user_id"] for s in by_split[split]} for split in by_split}
    planted = {
        "objects": sorted(objects),
        "images": n,
        "train_images": len(by_split["train"]),
        "val_images": len(by_split["val"]),
        "marine_images": sum(s["marine"] for s in specs),
        "corrupt_jpegs": [] if corrupt is None else [{
            "id": corrupt["id"], "file_name": corrupt["file_name"], "split": corrupt["split"],
            "supercategory": corrupt["supercategory"], "kind": "truncated",
        }],
        "observers_in_both_splits": sorted(users["train"] & users["val"]),
        "images_without_location": sorted(s["id"] for s in specs if s["lat"] is None),
        "images_without_date": sorted(s["id"] for s in specs if s["date"] is None),
        "date_key": "date (the real key is unverified)",
    }
    return {"planted": planted, "checksums": checksums}
