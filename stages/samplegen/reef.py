"""Reef sample upstreams: the MERMAID bucket, two CoralNet sources and the MERMAID API snapshot.

Layouts follow SOURCES.md §1–§3 and docs/architecture.md "Sample upstreams"; what is generated and
every planted case are listed in docs/sample-sources.md ("Reef sources").

Growth: every image, point and label derives from its own string key (`texture.rng_for`), and an
image's key is its index among `ceil(base * scale)` images, so a larger scale only adds images.
Per-image files are byte-identical between scales; the aggregate tables (the MERMAID parquet and
the CoralNet annotations.csv files) keep every old row and gain new ones. The taxonomy, the label
mappings and the labelsets never depend on scale. Planted cases use fixed keys, so they exist at
every scale (even below 1).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import unicodedata
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from stages.config import load_params, require
from stages.errors import ConfigError
from stages.executor import parallel_map
from stages.fsutil import write_bytes, write_json, write_parquet, write_text
from stages.progress import bar
from stages.samplegen import planted as scenes
from stages.samplegen.texture import photo, rng_for

# The generator reads the repository's own params.yaml (not the caller's cwd): the sample upstreams
# must carry the CoralNet source ids and bucket names the pipeline will ask for.
_PARAMS_PATH = Path(__file__).resolve().parents[2] / "params.yaml"

MERMAID_BASE_IMAGES = 50
MERMAID_POINTS_PER_IMAGE = 25  # 5x5 jittered grid, like MERMAID's image classification points
CORALNET_BASE_IMAGES = 40
CORALNET_POINTS_RANGE = (16, 25)  # [lo, hi): ~20 points per image

# Real photo-quadrat frames are 4:3; both orientations occur.
IMAGE_SIZES: list[tuple[int, int]] = [
    (480, 640), (540, 720), (600, 800), (672, 896), (768, 1024), (640, 480), (768, 576),
]
THUMBNAIL_MAX = 500
PNG_LEVEL = 1  # lossless either way; level 1 keeps large-scale generation cheap
JPEG_QUALITY = 92  # camera-original-like

MERMAID_COLUMNS = [
    "id", "image_id", "point_id", "row", "col", "benthic_attribute_id", "benthic_attribute_name",
    "growth_form_id", "growth_form_name", "updated_on", "region_id", "region_name",
]
MERMAID_CSV_COLUMNS = MERMAID_COLUMNS[:-2]
# MERMAID writes the missing growth form as the text "None" in the parquet (str() of a Python None).
MERMAID_NONE = "None"

# CoralNet "Export annotations, CSV" with every optional group turned on (metadata, annotator info,
# machine suggestions). Aux1..3 carry this source's names; Aux4/Aux5 keep their defaults.
CORALNET_AUX_NAMES = ["Site", "Transect", "Quadrant", "Aux4", "Aux5"]
CORALNET_META_COLUMNS = [
    "Date", *CORALNET_AUX_NAMES, "Height (cm)", "Latitude", "Longitude", "Depth", "Camera",
    "Photographer", "Water quality", "Strobes", "Framing gear used", "White balance card", "Comments",
]
CORALNET_SUGGESTION_COLUMNS = [
    col for k in range(1, 6) for col in (f"Machine suggestion {k}", f"Machine confidence {k}")
]
CORALNET_EXPORT_COLUMNS = [
    "Name", *CORALNET_META_COLUMNS, "Row", "Column", "Label code", "Label ID",
    "Annotator", "Date annotated", *CORALNET_SUGGESTION_COLUMNS,
]
# What the coral-reef-training bucket holds per CoralNet source (SOURCES §2: "at least" these, plus
# the Status column whose non-Confirmed rows are not training data).
CORALNET_BUCKET_COLUMNS = ["Image ID", "Row", "Column", "Label ID", "Status"]
CORALNET_LABELSET_COLUMNS = ["Label ID", "Name", "Short Code"]
# A local export as CoralNet-Toolbox writes one (its Data/Sample): the annotations CSV under another
# name, the legacy `Label` header (the short code; CoralNet's own exports before December 2024),
# images in a sub-folder, the toolbox's own label list beside them, and a labelset saved by pandas
# with its index column under another name.
TOOLBOX_SOURCE_ID = 3120  # the params.yaml export generated in this layout (location: local)
TOOLBOX_BASE_IMAGES = 20
TOOLBOX_ANNOTATIONS = "CoralNet_Annotations.csv"
TOOLBOX_COLUMNS = ["Name", "Row", "Column", "Label", "Long Label", "Patch Size"]
TOOLBOX_IMAGE_DIR = "D3"
TOOLBOX_LABELSET = "label_set.csv"
TOOLBOX_LABELSET_COLUMNS = ["", "Short Code", "Label ID"]  # pandas DataFrame.to_csv() with its index

# ---------------------------------------------------------------------------------------------
# Taxonomy (scale-independent)
# ---------------------------------------------------------------------------------------------

MEOW_REALMS = [
    "Arctic", "Temperate Northern Atlantic", "Temperate Northern Pacific", "Tropical Atlantic",
    "Western Indo-Pacific", "Central Indo-Pacific", "Eastern Indo-Pacific", "Tropical Eastern Pacific",
    "Temperate South America", "Temperate Southern Africa", "Temperate Australasia", "Southern Ocean",
]
_IP = ["Western Indo-Pacific", "Central Indo-Pacific", "Eastern Indo-Pacific"]
RANGES: dict[str, list[str]] = {
    "ALL": MEOW_REALMS,
    "IP": _IP,
    "PAC": [*_IP, "Tropical Eastern Pacific"],
    "ATL": ["Tropical Atlantic"],
    "TROP": [*_IP, "Tropical Eastern Pacific", "Tropical Atlantic"],
}

GROWTH_FORMS = [
    "Arborescent", "Branching", "Columnar", "Corymbose", "Digitate", "Encrusting", "Foliose", "Massive",
    "Mushroom coral", "Plates or tables", "Submassive",
]
LIFE_HISTORIES = ["Competitive", "Generalist", "Stress-tolerant", "Weedy"]
TOP_LEVEL_CATEGORIES = [
    "Bare substrate", "Crustose coralline algae", "Cyanobacteria", "Hard coral", "Macroalgae", "Other",
    "Other invertebrates", "Rubble", "Sand", "Seagrass", "Soft coral", "Turf algae",
]

# (name, parent, range). Order is parents before children; depth reaches 4 (category > family >
# genus > species).
ATTRIBUTES: list[tuple[str, str | None, str]] = [
    *[(name, None, "ALL") for name in TOP_LEVEL_CATEGORIES],
    ("Acroporidae", "Hard coral", "TROP"),
    ("Acropora", "Acroporidae", "TROP"),
    ("Acropora cytherea", "Acropora", "IP"),
    ("Acropora palmata", "Acropora", "ATL"),
    ("Acropora cervicornis", "Acropora", "ATL"),
    ("Montipora", "Acroporidae", "IP"),
    ("Isopora", "Acroporidae", "IP"),
    ("Astreopora", "Acroporidae", "IP"),
    ("Poritidae", "Hard coral", "TROP"),
    ("Porites", "Poritidae", "TROP"),
    ("Porites lobata", "Porites", "PAC"),
    ("Porites astreoides", "Porites", "ATL"),
    ("Goniopora", "Poritidae", "IP"),
    ("Pocilloporidae", "Hard coral", "PAC"),
    ("Pocillopora", "Pocilloporidae", "PAC"),
    ("Pocillopora damicornis", "Pocillopora", "PAC"),
    ("Stylophora", "Pocilloporidae", "IP"),
    ("Seriatopora", "Pocilloporidae", "IP"),
    ("Merulinidae", "Hard coral", "TROP"),
    ("Dipsastraea", "Merulinidae", "IP"),
    ("Favites", "Merulinidae", "IP"),
    ("Platygyra", "Merulinidae", "IP"),
    ("Goniastrea", "Merulinidae", "IP"),
    ("Hydnophora", "Merulinidae", "IP"),
    ("Orbicella", "Merulinidae", "ATL"),
    ("Orbicella faveolata", "Orbicella", "ATL"),
    ("Fungiidae", "Hard coral", "IP"),
    ("Fungia", "Fungiidae", "IP"),
    ("Herpolitha", "Fungiidae", "IP"),
    ("Agariciidae", "Hard coral", "TROP"),
    ("Pavona", "Agariciidae", "PAC"),
    ("Pachyseris", "Agariciidae", "IP"),
    ("Agaricia", "Agariciidae", "ATL"),
    ("Lobophylliidae", "Hard coral", "IP"),
    ("Lobophyllia", "Lobophylliidae", "IP"),
    ("Echinophyllia", "Lobophylliidae", "IP"),
    ("Euphylliidae", "Hard coral", "IP"),
    ("Galaxea", "Euphylliidae", "IP"),
    ("Euphyllia", "Euphylliidae", "IP"),
    ("Diploastraeidae", "Hard coral", "IP"),
    ("Diploastrea", "Diploastraeidae", "IP"),
    ("Mussidae", "Hard coral", "ATL"),
    ("Diploria", "Mussidae", "ATL"),
    ("Pseudodiploria", "Mussidae", "ATL"),
    ("Colpophyllia", "Mussidae", "ATL"),
    ("Siderastreidae", "Hard coral", "ATL"),
    ("Siderastrea", "Siderastreidae", "ATL"),
    ("Milleporidae", "Hard coral", "TROP"),
    ("Millepora", "Milleporidae", "TROP"),
    ("Alcyoniidae", "Soft coral", "TROP"),
    ("Sarcophyton", "Alcyoniidae", "IP"),
    ("Sinularia", "Alcyoniidae", "IP"),
    ("Xeniidae", "Soft coral", "IP"),
    ("Xenia", "Xeniidae", "IP"),
    ("Plexauridae", "Soft coral", "ATL"),
    ("Eunicea", "Plexauridae", "ATL"),
    ("Gorgoniidae", "Soft coral", "ATL"),
    ("Gorgonia", "Gorgoniidae", "ATL"),
    ("Dictyotaceae", "Macroalgae", "ALL"),
    ("Dictyota", "Dictyotaceae", "ALL"),
    ("Lobophora", "Dictyotaceae", "TROP"),
    ("Sargassaceae", "Macroalgae", "ALL"),
    ("Sargassum", "Sargassaceae", "ALL"),
    ("Turbinaria", "Sargassaceae", "TROP"),
    ("Halimedaceae", "Macroalgae", "TROP"),
    ("Halimeda", "Halimedaceae", "TROP"),
    ("Porolithon", "Crustose coralline algae", "TROP"),
    ("Lithophyllum", "Crustose coralline algae", "ALL"),
    ("Lyngbya", "Cyanobacteria", "ALL"),
    ("Hydrocharitaceae", "Seagrass", "ALL"),
    ("Thalassia", "Hydrocharitaceae", "TROP"),
    ("Halophila", "Hydrocharitaceae", "ALL"),
    ("Cymodoceaceae", "Seagrass", "ALL"),
    ("Syringodium", "Cymodoceaceae", "TROP"),
    ("Porifera", "Other invertebrates", "ALL"),
    ("Cliona", "Porifera", "ALL"),
    ("Xestospongia", "Porifera", "TROP"),
    ("Ascidiacea", "Other invertebrates", "ALL"),
    ("Didemnum", "Ascidiacea", "ALL"),
    ("Zoantharia", "Other invertebrates", "TROP"),
    ("Palythoa", "Zoantharia", "TROP"),
    ("Zoanthus", "Zoantharia", "TROP"),
    ("Actiniaria", "Other invertebrates", "ALL"),
]

# What MERMAID photo-quadrat points are labelled with: (attribute, growth form or None, weight).
MERMAID_LABELS: list[tuple[str, str | None, float]] = [
    ("Turf algae", None, 14), ("Crustose coralline algae", None, 9), ("Sand", None, 9),
    ("Rubble", None, 6), ("Bare substrate", None, 4), ("Porolithon", None, 1.5),
    ("Acropora", "Branching", 4), ("Acropora", "Plates or tables", 3), ("Acropora", "Corymbose", 2),
    ("Acropora", "Digitate", 1.5), ("Acropora cytherea", "Plates or tables", 1),
    ("Acropora palmata", "Branching", 1), ("Porites", "Massive", 4), ("Porites", "Branching", 1.5),
    ("Porites lobata", "Massive", 1), ("Porites astreoides", "Submassive", 1),
    ("Pocillopora", "Branching", 3), ("Montipora", "Encrusting", 2.5), ("Montipora", "Foliose", 1.5),
    ("Dipsastraea", "Massive", 1.5), ("Favites", "Massive", 1), ("Platygyra", "Massive", 1.5),
    ("Goniastrea", "Submassive", 1), ("Hydnophora", "Arborescent", 0.5), ("Fungia", "Mushroom coral", 1),
    ("Pavona", "Foliose", 1), ("Pavona", "Columnar", 0.5), ("Galaxea", "Encrusting", 0.8),
    ("Orbicella", "Massive", 2), ("Diploria", "Massive", 1), ("Siderastrea", "Massive", 1),
    ("Agaricia", "Plates or tables", 1), ("Millepora", "Encrusting", 0.8), ("Hard coral", None, 1),
    ("Sarcophyton", None, 1.5), ("Sinularia", None, 1.5), ("Xenia", None, 0.8), ("Eunicea", None, 1),
    ("Soft coral", None, 0.5), ("Dictyota", None, 2), ("Lobophora", None, 1.5), ("Halimeda", None, 1.5),
    ("Sargassum", None, 1), ("Macroalgae", None, 1), ("Cyanobacteria", None, 1.5),
    ("Porifera", None, 1), ("Cliona", None, 0.5), ("Palythoa", None, 0.6), ("Thalassia", None, 0.5),
    ("Other", None, 0.3),
]

# Realm weights for MERMAID images; None = the image has no region (null in the parquet).
IMAGE_REGIONS: list[tuple[str | None, float]] = [
    ("Central Indo-Pacific", 30), ("Western Indo-Pacific", 20), ("Tropical Atlantic", 20),
    ("Eastern Indo-Pacific", 8), ("Tropical Eastern Pacific", 5), ("Temperate Australasia", 3),
    ("Temperate Northern Pacific", 2), (None, 12),
]


@dataclass(frozen=True)
class CoralNetLabel:
    label_id: int
    name: str
    code: str
    attribute: str | None  # mapping target; None for the planted label cases
    growth_form: str | None
    flavour: str  # "shared", "pacific" (bucket source), "caribbean" (local export), "planted"
    weight: float


# Global CoralNet label ids (invented but shaped like CoralNet's), shared by both sources.
CORALNET_LABELS: list[CoralNetLabel] = [
    CoralNetLabel(27, "Crustose coralline algae", "CCA", "Crustose coralline algae", None, "shared", 9),
    CoralNetLabel(33, "Turf algae", "Turf", "Turf algae", None, "shared", 14),
    CoralNetLabel(41, "Sand", "Sand", "Sand", None, "shared", 9),
    CoralNetLabel(42, "Rubble", "Rubble", "Rubble", None, "shared", 6),
    CoralNetLabel(56, "Macroalgae", "MACRO", "Macroalgae", None, "shared", 3),
    CoralNetLabel(83, "Sponge", "SPON", "Porifera", None, "shared", 1.5),
    CoralNetLabel(101, "Cyanobacteria", "CYAN", "Cyanobacteria", None, "shared", 1.5),
    CoralNetLabel(118, "Bare substrate", "BARE", "Bare substrate", None, "shared", 3),
    CoralNetLabel(1257, "Acropora branching", "ACR-BR", "Acropora", "Branching", "pacific", 4),
    CoralNetLabel(1258, "Acropora tabular", "ACR-TAB", "Acropora", "Plates or tables", "pacific", 3),
    CoralNetLabel(1262, "Porites massive", "POR-MASS", "Porites", "Massive", "pacific", 4),
    CoralNetLabel(1263, "Porites branching", "POR-BR", "Porites", "Branching", "pacific", 1.5),
    CoralNetLabel(1270, "Pocillopora", "POC", "Pocillopora", "Branching", "pacific", 3),
    CoralNetLabel(1284, "Montipora encrusting", "MONT-EN", "Montipora", "Encrusting", "pacific", 2),
    CoralNetLabel(1301, "Favites", "FAV", "Favites", "Massive", "pacific", 1),
    CoralNetLabel(1305, "Platygyra", "PLAT", "Platygyra", "Massive", "pacific", 1),
    CoralNetLabel(1318, "Pavona", "PAV", "Pavona", None, "pacific", 1),
    CoralNetLabel(1322, "Fungiidae", "FUNG", "Fungiidae", "Mushroom coral", "pacific", 0.8),
    CoralNetLabel(1407, "Sinularia", "SINU", "Sinularia", None, "pacific", 1.5),
    CoralNetLabel(1412, "Sarcophyton", "SARC", "Sarcophyton", None, "pacific", 1),
    CoralNetLabel(1490, "Halimeda", "HALI", "Halimeda", None, "shared", 1.5),
    CoralNetLabel(1502, "Lobophora", "LOBO", "Lobophora", None, "pacific", 1),
    CoralNetLabel(2110, "Orbicella", "ORB", "Orbicella", "Massive", "caribbean", 3),
    CoralNetLabel(2114, "Diploria", "DIP", "Diploria", "Massive", "caribbean", 1.5),
    CoralNetLabel(2119, "Siderastrea", "SID", "Siderastrea", "Massive", "caribbean", 1.5),
    CoralNetLabel(2121, "Porites astreoides", "P-AST", "Porites astreoides", "Submassive", "caribbean", 1.5),
    CoralNetLabel(2130, "Agaricia", "AGAR", "Agaricia", None, "caribbean", 1),
    CoralNetLabel(2141, "Acropora palmata", "A-PAL", "Acropora palmata", "Branching", "caribbean", 0.8),
    CoralNetLabel(2155, "Gorgonian", "GORG", "Soft coral", None, "caribbean", 2),
    CoralNetLabel(2158, "Eunicea", "EUN", "Eunicea", None, "caribbean", 1),
    CoralNetLabel(2162, "Dictyota", "DICT", "Dictyota", None, "caribbean", 2.5),
    CoralNetLabel(2170, "Millepora", "MILL", "Millepora", "Encrusting", "caribbean", 0.8),
    CoralNetLabel(2184, "Palythoa", "PALY", "Palythoa", None, "caribbean", 0.6),
    CoralNetLabel(2190, "Thalassia", "THAL", "Thalassia", None, "caribbean", 0.5),
    # Planted label cases (see PLANTED_LABELS): in both labelsets, used only by the planted images.
    CoralNetLabel(3001, "Unclear", "Unc", None, None, "planted", 0),
    CoralNetLabel(3005, "Framer / quadrat hardware", "FRAME", None, None, "planted", 0),
    CoralNetLabel(3012, "Dead coral with algae", "DCA", None, None, "planted", 0),
]
PLANTED_LABELS = {"unmapped": 3001, "null_mapping": 3005, "ambiguous": 3012}
# The ambiguous label maps to both of these; neither is "right".
AMBIGUOUS_TARGETS = [("Turf algae", None), ("Bare substrate", None)]
# CoralNet labels that MERMAID maps but neither sample source uses (the API maps far more labels
# than any one project needs).
EXTRA_CORALNET_MAPPINGS: list[tuple[int, str, str, str | None]] = [
    (1611, "Seriatopora", "Seriatopora", "Branching"),
    (1625, "Goniopora", "Goniopora", "Massive"),
    (2201, "Colpophyllia", "Colpophyllia", "Massive"),
]
REEFCLOUD_LABELS: list[tuple[str, str, str | None]] = [
    ("HC-ACR-BR", "Acropora", "Branching"), ("HC-ACR-TAB", "Acropora", "Plates or tables"),
    ("HC-POR-MAS", "Porites", "Massive"), ("HC-POC", "Pocillopora", "Branching"),
    ("HC-MON-EN", "Montipora", "Encrusting"), ("HC-OTH", "Hard coral", None),
    ("SC-SIN", "Sinularia", None), ("SC-OTH", "Soft coral", None),
    ("MA-HAL", "Halimeda", None), ("MA-OTH", "Macroalgae", None),
    ("TA", "Turf algae", None), ("CCA", "Crustose coralline algae", None), ("SP", "Porifera", None),
    ("SAND", "Sand", None), ("RUB", "Rubble", None),
]


def deterministic_uuid(*key: object) -> str:
    """A version-4-shaped uuid from a sha256 of the key: stable across runs and machines."""
    digest = hashlib.sha256("\x1f".join(str(k) for k in key).encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


@dataclass(frozen=True)
class Taxonomy:
    attributes: list[dict[str, Any]]  # API records, sorted by name
    growth_forms: dict[str, str]  # name -> id
    regions: dict[str, str]  # realm name -> id
    life_histories: dict[str, str]
    attribute_ids: dict[str, str]  # name -> id
    attribute_ranges: dict[str, list[str]]  # name -> realm names
    depth: dict[str, int]


@lru_cache(maxsize=1)
def taxonomy() -> Taxonomy:
    growth_forms = {name: deterministic_uuid("mermaid", "growthform", name) for name in GROWTH_FORMS}
    regions = {name: deterministic_uuid("mermaid", "region", name) for name in MEOW_REALMS}
    life = {name: deterministic_uuid("mermaid", "lifehistory", name) for name in LIFE_HISTORIES}
    ids: dict[str, str] = {}
    parents: dict[str, str | None] = {}
    ranges: dict[str, list[str]] = {}
    depth: dict[str, int] = {}
    for name, parent, rng_code in ATTRIBUTES:
        ids[name] = deterministic_uuid("mermaid", "benthicattribute", name)
        parents[name] = parent
        ranges[name] = RANGES[rng_code]
        depth[name] = 1 if parent is None else depth[parent] + 1

    def top(name: str) -> str:
        parent = parents[name]
        while parent is not None:
            name, parent = parent, parents[parent]
        return name

    forms_by_attr: dict[str, set[str]] = {}
    for attr, gf, _ in MERMAID_LABELS:
        if gf:
            forms_by_attr.setdefault(attr, set()).add(gf)
    records = []
    for name, parent, _ in ATTRIBUTES:
        rng = rng_for("reef", "taxonomy", name)
        lh: list[dict[str, Any]] = []
        gflh: list[dict[str, Any]] = []
        if top(name) == "Hard coral" and depth[name] >= 3:
            # Coral life-history strategy (Darling et al.): one or two strategies per genus.
            picks = sorted(rng.choice(len(LIFE_HISTORIES), size=int(rng.integers(1, 3)), replace=False))
            share = round(1.0 / len(picks), 3)
            lh = [{"id": life[LIFE_HISTORIES[k]], "proportion": share} for k in picks]
            for gf in sorted(forms_by_attr.get(name, ())):
                gflh.append({"growth_form": growth_forms[gf], "life_history": lh[0]["id"], "proportion": 1.0})
        records.append(
            {
                "id": ids[name],
                "name": name,
                "parent": ids[parent] if parent else None,
                "regions": sorted(regions[r] for r in ranges[name]),
                "life_histories": lh,
                "growth_form_life_histories": gflh,
                "top_level_category": ids[top(name)],
                "status": 90,  # MERMAID's "superuser approved"
            }
        )
    records.sort(key=lambda r: (r["name"], r["id"]))
    return Taxonomy(records, growth_forms, regions, life, ids, ranges, depth)


def _mapping(provider: str, provider_id: str, label: str, attr: str | None, gf: str | None) -> dict:
    tax = taxonomy()
    return {
        "id": deterministic_uuid("mermaid", "labelmapping", provider, provider_id, attr, gf),
        "benthic_attribute_id": tax.attribute_ids[attr] if attr else None,
        "benthic_attribute_name": attr,
        "growth_form_id": tax.growth_forms[gf] if gf else None,
        "growth_form_name": gf,
        "provider": provider,
        "provider_id": provider_id,
        "provider_label": label,
    }


def label_mappings() -> list[dict[str, Any]]:
    """The crosswalk as the MERMAID API serves it. CoralNet provider_id is the Label ID as text:
    the field also carries ReefCloud's ids, so it is a string for every provider."""
    out = []
    for lab in CORALNET_LABELS:
        if lab.label_id == PLANTED_LABELS["unmapped"]:
            continue
        if lab.label_id == PLANTED_LABELS["null_mapping"]:
            out.append(_mapping("CoralNet", str(lab.label_id), lab.name, None, None))
        elif lab.label_id == PLANTED_LABELS["ambiguous"]:
            out.extend(_mapping("CoralNet", str(lab.label_id), lab.name, a, g) for a, g in AMBIGUOUS_TARGETS)
        else:
            out.append(_mapping("CoralNet", str(lab.label_id), lab.name, lab.attribute, lab.growth_form))
    for label_id, name, attr, gf in EXTRA_CORALNET_MAPPINGS:
        out.append(_mapping("CoralNet", str(label_id), name, attr, gf))
    for code, attr, gf in REEFCLOUD_LABELS:
        rc_id = deterministic_uuid("reefcloud", "label", code)
        out.append(_mapping("ReefCloud", rc_id, code, attr, gf))
    out.sort(key=lambda m: (m["provider"], m["provider_id"], m["id"]))
    return out


