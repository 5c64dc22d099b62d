"""ingest@coasttrain: USGS Coast Train npz files and metadata CSVs into the sample table.

Raw layout (docs/architecture.md): `data/raw/coasttrain/<Record>/` holds exactly one metadata CSV
at its root and the record's `.npz` files (Doodler output, SOURCES §4), found anywhere below it
(`npz/x.npz`, or Doodler's own session folders `results<YYYY-MM-DD-HH-MM>/x.npz`).

Input records, two kinds (the runner checks inputs = kept + quarantined, per kind):
- `image`: every `*.npz` under a record folder -> one sample, or a quarantine row: the npz work's
  reasons (`missing_image`, `not_a_regular_file`, `empty_file`, `unreadable_npz`,
  `npz_needs_pickle`, `npz_too_large`, `image_too_large`, `not_one_hot`; stages/ingest/
  coasttrain_npz.py), `unknown_class` (a class that labels pixels is not in the remap table),
  `superseded` (the same npz name in an older Doodler session folder of the record: the newest
  session by its folder's timestamp is the final label), `bad_record` (the same name in several
  folders and no timestamps that tell the newest);
- `annotation_row`: every data record of a record's metadata CSV -> kept in the sample of its npz,
  or a quarantine row: `bad_record` (does not parse, wrong field count, empty file cell, a second
  row for one npz), `missing_image` (no such npz in the record), `image_unusable` (its npz was
  quarantined).
An npz without a CSV row is still a sample, with null metadata.

Per npz, one unit of work (`coasttrain_npz.mask_work`, cached by the npz bytes' digest, with the
pixel and byte bounds and the remap table's digest as settings): decode, remap each class name
through `data/tables/coasttrain/remap.csv` to the 7 common classes (ids in COMMON_CLASSES order;
`ignore` -> 255), hash the RGB image, encode the mask as PNG mode L. The runner writes the mask to
`data/interim/coasttrain/masks/<sample_id>.png`; the image is not copied (pack reads it from the
npz through `load_coasttrain_image`). Labels are built from the unit's result in the main process.

Group keys, all from the names and the metadata, known before any npz is decoded:
- `spatial_block` = `lat<i>_lon<j>`, the cell of a grid of `ingest.coasttrain_block_degrees`
  degrees holding the tile centre, so neighbouring tiles of one orthomosaic, and tiles of one
  footprint on other dates or from other sensors, share a block (split also unites tiles whose
  bounds in `native_labels.geo` touch);
- `session` = `<Record>/<scene key>`: the npz stem without tile numbers and dates (the orthomosaic,
  NAIP quad or satellite footprint the tile was cut from);
- an npz without metadata takes the smallest `spatial_block` of the tiles of its scene that have a
  CSV row with a location (whether or not their npz decode: a group key never depends on another
  sample's result); when none has, `scene-<Record>-<scene key>`.

Columns: sample_id = `make_sample_id("coasttrain", Record, npz stem)`, upstream_id =
`<Record>/<npz path in the record>`, image_path = the npz, image_format `npz`, file_size and
file_sha256 of the npz file, pixel_sha256/phash of the RGB image, lat/lon = centre of
LatMin..LatMax / LonMin..LonMax, captured_at = ISO date-time from year..second.

`native_labels` (JSON, sorted keys):
    {"record": "<Record>", "npz": "<path in record>", "classes": [npz `classes`, in index order],
     "classes_present": [class names that label at least one pixel, index order],
     "label_channels": K, "csv": "<metadata CSV name>" | null,
     "geo": {"epsg": int|null, "crs": str|null, "px_size_m": float|null, "lat_min", "lat_max",
             "lon_min", "lon_max": float|null} | null}     (null when the npz has no CSV row)
`labels` (JSON, sorted keys), in the 7-class space:
    {"classes": [the 7 names, id order], "ignore_index": 255,
     "pixels": {name: count for the 7 names and "ignore"},
     "fractions": {name: count / all pixels, rounded to 6 places, same keys},
     "present": [common classes with at least one pixel, id order]}
"""

from __future__ import annotations

import csv
import io
import os
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages import schema
from stages.errors import ConfigError, TidepoolError, UpstreamFormatError
from stages.ingest.coasttrain_meta import (
    FILE_COLUMN,
    REQUIRED_COLUMNS,
    Metadata,
    read_metadata_csv,
    scene_key,
    session_time,
    spatial_block,
)
from stages.ingest.coasttrain_npz import (
    IGNORE,
    NAMESPACE,
    MaskTask,
    load_coasttrain_image,
    mask_code,
    mask_work,
    remap_digest,
)
from stages.ingest.context import IngestContext
from stages.ingest.records import Quarantine, Record, Report, Sample, Work, WorkResult

