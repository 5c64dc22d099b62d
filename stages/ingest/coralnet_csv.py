"""Records of a CoralNet CSV, streamed, each tied to the physical lines and bytes it came from.

Why not a plain `csv.reader` over the decoded file:

- **Encoding, per line.** Each physical line is decoded strictly on its own (UTF-8 by default, or
  the export's declared encoding), so one stray byte spoils one record (`CsvRecord.bad_byte`), not
  the whole file; a UTF-8 line break never sits inside a multi-byte character, so lines are a safe
  unit. A BOM on the first line is dropped.
- **Records against lines.** Every record knows its first and last physical line and its byte
  span, so a caller can keep only compact arrays per record and read a record again later
  (`parse_record` of its bytes). A record that spans several lines is counted. A record open for
  more than `MAX_RECORD_LINES` lines, or still open at the end of the file, or a quote that
  closes a field in its middle (`"a"b`: the csv module's lenient reading takes it as text), is an
  unbalanced quote: an UpstreamFormatError naming the line where the record starts
  (`check_multiline` judges the shorter multi-line records against the header). Without this, one
  missing quote swallows the rows after it into one field and the CSV silently shrinks to a
  handful of rows, or splits a row in two. A bare quote inside an unquoted field (`5" frame`)
  does not open a field and is kept as text.
- **Bounds.** A physical line longer than `MAX_LINE_BYTES` is an error naming the line; the csv
  module's own field limit (128 KiB) is raised to that bound so it never raises `_csv.Error`
  mid-file, and callers refuse cells over `MAX_FIELD_CHARS` row by row.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from stages.errors import UpstreamFormatError
from stages.ingest.common import CSV_FIELD_LIMIT

MAX_RECORD_LINES = 64  # a quoted comment of more lines than this is a runaway quote
MAX_LINE_BYTES = 16 << 20
MAX_FIELD_CHARS = CSV_FIELD_LIMIT  # the csv module's default limit: a longer cell makes the row a bad record


@dataclass(frozen=True)
class CsvRecord:
    first_line: int  # 1-based physical line where the record starts
    last_line: int
    start: int  # byte offset of the record's first line
    end: int  # byte offset just past its last line
    cells: list[str]
    bad_byte: tuple[int, int, int] | None = None  # (line, byte offset in the line, byte value)

    @property
    def lines(self) -> int:
        return self.last_line - self.first_line + 1


def _lift_field_limit() -> None:
    # The limit is process-wide state; it is only ever raised (never swapped back and forth), so
    # no other reader in the process can see it move under it.
    if csv.field_size_limit() < MAX_LINE_BYTES:
        csv.field_size_limit(MAX_LINE_BYTES)


def _decode(raw: bytes, encoding: str) -> tuple[str, tuple[int, int] | None]:
    """The line's text and, when it does not decode, (offset, byte) of its first bad byte."""
    try:
        return raw.decode(encoding), None
    except UnicodeDecodeError as exc:
        # surrogateescape keeps the line's shape for the csv parser; the record is refused anyway.
        return raw.decode(encoding, errors="surrogateescape"), (exc.start, raw[exc.start])


