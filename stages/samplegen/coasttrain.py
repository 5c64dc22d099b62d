"""Sample USGS Coast Train release: `http/coasttrain/<Record>.zip` for the ten records (SOURCES §4).

Each zip mirrors the real record's metadata (the served CSVs vendored in tests/reference/coasttrain/):
its CSV column order, class lists (with both lists where the real record mixes two), path style in
the file columns, CRS quirk, pixel size and typical location. In-zip layout (the real one is
unverified; this is the plausible reading of "one metadata CSV and a folder of npz"):

    <real CSV name, e.g. A_naip_meta_served.csv>   latin-1, "\\n" line ends
    npz/<stem>.npz                                  one Doodler output per image
    npz/results<YYYY-MM-DD-HH-MM>/<stem>.npz        the planted npz labelled in two Doodler sessions

Items: record `R` has `ceil(6 * scale)` npz; npz `i` belongs to site `i // per_site` (an
orthomosaic, NAIP quad, satellite footprint ...). Tiles of one site are cut from one scene and one
label field, so neighbours are continuous and their lat/lon boxes touch. Everything derives from
string keys, never from a shared RNG stream: a larger scale is a superset of a smaller one.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import hashlib
import io
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.executor import parallel_map
from stages.fsutil import write_bytes
from stages.progress import bar
from stages.samplegen.inat import ZIP_EPOCH, count_for, zip_bytes
from stages.samplegen.texture import fractal_noise, photo, rng_for

BASE_PER_RECORD = 6
NODATA_NAMES = ("nodata", "no_data")
UNKNOWN_CLASS = "wrack"  # beach wrack: plausible on a coast, absent from the authors' remap vocabulary

A_SITES = ("'water', 'whitewater', 'sediment', 'other_natural_terrain', 'vegetated_surface', 'agricultural', "
           "'development', 'cloud', 'nodata', 'unusual', 'unknown'")
A_NOSITE = ("'water', 'whitewater', 'sediment', 'other_bare_natural_terrain', 'marsh_vegetation', "
            "'terrestrial_vegetation', 'agricultural', 'development', 'nodata', 'unusual', 'unknown'")
# classes_array strings exactly as the real CSVs spell them.
LISTS: dict[str, str] = {
    "A1": A_SITES,
    "A2": A_NOSITE,
    "B": ("'water', 'herbaceous vegetation', 'woody vegetation', 'non-vegetated-dry', 'non-vegetated-wet', "
          "'surf', 'developed'"),
    "C1": A_SITES,
    "C2": A_NOSITE,
    "D": "'water', 'surf', 'sand', 'dev'",
    "E": A_SITES,
    "F": ("'water', 'whitewater', 'sediment', 'sediment_plume', 'other_natural_terrain', "
          "'vegetated_surface', 'agricultural', 'development', 'cloud', 'nodata', 'unusual', 'unknown'"),
    "G": ("'water', 'sand', 'gravel', 'cobble_boulder', 'vegetated', 'coastal_defense', 'buildings', "
          "'pavement_road', 'vehicles', 'people', 'other_anthro', 'nodata'"),
    "H": ("'water', 'whitewater', 'sediment', 'terrestrial_vegetation', 'marsh_vegetation', 'development', "
          "'unusual', 'unknown', 'nodata'"),
    "I1": "'water', 'sand', 'gravel', 'cobble_boulder', 'vegetated', 'development', 'nodata', 'unusual'",
    "I2": ("'water', 'whitewater', 'mud_silt', 'sand', 'gravel_shell', 'cobble_boulder', 'bedrock', "
           "'ice_snow', 'vegetated', 'development', 'other'"),
    "J1": "'water', 'surf', 'bare_ground', 'vegtated_ground', 'development', 'nodata'",
    "J2": "'water', 'surf', 'bare_ground', 'vegetated_ground', 'development', 'no_data'",
}


def parse_list(text: str) -> tuple[str, ...]:
    """"'water', 'sand'" -> ("water", "sand")."""
    return tuple(part.strip().strip("'") for part in text.split(","))


def format_list(items: tuple[str, ...] | list[str]) -> str:
    return ", ".join(f"'{c}'" for c in items)


_H = "label_image_filename,image_filename,annotation_image_filename"
_H2 = "image_filename,label_image_filename,annotation_image_filename"
_CLS = "classes_array,num_classes,classes_integer,classes_present_integer,classes_present_array"
_SET = ("pen_width,CRF_theta,CRF_mu,CRF_downsample_factor,Classifier_downsample_factor,"
        "prob_of_unary_potential,doodle_spatial_density,num_of_scales")
_TIME = "epsg,year,month,day,hour,minute,second,XMin,XMax,YMin,YMax,LonMin,LonMax,LatMin,LatMax"
# Column orders copied from the real served CSVs (they differ per record).
HEADERS: dict[str, str] = {
    "A": f"{_H},{_CLS},{_SET},acc_georef,{_TIME},CRS,px_size_m,ImageHeightPx,ImageWidthPx,ImageBands",
    "B": (f"{_H2},acc_georef,epsg,year,month,day,XMin,XMax,YMin,YMax,LonMin,LonMax,LatMin,LatMax,"
          "ImageHeightPx,ImageWidthPx,ImageBands,hour,minute,second,classes_array,classes_present_integer,"
          "num_classes,pen_width,"
          "CRF_theta,CRF_mu,CRF_downsample_factor,Classifier_downsample_factor,prob_of_unary_potential,"
          "doodle_spatial_density,num_of_scales,px_size_m,CRS,classes_present_array,classes_integer"),
    "C": f"{_H},{_CLS},{_SET},CRS,acc_georef,{_TIME},ImageHeightPx,ImageWidthPx,ImageBands,px_size_m",
    "D": f"{_H},{_CLS},{_SET},CRS,acc_georef,{_TIME},ImageHeightPx,ImageWidthPx,ImageBands,px_size_m",
    "E": f"{_H2},{_CLS},{_SET},acc_georef,{_TIME},CRS,px_size_m,ImageHeightPx,ImageWidthPx,ImageBands",
    "F": f"{_H},{_CLS},{_SET},CRS,acc_georef,{_TIME},ImageHeightPx,ImageWidthPx,ImageBands,px_size_m",
    "G": (f"{_H2},classes_array,classes_integer,classes_present_array,classes_present_integer,"
          "CRF_downsample_factor,CRF_mu,CRF_theta,Classifier_downsample_factor,doodle_spatial_density,num_classes,"
          f"num_of_scales,pen_width,prob_of_unary_potential,CRS,acc_georef,{_TIME},ImageHeightPx,ImageWidthPx,"
          "ImageBands,px_size_m"),
    "H": (f"{_H2},acc_georef,{_TIME},CRS,CRF_downsample_factor,CRF_mu,CRF_theta,Classifier_downsample_factor,"
          "classes_array,classes_integer,classes_present_array,classes_present_integer,doodle_spatial_density,"
          "num_classes,num_of_scales,pen_width,prob_of_unary_potential,ImageHeightPx,ImageWidthPx,ImageBands,"
          "px_size_m"),
    "I": (f"{_H2},acc_georef,epsg,CRS,year,month,day,hour,minute,second,XMin,XMax,YMin,YMax,LonMin,LonMax,"
          f"LatMin,LatMax,ImageHeightPx,ImageWidthPx,ImageBands,px_size_m,{_CLS},{_SET}"),
    "J": f"{_H},{_CLS},{_SET},acc_georef,{_TIME},CRS,px_size_m,ImageHeightPx,ImageWidthPx,ImageBands",
}


@dataclass(frozen=True)
class Site:
    """One scene a record's tiles come from; repeated surveys of it get later dates."""

    # str.format template: {chunk} {row} {col} {ymd} {ymd2} {ymd_dash} {ym} {year} {hms} {hms2} {hms_dash}
    stem: str
    classes: str  # key into LISTS
    lon: float
    lat: float
    zone: int
    date: str
    hms: str = ""  # "" = a per-site random acquisition time (satellites); NAIP/orthos read 12:00:00
    row0: int = 1
    col0: int = 1


