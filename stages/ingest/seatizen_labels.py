"""The hand-written Seatizen tables under data/tables/seatizen/, resolved against the taxonomy.

- `crosswalk.csv`: every Seatizen class (the Atlas's current names) -> the MERMAID label space.
- `old_new_labels.csv`: the authors' own table (SeatizenDOI/zenodo-tools
  `matching_between_old_new_label_multilabel.csv`, byte for byte): `label` (current name),
  `old_label` (the pre-2024 name their training CSVs use), GCRMN code, GBIF URL. A class column
  the crosswalk does not list is looked up here by its old name.
- `raster_classes.csv`: the colours of the-point-is-the-mask's raster masks -> Seatizen classes.

`Crosswalk.labels` turns one image's values into the `labels` JSON; `Crosswalk.soft` the soft
(probability) view of the same targets. See docs/ingest.md, section Seatizen Atlas.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.errors import UpstreamFormatError
from stages.taxonomy_index import TOP_LEVEL_CATEGORIES, Taxonomy

CROSSWALK = Path("seatizen") / "crosswalk.csv"
RENAMES = Path("seatizen") / "old_new_labels.csv"
RASTER_CLASSES = Path("seatizen") / "raster_classes.csv"
CROSSWALK_COLUMNS = ("seatizen_class", "kind", "mermaid_target", "growth_form", "note")
RENAME_COLUMNS = ("label", "old_label")
RASTER_COLUMNS = ("red", "green", "blue", "name", "seatizen_class")
BENTHIC_KINDS = ("benthic attribute", "top-level category", "unmapped")
KINDS = (*BENTHIC_KINDS, "non_benthic", "image_quality")


def combine(values: Sequence[int]) -> int:
    """Presence of one target from its classes: 1 if any is 1, else -1 if any is -1, else 0."""
    if 1 in values:
        return 1
    if -1 in values:
        return -1
    return 0


def combine_soft(values: Sequence[float]) -> float | None:
    """Probability that one target is present, from its classes' probabilities (-1 = not
    annotated): the largest, a lower bound on P(any of them); None when none is annotated."""
    known = [v for v in values if v != -1]
    return max(known) if known else None


def _read_table(path: Path, columns: tuple[str, ...], what: str) -> list[tuple[int, dict[str, str]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UpstreamFormatError(path, f"{what} missing") from None
    except UnicodeDecodeError as exc:
        raise UpstreamFormatError(path, f"not UTF-8 text: {exc}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise UpstreamFormatError(
            path, f"expected columns {', '.join(columns)}; missing {', '.join(missing)}"
        )
    return [(line, {k: (v or "").strip() for k, v in rec.items() if k}) for line, rec in enumerate(reader, 2)]


# --- the crosswalk ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A point in the MERMAID label space: attribute (maybe a top-level root) and growth form."""

    attribute_id: str
    attribute_name: str
    growth_form_id: str | None
    growth_form_name: str | None
    top_level: str


@dataclass(frozen=True)
class CrosswalkRow:
    seatizen_class: str
    kind: str
    target: Target | None
    note: str


@dataclass(frozen=True)
class _Plan:
    gf: list[Target]  # attribute_growth_form entries, in output order
    attrs: list[tuple[str, str, str]]  # (name, id, top level) of attribute entries, in output order
    tops: list[str]
    slots: list[tuple[str, int, int, int]]  # per class: kind, index in gf, attrs, tops (-1: none)


