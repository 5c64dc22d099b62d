"""ingest@seatizen: the Seatizen Atlas record (Zenodo 13951614), or the authors' own training
tables, into the sample table, with masks. docs/ingest.md (section Seatizen Atlas) is the
user-facing account; this docstring is the precise one.

Raw input (`data/raw/seatizen/`, SOURCES.md §6):
- annotation CSVs matching `sources.seatizen.annotations` (globs, default
  `*multilabel_annotations*.csv`): `FileName`, metadata columns, one column per class
  (stages/ingest/seatizen_csv.py);
- at most one `*segmentation_annotations*.json` (COCO-style instance masks, streamed);
- the images under `sources.seatizen.images` (default `2024_dataset/`, the contents of images.zip),
  and beside them raster masks `annotation_mask_<image stem>.png|.tif|.tiff` with the colour table
  `color.txt` of their folder or the nearest folder above (stages/ingest/seatizen_masks.py).
`gbif_class_mapping.csv` is not read: the crosswalk table carries what it says.

Input records, and where each one ends (per record kind, inputs = kept + quarantine rows):
- `annotation_row`: every data line of every annotation CSV. Kept in its image's sample, or
  `bad_record` (unreadable or multi-line record, wrong field count, empty FileName, a value that
  is not -1 or in [0, 1], a FileName already given - the first row wins, in file then line order;
  the repeat's id is `<FileName> (line N)`), `missing_image` (no image of that name),
  `image_unusable` (its image was quarantined).
- `image`: every file under the image folder except raster masks and `color.txt`. Kept as the
  sample of its first CSV row, or `no_annotation`, `bad_record` (its row is bad; or a second file
  whose name equals another's after NFC normalisation), or the probe's reason.
- `mask`: every entry of the JSON's `images` and every raster mask file. Kept as its sample's
  `mask_path`, or `missing_image`, `image_unusable` (the image or its row was quarantined),
  `bad_record` (a second mask for one image - the JSON's entry, then the first raster in name
  order, is used -; a mask that does not fit the image or cannot be read; an annotation that makes
  it unusable, e.g. a polygon at +-1e300; a raster that matches several images or has no
  colour table).
- `class`: every class column of a CSV (per file), segmentation category or raster colour that the
  crosswalk does not know: `unknown_class`, naming it; its values are left out of `labels` (they
  stay in `native_labels`), its instances are painted 0. Known classes are not records.

A sample is one image with its CSV row. sample_id = `seatizen-<stem>_<ext>` for a plain name
(stem of [A-Za-z0-9_-], alphanumeric extension), else `make_sample_id` of the name (slug plus 8
hex of its sha256; a plain name without an extension takes the 8 hex too, so `a_b_jpg` and
`a_b.jpg` stay apart). `session`, `site` (`<CCC>[-<Place>]`) and `captured_at` come from the name
(stages/ingest/seatizen_names.py: every name parses; odd ones get a coarser session).
`official_split` is the CSV's when its file name has a `train`/`val`/`test` token.

`native_labels` (JSON):
    {"file_name": str, "annotation_file": str, "csv": {<metadata column>: str},
     "name": {"form", "date", "country", "place", "platform", "platform_number", "video", "frame"},
     "value_kind": "binary" | "probability",
     "multilabel": {<class column as upstream names it>: 1 | 0 | -1 | probability},
     "renamed": {<old name>: <current name>}     # only when the CSV uses old names
     "unknown_classes": [<column>],              # only when some are unknown
     "segmentation": null | {"image_id", "instances": [{"annotation_id", "category_id",
                     "category", "encoding"}]},
     "raster_mask": null | {"file": str, "colour_table": str}}

`labels` (JSON), the values crosswalked (data/tables/seatizen/crosswalk.csv, old names through
old_new_labels.csv) into the MERMAID taxonomy; for every target, its classes combine as 1 if any
is 1, else -1 if any is -1, else 0:
    {"attribute": [{"id", "name", "top_level", "value"}],
     "attribute_growth_form": [{"id", "name", "growth_form_id", "growth_form_name", "top_level",
                                "value"}],
     "top_level": {<category>: value},  # only categories some known class reaches
     "non_benthic": {<class>: value}, "image_quality": {<class>: value},
     "coverage": {"present": n, "mapped": n, "ratio": x | null},
     "soft": {...}}                     # probability files only, see below
A probability file's presence is `p >= sources.seatizen.presence_threshold` (default 0.5), -1
staying -1; `soft` holds `threshold`, `rule` and the same lists with `p` instead of `value`, a
target's p being the largest of its classes' (null when none is annotated). With
`sources.seatizen.probabilities: refuse` a probability file fails the ingest as a whole instead.

Masks: `data/interim/seatizen/masks/<sample_id>.png`, PNG mode L at the image's size; 0 =
unlabelled; the known segmentation categories sorted by id are 1..K, then the raster classes no
category names, by class name. `mask_classes.json` beside the tables lists them.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from stages.cache import code_version
from stages.errors import ConfigError, UpstreamFormatError
from stages.fsutil import dumps_json
from stages.ingest.context import IngestContext
from stages.ingest.probe import image_work
from stages.ingest.records import Built, Quarantine, Record, Report, Sample, Work, WorkResult
from stages.ingest.seatizen_csv import AnnotationFile, BadRecord, read_annotation_file
from stages.ingest.seatizen_labels import Crosswalk, RasterClasses
from stages.ingest.seatizen_masks import (
    COLOUR_TABLE,
    NAMESPACE,
    RASTER_EXTENSIONS,
    RASTER_PREFIX,
    MaskedImageTask,
    SegImage,
    Segmentation,
    probe_with_mask,
    read_colour_table,
    read_segmentation,
)
from stages.ingest.seatizen_names import FORMS, FrameName, nfc, parse_name
from stages.schema import digest_suffixed, make_sample_id
from stages.taxonomy_index import Taxonomy

SOURCE = "seatizen"
DEFAULT_ANNOTATIONS = ("*multilabel_annotations*.csv",)
DEFAULT_IMAGES = "2024_dataset"
SEGMENTATION_GLOB = "*segmentation_annotations*.json"
MASK_DIR = "masks"
MASK_CLASSES = "mask_classes.json"
DEFAULT_THRESHOLD = 0.5
POLICIES = ("soft", "refuse")
ODD_EXAMPLES = 5


@dataclass(frozen=True)
class Settings:
    annotations: tuple[str, ...]
    images: str
    threshold: float
    probabilities: str

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Settings:
        globs = params.get("annotations", list(DEFAULT_ANNOTATIONS))
        if isinstance(globs, str):
            globs = [globs]
        if not isinstance(globs, list) or not globs or not all(isinstance(g, str) and g for g in globs):
            raise ConfigError(
                f"params.yaml: sources.seatizen.annotations must be a list of globs, got {globs!r}"
            )
        images = params.get("images", DEFAULT_IMAGES)
        if (
            not isinstance(images, str)
            or not images
            or Path(images).is_absolute()
            or ".." in Path(images).parts
        ):
            raise ConfigError(
                f"params.yaml: sources.seatizen.images must be a folder in the raw data, got {images!r}"
            )
        threshold = params.get("presence_threshold", DEFAULT_THRESHOLD)
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold <= 1:
            raise ConfigError(
                "params.yaml: sources.seatizen.presence_threshold must be a number in (0, 1], "
                f"got {threshold!r}"
            )
        policy = params.get("probabilities", "soft")
        if policy not in POLICIES:
            raise ConfigError(
                f"params.yaml: sources.seatizen.probabilities must be one of {POLICIES}, got {policy!r}"
            )
        return cls(tuple(globs), images, float(threshold), policy)


def sample_id_for(file_name: str) -> str:
    """`seatizen-<stem>_<ext>` for a plain name, else the injective `make_sample_id` of it."""
    stem, _, ext = file_name.rpartition(".")
    if stem and re.fullmatch(r"[A-Za-z0-9_-]+", stem) and re.fullmatch(r"[A-Za-z0-9]+", ext):
        return f"{SOURCE}-{stem}_{ext}"
    if not stem and re.fullmatch(r"[A-Za-z0-9_-]+", file_name):
        # A plain name without an extension would equal another's `<stem>_<ext>` form (`a_b_jpg`,
        # `a_b.jpg`): it takes the digest suffix make_sample_id gives changed names.
        return f"{SOURCE}-{digest_suffixed(file_name, file_name)}"
    return make_sample_id(SOURCE, file_name)


def _float_or_none(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


@cache
def _mask_code() -> str:
    return code_version(
        "stages.imaging", "stages.ingest.probe", "stages.ingest.seatizen_masks", libraries=("PIL", "numpy")
    )


# --- finding the inputs -------------------------------------------------------------------------


def _annotation_files(raw: Path, globs: tuple[str, ...]) -> list[Path]:
    found = sorted({p for g in globs for p in raw.glob(g) if p.is_file()})
    if not found:
        raise UpstreamFormatError(raw, f"expected an annotation CSV matching {', '.join(globs)}, found none")
    return found


def _at_most_one(raw: Path, pattern: str) -> Path | None:
    found = sorted(p for p in raw.glob(pattern) if p.is_file())
    if len(found) > 1:
        raise UpstreamFormatError(raw, f"expected one {pattern}, found {', '.join(p.name for p in found)}")
    return found[0] if found else None


@dataclass
class _Folder:
    images: dict[str, Path] = field(default_factory=dict)  # key (NFC, relative) -> file
    same_name: list[tuple[str, Path]] = field(default_factory=list)  # a second file of one NFC key
    rasters: dict[str, Path] = field(default_factory=dict)  # key -> raster mask file
    colour_tables: dict[str, Path] = field(default_factory=dict)  # folder key ("" = root) -> color.txt


def _scan(root: Path) -> _Folder:
    out = _Folder()
    for path in sorted(root.rglob("*")):
        if not (path.is_file() or path.is_symlink()):
            continue
        key = nfc(path.relative_to(root).as_posix())
        name = key.rsplit("/", 1)[-1]
        folder = key.rpartition("/")[0]
        if name == COLOUR_TABLE:
            out.colour_tables[folder] = path
        elif name.startswith(RASTER_PREFIX) and Path(name).suffix.lower() in RASTER_EXTENSIONS:
            out.rasters[key] = path
        elif key in out.images:
            out.same_name.append((key, path))
        else:
            out.images[key] = path
    return out


# --- per-image state ------------------------------------------------------------------------------


@dataclass
class _Mask:
    record_id: str
    file: str  # the mask record's file (JSON or raster), relative to the repo root
    entry: SegImage | None = None  # COCO instances
    raster: Path | None = None
    colour_table: str | None = None
    lut: tuple[tuple[float, int], ...] = ()


@dataclass
class _Candidate:
    key: str
    path: Path
    file: AnnotationFile
    row: int
    mask: _Mask | None = None


@dataclass
class _Tally:
    """Counts over the kept samples, filled by `Sample.build` (metrics the runner cannot give)."""

    forms: Counter[str] = field(default_factory=Counter)
    odd: list[str] = field(default_factory=list)
    sessions: set[str] = field(default_factory=set)
    classes: Counter[str] = field(default_factory=Counter)
    top_level: Counter[str] = field(default_factory=Counter)
    not_annotated: int = 0
    present: int = 0
    mapped: int = 0
    masks: Counter[str] = field(default_factory=Counter)

    def metrics(self) -> dict[str, Any]:
        return {
            "names": {**{f: self.forms.get(f, 0) for f in FORMS}, "odd_examples": self.odd},
            "sessions": len(self.sessions),
            "classes": dict(sorted(self.classes.items())),
            "top_level_categories": dict(sorted(self.top_level.items())),
            "not_annotated_values": self.not_annotated,
            "crosswalk_presences": {
                "mapped": self.mapped,
                "total": self.present,
                "ratio": self.mapped / self.present if self.present else None,
            },
            "masks_written": {"total": 0, **dict(sorted(self.masks.items()))},
        }


@dataclass
class _Build:
    """`Sample.build` of one image: attach or refuse its mask, count the kept sample."""

    tally: _Tally
    name: FrameName
    key: str
    native: dict[str, Any]
    presences: list[str]
    top_level: list[str]
    not_annotated: int
    coverage: dict[str, Any]
    mask: _Mask | None
    mask_rel: str | None
    segmentation: dict[str, Any] | None

    def __call__(self, result: WorkResult) -> Built:
        t = self.tally
        t.forms[self.name.form] += 1
        if self.name.form in ("partial", "other") and len(t.odd) < ODD_EXAMPLES:
            t.odd.append(self.key)
        t.sessions.add(self.name.session)
        t.classes.update(self.presences)
        t.top_level.update(self.top_level)
        t.not_annotated += self.not_annotated
        t.present += self.coverage["present"]
        t.mapped += self.coverage["mapped"]
        native = dict(self.native)
        if self.mask is None:
            return Built({"native_labels": native})
        problem = result.data.get("mask_problem")
        if problem:
            q = Quarantine("mask", self.mask.record_id, self.mask.file, "bad_record", str(problem))
            return Built({"native_labels": native}, quarantine=(q,))
        t.masks["total"] += 1
        if self.mask.entry is not None:
            native["segmentation"] = self.segmentation
            t.masks["from_json"] += 1
            for enc, n in self.mask.entry.encodings.items():
                t.masks["instances"] += n
                t.masks[enc] += n
        else:
            native["raster_mask"] = {"file": self.mask.file, "colour_table": self.mask.colour_table}
            t.masks["from_raster"] += 1
        return Built({"native_labels": native, "mask_path": self.mask_rel}, consumed=("mask",))


# --- the adapter ----------------------------------------------------------------------------------


def records(ctx: IngestContext, report: Report) -> Iterator[Record]:
    """Seatizen samples and quarantine rows (see the module docstring)."""
    settings = Settings.from_params(ctx.source_params)
    raw = ctx.raw_dir
    csv_paths = _annotation_files(raw, settings.annotations)
    seg_path = _at_most_one(raw, SEGMENTATION_GLOB)  # optional: a fetch may leave out the 334 MB JSON
    image_root = raw / settings.images
    if not image_root.is_dir():
        raise UpstreamFormatError(raw, f"no {settings.images}/ folder (the contents of images.zip)")
    taxonomy = Taxonomy.load(ctx.taxonomy_dir)
    crosswalk = Crosswalk.load(ctx.tables_dir, taxonomy)
    raster_classes = RasterClasses.load(ctx.tables_dir, crosswalk)
    files = [read_annotation_file(p) for p in csv_paths]
    for f in files:
        if f.kind == "probability" and settings.probabilities == "refuse":
            raise UpstreamFormatError(
                f.path,
                f"holds probabilities, not 1/0/-1 values (e.g. {f.fractional_example}); "
                "sources.seatizen.probabilities is 'refuse' (set it to 'soft' to ingest them as soft labels)",
            )
    folder = _scan(image_root)
    tally = _Tally()
    images_rel = ctx.rel(image_root)

    with tempfile.TemporaryFile(prefix="seatizen-instances-") as spill:
        seg = read_segmentation(seg_path, crosswalk.resolve, spill) if seg_path else None
        yield from _unknown_classes(ctx, report, settings.threshold, files, crosswalk, seg, seg_path)

        # CSV rows: the first row of each FileName is that image's row; what fails is quarantined.
        first: dict[str, tuple[AnnotationFile, int]] = {}  # name -> (file, good-row index)
        bad_first: dict[str, str] = {}  # name -> why its first row is bad
        seen: dict[str, str] = {}  # name -> where its first row is
        for f in files:
            report.inputs["annotation_row"] += f.data_lines
            rel = ctx.rel(f.path)
            for line, name, row, bad in _in_line_order(f):
                where = f"line {line}" if len(files) == 1 else f"line {line} of {f.path.name}"
                if name is not None and name in seen:
                    yield Quarantine(
                        "annotation_row",
                        f"{name} ({where})",
                        rel,
                        "bad_record",
                        f"{where}: FileName repeats {seen[name]}; the first row is used",
                    )
                    continue
                if name is not None:
                    seen[name] = where
                if bad is not None:
                    yield Quarantine("annotation_row", bad.record_id, rel, "bad_record", bad.detail)
                    if name is not None:
                        bad_first[name] = bad.detail
                    continue
                assert name is not None and row is not None
                if name not in folder.images:
                    yield Quarantine(
                        "annotation_row", name, rel, "missing_image", f"{where}: no {settings.images}/{name}"
                    )
                    continue
                first[name] = (f, row)

        # Images: only those with a usable row are probed; the others need no pixels to be placed.
        report.inputs["image"] += len(folder.images) + len(folder.same_name)
        candidates: dict[str, _Candidate] = {}
        for key, path in folder.images.items():
            if key in first:
                f, row = first[key]
                candidates[key] = _Candidate(key, path, f, row)
            elif key in bad_first:
                yield Quarantine(
                    "image",
                    key,
                    ctx.rel(path),
                    "bad_record",
                    f"its CSV row is a bad record: {bad_first[key]}",
                )
            else:
                yield Quarantine(
                    "image", key, ctx.rel(path), "no_annotation", "no row in the annotation CSVs"
                )
        for key, path in folder.same_name:
            yield Quarantine(
                "image",
                f"{key} ({path.relative_to(image_root).as_posix()})",
                ctx.rel(path),
                "bad_record",
                f"same name as {folder.images[key].relative_to(image_root).as_posix()} after Unicode NFC "
                "normalisation; that file is used",
            )

        # Masks: the JSON's entries, then raster masks beside the images.
        values = _mask_values(seg, folder, raster_classes)
        yield from _json_masks(ctx, report, seg, seg_path, candidates, seen, folder)
        yield from _raster_masks(ctx, report, folder, candidates, raster_classes, values)
        report.files[MASK_CLASSES] = dumps_json(
            _mask_classes_doc(ctx, seg, seg_path, values, crosswalk, raster_classes)
        ).encode()

        # Samples, in sample_id order.
        masks_rel = ctx.out_rel(ctx.out_dir / MASK_DIR)
        for sid, key in sorted((sample_id_for(k), k) for k in candidates):
            yield _sample(ctx, settings, crosswalk, tally, candidates[key], sid, seg, masks_rel, images_rel)

    known = sorted({c for f in files for col in f.classes if (c := crosswalk.resolve(col)) is not None})
    report.extra.update(
        {
            "files": {ctx.rel(f.path): _file_metrics(f, crosswalk) for f in files},
            "crosswalk": crosswalk.coverage(known),
            "masks": {
                "json_images": len(seg.images) if seg else 0,
                "annotations": seg.annotations if seg else 0,
                "degenerate_polygons_skipped": seg.degenerate if seg else 0,
                "categories": len(seg.categories) if seg else 0,
                "raster_files": len(folder.rasters),
                "colour_tables": len(folder.colour_tables),
            },
        }
    )
    report.on_finish.append(lambda: report.extra.update(tally.metrics()))


def _in_line_order(f: AnnotationFile) -> Iterator[tuple[int, str | None, int | None, BadRecord | None]]:
    """(line, FileName or None, good-row index or None, BadRecord or None) in line order."""
    good = iter(enumerate(zip(f.lines, f.names)))
    bad = iter(f.bad)
    g, b = next(good, None), next(bad, None)
    while g is not None or b is not None:
        if b is None or (g is not None and g[1][0] < b.line):
            assert g is not None
            row, (line, name) = g
            yield line, name, row, None
            g = next(good, None)
        else:
            yield b.line, b.name, None, b
            b = next(bad, None)


def _file_metrics(f: AnnotationFile, crosswalk: Crosswalk) -> dict[str, Any]:
    resolved = [crosswalk.resolve(c) for c in f.classes]
    return {
        "data_lines": f.data_lines,
        "value_kind": f.kind,
        "classes": len(f.classes),
        "renamed": sum(1 for c, r in zip(f.classes, resolved) if r is not None and r != c),
        "unknown_classes": [c for c, r in zip(f.classes, resolved) if r is None],
        "official_split": f.official_split,
    }


def _unknown_classes(
    ctx: IngestContext,
    report: Report,
    threshold: float,
    files: list[AnnotationFile],
    crosswalk: Crosswalk,
    seg: Segmentation | None,
    seg_path: Path | None,
) -> Iterator[Quarantine]:
    stats: dict[str, Counter[str]] = {}
    for f in files:
        for k, column in enumerate(f.classes):
            if crosswalk.resolve(column) is not None:
                continue
            report.inputs["class"] += 1
            col = f.values[:, k]
            counts = Counter(
                {
                    "values": int(col.size),
                    "present": int((col == 1).sum()) if f.kind == "binary" else int((col >= threshold).sum()),
                    "not_annotated": int((col == -1).sum()),
                }
            )
            stats.setdefault(column, Counter()).update({**counts, "files": 1})
            yield Quarantine(
                "class",
                column,
                ctx.rel(f.path),
                "unknown_class",
                f"class column {column!r} is not in {crosswalk.path.name} (nor an old name in "
                f"{crosswalk.renames_path.name}): its {counts['values']} values are left out of the labels",
            )
    for cat in seg.categories if seg else ():
        if cat["class"] is None:
            assert seg_path is not None
            report.inputs["class"] += 1
            stats.setdefault(cat["name"], Counter()).update({"files": 1, "instances": cat["instances"]})
            yield Quarantine(
                "class",
                cat["name"],
                ctx.rel(seg_path),
                "unknown_class",
                f"segmentation category {cat['name']!r} (id {cat['category_id']}) is not in "
                f"{crosswalk.path.name}: its {cat['instances']} instances are painted 0 (unlabelled)",
            )
    report.extra["unknown_classes"] = {k: dict(sorted(v.items())) for k, v in sorted(stats.items())}


# --- masks ----------------------------------------------------------------------------------------


@dataclass
class _Values:
    """The product's mask values: known segmentation categories (by id), then raster-only classes."""

    by_class: dict[str, int]  # crosswalk class -> value (the first category of that class)
    raster_only: list[str]  # classes with a value only because a raster mask uses them
    tables: dict[str, list[Any]] = field(default_factory=dict)  # colour table key -> its rows