@dataclass(frozen=True)
class Record:
    name: str
    letter: str
    csv_name: str
    path_prefix: str  # "npz/", "/npz/" or "" in the file columns
    image_suffix: str  # E names its images <stem>_image.jpg
    crs: str  # the CRS cell, "{zone}" filled in; may carry literal quotes
    epsg_base: int
    px_size_m: str
    acc_georef: str | None  # None: a per-image float32 value, as in the Landsat records
    layout: str  # "grid": tiles of one scene; "series": one footprint, several dates
    per_site: int
    grid_cols: int
    step_days: int
    bands: int  # bands of orig_image (NAIP is RGB+NIR)
    settings: tuple[float, ...]
    sites: tuple[Site, ...]


_NAD83 = '"NAD83 / UTM zone {zone}N"'
RECORDS: tuple[Record, ...] = (
    Record("Landsat8_11_001", "E", "E_L8_meta_all_served.csv", "", "_image", "epsg:4326", 32600, "15", None,
           "series", 3, 1, 16, 3, (3, 1, 1, 1, 4, 0.9, 3), (
               Site("duck_{ymd_dash}-{hms_dash}_L8_rgbr_ID2", "E", -75.6406, 35.9631, 18, "2014-01-04"),
               Site("galvestonwest_{ymd_dash}-{hms_dash}_L8_rgb_ID4", "E",
                    -95.1238, 29.0764, 15, "2014-05-16"),
               Site("klamath_{ymd_dash}-{hms_dash}_L8_rgb_ID1", "E", -124.0922, 41.5061, 10, "2016-12-02"),
               Site("ventura_{ymd_dash}-{hms_dash}_L8_rgb_ID2", "E", -119.3177, 34.2231, 11, "2020-10-07"),
           )),
    Record("Landsat8_12_001", "F", "F_elwha_l8_served.csv", "npz/", "", "na", 32600, "15", None,
           "series", 10**6, 1, 67, 3, (3, 1, 1, 1, 4, 0.9), (
               Site("{ymd_dash}-{hms_dash}_L8_rgb_ID2", "F", -123.5784, 48.1363, 10, "2014-01-18"),
           )),
    Record("NAIP_11_001", "A", "A_naip_meta_served.csv", "npz/", "", _NAD83, 26900, "1", "6",
           "grid", 2, 2, 730, 4, (2, 1, 1, 3, 3, 0.9, 3), (
               # The non-ASCII site name: the release-wide CSV is latin-1, the zip names are UTF-8.
               Site("chunk{chunk}_m_3712215_se_10_1_{ymd}_multiband_año_nuevo_site14_ID3", "A1",
                    -122.3304, 37.1102, 10, "2014-06-13", "120000"),
               Site("chunk{chunk}_m_3211706_se_11_060_{ymd}_{ymd2}_multiband_ID1", "A2",
                    -117.1312, 32.5512, 11, "2018-08-21", "120000"),
               Site("chunk{chunk}_m_2808028_nw_17_1_{ymd}_multiband_canaveral_site116_ID3", "A1",
                    -80.6204, 28.5670, 17, "2015-10-17", "120000"),
               Site("chunk{chunk}_m_4106909_nw_19_h_{ymd}_multiband_ID3", "A2",
                    -69.9635, 41.8720, 19, "2016-07-04", "120000"),
           )),
    Record("NAIP_6_001", "J", "J_naip_6class_meta_served.csv", "npz/", "", _NAD83, 26900, "1", "6",
           "grid", 2, 2, 730, 4, (3, 1, 1, 4, 8, 3, 3), (
               Site("chunk{chunk}_m_3512113_ne_10_1_{ymd}_multiband_ID3", "J1",
                    -123.9403, 46.1191, 10, "2010-08-23", "120000"),
               Site("chunk{chunk}_m_3411933_se_11_060_{ymd}_{ymd2}_multiband_ID3", "J2",
                    -119.6102, 34.4071, 11, "2018-07-22", "120000"),
               Site("chunk{chunk}_m_4307029_se_19_060_{ymd}_multiband_ID6", "J1",
                    -70.3879, 43.4887, 19, "2018-09-24", "120000"),
           )),
    Record("Orthophoto_12_001", "G", "G_madeira_meta_served.csv", "npz/", "", "na", 26900, "0.05", "1",
           "grid", 4, 2, 28, 3, (3, 1, 1, 2, 4, 0.9), (
               Site("{ymd}_MadeiraBeachFL_ortho_5cm_{row:02d}_{col:02d}_ID3", "G",
                    -82.7988, 27.7982, 17, "2018-01-24", "120000", 2, 3),
           )),
    Record("Orthophoto_8_001", "I", "I_sandwich_metadata_served.csv", "/npz/", "", "n/a", 26900, "0.05", "1",
           "grid", 2, 2, 120, 3, (2, 1, 1, 1, 4, 0.9, 3), (
               Site("{ymd}_SandwichTNB_Ortho_5cm_UTM19N_NAVD88_cog_5cm_clipped_{row:02d}_{col:02d}_ID2", "I1",
                    -70.4847, 41.7675, 19, "2016-09-21", "120000", 1, 1),
               Site("{ymd_dash}_Sandwich_5cm_ortho_{row:02d}_{col:02d}_ID1", "I2",
                    -70.4853, 41.7676, 19, "2018-01-10", "120000", 3, 6),
           )),
    Record("Orthophoto_9_001", "H", "H_dauphin_meta_served.csv", "npz/", "", "na", 26900, "0.05", "1",
           "grid", 4, 2, 61, 3, (4, 1, 13, 2, 3, 0.6), (
               Site("{ym}-PelicanIsland-ortho-rgb-5cm_{row:02d}_{col:02d}_ID3", "H",
                    -88.1267, 30.2465, 16, "2018-09-01", "120000", 1, 2),
               Site("{ym}-LittleDauphinIsland-ortho-rgb-5cm_{row:02d}_{col:02d}_ID3", "H",
                    -88.1199, 30.2793, 16, "2018-12-01", "120000", 4, 5),
           )),
    Record("Quadrangles_7_001", "B", "B_quads_gulf_meta_served.csv", "npz/", "", "n/a", 26900, "6.825", "6",
           "series", 2, 1, 1461, 3, (2, 1, 1, 4, 8, 3), (
               Site("crms0292_{year}_ID5", "B", -90.2345, 29.1378, 15, "2008-06-01", "120000"),
               Site("crms0322_{year}_ID5", "B", -91.1098, 29.2393, 15, "2008-06-01", "120000"),
               Site("crms0354_{year}_ID5", "B", -91.0157, 29.3264, 15, "2008-06-01", "120000"),
               Site("crms0382_{year}_ID5", "B", -90.8595, 29.4281, 15, "2008-06-01", "120000"),
           )),
    Record("Sentinel2_11_001", "C", "C_s2_meta_served.csv", "npz/", "", '"WGS 84 / UTM zone {zone}N"', 26900,
           "10", "8", "grid", 2, 2, 30, 3, (4, 1, 16, 2, 2, 0.9, 3), (
               Site("chunk{chunk}_{ymd}T{hms}_{ymd}T{hms2}_T11SKT.TCI_RGB_site49_ID3", "C1",
                    -119.2415, 34.1388, 11, "2018-12-15"),
               Site("chunk{chunk}_{ymd}T{hms}_{ymd}T{hms2}_T10SGD.TCI_RGB_site39_ID3", "C2",
                    -121.8870, 36.6100, 10, "2019-05-17"),
               Site("chunk{chunk}_{ymd}T{hms}_{ymd}T{hms2}_T10TDS.TCI_RGB_site11_ID6", "C1",
                    -123.9443, 46.0397, 10, "2019-05-25"),
               Site("chunk{chunk}_{ymd}T{hms}_{ymd}T{hms2}_T14RPQ.TCI_RGB_site55_ID3", "C1",
                    -97.2424, 26.5025, 14, "2020-10-12"),
           )),
    Record("Sentinel2_4_001", "D", "D_s2_4classes_meta_served.csv", "npz/", "", "", 26900, "10", "8",
           "series", 3, 1, 37, 3, (3, 1, 1, 2, 1, 0.9, 3), (
               Site("{ymd}T{hms}_{ymd}T{hms2}_T18SVF_lrr_ID1", "D", -75.7678, 36.1614, 18, "2018-12-17"),
               Site("{ymd}T{hms}_{ymd}T{hms2}_T18SVE_lr_ID1", "D", -75.6154, 35.1826, 18, "2020-04-07"),
           )),
)
RECORDS_BY_NAME = {r.name: r for r in RECORDS}

