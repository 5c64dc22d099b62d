"""The release diff: what changed in the dataset between two revisions.

`python -m stages.diff <rev-a> <rev-b> [--json] [--product P ...] [--repo PATH] [--output FILE]
[--pictures DIR [--image-base URL]]` (also `make diff A=... B=...`, which adds `--pictures build/diff`)
prints markdown, or canonical JSON with `--json`, and nothing else on stdout (progress and DVC's
messages go to stderr), so `make diff A=.. B=.. > pr.md` is the diff alone. A revision is any
git revision (tag, branch, sha), `workspace` for the working tree, or `"no release"` (nothing:
the whole of rev B counts as added, as in a first release's changelog). Both revisions are read
through DVC's filesystem (`dvc.api.DVCFileSystem`): git-tracked files from the git objects,
DVC-tracked files from the cache or, when absent there, the remote. Neither revision is checked
out and the workspace is not touched.

Per product (`data/release/<product>/`), by sample key (`manifest.parquet`):

- added / removed: keys on one side only;
- relabelled: the same key with a different `label` or different `labels` (the sample's labels
  JSON, compared as parsed JSON, so key order cannot count as a change);
- moved: the same key in a different split (counted apart from relabelling: one sample can be both);
- relabels aggregated as from -> to counts (a change of the `labels` JSON alone is named by the
  fields that changed), and additions and removals by source;
- class-count deltas per split, from `classes.json` (the per-split counts pack records for every
  class: single-label classes and multilabel presence alike); only classes whose count changed
  (the markdown shows the largest `CLASS_TOP` and folds the rest into `<details>`);
- shards changed: shard names whose md5 differs or that exist on one side only;
- upload: files of the product at rev B whose content (md5) is in no release file of rev A, i.e.
  what `dvc push` would send (the DVC remote is content-addressed; a renamed but unchanged shard
  costs nothing). Directory listings (`.dir` objects) are not counted.

And for the whole build: quarantine deltas per source and reason (`data/interim/<source>/
quarantine.parquet`), dedup deltas (`metrics/dedup.json` and cluster membership from
`data/dedup/clusters.parquet`), and the params that changed (dotted keys, old -> new).

Every count is exact; lists of example keys are capped (`EXAMPLES`) and sorted.

With `--pictures DIR`, each product that changed also gets a contact sheet of added, removed and
relabelled samples (thumbnails from the shards of both revisions), its JSON sidecar, and a
before/after bar chart of class counts (`stages.diff_pictures`); the markdown embeds them by
`--image-base` (default: DIR as given), so `pr.md` beside DIR renders them.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from stages.cli import run_main
from stages.errors import TidepoolError, UpstreamFormatError
from stages.fsutil import dumps_json, repo_root, write_text

WORKSPACE = "workspace"
# Rev A of a first release: a revision with no files. Git forbids spaces in ref names, so no
# branch or tag can take this name.
EMPTY = "no release"
SPLITS = ("train", "val", "test")
EXAMPLES = 20  # example keys kept per list (counts are always complete)
RELEASE = "data/release"
MANIFEST = "manifest.parquet"
CLASSES = "classes.json"
MANIFEST_COLUMNS = ["key", "split", "shard", "label", "labels"]
# Read when present: where a sample's bytes are (pictures) and where it came from (by source).
OPTIONAL_COLUMNS = ["source", "position", "offset", "nbytes"]
CLASS_TOP = 10  # class-count changes shown before the rest is folded into <details>
RELABEL_TOP = 10  # from -> to pairs shown before the rest is folded
DEDUP_METRICS = (
    "samples",
    "clusters",
    "duplicate_members",
    "redundant_copies",
    "cross_source_clusters",
    "chained_members",
)


# --- reading a revision ---------------------------------------------------------------------------


class RevReader:
    """Files of one revision of a DVC project, git- and DVC-tracked alike, without a checkout."""

    def __init__(self, repo: Path, rev: str) -> None:
        from dvc.api import DVCFileSystem

        self.repo = repo
        self.rev = rev
        self.commit = resolve_rev(repo, rev)
        self.fs: Any = None
        self.sizes: dict[str, int] = {}  # bytes of every file read, so nothing is read twice for its size
        if rev == EMPTY:
            return
        try:
            self.fs = DVCFileSystem(str(repo), rev=None if rev == WORKSPACE else self.commit)
        except Exception as exc:  # DVC raises many unrelated types; the message is what matters
            raise TidepoolError(f"{repo}: DVC cannot open revision {rev!r}: {exc}") from exc

    def exists(self, path: str) -> bool:
        """Only a definite "no such file" is False. fsspec's own exists() would also say False when
        DVC cannot load a directory listing (no cache, remote unreachable), and a product would
        then silently count as absent."""
        if self.fs is None:
            return False
        try:
            self.fs.info(path)
        except FileNotFoundError:
            return False
        except Exception as exc:
            raise self._unreadable(path, exc) from exc
        return True

    def _unreadable(self, path: str, exc: Exception) -> TidepoolError:
        return TidepoolError(
            f"{path} @ {self.rev}: DVC could not read it ({type(exc).__name__}: {exc}); "
            "is the DVC remote configured and reachable (does `dvc pull` work)?"
        )

    def read(self, path: str) -> bytes:
        try:
            with self.fs.open(path, "rb") as fh:
                data = fh.read()
            self.sizes[path] = len(data)
            return data
        except FileNotFoundError as exc:
            raise TidepoolError(f"{path} @ {self.rev}: not found") from exc
        except Exception as exc:
            raise self._unreadable(path, exc) from exc

    def json(self, path: str, default: Any = None) -> Any:
        if not self.exists(path):
            return default
        try:
            return json.loads(self.read(path))
        except ValueError as exc:
            raise UpstreamFormatError(f"{path} @ {self.rev}", f"not valid JSON: {exc}") from exc

    def yaml(self, path: str) -> dict[str, Any]:
        if not self.exists(path):
            return {}
        try:
            data = yaml.safe_load(self.read(path))
        except yaml.YAMLError as exc:
            raise UpstreamFormatError(f"{path} @ {self.rev}", f"not valid YAML: {exc}") from exc
        return data if isinstance(data, dict) else {}

    def parquet(self, path: str, columns: list[str] | None = None) -> pa.Table | None:
        if not self.exists(path):
            return None
        try:
            # ParquetFile without threads, not read_table: read_table goes through a dataset
            # scanner whose Arrow worker threads can outlive the interpreter's teardown and abort
            # the process after the diff is printed (apache/arrow#34314; seen here as exit -6,
            # about 1 run in 12). These tables are small; threads gain nothing.
            table = pq.ParquetFile(io.BytesIO(self.read(path))).read(use_threads=False)
        except (OSError, pa.ArrowInvalid) as exc:
            raise UpstreamFormatError(f"{path} @ {self.rev}", f"not readable parquet: {exc}") from exc
        if columns is None:
            return table
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise UpstreamFormatError(f"{path} @ {self.rev}", f"lacks columns {missing}")
        return table.select(columns)

    def listing(self, folder: str) -> dict[str, dict[str, Any]]:
        """name -> {"md5", "size"} for the files in `folder`, subfolders included (a product's
        viewer/ and croissant/): name is the path below `folder`; size may be None."""
        if not self.exists(folder):
            return {}
        try:
            entries = self.fs.find(folder, detail=True).values()
        except Exception as exc:
            raise self._unreadable(folder, exc) from exc
        out = {}
        prefix = folder.rstrip("/") + "/"
        for entry in entries:
            if entry.get("type") != "file":
                continue
            name = entry["name"].rstrip("/")
            name = name[len(prefix) :] if name.startswith(prefix) else name.rsplit("/", 1)[-1]
            md5 = entry.get("md5") or (entry.get("dvc_info") or {}).get("md5")
            if md5 is None:  # a git-tracked file beside the outputs: hash it as DVC would
                md5 = hashlib.md5(self.read(f"{folder}/{name}")).hexdigest()
            out[name] = {"md5": md5, "size": entry.get("size")}
        return dict(sorted(out.items()))


def resolve_rev(repo: Path, rev: str) -> str:
    """The commit sha of `rev` (`workspace` stays `workspace`), or a TidepoolError."""
    if rev in (WORKSPACE, EMPTY):
        return rev
    proc = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise TidepoolError(f"{repo}: git revision {rev!r} not found")
    return proc.stdout.strip()


# --- pieces ---------------------------------------------------------------------------------------


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys for nested mappings; lists and scalars are leaves."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for key in sorted(obj, key=str):
            out.update(flatten(obj[key], f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: obj} if prefix else {}


def params_diff(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    fa, fb = flatten(a), flatten(b)
    out = []
    for key in sorted(set(fa) | set(fb)):
        old, new = fa.get(key, _ABSENT), fb.get(key, _ABSENT)
        if old != new:
            out.append(
                {
                    "key": key,
                    "a": None if old is _ABSENT else old,
                    "b": None if new is _ABSENT else new,
                    "change": "added" if old is _ABSENT else "removed" if new is _ABSENT else "changed",
                }
            )
    return out


_ABSENT = object()


def _canonical_labels(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return json.dumps(json.loads(value), sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return str(value)


def read_manifest(reader: RevReader, product: str) -> pd.DataFrame | None:
    table = reader.parquet(f"{RELEASE}/{product}/{MANIFEST}")
    if table is None:
        return None
    missing = [c for c in ("key", "split", "shard") if c not in table.column_names]
    if missing:
        raise UpstreamFormatError(
            f"{RELEASE}/{product}/{MANIFEST} @ {reader.rev}", f"lacks columns {missing}"
        )
    wanted = [*MANIFEST_COLUMNS, *OPTIONAL_COLUMNS]
    cols = {c: table.column(c).to_pylist() if c in table.column_names else None for c in wanted}
    n = table.num_rows
    frame = pd.DataFrame(
        {
            "key": pd.Series(cols["key"], dtype=object),
            "split": pd.Series(cols["split"], dtype=object),
            "shard": pd.Series(cols["shard"], dtype=object),
            "label": pd.Series(cols["label"] or [None] * n, dtype=object),
            "labels": pd.Series([_canonical_labels(v) for v in (cols["labels"] or [None] * n)], dtype=object),
            **{c: pd.Series(cols[c] or [None] * n, dtype=object) for c in OPTIONAL_COLUMNS},
        }
    )
    dupes = frame["key"][frame["key"].duplicated()]
    if len(dupes):
        raise UpstreamFormatError(
            f"{RELEASE}/{product}/{MANIFEST} @ {reader.rev}", f"key {dupes.iloc[0]!r} appears twice"
        )
    return frame


def _examples(values: Iterable[Any]) -> list[Any]:
    return sorted(values, key=lambda v: json.dumps(v, sort_keys=True))[:EXAMPLES]


def class_counts(classes: dict[str, Any] | None, manifest: pd.DataFrame | None) -> dict[str, Counter[str]]:
    """split -> class name -> count: classes.json's per-split counts, else the manifest's labels."""
    out: dict[str, Counter[str]] = {s: Counter() for s in SPLITS}
    if classes and isinstance(classes.get("classes"), list):
        for entry in classes["classes"]:
            name = str(entry.get("name", entry.get("index")))
            for split, n in (entry.get("count") or {}).items():
                if n:
                    out.setdefault(split, Counter())[name] += int(n)
        return out
    if manifest is not None:
        for split, label in zip(manifest["split"], manifest["label"]):
            if label is not None:
                out.setdefault(split, Counter())[str(label)] += 1
    return out


def labels_change(a: str | None, b: str | None) -> list[str]:
    """The top-level fields of two labels JSON documents that differ (sorted)."""
    def parse(v: str | None) -> dict[str, Any]:
        try:
            doc = json.loads(v) if v else {}
        except ValueError:
            return {"labels": v}
        return doc if isinstance(doc, dict) else {"labels": doc}

    da, db = parse(a), parse(b)
    return sorted(k for k in set(da) | set(db) if da.get(k) != db.get(k))


def relabel_pairs(relabelled: pd.DataFrame) -> list[dict[str, Any]]:
    """Relabels as from -> to counts, most frequent first. A sample whose `label` stayed but whose
    labels JSON changed counts under its label with the JSON fields that changed."""
    pairs: Counter[tuple[Any, Any, str]] = Counter()
    for la, lb, ja, jb in zip(relabelled["label_a"], relabelled["label_b"], relabelled["labels_a"],
                              relabelled["labels_b"]):  # fmt: skip
        fields = "" if la != lb else ", ".join(labels_change(ja, jb))
        pairs[(la, lb, fields)] += 1
    rows = [{"a": a, "b": b, "fields": f or None, "count": n} for (a, b, f), n in pairs.items()]
    return sorted(rows, key=lambda r: (-r["count"], str(r["a"]), str(r["b"]), str(r["fields"])))


def source_counts(added: pd.DataFrame, removed: pd.DataFrame) -> dict[str, dict[str, int]]:
    """source -> {"added", "removed"}; samples with no source column count under "unknown"."""
    out: dict[str, dict[str, int]] = {}
    for frame, column, kind in ((added, "source_b", "added"), (removed, "source_a", "removed")):
        for source in frame[column]:
            row = out.setdefault(str(source) if source is not None else "unknown", {"added": 0, "removed": 0})
            row[kind] += 1
    return dict(sorted(out.items()))


def product_diff(
    a: RevReader,
    b: RevReader,
    product: str,
    a_md5s: set[str],
    pictures: Path | None = None,
    withheld: str | None = None,
) -> dict[str, Any]:
    """The diff of one product; `a_md5s` is every release file's md5 at rev A (upload accounting);
    with `pictures`, its contact sheet and class chart are drawn there (with placeholders for the
    images when `withheld` says why they may not be shown)."""
    ma, mb = read_manifest(a, product), read_manifest(b, product)
    if ma is None and mb is None:
        return {"status": "absent"}
    status = "added" if ma is None else "removed" if mb is None else "compared"
    empty = pd.DataFrame({c: pd.Series(dtype=object) for c in [*MANIFEST_COLUMNS, *OPTIONAL_COLUMNS]})
    ma = empty if ma is None else ma
    mb = empty if mb is None else mb

    joined = ma.merge(mb, on="key", how="outer", suffixes=("_a", "_b"), indicator=True)
    added = joined[joined["_merge"] == "right_only"]
    removed = joined[joined["_merge"] == "left_only"]
    both = joined[joined["_merge"] == "both"]
    relabel_mask = (both["label_a"].to_numpy() != both["label_b"].to_numpy()) | (
        both["labels_a"].to_numpy() != both["labels_b"].to_numpy()
    )
    relabelled = both[relabel_mask]
    moved = both[both["split_a"].to_numpy() != both["split_b"].to_numpy()]

    by_split = {}
    for split in SPLITS:
        by_split[split] = {
            "a": int((ma["split"] == split).sum()),
            "b": int((mb["split"] == split).sum()),
            "added": int((added["split_b"] == split).sum()),
            "removed": int((removed["split_a"] == split).sum()),
            "relabelled": int((relabelled["split_b"] == split).sum()),
            "moved_in": int((moved["split_b"] == split).sum()),
            "moved_out": int((moved["split_a"] == split).sum()),
        }
    moves = Counter(f"{x}->{y}" for x, y in zip(moved["split_a"], moved["split_b"]))

    ca = class_counts(a.json(f"{RELEASE}/{product}/{CLASSES}"), ma if len(ma) else None)
    cb = class_counts(b.json(f"{RELEASE}/{product}/{CLASSES}"), mb if len(mb) else None)
    classes: dict[str, dict[str, dict[str, int]]] = {}
    for split in [*SPLITS, *sorted((set(ca) | set(cb)) - set(SPLITS))]:
        rows = {}
        for name in sorted(set(ca.get(split, {})) | set(cb.get(split, {}))):
            na, nb = ca.get(split, Counter())[name], cb.get(split, Counter())[name]
            if na != nb:
                rows[name] = {"a": na, "b": nb, "delta": nb - na}
        if rows:
            classes[split] = rows

    la = a.listing(f"{RELEASE}/{product}")
    lb = b.listing(f"{RELEASE}/{product}")
    tars_a = {n: v["md5"] for n, v in la.items() if n.endswith(".tar")}
    tars_b = {n: v["md5"] for n, v in lb.items() if n.endswith(".tar")}
    shards = {
        "a": len(tars_a),
        "b": len(tars_b),
        "added": sorted(set(tars_b) - set(tars_a)),
        "removed": sorted(set(tars_a) - set(tars_b)),
        "modified": sorted(n for n in set(tars_a) & set(tars_b) if tars_a[n] != tars_b[n]),
    }
    shards["changed"] = len(shards["added"]) + len(shards["removed"]) + len(shards["modified"])
    upload = upload_size(b, product, lb, a_md5s)

    result: dict[str, Any] = {
        "status": status,
        "samples": {
            "a": len(ma),
            "b": len(mb),
            "added": len(added),
            "removed": len(removed),
            "relabelled": len(relabelled),
            "moved": len(moved),
        },
        "by_split": by_split,
        "moves": dict(sorted(moves.items())),
        "classes": classes,
        "shards": shards,
        "upload": upload,
        "examples": {
            "added": _examples(added["key"]),
            "removed": _examples(removed["key"]),
            "relabelled": _examples(
                {"key": k, "a": x, "b": y}
                for k, x, y in zip(relabelled["key"], relabelled["label_a"], relabelled["label_b"])
            ),
            "moved": _examples(
                {"key": k, "a": x, "b": y}
                for k, x, y in zip(moved["key"], moved["split_a"], moved["split_b"])
            ),
        },
        "relabels": relabel_pairs(relabelled),
        "by_source": source_counts(added, removed),
    }
    if pictures is not None:
        frames = {"added": added, "removed": removed, "relabelled": relabelled}
        result["pictures"] = draw_pictures(a, b, product, pictures, frames, ca, cb, withheld)
    return result


def _rows_for(frame: pd.DataFrame, side: str, keys: list[str]) -> list[dict[str, Any]]:
    """Manifest rows (one side of the join) of `keys`, as plain dicts, in `keys` order."""
    chosen = frame.set_index("key").loc[keys] if keys else frame.iloc[0:0].set_index("key")
    rows = []
    for key, r in chosen.iterrows():
        row = {c: _plain(r.get(f"{c}_{side}")) for c in ["split", "shard", *OPTIONAL_COLUMNS]}
        row.update(key=key, label_a=_plain(r.get("label_a")), label_b=_plain(r.get("label_b")))
        if side == "b" and r.get("_merge") == "both" and r.get("label_a") == r.get("label_b"):
            fields = labels_change(_plain(r.get("labels_a")), _plain(r.get("labels_b")))
            row["label_line"] = "labels: " + ", ".join(fields) if fields else "labels changed"
        rows.append(row)
    return rows


def _plain(value: Any) -> Any:
    """pandas' missing values as None, numpy scalars as Python ones."""
    if value is None:
        return None
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return value.item() if hasattr(value, "item") else value


