"""Pictures of a release diff: a contact sheet of changed samples and a class-count bar chart.

Per product, into the diff's pictures folder (`python -m stages.diff A B --pictures DIR`):

- `<product>-changes.png`: thumbnails of added, removed and relabelled samples, at most
  `PER_KIND` of each, chosen by the sha256 of the sample key (the same keys for the same diff,
  whatever order the manifests list them in), each captioned with its key, its label (old -> new
  for a relabel) and its source and split. Images come from the shards of the revision that has the
  sample (rev A for removals, rev B otherwise), read through DVC like every other file of the diff.
- `<product>-changes.json`: what every cell of the sheet shows (kind, key, revision, shard, labels,
  the pixel box of its thumbnail), and how many of each kind there were in all.
- `<product>-classes.png`: per class, the sample count (all splits) at A and at B, for the
  `CHART_CLASSES` classes whose count changed most.

Pillow draws them (already a dependency; a plotting library would add several packages for two
kinds of picture). Text uses Pillow's bundled font and is reduced to ASCII, which that font covers,
so the bytes depend only on the inputs and the pinned Pillow: PNGs are written without metadata.

A sample's members are found by extension (`jpg`, `jpeg`, `png`, `webp`; `seg.png` is a mask, not
the image), not by a fixed name, and by the manifest's byte range (`offset`, `nbytes`) when it has
one, else by position in the shard.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from stages.errors import TidepoolError
from stages.fsutil import dumps_json, write_bytes, write_text

KINDS = ("added", "removed", "relabelled")
PER_KIND = 8  # thumbnails per kind and product
THUMB = 112  # thumbnail box, pixels
CELL_W, CAPTION_H, PAD = 124, 40, 6
HEADER_H = 22
COLUMNS = 8
CHART_CLASSES = 30  # classes drawn in the bar chart (those that changed most)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
BACKGROUND = (255, 255, 255)
CELL_BG = (236, 236, 236)
INK = (30, 30, 30)
MUTED = (110, 110, 110)
KIND_COLOUR = {"added": (26, 127, 55), "removed": (207, 34, 46), "relabelled": (154, 103, 0)}
BAR_A, BAR_B = (160, 160, 160), (9, 105, 218)
SUFFIXES = ("-changes.png", "-changes.json", "-classes.png")


def file_names(product: str) -> dict[str, str]:
    return {"changes": f"{product}-changes.png", "manifest": f"{product}-changes.json",
            "classes": f"{product}-classes.png"}  # fmt: skip


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def ascii_text(text: Any) -> str:
    """`text` in the characters the bundled font draws: accents dropped, others as '?'."""
    flat = unicodedata.normalize("NFKD", str(text))
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in flat if not unicodedata.combining(c))


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """`text` cut with '...' so it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def pick(keys: Iterable[str], n: int = PER_KIND) -> list[str]:
    """`n` keys chosen by sha256 of the key (stable, spread over sources), shown sorted."""
    chosen = sorted(keys, key=lambda k: hashlib.sha256(k.encode("utf-8")).hexdigest())[:n]
    return sorted(chosen)


# --- reading one sample's image from a revision's shard -------------------------------------------


def _member_ext(name: str) -> tuple[str, str]:
    """(key, extension) of a WebDataset member name: the key ends at the basename's first dot."""
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    prefix = name[: len(name) - len(base)]
    return prefix + key, ext.lower()


def _pick_image(members: dict[str, bytes], where: str) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in members:
            return members[ext]
    listed = ", ".join(sorted(members)) or "none"
    raise TidepoolError(f"{where}: no image member ({'/'.join(IMAGE_EXTS)}); members: {listed}")


def _members(tar: tarfile.TarFile, where: str) -> Iterable[tuple[str, str, bytes]]:
    """(key, ext, bytes) of every regular member, in order."""
    try:
        for info in tar:
            if not info.isfile():
                continue
            fh = tar.extractfile(info)
            data = fh.read() if fh is not None else b""
            key, ext = _member_ext(info.name)
            yield key, ext, data
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise TidepoolError(f"{where}: not a readable tar ({exc})") from exc


def sample_image(reader: Any, shard_path: str, row: dict[str, Any]) -> Image.Image:
    """The image of one manifest row, read from `shard_path` at `reader`'s revision."""
    where = f"{shard_path} @ {reader.rev} (sample {row['key']})"
    offset, nbytes, position = row.get("offset"), row.get("nbytes"), row.get("position")
    found: dict[str, bytes] = {}
    try:
        with reader.fs.open(shard_path, "rb") as fh:
            if offset is not None and nbytes:
                fh.seek(int(offset))
                chunk = fh.read(int(nbytes))
                with tarfile.open(fileobj=io.BytesIO(chunk), mode="r:") as tar:
                    for _, ext, data in _members(tar, where):
                        found.setdefault(ext, data)
            else:
                with tarfile.open(fileobj=fh, mode="r|") as tar:
                    group, current = -1, None
                    for key, ext, data in _members(tar, where):
                        if key != current:
                            group, current = group + 1, key
                            if found:
                                break
                        if key == row["key"] or (position is not None and group == int(position)):
                            found.setdefault(ext, data)
    except TidepoolError:
        raise
    except FileNotFoundError as exc:
        raise TidepoolError(f"{where}: shard not found") from exc
    except Exception as exc:  # DVC/fsspec raise many types; the path and the cause are what matter
        raise TidepoolError(f"{where}: DVC could not read the shard ({type(exc).__name__}: {exc})") from exc
    data = _pick_image(found, where)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise TidepoolError(f"{where}: the image member does not decode ({exc})") from exc
    return image


