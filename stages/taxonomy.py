"""`python -m stages.taxonomy [--out data/taxonomy]`: snapshot the MERMAID taxonomy API.

Reads every page of `benthicattributes/` and `classification/labelmappings/` (following `next`
with `?limit=<taxonomy.page_limit>`) and the `growthforms` entry of `choices/`, checks that each
record has the fields the crosswalk needs, and writes canonical JSON arrays:
`benthicattributes.json` and `growthforms.json` sorted by id, `labelmappings.json` sorted by
(provider, provider_id, id). `taxonomy.snapshot` in params.yaml is what DVC watches: bump it to
take a new snapshot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from stages.cli import run_main
from stages.config import load_params, require
from stages.errors import UpstreamFormatError
from stages.fsutil import write_json
from stages.net import NetSettings
from stages.net.http import HttpClient

BENTHIC_ATTRIBUTES = "benthicattributes/"
LABEL_MAPPINGS = "classification/labelmappings/"
CHOICES = "choices/"

# Keys every record must carry (values may be null where noted in SOURCES §3).
ATTRIBUTE_FIELDS = ("id", "name", "parent")
ATTRIBUTE_NOT_NULL = ("id", "name")
MAPPING_FIELDS = (
    "id",
    "benthic_attribute_id",
    "benthic_attribute_name",
    "growth_form_id",
    "growth_form_name",
    "provider",
    "provider_id",
    "provider_label",
)
MAPPING_NOT_NULL = ("id", "provider", "provider_id")
GROWTH_FORM_FIELDS = ("id", "name")


def _with_limit(url: str, limit: int) -> str:
    parts = urlsplit(url)
    query = "&".join(p for p in (parts.query, urlencode({"limit": limit})) if p)
    return urlunsplit(parts._replace(query=query))


def fetch_all_pages(http: HttpClient, url: str, limit: int) -> list[dict[str, Any]]:
    """Every result of a LimitOffset-paginated endpoint, each id once.

    Rows that shift between pages while the API is paged show up twice; identical repeats are
    dropped, a repeat with different content is an inconsistent snapshot and an error.
    """
    results: dict[Any, dict[str, Any]] = {}
    order: list[Any] = []
    seen_pages: set[str] = set()
    page_url: str | None = _with_limit(url, limit)
    count: int | None = None
    while page_url:
        if page_url in seen_pages:
            raise UpstreamFormatError(url, f"pagination loops back to {page_url}")
        seen_pages.add(page_url)
        page = http.get_json(page_url)
        if not isinstance(page, dict) or not isinstance(page.get("results"), list):
            raise UpstreamFormatError(
                page_url, 'expected a page {"count", "next", "previous", "results": [...]}'
            )
        if isinstance(page.get("count"), int):
            count = page["count"]
        for i, item in enumerate(page["results"]):
            if not isinstance(item, dict) or "id" not in item:
                raise UpstreamFormatError(page_url, f"results[{i}] is not an object with an `id`")
            key = item["id"]
            if key in results:
                if results[key] != item:
                    raise UpstreamFormatError(page_url, f"id {key!r} appears twice with different content")
                continue
            results[key] = item
            order.append(key)
        next_url = page.get("next")
        if next_url is not None and not isinstance(next_url, str):
            raise UpstreamFormatError(page_url, "`next` is not a URL")
        page_url = next_url or None
    if count is not None and count != len(results):
        raise UpstreamFormatError(
            url, f"the API reports count={count} but its pages held {len(results)} records"
        )
    return [results[k] for k in order]


def validate(
    records: list[dict[str, Any]], url: str, fields: tuple[str, ...], not_null: tuple[str, ...]
) -> None:
    """Every record has `fields`, and `not_null` ones have values; else name the URL and the gap."""
    for record in records:
        absent = [f for f in fields if f not in record]
        nulls = [f for f in not_null if f in record and record[f] in (None, "")]
        if absent or nulls:
            problem = []
            if absent:
                problem.append(f"missing field(s) {', '.join(absent)}")
            if nulls:
                problem.append(f"empty field(s) {', '.join(nulls)}")
            raise UpstreamFormatError(url, f"record id={record.get('id')!r}: {'; '.join(problem)}")


def growth_forms_from_choices(choices: Any, url: str) -> list[dict[str, Any]]:
    """The `growthforms` entry of `choices/` (a list of {"name", "data"})."""
    entries = choices.get("results") if isinstance(choices, dict) else choices
    if not isinstance(entries, list):
        raise UpstreamFormatError(url, 'expected a list of {"name", "data"} choice sets')
    for entry in entries:
        if isinstance(entry, dict) and entry.get("name") == "growthforms":
            data = entry.get("data")
            if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
                raise UpstreamFormatError(url, "`growthforms` has no `data` list of objects")
            return data
    raise UpstreamFormatError(url, "no choice set named `growthforms`")


def _sort_key(value: Any) -> tuple[int, str]:
    # Ids are uuids in practice; sort numbers and strings without comparing across types.
    return (0, f"{value:020d}") if isinstance(value, int) else (1, str(value))


def snapshot(params: dict[str, Any], out_dir: str | Path) -> dict[str, int]:
    """Fetch the three taxonomy tables and write them under `out_dir`; returns record counts."""
    api = str(require(params, "endpoints.mermaid_api"))
    if not api.endswith("/"):
        api += "/"
    limit = int((params.get("taxonomy") or {}).get("page_limit", 5000))
    out_dir = Path(out_dir)
    with HttpClient(NetSettings.from_params(params)) as http:
        attributes_url = api + BENTHIC_ATTRIBUTES
        attributes = fetch_all_pages(http, attributes_url, limit)
        validate(attributes, attributes_url, ATTRIBUTE_FIELDS, ATTRIBUTE_NOT_NULL)

        mappings_url = api + LABEL_MAPPINGS
        mappings = fetch_all_pages(http, mappings_url, limit)
        validate(mappings, mappings_url, MAPPING_FIELDS, MAPPING_NOT_NULL)

        choices_url = api + CHOICES
        growth_forms = growth_forms_from_choices(http.get_json(choices_url), choices_url)
        validate(growth_forms, choices_url + " (growthforms)", GROWTH_FORM_FIELDS, GROWTH_FORM_FIELDS)

    attributes.sort(key=lambda r: _sort_key(r["id"]))
    growth_forms.sort(key=lambda r: _sort_key(r["id"]))
    mappings.sort(key=lambda r: (str(r["provider"]), _sort_key(r["provider_id"]), _sort_key(r["id"])))
    write_json(out_dir / "benthicattributes.json", attributes)
    write_json(out_dir / "growthforms.json", growth_forms)
    write_json(out_dir / "labelmappings.json", mappings)
    return {
        "benthicattributes": len(attributes),
        "growthforms": len(growth_forms),
        "labelmappings": len(mappings),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.taxonomy", description=__doc__)
    parser.add_argument("--params", type=Path, default=None, help="params.yaml (default: the repo's)")
    parser.add_argument("--out", type=Path, default=Path("data/taxonomy"))
    args = parser.parse_args(argv)
    counts = snapshot(load_params(args.params), args.out)
    print(
        "taxonomy: " + ", ".join(f"{n} {name}" for name, n in counts.items()) + f" written to {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    run_main(main)