def draw_pictures(
    a: RevReader,
    b: RevReader,
    product: str,
    out_dir: Path,
    changed: dict[str, pd.DataFrame],
    ca: dict[str, Counter[str]],
    cb: dict[str, Counter[str]],
    withheld: str | None = None,
) -> dict[str, Any]:
    """The contact sheet and class chart of one product (stages.diff_pictures); what was drawn."""
    from stages import diff_pictures as pics

    meta = {"a": {"rev": a.rev, "commit": a.commit}, "b": {"rev": b.rev, "commit": b.commit}}
    groups: dict[str, list[tuple[Any, Any]]] = {}
    totals = {kind: len(frame) for kind, frame in changed.items()}
    for kind, frame in changed.items():
        side = "a" if kind == "removed" else "b"  # a removed sample's image is only at rev A
        reader = a if side == "a" else b
        rows = _rows_for(frame, side, pics.pick(frame["key"]))
        groups[kind] = []
        for cell, row in zip(pics.make_cells(kind, rows), rows):
            shard = f"{RELEASE}/{product}/{row['shard']}"
            groups[kind].append((cell, None if withheld else pics.sample_image(reader, shard, row)))
    sheet = pics.contact_sheet(product, groups, totals, out_dir, meta, withheld)
    totals_a: Counter[str] = sum(ca.values(), Counter())
    totals_b: Counter[str] = sum(cb.values(), Counter())
    chart = pics.class_chart(product, dict(totals_a), dict(totals_b), out_dir, meta)
    names = pics.file_names(product)
    return {
        "changes": names["changes"] if sheet else None,
        "manifest": names["manifest"] if sheet else None,
        "cells": len(sheet["cells"]) if sheet else 0,
        "classes": chart["file"] if chart else None,
    }


