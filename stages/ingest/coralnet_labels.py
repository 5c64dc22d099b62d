"""A CoralNet export's labels: its labelset (short code -> global Label ID) and the crosswalk of
Label IDs into the MERMAID taxonomy.

**Which labelset.** The export's labelset is the one CSV at the top of its folder, other than
`annotations.csv`, whose header has `Label ID` and `Short Code` (`stages.coralnet_format`): its
name does not matter (`labelset.csv`, `label_set.csv`, `MIR_CoralNet_Labelset.csv`), nor do other
columns (`Name`, a pandas index column with an empty header). None: the export has no labelset,
and a row that gives only a code cannot be resolved (`unmapped_label`). Several: refused, unless
the export's params entry names one (`labelset: <file>`). A file named `labelset.csv` or
`label_set.csv` without those two columns is a reshaped labelset and refused.

**Codes.** A code is looked up as written (NFC, surrounding spaces dropped), then case-insensitively
when only one code of the labelset folds to it. A code that names several Label IDs is unmapped.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from stages.coralnet_format import is_labelset_header, norm, read_header
from stages.errors import UpstreamFormatError
from stages.ingest.coralnet_csv import CsvFile
from stages.taxonomy_index import Mapping, Taxonomy, mapping_id_key

PROVIDER = "CoralNet"
LABELSET_NAMES = ("labelset.csv", "label_set.csv")
POLICIES = ("quarantine", "lowest_mapping_id")
LOWEST_RULE = "several mappings: take the one whose labelmapping id sorts lowest (numeric ids numerically)"


def _code(text: str) -> str:
    return unicodedata.normalize("NFC", text.strip())


@dataclass
class Labelset:
    path: Path | None  # None: the export has none
    ids: dict[str, str] = field(default_factory=dict)  # code -> Label ID (codes naming one id)
    folded: dict[str, str | None] = field(default_factory=dict)  # casefold(code) -> id, None if several
    ambiguous: set[str] = field(default_factory=set)  # codes naming several Label IDs
    codes: dict[str, str] = field(default_factory=dict)  # Label ID -> its first code
    rows: int = 0
    skipped_rows: int = 0  # rows without a Label ID or a code

    def resolve(self, code: str) -> tuple[str | None, str]:
        """(Label ID, "") or (None, why it cannot be resolved)."""
        code = _code(code)
        name = self.path.name if self.path is not None else ""
        if code in self.ids:
            return self.ids[code], ""
        if code in self.ambiguous:
            return None, f"names several Label IDs in {name}"
        folded = self.folded.get(code.casefold(), "")
        if folded:
            return folded, ""
        if self.path is None:
            return None, "cannot be resolved: the export has no labelset"
        return None, f"is not in {name}"


def find_labelset(folder: Path, named: str | None) -> Path | None:
    """The export's labelset CSV (see the module docstring), or None."""
    if named:
        path = folder / named
        if not path.is_file():
            raise UpstreamFormatError(
                path, "missing: sources.coralnet.exports names it as this export's labelset"
            )
        return path
    candidates = []
    for path in sorted(folder.glob("*")):
        if not path.is_file() or path.suffix.lower() != ".csv" or path.name == "annotations.csv":
            continue
        if is_labelset_header(read_header(path)):
            candidates.append(path)
        elif path.name.lower() in LABELSET_NAMES:
            found = ", ".join(read_header(path)) or "no header"
            raise UpstreamFormatError(path, f"expected labelset columns Label ID, Short Code; found {found}")
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise UpstreamFormatError(
            folder,
            f"several labelset CSVs ({names}); name the one to use with `labelset:` in this export's "
            "sources.coralnet.exports entry",
        )
    return candidates[0] if candidates else None