def _mask_values(seg: Segmentation | None, folder: _Folder, raster_classes: RasterClasses) -> _Values:
    by_class: dict[str, int] = {}
    top = 0
    for cat in seg.categories if seg else ():
        if cat["value"] is not None:
            by_class.setdefault(cat["class"], cat["value"])
            top = max(top, cat["value"])
    tables: dict[str, Any] = {}
    for key, path in sorted(folder.colour_tables.items()) if folder.rasters else ():
        try:
            tables[key] = read_colour_table(path)
        except UpstreamFormatError as exc:
            tables[key] = exc.problem  # only the masks that use it are refused
    used = sorted(
        {
            raster_classes.by_colour[row.rgba[:3]][1]
            for rows in tables.values()
            if not isinstance(rows, str)
            for row in rows
            if row.rgba[3] != 0 and row.rgba[:3] in raster_classes.by_colour
        }
        - set(by_class)
    )
    if top + len(used) > 255:
        raise UpstreamFormatError(
            raster_classes.path, f"{top + len(used)} mask classes do not fit a mode-L mask"
        )
    for k, cls in enumerate(used, start=top + 1):
        by_class[cls] = k
    return _Values(by_class, used, tables)


def _mask_record(entry: SegImage) -> str:
    return f"{entry.file_name} (image id {entry.image_id})"