def upload_size(
    b: RevReader, product: str, listing: dict[str, dict[str, Any]], a_md5s: set[str]
) -> dict[str, Any]:
    """Files (and bytes) of the product at rev B whose content rev A's release does not hold."""
    sizes = {}
    for name in listing:
        if name.endswith(".index.json"):
            index = b.json(f"{RELEASE}/{product}/{name}") or {}
            for shard in index.get("shardlist", []):
                sizes[shard["url"]] = int(shard["filesize"])
    new = sorted(n for n, v in listing.items() if v["md5"] not in a_md5s)
    total = 0
    for name in new:
        size = listing[name]["size"]
        if size is None:
            size = sizes.get(name)
        path = f"{RELEASE}/{product}/{name}"
        if size is None:
            size = b.sizes.get(path)
        if size is None:  # side files (cards, product.json): DVC's .dir listing has no sizes
            size = len(b.read(path))
        total += int(size)
    return {"files": len(new), "bytes": total, "names": new}


def _release_md5s(reader: RevReader, products: Iterable[str]) -> set[str]:
    md5s: set[str] = set()
    for product in products:
        md5s |= {v["md5"] for v in reader.listing(f"{RELEASE}/{product}").values()}
    return md5s


def quarantine_counts(reader: RevReader, source: str) -> tuple[Counter[str], set[tuple[str, str, str]]]:
    table = reader.parquet(
        f"data/interim/{source}/quarantine.parquet", ["record_kind", "record_id", "reason"]
    )
    if table is None:
        return Counter(), set()
    kinds, ids, reasons = (table.column(c).to_pylist() for c in ("record_kind", "record_id", "reason"))
    records = {(str(k), str(i), str(r)) for k, i, r in zip(kinds, ids, reasons)}
    return Counter(str(r) for r in reasons), records