def choices() -> list[dict[str, Any]]:
    tax = taxonomy()

    def entries(table: dict[str, str]) -> list[dict[str, str]]:
        return sorted(({"id": i, "name": n} for n, i in table.items()), key=lambda e: e["name"])

    return [
        {"name": "benthiclifehistories", "data": entries(tax.life_histories)},
        {"name": "growthforms", "data": entries(tax.growth_forms)},
        {"name": "regions", "data": entries(tax.regions)},
    ]


# ---------------------------------------------------------------------------------------------
# Image rendering (runs in worker processes)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageJob:
    """One image file to write. `fmt` is "png", "jpeg" or "empty" (a zero-byte file)."""

    path: str
    key: str
    height: int
    width: int
    fmt: str
    thumbnail: str | None = None  # also write a PNG thumbnail that fits THUMBNAIL_MAX
    truncate: bool = False  # keep only the first 40% of the encoded bytes
    omit: bool = False  # write the thumbnail only (the original is "missing" upstream)
    scene: bool = False  # use the shared cross-source scene instead of photo(key)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG", compress_level=PNG_LEVEL)
    else:
        img.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def render_image(job: ImageJob) -> int:
    """Write the job's file(s); returns the bytes written. Module-level so a process pool can run it."""
    if job.fmt == "empty":
        write_bytes(job.path, b"")
        return 0
    pixels = scenes.cross_source_scene() if job.scene else photo(job.key, job.height, job.width, "reef")
    img = Image.fromarray(pixels)
    written = 0
    if job.thumbnail:
        factor = min(1.0, THUMBNAIL_MAX / max(job.height, job.width))
        size = (max(1, round(job.width * factor)), max(1, round(job.height * factor)))
        thumb = _encode(img.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0), "png")
        write_bytes(job.thumbnail, thumb)
        written += len(thumb)
    if not job.omit:
        data = _encode(img, job.fmt)
        if job.truncate:
            data = data[: len(data) * 2 // 5]
        write_bytes(job.path, data)
        written += len(data)
    return written


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def scaled_count(base: int, scale: float) -> int:
    """ceil(base * scale), rounded first so 50 * 1.1 gives 55 and not 56."""
    return max(0, math.ceil(round(base * scale, 9)))


def _pick(rng: np.random.Generator, weights: list[float]) -> int:
    p = np.asarray(weights, dtype=np.float64)
    return int(rng.choice(len(p), p=p / p.sum()))


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    return IMAGE_SIZES[int(rng.integers(0, len(IMAGE_SIZES)))]


def _csv_text(header: list[str], rows: Iterable[list[Any]], lineterminator: str) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=lineterminator)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _csv_line(cells: list[Any]) -> str:
    # The toolbox writes with pandas: "\n" row ends, minimal quoting.
    return _csv_text(cells, [], "\n")