# Planted cases, at low indices so they exist at every scale >= 0.5 (3 npz per record).
ORPHANS = {("NAIP_11_001", 1), ("Landsat8_11_001", 1), ("Orthophoto_8_001", 1)}
PICKLE_ITEM = ("Orthophoto_12_001", 1)
UNKNOWN_ITEM = ("Orthophoto_9_001", 2)
# Labelled in two Doodler sessions: the npz lives in the newer session's folder, and an earlier
# session left its own npz of the same name (another label) in an older folder.
SUPERSEDED_ITEM = ("Sentinel2_4_001", 0)
SESSIONS = ("results2022-05-04-14-34", "results2022-05-04-14-40")  # older, newer (Doodler's names)
NOT_ONE_HOT_ITEM = ("Landsat8_12_001", 2)  # a `label` of all ones: every class at every pixel

_COLOURS: tuple[tuple[tuple[str, ...], tuple[int, int, int]], ...] = (
    (("nodata", "no_data"), (0, 0, 0)),
    (("whitewater", "surf"), (225, 228, 232)),
    (("water", "plume"), (28, 72, 118)),
    (("sand", "sediment", "gravel", "cobble", "mud"), (205, 188, 140)),
    (("non-vegetated",), (150, 122, 92)),
    (("veget", "marsh", "herb", "woody", "agri"), (78, 118, 58)),
    (("dev", "build", "pave", "vehic", "anthro", "defense"), (138, 138, 142)),
    (("bare", "bedrock", "natural"), (150, 122, 92)),
    (("cloud", "ice", "snow"), (242, 242, 245)),
    (("people",), (200, 80, 80)),
    ((UNKNOWN_CLASS,), (95, 70, 40)),
)


