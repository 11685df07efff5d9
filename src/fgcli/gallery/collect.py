"""Read an output tree into what the gallery shows: images, their maps, the run, an eval.

Reads only: the merged manifest and any shard manifests (the latest line of each
(key, rank) by :class:`fgcli.tree.manifest.Latest`'s rule, so a gallery of a running or
sharded dump is a consistent snapshot), ``run.json`` and ``eval.json``. The per-layer
terms of ``decomp/*.npz`` are summed here (a chart needs one number per layer) and
cached in ``gallery/terms-cache.json`` by file size and mtime, so a rebuild after a
resumed dump opens only the new files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fgcli.names import path_of
from fgcli.tree.layout import FOLDER, MANIFEST, RUN_JSON, SUFFIX
from fgcli.tree.manifest import BadLines, Latest, TreeFiles, iter_manifest, shard_manifests

KINDS = ("overlay", "heatmap", "map", "decomp")
TERMS_CACHE = "terms-cache.json"


@dataclass
class Entry:
    """One manifest line: an image's map for one target (or its failure)."""

    record: dict[str, Any]
    stem: str | None = None  # the outputs' shared name, e.g. "a.jpg.top1_281"
    paths: dict[str, str] = field(default_factory=dict)  # kind -> path in the tree
    thumb: str | None = None  # "thumbs/<stem>.jpg" once made


@dataclass
class Image:
    """All entries of one key (its --topk ranks), best rank first."""

    key: str
    original: str | None  # the input file, as a path relative to the tree, if found
    entries: list[Entry]

    @property
    def status(self) -> str:
        return self.entries[0].record.get("status") or "failed"


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from a file, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def latest_records(root: Path, bad: BadLines | None = None,
                   files: TreeFiles | None = None) -> list[dict[str, Any]]:
    """The latest record of every (key, rank) in the tree, in key order.

    Malformed lines are skipped, and so is a latest record with an output that leads out
    of the tree (a symbolic link: never read); both are counted in ``bad``.
    """
    best = Latest()
    kept: dict[tuple[str, Any], dict[str, Any]] = {}
    for path in [root / MANIFEST, *shard_manifests(root)]:
        for offset, rec in iter_manifest(path, bad):
            k = (rec["key"], rec.get("rank"))
            best.offer(rec, path, offset)
            if best[k][1:] == (path, offset):
                kept[k] = rec
    files = files or TreeFiles(root)
    out = []
    for k, rec in kept.items():
        kind = files.outside(rec.get("outputs", {}))
        if kind is None:
            out.append(rec)
        elif bad is not None:
            bad.add(best[k][1], f"key {rec['key']}", f"outputs.{kind} leads outside the tree")
    out.sort(key=lambda r: (r["key"], r.get("rank") or 0))
    return out


def _stem_and_paths(rec: dict[str, Any], files: TreeFiles
                    ) -> tuple[str | None, dict[str, str]]:
    """The outputs that exist on disk (inside the tree), and their shared stem when they
    follow the tree's naming rule (``<folder>/<stem><suffix>``)."""
    paths: dict[str, str] = {}
    stem = None
    outputs = rec.get("outputs") or {}
    for kind in KINDS:
        rel = outputs.get(kind)
        if not isinstance(rel, str) or files.state(rel) != "file":
            continue
        paths[kind] = rel
        prefix, suffix = FOLDER[kind] + "/", SUFFIX[kind]
        if rel.startswith(prefix) and rel.endswith(suffix):
            stem = stem or rel[len(prefix):len(rel) - len(suffix)]
    return stem, paths


def _original(rec: dict[str, Any], root: str, cwd: Path | None) -> str | None:
    """The input file as a path relative to the tree (``root``: its absolute path), what
    a file:// page can load (an OS string: a name that is not UTF-8 keeps its bytes).
    Symbolic links are kept (the browser follows them)."""
    raw = path_of(rec)
    if not isinstance(raw, str) or raw in ("", "-"):
        return None
    candidates = [Path(raw)] if os.path.isabs(raw) else [
        *((cwd / raw,) if cwd else ()), Path.cwd() / raw]
    for path in candidates:
        if path.is_file():
            return Path(os.path.relpath(os.path.abspath(path), root)).as_posix()
    return None