def _featurevector(key: str) -> bytes:
    # pyspacer feature files are never read by the pipeline; a small deterministic blob stands in.
    header = b"placeholder pyspacer feature vector, not read by tidepool\n"
    return header + hashlib.sha256(key.encode()).digest()


# ---------------------------------------------------------------------------------------------
# MERMAID bucket
# ---------------------------------------------------------------------------------------------


@dataclass
class _MermaidImage:
    image_id: str
    key: str
    height: int
    width: int
    region: str | None
    points: list[tuple[int, int]]
    case: str = ""  # planted case name, "" for regular images


def _mermaid_image(key: str, case: str = "", size: tuple[int, int] | None = None,
                   region: str | None = None, random_region: bool = True,
                   n_points: int = MERMAID_POINTS_PER_IMAGE) -> _MermaidImage:
    rng = rng_for("reef", "mermaid", "image", key)
    h, w = size or _image_size(rng)
    if random_region:
        region = IMAGE_REGIONS[_pick(rng, [wt for _, wt in IMAGE_REGIONS])][0]
    n_side = int(math.isqrt(n_points))
    ch, cw = h / n_side, w / n_side
    points = []
    for i in range(n_side):
        for j in range(n_side):
            r = int((i + 0.5 + rng.uniform(-0.3, 0.3)) * ch)
            c = int((j + 0.5 + rng.uniform(-0.3, 0.3)) * cw)
            points.append((min(max(r, 0), h - 1), min(max(c, 0), w - 1)))
    return _MermaidImage(deterministic_uuid("mermaid", "image", key), key, h, w, region, points, case)


