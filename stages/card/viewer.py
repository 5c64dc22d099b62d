"""A static page to look at a product: `data/release/<product>/viewer/index.html`.

No server, no script, no CDN: one HTML file with its style inline and a `thumbs/` folder beside it,
so it opens from the file system wherever the product folder is copied (dvc get/import included).
It shows the classes with their counts per split and, per class, a grid of example thumbnails (the
examples `stages.card` chose: smallest hash of (class, sample key), up to `info.EXAMPLES_PER_CLASS` per
class, so the page is deterministic and bounded). Each thumbnail is captioned with its sample id,
source, split and labels; reef-points marks its point; segmentation products overlay the mask (a
separate PNG, so a checkbox can hide it with CSS alone).

`write_viewer` is called by the pack stage's docs step (`stages.card.write_docs`); the bytes depend
only on the shards and the class map.
"""

from __future__ import annotations

import hashlib
import html
from pathlib import Path

from stages.card.examples import (
    colour,
    jpeg_bytes,
    mask_legend,
    mask_overlay,
    picture,
    png_bytes,
    point_marks,
)
from stages.card.info import SPLITS, ReleaseInfo, SampleRef
from stages.fsutil import write_bytes, write_text

VIEWER_DIR = "viewer"
THUMBS = "thumbs"
THUMB_SIDE = 160
MAX_CLASSES = 300  # classes with a grid (most samples first); the class table lists all of them
MAX_LABELS = 6  # label names in a caption before "+N"

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; }
header { padding: 12px 20px; background: #0b3954; color: #fff; }
header h1 { margin: 0 0 4px; font-size: 20px; }
header p { margin: 0; opacity: .85; }
.layout { display: flex; align-items: flex-start; }
nav { position: sticky; top: 0; max-height: 100vh; overflow: auto; padding: 8px 12px;
      border-right: 1px solid #ddd; }
nav table { border-collapse: collapse; font-size: 12px; }
nav td, nav th { padding: 2px 6px; text-align: right; }
nav td:first-child, nav th:first-child { text-align: left; }
main { padding: 8px 20px; flex: 1; }
section { margin-bottom: 20px; }
section h2 { font-size: 16px; margin: 12px 0 6px; }
section h2 small { font-weight: normal; color: #666; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: 170px; }
.frame { position: relative; width: 160px; height: 160px; background: #eee; display: flex;
         align-items: center; justify-content: center; }
.frame img { max-width: 160px; max-height: 160px; display: block; }
.frame .mask { position: absolute; }
.frame .point { position: absolute; width: 10px; height: 10px; margin: -7px 0 0 -7px;
                border: 2px solid #ff0; border-radius: 50%; box-shadow: 0 0 0 1px #000; }
figcaption { font-size: 11px; color: #444; word-break: break-all; }
figcaption code { font-size: 10px; color: #000; }
.legend span { display: inline-block; margin: 0 8px 4px 0; }
.legend i { display: inline-block; width: 10px; height: 10px; margin-right: 3px; vertical-align: middle; }
#masks:not(:checked) ~ .layout .mask { display: none; }
"""


def thumb_name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def _caption(info: ReleaseInfo, ref: SampleRef, names: dict[int, str]) -> str:
    labels = [names.get(c, str(c)) for c in ref.classes]
    shown = ", ".join(labels[:MAX_LABELS]) + (
        f" +{len(labels) - MAX_LABELS}" if len(labels) > MAX_LABELS else ""
    )
    return (
        f"<code>{html.escape(ref.key)}</code><br>{html.escape(ref.source)} · {ref.split}<br>"
        f"{html.escape(shown or 'no class')}"
    )


def _figure(
    info: ReleaseInfo, ref: SampleRef, names: dict[int, str], has_mask: bool, size: tuple[int, int]
) -> str:
    t = thumb_name(ref.key)
    w, h = size
    parts = [
        f'<img class="image" src="{THUMBS}/{t}.jpg" width="{w}" height="{h}" alt="{html.escape(ref.key)}">'
    ]
    if has_mask:
        parts.append(f'<img class="mask" src="{THUMBS}/{t}.mask.png" width="{w}" height="{h}" alt="mask">')
    for x, y in point_marks(ref.doc):
        # The frame centres the picture: offset the mark from the centre by the picture's size.
        left = (160 - w) / 2 + x * w
        top = (160 - h) / 2 + y * h
        parts.append(f'<span class="point" style="left:{left:.1f}px;top:{top:.1f}px"></span>')
    return (
        f'<figure class="thumb"><div class="frame">{"".join(parts)}</div>'
        f"<figcaption>{_caption(info, ref, names)}</figcaption></figure>"
    )


def viewer_classes(info: ReleaseInfo) -> list[tuple[int, str, dict[str, int]]]:
    """(index, name, counts per split) of every class with samples, most samples first (ties by index)."""
    rows = []
    for e in info.classes.get("classes") or []:
        count = {s: int((e.get("count") or {}).get(s, 0)) for s in SPLITS}
        if sum(count.values()):
            rows.append((int(e["index"]), str(e.get("name", e["index"])), count))
    return sorted(rows, key=lambda r: (-sum(r[2].values()), r[0]))


def write_viewer(info: ReleaseInfo, out_dir: Path) -> list[Path]:
    """Write viewer/index.html and its thumbnails; remove thumbnails of earlier builds. Returns the
    files written."""
    folder = out_dir / VIEWER_DIR
    thumbs = folder / THUMBS
    names = info.class_names()
    legend = mask_legend(info.classes, info.kind)
    has_mask = legend is not None and "seg.png" in info.members
    classes = viewer_classes(info)
    written: list[Path] = []
    sizes: dict[str, tuple[int, int]] = {}
    overlays: dict[str, bool] = {}

    def thumb(ref: SampleRef) -> tuple[int, int]:
        t = thumb_name(ref.key)
        if t not in sizes:
            img = picture(info, out_dir, ref, THUMB_SIDE)
            sizes[t] = img.size
            write_bytes(thumbs / f"{t}.jpg", jpeg_bytes(img))
            written.append(thumbs / f"{t}.jpg")
            overlay = mask_overlay(info, out_dir, ref, img.size, legend) if has_mask and legend else None
            overlays[t] = overlay is not None
            if overlay is not None:
                write_bytes(thumbs / f"{t}.mask.png", png_bytes(overlay))
                written.append(thumbs / f"{t}.mask.png")
        return sizes[t]

    sections = []
    shown = 0
    for index, name, count in classes[:MAX_CLASSES]:
        refs = info.scan.examples.get(index) or []
        figures = []
        for ref in refs:
            size = thumb(ref)
            figures.append(_figure(info, ref, names, overlays[thumb_name(ref.key)], size))
        shown += len(figures)
        counts = " · ".join(f"{s} {count[s]}" for s in SPLITS)
        sections.append(
            f'<section id="c{index}"><h2>{html.escape(name)} <small>{counts}</small></h2>'
            f'<div class="grid">{"".join(figures)}</div></section>'
        )
    rows = "".join(
        f'<tr><td><a href="#c{i}">{html.escape(n)}</a></td>' + "".join(f"<td>{c[s]}</td>" for s in SPLITS)
        + f"<td>{sum(c.values())}</td></tr>"
        for i, n, c in classes
    )  # fmt: skip
    split_counts = info.split_counts()
    summary = ", ".join(f"{s} {split_counts[s]['samples']}" for s in SPLITS)
    more = (
        f" Grids for the {MAX_CLASSES} classes with most samples; the table lists all {len(classes)}."
        if len(classes) > MAX_CLASSES
        else ""
    )
    toggle = legend_html = ""
    if has_mask and legend is not None:
        toggle = '<input type="checkbox" id="masks" checked> <label for="masks">show masks</label>'
        legend_html = '<p class="legend">' + "".join(
            f'<span><i style="background:rgb{colour(v)}"></i>{v} {html.escape(n)}</span>'
            for v, n in sorted(legend.names.items()) if v not in legend.transparent
        ) + "</p>"  # fmt: skip
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>tidepool {html.escape(info.name)}: examples</title>
<style>{STYLE}</style>
</head>
<body>
<header><h1>tidepool {html.escape(info.name)}</h1>
<p>{info.total_samples} samples ({summary}); {shown} example thumbnails, up to
{len(max((info.scan.examples.get(i) or [] for i, _, _ in classes), key=len, default=[]))} per class,
chosen by a hash of the class and sample key.{more} Thumbnails are {THUMB_SIDE} px; the shards hold the full
pictures. <a href="../README.md" style="color:#fff">Dataset card</a></p></header>
{toggle}
<div class="layout">
<nav><table><thead><tr><th>class</th>{"".join(f"<th>{s}</th>" for s in SPLITS)}<th>all</th></tr></thead>
<tbody>{rows}</tbody></table></nav>
<main>{legend_html}
{"".join(sections)}
</main>
</div>
</body>
</html>
"""
    write_text(folder / "index.html", page)
    written.append(folder / "index.html")
    keep = {p.name for p in written}
    if thumbs.is_dir():
        for path in sorted(thumbs.iterdir()):
            if path.name not in keep and path.is_file():
                path.unlink()
    return written