__all__ = [
    "COMMON_CLASSES",
    "FILE_COLUMN",
    "IGNORE",
    "REQUIRED_COLUMNS",
    "load_coasttrain_image",
    "load_remap",
    "records",
    "sample_id_for",
    "scene_key",
    "spatial_block",
]

SOURCE = "coasttrain"
# The authors' `super_classes` order (remap_coast_train_classes_*.json): mask value = position.
COMMON_CLASSES = ("water", "whitewater", "sediment", "developed", "vegetation", "natural_terrain", "other")
REMAP_TABLE = Path("coasttrain") / "remap.csv"
REMAP_COLUMNS = ("class_name", "superclass")
DEFAULT_BLOCK_DEGREES = 0.05
DEFAULT_MAX_NPZ_BYTES = 1 << 30


# --- the remap table ---------------------------------------------------------------------------


def load_remap(tables_dir: Path) -> dict[str, int]:
    """class name (NFC) -> common class id (0..6) or IGNORE, from data/tables/coasttrain/remap.csv
    (UTF-8, strictly: a table of ours with a stray byte is a mistake to fix, not to guess at)."""
    path = Path(tables_dir) / REMAP_TABLE
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError as exc:
        raise TidepoolError(f"{path}: Coast Train remap table not found") from exc
    except UnicodeDecodeError as exc:
        raise TidepoolError(f"{path}: not UTF-8 (byte {exc.start}: {exc.reason})") from exc
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        fieldnames = reader.fieldnames
        missing = [c for c in REMAP_COLUMNS if c not in (fieldnames or [])]
        if missing:
            raise TidepoolError(f"{path}: expected columns {list(REMAP_COLUMNS)}, found {fieldnames}")
        ids = {name: i for i, name in enumerate(COMMON_CLASSES)}
        remap: dict[str, int] = {}
        for row in reader:
            line = reader.line_num
            name = unicodedata.normalize("NFC", (row["class_name"] or "").strip())
            superclass = (row["superclass"] or "").strip()
            if not name:
                raise TidepoolError(f"{path}:{line}: empty class_name")
            if superclass == "ignore":
                value = IGNORE
            elif superclass in ids:
                value = ids[superclass]
            else:
                raise TidepoolError(
                    f"{path}:{line}: superclass {superclass!r} of {name!r} is not one of "
                    f"{[*COMMON_CLASSES, 'ignore']}"
                )
            if name in remap and remap[name] != value:
                raise TidepoolError(f"{path}:{line}: class {name!r} listed twice with different superclasses")
            remap[name] = value
    except csv.Error as exc:
        raise TidepoolError(f"{path}:{reader.line_num}: does not parse as CSV: {exc}") from exc
    return remap


def sample_id_for(record: str, stem: str) -> str:
    return schema.make_sample_id(SOURCE, record, unicodedata.normalize("NFC", stem))


def _block_degrees(params: dict[str, Any]) -> float:
    value = (params.get("ingest") or {}).get("coasttrain_block_degrees", DEFAULT_BLOCK_DEGREES)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"params.yaml: ingest.coasttrain_block_degrees must be a number > 0, got {value!r}")
    return float(value)


def _max_npz_bytes(params: dict[str, Any]) -> int:
    value = (params.get("ingest") or {}).get("coasttrain_max_npz_bytes", DEFAULT_MAX_NPZ_BYTES)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(
            f"params.yaml: ingest.coasttrain_max_npz_bytes must be an integer > 0, got {value!r}"
        )
    return value


# --- one record's files ----------------------------------------------------------------------------


@dataclass
class _Npz:
    record: str
    path: Path
    member: str  # path inside the record folder
    name: str  # file name, NFC
    sample_id: str
    session: tuple[str, Any] | None  # (folder, time) of its Doodler session folder
    metadata: Metadata | None = None
    row_id: str | None = None  # "<Record>/<csv name>:<line>" of the joined CSV row

    @property
    def upstream_id(self) -> str:
        return f"{self.record}/{self.member}"

    @property
    def stem(self) -> str:
        return self.name[: -len(".npz")]