def class_colour(name: str) -> tuple[int, int, int]:
    for needles, colour in _COLOURS:
        if any(n in name for n in needles):
            return colour
    return (122, 84, 140)


def _num(value: float) -> str:
    """Numbers as the R-written CSVs print them: integers bare, floats with 15 significant digits."""
    value = float(value)
    return str(int(value)) if value.is_integer() else f"{value:.15g}"


# Rough UTM: plenty for plausible, self-consistent boxes (neighbours share edges exactly).
_M_PER_DEG_LAT = 110574.0


def _to_xy(lon: float, lat: float, zone: int) -> tuple[float, float]:
    cm = -183 + 6 * zone
    return 500000 + (lon - cm) * 111320 * math.cos(math.radians(lat)), lat * _M_PER_DEG_LAT


def _to_lonlat(x: float, y: float, zone: int, lat_ref: float) -> tuple[float, float]:
    cm = -183 + 6 * zone
    return cm + (x - 500000) / (111320 * math.cos(math.radians(lat_ref))), y / _M_PER_DEG_LAT


@dataclass(frozen=True)
class Item:
    record: Record
    index: int
    site_index: int
    site: Site
    slot: int  # tile index within the grid, or date index within the series
    when: dt.datetime
    when2: dt.date
    stem: str
    tile_rc: tuple[int, int]
    size: tuple[int, int]