def _mermaid_rows(img: _MermaidImage) -> list[dict[str, Any]]:
    tax = taxonomy()
    rng = rng_for("reef", "mermaid", "labels", img.key)
    # Labels follow the realm: no Orbicella in the Central Indo-Pacific.
    allowed = [
        (a, g, wt)
        for a, g, wt in MERMAID_LABELS
        if img.region is None or img.region in tax.attribute_ranges[a]
    ]
    base = datetime(2022, 1, 1, tzinfo=UTC) + timedelta(
        days=int(rng.integers(0, 1400)), seconds=int(rng.integers(0, 86400))
    )
    rows = []
    for k, (r, c) in enumerate(img.points):
        attr, gf, _ = allowed[_pick(rng, [wt for _, _, wt in allowed])]
        stamp = base + timedelta(
            seconds=int(k * 7 + rng.integers(0, 5)), microseconds=int(rng.integers(1, 10**6))
        )
        rows.append(
            {
                "id": deterministic_uuid("mermaid", "annotation", img.key, k),
                "image_id": img.image_id,
                "point_id": deterministic_uuid("mermaid", "point", img.key, k),
                "row": r,
                "col": c,
                "benthic_attribute_id": tax.attribute_ids[attr],
                "benthic_attribute_name": attr,
                "growth_form_id": tax.growth_forms[gf] if gf else None,
                "growth_form_name": gf,
                "updated_on": stamp,
                "region_id": tax.regions[img.region] if img.region else None,
                "region_name": img.region,
            }
        )
    rows.sort(key=lambda x: (x["row"], x["col"]))
    return rows


def _timestamp_text(ts: datetime) -> str:
    # How pandas/DuckDB write a UTC timestamp column to CSV.
    return ts.strftime("%Y-%m-%d %H:%M:%S.%f+00:00")