def collect_images(root: Path, bad: BadLines | None = None
                   ) -> tuple[list[Image], dict[str, Any]]:
    """The images of the tree (key order) and its run.json (empty when missing);
    malformed manifest lines are skipped and counted in ``bad``."""
    run = read_json(root / RUN_JSON) or {}
    where = path_of(run, "cwd")
    cwd = Path(where) if where else None
    absolute = os.path.abspath(root)
    files = TreeFiles(root)
    by_key: dict[str, list[Entry]] = {}
    for rec in latest_records(root, bad, files):
        stem, paths = _stem_and_paths(rec, files)
        by_key.setdefault(rec["key"], []).append(Entry(rec, stem, paths))
    images = []
    for key, entries in by_key.items():
        ok = [e for e in entries if e.record.get("status") != "failed"]
        failed = [e for e in entries if e.record.get("status") == "failed"]
        # a failure newer than every map means the image is failed now
        newest_ok = max((str(e.record.get("time") or "") for e in ok), default="")
        newest_fail = max((str(e.record.get("time") or "") for e in failed), default="")
        chosen = failed[-1:] if failed and (not ok or newest_fail > newest_ok) else ok
        chosen.sort(key=lambda e: e.record.get("rank") or 0)
        rec = chosen[0].record
        images.append(Image(key, _original(rec, absolute, cwd), chosen))
    return images, run


# ------------------------------------------------------------------------ decomposition
def decomp_terms(path: Path) -> tuple[list[str], list[float]]:
    """Layer names and [input, one term per layer (its bias sum plus any off-grid share),
    residual, logit] of one ``decomp/*.npz``: the terms sum to the logit."""
    with np.load(path, allow_pickle=False) as z:
        names = [str(n) for n in z["layers"]]
        files = set(z.files)
        values = [float(z["input"].sum(dtype=np.float64))]
        for name in names:
            total = 0.0
            for prefix in ("bias/", "offgrid/"):
                if prefix + name in files:
                    total += float(z[prefix + name].sum(dtype=np.float64))
            values.append(total)
        values += [float(z["residual"]), float(z["logit"])]
    return names, values


class TermsCache:
    """stem -> (size, mtime_ns, layer-table index, values), persisted as JSON."""

    def __init__(self, path: Path) -> None:
        self.path = path
        data = read_json(path) or {}
        self.tables: list[list[str]] = data.get("tables") or []
        self.rows: dict[str, list[Any]] = data.get("rows") or {}
        self._index = {tuple(t): i for i, t in enumerate(self.tables)}
        self.opened = 0

    def get(self, stem: str, file: Path) -> tuple[int, list[float]] | None:
        """(layer-table index, values), or None when the file cannot be read."""
        try:
            st = file.stat()
        except OSError:
            return None
        row = self.rows.get(stem)
        if row and row[0] == st.st_size and row[1] == st.st_mtime_ns:
            return row[2], row[3]
        try:
            names, values = decomp_terms(file)
        except (OSError, ValueError, KeyError):
            return None
        self.opened += 1
        table = self._index.get(tuple(names))
        if table is None:
            table = self._index[tuple(names)] = len(self.tables)
            self.tables.append(names)
        self.rows[stem] = [st.st_size, st.st_mtime_ns, table, values]
        return table, values

    def save(self, keep: set[str]) -> bytes:
        """The cache's JSON, keeping only ``keep``'s stems."""
        rows = {s: r for s, r in self.rows.items() if s in keep}
        return json.dumps({"tables": self.tables, "rows": rows},
                          separators=(",", ":")).encode("utf-8")