class Crosswalk:
    """data/tables/seatizen/crosswalk.csv resolved against the taxonomy snapshot, plus the old names."""

    def __init__(
        self, rows: dict[str, CrosswalkRow], path: Path, renames: dict[str, str], renames_path: Path
    ):
        self.rows = rows
        self.path = path
        self.renames = renames  # old name -> current name, only where they differ
        self.renames_path = renames_path
        self._plans: dict[tuple[str, ...], _Plan] = {}

    @classmethod
    def load(cls, tables_dir: Path, taxonomy: Taxonomy) -> Crosswalk:
        """Read and resolve both tables; UpstreamFormatError naming the table for anything off."""
        path = tables_dir / CROSSWALK
        gf_by_name = {name.casefold(): (gid, name) for gid, name in taxonomy.growth_forms.items()}
        rows: dict[str, CrosswalkRow] = {}
        for line, rec in _read_table(path, CROSSWALK_COLUMNS, "crosswalk table"):
            name, kind = rec["seatizen_class"], rec["kind"]
            target_name, gf_name = rec["mermaid_target"], rec["growth_form"]
            where = f"line {line} ({name or 'no class'})"
            if not name:
                raise UpstreamFormatError(path, f"{where}: empty seatizen_class")
            if name in rows:
                raise UpstreamFormatError(path, f"{where}: class listed twice")
            if kind not in KINDS:
                raise UpstreamFormatError(path, f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
            target = None
            if kind in ("benthic attribute", "top-level category"):
                if not target_name:
                    raise UpstreamFormatError(path, f"{where}: kind {kind!r} needs a mermaid_target")
                target = _resolve(taxonomy, path, where, kind, target_name, gf_name, gf_by_name)
            elif target_name or gf_name:
                raise UpstreamFormatError(path, f"{where}: kind {kind!r} takes no mermaid_target/growth_form")
            rows[name] = CrosswalkRow(name, kind, target, rec.get("note", ""))

        renames_path = tables_dir / RENAMES
        renames: dict[str, str] = {}
        for line, rec in _read_table(renames_path, RENAME_COLUMNS, "old/new label table"):
            new, old = rec["label"], rec["old_label"]
            if not new or not old:
                raise UpstreamFormatError(renames_path, f"line {line}: empty label or old_label")
            if new not in rows:
                raise UpstreamFormatError(
                    renames_path, f"line {line}: label {new!r} is not in the crosswalk table {path}"
                )
            if old != new:
                if renames.get(old, new) != new:
                    raise UpstreamFormatError(
                        renames_path, f"line {line}: old label {old!r} maps to {renames[old]!r} and {new!r}"
                    )
                renames[old] = new
        clash = sorted(set(renames) & set(rows))
        if clash:
            # An old name that is also a current class would be read two ways.
            raise UpstreamFormatError(renames_path, f"old labels {clash} are also classes of {path}")
        return cls(rows, path, renames, renames_path)

    def resolve(self, column: str) -> str | None:
        """The crosswalk class of an upstream class column: itself, its current name, or None."""
        if column in self.rows:
            return column
        return self.renames.get(column)

    def _plan(self, classes: tuple[str, ...]) -> _Plan:
        """Where each class's value goes, worked out once per class list (every row shares it)."""
        plan = self._plans.get(classes)
        if plan is not None:
            return plan
        targets = {self.rows[c].target for c in classes} - {None}
        gf = sorted(targets, key=lambda t: (t.attribute_name, t.growth_form_name or "", t.attribute_id))
        attrs = sorted({(t.attribute_name, t.attribute_id, t.top_level) for t in targets})
        tops = sorted({t.top_level for t in targets})
        slots = []
        for c in classes:
            t = self.rows[c].target
            if t is None:
                slots.append((self.rows[c].kind, -1, -1, -1))
            else:
                key = (t.attribute_name, t.attribute_id, t.top_level)
                slots.append((self.rows[c].kind, gf.index(t), attrs.index(key), tops.index(t.top_level)))
        plan = _Plan(gf, attrs, tops, slots)
        self._plans[classes] = plan
        return plan

    def _group(
        self, classes: tuple[str, ...], values: Sequence[Any]
    ) -> tuple[
        _Plan, list[list[Any]], list[list[Any]], list[list[Any]], dict[str, list[Any]], dict[str, list[Any]]
    ]:
        plan = self._plan(classes)
        by_gf: list[list[Any]] = [[] for _ in plan.gf]
        by_attr: list[list[Any]] = [[] for _ in plan.attrs]
        by_top: list[list[Any]] = [[] for _ in plan.tops]
        non_benthic: dict[str, list[Any]] = {}
        quality: dict[str, list[Any]] = {}
        for cls, value, (kind, gi, ai, ti) in zip(classes, values, plan.slots):
            if kind == "non_benthic":
                non_benthic.setdefault(cls, []).append(value)
            elif kind == "image_quality":
                quality.setdefault(cls, []).append(value)
            elif gi >= 0:
                by_gf[gi].append(value)
                by_attr[ai].append(value)
                by_top[ti].append(value)
        return plan, by_gf, by_attr, by_top, non_benthic, quality

    def _vectors(
        self, classes: tuple[str, ...], values: Sequence[Any], fn: Callable, key: str
    ) -> dict[str, Any]:
        plan, by_gf, by_attr, by_top, non_benthic, quality = self._group(classes, values)
        return {
            "attribute": [
                {"id": aid, "name": name, "top_level": top, key: fn(v)}
                for (name, aid, top), v in zip(plan.attrs, by_attr)
            ],
            "attribute_growth_form": [
                {
                    "id": t.attribute_id,
                    "name": t.attribute_name,
                    "growth_form_id": t.growth_form_id,
                    "growth_form_name": t.growth_form_name,
                    "top_level": t.top_level,
                    key: fn(v),
                }
                for t, v in zip(plan.gf, by_gf)
            ],
            "top_level": {k: fn(v) for k, v in zip(plan.tops, by_top)},
            "non_benthic": {k: fn(v) for k, v in sorted(non_benthic.items())},
            "image_quality": {k: fn(v) for k, v in sorted(quality.items())},
        }

    def labels(self, classes: tuple[str, ...], values: Sequence[int]) -> dict[str, Any]:
        """The `labels` JSON of one image from its 1/0/-1 values, one per crosswalk class in
        `classes` (a class may repeat when an old and a current column both name it)."""
        out = self._vectors(classes, values, combine, "value")
        present = mapped = 0
        for cls, value in zip(classes, values):
            row = self.rows[cls]
            if row.kind in BENTHIC_KINDS and value == 1:
                present += 1
                mapped += row.target is not None
        out["coverage"] = {
            "present": present,
            "mapped": mapped,
            "ratio": mapped / present if present else None,
        }
        return out

    def soft(self, classes: tuple[str, ...], probabilities: Sequence[float]) -> dict[str, Any]:
        """The same targets as `labels`, each with the probability `combine_soft` gives it."""
        return self._vectors(classes, probabilities, combine_soft, "p")

    def coverage(self, classes: list[str]) -> dict[str, Any]:
        """Crosswalk coverage over the benthic classes among `classes`: mapped / total."""
        benthic = [c for c in classes if self.rows[c].kind in BENTHIC_KINDS]
        mapped = sum(self.rows[c].target is not None for c in benthic)
        return {"mapped": mapped, "total": len(benthic), "ratio": mapped / len(benthic) if benthic else None}

    def describe(self, cls: str) -> dict[str, Any]:
        row = self.rows[cls]
        t = row.target
        return {
            "kind": row.kind,
            "mermaid_attribute_id": t.attribute_id if t else None,
            "mermaid_attribute": t.attribute_name if t else None,
            "growth_form": t.growth_form_name if t else None,
            "top_level": t.top_level if t else None,
        }


def _resolve(
    taxonomy: Taxonomy,
    path: Path,
    where: str,
    kind: str,
    target_name: str,
    gf_name: str,
    gf_by_name: dict[str, tuple[str, str]],
) -> Target:
    ids = taxonomy.attribute_ids_named(target_name)
    if not ids:
        raise UpstreamFormatError(
            path, f"{where}: mermaid_target {target_name!r} is not in the taxonomy snapshot {taxonomy.where}"
        )
    if len(ids) > 1:
        raise UpstreamFormatError(
            path,
            f"{where}: mermaid_target {target_name!r} names {len(ids)} attributes ({', '.join(sorted(ids))})",
        )
    attr = taxonomy.attributes[ids[0]]
    if kind == "top-level category" and (target_name not in TOP_LEVEL_CATEGORIES or attr.get("parent")):
        raise UpstreamFormatError(
            path, f"{where}: {target_name!r} is not a top-level category ({', '.join(TOP_LEVEL_CATEGORIES)})"
        )
    gf_id = gf_label = None
    if gf_name:
        if gf_name.casefold() not in gf_by_name:
            raise UpstreamFormatError(
                path, f"{where}: growth_form {gf_name!r} is not in the taxonomy snapshot {taxonomy.where}"
            )
        gf_id, gf_label = gf_by_name[gf_name.casefold()]
    return Target(ids[0], attr["name"], gf_id, gf_label, taxonomy.top_level(ids[0]))


# --- raster mask colours ----------------------------------------------------------------------


@dataclass(frozen=True)
class RasterClasses:
    """raster_classes.csv: an (R, G, B) colour of a mask's colour table -> a Seatizen class."""

    by_colour: dict[tuple[int, int, int], tuple[str, str]]  # colour -> (upstream name, class)
    path: Path

    @classmethod
    def load(cls, tables_dir: Path, crosswalk: Crosswalk) -> RasterClasses:
        path = tables_dir / RASTER_CLASSES
        out: dict[tuple[int, int, int], tuple[str, str]] = {}
        for line, rec in _read_table(path, RASTER_COLUMNS, "raster class table"):
            try:
                colour = tuple(int(rec[c]) for c in ("red", "green", "blue"))
            except ValueError:
                raise UpstreamFormatError(path, f"line {line}: red/green/blue are not integers") from None
            if not all(0 <= v <= 255 for v in colour):
                raise UpstreamFormatError(path, f"line {line}: colour {colour} is outside 0..255")
            resolved = crosswalk.resolve(rec["seatizen_class"])
            if resolved is None:
                raise UpstreamFormatError(
                    path, f"line {line}: seatizen_class {rec['seatizen_class']!r} is not in {crosswalk.path}"
                )
            if colour in out:
                raise UpstreamFormatError(path, f"line {line}: colour {colour} listed twice")
            out[colour] = (rec["name"], resolved)  # type: ignore[index]
        return cls(out, path)
