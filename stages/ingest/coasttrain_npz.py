"""One Doodler npz (a Coast Train image), read without trusting it, and the cacheable unit of work
that turns it into hashes and a class mask.

An npz is a zip of `.npy` members, and everything in it is declared by whoever wrote it: member
sizes, array shapes, dtypes. So nothing is inflated before the whole file has been judged from its
headers:

1. the zip's directory (no two members with one name: which would numpy take?);
2. every member's `.npy` header: an object dtype anywhere means the file only loads with pickle
   (`npz_needs_pickle`); the declared shape x itemsize must be what the member holds (a header
   that lies about its size is `unreadable_npz`) and at most `ingest.coasttrain_max_npz_bytes`
   (`npz_too_large`: numpy allocates the declared size before it reads a byte, so a 36 MB file
   declaring a 7.2 GB `label` would be a memory bomb);
3. the arrays ingest loads (`orig_image` or `image`, `label`, `classes`) against what Doodler
   writes: uint8 HxWxC (C >= 3) within `limits.max_image_pixels` (`image_too_large`), a uint8
   one-hot HxWxK label of the same size, at most MAX_CLASSES names of at most MAX_NAME_CHARS, and
   all three together within the byte bound again.

Only then are the three arrays read, member by member, with `allow_pickle=False`; a damaged deflate
stream, a bad CRC or a truncated member is `unreadable_npz`. The label is decoded channel by channel
(uint8 work arrays, not argmax's int64): a pixel's class is the one channel set, 255 (ignore) where
none is; a pixel with several channels set makes the label `not_one_hot` (an all-ones label would
otherwise read as channel 0 everywhere).

Only the unprefixed keys count: `0label`, `00label` ... are earlier doodling passes Doodler keeps.
"""

from __future__ import annotations

import hashlib
import io
import math
import struct
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stages.cache import code_version
from stages.errors import UpstreamFormatError
from stages.imaging import ImageProblem, probe_array
from stages.ingest.probe import Cached, read_input
from stages.ingest.records import WorkResult

IGNORE = 255
MAX_CLASSES = 1024  # Doodler sessions have a handful; a long list is a bomb of Python strings
MAX_NAME_CHARS = 256
NAMESPACE = "ingest-coasttrain-npz"
MASK_FILE = "mask.png"  # the mask's name inside a cache entry (the sample's name is not content)
# PNG settings fixed so a mask's bytes depend on its pixels only.
_PNG_OPTIONS = {"format": "PNG", "compress_level": 6, "optimize": False}
# What a damaged zip member can raise while it is read: a bad deflate stream (zlib.error), a bad
# CRC or a cut-off file (BadZipFile, EOFError), an unsupported or encrypted member
# (NotImplementedError, RuntimeError), a mangled local header (struct.error, ValueError).
_READ_ERRORS = (
    ValueError,
    OSError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,
    RuntimeError,
    struct.error,
    KeyError,
    OverflowError,
)


@dataclass(frozen=True)
class Member:
    """One `.npy` member as its headers declare it."""

    key: str
    info: zipfile.ZipInfo
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def open_zip(data: bytes) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except _READ_ERRORS as exc:
        raise ImageProblem("unreadable_npz", f"not an npz (zip) file: {exc}") from exc