def _generate_mermaid(out: Path, params: dict, scale: float) -> tuple[dict, list[ImageJob]]:
    bucket = require(params, "sources.mermaid.bucket")
    prefix = require(params, "sources.mermaid.prefix").strip("/")
    parquet_name = require(params, "sources.mermaid.annotations")
    root = out / "s3" / bucket / prefix
    rel_root = f"s3/{bucket}/{prefix}/"

    images = [_mermaid_image(f"img{i:06d}") for i in range(scaled_count(MERMAID_BASE_IMAGES, scale))]
    scene_h, scene_w = scenes.CROSS_SOURCE_SCENE_SIZE
    cross = _mermaid_image("planted-cross-source-scene", "cross_source_scene", (scene_h, scene_w),
                           "Central Indo-Pacific", random_region=False)
    truncated = _mermaid_image("planted-truncated-png", "truncated_png", (600, 800), "Western Indo-Pacific",
                               random_region=False)
    missing = _mermaid_image("planted-missing-image", "missing_image", (540, 720), "Tropical Atlantic",
                             random_region=False)
    # 64 points, 3 pushed off the image (the boundary row == H, a column past W, a negative row):
    # 4.7%, under ingest.max_outside_share, so only those three are quarantined.
    outside = _mermaid_image("planted-points-outside", "points_outside", (480, 640), None,
                             random_region=False, n_points=64)
    h, w = outside.height, outside.width
    outside_edits = {
        3: (h, outside.points[3][1]),
        11: (outside.points[11][0], w + 37),
        17: (-4, outside.points[17][1]),
    }
    for k, rc in outside_edits.items():
        outside.points[k] = rc
    # Points placed for a 1200x1600 image on a 480x640 one (an export paired with another image or
    # another size of it): most points fall outside, so the whole image is a geometry mismatch.
    mismatch = _mermaid_image("planted-geometry-mismatch", "geometry_mismatch", (1200, 1600), None,
                              random_region=False)
    mismatch.height, mismatch.width = 480, 640
    images += [cross, truncated, missing, outside, mismatch]

    all_rows: list[dict[str, Any]] = []
    jobs: list[ImageJob] = []
    for img in images:
        rows = _mermaid_rows(img)
        all_rows.extend(rows)
        csv_rows = [
            [
                *(x[c] for c in MERMAID_CSV_COLUMNS[:7]),
                x["growth_form_id"] or "",
                x["growth_form_name"] or "",
                _timestamp_text(x["updated_on"]),
            ]
            for x in rows
        ]
        write_text(root / f"{img.image_id}_annotations.csv", _csv_text(MERMAID_CSV_COLUMNS, csv_rows, "\n"))
        write_bytes(root / f"{img.image_id}_featurevector", _featurevector(f"mermaid/{img.image_id}"))
        jobs.append(
            ImageJob(
                path=str(root / f"{img.image_id}.png"),
                key=f"reef/mermaid/{img.key}",
                height=img.height,
                width=img.width,
                fmt="png",
                thumbnail=str(root / f"{img.image_id}_thumbnail.png"),
                truncate=img is truncated,
                omit=img is missing,
                scene=img is cross,
            )
        )

    all_rows.sort(key=lambda x: (x["image_id"], x["row"], x["col"]))
    columns = {c: [x[c] for x in all_rows] for c in MERMAID_COLUMNS}
    for c in ("growth_form_id", "growth_form_name"):
        columns[c] = [MERMAID_NONE if v is None else v for v in columns[c]]
    schema = pa.schema(
        [
            (c, pa.int64() if c in ("row", "col") else pa.timestamp("us", tz="UTC") if c == "updated_on"
             else pa.string())
            for c in MERMAID_COLUMNS
        ]
    )
    write_parquet(root / parquet_name, pa.table(columns, schema=schema))

    def rel(img: _MermaidImage, suffix: str = ".png") -> str:
        return f"{rel_root}{img.image_id}{suffix}"

    outside_rows = {(x["row"], x["col"]): x for x in _mermaid_rows(outside)}
    info = {
        "root": rel_root,
        "parquet": f"{rel_root}{parquet_name}",
        "images": len(images),
        "regular_images": len(images) - 5,
        "points": len(all_rows),
        "points_per_image": MERMAID_POINTS_PER_IMAGE,
        "region_null_images": sum(1 for i in images if i.region is None),
        "growth_form_none_rows": sum(1 for x in all_rows if x["growth_form_id"] is None),
        "cross_source_scene": {
            "image_id": cross.image_id, "file": rel(cross), "height": scene_h, "width": scene_w,
            "points": len(cross.points), "scene_key": scenes.CROSS_SOURCE_SCENE_KEY,
        },
        "truncated_png": {
            "image_id": truncated.image_id, "file": rel(truncated), "points": len(truncated.points),
            "note": "first 40% of a valid PNG: header intact, IDAT cut short",
        },
        "missing_image": {
            "image_id": missing.image_id, "file": rel(missing), "points": len(missing.points),
            "note": "rows in the parquet and <id>_annotations.csv, _thumbnail.png, _featurevector "
            "present; <id>.png absent",
        },
        "points_outside": {
            "image_id": outside.image_id, "file": rel(outside), "height": h, "width": w,
            "points": len(outside.points), "region": None,
            "outside": [
                {
                    "point_id": outside_rows[rc]["point_id"], "id": outside_rows[rc]["id"],
                    "row": rc[0], "col": rc[1], "why": why,
                }
                for rc, why in zip(outside_edits.values(), ["row == H", "col > W", "row < 0"])
            ],
        },
        "geometry_mismatch": {
            "image_id": mismatch.image_id, "file": rel(mismatch), "height": mismatch.height,
            "width": mismatch.width, "points": len(mismatch.points),
            "outside": sum(1 for r, c in mismatch.points if not (r < mismatch.height and c < mismatch.width)),
            "note": "points placed for a 1200x1600 image; the PNG is 480x640",
        },
    }
    return info, jobs


# ---------------------------------------------------------------------------------------------
# CoralNet sources
# ---------------------------------------------------------------------------------------------

_ANNOTATORS = ["lsmith", "mgonzalez", "kwong_reef", "j.harper", "aroque"]
_SITES_CARIBBEAN = ["Tektite", "Yawzi Point", "Haulover Bay", "Cocoloba", "Récif Pointe-Noire"]
_CAMERAS = ["Canon PowerShot G12", "Olympus TG-5", "Nikon Coolpix AW130", ""]
_COMMENTS = ["", "", "", "", "", "Sediment on lens", "Quadrat partly shaded", "surge, slight blur"]
# Multi-line comments with quotes and commas, as typed into CoralNet's metadata form.
_MULTILINE_COMMENTS = [
    'Quadrat shifted by surge.\nRe-shot from the same stake, see "Q12b".',
    "Bleaching on Orbicella heads, approx. 30%\nPhotographer: check white balance, strobes off",
]


def _labelset(flavour: str) -> list[CoralNetLabel]:
    return [lab for lab in CORALNET_LABELS if lab.flavour in ("shared", flavour, "planted")]


@dataclass
class _CNPoint:
    number: int  # CoralNet point number (1-based), the row order inside an image
    row: int
    col: int
    label: CoralNetLabel | None  # None: Unclassified (no label yet)
    status: str  # Confirmed | Unconfirmed | Unclassified
    annotator: str
    annotated_on: datetime
    suggestions: list[tuple[str, int]]  # (code, percent) x5, or [] when no classifier ran


@dataclass
class _CNImage:
    pk: int
    name: str
    file: str  # relative to the source folder
    height: int
    width: int
    key: str
    fmt: str  # png | jpeg | empty
    points: list[_CNPoint]
    meta: dict[str, str]
    case: str = ""


def _suggestions(
    rng: np.random.Generator, labels: list[CoralNetLabel], top: CoralNetLabel
) -> list[tuple[str, int]]:
    others = [lab for lab in labels if lab.code != top.code and lab.flavour != "planted"]
    picks = [top] + [others[k] for k in rng.choice(len(others), size=4, replace=False)]
    raw = np.sort(rng.random(5) ** 2)[::-1]
    total = int(rng.integers(85, 101))
    pct = [int(v) for v in np.floor(raw / raw.sum() * total)]
    pct.sort(reverse=True)
    return [(lab.code, p) for lab, p in zip(picks, pct)]


def _cn_points(
    rng: np.random.Generator, h: int, w: int, n: int, labels: list[CoralNetLabel], mode: str,
    stamp: datetime, with_suggestions: bool,
) -> list[_CNPoint]:
    """Random distinct points; `mode` decides who annotated them (confirmed/partial/robot/imported)."""
    usable = [lab for lab in labels if lab.flavour != "planted"]
    weights = [lab.weight for lab in usable]
    seen: set[tuple[int, int]] = set()
    annotator = _ANNOTATORS[int(rng.integers(0, len(_ANNOTATORS)))]
    points = []
    for k in range(n):
        while True:  # distinct positions: the only duplicates are the planted ones
            rc = (int(rng.integers(0, h)), int(rng.integers(0, w)))
            if rc not in seen:
                seen.add(rc)
                break
        true_label = usable[_pick(rng, weights)]
        robot = mode == "robot" or (mode == "partial" and rng.random() < 0.5)
        machine = _suggestions(rng, labels, true_label if rng.random() < 0.6 else usable[_pick(rng, weights)])
        if robot:
            label = next(lab for lab in labels if lab.code == machine[0][0])
            who, status = "robot", "Unconfirmed"
        elif mode == "imported":
            label, who, status = true_label, "Imported", "Confirmed"
        else:
            label, who, status = true_label, annotator, "Confirmed"
        when = stamp + timedelta(seconds=int(k * 11 + rng.integers(0, 9)))
        points.append(_CNPoint(k + 1, rc[0], rc[1], label, status, who, when,
                               machine if with_suggestions or robot else []))
    return points


