"""Class counts for `dvc plots`, and the offline HTML page `dvc plots show` renders them into.

Plot data: one CSV per product (`metrics/plots/classes/<product>.csv`, columns `class,split,count`,
a row per class with samples and split), so one chart per product overlays the splits. dvc.yaml
declares the charts at top level with the `class_counts` template (`.dvc/plots/class_counts.json`:
horizontal bars sorted by total, one bar per split, a fixed step per class so 50 classes stay
readable). Per-class counts live here, not in metrics: `dvc exp show` keeps to totals.

Offline rendering: DVC's default page loads vega, vega-lite and vega-embed from a CDN. The page
template `.dvc/plots/offline.html` (named by `plots.html_template` in .dvc/config) carries the three
libraries inline, vendored from their npm packages by `python -m stages.card vendor`, and no
`{scripts}` placeholder, so DVC's CDN tags are never written. Inline, because DVC writes the page
wherever `-o` says: a page with relative script paths would break when moved.
"""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path
from typing import Any

from stages.fsutil import atomic_path, write_text

SPLITS = ("train", "val", "test")
# npm package -> the UMD bundle inside its tarball; order is load order (vega-lite needs vega, ...).
VENDORED = (
    ("vega", "package/build/vega.min.js"),
    ("vega-lite", "package/build/vega-lite.min.js"),
    ("vega-embed", "package/build/vega-embed.min.js"),
)
BSD3 = """Redistribution and use in source and binary forms, with or without modification, are permitted
provided that the following conditions are met: 1. Redistributions of source code must retain the above
copyright notice, this list of conditions and the following disclaimer. 2. Redistributions in binary
form must reproduce the above copyright notice, this list of conditions and the following disclaimer in
the documentation and/or other materials provided with the distribution. 3. Neither the name of the
copyright holder nor the names of its contributors may be used to endorse or promote products derived
from this software without specific prior written permission. THIS SOFTWARE IS PROVIDED BY THE
COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT
LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT,
INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF
SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED
AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR
OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF
SUCH DAMAGE."""


def class_distribution(classes: dict[str, Any]) -> dict[str, list[tuple[str, int]]]:
    """split -> [(class name, count)] for every class with a sample in some split, in class-map order.

    A class absent from one split stays in that split's list with 0: the chart then shows the gap.
    """
    entries = [e for e in classes.get("classes") or [] if any((e.get("count") or {}).values())]
    return {
        split: [
            (str(e.get("name", e.get("index"))), int((e.get("count") or {}).get(split, 0))) for e in entries
        ]
        for split in SPLITS
    }


def plot_rows(classes: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(class, split, count), class-map order, splits in train/val/test order."""
    dist = class_distribution(classes)
    names = [n for n, _ in dist["train"]]
    return [(name, split, dist[split][i][1]) for i, name in enumerate(names) for split in SPLITS]


def _csv(value: str) -> str:
    return f'"{value.replace(chr(34), chr(34) * 2)}"' if any(c in value for c in ',"\n') else value


def write_plot(path: Path, classes: dict[str, Any]) -> Path:
    lines = ["class,split,count"] + [f"{_csv(c)},{s},{n}" for c, s, n in plot_rows(classes)]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- the offline page template --------------------------------------------------------------------


def _bundle(tgz: Path, member: str) -> str:
    with tarfile.open(tgz, "r:gz") as tar:
        fh = tar.extractfile(member)
        if fh is None:
            raise FileNotFoundError(f"{tgz}: no {member}")
        text = fh.read().decode("utf-8")
    if "</script" in text.lower():  # would end the inline <script> early
        raise ValueError(f"{tgz}: {member} contains </script and cannot be inlined")
    return text


def html_template(tarballs: dict[str, Path], versions: dict[str, str]) -> str:
    """The page template with the three libraries inline (see the module docstring)."""
    scripts = []
    for name, member in VENDORED:
        code = _bundle(tarballs[name], member)
        scripts.append(
            f"<!-- {name}@{versions[name]} (npm), BSD-3-Clause, Copyright (c) 2015-2025 University of "
            f"Washington Interactive Data Lab -->\n<script>\n{code}\n</script>"
        )
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n{refresh_tag}\n<title>DVC Plot</title>\n'
        "<!-- Vendored libraries, inlined so the page renders offline. Their licence (BSD-3-Clause):\n"
        f"{BSD3}\n-->\n"
        + "\n".join(scripts)
        + "\n<style>table { border-spacing: 15px; }</style>\n</head>\n<body>\n{plot_divs}\n</body>\n</html>\n"
    )


def _version(tgz: Path) -> str:
    import json

    with tarfile.open(tgz, "r:gz") as tar:
        fh = tar.extractfile("package/package.json")
        assert fh is not None
        return str(json.load(io.TextIOWrapper(fh, encoding="utf-8"))["version"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stages.card",
        description="Write .dvc/plots/offline.html from npm tarballs "
        "(npm pack vega@5 vega-lite@5 vega-embed@6).",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    vendor = sub.add_parser("vendor")
    for name, _ in VENDORED:
        vendor.add_argument(f"--{name}", type=Path, required=True, help=f"{name}-X.Y.Z.tgz")
    vendor.add_argument("--out", type=Path, default=Path(".dvc/plots/offline.html"))
    args = parser.parse_args(argv)
    tarballs = {name: getattr(args, name.replace("-", "_")) for name, _ in VENDORED}
    versions = {name: _version(path) for name, path in tarballs.items()}
    write_text(args.out, html_template(tarballs, versions))
    print(f"{args.out}: " + ", ".join(f"{n}@{v}" for n, v in versions.items()))
    return 0
