"""Write-back: a batch's files encoded and written in a bounded pool of writer threads,
and each image's manifest line once its files are whole.

The engine does not wait on PNG/JPEG encoding: :meth:`WriteBack.submit` queues a batch's
writer jobs and returns while at most ``PENDING_BATCHES`` batches are in flight; records
reach the ledger oldest first (:meth:`WriteBack.drain`). Encoding a map into a heatmap
or overlay happens here (:func:`write_outputs`, with :mod:`fgcli.render`); the tree
only writes the bytes (:class:`fgcli.tree.writer.OutputTree`).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from fgcli import render
from fgcli.config import RunConfig
from fgcli.dump.background import lower_priority
from fgcli.dump.ledger import Ledger
from fgcli.tree.atomic import TreeWriteError
from fgcli.tree.writer import OutputTree

PENDING_BATCHES = 3  # batches being encoded / written at once
DRAIN_SECONDS = 30.0  # after a stop signal: how long writes in flight may take to finish


@dataclass
class ImageJob:
    """Everything needed to write one image's outputs (runs in a writer thread)."""

    key: str
    rank: int | None
    cls: int
    saliency: Callable[[], np.ndarray]  # (h, w) float32 at model resolution, when ready
    original: np.ndarray | Any  # (H, W, 3) uint8 region the model saw, or a (3, H, W)
    # tensor on the model's device (--device-jpeg), or None
    size: tuple[int, int]  # (width, height) of that region
    decomp: dict[str, np.ndarray] | None
    locate: Callable[[np.ndarray], dict[str, Any]] | None = None  # --boxes/--masks: the
    # record's "objects" from the map (fgcli.audit.localise.locate, bound to the image)


def write_job(tree: OutputTree, job: ImageJob, cfg: RunConfig
              ) -> tuple[dict[str, str], dict[str, Any]]:
    """One image in a writer thread: its files (:func:`write_outputs`) and the record
    fields computed from its map on the host (``objects``). A mask that cannot be read
    leaves the image's result whole: its ``objects`` say why instead."""
    written = write_outputs(tree, job, cfg.save, cfg.colormap, cfg.alpha, cfg.overlay)
    fields: dict[str, Any] = {}
    if job.locate is not None:
        try:
            fields["objects"] = job.locate(job.saliency())
        except Exception as exc:  # noqa: BLE001 - the files are written: keep the result
            objects = getattr(job.locate, "keywords", {}).get("objects")
            source = "masks" if getattr(objects, "mask", None) is not None else "boxes"
            fields["objects"] = {"source": source, "error": one_line(exc)}
    return written, fields


def write_outputs(tree: OutputTree, job: ImageJob, save: tuple[str, ...], colormap: str,
                  alpha: float, overlay: str = "blend") -> dict[str, str]:
    """Write the requested outputs; returns kind -> path relative to the tree root.

    ``overlay``: the overlay style, ``blend`` or ``heat`` (:func:`render.overlay_style`).
    """
    written: dict[str, str] = {}
    indices = None
    saliency = job.saliency()
    for kind in save:
        dest = tree.path(kind, job.key, job.rank, job.cls)
        if kind == "map":
            tree.write_npy(dest, saliency.astype(np.float32, copy=False))
        elif kind == "decomp":
            if job.decomp is None:
                continue
            tree.write_npz(dest, job.decomp)
        else:
            lut = render.colormap_table(colormap)
            if indices is None:
                indices = render.heatmap_indices(saliency, job.size[0], job.size[1])
            if kind == "heatmap":
                tree.write_palette_png(dest, indices, lut)
            else:
                heat = render.colormapped(indices, lut)
                if job.original is not None and not isinstance(job.original, np.ndarray):
                    from fgcli.render.device import encode_overlays  # blend + encode on device

                    blob = encode_overlays([job.original], [heat], alpha, style=overlay,
                                           indices=[indices])[0]
                    tree.write_bytes(dest, blob)
                    written[kind] = dest.relative_to(tree.root).as_posix()
                    continue
                base = job.original if job.original is not None else np.zeros_like(heat)
                tree.write_jpeg(dest, render.overlay_style(overlay, base, heat, indices, alpha))
        written[kind] = dest.relative_to(tree.root).as_posix()
    return written