@dataclass(frozen=True)
class _Ambiguous:
    members: tuple[str, ...]

    @property
    def detail(self) -> str:
        return (
            f"the same npz name in {len(self.members)} folders ({', '.join(self.members)}) and no "
            "Doodler session timestamps (results<YYYY-MM-DD-HH-MM>) that tell the newest apart; "
            "remove the stale copies"
        )


def _record_csv(record_dir: Path) -> Path:
    csvs = sorted(p for p in record_dir.iterdir() if p.suffix.lower() == ".csv" and not p.is_dir())
    if len(csvs) != 1:
        raise UpstreamFormatError(
            record_dir,
            f"expected exactly one metadata CSV at the record root, found {[p.name for p in csvs]}",
        )
    if csvs[0].is_symlink():
        raise UpstreamFormatError(csvs[0], "the metadata CSV is a symbolic link, not a file")
    return csvs[0]


def _npz_paths(record_dir: Path) -> list[Path]:
    """Every `*.npz` below the record folder (files, and folders or links that carry the name:
    those are inputs too, quarantined by the work); links to folders are not followed."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(record_dir, followlinks=False):
        for name in [*files, *dirs]:
            if name.lower().endswith(".npz"):
                found.append(Path(folder) / name)
        dirs[:] = [d for d in dirs if not d.lower().endswith(".npz")]
    return sorted(found, key=lambda p: p.relative_to(record_dir).as_posix())


def _rel(ctx: IngestContext, path: Path) -> str:
    """`path` as the tables name it, without following it: an input that is a link is named as
    the link (it is quarantined), never as wherever it points."""
    return f"{ctx.rel(path.parent)}/{path.name}"


def _records(ctx: IngestContext) -> list[str]:
    records = ctx.source_params.get("records") or []
    if not records:
        raise ConfigError("params.yaml: `sources.coasttrain.records` is empty")
    missing = [r for r in records if not (ctx.raw_dir / r).is_dir()]
    if missing:
        raise UpstreamFormatError(ctx.raw_dir, f"record folders {missing} not fetched (run fetch@coasttrain)")
    return sorted(set(records))


# --- metrics of what the runner kept -------------------------------------------------------------


@dataclass
class _Tally:
    """Counts filled in by `Sample.build` as the runner judges each npz; read once at the end."""

    per_record: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    unknown: Counter[str] = field(default_factory=Counter)
    classes: Counter[str] = field(default_factory=Counter)
    class_pixels: Counter[str] = field(default_factory=Counter)
    unknown_npz: int = 0
    samples: int = 0
    joined: int = 0
    without_row: int = 0

    def metrics(self, quarantine: Path) -> dict[str, Any]:
        """Once the tables are written: `quarantine` (the closed table) gives each record's npz
        quarantined per reason, including the work's verdicts, which no `Sample.build` sees."""
        reasons = _image_reasons_per_record(quarantine)
        records = {}
        for record, counts in sorted(self.per_record.items()):
            keys = ("npz", "samples", "csv_rows", "csv_rows_joined")
            row: dict[str, Any] = {k: counts[k] for k in keys}
            row["quarantined"] = dict(sorted(reasons.get(record, {}).items()))
            records[record] = dict(sorted(row.items()))
        labelled = self.samples + self.unknown_npz
        return {
            "csv_rows_joined": self.joined,
            "npz_without_csv_row": self.without_row,
            # Of the npz whose label decoded, how many had every class in the table.
            "crosswalk": {
                "mapped": self.samples,
                "total": labelled,
                "ratio": round(self.samples / labelled, 6) if labelled else 1.0,
            },
            "unknown_classes": dict(sorted(self.unknown.items())),
            "classes": dict(sorted(self.classes.items())),
            "class_pixels": dict(sorted(self.class_pixels.items())),
            "records": records,
        }


def _image_reasons_per_record(quarantine: Path) -> dict[str, dict[str, int]]:
    """record -> reason -> quarantined npz, from the written table (a pyarrow group-by)."""
    table = pq.read_table(quarantine, columns=["record_kind", "record_id", "reason"])
    table = table.filter(pc.equal(table["record_kind"], "image"))
    record = pc.list_element(pc.split_pattern(table["record_id"], "/", max_splits=1), 0)
    counts = pa.table({"record": record, "reason": table["reason"]}).group_by(["record", "reason"])
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for row in counts.aggregate([("reason", "count")]).to_pylist():
        out[row["record"]][row["reason"]] = int(row["reason_count"])
    return out


_LABEL_NAMES = (*COMMON_CLASSES, "ignore")


