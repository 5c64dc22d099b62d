"""Deterministic tar bytes for WebDataset shards.

Python's `tarfile` takes mtime, owner and mode from the caller but still decides the layout of
long names and pads the archive its own way across versions; writing the few header fields here
pins every byte, so two builds of the same samples give the same shard and the same md5 in
dvc.lock. The layout is plain POSIX ustar:

- every member: mode 0644, uid/gid 0, empty user and group names, mtime 0, type `0` (file);
- sample keys are shortened (`tar_key`) so every member name fits the 100-byte ustar field:
  wids reads only that field. A longer name, should a caller write one, gets a POSIX.1-2001 `x`
  (pax) header carrying `path=<name>` before it (what `tarfile` and GNU tar read), with the same
  fixed fields; the ustar field then holds the first 100 bytes of the name;
- data padded with NULs to 512-byte blocks; the archive ends with two zero blocks and is padded
  to a 10240-byte record, as POSIX asks and as GNU tar and `tarfile` write.

Names must be ASCII: WebDataset keys are ASCII without dots (GUIDE "Shards"), and a non-ASCII
name would need a charset decision that readers make differently.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import BinaryIO

BLOCK = 512
RECORD = 20 * BLOCK
NAME_FIELD = 100
MAX_EXT_BYTES = 15  # the longest member extension a product may write ("seg.png" today)
KEY_BYTES = NAME_FIELD - 1 - MAX_EXT_BYTES  # a key this long still fits `<key>.<ext>` in the field
KEY_DIGEST = 20  # hex digits of sha256(key) in a shortened key: 80 bits, no collision in practice
MODE = 0o644
# 11 octal digits: the largest size a ustar header holds without a pax `size` record.
MAX_MEMBER_BYTES = 8**11 - 1
PAX_NAME = b"././@PaxHeader"  # the name tarfile gives pax headers; readers ignore it


def _octal(value: int, width: int) -> bytes:
    """`width`-byte numeric field: zero-padded octal digits and a terminating NUL."""
    return b"%0*o\0" % (width - 1, value)


def _header(name: bytes, size: int, typeflag: bytes) -> bytes:
    buf = bytearray(BLOCK)
    buf[0:NAME_FIELD] = name[:NAME_FIELD].ljust(NAME_FIELD, b"\0")
    buf[100:108] = _octal(MODE, 8)
    buf[108:116] = _octal(0, 8)  # uid
    buf[116:124] = _octal(0, 8)  # gid
    buf[124:136] = _octal(size, 12)
    buf[136:148] = _octal(0, 12)  # mtime
    buf[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    buf[156:157] = typeflag
    buf[257:263] = b"ustar\0"
    buf[263:265] = b"00"
    # uname (265:297) and gname (297:329) stay empty: no account names in a release.
    buf[329:337] = _octal(0, 8)  # devmajor
    buf[337:345] = _octal(0, 8)  # devminor
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def _pax_record(keyword: str, value: bytes) -> bytes:
    """`<len> <keyword>=<value>\\n` where <len> counts the whole record, its own digits included."""
    body = b" " + keyword.encode("ascii") + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode("ascii") + body


def member_bytes(name: str, data: bytes) -> bytes:
    """One regular-file member: header(s), data, padding."""
    try:
        raw = name.encode("ascii")
    except UnicodeEncodeError as exc:
        raise ValueError(f"tar member name {name!r} is not ASCII") from exc
    if not raw or b"\0" in raw:
        raise ValueError(f"tar member name {name!r} is empty or holds NUL")
    if len(data) > MAX_MEMBER_BYTES:
        raise ValueError(f"tar member {name!r} is {len(data)} bytes, more than a ustar header holds")
    parts = []
    if len(raw) > NAME_FIELD:
        record = _pax_record("path", raw)
        parts += [_header(PAX_NAME, len(record), b"x"), record, _padding(len(record))]
    parts += [_header(raw, len(data), b"0"), data, _padding(len(data))]
    return b"".join(parts)


def tar_key(key: str) -> str:
    """The sample's name in the shard: `key` itself when `<key>.<ext>` fits the 100-byte ustar
    name field for every extension a product may write, else its first bytes and a digest of the
    whole key.

    Readers that ignore pax headers (wids does: "Filename must have an extension") would see
    the truncated ustar field of a longer name, so no member needs one. The digest keeps keys
    distinct; the full id stays in the sample's json and in the manifest's sample_id / point_id.
    """
    if len(key.encode("ascii", "replace")) <= KEY_BYTES:
        return key
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:KEY_DIGEST]
    return f"{key[: KEY_BYTES - KEY_DIGEST - 1]}-{digest}"


def sample_bytes(key: str, members: Mapping[str, bytes]) -> bytes:
    """All members of one sample, `<tar_key(key)>.<ext>`, contiguous and sorted by name.

    WebDataset groups consecutive members by the part of the name before the first dot, so the
    key must hold no dot and the members must be adjacent; sorting fixes their order.
    """
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be non-empty, without dots or slashes")
    for ext in members:
        if len(ext.encode("ascii", "replace")) > MAX_EXT_BYTES:
            raise ValueError(f"member extension {ext!r} is longer than {MAX_EXT_BYTES} bytes")
    name = tar_key(key)
    return b"".join(member_bytes(f"{name}.{ext}", members[ext]) for ext in sorted(members))


def end_of_archive(size_so_far: int) -> bytes:
    """Two zero blocks, then zeros up to the next full 10240-byte record."""
    total = size_so_far + 2 * BLOCK
    return b"\0" * (2 * BLOCK + (-total % RECORD))


class TarWriter:
    """Appends pre-serialised sample bytes to a binary file, tracking size and md5 as it goes.

    The md5 is the checksum the wids index publishes; computing it while writing saves reading
    every shard back.
    """

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._md5 = hashlib.md5()
        self.size = 0
        self.samples = 0

    def write_sample(self, data: bytes) -> int:
        """Append one sample's bytes (from `sample_bytes`); returns the offset it starts at."""
        offset = self.size
        self._fh.write(data)
        self._md5.update(data)
        self.size += len(data)
        self.samples += 1
        return offset

    def close(self) -> str:
        """Write the end-of-archive blocks; returns the md5 hex digest of the whole file."""
        tail = end_of_archive(self.size)
        self._fh.write(tail)
        self._md5.update(tail)
        self.size += len(tail)
        return self._md5.hexdigest()