class WriteBack:
    """The writer pool of one process and the batches whose writes are in flight; each
    finished record goes to ``ledger``."""

    def __init__(self, tree: OutputTree, cfg: RunConfig, ledger: Ledger, writers: int
                 ) -> None:
        self.tree, self.cfg, self.ledger = tree, cfg, ledger
        self.pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="fgcli-writer",
                                       initializer=lower_priority)
        self.pending: deque[tuple[list[dict[str, Any]], list[Future]]] = deque()
        self.drain_until: float | None = None  # deadline for writes in flight once stopping

    def submit(self, jobs: list[tuple[dict[str, Any], ImageJob]]) -> None:
        """Queue one batch's (record, job) pairs; wait while too many batches are in
        flight (their lines are written meanwhile)."""
        records = [rec for rec, _ in jobs]
        futures = [self.pool.submit(write_job, self.tree, job, self.cfg) for _, job in jobs]
        self.pending.append((records, futures))
        self.drain(PENDING_BATCHES)

    def drain(self, keep: int) -> None:
        """Write manifest lines of finished batches, oldest first, until ``keep`` remain.

        An image whose write hit a full disk gets no line (a rerun computes it) and halts
        the run; any other write error fails that image. After a stop signal the wait is
        bounded (``DRAIN_SECONDS``): writes still running then get no line either."""
        while len(self.pending) > keep:
            records, futures = self.pending[0]
            while records:  # each record leaves the queue once handled: a second signal
                if self._finished(futures[0]):  # in the wait leaves it to salvage
                    self._settle(records[0], futures[0])
                del records[0], futures[0]
            self.pending.popleft()

    def _settle(self, rec: dict[str, Any], fut: Future) -> None:
        """The manifest line of one image whose writes are done."""
        try:
            rec["outputs"], fields = fut.result()
            rec.update(fields)
        except TreeWriteError as exc:
            self.ledger.halt(exc)
            return
        except Exception as exc:  # noqa: BLE001 - a write error fails one image
            self.ledger.write_failed(rec, f"cannot write outputs: {one_line(exc)}")
            return
        self.ledger.emit(rec)

    def salvage(self) -> None:
        """On the way out of a failed or interrupted loop: the lines of images whose
        writes are already done (no waiting), so a rerun does not compute them again."""
        with contextlib.suppress(Exception):
            while self.pending:
                records, futures = self.pending.popleft()
                for rec, fut in zip(records, futures):
                    if fut.done() and not fut.cancelled() and fut.exception() is None:
                        rec["outputs"], fields = fut.result()
                        rec.update(fields)
                        self.ledger.emit(rec)

    def _finished(self, fut: Future) -> bool:
        """Wait for one write: without limit, or until the deadline once a stop signal
        came (polled, so a signal that arrives meanwhile starts the deadline)."""
        stop = self.ledger.stop
        while True:
            if stop.requested and self.drain_until is None:
                self.drain_until = time.monotonic() + DRAIN_SECONDS
            left = None if self.drain_until is None else self.drain_until - time.monotonic()
            if left is not None and left <= 0:
                return fut.done()
            wait([fut], timeout=0.5 if left is None else min(left, 0.5))
            if fut.done():
                return True

    def close(self) -> None:
        """Shut the pool down; writes given up on after a stop signal are not waited for
        again."""
        self.pool.shutdown(wait=not self.ledger.stop.requested, cancel_futures=True)

    def abort(self) -> None:
        """A second signal (or an error) left the loop: stop at once, keep the lines of
        writes already done (:meth:`salvage`)."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.salvage()


def one_line(exc: BaseException) -> str:
    """The first line of an exception's text (its type's name when it has none)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
