"""Typed Hugging Face `dataset_info.features` for a product, derived from the samples pack wrote.

HF's WebDataset builder infers a schema from the first five samples of the first shard when the card
declares none: a json field that is null in those five becomes type `null` and the first sample that
carries a value fails the load, and a member absent from them (reef-images' optional `seg.png`) is
missing from the schema. So the card declares the schema, inferred from *every* sample's json member:

- a field whose non-null values are all of one JSON type gets that type (`int64`, `float64`, `bool`,
  `string`); ints mixed with floats are `float64`; nulls are allowed everywhere;
- lists get the merged type of all their items; objects become structs of the union of their keys
  (a key a sample lacks loads as None);
- an object used as a map (keys that are data, such as attribute uuids or class names with spaces,
  or more than `MAX_STRUCT_KEYS` keys), a field with conflicting types, and a field that is null in
  every sample are declared `json` (HF's `Json` feature: the value loads exactly as written).

Every key of every sample is in the schema, so nothing a sample carries is dropped by the loader.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

MAX_STRUCT_KEYS = 64
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
INT64 = (-(2**63), 2**63 - 1)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class TypeNode:
    """What the values seen at one place of the json documents were."""

    kinds: set[str] = field(default_factory=set)  # null, bool, int, float, str, list, dict, big
    keys: dict[str, TypeNode] = field(default_factory=dict)
    item: TypeNode | None = None
    is_map: bool = False  # an object whose keys are data: declared json, children not tracked

    def add(self, value: Any) -> None:
        if value is None:
            self.kinds.add("null")
        elif isinstance(value, bool):
            self.kinds.add("bool")
        elif isinstance(value, int):
            self.kinds.add("int" if INT64[0] <= value <= INT64[1] else "big")
        elif isinstance(value, float):
            self.kinds.add("float")
        elif isinstance(value, str):
            self.kinds.add("str")
        elif isinstance(value, list):
            self.kinds.add("list")
            if self.item is None:
                self.item = TypeNode()
            for item in value:
                self.item.add(item)
        elif isinstance(value, dict):
            self.kinds.add("dict")
            if self.is_map:
                return
            if (
                any(not IDENTIFIER.match(k) for k in value)
                or len(self.keys.keys() | value.keys()) > MAX_STRUCT_KEYS
            ):
                self.is_map, self.keys = True, {}
                return
            for key, item in value.items():
                self.keys.setdefault(key, TypeNode()).add(item)
        else:  # json.loads gives nothing else; a foreign object is opaque
            self.kinds.add("big")


SCALARS = {"bool": "bool", "int": "int64", "float": "float64", "str": "string"}


def feature(node: TypeNode) -> dict[str, Any]:
    """The HF YAML form of one feature, without its name: {"dtype": ...}, {"struct": [...]} or
    {"list": ...}."""
    kinds = node.kinds - {"null"}
    if kinds == {"int", "float"}:
        return {"dtype": "float64"}
    if len(kinds) != 1:
        return {"dtype": "json"}  # never seen with a value, or several JSON types: loads as written
    (kind,) = kinds
    if kind in SCALARS:
        return {"dtype": SCALARS[kind]}
    if kind == "list":
        item = node.item
        return {"list": _unnamed(feature(item)) if item is not None and item.kinds else "json"}
    if kind == "dict" and not node.is_map and node.keys:
        return {"struct": [{"name": k, **feature(v)} for k, v in sorted(node.keys.items())]}
    return {"dtype": "json"}


def _unnamed(spec: dict[str, Any]) -> Any:
    """A list's item in HF YAML: a bare dtype string, a list of named fields, or a nested {"list": ...}."""
    if "dtype" in spec:
        return spec["dtype"]
    if "struct" in spec:
        return spec["struct"]
    return spec


def member_features(members: list[str], json_types: TypeNode | None) -> list[dict[str, Any]]:
    """`dataset_info.features` for samples with these member extensions, in HF's WebDataset naming
    (a field per extension, then `__key__` and `__url__`)."""
    out: list[dict[str, Any]] = []
    for ext in members:
        last = ext.rsplit(".", 1)[-1]
        if last in IMAGE_EXTS:
            out.append({"name": ext, "dtype": "image"})
        elif ext in ("cls", "cls2", "index", "inx", "id"):
            out.append({"name": ext, "dtype": "int64"})
        elif ext == "json":
            out.append(
                {"name": ext, **(feature(json_types) if json_types is not None else {"dtype": "json"})}
            )
        elif ext in ("txt", "text"):
            out.append({"name": ext, "dtype": "string"})
        else:
            out.append({"name": ext, "dtype": "binary"})
    out += [{"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}]
    return out


def json_fields(node: TypeNode | None, prefix: str = "", depth: int = 2) -> list[tuple[str, str]]:
    """(dotted path, type) of the json member's fields down to `depth` levels, for the card's Fields table."""
    if node is None:
        return []
    out = []
    for key, child in sorted(node.keys.items()):
        path = f"{prefix}{key}"
        spec = feature(child)
        out.append((path, describe(spec)))
        if "struct" in spec and depth > 1:
            out += json_fields(child, path + ".", depth - 1)
    return out


def describe(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    if "dtype" in spec:
        return str(spec["dtype"])
    if "struct" in spec:
        return "struct"
    if isinstance(spec, list):
        return "struct"
    return f"list of {describe(spec['list'])}"