def thumbnail(image: Image.Image, box: int = THUMB) -> Image.Image:
    """RGB, longer side `box` at most, aspect kept (LANCZOS: deterministic for a pinned Pillow)."""
    rgb = image.convert("RGB")
    rgb.thumbnail((box, box), Image.Resampling.LANCZOS, reducing_gap=None)
    return rgb


# --- the contact sheet ------------------------------------------------------------------------------


@dataclass
class Cell:
    kind: str
    key: str
    rev: str  # "a" or "b": whose shard the image came from
    shard: str
    split: str | None
    source: str | None
    label_a: str | None
    label_b: str | None
    caption: list[str]
    x: int = 0  # the thumbnail box in the sheet (top-left, size THUMB x THUMB)
    y: int = 0
    width: int = 0  # the thumbnail's own size inside the box (centred)
    height: int = 0


def _label_line(kind: str, a: str | None, b: str | None) -> str:
    if kind == "added":
        return b or "(no single label)"
    if kind == "removed":
        return a or "(no single label)"
    return f"{a} -> {b}" if a != b else "labels changed"


def make_cells(kind: str, rows: Sequence[dict[str, Any]]) -> list[Cell]:
    """Cells for the chosen manifest rows of one kind (rows carry key, split, source, shard, labels)."""
    cells = []
    for r in rows:
        rev = "a" if kind == "removed" else "b"
        label_a, label_b = r.get("label_a"), r.get("label_b")
        line = r.get("label_line") or _label_line(kind, label_a, label_b)
        where = " | ".join(str(v) for v in (r.get("source"), r.get("split")) if v)
        cells.append(Cell(kind, r["key"], rev, r["shard"], r.get("split"), r.get("source"), label_a, label_b,
                          [ascii_text(r["key"]), ascii_text(line), ascii_text(where)]))  # fmt: skip
    return cells


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(_fit(draw, word, font, width))
    return lines


def _placeholder(draw: ImageDraw.ImageDraw, x: int, y: int, font: Any, why: str) -> None:
    draw.rectangle([x + 8, y + 8, x + THUMB - 9, y + THUMB - 9], outline=MUTED)
    lines = ["image not shown:", *_wrap(draw, ascii_text(why), font, THUMB - 24)][:5]
    top = y + (THUMB - 12 * len(lines)) // 2
    for j, line in enumerate(lines):
        draw.text((x + 12, top + j * 12), line, fill=MUTED, font=font)