def _cn_meta(
    rng: np.random.Generator, sites: list[str], day: datetime, force_multiline: bool = False
) -> dict[str, str]:
    def maybe(value: str, p_empty: float = 0.15) -> str:
        return "" if rng.random() < p_empty else value

    comment = _COMMENTS[int(rng.integers(0, len(_COMMENTS)))]
    if force_multiline or rng.random() < 0.08:
        comment = _MULTILINE_COMMENTS[int(rng.integers(0, len(_MULTILINE_COMMENTS)))]
    return {
        "Date": maybe(day.strftime("%Y-%m-%d"), 0.05),
        "Site": sites[int(rng.integers(0, len(sites)))],
        "Transect": f"T{int(rng.integers(1, 5))}",
        "Quadrant": maybe(str(int(rng.integers(1, 31))), 0.05),
        "Aux4": "",
        "Aux5": maybe("LTER", 0.7),
        "Height (cm)": maybe("50", 0.4),
        "Latitude": maybe(f"{18.30 + rng.random() * 0.05:.5f}", 0.3),
        "Longitude": maybe(f"{-64.75 + rng.random() * 0.05:.5f}", 0.3),
        # Depth is free text upstream: "8", "8m", "8.5 m" or nothing.
        "Depth": maybe([f"{int(rng.integers(3, 15))}", f"{int(rng.integers(3, 15))}m",
                        f"{rng.integers(3, 15)}.5 m"][int(rng.integers(0, 3))], 0.3),
        "Camera": _CAMERAS[int(rng.integers(0, len(_CAMERAS)))],
        "Photographer": maybe(["L. Smith", "M. González", "K. Wong"][int(rng.integers(0, 3))], 0.3),
        "Water quality": maybe(["Good", "Fair", "Turbid"][int(rng.integers(0, 3))], 0.6),
        "Strobes": maybe(["Yes", "No"][int(rng.integers(0, 2))], 0.5),
        "Framing gear used": maybe("PVC quadrat 0.5 m x 0.5 m", 0.4),
        "White balance card": maybe("No", 0.8),
        "Comments": comment,
    }


def _cn_image(source_id: int, idx_key: str, flavour: str, *, pk: int, name: str, ext: str,
              case: str = "", size: tuple[int, int] | None = None, fmt: str = "jpeg",
              mode: str | None = None, force_multiline: bool = False,
              suggestions: bool | None = None, n_points: int | None = None,
              image_dir: str = "images") -> _CNImage:
    rng = rng_for("reef", "coralnet", source_id, "image", idx_key)
    h, w = size or _image_size(rng)
    n = int(rng.integers(*CORALNET_POINTS_RANGE))  # drawn even when overridden: later draws stay put
    n = n_points or n
    if mode is None:
        mode = ["confirmed", "partial", "robot", "imported"][_pick(rng, [80, 8, 7, 5])]
    day = datetime(2016, 1, 1, tzinfo=UTC) + timedelta(days=int(rng.integers(0, 2500)))
    stamp = day + timedelta(days=int(rng.integers(5, 200)), seconds=int(rng.integers(0, 86400)))
    # Imported annotations often predate the source's classifier: no machine suggestions.
    with_suggestions = not (mode == "imported" and rng.random() < 0.5) and rng.random() > 0.05
    if suggestions is not None:
        with_suggestions = suggestions
    labels = _labelset(flavour)
    points = _cn_points(rng, h, w, n, labels, mode, stamp, with_suggestions)
    meta_rng = rng_for("reef", "coralnet", source_id, "meta", idx_key)
    meta = _cn_meta(meta_rng, _SITES_CARIBBEAN, day, force_multiline)
    file_name = name if ext == "" else f"{pk}{ext}"
    return _CNImage(pk, name, f"{image_dir}/{file_name}", h, w, f"reef/coralnet/s{source_id}/{idx_key}", fmt,
                    points, meta, case)


def _label_by_id(label_id: int) -> CoralNetLabel:
    return next(lab for lab in CORALNET_LABELS if lab.label_id == label_id)


def _plant_labels(img: _CNImage) -> dict[str, int]:
    """Relabel the first points of `img` with the planted labels (3 unmapped, 3 null-mapped, 4 ambiguous)."""
    plan = (
        [PLANTED_LABELS["unmapped"]] * 3
        + [PLANTED_LABELS["null_mapping"]] * 3
        + [PLANTED_LABELS["ambiguous"]] * 4
    )
    for point, label_id in zip(img.points, plan):
        point.label = _label_by_id(label_id)
    return {str(k): v for k, v in sorted(Counter(plan).items())}


def _cn_jobs(root: Path, images: list[_CNImage]) -> list[ImageJob]:
    return [
        ImageJob(path=str(root / img.file), key=img.key, height=img.height, width=img.width, fmt=img.fmt,
                 scene=img.case == "cross_source_scene")
        for img in images
    ]


def _write_labelset(root: Path, flavour: str) -> None:
    labels = sorted(_labelset(flavour), key=lambda x: x.label_id)
    rows = [[lab.label_id, lab.name, lab.code] for lab in labels]
    write_text(root / "labelset.csv", _csv_text(CORALNET_LABELSET_COLUMNS, rows, "\r\n"))


def _generate_bucket_source(
    out: Path, bucket: str, source_id: int, scale: float
) -> tuple[dict, list[ImageJob]]:
    """A CoralNet source as the coral-reef-training bucket holds it: keyed by Image ID, with Status."""
    rel_root = f"s3/{bucket}/s{source_id}/"
    root = out / rel_root
    flavour = "pacific"
    base_pk = 1_840_000 + 10 * source_id  # any stable, source-specific range
    n = scaled_count(CORALNET_BASE_IMAGES, scale)
    images = [
        _cn_image(source_id, f"img{i:06d}", flavour, pk=base_pk + i, name="", ext=".jpg") for i in range(n)
    ]
    # Planted images take pks below the regular range, so growth never collides with them.
    png = _cn_image(source_id, "planted-png", flavour, pk=base_pk - 3, name="", ext=".png", case="png_image",
                    fmt="png", mode="confirmed")
    empty = _cn_image(source_id, "planted-zero-byte", flavour, pk=base_pk - 2, name="", ext=".jpg",
                      case="zero_byte_jpeg", fmt="empty", mode="confirmed")
    labelled = _cn_image(source_id, "planted-labels", flavour, pk=base_pk - 1, name="", ext=".jpg",
                         case="planted_labels", mode="confirmed")
    # Half confirmed, half machine-labelled: Status rows other than Confirmed at every scale.
    mixed = _cn_image(source_id, "planted-status-mix", flavour, pk=base_pk - 4, name="", ext=".jpg",
                      case="status_mix", mode="partial")
    # Points placed for a 1200x1600 image on a 480x640 upload (an export paired with another size
    # of the image): most fall outside, so the whole image is a geometry mismatch.
    mismatch = _cn_image(source_id, "planted-geometry-mismatch", flavour, pk=base_pk - 5, name="", ext=".jpg",
                         case="geometry_mismatch", size=(1200, 1600), mode="confirmed")
    mismatch.height, mismatch.width = 480, 640
    planted_counts = _plant_labels(labelled)
    images = [mismatch, mixed, png, empty, labelled, *images]

    status_counts: Counter[str] = Counter()
    mixed_counts: Counter[str] = Counter()
    rows = []
    for img in images:
        first_unconfirmed = True
        for p in img.points:
            status = p.status
            label: Any = p.label.label_id if p.label else ""
            # A few unconfirmed points have never been classified: empty Label ID (bucket quirk).
            if status == "Unconfirmed":
                draw = rng_for("reef", "coralnet", source_id, "unclassified", img.key, p.number).random()
                if draw < 0.1 or (img is mixed and first_unconfirmed):
                    status, label = "Unclassified", ""
                first_unconfirmed = False
            status_counts[status] += 1
            if img is mixed:
                mixed_counts[status] += 1
            rows.append([img.pk, p.row, p.col, label, status])
    write_text(root / "annotations.csv", _csv_text(CORALNET_BUCKET_COLUMNS, rows, "\n"))
    _write_labelset(root, flavour)
    for img in images:
        if img.fmt != "empty":  # no features could be extracted from an empty upload
            feature = _featurevector(f"s{source_id}/{img.pk}")
            write_bytes(root / "features" / f"i{img.pk}.featurevector", feature)

    def case(img: _CNImage, **extra: Any) -> dict:
        return {"image_id": img.pk, "file": f"{rel_root}{img.file}", "rows": len(img.points), **extra}

    info = {
        "location": "s3",
        "root": rel_root,
        "image_key": "Image ID",
        "columns": CORALNET_BUCKET_COLUMNS,
        "images": len(images),
        "regular_images": n,
        "rows": len(rows),
        "status_counts": dict(sorted(status_counts.items())),
        "not_confirmed_rows": sum(v for k, v in status_counts.items() if k != "Confirmed"),
        "zero_byte_jpeg": case(empty, features_file=None),
        "png_image": case(png),
        "planted_labels": case(labelled, rows_by_label_id=planted_counts),
        "status_mix": case(mixed, status_counts=dict(sorted(mixed_counts.items()))),
        "geometry_mismatch": case(
            mismatch, height=mismatch.height, width=mismatch.width,
            outside=sum(1 for p in mismatch.points
                        if not (p.row < mismatch.height and p.col < mismatch.width)),
            note="points placed for a 1200x1600 image; the JPEG is 480x640",
        ),
    }
    return info, _cn_jobs(root, images)