def _site_of(record: Record, index: int) -> tuple[int, int]:
    return index // record.per_site, index % record.per_site


def _site_size(record: Record, site_index: int) -> tuple[int, int]:
    rng = rng_for("coasttrain", record.name, "site-size", site_index)
    return 64 + 8 * int(rng.integers(0, 25)), 64 + 8 * int(rng.integers(0, 25))


def _grid_shape(record: Record) -> tuple[int, int]:
    if record.layout == "series":
        return 1, 1
    return math.ceil(record.per_site / record.grid_cols), record.grid_cols


def item_for(record: Record, index: int) -> Item:
    """The name, date, place and size of npz `index` of `record`: a pure function of the two."""
    site_index, slot = _site_of(record, index)
    site = record.sites[site_index % len(record.sites)]
    epoch = site_index // len(record.sites)
    rng = rng_for("coasttrain", record.name, "site", site_index)
    if site.hms:
        hms = site.hms
    else:
        hms = f"{int(rng.integers(14, 20)):02d}{int(rng.integers(60)):02d}{int(rng.integers(60)):02d}"
    base = dt.date.fromisoformat(site.date)
    if record.layout == "series":
        day = base + dt.timedelta(days=(epoch * record.per_site + slot) * record.step_days)
        tile_rc = (0, 0)
    else:
        day = base + dt.timedelta(days=epoch * record.step_days)
        tile_rc = divmod(slot, record.grid_cols)
    when = dt.datetime.combine(day, dt.time(int(hms[:2]), int(hms[2:4]), int(hms[4:])))
    when_end = when + dt.timedelta(seconds=200 + int(rng.integers(400)))
    when2 = day + dt.timedelta(days=234)  # NAIP's second (release) date in some names
    stem = site.stem.format(
        chunk=slot + 1, row=site.row0 + tile_rc[0], col=site.col0 + tile_rc[1],
        ymd=when.strftime("%Y%m%d"), ymd2=when2.strftime("%Y%m%d"), ymd_dash=when.strftime("%Y-%m-%d"),
        ym=when.strftime("%Y-%m"), year=when.year, hms=when.strftime("%H%M%S"),
        hms2=when_end.strftime("%H%M%S"), hms_dash=when.strftime("%H-%M-%S"),
    )
    return Item(record, index, site_index, site, slot, when, when2, stem, tile_rc,
                _site_size(record, site_index))


@functools.lru_cache(maxsize=8)
def _site_scene(record_name: str, site_index: int) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """(photo, smooth label field, present class indices) shared by every tile of one site."""
    record = RECORDS_BY_NAME[record_name]
    h, w = _site_size(record, site_index)
    rows, cols = _grid_shape(record)
    key = f"coasttrain/{record_name}/site{site_index}"
    scene = photo(key, rows * h, cols * w, "coast")
    field = fractal_noise(rng_for(key, "field"), rows * h, cols * w, octaves=3)
    classes = parse_list(LISTS[record.sites[site_index % len(record.sites)].classes])
    candidates = [k for k, c in enumerate(classes) if c not in NODATA_NAMES]
    rng = rng_for(key, "classes")
    count = int(rng.integers(2, min(5, len(candidates)) + 1))
    chosen = {int(c) for c in rng.choice(candidates, count, replace=False)}
    if rng.random() < 0.85:
        chosen.add(0)  # most coastal scenes show water
    return scene, field, tuple(sorted(chosen))


def _quantize(field: np.ndarray, present: tuple[int, ...], jitter: float = 0.0) -> np.ndarray:
    """Smooth field -> class index map: low values are the first class (water), high the last."""
    cuts = np.linspace(0, 1, len(present) + 1)[1:-1] + jitter
    bins = np.digitize(field, np.clip(cuts, 0.02, 0.98))
    return np.asarray(present, dtype=np.uint8)[bins]


def _onehot(label: np.ndarray) -> np.ndarray:
    # K = highest class present + 1, not len(classes): Doodler's own quirk.
    k = int(label.max()) + 1
    return (label[..., None] == np.arange(k, dtype=np.uint8)).astype(np.uint8)


