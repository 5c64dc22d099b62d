"""Seatizen file names: the grammar of SOURCES.md §6 and the session key each name gives.

`YYYYMMDD_<CCC>[-<Place>[-<More>...]]_<platform>[-<NN>]_<rest>.<ext>`, where

- the place is optional (`20190420_MYT_scuba_DSCI1495.JPG`) and may hold several hyphenated
  words (`MUS-Le-Morne-Saint-Jacques`);
- the platform is one of ASV, UAV, SCUBA, MASK, KITE, PADDLE in any case, optionally with a
  number (`ASV-00`, `paddle-2`);
- `<rest>` is one to four `_`-separated tokens.

How `<rest>` is read (the `form` of the name):

- `video_frame`: two or more tokens and the last is all digits: the tokens before it are the
  video / sequence token (`GX024250_004` -> video `GX024250`, frame `004`; `10_00168`; and
  `GH012345_0042`, a chaptered GoPro sequence, reads the same way). Session = the name without
  `_<frame>.<ext>`: consecutive frames of one video are near-duplicates.
- `still`: one token (`G0043959`, `DSCI1495`), or several whose last is not a number: a camera
  frame id with no video. Session = `<date>_<place>_<platform>`: the photos of one dive or
  transect are near-duplicates of their neighbours just as video frames are.
- `partial`: the name starts with a valid date but does not fit the rest of the grammar (no
  known platform, no `<rest>`, more than four tokens). Session = the leading parts that can be
  read in order: date, then place, then platform.
  A name that starts with a date followed by another separator (`20210126-ATF-...`) is
  `partial` with the date alone.
- `other`: no date at the start (`odm_orthophoto_317341_7665591.png`, the authors' training crops
  `Salary_T15_DSCN8051_19.jpg`). Session = the leading tokens that hold no digit
  (`odm_orthophoto`, `Salary`); when the first token already has one, its leading letters
  (`IMG` of `IMG0001`) or its leading number. Coarse on purpose: a group too wide costs split
  balance, one too narrow leaks near-duplicates.

Every name parses: no name is refused, and the source never aborts because names are odd; the
forms are counted in the metrics. Names are compared in Unicode NFC (a file system may store NFD).
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

FORMS = ("video_frame", "still", "partial", "other")
PLATFORMS = ("asv", "uav", "scuba", "mask", "kite", "paddle")
MAX_REST_TOKENS = 4

_PLACE = re.compile(r"^(?P<country>[A-Z]{3})(?:-(?P<place>[^-]+(?:-[^-]+)*))?$")
_PLATFORM = re.compile(r"^(?P<platform>[A-Za-z]+)(?:-(?P<number>\d+))?$")


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


@dataclass(frozen=True)
class FrameName:
    form: str  # one of FORMS
    session: str
    date: str | None  # ISO
    country: str | None
    place: str | None
    platform: str | None  # as written (`scuba`, `ASV`)
    platform_number: str | None
    video: str | None
    frame: str | None

    @property
    def site(self) -> str | None:
        """The `<CCC>[-<Place>]` token: the site group key."""
        if self.country is None:
            return None
        return self.country if self.place is None else f"{self.country}-{self.place}"

    def native(self) -> dict[str, Any]:
        return {
            "form": self.form,
            "date": self.date,
            "country": self.country,
            "place": self.place,
            "platform": self.platform,
            "platform_number": self.platform_number,
            "video": self.video,
            "frame": self.frame,
        }


def _date(token: str) -> str | None:
    if not re.fullmatch(r"\d{8}", token):
        return None
    try:
        return dt.datetime.strptime(token, "%Y%m%d").date().isoformat()
    except ValueError:
        return None


def _digits(token: str) -> bool:
    return bool(re.fullmatch(r"[0-9]+", token))


def _other(stem: str, tokens: list[str]) -> FrameName:
    lead = []
    for t in tokens:
        if not t or re.search(r"[0-9]", t):
            break
        lead.append(t)
    if lead:
        session = "_".join(lead)
    else:
        # No digit-free leading token: the leading letters (`IMG` of `IMG0001`), else the leading
        # number (`20231301` of a name whose date is not a date).
        m = re.match(r"[^0-9_ .-]+|[0-9]+", stem)
        session = m.group(0) if m else stem
    return FrameName("other", session, None, None, None, None, None, None, None)


def parse_name(file_name: str) -> FrameName:
    """The parts of a Seatizen image name (its last path component); never fails."""
    name = nfc(file_name).rsplit("/", 1)[-1]
    stem = name.rpartition(".")[0] if "." in name else name
    tokens = stem.split("_")
    date = _date(tokens[0])
    if date is None:
        lead = re.match(r"([0-9]{8})(?:[^0-9]|$)", stem)
        if lead and _date(lead.group(1)):
            # A dated name with another separator (`20210126-ATF-...`): only the date can be read.
            return FrameName("partial", lead.group(1), _date(lead.group(1)), *([None] * 6))
        return _other(stem, tokens)
    place = _PLACE.match(tokens[1]) if len(tokens) > 1 else None
    platform = _PLATFORM.match(tokens[2]) if place and len(tokens) > 2 else None
    if platform and platform["platform"].casefold() not in PLATFORMS:
        platform = None
    rest = tokens[3:]
    country = place["country"] if place else None
    where = place["place"] if place else None
    if platform is None or not 1 <= len(rest) <= MAX_REST_TOKENS or not all(rest):
        read = tokens[: 1 + bool(place) + bool(platform)]
        return FrameName(
            "partial",
            "_".join(read),
            date,
            country,
            where,
            platform["platform"] if platform else None,
            platform["number"] if platform else None,
            None,
            None,
        )
    head = "_".join(tokens[:3])
    if len(rest) >= 2 and _digits(rest[-1]):
        video = "_".join(rest[:-1])
        return FrameName(
            "video_frame",
            f"{head}_{video}",
            date,
            country,
            where,
            platform["platform"],
            platform["number"],
            video,
            rest[-1],
        )
    return FrameName(
        "still", head, date, country, where, platform["platform"], platform["number"], None, "_".join(rest)
    )