def _generate_local_source(out: Path, source_id: int, scale: float) -> tuple[dict, list[ImageJob]]:
    """A CoralNet source as "Export annotations, CSV" plus downloaded images: keyed by Name."""
    rel_root = f"coralnet/s{source_id}/"
    root = out / rel_root
    flavour = "caribbean"
    base_pk = 3_100_000 + 10 * source_id
    n = scaled_count(CORALNET_BASE_IMAGES, scale)
    images = [
        _cn_image(source_id, f"img{i:06d}", flavour, pk=base_pk + i, name=f"IMG_{i + 1:04d}.JPG", ext="")
        for i in range(n)
    ]
    scene_size = scenes.CROSS_SOURCE_SCENE_SIZE
    cross = _cn_image(source_id, "planted-cross-source-scene", flavour, pk=base_pk - 4, name="DSC_4410.JPG",
                      ext="", case="cross_source_scene", size=scene_size, mode="confirmed")
    dups = _cn_image(source_id, "planted-duplicates", flavour, pk=base_pk - 3, name="DSC_4411.JPG", ext="",
                     case="duplicate_points", mode="confirmed", force_multiline=True)
    labelled = _cn_image(source_id, "planted-labels", flavour, pk=base_pk - 2, name="DSC_4412.JPG", ext="",
                         case="planted_labels", mode="confirmed")
    # 64 points, 3 of them pushed off the image: 4.7%, under ingest.max_outside_share, so only those
    # three are quarantined (the image stays a sample).
    outside = _cn_image(source_id, "planted-points-outside", flavour, pk=base_pk - 1,
                        name="Transect 3 Q12.jpg", ext="", case="points_outside", size=(600, 800),
                        mode="confirmed", n_points=64)
    # Robot (unconfirmed) and Imported rows at every scale; the imported image has no suggestions.
    robot = _cn_image(source_id, "planted-robot", flavour, pk=base_pk - 5, name="DSC_4413.JPG", ext="",
                      case="robot_rows", mode="partial")
    imported = _cn_image(source_id, "planted-imported", flavour, pk=base_pk - 6, name="DSC_4414.JPG",
                         ext="", case="imported_rows", mode="imported", suggestions=False)
    planted_counts = _plant_labels(labelled)

    # Duplicates: point 6 repeated with the same label, point 10 repeated with a different label.
    same, diff = dups.points[5], dups.points[9]
    assert same.label is not None and diff.label is not None  # confirmed images label every point
    other = next(lab for lab in _labelset(flavour) if lab.flavour != "planted" and lab != diff.label)
    dup_same = _CNPoint(len(dups.points) + 1, same.row, same.col, same.label, same.status, same.annotator,
                        same.annotated_on, same.suggestions)
    dup_diff = _CNPoint(len(dups.points) + 2, diff.row, diff.col, other, diff.status, diff.annotator,
                        diff.annotated_on, diff.suggestions)
    dups.points += [dup_same, dup_diff]

    h, w = outside.height, outside.width
    edits = {
        2: (h + 5, outside.points[2].col),
        7: (outside.points[7].row, w),
        12: (outside.points[12].row, -2),
    }
    for k, (r, c) in edits.items():
        outside.points[k].row, outside.points[k].col = r, c

    images = sorted([*images, cross, dups, labelled, outside, robot, imported], key=lambda im: im.name)

    annotators: Counter[str] = Counter()
    rows = []
    multiline_images = []
    for img in images:
        if "\n" in img.meta["Comments"]:
            multiline_images.append(img.name)
        for p in img.points:
            kind = p.annotator if p.annotator in ("robot", "Imported") else "human"
            annotators[kind] += 1
            machine: list[Any] = []
            for code, pct in p.suggestions or [("", "")] * 5:
                machine += [code, pct]
            rows.append([
                img.name, *(img.meta[c] for c in CORALNET_META_COLUMNS), p.row, p.col,
                p.label.code if p.label else "", p.label.label_id if p.label else "",
                p.annotator, p.annotated_on.strftime("%Y-%m-%d %H:%M:%S+00:00"), *machine,
            ])
    # Django's csv writer: \r\n row ends, minimal quoting (multi-line comments end up quoted).
    write_text(root / "annotations.csv", _csv_text(CORALNET_EXPORT_COLUMNS, rows, "\r\n"))
    _write_labelset(root, flavour)

    def case(img: _CNImage, **extra: Any) -> dict:
        return {"name": img.name, "file": f"{rel_root}{img.file}", "rows": len(img.points), **extra}

    info = {
        "location": "local",
        "root": rel_root,
        "image_key": "Name",
        "columns": CORALNET_EXPORT_COLUMNS,
        "images": len(images),
        "regular_images": n,
        "rows": len(rows),
        "annotator_counts": dict(sorted(annotators.items())),
        "robot_row_count": annotators["robot"],
        "imported_row_count": annotators["Imported"],
        "multiline_comment_images": multiline_images,
        "multiline_comment_rows": sum(len(im.points) for im in images if im.name in multiline_images),
        "cross_source_scene": case(cross, height=scene_size[0], width=scene_size[1],
                                   scene_key=scenes.CROSS_SOURCE_SCENE_KEY),
        "duplicate_points": case(
            dups,
            same_label=[{"row": same.row, "col": same.col, "label_id": same.label.label_id, "count": 2}],
            different_label=[{"row": diff.row, "col": diff.col,
                              "label_ids": sorted([diff.label.label_id, other.label_id])}],
        ),
        "planted_labels": case(labelled, rows_by_label_id=planted_counts),
        "robot_rows": case(robot, annotator_counts=dict(sorted(Counter(
            p.annotator if p.annotator == "robot" else "human" for p in robot.points).items()))),
        "imported_rows": case(imported, machine_suggestions=False),
        "points_outside": case(
            outside, height=h, width=w,
            outside=[
                {"point_number": k + 1, "row": r, "col": c, "why": why}
                for (k, (r, c)), why in zip(edits.items(), ["row > H", "col == W", "col < 0"])
            ],
        ),
    }
    return info, _cn_jobs(root, images)