def _doodles(label: np.ndarray, key: str, strokes: int, pen: int) -> np.ndarray:
    rng = rng_for(key, "doodles")
    h, w = label.shape
    doodles = np.zeros_like(label)
    for _ in range(strokes):
        if rng.random() < 0.5:
            y = int(rng.integers(0, h - pen))
            x0 = int(rng.integers(0, w // 2))
            x1 = min(w, x0 + int(rng.integers(w // 5, w // 2 + 1)))
            doodles[y : y + pen, x0:x1] = label[y : y + pen, x0:x1] + 1
        else:
            x = int(rng.integers(0, w - pen))
            y0 = int(rng.integers(0, h // 2))
            y1 = min(h, y0 + int(rng.integers(h // 5, h // 2 + 1)))
            doodles[y0:y1, x : x + pen] = label[y0:y1, x : x + pen] + 1
    return doodles


def _colourize(index_map: np.ndarray, classes: tuple[str, ...]) -> np.ndarray:
    lut = np.asarray([class_colour(c) for c in classes], dtype=np.uint8)
    return lut[index_map]


def npz_bytes(arrays: dict[str, object], allow_pickle: bool = False) -> bytes:
    """An .npz like np.savez_compressed writes, minus its wall-clock member timestamps."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=allow_pickle)
    return buf.getvalue()


def _pass_arrays(classes: tuple[str, ...], rgb: np.ndarray, label: np.ndarray, pen: int, settings: np.ndarray,
                 with_colour_label: bool, prefix: str, key: str) -> dict[str, np.ndarray]:
    """The arrays one doodling pass leaves, its keys prefixed with one "0" per later pass."""
    strokes = 10 if not prefix else 4
    doodles = _doodles(label, key + prefix, strokes, pen)
    colour_doodles = rgb.copy()
    mask = doodles > 0
    colour_doodles[mask] = _colourize(doodles[mask] - 1, classes)
    arrays: dict[str, np.ndarray] = {f"{prefix}image": rgb, f"{prefix}label": _onehot(label)}
    if with_colour_label:
        arrays[f"{prefix}color_label"] = _colourize(label, classes)
    arrays[f"{prefix}doodles"] = doodles
    arrays[f"{prefix}color_doodles"] = colour_doodles
    arrays[f"{prefix}settings"] = settings
    return arrays


def make_npz(job: tuple[str, int]) -> dict:
    """Build npz `index` of one record: its bytes, its CSV row (None for a planted orphan), facts."""
    record_name, index = job
    record = RECORDS_BY_NAME[record_name]
    item = item_for(record, index)
    key = f"coasttrain/{record.name}/{item.stem}"
    rng = rng_for(key, "item")
    scene, site_field, present = _site_scene(record.name, item.site_index)
    h, w = item.size
    r, c = item.tile_rc
    crop = (slice(r * h, (r + 1) * h), slice(c * w, (c + 1) * w))
    field = site_field[crop]
    if record.layout == "series":
        # Same footprint on another date: the shoreline moves a little, the land stays.
        drift = fractal_noise(rng_for(key, "drift"), h, w, octaves=3)
        field = 0.75 * field + 0.25 * drift
    classes = parse_list(LISTS[item.site.classes])
    label = _quantize(field, present)

    unknown = (record.name, index) == UNKNOWN_ITEM
    if unknown:
        classes = classes + (UNKNOWN_CLASS,)
        yy, xx = np.ogrid[:h, :w]
        blob = ((yy - h * 0.55) / (h * 0.22)) ** 2 + ((xx - w * 0.4) / (w * 0.3)) ** 2 < 1.0
        label = label.copy()
        label[blob] = len(classes) - 1
    nodata = [k for k, name in enumerate(classes) if name in NODATA_NAMES]
    at_edge = record.layout == "series" or item.tile_rc[1] == record.grid_cols - 1
    if nodata and at_edge and rng.random() < 0.4:
        # A clipped scene edge: black pixels labelled nodata, as real tiles at a mosaic's edge have.
        label = label.copy()
        label[:, w - w // int(rng.integers(3, 7)) :] = nodata[0]

    tint = _colourize(label, classes).astype(np.float32)
    rgb = np.clip(0.55 * scene[crop].astype(np.float32) + 0.45 * tint, 0, 255).astype(np.uint8)
    if nodata:
        rgb[label == nodata[0]] = 0
    orig = rgb
    if record.bands == 4:
        # NAIP's near-infrared: bright over vegetation, dark over water.
        veg = np.isin(label, [k for k, name in enumerate(classes) if "veget" in name or "vegtated" in name])
        nir = np.where(veg, 190, 60).astype(np.float32) + 40 * field
        orig = np.concatenate([rgb, np.clip(nir, 0, 255).astype(np.uint8)[..., None]], axis=-1)

    pen = int(record.settings[0])
    settings = np.asarray(record.settings, dtype=np.float64)
    with_colour_label = rng.random() < 0.7
    arrays: dict[str, object] = {}
    final = _pass_arrays(classes, rgb, label, pen, settings, with_colour_label, "", key)
    arrays["image"] = final.pop("image")
    arrays["orig_image"] = orig
    arrays.update(final)
    arrays["classes"] = np.asarray(classes)  # a <U.. unicode array, as Doodler writes it
    passes = int(rng.choice([0, 1, 1, 2]))
    for p in range(1, passes + 1):
        # An earlier doodling pass: other thresholds, fewer strokes, a flatter image, other CRF
        # settings. Different on purpose, so a reader that takes a prefixed key is caught.
        earlier = _quantize(field, present, jitter=0.12 * p)
        flat = (rgb.astype(np.float32) * (0.8 - 0.1 * p) + 25).astype(np.uint8)
        old_settings = settings.copy()
        old_settings[2] += 3 * p
        arrays.update(
            _pass_arrays(classes, flat, earlier, pen, old_settings, with_colour_label, "0" * p, key)
        )

    if (record.name, index) == NOT_ONE_HOT_ITEM:
        arrays["label"] = np.ones_like(final["label"])
    member = f"npz/{item.stem}.npz"
    extra_members: list[tuple[str, bytes]] = []
    if (record.name, index) == SUPERSEDED_ITEM:
        older, newer = SESSIONS
        member = f"npz/{newer}/{item.stem}.npz"
        # The earlier session drew other strokes and got another label; no history of its own.
        earlier = _quantize(field, present, jitter=0.15)
        first = _pass_arrays(classes, rgb, earlier, pen, settings, with_colour_label, "", key + "/" + older)
        first_arrays: dict[str, object] = {"image": first.pop("image"), "orig_image": orig, **first}
        first_arrays["classes"] = np.asarray(classes)
        extra_members.append((f"npz/{older}/{item.stem}.npz", npz_bytes(first_arrays)))

    pickled = (record.name, index) == PICKLE_ITEM
    if pickled:
        names = ("pen_width", "CRF_theta", "CRF_mu", "CRF_downsample_factor", "Classifier_downsample_factor",
                 "prob_of_unary_potential", "num_of_scales")
        arrays["settings"] = dict(zip(names, record.settings))  # an object array: needs pickle
    data = npz_bytes(arrays, allow_pickle=pickled)

    doodles = arrays["doodles"]
    assert isinstance(doodles, np.ndarray)
    present_now = sorted(int(v) for v in np.unique(label))
    row = None if (record.name, index) in ORPHANS else _csv_row(
        item, classes, present_now, float((doodles > 0).mean()), rng
    )
    return {
        "record": record.name,
        "index": index,
        "member": member,
        "bytes": data,
        "extra_members": extra_members,
        "row": row,
        "classes": list(classes),
        "bands": int(orig.shape[-1]),
        "passes": passes,
        "color_label": with_colour_label,
        "site": item.site_index,
    }


def _csv_row(item: Item, classes: tuple[str, ...], present: list[int], density: float,
             rng: np.random.Generator) -> dict[str, str]:
    record, site = item.record, item.site
    h, w = item.size
    px = float(record.px_size_m)
    x0, y0 = _to_xy(site.lon, site.lat, site.zone)
    r, c = item.tile_rc
    xmin, ymax = x0 + c * w * px, y0 - r * h * px
    xmax, ymin = xmin + w * px, ymax - h * px
    lat_ref = (ymin + ymax) / 2 / _M_PER_DEG_LAT
    lon_min, lat_min = _to_lonlat(xmin, ymin, site.zone, lat_ref)
    lon_max, lat_max = _to_lonlat(xmax, ymax, site.zone, lat_ref)
    prefix = record.path_prefix
    img_dir = prefix.replace("npz", "images") if prefix else ""
    lab_dir = prefix.replace("npz", "labels") if prefix else ""
    settings = list(record.settings) + [3] * (7 - len(record.settings))
    if record.acc_georef is None:
        acc = _num(float(np.float32(rng.uniform(6.0, 11.0))))  # float32 noise, as the Landsat CSVs carry
    else:
        acc = record.acc_georef
    values = {
        "label_image_filename": f"{lab_dir}{item.stem}_label.jpg",
        "image_filename": f"{img_dir}{item.stem}{record.image_suffix}.jpg",
        "annotation_image_filename": f"{prefix}{item.stem}.npz",
        "classes_array": format_list(classes),
        "num_classes": str(len(classes)),
        "classes_integer": ", ".join(str(k) for k in range(1, len(classes))),  # one short, as upstream
        "classes_present_integer": ", ".join(str(k) for k in present),
        "classes_present_array": format_list([classes[k] for k in present]),
        "pen_width": _num(settings[0]),
        "CRF_theta": _num(settings[1]),
        "CRF_mu": _num(settings[2]),
        "CRF_downsample_factor": _num(settings[3]),
        "Classifier_downsample_factor": _num(settings[4]),
        "prob_of_unary_potential": _num(settings[5]),
        "doodle_spatial_density": _num(density),
        "num_of_scales": _num(settings[6]),
        "acc_georef": acc,
        "epsg": str(record.epsg_base + site.zone),
        "year": str(item.when.year),
        "month": str(item.when.month),
        "day": str(item.when.day),
        "hour": str(item.when.hour),
        "minute": str(item.when.minute),
        "second": str(item.when.second),
        "XMin": _num(xmin),
        "XMax": _num(xmax),
        "YMin": _num(ymin),
        "YMax": _num(ymax),
        "LonMin": _num(lon_min),
        "LonMax": _num(lon_max),
        "LatMin": _num(lat_min),
        "LatMax": _num(lat_max),
        "CRS": record.crs.format(zone=site.zone),
        "px_size_m": record.px_size_m,
        "ImageHeightPx": str(h),
        "ImageWidthPx": str(w),
        "ImageBands": "3",  # the real CSVs say 3 even for 4-band NAIP
    }
    return {col: values[col] for col in HEADERS[record.letter].split(",")}


def _csv_bytes(record: Record, rows: list[dict[str, str]]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HEADERS[record.letter].split(","), lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: r["annotation_image_filename"]):
        writer.writerow(row)
    return buf.getvalue().encode("latin-1")


def generate(out: Path, scale: float = 1.0, jobs: int = 1) -> dict:
    """Write the ten Coast Train zips under `out/http/coasttrain/`."""
    n = count_for(BASE_PER_RECORD, scale)
    jobs_list = [(record.name, i) for record in RECORDS for i in range(n)]
    results: dict[str, list[dict]] = {record.name: [] for record in RECORDS}
    with bar(total=len(jobs_list), desc="samplegen coasttrain", unit="npz") as progress:
        for result in parallel_map(make_npz, jobs_list, jobs=jobs, chunksize=4):
            results[result["record"]].append(result)
            progress.update(1)

    checksums: dict[str, str] = {}
    planted: dict = {
        "layout": {
            "csv": "<record CSV name> at the zip root, latin-1",
            "npz": "npz/<stem>.npz (superseded_npz: npz/<Doodler session folder>/<stem>.npz)",
        },
        "records": {},
        "npz_without_csv_row": [],
        "four_band_npz": [],
        "mixed_class_lists": {},
        "pickle_npz": [],
        "unknown_class": [],
        "non_ascii_csv": [],
        "superseded_npz": [],
        "not_one_hot": [],
    }
    for record in RECORDS:
        items = results[record.name]
        members = [(it["member"], it["bytes"]) for it in items]
        members += [m for it in items for m in it["extra_members"]]
        members.sort()
        if len({m for m, _ in members}) != len(members):
            raise AssertionError(f"{record.name}: two npz share a name")
        rows = [it["row"] for it in items if it["row"] is not None]
        members.append((record.csv_name, _csv_bytes(record, rows)))
        data = zip_bytes(members)
        write_bytes(out / "http" / "coasttrain" / f"{record.name}.zip", data)
        checksums[f"coasttrain/{record.name}.zip"] = hashlib.md5(data).hexdigest()

        lists = sorted({format_list(it["classes"]) for it in items})
        planted["records"][record.name] = {"csv": record.csv_name, "npz": len(items), "csv_rows": len(rows)}
        if len(lists) > 1:
            planted["mixed_class_lists"][record.name] = lists
        for it in items:
            ref = {"record": record.name, "npz": it["member"]}
            if it["row"] is None:
                planted["npz_without_csv_row"].append(ref)
            if it["bands"] == 4:
                planted["four_band_npz"].append(ref)
            if (record.name, it["index"]) == PICKLE_ITEM:
                planted["pickle_npz"].append({**ref, "key": "settings", "why": "settings saved as a dict"})
            if (record.name, it["index"]) == UNKNOWN_ITEM:
                planted["unknown_class"].append({**ref, "class": UNKNOWN_CLASS})
            for superseded, _ in it["extra_members"]:
                planted["superseded_npz"].append(
                    {"record": record.name, "npz": superseded, "kept": it["member"],
                     "sessions": list(SESSIONS)}
                )
            if (record.name, it["index"]) == NOT_ONE_HOT_ITEM:
                planted["not_one_hot"].append({**ref, "why": "`label` is all ones"})
            if it["row"] is not None and not it["member"].isascii():
                planted["non_ascii_csv"].append({**ref, "text": it["member"][4:-4]})
    return {"planted": planted, "checksums": checksums}