def quarantine_diff(a: RevReader, b: RevReader, sources: Iterable[str]) -> dict[str, Any]:
    out = {}
    for source in sorted(sources):
        ca, ra = quarantine_counts(a, source)
        cb, rb = quarantine_counts(b, source)
        rows = {}
        for reason in sorted(set(ca) | set(cb)):
            new = sum(1 for rec in rb - ra if rec[2] == reason)
            resolved = sum(1 for rec in ra - rb if rec[2] == reason)
            if ca[reason] != cb[reason] or new or resolved:
                rows[reason] = {
                    "a": ca[reason],
                    "b": cb[reason],
                    "delta": cb[reason] - ca[reason],
                    "new": new,
                    "resolved": resolved,
                }
        if rows:
            out[source] = rows
    return out


def _clusters(reader: RevReader) -> dict[str, frozenset[str]]:
    table = reader.parquet("data/dedup/clusters.parquet", ["cluster_id", "sample_id"])
    if table is None:
        return {}
    members: dict[str, set[str]] = {}
    for cid, sid in zip(table.column("cluster_id").to_pylist(), table.column("sample_id").to_pylist()):
        members.setdefault(str(cid), set()).add(str(sid))
    return {k: frozenset(v) for k, v in members.items()}


def dedup_diff(a: RevReader, b: RevReader) -> dict[str, Any]:
    ma = a.json("metrics/dedup.json", {}) or {}
    mb = b.json("metrics/dedup.json", {}) or {}
    metrics = {}
    for key in DEDUP_METRICS:
        va, vb = ma.get(key), mb.get(key)
        if isinstance(va, int | float) or isinstance(vb, int | float):
            metrics[key] = {"a": va, "b": vb, "delta": (vb or 0) - (va or 0)}
    pa_, pb_ = ma.get("pairs") or {}, mb.get("pairs") or {}
    pairs = {}
    for kind in sorted(set(pa_) | set(pb_)):
        ta, tb = _pair_total(pa_.get(kind)), _pair_total(pb_.get(kind))
        if ta != tb:
            pairs[kind] = {"a": ta, "b": tb, "delta": tb - ta}
    ka, kb = _clusters(a), _clusters(b)
    by_members_a = set(ka.values())
    clusters = {
        "a": len(ka),
        "b": len(kb),
        "new": sum(1 for cid in kb if cid not in ka),
        "gone": sum(1 for cid in ka if cid not in kb),
        "changed": sum(1 for cid in kb if cid in ka and ka[cid] != kb[cid]),
        "unchanged": sum(1 for members in kb.values() if members in by_members_a),
    }
    return {"metrics": metrics, "pairs": pairs, "clusters": clusters}