def contact_sheet(
    product: str,
    groups: dict[str, list[tuple[Cell, Image.Image | None]]],
    totals: dict[str, int],
    out_dir: Path,
    meta: dict[str, Any],
    withheld: str | None = None,
) -> dict[str, Any] | None:
    """Draw `<product>-changes.png` and its JSON sidecar; None (and no files) when nothing changed.
    A cell whose image is None gets a placeholder saying `withheld` (why it is not shown)."""
    kinds = [k for k in KINDS if groups.get(k)]
    if not kinds:
        return None
    columns = min(COLUMNS, max(len(groups[k]) for k in kinds))
    width = PAD + columns * (CELL_W + PAD)
    title_h = 26
    rows_per_kind = {k: -(-len(groups[k]) // columns) for k in kinds}
    cell_h = THUMB + CAPTION_H + PAD
    height = title_h + sum(HEADER_H + rows_per_kind[k] * cell_h for k in kinds) + PAD
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    title_font, head_font, font = _font(14), _font(12), _font(10)
    draw.text((PAD, 6), _fit(draw, ascii_text(f"{product}: {meta['a']['rev']} -> {meta['b']['rev']}"),
                             title_font, width - 2 * PAD), fill=INK, font=title_font)  # fmt: skip
    y = title_h
    cells_out = []
    for kind in kinds:
        shown, total = len(groups[kind]), totals.get(kind, len(groups[kind]))
        head = f"{kind}: {shown} of {total}" + (" (chosen by key hash)" if total > shown else "")
        draw.text((PAD, y + 5), head, fill=KIND_COLOUR[kind], font=head_font)
        y += HEADER_H
        for i, (cell, image) in enumerate(groups[kind]):
            col, row = i % columns, i // columns
            x0 = PAD + col * (CELL_W + PAD)
            y0 = y + row * cell_h
            box_x = x0 + (CELL_W - THUMB) // 2
            draw.rectangle([x0, y0, x0 + CELL_W - 1, y0 + THUMB + CAPTION_H - 1], fill=CELL_BG)
            cell.x, cell.y = box_x, y0
            if image is None:
                _placeholder(draw, box_x, y0, font, withheld or "not available")
            else:
                thumb = thumbnail(image)
                cell.width, cell.height = thumb.size
                sheet.paste(thumb, (box_x + (THUMB - thumb.width) // 2, y0 + (THUMB - thumb.height) // 2))
            draw.rectangle([x0, y0, x0 + 3, y0 + THUMB - 1], fill=KIND_COLOUR[kind])
            for j, line in enumerate(cell.caption):
                draw.text((x0 + 3, y0 + THUMB + 2 + j * 12), _fit(draw, line, font, CELL_W - 6),
                          fill=INK if j < 2 else MUTED, font=font)  # fmt: skip
            cells_out.append(asdict(cell))
        y += rows_per_kind[kind] * cell_h
    names = file_names(product)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=False, compress_level=9)
    write_bytes(out_dir / names["changes"], buf.getvalue())
    manifest = {
        "product": product,
        "a": meta["a"],
        "b": meta["b"],
        "image": {"file": names["changes"], "width": width, "height": height},
        "thumb_box": THUMB,
        "per_kind": PER_KIND,
        "images_withheld": withheld,
        "kinds": {k: {"total": totals.get(k, 0), "shown": len(groups.get(k) or [])} for k in KINDS},
        "cells": cells_out,
    }
    write_text(out_dir / names["manifest"], dumps_json(manifest))
    return manifest


# --- the class chart --------------------------------------------------------------------------------


def class_chart(product: str, totals_a: dict[str, int], totals_b: dict[str, int], out_dir: Path,
                meta: dict[str, Any]) -> dict[str, Any] | None:  # fmt: skip
    """Draw `<product>-classes.png`: A and B counts of the classes that changed most; None if none did."""
    changed = [c for c in set(totals_a) | set(totals_b) if totals_a.get(c, 0) != totals_b.get(c, 0)]
    if not changed:
        return None
    order = sorted(changed, key=lambda c: (-abs(totals_b.get(c, 0) - totals_a.get(c, 0)), c))
    shown = order[:CHART_CLASSES]
    font, title_font = _font(11), _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = {c: _fit(probe, ascii_text(c), font, 220) for c in shown}
    label_w = int(max(probe.textlength(t, font=font) for t in labels.values())) + 12
    bar_w, row_h, top = 360, 22, 44
    notes = {c: _delta_note(totals_a.get(c, 0), totals_b.get(c, 0)) for c in shown}
    note_w = int(max(probe.textlength(t, font=font) for t in notes.values()))
    width = PAD + label_w + bar_w + 6 + note_w + PAD
    height = top + len(shown) * row_h + (18 if len(order) > len(shown) else 0) + PAD
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    title = f"{product}: samples per class, {meta['a']['rev']} (grey) vs {meta['b']['rev']} (blue)"
    draw.text((PAD, 6), _fit(draw, ascii_text(title), title_font, width - 2 * PAD), fill=INK, font=title_font)
    scope = "all shown" if len(shown) == len(changed) else f"the {len(shown)} largest changes"
    draw.text((PAD, 26), f"{len(changed)} class(es) changed; {scope}", fill=MUTED, font=font)
    peak = max(max(totals_a.get(c, 0), totals_b.get(c, 0)) for c in shown) or 1
    x_bar = PAD + label_w
    for i, cls in enumerate(shown):
        y = top + i * row_h
        na, nb = totals_a.get(cls, 0), totals_b.get(cls, 0)
        draw.text((PAD, y + 5), labels[cls], fill=INK, font=font)
        wa, wb = round(bar_w * na / peak), round(bar_w * nb / peak)
        if wa:
            draw.rectangle([x_bar, y + 2, x_bar + wa - 1, y + 9], fill=BAR_A)
        if wb:
            draw.rectangle([x_bar, y + 10, x_bar + wb - 1, y + 18], fill=BAR_B)
        draw.text((x_bar + max(wa, wb) + 6, y + 5), notes[cls],
                  fill=KIND_COLOUR["added" if nb > na else "removed"], font=font)  # fmt: skip
    if len(order) > len(shown):
        more = f"... and {len(order) - len(shown)} more (see the table)"
        draw.text((PAD, top + len(shown) * row_h + 2), more, fill=MUTED, font=font)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=9)
    name = file_names(product)["classes"]
    write_bytes(out_dir / name, buf.getvalue())
    return {"file": name, "classes": shown, "changed": len(changed), "width": width, "height": height}


def _delta_note(na: int, nb: int) -> str:
    return f"{na} -> {nb} ({'+' if nb > na else ''}{nb - na})"


def clear(out_dir: Path) -> None:
    """Remove the pictures an earlier diff left in `out_dir` (only files this module names)."""
    if not out_dir.is_dir():
        return
    for path in out_dir.iterdir():
        if path.is_file() and path.name.endswith(SUFFIXES):
            path.unlink()