def read_members(zf: zipfile.ZipFile) -> dict[str, Member]:
    """key -> Member from each .npy header, without reading any array data."""
    members: dict[str, Member] = {}
    for info in zf.infolist():
        if info.is_dir() or not info.filename.endswith(".npy"):
            continue
        key = info.filename[: -len(".npy")]
        if key in members:
            raise ImageProblem("unreadable_npz", f"two members named {info.filename!r}")
        try:
            with zf.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                elif version in ((2, 0), (3, 0)):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                else:
                    raise ValueError(f"unsupported .npy version {version}")
                header_bytes = fh.tell()
        except _READ_ERRORS as exc:
            raise ImageProblem("unreadable_npz", f"member {info.filename!r}: bad .npy header: {exc}") from exc
        if any(not isinstance(d, int) or d < 0 for d in shape):
            raise ImageProblem("unreadable_npz", f"member {info.filename!r}: bad shape {shape}")
        member = Member(key, info, dtype, tuple(int(d) for d in shape))
        if not dtype.hasobject and header_bytes + member.nbytes != info.file_size:
            raise ImageProblem(
                "unreadable_npz",
                f"member {info.filename!r} declares {dtype} {member.shape} ({member.nbytes} bytes) "
                f"but holds {info.file_size - header_bytes} bytes of data",
            )
        members[key] = member
    return members


def refuse_pickle(members: dict[str, Member]) -> None:
    pickled = sorted(k for k, m in members.items() if m.dtype.hasobject)
    if pickled:
        raise ImageProblem("npz_needs_pickle", f"object arrays (need pickle): {pickled}")


def bound_bytes(members: list[Member], max_bytes: int, what: str) -> None:
    total = sum(m.nbytes for m in members)
    if total > max_bytes:
        sizes = ", ".join(f"`{m.key}` {m.dtype} {m.shape}" for m in members)
        raise ImageProblem(
            "npz_too_large",
            f"{what} declare {total} bytes ({sizes}), over ingest.coasttrain_max_npz_bytes={max_bytes}",
        )


def image_key(members: dict[str, Any]) -> str | None:
    # orig_image keeps the original bands (4 for NAIP); `image` is what Doodler displayed.
    if "orig_image" in members:
        return "orig_image"
    if "image" in members:
        return "image"
    return None


def check_image(member: Member, max_pixels: int) -> None:
    dtype, shape = member.dtype, member.shape
    if dtype != np.uint8 or len(shape) != 3 or shape[2] < 3:
        raise ImageProblem(
            "unreadable_npz", f"`{member.key}` must be uint8 HxWx3 (or more bands), found {dtype} {shape}"
        )
    if shape[0] * shape[1] > max_pixels:
        raise ImageProblem(
            "image_too_large",
            f"`{member.key}` is {shape[1]}x{shape[0]}, over limits.max_image_pixels={max_pixels}",
        )


def read_array(zf: zipfile.ZipFile, member: Member) -> np.ndarray:
    try:
        with zf.open(member.info) as fh:
            array = np.lib.format.read_array(fh, allow_pickle=False)
    except _READ_ERRORS as exc:
        if "allow_pickle" in str(exc):
            raise ImageProblem("npz_needs_pickle", f"`{member.key}` only loads with pickle: {exc}") from exc
        raise ImageProblem(
            "unreadable_npz", f"member {member.info.filename!r}: data malformed: {exc}"
        ) from exc
    if array.dtype != member.dtype or array.shape != member.shape:
        raise ImageProblem(
            "unreadable_npz", f"member {member.info.filename!r}: data does not match its header"
        )
    return array


def rgb_of(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array[..., :3])