def _json_masks(
    ctx: IngestContext,
    report: Report,
    seg: Segmentation | None,
    seg_path: Path | None,
    candidates: dict[str, _Candidate],
    seen: dict[str, str],
    folder: _Folder,
) -> Iterator[Quarantine]:
    if seg is None or seg_path is None:
        return
    rel = ctx.rel(seg_path)
    report.inputs["mask"] += len(seg.images)
    attached: dict[str, SegImage] = {}
    # A name may sit in a subfolder of the image folder; the JSON gives only the last component.
    by_name: dict[str, list[str]] = {}
    for key in candidates:
        by_name.setdefault(key.rsplit("/", 1)[-1], []).append(key)
    for entry in seg.images:
        rid = _mask_record(entry)
        keys = by_name.get(entry.file_name, [])
        if entry.file_name in attached:
            first = attached[entry.file_name].image_id
            yield Quarantine(
                "mask",
                rid,
                rel,
                "bad_record",
                f"second entry for {entry.file_name}; image id {first} is used",
            )
        elif len(keys) > 1:
            yield Quarantine(
                "mask", rid, rel, "bad_record", f"{entry.file_name} names several images: {', '.join(keys)}"
            )
        elif keys:
            attached[entry.file_name] = entry
            if entry.problem is not None:
                yield Quarantine("mask", rid, rel, "bad_record", entry.problem)
            else:
                candidates[keys[0]].mask = _Mask(rid, rel, entry=entry)
        elif entry.file_name in seen or any(k.rsplit("/", 1)[-1] == entry.file_name for k in folder.images):
            yield Quarantine(
                "mask", rid, rel, "image_unusable", "the CSV row or image of this name is quarantined"
            )
        else:
            yield Quarantine("mask", rid, rel, "missing_image", f"no CSV row and no image {entry.file_name}")


