"""Label helpers every source adapter and the ingest runner share: canonical label JSON, class
counts and the point-cover labels of point-annotated images."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from stages.fsutil import write_json

# The csv module's default field limit (128 KiB). Its limit is process-wide state that another
# reader may raise, so every CSV reader of ingest checks cell lengths against this constant itself.
CSV_FIELD_LIMIT = 131072


def long_field(fields: list[str]) -> str | None:
    """The error for a record holding a cell over CSV_FIELD_LIMIT characters, else None."""
    longest = max((len(f) for f in fields), default=0)
    if longest > CSV_FIELD_LIMIT:
        return f"field larger than field limit ({CSV_FIELD_LIMIT}): a cell of {longest} characters"
    return None


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    write_json(path, metrics)


def dumps_labels(obj: Any) -> str:
    """Compact canonical JSON for the label columns (sorted keys: equal labels, equal bytes).

    Strict: NaN or Infinity raise ValueError, so no reader downstream ever meets a non-JSON number.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def class_counts(values: Iterable[str | None]) -> dict[str, int]:
    counts = Counter(v for v in values if v is not None)
    return dict(sorted(counts.items()))


def _growth_key(item: tuple[tuple[str | None, str | None], int]) -> tuple[bool, str, str]:
    (gf_id, gf_name), _count = item
    return (gf_id is not None, gf_id or "", gf_name or "")


def point_cover_labels(points: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The `labels` JSON of a point-annotated image (MERMAID, CoralNet): point cover per class.

    `points` are the image's kept points, each with `benthic_attribute_id`, `benthic_attribute_name`,
    `growth_form_id`, `growth_form_name` and `top_level_category`. Cover = count / n_points, so the
    pack stage builds reef-images labels (presence, cover fractions) from this alone:

        {"n_points": n,
         "benthic_attributes": {attr_id: {"name", "top_level_category", "count", "cover",
                                          "growth_forms": [{"id", "name", "count"}, ...]}},
         "top_level_categories": {name: {"count", "cover"}}}

    Growth forms are listed by id (null first); an image with no kept point has n_points 0 and
    empty maps.
    """
    attrs: dict[str, dict[str, Any]] = {}
    growth: dict[str, Counter[tuple[str | None, str | None]]] = {}
    tops: Counter[str] = Counter()
    n = 0
    for p in points:
        n += 1
        attr_id = p["benthic_attribute_id"]
        entry = attrs.setdefault(
            attr_id,
            {"name": p["benthic_attribute_name"], "top_level_category": p["top_level_category"], "count": 0},
        )
        entry["count"] += 1
        growth.setdefault(attr_id, Counter())[(p.get("growth_form_id"), p.get("growth_form_name"))] += 1
        tops[p["top_level_category"]] += 1
    for attr_id, entry in attrs.items():
        entry["cover"] = entry["count"] / n
        entry["growth_forms"] = [
            {"id": gf_id, "name": gf_name, "count": count}
            for (gf_id, gf_name), count in sorted(growth[attr_id].items(), key=_growth_key)
        ]
    return {
        "n_points": n,
        "benthic_attributes": dict(sorted(attrs.items())),
        "top_level_categories": {name: {"count": c, "cover": c / n} for name, c in sorted(tops.items())},
    }
