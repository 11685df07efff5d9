"""Thumbnails for the gallery's grid: ``thumbs/<stem>.jpg``, at most THUMB pixels a side.

Made from the overlay (else the heatmap, else the original image), once: a thumbnail
newer than its source is kept, so rebuilding the gallery after a resumed dump makes
only the new ones. Each is written to a hidden temporary name beside it and moved into
place (:func:`fgcli.tree.atomic.atomic_write`), so a killed build leaves whole files only; a
full disk stops the build (:class:`fgcli.tree.atomic.DiskFullError`), any other failure costs
that thumbnail only. JPEG sources are decoded at a reduced scale
(``Image.draft``), which makes a thumbnail of a large overlay cost a few milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from fgcli.names import display
from fgcli.tree.atomic import DiskFullError, atomic_write

THUMB = 256
QUALITY = 82


@dataclass
class ThumbJob:
    source: Path  # overlay, heatmap or original
    dest: Path  # <tree>/thumbs/<stem>.jpg


@dataclass
class ThumbReport:
    made: int = 0
    kept: int = 0
    # thumbnail -> one line naming its source; that thumbnail no longer exists
    failed: dict[Path, str] = field(default_factory=dict)


def fresh(job: ThumbJob) -> bool:
    """True when the thumbnail exists and is not older than its source."""
    try:
        return job.dest.stat().st_mtime_ns >= job.source.stat().st_mtime_ns
    except OSError:
        return False


def make_thumb(source: Path, dest: Path, size: int = THUMB) -> None:
    """Write a JPEG thumbnail of ``source`` (longest side ``size``) atomically to ``dest``."""
    with Image.open(source) as img:
        if img.format == "JPEG":
            img.draft("RGB", (size, size))
        img = img.convert("RGB")
        img.thumbnail((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
    atomic_write(dest, lambda fh: img.save(fh, "JPEG", quality=QUALITY))


def make_thumbs(jobs: Iterable[ThumbJob], threads: int,
                progress: Callable[[int], None] | None = None) -> ThumbReport:
    """Make every stale thumbnail on ``threads`` threads (Pillow decodes without the GIL)."""
    report = ThumbReport()
    todo = []
    for job in jobs:
        if fresh(job):
            report.kept += 1
        else:
            todo.append(job)

    full: list[DiskFullError] = []  # a full disk: the jobs not started yet are skipped

    def one(job: ThumbJob) -> str | None:
        if full:
            return None
        try:
            make_thumb(job.source, job.dest)
        except DiskFullError as exc:
            full.append(exc)
            return None
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            job.dest.unlink(missing_ok=True)  # never show a stale map's thumbnail
            return f"{display(str(job.source))}: thumbnail failed: {reason}"
        return None

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for job, error in zip(todo, pool.map(one, todo)):
            if error is None:
                report.made += 1
            else:
                report.failed[job.dest] = error
            if progress is not None:
                progress(1)
    if full:
        raise full[0]
    return report
