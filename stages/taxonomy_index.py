"""Lookups over the MERMAID taxonomy snapshot (data/taxonomy/): the project's label space.

Adapters crosswalk native labels into benthic attributes through this one index, so the
top-level category of an attribute, the growth-form names and the provider mappings are
resolved the same way for every source.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.errors import UpstreamFormatError

TOP_LEVEL_CATEGORIES = (
    "Bare substrate",
    "Crustose coralline algae",
    "Cyanobacteria",
    "Hard coral",
    "Macroalgae",
    "Other",
    "Other invertebrates",
    "Rubble",
    "Sand",
    "Seagrass",
    "Soft coral",
    "Turf algae",
)


@dataclass(frozen=True)
class Mapping:
    """One provider label's target in the MERMAID taxonomy."""

    benthic_attribute_id: str
    benthic_attribute_name: str
    growth_form_id: str | None
    growth_form_name: str | None
    # The labelmapping row's own id, for rules that pick among several targets (lowest id wins).
    # Not part of equality: two rows with the same target are one target, whatever their ids.
    mapping_id: str | None = field(default=None, compare=False)


def mapping_id_key(mapping_id: str | None) -> tuple[int, int, str]:
    """Sort key for labelmapping ids: numeric ids numerically, anything else (uuids) as text."""
    if mapping_id is None:
        return (2, 0, "")
    if mapping_id.isdigit():
        return (0, int(mapping_id), mapping_id)
    return (1, 0, mapping_id)


def _load(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UpstreamFormatError(path, "taxonomy snapshot missing: run the `taxonomy` stage") from exc
    except json.JSONDecodeError as exc:
        raise UpstreamFormatError(path, f"not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise UpstreamFormatError(path, "expected a JSON array")
    return data


class Taxonomy:
    """Attributes by id, their top-level category, growth forms, and provider label mappings."""

    def __init__(
        self,
        attributes: list[dict[str, Any]],
        growth_forms: list[dict[str, Any]],
        mappings: list[dict[str, Any]],
        where: str = "taxonomy",
    ) -> None:
        self.where = where
        self.attributes: dict[str, dict[str, Any]] = {a["id"]: a for a in attributes}
        self.growth_forms: dict[str, str] = {g["id"]: g["name"] for g in growth_forms}
        self._by_name: dict[str, list[str]] = {}
        for a in attributes:
            self._by_name.setdefault(a["name"].casefold(), []).append(a["id"])
        self._top: dict[str, str] = {}
        self._mappings: dict[tuple[str, str], list[Mapping]] = {}
        for m in mappings:
            key = (str(m["provider"]), str(m["provider_id"]))
            targets = self._mappings.setdefault(key, [])
            if m.get("benthic_attribute_id") is None:
                continue  # an explicit "no mapping" row: the label stays unmapped
            attr_id = m["benthic_attribute_id"]
            target = Mapping(
                attr_id,
                m.get("benthic_attribute_name") or self.attributes.get(attr_id, {}).get("name"),
                m.get("growth_form_id"),
                m.get("growth_form_name"),
                None if m.get("id") is None else str(m["id"]),
            )
            if target not in targets:
                targets.append(target)
            elif target.mapping_id is not None:
                # Same target twice: keep the lowest mapping id, whatever the snapshot's row order.
                k = targets.index(target)
                if targets[k].mapping_id is None or mapping_id_key(target.mapping_id) < mapping_id_key(
                    targets[k].mapping_id
                ):
                    targets[k] = target

    @classmethod
    def load(cls, directory: str | Path) -> Taxonomy:
        d = Path(directory)
        return cls(
            _load(d / "benthicattributes.json"),
            _load(d / "growthforms.json"),
            _load(d / "labelmappings.json"),
            where=str(d),
        )

    def top_level(self, attribute_id: str) -> str:
        """The top-level category name of an attribute, through the parent chain."""
        if attribute_id in self._top:
            return self._top[attribute_id]
        seen: list[str] = []
        node = self.attributes.get(attribute_id)
        if node is None:
            raise KeyError(attribute_id)
        while node.get("parent"):
            if node["id"] in seen:
                raise UpstreamFormatError(self.where, f"benthic attribute parent cycle at {node['id']}")
            seen.append(node["id"])
            parent = self.attributes.get(node["parent"])
            if parent is None:
                raise UpstreamFormatError(
                    self.where,
                    f"attribute {node['id']} has parent {node['parent']} that is not in the snapshot",
                )
            node = parent
        name = node["name"]
        if name not in TOP_LEVEL_CATEGORIES:
            raise UpstreamFormatError(
                self.where,
                f"attribute {attribute_id} roots at {name!r}, not one of the 12 top-level categories",
            )
        for a in (attribute_id, *seen):
            self._top[a] = name
        return name

    def attribute_ids_named(self, name: str) -> list[str]:
        """Attribute ids whose name matches `name` (case-insensitive)."""
        return list(self._by_name.get(name.casefold(), []))

    def mappings(self, provider: str, provider_id: str) -> list[Mapping]:
        """Distinct targets of one provider label; [] when unmapped, several when ambiguous."""
        return list(self._mappings.get((provider, str(provider_id)), []))

    def provider_ids(self, provider: str) -> list[str]:
        return sorted(pid for prov, pid in self._mappings if prov == provider)