def _pair_total(value: Any) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return sum(_pair_total(v) for v in value.values())
    return 0


# --- the whole diff -------------------------------------------------------------------------------


def withheld_images(product: str, *params: dict[str, Any]) -> str | None:
    """Why the product's images may not appear in the diff's pictures, or None: a source of it
    (at either revision) is marked `redistributable: false` in params."""
    closed = sorted({
        source
        for doc in params
        for source in ((doc.get("products") or {}).get(product) or {}).get("sources") or []
        if ((doc.get("sources") or {}).get(source) or {}).get("redistributable", True) is False
    })
    return f"{', '.join(closed)} not redistributable" if closed else None


def release_diff(
    repo: Path,
    rev_a: str,
    rev_b: str,
    products: Iterable[str] | None = None,
    pictures: Path | None = None,
) -> dict[str, Any]:
    """The diff of `rev_b` against `rev_a` as a JSON-ready dict (see the module docstring); with
    `pictures`, each product's contact sheet and class chart are written into that folder."""
    a, b = RevReader(repo, rev_a), RevReader(repo, rev_b)
    pa_params, pb_params = a.yaml("params.yaml"), b.yaml("params.yaml")
    declared = sorted(set(pa_params.get("products") or {}) | set(pb_params.get("products") or {}))
    chosen = list(products) if products else declared
    unknown = sorted(set(chosen) - set(declared))
    if unknown:
        raise TidepoolError(
            f"no product {unknown} in params.yaml at {rev_a} or {rev_b}; declared: {declared}"
        )
    a_md5s = _release_md5s(a, sorted(set(pa_params.get("products") or {})))
    sources = set(pa_params.get("sources") or {}) | set(pb_params.get("sources") or {})
    out_dir = None
    if pictures is not None:
        from stages.diff_pictures import clear

        out_dir = pictures if pictures.is_absolute() else repo / pictures
        clear(out_dir)
    return {
        "a": {"rev": rev_a, "commit": a.commit},
        "b": {"rev": rev_b, "commit": b.commit},
        "products": {
            p: product_diff(a, b, p, a_md5s, out_dir, withheld_images(p, pa_params, pb_params))
            for p in chosen
        },
        "quarantine": quarantine_diff(a, b, sources),
        "dedup": dedup_diff(a, b),
        "params": params_diff(pa_params, pb_params),
    }


