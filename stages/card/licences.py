"""Licences and citations of the sources, as the card header, the card body and Croissant state them.

`sources.<source>.license` in params.yaml is free text that starts with an SPDX id where one exists
("CC-BY-NC-SA-4.0", "CC-BY-4.0 (unverified: ...)"). Terms that have no SPDX id (USGS public domain,
CoralNet's per-source terms, iNaturalist 2017's research-only terms) are recognised by their text
below; `sources.<source>.license_url` in params overrides the link of any of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from stages.card.info import ReleaseInfo


@dataclass(frozen=True)
class Terms:
    spdx: str | None  # SPDX id, when the terms have one
    hf: str  # Hugging Face licence id ("other" when HF has none)
    slug: str  # license_name for `other`
    title: str
    url: str
    noncommercial: bool = False
    research_only: bool = False


SPDX = {
    "CC-BY-NC-SA-4.0": Terms("CC-BY-NC-SA-4.0", "cc-by-nc-sa-4.0", "cc-by-nc-sa-4.0",
                             "Creative Commons Attribution-NonCommercial-ShareAlike 4.0",
                             "https://creativecommons.org/licenses/by-nc-sa/4.0/", noncommercial=True),
    "CC-BY-NC-4.0": Terms("CC-BY-NC-4.0", "cc-by-nc-4.0", "cc-by-nc-4.0",
                          "Creative Commons Attribution-NonCommercial 4.0",
                          "https://creativecommons.org/licenses/by-nc/4.0/", noncommercial=True),
    "CC-BY-SA-4.0": Terms("CC-BY-SA-4.0", "cc-by-sa-4.0", "cc-by-sa-4.0",
                          "Creative Commons Attribution-ShareAlike 4.0",
                          "https://creativecommons.org/licenses/by-sa/4.0/"),
    "CC-BY-4.0": Terms("CC-BY-4.0", "cc-by-4.0", "cc-by-4.0", "Creative Commons Attribution 4.0",
                       "https://creativecommons.org/licenses/by/4.0/"),
    "CC0-1.0": Terms("CC0-1.0", "cc0-1.0", "cc0-1.0", "Creative Commons Zero 1.0",
                     "https://creativecommons.org/publicdomain/zero/1.0/"),
}  # fmt: skip

# Terms without an SPDX id, recognised by a pattern of their params text.
NAMED = [
    (re.compile(r"public domain", re.I),
     Terms(None, "other", "us-public-domain", "U.S. public domain (work of the U.S. Geological Survey)",
           "https://www.usgs.gov/information-policies-and-instructions/copyrights-and-credits")),
    (re.compile(r"coralnet", re.I),
     Terms(None, "other", "coralnet-source-terms",
           "CoralNet: terms set by each source's owners (check the source page before reuse)",
           "https://coralnet.ucsd.edu/")),
    (re.compile(r"inaturalist|research only", re.I),
     Terms(None, "other", "inat2017-research-only",
           "iNaturalist 2017 competition terms: research use only, images not redistributable; each "
           "image also carries its own licence and rights holder",
           "https://github.com/visipedia/inat_comp/tree/master/2017", research_only=True)),
]  # fmt: skip


def terms_of(text: str, override_url: str | None = None) -> Terms:
    """The terms a params licence text stands for; unknown text becomes `other` with no link."""
    head = re.match(r"\s*([A-Za-z0-9.\-+]+)", text or "")
    spdx = next((v for k, v in SPDX.items() if head and head.group(1).upper() == k.upper()), None)
    terms = spdx or next((t for pattern, t in NAMED if pattern.search(text or "")), None)
    if terms is None:
        slug = re.sub(r"[^a-z0-9]+", "-", (text or "unknown").lower()).strip("-")[:60] or "unknown"
        terms = Terms(None, "other", slug, text or "unknown terms", "")
    if override_url:
        terms = Terms(terms.spdx, terms.hf, terms.slug, terms.title, override_url, terms.noncommercial,
                      terms.research_only)  # fmt: skip
    return terms


def source_terms(info: ReleaseInfo) -> dict[str, Terms]:
    return {
        s: terms_of(str(t.get("license") or ""), (info.source_params.get(s) or {}).get("license_url"))
        for s, t in info.sources.items()
    }


def header_licence(info: ReleaseInfo) -> dict[str, Any]:
    """The card header's licence keys: HF ids (a list when sources differ), and for terms HF has no id
    for, `license_name` and `license_link`."""
    terms = source_terms(info)
    ids = sorted({t.hf for t in terms.values()}, key=lambda i: (i == "other", i))
    out: dict[str, Any] = {"license": ids[0] if len(ids) == 1 else ids}
    others = sorted({(t.slug, t.url) for t in terms.values() if t.hf == "other"})
    if others:
        out["license_name"] = "-and-".join(slug for slug, _ in others)
        # HF takes one link: the terms' own page when there is one set of them, else the card's section.
        out["license_link"] = others[0][1] if len(others) == 1 and others[0][1] else "README.md#licence"
    return out


def headline(info: ReleaseInfo) -> str:
    """One sentence: the most restrictive terms that apply to the product as a whole."""
    terms = source_terms(info)
    if not info.redistributable or any(t.research_only for t in terms.values()):
        which = ", ".join(s for s, t in terms.items() if t.research_only or
                          not info.sources[s].get("redistributable", True))  # fmt: skip
        return (f"**Research use only; not redistributable** ({which}). Build it yourself from the upstream; "
                "do not publish the images.")  # fmt: skip
    nc = [s for s, t in terms.items() if t.noncommercial]
    if nc:
        names = ", ".join(f"{s} ({terms[s].spdx or terms[s].title})" for s in nc)
        rest = [s for s in terms if s not in nc]
        tail = f"; {', '.join(rest)} samples carry their own terms (below)" if rest else ""
        return f"**Non-commercial use only**: {names} data may not be used commercially{tail}."
    if all(t.slug == "us-public-domain" for t in terms.values()):
        return ("**Public domain**: U.S. Geological Survey data, free of copyright in the U.S.; please "
                "credit the authors (citation below).")  # fmt: skip
    if len({t.slug for t in terms.values()}) == 1:
        only = next(iter(terms.values()))
        return f"**{only.spdx or only.title}** applies to every sample."
    return "Each source's terms apply to its samples (below): follow all of them."


def croissant_licences(info: ReleaseInfo) -> list[str]:
    return sorted({t.url or t.title for t in source_terms(info).values()})


# BibTeX per source. Entries cite what each publisher asks to be cited; where a field could not be
# checked it is left out rather than guessed.
BIBTEX = {
    "mermaid": """@misc{mermaid,
  title = {{MERMAID}: Marine Ecological Research Management Aid, confirmed benthic photo-quadrat annotations},
  author = {{MERMAID data contributors}},
  howpublished = {\\url{https://datamermaid.org}, coral-reef-training bucket},
  note = {CC BY-NC-SA 4.0}
}""",
    "coralnet": """@inproceedings{coralnet,
  title = {A New Deep Learning Engine for {CoralNet}},
  author = {Chen, Qimin and Beijbom, Oscar and Chan, Stephen and Bouwmeester, Jessica and Kriegman, David},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV) Workshops},
  year = {2021}
}""",
    "coasttrain": """@misc{coasttrain,
  title = {A 1.2 Billion Pixel Human-Labeled Dataset for Data-Driven Classification of Coastal Environments},
  author = {Buscombe, Daniel and others},
  howpublished = {U.S. Geological Survey data release},
  year = {2022},
  doi = {10.5066/P91NP87I}
}""",
    "inat2017": """@inproceedings{inat2017,
  title = {The {iNaturalist} Species Classification and Detection Dataset},
  author = {Van Horn, Grant and Mac Aodha, Oisin and Song, Yang and Cui, Yin and Sun, Chen and Shepard, Alex
            and Adam, Hartwig and Perona, Pietro and Belongie, Serge},
  booktitle = {Proceedings of the IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year = {2018}
}""",
    "seatizen": """@misc{seatizen,
  title = {Seatizen Atlas},
  author = {Contini, Matteo and others},
  publisher = {Zenodo},
  version = {v1.1.0},
  year = {2024},
  doi = {10.5281/zenodo.13951614}
}""",
}


def bibtex(source: str, attribution: str) -> str:
    """The source's entry, or a @misc built from its params attribution."""
    if source in BIBTEX:
        return BIBTEX[source]
    key = re.sub(r"[^A-Za-z0-9]+", "_", source)
    return f"@misc{{{key},\n  title = {{{source}}},\n  note = {{{attribution}}}\n}}"


def product_bibtex(info: ReleaseInfo) -> str:
    attributions = "; ".join(str(t.get("attribution")) for t in info.sources.values() if t.get("attribution"))
    key = re.sub(r"[^A-Za-z0-9]+", "_", info.name)
    return (
        f"@misc{{tidepool_{key},\n"
        f"  title = {{tidepool {info.name}: a WebDataset release built from public marine image sources}},\n"
        f"  howpublished = {{{info.repo_url}}},\n"
        f"  note = {{Built from: {attributions}}}\n"
        "}"
    )