def _build(item: _Npz, tally: _Tally, file: str, result: WorkResult) -> dict[str, Any] | Quarantine:
    """The labels of a decoded npz (main process), or its unknown_class verdict."""
    data = result.data
    unknown = list(data.get("unknown") or [])
    if unknown:
        tally.unknown.update(unknown)
        tally.unknown_npz += 1
        return Quarantine(
            "image",
            item.upstream_id,
            file,
            "unknown_class",
            f"class {', '.join(repr(c) for c in unknown)} labels pixels but is not in "
            f"data/tables/{REMAP_TABLE.as_posix()}",
        )
    classes, present, pixels = list(data["classes"]), list(data["present"]), list(data["pixels"])
    total = max(1, sum(pixels))
    common_present = [c for c, n in zip(COMMON_CLASSES, pixels) if n > 0]
    meta = item.metadata
    tally.samples += 1
    tally.per_record[item.record]["samples"] += 1
    if meta is not None:
        tally.joined += 1
        tally.per_record[item.record]["csv_rows_joined"] += 1
    else:
        tally.without_row += 1
    tally.classes.update(common_present)
    tally.class_pixels.update(dict(zip(_LABEL_NAMES, pixels)))
    return {
        "labels": {
            "classes": list(COMMON_CLASSES),
            "ignore_index": IGNORE,
            "pixels": dict(zip(_LABEL_NAMES, pixels)),
            "fractions": {n: round(count / total, 6) for n, count in zip(_LABEL_NAMES, pixels)},
            "present": common_present,
        },
        "native_labels": {
            "record": item.record,
            "npz": item.member,
            "classes": classes,
            "classes_present": [classes[k] for k in present],
            "label_channels": data["channels"],
            "csv": meta.csv_name if meta else None,
            "geo": meta.geo if meta else None,
        },
    }


# --- the adapter ---------------------------------------------------------------------------------


def _group(items: list[_Npz]) -> tuple[_Npz | _Ambiguous, list[_Npz]]:
    """One sample id's npz files (the same name in several folders): the one to keep (the newest
    Doodler session) and the superseded ones, or _Ambiguous when the sessions cannot tell."""
    if len(items) == 1:
        return items[0], []
    times = [it.session[1] if it.session else None for it in items]
    if all(t is not None for t in times):
        newest = max(times)  # type: ignore[type-var]
        if times.count(newest) == 1:
            kept = items[times.index(newest)]
            return kept, [it for it in items if it is not kept]
    return _Ambiguous(tuple(it.member for it in items)), []


def _scan_record(
    ctx: IngestContext, record: str, report: Report, tally: _Tally, kept: list[_Npz]
) -> Iterator[Quarantine]:
    """Read one record's file list and CSV: yield the quarantine rows that need no decode, and
    append the npz to ingest (their CSV rows joined) to `kept`."""
    record_dir = ctx.raw_dir / record
    csv_path = _record_csv(record_dir)
    csv_rel = ctx.rel(csv_path)
    paths = _npz_paths(record_dir)
    if not paths:
        raise UpstreamFormatError(record_dir, "the record holds no .npz files")
    table = read_metadata_csv(csv_path)
    report.inputs["image"] += len(paths)
    report.inputs["annotation_row"] += len(table.rows)
    tally.per_record[record]["npz"] += len(paths)
    tally.per_record[record]["csv_rows"] += len(table.rows)

    by_id: dict[str, list[_Npz]] = defaultdict(list)
    for path in paths:
        member = path.relative_to(record_dir).as_posix()
        name = unicodedata.normalize("NFC", path.name)
        item = _Npz(
            record, path, member, name, sample_id_for(record, name[: -len(".npz")]), session_time(member)
        )
        by_id[item.sample_id].append(item)

    by_name: dict[str, _Npz | _Ambiguous] = {}
    for sid in sorted(by_id):
        group = by_id[sid]
        winner, superseded = _group(group)
        for it in group:
            by_name[it.name] = winner
        if isinstance(winner, _Ambiguous):
            for it in group:
                yield Quarantine("image", it.upstream_id, _rel(ctx, it.path), "bad_record", winner.detail)
            continue
        for it in superseded:
            assert it.session is not None and winner.session is not None
            yield Quarantine(
                "image",
                it.upstream_id,
                _rel(ctx, it.path),
                "superseded",
                f"an earlier Doodler session ({it.session[0]}) of {winner.upstream_id}, labelled "
                f"again in {winner.session[0]}: the newest session's label is the final one",
            )
        kept.append(winner)

    for row in table.rows:
        row_id = f"{record}/{csv_path.name}:{row.line}"
        target = by_name.get(row.key) if row.key else None
        if row.problem is not None:
            yield Quarantine("annotation_row", row_id, csv_rel, "bad_record", row.problem)
        elif not row.key:
            yield Quarantine("annotation_row", row_id, csv_rel, "bad_record", f"empty {FILE_COLUMN}")
        elif target is None:
            yield Quarantine(
                "annotation_row",
                row_id,
                csv_rel,
                "missing_image",
                f"{FILE_COLUMN} {row.cell!r}: no such npz in {record}",
            )
        elif isinstance(target, _Ambiguous):
            yield Quarantine(
                "annotation_row", row_id, csv_rel, "image_unusable", f"its npz {row.key!r}: {target.detail}"
            )
        elif target.row_id is not None:
            yield Quarantine(
                "annotation_row",
                row_id,
                csv_rel,
                "bad_record",
                f"second CSV row for {row.key!r} (first: {target.row_id})",
            )
        else:
            target.metadata, target.row_id = row.metadata, row_id


