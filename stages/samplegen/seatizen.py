"""Sample Seatizen Atlas Zenodo record 13951614 (v1.1.0) under `http/zenodo/api/records/13951614/`.

`index.json` is the record as Zenodo's API returns it (file links use the literal `{{BASE}}`, which
the loopback server replaces); each file's bytes are at `files/<key>/content`:

- `20241016_132819_multilabel_annotations.csv`: `FileName, frame_doi, relative_file_path,
  annotation_date`, then one column per class, 1 present / 0 absent / -1 not annotated;
- `20241018_segmentation_annotations.json`: COCO-style instance masks (polygons, one RLE) for a
  subset of the images (the real layout is unverified);
- `gbif_class_mapping.csv`: `label,code_gcrmn,id_gbif` (columns of the authors' own label table
  in SeatizenDOI/zenodo-tools; the published file's columns are unverified);
- `images.zip`: `2024_dataset/<FileName>`, mixed `.JPG`/`.jpg`/`.jpeg` (and one `.png`), plus one
  raster mask `2024_dataset/annotation_mask_<stem>.png` (mode L, ids 1..5) with the colour table
  `2024_dataset/color.txt` of the-point-is-the-mask.

Besides the video sessions, fixed sessions with the odd names of SOURCES §6 (ODD_SESSIONS: country
code without a place, a place of several words, a numbered platform with one token after it,
still photos, a four-token rest, a name that fits no rule), and a class column `Algae` that the
crosswalk does not know (as in the authors' drone CSVs). They do not depend on the scale.

Session `s` is derived only from the key ("seatizen", s): its place, platform, date, frames and
labels never depend on how many sessions exist, so a larger scale is a superset of a smaller one.
Frames of a session are `texture.video_frame`s of one scene: near-duplicates, as upstream.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from stages.executor import parallel_map
from stages.fsutil import write_bytes, write_json
from stages.progress import bar
from stages.samplegen.inat import count_for, zip_bytes
from stages.samplegen.planted import cross_source_scene
from stages.samplegen.texture import photo, rng_for, video_frame

RECORD_ID = "13951614"
RECORD_DIR = Path("http") / "zenodo" / "api" / "records" / RECORD_ID
MULTILABEL_CSV = "20241016_132819_multilabel_annotations.csv"
SEGMENTATION_JSON = "20241018_segmentation_annotations.json"
GBIF_CSV = "gbif_class_mapping.csv"
IMAGES_ZIP = "images.zip"
ZIP_FOLDER = "2024_dataset"
BASE_SESSIONS = 10

# (label, GCRMN code, GBIF taxon) after the authors' label table; non-benthic labels last.
CLASS_TABLE: tuple[tuple[str, str, str], ...] = (
    ("Acropora_Branching", "ACB", "7673664"),
    ("Acropora_Digitate", "ACD", "7673664"),
    ("Acropora_Submassive", "ACS", "7673664"),
    ("Acropora_Tabular", "ACT", "7673664"),
    ("Actinopyga_echinites", "", "2279192"),
    ("Algae_Coralline", "AC", "670"),
    ("Algae_Halimeda", "AD", ""),
    ("Algae_Turf", "AG", ""),
    ("Algal_Assemblage", "AA", ""),
    ("Ascidians", "AS", "2330492"),
    ("Atra/Leucospilota", "", "2279143"),
    ("Bleached_coral", "", "714"),
    ("Dead_coral", "", ""),
    ("Echinometra_mathaei", "", "2278863"),
    ("Giant_clam", "BE", "4372618"),
    ("Gorgonian", "GO", "9197"),
    ("Heterocentrotus_mamillatus", "", "5842749"),
    ("Living_coral", "", "714"),
    ("Non-acropora_Branching", "CB", "714"),
    ("Non-acropora_Coral_free", "CL", "714"),
    ("Non-acropora_Encrusting", "CE", "714"),
    ("Non-acropora_Foliose", "CF", "714"),
    ("Non-acropora_Massive", "CM", "714"),
    ("Non-acropora_Millepora", "MI", "714"),
    ("Non-acropora_Submassive", "CS", "714"),
    ("Other_starfish", "ET", "214"),
    ("Rock", "RO", ""),
    ("Rubble", "DEB", ""),
    ("Sand", "SA", ""),
    ("Sea_anemone", "AN", "705"),
    ("Sea_cucumber", "", "2279143"),
    ("Sea_urchin", "OU", "221"),
    ("Soft_coral", "CMO", "43"),
    ("Sponges", "EP", "105"),
    ("Syringodium_isoetifolium", "", "2864078"),
    ("Thalassodendron_ciliatum", "", "5328510"),
    ("Thorny_starfish", "AP", "2271207"),
    ("Fish", "", ""),
    ("Turtle", "", "11418114"),
    ("Homo_Sapiens", "", ""),
    ("Human_Object", "", ""),
    ("Waste", "", ""),
    ("Blurred", "", ""),
    ("Useless", "", ""),
    ("Trample", "", ""),
)
CLASSES = tuple(sorted(label for label, _, _ in CLASS_TABLE))
NON_BENTHIC = ("Fish", "Turtle", "Homo_Sapiens", "Human_Object", "Waste", "Blurred", "Useless", "Trample")
BENTHIC = tuple(c for c in CLASSES if c not in NON_BENTHIC)
# Classes added in a later annotation campaign: frames annotated before it read -1 for them.
LATE_CLASSES = ("Algae_Halimeda", "Gorgonian", "Thorny_starfish", "Trample", "Waste")
LATE_CAMPAIGN = dt.date(2024, 3, 1)
# Occurrence rate per frame of the non-benthic labels.
NON_BENTHIC_RATE = {"Fish": 0.3, "Turtle": 0.03, "Homo_Sapiens": 0.05, "Human_Object": 0.05, "Waste": 0.03,
                    "Blurred": 0.05, "Useless": 0.03, "Trample": 0.02}

PLACES = (("ATF", "Europa"), ("REU", "StLeu"), ("REU", "Hermitage"), ("MUS", "Tamarin"), ("SYC", "Mahe"),
          ("MDG", "NosyBe"), ("REU", "Boucan"), ("ATF", "JuanDeNova"))
# Cycled by session index so every platform appears at scale 1.
PLATFORMS = ("ASV-00", "UAV-01", "SCUBA", "MASK", "KITE", "PADDLE", "ASV-01")
EXTENSIONS = (".jpeg", ".JPG", ".jpg")

# Planted cases (session index, frame position), low so they exist at scale >= 0.2.
MISSING_FROM_ZIP = (0, 2)
ZIP_ONLY = (1, 3)
CROSS_SOURCE_SESSION = "20230415_REU-StLeu_SCUBA_GX010227"
CROSS_SOURCE_FILE = f"{CROSS_SOURCE_SESSION}_001.JPG"
CROSS_SOURCE_SIZE = (360, 480)  # (h, w): the 480x640 shared scene, downscaled then re-encoded
RLE_IMAGE = (0, 0)  # its first instance is stored as an uncompressed RLE (iscrowd 1)
UNKNOWN_CLASS = "Algae"  # a class column the crosswalk lacks, as in the authors' drone CSVs
UNKNOWN_CLASS_RATE = 0.4

# (form, name prefix, frame names' rest tokens, extension, platform kind): the odd names of
# SOURCES §6, each a small session of its own.
ODD_SESSIONS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("country_without_place", "20190420_MYT_scuba", ("DSCI1495", "DSCI1496", "DSCI1497"), ".JPG"),
    ("place_of_several_words", "20221021_MUS-Le-Morne-Saint-Jacques_paddle-2",
     ("10_00168", "10_00169", "10_00170"), ".jpg"),
    ("numbered_platform_one_token", "20210618_ATF-Europa_ASV-01", ("G0012345", "G0012346"), ".JPG"),
    ("still_photos", "20150611_REU-St-Gilles_scuba", ("G0043959", "G0043960", "G0043961"), ".JPG"),
    ("four_token_rest", "20220305_SYC-Mahe_MASK", ("ses_2_GX030120_0001", "ses_2_GX030120_0002"), ".jpeg"),
    ("fits_no_rule", "odm_orthophoto_317341", ("7665591", "7665592"), ".png"),
)
RASTER_MASK_IMAGE = "20150611_REU-St-Gilles_scuba_G0043959.JPG"  # a still photo without COCO instances
# the-point-is-the-mask's color.txt, as its authors wrote it (value R G B A; no final newline)
COLOR_TXT = (
    "-9999       0   0   0   0\nnan       0   0   0   0\n0       0   0   0   0\n1       0   153 255 127\n"
    "2       0   204 102 127\n3       204 102 0   127\n4       204 0   204 127\n5       255 255 102 127"
)


def session_spec(s: int) -> dict:
    """Name, platform, frames and labels of session `s`: a pure function of `s`."""
    rng = rng_for("seatizen", "session", s)
    ccc, place = PLACES[int(rng.integers(len(PLACES)))]
    platform = PLATFORMS[s % len(PLATFORMS)]
    day = dt.date(2021, 1, 1) + dt.timedelta(days=int(rng.integers(0, 1100)))
    if platform.startswith("UAV"):
        video = f"DJI{int(rng.integers(0, 10000)):04d}"
    else:
        video = f"GX0{int(rng.integers(10000, 100000)):05d}"  # GoPro file names
    n_frames = 6 + int(rng.integers(0, 5))
    start = int(rng.integers(1, 40))
    ext = EXTENSIONS[s % len(EXTENSIONS)]
    size = (300, 400) if platform.startswith("UAV") else (288, 384)
    name = f"{day:%Y%m%d}_{ccc}-{place}_{platform}_{video}"
    annotated = dt.date(2023, 6, 1) + dt.timedelta(days=int(rng.integers(0, 480)))
    base = {str(c) for c in rng.choice(BENTHIC, int(rng.integers(4, 10)), replace=False)}
    return {
        "index": s,
        "name": name,
        "platform": platform,
        "frames": [f"{name}_{start + k:03d}{ext}" for k in range(n_frames)],
        "size": size,
        "frame_doi": f"10.5281/zenodo.{10000000 + int(rng.integers(0, 9000000))}",
        "annotation_date": annotated.isoformat(),
        "base_classes": sorted(base),
    }


def odd_spec(i: int) -> dict:
    """Name, frames and labels of odd session `i` (ODD_SESSIONS): fixed, whatever the scale."""
    form, prefix, rests, ext = ODD_SESSIONS[i]
    rng = rng_for("seatizen", "odd", form)
    base = {str(c) for c in rng.choice(BENTHIC, int(rng.integers(4, 10)), replace=False)}
    return {
        "index": -2 - i,
        "form": form,
        "name": prefix,
        "platform": "SCUBA",
        "frames": [f"{prefix}_{rest}{ext}" for rest in rests],
        "size": (240, 320),
        "frame_doi": f"10.5281/zenodo.{10000000 + int(rng.integers(0, 9000000))}",
        "annotation_date": "2024-06-01",
        "base_classes": sorted(base),
    }


def render_odd(i: int) -> list[tuple[str, bytes]]:
    spec = odd_spec(i)
    h, w = spec["size"]
    scene = photo(f"seatizen/odd/{spec['form']}", h + 24, w + 36, "reef")
    out = []
    for k, name in enumerate(spec["frames"]):
        pixels = video_frame(scene, spec["name"], k, h, w)
        if name.endswith(".png"):
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "PNG", compress_level=6)
            out.append((name, buf.getvalue()))
        else:
            out.append((name, _jpeg(pixels, 90)))
    return out


def raster_mask(h: int, w: int) -> bytes:
    """A mode-L class-id mask (ids 1..5 of color.txt, 0 = no data) of blobs over sand."""
    rng = rng_for("seatizen", "raster-mask", RASTER_MASK_IMAGE)
    mask = np.full((h, w), 5, dtype=np.uint8)
    yy, xx = np.ogrid[:h, :w]
    for value in (1, 2, 3, 4, 1):
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        ry, rx = rng.uniform(0.08, 0.2) * h, rng.uniform(0.08, 0.2) * w
        mask[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0] = value
    mask[:4, :] = 0  # an unannotated strip along the top edge
    buf = io.BytesIO()
    Image.fromarray(mask, "L").save(buf, "PNG", compress_level=6)
    return buf.getvalue()


def _unknown_value(name: str) -> int:
    return int(rng_for("seatizen", "unknown-class", name).random() < UNKNOWN_CLASS_RATE)


def _labels(spec: dict, k: int) -> dict[str, int]:
    rng = rng_for("seatizen", "labels", spec["name"], k)
    base = set(spec["base_classes"])
    values: dict[str, int] = {}
    for c in CLASSES:
        if c in NON_BENTHIC:
            rate = NON_BENTHIC_RATE[c] * (4 if c == "Homo_Sapiens" and spec["platform"] == "SCUBA" else 1)
            values[c] = int(rng.random() < rate)
        else:
            values[c] = int(rng.random() < (0.9 if c in base else 0.03))
    if dt.date.fromisoformat(spec["annotation_date"]) < LATE_CAMPAIGN:
        for c in LATE_CLASSES:
            values[c] = -1
    return values


def _jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def render_session(s: int) -> list[tuple[str, bytes]]:
    """(file name, JPEG bytes) of every frame of session `s`: a slow pan over one scene."""
    spec = session_spec(s)
    h, w = spec["size"]
    scene = photo(f"seatizen/{spec['name']}", h + 24, w + 36, "reef")
    return [
        (name, _jpeg(video_frame(scene, spec["name"], k, h, w), 90))
        for k, name in enumerate(spec["frames"])
    ]


def _polygon(rng: np.random.Generator, h: int, w: int) -> tuple[list[float], float, list[float]]:
    cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
    ry, rx = rng.uniform(0.08, 0.22) * h, rng.uniform(0.08, 0.22) * w
    n = int(rng.integers(10, 17))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radius = rng.uniform(0.75, 1.0, n)
    xs = np.round(cx + rx * radius * np.cos(angles), 1)
    ys = np.round(cy + ry * radius * np.sin(angles), 1)
    area = 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))
    flat = [float(v) for pair in zip(xs, ys) for v in pair]
    bbox = [float(xs.min()), float(ys.min()), round(float(xs.max() - xs.min()), 1),
            round(float(ys.max() - ys.min()), 1)]
    return flat, round(area, 2), bbox


def rle_encode(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: run lengths over the column-major pixels, starting with a 0-run."""
    flat = mask.flatten(order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def _segmentation(specs: list[dict], labels: dict[str, dict[str, int]], skip: set[str]) -> dict:
    """COCO instance masks for ~30% of the frames (never the planted zip-only / CSV-only ones)."""
    seg_classes = list(BENTHIC)
    cat_id = {c: i + 1 for i, c in enumerate(seg_classes)}
    images, annotations = [], []
    for spec in specs:
        h, w = spec["size"]
        for k, name in enumerate(spec["frames"]):
            rng = rng_for("seatizen", "segmentation", name)
            if name in skip or not (rng.random() < 0.3 or (spec["index"], k) == RLE_IMAGE):
                continue
            image_id = spec["index"] * 1000 + k
            images.append({"id": image_id, "file_name": name, "width": w, "height": h})
            present = [c for c in seg_classes if labels[name].get(c) == 1] or ["Sand"]
            for j in range(1 + int(rng.integers(0, 3))):
                category = present[int(rng.integers(len(present)))]
                ann = {"id": image_id * 10 + j, "image_id": image_id, "category_id": cat_id[category]}
                if (spec["index"], k) == RLE_IMAGE and j == 0:
                    yy, xx = np.ogrid[:h, :w]
                    mask = ((yy - h * 0.5) / (h * 0.2)) ** 2 + ((xx - w * 0.45) / (w * 0.25)) ** 2 < 1.0
                    ys, xs = np.nonzero(mask)
                    ann.update(segmentation=rle_encode(mask), area=float(mask.sum()), iscrowd=1,
                               bbox=[float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                                     float(ys.max() - ys.min() + 1)])
                else:
                    poly, area, bbox = _polygon(rng, h, w)
                    ann.update(segmentation=[poly], area=area, iscrowd=0, bbox=bbox)
                annotations.append(ann)
    return {
        "info": {"description": "Seatizen Atlas instance segmentation annotations", "version": "1.1.0",
                 "date_created": "2024-10-18"},
        "licenses": [{"id": 1, "name": "CC-BY-4.0", "url": "https://creativecommons.org/licenses/by/4.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": cat_id[c], "name": c, "supercategory": _supercategory(c)} for c in seg_classes
        ],
    }


def _supercategory(label: str) -> str:
    if "acropora" in label.lower() or "coral" in label.lower() or label == "Gorgonian":
        return "Coral"
    if label.startswith(("Algae", "Algal", "Syringodium", "Thalassodendron")):
        return "Algae and seagrass"
    if label in ("Rock", "Rubble", "Sand"):
        return "Substrate"
    return "Invertebrate"


def _csv_text(header: list[str], rows: list[list[object]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _record_json(files: dict[str, bytes]) -> dict:
    base = "{{BASE}}/zenodo/api/records/" + RECORD_ID
    return {
        "id": int(RECORD_ID),
        "recid": RECORD_ID,
        "doi": f"10.5281/zenodo.{RECORD_ID}",
        "doi_url": f"https://doi.org/10.5281/zenodo.{RECORD_ID}",
        "created": "2024-10-18T09:12:44.000000+00:00",
        "modified": "2024-10-18T09:40:02.000000+00:00",
        "status": "published",
        "metadata": {
            "title": "Seatizen Atlas: a collaborative dataset of underwater and aerial marine imagery "
                     "(annotated images, tidepool sample)",
            "version": "1.1.0",
            "publication_date": "2024-10-18",
            "license": {"id": "cc-by-4.0"},
            "resource_type": {"type": "dataset", "title": "Dataset"},
            "creators": [{"name": "Contini, Matteo", "affiliation": "Ifremer"}],
            "description": "Multilabel and segmentation annotations of Seatizen frames (sample stand-in).",
        },
        "files": [
            {
                "id": str(uuid.UUID(bytes=hashlib.md5(f"{RECORD_ID}/{key}".encode()).digest(), version=4)),
                "key": key,
                "size": len(data),
                "checksum": f"md5:{hashlib.md5(data).hexdigest()}",
                "links": {"self": f"{base}/files/{key}/content"},
            }
            for key, data in sorted(files.items())
        ],
        "links": {"self": base, "files": f"{base}/files"},
    }


def generate(out: Path, scale: float = 1.0, jobs: int = 1) -> dict:
    """Write the Seatizen sample record under `out/http/zenodo/api/records/13951614/`."""
    n = count_for(BASE_SESSIONS, scale)
    specs = [session_spec(s) for s in range(n)]
    if len({spec["name"] for spec in specs} | {CROSS_SOURCE_SESSION}) != n + 1:
        raise AssertionError("two Seatizen sessions share a name")
    frames: dict[str, bytes] = {}
    with bar(total=n, desc="samplegen seatizen", unit="session") as progress:
        for rendered in parallel_map(render_session, range(n), jobs=jobs, chunksize=2):
            frames.update(rendered)
            progress.update(1)
    h, w = CROSS_SOURCE_SIZE
    small = Image.fromarray(cross_source_scene()).resize((w, h), Image.Resampling.LANCZOS)
    frames[CROSS_SOURCE_FILE] = _jpeg(np.asarray(small), 85)
    cross_spec = {
        "index": -1, "name": CROSS_SOURCE_SESSION, "platform": "SCUBA", "frames": [CROSS_SOURCE_FILE],
        "size": CROSS_SOURCE_SIZE, "frame_doi": "10.5281/zenodo.10880911", "annotation_date": "2024-05-02",
        "base_classes": ["Acropora_Branching", "Algae_Turf", "Rubble", "Sand"],
    }

    odd_specs = [odd_spec(i) for i in range(len(ODD_SESSIONS))]
    for i in range(len(ODD_SESSIONS)):
        frames.update(render_odd(i))
    mask_h, mask_w = odd_specs[[s["form"] for s in odd_specs].index("still_photos")]["size"]
    mask_stem = RASTER_MASK_IMAGE.rsplit(".", 1)[0]
    extra_members = {
        f"{ZIP_FOLDER}/annotation_mask_{mask_stem}.png": raster_mask(mask_h, mask_w),
        f"{ZIP_FOLDER}/color.txt": COLOR_TXT.encode(),
    }

    missing = specs[MISSING_FROM_ZIP[0]]["frames"][MISSING_FROM_ZIP[1]] if n > MISSING_FROM_ZIP[0] else None
    zip_only = specs[ZIP_ONLY[0]]["frames"][ZIP_ONLY[1]] if n > ZIP_ONLY[0] else None
    labels: dict[str, dict[str, int]] = {}
    rows: list[list[object]] = []
    columns = sorted((*CLASSES, UNKNOWN_CLASS))
    for spec in [*specs, cross_spec, *odd_specs]:
        for k, name in enumerate(spec["frames"]):
            labels[name] = _labels(spec, k)
            if name == zip_only:
                continue
            values = {**labels[name], UNKNOWN_CLASS: _unknown_value(name)}
            rows.append([name, spec["frame_doi"], f"{spec['name']}/PROCESSED_DATA/FRAMES/{name}",
                         spec["annotation_date"], *(values[c] for c in columns)])
    rows.sort(key=lambda r: str(r[0]))
    header = ["FileName", "frame_doi", "relative_file_path", "annotation_date", *columns]

    segmentation = _segmentation(specs, labels, {name for name in (missing, zip_only) if name})
    files = {
        MULTILABEL_CSV: _csv_text(header, rows),
        SEGMENTATION_JSON: json.dumps(segmentation, separators=(",", ":")).encode(),
        GBIF_CSV: _csv_text(
            ["label", "code_gcrmn", "id_gbif"],
            [[label, code, f"https://www.gbif.org/species/{gbif}" if gbif else ""]
             for label, code, gbif in sorted(CLASS_TABLE)],
        ),
        IMAGES_ZIP: zip_bytes(
            [*((f"{ZIP_FOLDER}/{name}", data) for name, data in frames.items() if name != missing),
             *extra_members.items()]
        ),
    }
    checksums: dict[str, str] = {}
    for key, data in files.items():
        write_bytes(out / RECORD_DIR / "files" / key / "content", data)
        checksums[f"seatizen/{key}"] = hashlib.md5(data).hexdigest()
    write_json(out / RECORD_DIR / "index.json", _record_json(files))

    planted = {
        "record": RECORD_ID,
        "files": sorted(files),
        "sessions": n,
        "images_in_zip": len(frames) - (missing is not None),
        "csv_rows": len(rows),
        "classes": len(CLASSES),
        "cross_source_image": {"file": CROSS_SOURCE_FILE, "zip_member": f"{ZIP_FOLDER}/{CROSS_SOURCE_FILE}",
                               "scene": "planted.cross_source_scene()", "size_hw": list(CROSS_SOURCE_SIZE)},
        "csv_row_without_image": [] if missing is None else [missing],
        "image_without_csv_row": [] if zip_only is None else [zip_only],
        "rle_annotation_image": specs[RLE_IMAGE[0]]["frames"][RLE_IMAGE[1]] if n > RLE_IMAGE[0] else None,
        "extensions": sorted({Path(name).suffix for name in frames}),
        "platforms": sorted({spec["platform"] for spec in specs}),
        "late_classes_minus_one": list(LATE_CLASSES),
        "odd_names": {spec["form"]: spec["frames"] for spec in odd_specs},
        "raster_mask": {"image": RASTER_MASK_IMAGE,
                        "zip_member": f"{ZIP_FOLDER}/annotation_mask_{mask_stem}.png",
                        "colour_table": f"{ZIP_FOLDER}/color.txt", "size_hw": [mask_h, mask_w]},
        "unknown_class_column": {"name": UNKNOWN_CLASS,
                                 "present": sum(_unknown_value(str(r[0])) for r in rows),
                                 "values": len(rows)},
    }
    return {"planted": planted, "checksums": checksums}