def _colour_table(folder: _Folder, key: str) -> str | None:
    """The key of the nearest color.txt: the mask's folder, then each folder above it."""
    parts = key.split("/")[:-1]
    while True:
        here = "/".join(parts)
        if here in folder.colour_tables:
            return here
        if not parts:
            return None
        parts.pop()


def _raster_masks(
    ctx: IngestContext,
    report: Report,
    folder: _Folder,
    candidates: dict[str, _Candidate],
    raster_classes: RasterClasses,
    values: _Values,
) -> Iterator[Quarantine]:
    if folder.rasters:
        report.inputs["mask"] += len(folder.rasters)
    unknown_colours: set[tuple[str, str]] = set()
    for key, path in folder.rasters.items():
        rel = ctx.rel(path)
        parent, _, name = key.rpartition("/")
        stem = Path(name[len(RASTER_PREFIX) :]).stem
        prefix = f"{parent}/" if parent else ""
        images = sorted(
            k
            for k in folder.images
            if k.startswith(prefix) and "/" not in k[len(prefix) :] and Path(k).stem == stem
        )
        if not images:
            yield Quarantine("mask", key, rel, "missing_image", f"no image {prefix}{stem}.* beside it")
            continue
        if len(images) > 1:
            yield Quarantine(
                "mask", key, rel, "bad_record", f"its name matches several images: {', '.join(images)}"
            )
            continue
        image = images[0]
        if image not in candidates:
            yield Quarantine(
                "mask", key, rel, "image_unusable", f"the CSV row or image {image} is quarantined"
            )
            continue
        cand = candidates[image]
        if cand.mask is not None:
            yield Quarantine(
                "mask",
                key,
                rel,
                "bad_record",
                f"{image} already has a mask from {cand.mask.file}; that one is used",
            )
            continue
        table = _colour_table(folder, key)
        if table is None:
            yield Quarantine(
                "mask", key, rel, "bad_record", f"no {COLOUR_TABLE} in its folder or any folder above"
            )
            continue
        table_rel = ctx.rel(folder.colour_tables[table])
        if isinstance(values.tables[table], str):
            problem = values.tables[table]
            yield Quarantine("mask", key, rel, "bad_record", f"its colour table {table_rel}: {problem}")
            continue
        lut = []
        for row in values.tables[table]:
            if row.rgba[3] == 0:
                lut.append((row.raw, 0))  # no data
                continue
            hit = raster_classes.by_colour.get(row.rgba[:3])
            if hit is None:
                lut.append((row.raw, 0))
                ident = "nan" if math.isnan(row.raw) else str(int(row.raw))
                if (table_rel, ident) not in unknown_colours:
                    unknown_colours.add((table_rel, ident))
                    report.inputs["class"] += 1
                    yield Quarantine(
                        "class",
                        f"value {ident} {row.rgba[:3]}",
                        table_rel,
                        "unknown_class",
                        f"colour {row.rgba[:3]} of value {ident} is not in {raster_classes.path.name}: "
                        "its pixels are painted 0 (unlabelled)",
                    )
                continue
            lut.append((row.raw, values.by_class[hit[1]]))
        cand.mask = _Mask(key, rel, raster=path, colour_table=table_rel, lut=tuple(lut))


