"""``fullgrad report OUT``: a dataset audit of an output tree, in ``OUT/report/``::

    classes.csv       one row per target class: records, mean and sample std of every
                      map statistic, pointing game and energy in the boxes (with SEs)
    class_means.png   each class's mean map on a common grid, labelled (needs maps/)
    offobject.csv     the off-object lists: highest border mass, lowest energy in the
                      boxes, pointing misses by confidence; K each, linked to the gallery
    index.html        all of it as a static page (opens from disk)
    report.json       all of it, machine-readable (the gallery's class view reads it)

Reads a finished, merged, sharded or still-running tree without a lock, in memory
bounded in the number of records (:mod:`.scan`, :mod:`.accumulate`, :mod:`.grid`);
records without ``stats`` or ``objects`` (older trees) and failed lines are counted.
Formulas and columns: docs/report.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fgcli.errors import UsageError
from fgcli.gallery import GalleryReport, build_gallery
from fgcli.report.accumulate import STATS, ClassTable, OffObject
from fgcli.report.grid import MeanMaps, draw_grid
from fgcli.report.scan import LatestRecords
from fgcli.report.write import write_files
from fgcli.tree.atomic import atomic_write, writable_dir
from fgcli.tree.layout import MANIFEST
from fgcli.tree.manifest import BadLines, TreeFiles, shard_manifests

__all__ = ["REPORT_DIR", "ReportError", "ReportSummary", "write_report"]

REPORT_DIR = "report"
SCHEMA = 1
GRID_FILE = "class_means.png"
MAX_GRID = 256  # cells per side: a class's running sum is cells**2 float64s


class ReportError(ValueError):
    """OUT is not an output tree (one line, naming it)."""


@dataclass
class ReportSummary:
    folder: Path  # OUT/report
    records: int = 0  # latest records with a map (ok, or skipped as done)
    images: int = 0  # of them, the first rank's
    failed: int = 0  # latest lines that failed
    classes: int = 0
    with_stats: int = 0  # records with a `stats` object
    with_objects: int = 0  # records with an `objects` object
    maps: int = 0  # maps averaged into class_means.png
    maps_unusable: int = 0  # map files missing, unreadable, or with m+ summing to 0
    grid: bool = False  # class_means.png written
    gallery: GalleryReport | None = None  # the gallery, when it was rebuilt
    notes: list[str] = field(default_factory=list)  # one line each
    warnings: list[str] = field(default_factory=list)  # malformed manifest lines
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready values (``--json``)."""
        data = asdict(self)
        data["folder"] = str(self.folder)
        data["gallery"] = str(self.gallery.index) if self.gallery else None
        return data


@dataclass
class _Scan:
    """What one pass over the records gathers."""

    classes: ClassTable
    lists: OffObject
    maps: MeanMaps
    summary: ReportSummary
    map_records: int = 0  # records that name a map file


def write_report(out: str | Path, top: int = 50, grid: int = 32,
                 progress: Callable[[int, int], None] | None = None) -> ReportSummary:
    """Write ``OUT/report/`` (the module docstring) and rebuild the gallery when OUT has
    one; returns counts for the summary line.

    ``top``: entries per off-object list; ``grid``: cells per side of the common grid;
    ``progress(done, total)``: manifest lines read. Raises :class:`ReportError` when OUT
    is not an output tree, :class:`fgcli.errors.UsageError` for a bad ``top`` or
    ``grid``, :class:`fgcli.errors.SetupError` when OUT/report cannot be written
    (:class:`fgcli.tree.atomic.DiskFullError` on a full disk)."""
    start = time.perf_counter()
    if top < 0:
        raise UsageError(f"--top must be >= 0, not {top}")
    if not 1 <= grid <= MAX_GRID:
        raise UsageError(f"--grid must be between 1 and {MAX_GRID} cells, not {grid}")
    root = Path(out)
    if not root.is_dir():
        raise ReportError(f"{out}: no such directory")
    if not (root / MANIFEST).is_file() and not shard_manifests(root):
        raise ReportError(f"{out}: not an output tree of fullgrad dump (no {MANIFEST})")
    folder = root / REPORT_DIR
    writable_dir(folder, "OUT")
    bad = BadLines()
    scan = _Scan(ClassTable(), OffObject(top), MeanMaps(grid), ReportSummary(folder))
    files = TreeFiles(root)
    latest = LatestRecords(root, bad)
    latest.open()
    try:
        latest.index()
        for rec in latest.records(progress):
            _take(scan, rec, root, files)
    finally:
        latest.close()
    summary = scan.summary
    summary.warnings = bad.warnings()
    data = _assemble(scan, files, folder)
    summary.notes += _notes(scan, root)
    write_files(folder, data, summary.notes)
    if (root / "index.html").is_file():
        summary.gallery = build_gallery(root)
    summary.seconds = time.perf_counter() - start
    return summary