def records(ctx: IngestContext, report: Report) -> Iterator[Record]:
    remap = load_remap(ctx.tables_dir)
    degrees = _block_degrees(ctx.params)
    max_bytes = _max_npz_bytes(ctx.params)
    license_, attribution = ctx.source_params.get("license"), ctx.source_params.get("attribution")
    tally = _Tally()
    kept: list[_Npz] = []
    for record in _records(ctx):
        yield from _scan_record(ctx, record, report, tally, kept)

    # Blocks from the metadata alone, before any decode: an npz without a row takes its scene's.
    scene_blocks: dict[tuple[str, str], set[str]] = defaultdict(set)
    for it in kept:
        meta = it.metadata
        if meta is not None and meta.lat is not None and meta.lon is not None:
            scene_blocks[(it.record, scene_key(it.stem))].add(spatial_block(meta.lat, meta.lon, degrees))

    settings = {
        "max_pixels": ctx.max_pixels,
        "max_npz_bytes": max_bytes,
        "remap": remap_digest(remap, len(COMMON_CLASSES)),
    }
    remap_items = tuple(sorted(remap.items()))
    mask_dir = ctx.out_dir / "masks"
    for it in sorted(kept, key=lambda i: i.sample_id):
        meta = it.metadata
        scene = scene_key(it.stem)
        if meta is not None and meta.lat is not None and meta.lon is not None:
            block = spatial_block(meta.lat, meta.lon, degrees)
        elif scene_blocks.get((it.record, scene)):
            # min, not "most common": a fixed rule that reads only the scene's own tiles.
            block = min(scene_blocks[(it.record, scene)])
        else:
            block = schema.make_sample_id("scene", it.record, scene)
        file = _rel(ctx, it.path)
        on_unusable = []
        if it.row_id is not None:
            on_unusable.append(
                Quarantine(
                    "annotation_row",
                    it.row_id,
                    ctx.rel(ctx.raw_dir / it.record / meta.csv_name) if meta else "",
                    "image_unusable",
                    f"its npz {it.upstream_id} was quarantined (see that image's row)",
                )
            )
        mask_name = f"masks/{it.sample_id}.png"
        yield Sample(
            sample_id=it.sample_id,
            upstream_id=it.upstream_id,
            work=Work(
                fn=mask_work,
                task=MaskTask(
                    str(it.path), mask_name, ctx.max_pixels, max_bytes, remap_items, len(COMMON_CLASSES)
                ),
                namespace=NAMESPACE,
                code=mask_code(),
                settings=settings,
            ),
            columns={
                "image_path": file,
                "session": f"{it.record}/{scene}",
                "spatial_block": block,
                "captured_at": meta.captured_at if meta else None,
                "lat": meta.lat if meta else None,
                "lon": meta.lon if meta else None,
                "license": license_,
                "attribution": attribution,
                "mask_path": ctx.out_rel(mask_dir / f"{it.sample_id}.png"),
            },
            file=file,
            on_unusable=on_unusable,
            consumes=("annotation_row",) if it.row_id is not None else (),
            build=partial(_build, it, tally, file),
        )
    report.extra["block_degrees"] = degrees
    quarantine = ctx.out_dir / "quarantine.parquet"
    report.on_finish.append(lambda: report.extra.update(tally.metrics(quarantine)))
