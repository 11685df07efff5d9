"""A static HTML gallery of an output tree: ``fullgrad gallery OUT`` and ``dump --gallery``.

:func:`build_gallery` reads the tree (never changes what a dump wrote) and adds::

    index.html                 open it from disk: no server, no network
    thumbs/<stem>.jpg          grid thumbnails, made once (kept while newer than their source)
    gallery/data.js            one compact row per image, read by the page
    gallery/records/NNNNN.js   full manifest records and decomposition terms, per 200 maps
    gallery/app.js, style.css  the page's code
    gallery/terms-cache.json   per-layer sums of decomp/*.npz, by file size and mtime

With ``OUT/report/report.json`` (``fullgrad report``) the page also has a class view
(:mod:`.classes`); a malformed one is a warning, never a failure.

It takes no lock: it reads a snapshot of the manifests (merged and shards), so it can
show a dump that is still running, and every file it writes is moved into place whole.
Data flows one way: tree -> :mod:`.collect` -> :mod:`.thumbs` -> :mod:`.page`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fgcli.gallery.classes import class_view
from fgcli.gallery.collect import TERMS_CACHE, TermsCache, collect_images, read_json
from fgcli.gallery.page import eval_summary, write_page
from fgcli.gallery.thumbs import ThumbJob, ThumbReport, make_thumbs
from fgcli.tree.atomic import atomic_write
from fgcli.tree.layout import MANIFEST
from fgcli.tree.manifest import BadLines, shard_manifests

__all__ = ["GalleryError", "GalleryReport", "build_gallery"]


class GalleryError(ValueError):
    """The tree cannot be shown (one line, naming it)."""


@dataclass
class GalleryReport:
    index: Path
    images: int = 0
    maps: int = 0
    failed: int = 0  # images whose latest line failed
    thumbs: ThumbReport = field(default_factory=ThumbReport)
    decomp_read: int = 0  # decomp files summed (the others came from the cache)
    seconds: float = 0.0
    # malformed manifest lines skipped; a report.json ignored
    warnings: list[str] = field(default_factory=list)
    classes: int | None = None  # classes in the class view; None: no view


def build_gallery(out: str | Path, threads: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> GalleryReport:
    """Write ``OUT/index.html`` and what it needs; returns counts for the summary.

    ``threads`` make thumbnails (default: this process's cores); ``progress(done,
    total)`` is called as they are made. Raises :class:`GalleryError` when OUT is not
    an output tree, :class:`fgcli.tree.atomic.DiskFullError` when the disk fills up (the
    build stops; every file written is whole) and :class:`fgcli.tree.atomic.WriteFailed`
    when a file of the page cannot be written.
    """
    start = time.perf_counter()
    root = Path(out)
    if not root.is_dir():
        raise GalleryError(f"{out}: no such directory")
    if not (root / MANIFEST).is_file() and not shard_manifests(root):
        raise GalleryError(f"{out}: not an output tree of fullgrad dump (no {MANIFEST})")
    bad = BadLines()  # skipped lines: one warning per manifest, in the report
    images, run = collect_images(root, bad)

    jobs = []
    for image in images:
        for entry in image.entries:
            if entry.stem is None:
                continue
            for kind in ("overlay", "heatmap"):
                if kind in entry.paths:
                    source = root / entry.paths[kind]
                    break
            else:
                if image.original is None:
                    continue
                source = root / image.original
            entry.thumb = f"thumbs/{entry.stem}.jpg"
            jobs.append(ThumbJob(source, root / entry.thumb))
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, len(jobs))

    thumbs = make_thumbs(jobs, threads, tick)
    for image in images:  # a thumbnail that failed is gone (see make_thumbs)
        for entry in image.entries:
            if entry.thumb and root / entry.thumb in thumbs.failed:
                entry.thumb = None

    cache = TermsCache(root / "gallery" / TERMS_CACHE)
    evaluation = eval_summary(root, read_json(root / "eval.json"))
    title = f"fullgrad: {run.get('model', root.name)}" if run else f"fullgrad: {root.name}"
    report, report_warnings = class_view(root)
    maps = write_page(root, images, run, evaluation, cache, title, report)
    stems = {e.stem for i in images for e in i.entries if e.stem}
    saved = cache.save(stems)
    atomic_write(cache.path, lambda fh: fh.write(saved))
    return GalleryReport(
        index=root / "index.html", images=len(images), maps=maps,
        failed=sum(1 for i in images if i.status == "failed"), thumbs=thumbs,
        decomp_read=cache.opened, seconds=time.perf_counter() - start,
        warnings=bad.warnings() + report_warnings,
        classes=None if report is None else len(report["classes"]))