def load_coasttrain_image(
    path: str | Path, max_pixels: int | None = None, max_bytes: int | None = None
) -> np.ndarray:
    """The RGB image of one Coast Train npz (uint8 HxWx3), chosen exactly as ingest chose it:
    `orig_image[..., :3]` when present, else `image`; loaded without pickle, within the pixel
    bound (and the byte bound, when given). Anything else is an UpstreamFormatError naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UpstreamFormatError(path, f"cannot read npz: {exc}") from exc
    try:
        with open_zip(data) as zf:
            members = read_members(zf)
            key = image_key(members)
            if key is None:
                raise ImageProblem(
                    "unreadable_npz", f"expected key `orig_image` or `image`, found {sorted(members)}"
                )
            member = members[key]
            check_image(member, max_pixels if max_pixels is not None else 2**62)
            if max_bytes is not None:
                bound_bytes([member], max_bytes, "the image")
            return rgb_of(read_array(zf, member))
    except ImageProblem as problem:
        raise UpstreamFormatError(path, f"{problem.reason}: {problem.detail}") from problem


def class_names(array: np.ndarray) -> tuple[str, ...]:
    """`classes` as NFC-normalised, stripped names (so `land\\r` from a CRLF list is `land`)."""
    flat = np.asarray(array).reshape(-1)
    try:
        if flat.dtype.kind == "U":
            names = [str(c) for c in flat]
        elif flat.dtype.kind == "S":
            names = [bytes(c).decode("utf-8") for c in flat]
        else:
            raise ImageProblem("unreadable_npz", f"`classes` must be a string array, found {flat.dtype}")
    except UnicodeDecodeError as exc:
        raise ImageProblem("unreadable_npz", f"`classes` holds bytes that are not UTF-8: {exc}") from exc
    return tuple(unicodedata.normalize("NFC", name).strip() for name in names)


def decode_label(onehot: np.ndarray) -> np.ndarray:
    """Class index per pixel of a one-hot HxWxK label; 255 where no channel is set.

    Channel by channel in uint8 (argmax would make an int64 map, 8 bytes a pixel). A pixel with
    several channels set has no one class: ImageProblem("not_one_hot").
    """
    height, width, channels = onehot.shape
    index = np.full((height, width), IGNORE, dtype=np.uint8)
    hits = np.zeros((height, width), dtype=np.uint8)
    for k in range(channels):
        on = onehot[..., k] != 0
        index[on] = k
        hits += on
    several = int(np.count_nonzero(hits > 1))
    if several:
        raise ImageProblem(
            "not_one_hot",
            f"`label` sets more than one of its {channels} channels at {several} of {height * width} "
            "pixels: not one-hot, so no pixel's class can be told",
        )
    return index


@dataclass(frozen=True)
class Decoded:
    rgb: np.ndarray  # uint8 HxWx3
    index: np.ndarray  # uint8 HxW: index into `classes`, 255 = no label
    classes: tuple[str, ...]
    channels: int  # K of the one-hot label


def decode_npz(data: bytes, max_pixels: int, max_bytes: int) -> Decoded:
    """Judge an npz from its headers (module docstring), then read and decode it."""
    if not data:
        raise ImageProblem("empty_file", "zero-byte npz")
    with open_zip(data) as zf:
        members = read_members(zf)
        refuse_pickle(members)
        for member in members.values():
            bound_bytes([member], max_bytes, f"member `{member.key}` alone would")
        key = image_key(members)
        missing = [k for k in ("label", "classes") if k not in members] + (
            [] if key else ["orig_image|image"]
        )
        if missing:
            raise ImageProblem(
                "unreadable_npz",
                f"expected keys `label`, `classes` and `orig_image` or `image`; missing {missing}, "
                f"found {sorted(members)}",
            )
        assert key is not None
        image, label, classes = members[key], members["label"], members["classes"]
        check_image(image, max_pixels)
        height, width = image.shape[:2]
        if label.dtype != np.uint8 or len(label.shape) != 3 or label.shape[:2] != (height, width):
            raise ImageProblem(
                "unreadable_npz",
                f"`label` must be a uint8 one-hot {height}x{width}xK matching `{key}`, "
                f"found {label.dtype} {label.shape}",
            )
        if not 1 <= label.shape[2] < IGNORE:
            raise ImageProblem("unreadable_npz", f"`label` has {label.shape[2]} one-hot channels")
        n_names = math.prod(classes.shape)
        chars = classes.dtype.itemsize // 4 if classes.dtype.kind == "U" else classes.dtype.itemsize
        if n_names > MAX_CLASSES or chars > MAX_NAME_CHARS:
            raise ImageProblem(
                "npz_too_large",
                f"`classes` declares {n_names} names of up to {chars} characters "
                f"(at most {MAX_CLASSES} of {MAX_NAME_CHARS})",
            )
        bound_bytes([image, label, classes], max_bytes, "the arrays ingest reads")
        names = class_names(read_array(zf, classes))
        index = decode_label(read_array(zf, label))
        rgb = rgb_of(read_array(zf, image))
    return Decoded(rgb, index, names, int(label.shape[2]))


def encode_mask_png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L").save(buf, **_PNG_OPTIONS)
    return buf.getvalue()


# --- the unit of work ------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskTask:
    path: str
    mask_name: str  # where the runner writes the mask, relative to the source's interim folder
    max_pixels: int
    max_bytes: int
    remap: tuple[tuple[str, int], ...]  # class name -> common class id or IGNORE
    n_common: int  # common classes 0..n-1: pixels are counted for them and for IGNORE


def remap_digest(remap: dict[str, int], n_common: int) -> str:
    """What the remap contributes to a unit's key: the parsed table, not its file's bytes."""
    text = "\n".join(f"{name}\t{value}" for name, value in sorted(remap.items()))
    return hashlib.sha256(f"{n_common}\n{text}".encode()).hexdigest()


def _judge(task: MaskTask, data: bytes) -> WorkResult:
    """Decode, remap and hash one npz. The result holds no name of the sample: it is cached by
    content, and the same npz may be another sample's."""
    decoded = decode_npz(data, task.max_pixels, task.max_bytes)
    classes, index = decoded.classes, decoded.index
    present = [int(v) for v in np.flatnonzero(np.bincount(index.reshape(-1), minlength=256)[:IGNORE])]
    beyond = [k for k in present if k >= len(classes)]
    if beyond:
        raise ImageProblem(
            "unreadable_npz",
            f"label channels {beyond} label pixels but `classes` lists only {len(classes)} names",
        )
    remap = dict(task.remap)
    unknown = sorted({classes[k] for k in present if classes[k] not in remap})
    data_fields: dict[str, Any] = {
        "classes": list(classes),
        "present": present,
        "channels": decoded.channels,
        "unknown": unknown,
    }
    if unknown:
        # Not a problem of the file: the adapter quarantines it as unknown_class, and counts the
        # class names for the metrics (in Sample.build, where it sees this result).
        return WorkResult(data=data_fields)
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for k in present:
        lut[k] = remap[classes[k]]
    mask = lut[index]
    counts = np.bincount(mask.reshape(-1), minlength=256)
    data_fields["pixels"] = [int(counts[i]) for i in range(task.n_common)] + [int(counts[IGNORE])]
    info = probe_array(decoded.rgb)
    columns = {
        "image_format": "npz",
        "width": info.width,
        "height": info.height,
        "file_size": len(data),
        "file_sha256": hashlib.sha256(data).hexdigest(),
        "pixel_sha256": info.pixel_sha256,
        "phash": info.phash,
    }
    return WorkResult(columns=columns, data=data_fields, files={MASK_FILE: encode_mask_png(mask)})


def mask_work(task: MaskTask, cached: Cached) -> WorkResult:
    """Module level: runs in a worker. A bad npz is a result with a problem, not an exception."""
    try:
        data = read_input(task.path)
    except ImageProblem as problem:
        return WorkResult(problem=(problem.reason, problem.detail))
    inputs = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    result = cached.lookup(inputs)
    if result is None:
        try:
            result = _judge(task, data)
        except ImageProblem as problem:
            result = WorkResult(problem=(problem.reason, problem.detail))
        cached.store(inputs, result)
    files = {task.mask_name: result.files[MASK_FILE]} if MASK_FILE in result.files else {}
    return WorkResult(columns=result.columns, data=result.data, files=files, problem=result.problem)


@cache
def mask_code() -> str:
    return code_version(
        "stages.ingest.coasttrain_npz", "stages.imaging", "stages.ingest.probe", libraries=("PIL", "numpy")
    )