def _generate_toolbox_source(out: Path, source_id: int, scale: float) -> tuple[dict, list[ImageJob]]:
    """A local export in CoralNet-Toolbox's layout (TOOLBOX_* above), keyed by Name, all confirmed."""
    rel_root = f"coralnet/s{source_id}/"
    root = out / rel_root
    flavour = "caribbean"
    folder = TOOLBOX_IMAGE_DIR
    n = scaled_count(TOOLBOX_BASE_IMAGES, scale)

    def image(key: str, name: str, pk: int, **kw: Any) -> _CNImage:
        return _cn_image(source_id, key, flavour, pk=pk, name=name, ext="", mode="confirmed",
                         image_dir=folder, **kw)

    base_pk = 3_500_000 + 10 * source_id
    images = [image(f"img{i:06d}", f"T_S{10_000 + i:05d}.jpg", base_pk + i) for i in range(n)]
    # One row's Long Label was typed in a latin-1 tool: one stray byte, the rest of the file is UTF-8.
    stray = image("planted-stray-byte", "T_S00101.jpg", base_pk - 1, case="encoding_error")
    # Codes the labelset does not have: the toolbox's own "Review" placeholder.
    review = image("planted-review-code", "T_S00102.jpg", base_pk - 2, case="unmapped_code")
    # Name is NFD in the CSV (as typed on macOS), the file NFC on disk: one image, compared in NFC.
    nfd_name = unicodedata.normalize("NFD", "Récif_Q1.jpg")
    nfd = image("planted-nfd-name", nfd_name, base_pk - 3, case="nfd_name")
    nfd.file = f"{folder}/{unicodedata.normalize('NFC', nfd_name)}"
    # A Name whose path is a folder (holding a preview image) instead of an image file.
    folder_case = image("planted-folder-as-image", "T_S00104.jpg", base_pk - 4, case="folder_as_image")
    folder_case.file = f"{folder}/T_S00104.jpg/preview.jpg"
    planted_images = [stray, review, nfd, folder_case]
    review_rows = 3
    for point in review.points[:review_rows]:
        point.label = None  # written as the code "Review" below
    images = sorted([*images, *planted_images], key=lambda im: im.name)
    # A file in a sub-folder of the image folder that no row names.
    extra = image("planted-unreferenced", "T_S09999.jpg", base_pk - 5)
    extra.file = f"{folder}/extra/T_S09999.jpg"

    lines = [_csv_line(TOOLBOX_COLUMNS).encode("utf-8")]
    stray_line = 0
    for img in images:
        for k, p in enumerate(img.points):
            code, long = ("Review", "Review") if p.label is None else (p.label.code, p.label.name)
            if img is stray and k == 1:
                stray_line = len(lines) + 1  # physical line: the header is line 1
                cells = [img.name, p.row, p.col, code, f"{long} encroûtante", 112]
                lines.append(_csv_line(cells).encode("latin-1"))
            else:
                lines.append(_csv_line([img.name, p.row, p.col, code, long, 112]).encode("utf-8"))
    write_bytes(root / TOOLBOX_ANNOTATIONS, b"".join(lines))
    labels = sorted((lab for lab in _labelset(flavour)), key=lambda x: x.label_id)
    write_text(root / TOOLBOX_LABELSET, _csv_text(
        TOOLBOX_LABELSET_COLUMNS, [[k, lab.code, lab.label_id] for k, lab in enumerate(labels)], "\n"))
    toolbox_labels = [{"id": "-1", "short_label_code": "Review", "long_label_code": "Review",
                       "color": [255, 255, 255, 255]}]
    toolbox_labels += [{"id": deterministic_uuid("toolbox", "label", lab.code), "short_label_code": lab.code,
                        "long_label_code": lab.name, "color": [0, 0, 0, 255]} for lab in labels]
    write_json(root / "Labels.json", toolbox_labels)

    def case(img: _CNImage, **extra_fields: Any) -> dict:
        return {"name": img.name, "file": f"{rel_root}{img.file}", "rows": len(img.points), **extra_fields}

    info = {
        "location": "local",
        "root": rel_root,
        "layout": "coralnet-toolbox",
        "annotations": TOOLBOX_ANNOTATIONS,
        "image_dir": folder,
        "labelset": TOOLBOX_LABELSET,
        "image_key": "Name",
        "columns": TOOLBOX_COLUMNS,
        "images": len(images),
        "regular_images": n,
        "rows": sum(len(im.points) for im in images),
        "encoding_error": case(stray, line=stray_line, byte=0xFB),
        "unmapped_code": case(review, code="Review", code_rows=review_rows),
        "nfd_name": case(nfd, file_name_nfc=unicodedata.normalize("NFC", nfd_name)),
        "folder_as_image": case(folder_case, folder=f"{rel_root}{folder}/T_S00104.jpg"),
        "unreferenced_file": {"file": f"{rel_root}{extra.file}", "mirrored_as": "images/extra/T_S09999.jpg"},
        "not_mirrored": ["Labels.json"],
    }
    return info, _cn_jobs(root, [*images, extra])


# ---------------------------------------------------------------------------------------------
# MERMAID API
# ---------------------------------------------------------------------------------------------


def _generate_api(out: Path) -> dict:
    root = out / "http" / "mermaid-api" / "v1"
    tax = taxonomy()
    mappings = label_mappings()
    write_json(root / "benthicattributes" / "results.json", tax.attributes)
    write_json(root / "classification" / "labelmappings" / "results.json", mappings)
    write_json(root / "choices" / "index.json", choices())
    by_label: dict[str, list[str]] = {}
    for m in mappings:
        if m["provider"] == "CoralNet":
            by_label.setdefault(m["provider_id"], []).append(m["id"])
    return {
        "root": "http/mermaid-api/v1/",
        "benthicattributes": len(tax.attributes),
        "labelmappings": len(mappings),
        "labelmappings_by_provider": dict(sorted(Counter(m["provider"] for m in mappings).items())),
        "growthforms": len(tax.growth_forms),
        "top_level_categories": len(TOP_LEVEL_CATEGORIES),
        "max_depth": max(tax.depth.values()),
        "labels": {
            "unmapped": {"label_id": PLANTED_LABELS["unmapped"], "mapping_ids": []},
            "null_mapping": {
                "label_id": PLANTED_LABELS["null_mapping"],
                "mapping_ids": by_label[str(PLANTED_LABELS["null_mapping"])],
            },
            "ambiguous": {
                "label_id": PLANTED_LABELS["ambiguous"],
                "mapping_ids": sorted(by_label[str(PLANTED_LABELS["ambiguous"])]),
                "targets": [
                    {"benthic_attribute_name": a, "growth_form_name": g} for a, g in AMBIGUOUS_TARGETS
                ],
            },
        },
    }


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def generate(out: Path, scale: float = 1.0, jobs: int = 1) -> dict:
    """Write the reef sample upstreams under `out`; returns {"planted": {...}, "checksums": {}}."""
    out = Path(out)
    params = load_params(_PARAMS_PATH)
    planted: dict[str, Any] = {"mermaid_api": _generate_api(out)}
    mermaid_info, image_jobs = _generate_mermaid(out, params, scale)
    planted["mermaid"] = mermaid_info

    exports = require(params, "sources.coralnet.exports")
    bucket = require(params, "sources.coralnet.bucket")
    coralnet: dict[str, Any] = {}
    for export in exports:
        try:
            source_id, location = int(export["id"]), export["location"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"params.yaml: sources.coralnet.exports entry {export!r} needs an integer id and a location"
            ) from exc
        if location == "s3":
            info, cn_jobs = _generate_bucket_source(out, bucket, source_id, scale)
        elif location == "local" and source_id == TOOLBOX_SOURCE_ID:
            info, cn_jobs = _generate_toolbox_source(out, source_id, scale)
        elif location == "local":
            info, cn_jobs = _generate_local_source(out, source_id, scale)
        else:
            raise ConfigError(
                f"params.yaml: sources.coralnet.exports id {source_id}: "
                f"location {location!r} is neither s3 nor local"
            )
        coralnet[f"s{source_id}"] = info
        image_jobs += cn_jobs
    planted["coralnet"] = coralnet

    with bar(total=len(image_jobs), desc="reef images", unit="img") as progress:
        for _ in parallel_map(render_image, image_jobs, jobs=jobs, chunksize=4):
            progress.update(1)
    return {"planted": planted, "checksums": {}}