def _take(scan: _Scan, rec: dict[str, Any], root: Path, files: TreeFiles) -> None:
    """Fold one latest record into the class table, the lists and the mean maps."""
    summary = scan.summary
    if rec["status"] == "failed":
        summary.failed += 1
        return
    target = rec.get("target")
    if type(target) is not int:  # a result without a class: nothing to file it under
        return
    summary.records += 1
    summary.images += rec.get("rank") in (None, 1)
    stats = rec.get("stats") if isinstance(rec.get("stats"), dict) else None
    objects = rec.get("objects") if isinstance(rec.get("objects"), dict) else None
    summary.with_stats += stats is not None
    summary.with_objects += objects is not None
    scan.classes.add(scan.classes.row(target, rec.get("target_name")), stats, objects)
    outputs = rec.get("outputs") or {}
    scan.lists.add(rec, stats, objects, outputs.get("overlay") or outputs.get("heatmap"))
    rel = outputs.get("map")
    if isinstance(rel, str):
        scan.map_records += 1
        if files.state(rel) == "file":
            scan.maps.add(target, root / rel)
        else:
            scan.maps.unusable += 1


def _assemble(scan: _Scan, files: TreeFiles, folder: Path) -> dict[str, Any]:
    """report.json's content; writes (or removes) class_means.png on the way."""
    summary = scan.summary
    classes = scan.classes.rows()
    summary.classes = len(classes)
    tiles = []
    for c in classes:
        c["maps"] = scan.maps.counts.get(c["target"], 0)
        c["tile"] = None
        mean = scan.maps.mean(c["target"])
        if mean is not None:
            tiles.append((c, mean))
    grid = None
    if tiles:
        image, layout, places = draw_grid([(c["name"], m) for c, m in tiles], scan.maps.cells)
        for (c, _), place in zip(tiles, places):
            c["tile"] = place
        atomic_write(folder / GRID_FILE, lambda fh: image.save(fh, format="PNG"))
        grid = {"file": GRID_FILE, "cells": scan.maps.cells, **layout}
    else:
        (folder / GRID_FILE).unlink(missing_ok=True)  # a stale grid of an earlier report
    summary.grid = grid is not None
    summary.maps = sum(scan.maps.counts.values())
    summary.maps_unusable = scan.maps.unusable
    lists = scan.lists.result()
    for entries in lists.values():
        for e in entries:
            if e["picture"] is not None and files.state(e["picture"]) != "file":
                e["picture"] = None
    return {"schema": SCHEMA, "records": summary.records, "images": summary.images,
            "failed": summary.failed, "stats": list(STATS), "with_stats": summary.with_stats,
            "with_objects": summary.with_objects, "classes": classes, "grid": grid,
            "lists": lists}


def _notes(scan: _Scan, root: Path) -> list[str]:
    """One line for each part of the report that is empty or partial, and why."""
    s = scan.summary
    notes = []
    if not s.grid:
        why = ("no record names a map file (dump --save map)" if not scan.map_records
               else "no map file could be used")
        notes.append(f"{why}: {GRID_FILE} skipped")
    elif s.maps_unusable:
        notes.append(f"{s.maps_unusable} map file(s) missing, unreadable or constant: "
                     f"left out of {GRID_FILE}")
    if s.records and s.with_stats < s.records:
        notes.append(f"{s.records - s.with_stats} of {s.records} records have no stats "
                     "(an older dump): the stat columns count only the others")
    if s.records and not s.with_objects:
        notes.append("no record has objects (dump --boxes/--masks): pointing and energy "
                     "are empty")
    if not (root / "index.html").is_file():
        notes.append("no gallery in OUT yet: the links open once `fullgrad gallery OUT` "
                     "has run")
    return notes