def _mask_classes_doc(
    ctx: IngestContext,
    seg: Segmentation | None,
    seg_path: Path | None,
    values: _Values,
    crosswalk: Crosswalk,
    raster_classes: RasterClasses,
) -> dict[str, Any]:
    colours: dict[str, list[list[int]]] = {}
    for rgb, (_, cls) in sorted(raster_classes.by_colour.items()):
        colours.setdefault(cls, []).append(list(rgb))
    classes: list[dict[str, Any]] = [{"value": 0, "name": "unlabelled"}]
    for cat in seg.categories if seg else ():
        if cat["value"] is not None:
            classes.append(
                {
                    "value": cat["value"],
                    "name": cat["name"],
                    "category_id": cat["category_id"],
                    "supercategory": cat["supercategory"],
                    "seatizen_class": cat["class"],
                    "raster_colours": colours.get(cat["class"], []) if values.tables else [],
                    **crosswalk.describe(cat["class"]),
                }
            )
    for cls in values.raster_only:
        classes.append(
            {
                "value": values.by_class[cls],
                "name": cls,
                "category_id": None,
                "supercategory": None,
                "seatizen_class": cls,
                "raster_colours": colours.get(cls, []),
                **crosswalk.describe(cls),
            }
        )
    return {
        "file": ctx.rel(seg_path) if seg_path else None,
        "order": "0 = unlabelled; known segmentation categories sorted by category id, then the classes "
        "only raster masks use, by name",
        "overlap": "smaller instance (fewer pixels) wins; equal size: higher annotation id wins",
        "raster": "raster ids -> colour (color.txt) -> class (data/tables/seatizen/raster_classes.csv)",
        "classes": classes,
    }