class _Feed:
    """The physical lines of a file, decoded, with the bookkeeping of the record being read."""

    def __init__(self, fh: io.BufferedReader, path: Path, encoding: str) -> None:
        self.fh, self.path, self.encoding = fh, path, encoding
        self.line = 0
        self.offset = 0
        self.record_first = 1
        self.record_start = 0
        self.bad: tuple[int, int, int] | None = None
        self.texts: list[str] = []  # the record's lines so far (at most MAX_RECORD_LINES)
        self.quoted = False

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> str:
        raw = self.fh.readline(MAX_LINE_BYTES + 1)
        if not raw:
            raise StopIteration
        self.line += 1
        if len(raw) > MAX_LINE_BYTES:
            raise UpstreamFormatError(
                self.path,
                f"line {self.line} is longer than {MAX_LINE_BYTES >> 20} MiB: not an annotations CSV",
            )
        if self.line - self.record_first >= MAX_RECORD_LINES:
            raise UpstreamFormatError(
                self.path,
                f"line {self.record_first}: a quoted field opened here is still open after "
                f"{MAX_RECORD_LINES} lines (an unbalanced quote swallows the rows after it)",
            )
        self.offset += len(raw)
        text, bad = _decode(raw, self.encoding)
        if bad is not None and self.bad is None:
            self.bad = (self.line, *bad)
        if self.line == 1 and text.startswith("\ufeff"):
            text = text[1:]
        self.texts.append(text)
        self.quoted = self.quoted or '"' in text
        return text

    def finish(self, cells: list[str]) -> CsvRecord:
        if self.quoted:
            self._check_quotes()
        record = CsvRecord(self.record_first, self.line, self.record_start, self.offset, cells, self.bad)
        self.record_first, self.record_start, self.bad = self.line + 1, self.offset, None
        self.texts, self.quoted = [], False
        return record

    def _check_quotes(self) -> None:
        # The csv module, lenient, reads a quote that closes a field mid-way (`"a"b`) as text and a
        # field still open at the end of the file as closed; either means a quote is missing or
        # stray, and the records around it are not the rows the file was written with.
        try:
            list(csv.reader(self.texts, strict=True))
        except csv.Error as exc:
            if "end of data" in str(exc):
                why = (
                    f"a quoted field opened here is never closed (it runs to the end of the file at "
                    f"line {self.line}: an unbalanced quote)"
                )
            elif self.line > self.record_first:
                why = (
                    f"a quoted field opened here runs to line {self.line}, where a quote ends it in "
                    f"the middle of a field ({exc}): an unbalanced quote swallowed the lines between"
                )
            else:
                why = f"a quote closes a field in the middle of it ({exc}): an unbalanced or stray quote"
            raise UpstreamFormatError(self.path, f"line {self.record_first}: {why}") from None


@dataclass
class CsvFile:
    """One CSV read as records; the counters fill in as `records()` runs."""

    path: Path
    encoding: str = "utf-8"
    physical_lines: int = 0
    blank_lines: int = 0
    multiline_records: int = 0

    def records(self) -> Iterator[CsvRecord]:
        """Every non-blank record (the header first), in file order."""
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 - closed below; a generator holds it open
        except FileNotFoundError as exc:
            raise UpstreamFormatError(self.path, "missing") from exc
        except OSError as exc:
            raise UpstreamFormatError(self.path, f"cannot be read ({exc.strerror or exc})") from exc
        _lift_field_limit()
        with fh:
            feed = _Feed(fh, self.path, self.encoding)
            reader = csv.reader(feed)
            while True:
                try:
                    cells = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    raise UpstreamFormatError(
                        self.path, f"line {feed.line}: not readable as CSV ({exc})"
                    ) from exc
                record = feed.finish(cells)
                self.physical_lines = feed.line
                if not cells:
                    self.blank_lines += 1
                    continue
                if record.lines > 1:
                    self.multiline_records += 1
                yield record
            self.physical_lines = feed.line


def parse_record(data: bytes, encoding: str) -> tuple[list[str], tuple[int, int, int] | None]:
    """The cells of one record's bytes (as `CsvFile` read them) and its first bad byte, if any
    (line counted from the record's first line, 0-based)."""
    lines = data.splitlines(keepends=True)
    texts: list[str] = []
    bad: tuple[int, int, int] | None = None
    for k, raw in enumerate(lines):
        text, problem = _decode(raw, encoding)
        if problem is not None and bad is None:
            bad = (k, *problem)
        texts.append(text)
    _lift_field_limit()
    for cells in csv.reader(texts):
        return cells, bad
    return [], bad


def check_multiline(path: Path, record: CsvRecord, header: list[str], free_text: Collection[int]) -> None:
    """A record over several physical lines is legitimate only as quoted free text: the line breaks
    sit in free-text columns (`free_text`, e.g. CoralNet's Comments), and no such cell holds the
    delimiters of a whole row. Anything else is an unbalanced quote that swallowed later rows."""
    width = len(header)
    for i, cell in enumerate(record.cells):
        if "\n" not in cell and "\r" not in cell:
            continue
        column = header[i] if i < len(header) else f"cell {i + 1}"
        if i not in free_text:
            why = f"column {column!r}, which never holds line breaks"
        elif width >= 3 and cell.count(",") >= width - 1:
            why = f"column {column!r}, and holds {cell.count(',')} commas: the delimiters of whole rows"
        else:
            continue
        raise UpstreamFormatError(
            path,
            f"line {record.first_line}: a quoted field opened here runs to line {record.last_line} in "
            f"{why} (an unbalanced quote swallows the rows after it)",
        )