def read_labelset(path: Path | None, encoding: str) -> Labelset:
    labelset = Labelset(path)
    if path is None:
        return labelset
    csv_file = CsvFile(path, encoding)
    records = csv_file.records()
    header_record = next(records, None)
    header = [norm(h) for h in header_record.cells] if header_record else []
    if "label id" not in header or "short code" not in header:
        raise UpstreamFormatError(path, "expected labelset columns Label ID, Short Code")
    id_at, code_at = header.index("label id"), header.index("short code")
    by_code: dict[str, set[str]] = {}
    for record in records:
        labelset.rows += 1
        if record.bad_byte is not None:
            line, _, byte = record.bad_byte
            raise UpstreamFormatError(
                path, f"line {line}: byte 0x{byte:02X} is not {encoding} (set `encoding:` for this export)"
            )
        cells = record.cells
        label_id = cells[id_at].strip() if id_at < len(cells) else ""
        code = _code(cells[code_at]) if code_at < len(cells) else ""
        if not label_id.isdigit() or not code:
            labelset.skipped_rows += 1
            continue
        label_id = str(int(label_id))
        by_code.setdefault(code, set()).add(label_id)
        labelset.codes.setdefault(label_id, code)
    labelset.ids = {c: next(iter(ids)) for c, ids in by_code.items() if len(ids) == 1}
    labelset.ambiguous = {c for c, ids in by_code.items() if len(ids) > 1}
    for code, label_id in labelset.ids.items():
        key = code.casefold()
        labelset.folded[key] = label_id if key not in labelset.folded else None
    return labelset


@dataclass
class Resolved:
    mapping: Mapping | None
    reason: str | None = None
    detail: str = ""
    decided: bool = False  # picked by the lowest_mapping_id rule


class Crosswalk:
    """Label ID -> one MERMAID target, per the ambiguity policy, resolved once per label."""

    def __init__(self, taxonomy: Taxonomy, policy: str) -> None:
        self.taxonomy = taxonomy
        self.policy = policy
        self._cache: dict[str, Resolved] = {}
        self.ambiguous_labels: set[str] = set()
        self.decisions: dict[str, str | None] = {}
        # Label IDs with any labelmapping row, null-attribute rows included, to say which it is.
        self._listed = set(taxonomy.provider_ids(PROVIDER))

    def resolve(self, label_id: str) -> Resolved:
        if label_id not in self._cache:
            self._cache[label_id] = self._resolve(label_id)
        return self._cache[label_id]

    def _resolve(self, label_id: str) -> Resolved:
        targets = self.taxonomy.mappings(PROVIDER, label_id)
        if not targets:
            why = (
                "only labelmappings with a null benthic attribute"
                if label_id in self._listed
                else "no labelmapping"
            )
            return Resolved(None, "unmapped_label", f"CoralNet Label ID {label_id} has {why}")
        # A target the snapshot lacks is dangling: it is not a candidate, and a label with only
        # dangling targets is unmapped.
        known = [t for t in targets if t.benthic_attribute_id in self.taxonomy.attributes]
        if not known:
            missing = ", ".join(sorted({t.benthic_attribute_id for t in targets}))
            return Resolved(
                None,
                "unmapped_label",
                f"CoralNet Label ID {label_id} maps only to attributes missing from the taxonomy "
                f"snapshot ({missing})",
            )
        if len(known) == 1:
            return Resolved(known[0])
        self.ambiguous_labels.add(label_id)
        ordered = sorted(known, key=lambda t: mapping_id_key(t.mapping_id))
        if self.policy == "lowest_mapping_id":
            self.decisions[label_id] = ordered[0].mapping_id
            return Resolved(ordered[0], decided=True)
        described = "; ".join(
            f"{t.mapping_id}: {t.benthic_attribute_name}"
            + (f" / {t.growth_form_name}" if t.growth_form_name else "")
            for t in ordered
        )
        return Resolved(
            None,
            "ambiguous_mapping",
            f"CoralNet Label ID {label_id} maps to {len(known)} targets ({described})",
        )