# --- one sample -----------------------------------------------------------------------------------


def _sample(
    ctx: IngestContext,
    settings: Settings,
    crosswalk: Crosswalk,
    tally: _Tally,
    cand: _Candidate,
    sid: str,
    seg: Segmentation | None,
    masks_rel: str,
    images_rel: str,
) -> Sample:
    f, row = cand.file, cand.row
    rel_csv = ctx.rel(f.path)
    name = parse_name(cand.key)
    raw_values = f.values[row]
    resolved = [crosswalk.resolve(c) for c in f.classes]
    known = [i for i, r in enumerate(resolved) if r is not None]
    classes = tuple(resolved[i] for i in known)  # type: ignore[misc]
    probability = f.kind == "probability"
    vals = raw_values[known]
    hard = (
        [-1 if v == -1 else int(v >= settings.threshold) for v in vals.tolist()]
        if probability
        else [int(v) for v in vals.tolist()]
    )
    labels = crosswalk.labels(classes, hard)
    if probability:
        labels["soft"] = {
            "threshold": settings.threshold,
            "rule": "p of a target = the largest p of its classes; null when none is annotated",
            **crosswalk.soft(classes, vals.tolist()),
        }
    native_values = {
        c: (int(v) if v == -1 or not probability else float(v))
        for c, v in zip(f.classes, raw_values.tolist())
    }
    meta = dict(zip(f.meta[1:], f.meta_values[row]))
    native: dict[str, Any] = {
        "file_name": cand.key,
        "annotation_file": rel_csv,
        "csv": meta,
        "name": name.native(),
        "value_kind": f.kind,
        "multilabel": native_values,
        "segmentation": None,
        "raster_mask": None,
    }
    renamed = {c: r for c, r in zip(f.classes, resolved) if r is not None and r != c}
    if renamed:
        native["renamed"] = renamed
    unknown = [c for c, r in zip(f.classes, resolved) if r is None]
    if unknown:
        native["unknown_classes"] = unknown
    presences = sorted({c for c, v in zip(classes, hard) if v == 1})
    image_rel = ctx.rel(cand.path)
    mask = cand.mask
    mask_file = f"{MASK_DIR}/{sid}.png"
    segmentation = None
    on_unusable = [
        Quarantine(
            "annotation_row",
            cand.key,
            rel_csv,
            "image_unusable",
            f"line {f.lines[row]}: its image is quarantined",
        )
    ]
    work: Work
    if mask is None:
        work = image_work(ctx, cand.path)
    else:
        on_unusable.append(
            Quarantine("mask", mask.record_id, mask.file, "image_unusable", "its image is quarantined")
        )
        task = MaskedImageTask(str(cand.path), ctx.max_pixels, mask_file)
        if mask.entry is not None:
            assert seg is not None
            blob = seg.instances(mask.entry)
            task = MaskedImageTask(
                str(cand.path),
                ctx.max_pixels,
                mask_file,
                instances=blob,
                size=(mask.entry.width, mask.entry.height),
            )
            segmentation = _segmentation_native(mask.entry, blob, seg)
        else:
            task = MaskedImageTask(
                str(cand.path), ctx.max_pixels, mask_file, raster_path=str(mask.raster), lut=mask.lut
            )
        work = Work(probe_with_mask, task, NAMESPACE, _mask_code(), {"max_pixels": ctx.max_pixels})
    build = _Build(
        tally,
        name,
        cand.key,
        native,
        presences,
        [c for c, v in labels["top_level"].items() if v == 1],
        int((raw_values == -1).sum()),
        labels["coverage"],
        mask,
        f"{masks_rel}/{sid}.png",
        segmentation,
    )
    return Sample(
        sample_id=sid,
        upstream_id=cand.key,
        work=work,
        columns={
            "image_path": image_rel,
            "session": name.session,
            "site": name.site,
            "captured_at": name.date,
            "official_split": f.official_split,
            "lat": _float_or_none(meta.get("GPSLatitude")),
            "lon": _float_or_none(meta.get("GPSLongitude")),
            "license": ctx.source_params.get("license"),
            "attribution": ctx.source_params.get("attribution"),
            "labels": labels,
            "n_points": 0,
        },
        file=image_rel,
        on_unusable=on_unusable,
        consumes=("annotation_row",),
        build=build,
    )


def _segmentation_native(entry: SegImage, blob: bytes, seg: Segmentation) -> dict[str, Any]:
    names = {c["category_id"]: c["name"] for c in seg.categories}
    instances = [
        {"annotation_id": ann_id, "category_id": cid, "category": names[cid], "encoding": encoding}
        for ann_id, cid, _value, encoding, _ in sorted(json.loads(blob), key=lambda a: a[0])
    ]
    return {"image_id": entry.image_id, "instances": instances}