# --- markdown -------------------------------------------------------------------------------------


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, list | dict):
        value = json.dumps(value, sort_keys=True)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _signed(n: int) -> str:
    return f"+{n}" if n > 0 else str(n)


def _names(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" … and {len(names) - limit} more" if len(names) > limit else "")


def _fold(rows: list[list[Any]], header: list[str], top: int, what: str) -> list[str]:
    """A table of the first `top` rows, the rest in a <details> block (so long tables stay short)."""
    out = _table(header, rows[:top])
    if len(rows) > top:
        out += ["", f"<details><summary>{len(rows) - top} more {what}</summary>", ""]
        out += _table(header, rows[top:])
        out += ["", "</details>"]
    return out


def _picture_lines(name: str, pictures: dict[str, Any] | None, image_base: str | None) -> list[str]:
    if not pictures or image_base is None:
        return []
    base = image_base.rstrip("/")
    lines = []
    if pictures.get("changes"):
        lines.append(f"![{name}: added, removed and relabelled samples]({base}/{pictures['changes']})")
    if pictures.get("classes"):
        lines.append(f"![{name}: samples per class before and after]({base}/{pictures['classes']})")
    return ["", *lines] if lines else []


def to_markdown(diff: dict[str, Any], heading: str = "##", image_base: str | None = None) -> str:
    """The diff as markdown; with `image_base`, the products' pictures are embedded from there."""
    a, b = diff["a"]["rev"], diff["b"]["rev"]
    out = [f"{heading} Dataset diff `{a}` → `{b}`", ""]
    summary = []
    for name, d in diff["products"].items():
        if d["status"] == "absent":
            continue
        s = d["samples"]
        summary.append(
            [
                name,
                s["a"],
                s["b"],
                _signed(s["b"] - s["a"]),
                s["added"],
                s["removed"],
                s["relabelled"],
                s["moved"],
                d["shards"]["changed"],
                human_bytes(d["upload"]["bytes"]),
            ]
        )
    if summary:
        header = ["product", a, b, "Δ", "added", "removed", "relabelled", "moved split"]
        out += _table([*header, "shards changed", "push uploads"], summary)
    else:
        out.append("No release products at either revision.")
    for name, d in diff["products"].items():
        if d["status"] == "absent":
            continue
        out += ["", f"{heading}# {name}", ""]
        if d["status"] != "compared":
            out.append(f"Product {d['status']} in `{b}`.")
            out.append("")
        rows = [
            [split, v["a"], v["b"], v["added"], v["removed"], v["relabelled"], v["moved_in"], v["moved_out"]]
            for split, v in d["by_split"].items()
        ]
        out += _table(["split", a, b, "added", "removed", "relabelled", "moved in", "moved out"], rows)
        if d["moves"]:
            out += ["", "Moves: " + ", ".join(f"{k} {v}" for k, v in d["moves"].items()) + "."]
        out += _picture_lines(name, d.get("pictures"), image_base)
        by_source = d.get("by_source") or {}
        if by_source:
            out += ["", "Added and removed by source:", ""]
            out += _table(["source", "added", "removed"],
                          [[src, v["added"], v["removed"]] for src, v in by_source.items()])  # fmt: skip
        relabels = d.get("relabels") or []
        if relabels:
            rows = [[r["a"], r["b"] if r["a"] != r["b"] else f"{r['b']} (labels: {r['fields']})", r["count"]]
                    for r in relabels]  # fmt: skip
            out += ["", "Relabels (from → to):", ""]
            out += _fold(rows, ["from", "to", "samples"], RELABEL_TOP, "relabel pairs")
        class_rows = sorted(
            ([split, cls, v["a"], v["b"], v["delta"]] for split, per in d["classes"].items()
             for cls, v in per.items()),
            key=lambda r: (-abs(r[4]), SPLITS.index(r[0]) if r[0] in SPLITS else len(SPLITS), r[0], r[1]),
        )  # fmt: skip
        if class_rows:
            class_rows = [[*r[:4], _signed(r[4])] for r in class_rows]
            shown = min(len(class_rows), CLASS_TOP)
            out += ["", f"Class counts that changed ({len(class_rows)}; largest first):", ""]
            out += _fold(class_rows, ["split", "class", a, b, "Δ"], shown, "class count changes")
        else:
            out += ["", "No class count changed."]
        sh, up = d["shards"], d["upload"]
        parts = []
        for kind in ("added", "removed", "modified"):
            if sh[kind]:
                parts.append(f"{kind} {len(sh[kind])} ({_names(sh[kind])})")
        out += [
            "",
            f"Shards: {sh['a']} → {sh['b']}; " + ("; ".join(parts) if parts else "none changed") + ".",
            f"`dvc push` uploads {up['files']} file(s), {human_bytes(up['bytes'])} ({up['bytes']} bytes).",
        ]
        ex = d["examples"]
        lines = []
        for kind in ("added", "removed"):
            if ex[kind]:
                lines.append(f"- {kind}: {_names(ex[kind], EXAMPLES)}")
        if ex["relabelled"]:
            shown_ex = ", ".join(
                f"`{e['key']}` {e['a']} → {e['b']}" if e["a"] != e["b"] else f"`{e['key']}` (labels)"
                for e in ex["relabelled"]
            )
            lines.append(f"- relabelled: {shown_ex}")
        if ex["moved"]:
            lines.append("- moved: " + ", ".join(f"`{e['key']}` {e['a']} → {e['b']}" for e in ex["moved"]))
        if lines:
            out += ["", f"<details><summary>Example keys (first {EXAMPLES} of each)</summary>", "", *lines,
                    "", "</details>"]  # fmt: skip

    out += ["", f"{heading}# Quarantine", ""]
    q_rows = [
        [source, reason, v["a"], v["b"], _signed(v["delta"]), v["new"], v["resolved"]]
        for source, per in diff["quarantine"].items()
        for reason, v in per.items()
    ]
    out += _table(["source", "reason", a, b, "Δ", "new", "resolved"], q_rows) if q_rows else ["No change."]

    dd = diff["dedup"]
    out += ["", f"{heading}# Dedup", ""]
    d_rows = [[k, v["a"], v["b"], _signed(v["delta"])] for k, v in dd["metrics"].items() if v["delta"]]
    d_rows += [[f"pairs: {k}", v["a"], v["b"], _signed(v["delta"])] for k, v in dd["pairs"].items()]
    if d_rows:
        out += _table(["metric", a, b, "Δ"], d_rows)
    else:
        out.append("Metrics unchanged.")
    c = dd["clusters"]
    out += [
        "",
        f"Clusters: {c['a']} → {c['b']}: {c['new']} new, {c['gone']} gone, {c['changed']} with changed "
        f"members, {c['unchanged']} unchanged.",
    ]

    out += ["", f"{heading}# Params", ""]
    p_rows = [[f"`{p['key']}`", p["a"], p["b"]] for p in diff["params"]]
    out += _table(["key", a, b], p_rows) if p_rows else ["No change."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.diff", description=__doc__.split("\n")[0])
    parser.add_argument("rev_a", help="the older revision (tag, branch, sha, or `workspace`)")
    parser.add_argument("rev_b", help="the newer revision (tag, branch, sha, or `workspace`)")
    parser.add_argument("--json", action="store_true", help="canonical JSON instead of markdown")
    parser.add_argument("--product", action="append", default=None, help="only this product (repeatable)")
    parser.add_argument("--repo", type=Path, default=None, help="the project (default: the current one)")
    parser.add_argument("--output", type=Path, default=None, help="write here instead of stdout")
    parser.add_argument("--pictures", type=Path, default=None,
                        help="draw each product's contact sheet and class chart into this folder "
                             "(relative to the project)")  # fmt: skip
    parser.add_argument("--image-base", default=None,
                        help="where the markdown finds the pictures (a URL or path; default: --pictures)")
    args = parser.parse_args(argv)
    repo = (args.repo or repo_root()).resolve()
    diff = release_diff(repo, args.rev_a, args.rev_b, args.product, args.pictures)
    base = args.image_base or (args.pictures.as_posix() if args.pictures is not None else None)
    text = dumps_json(diff) if args.json else to_markdown(diff, image_base=base)
    if args.output:
        write_text(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    run_main(main)
