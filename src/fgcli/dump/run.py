"""``run(config) -> RunReport``: paths -> decoded batches -> engine -> maps -> files.

Knows neither typer nor rich: progress and printing go through a
:class:`Reporter`. Data flows one way; decoding happens in DataLoader
workers, encoding and writing in a bounded background thread pool, so the
engine does not wait on PNG/JPEG encoding and memory stays flat whatever the
number of images.

One lifecycle, :func:`run`, in parts that each own one thing: the plan (which images:
:mod:`fgcli.dump.plan`), the session (device, model, engine, one batch:
:mod:`fgcli.dump.session`, :mod:`fgcli.dump.step`), the ledger (records and counts:
:mod:`fgcli.dump.ledger`), write-back (the writer pool: :mod:`fgcli.dump.writeback`) and
run info (``run.json``: :mod:`fgcli.dump.runinfo`). How the images are computed is a
:class:`Compute` passed to :func:`run`: :class:`LocalCompute` here, Ray's in
:mod:`fgcli.distributed.ray_data`; torchrun ranks run the plain lifecycle on their shard.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fgcli.config import RunConfig
from fgcli.dump.ledger import ManifestLedger
from fgcli.dump.plan import Plan
from fgcli.dump.report import ObjectsTally, Reporter, RunReport, SilentReporter
from fgcli.dump.runinfo import finish, run_info
from fgcli.dump.session import Session
from fgcli.dump.step import step
from fgcli.dump.writeback import WriteBack
from fgcli.errors import SetupError, UsageError
from fgcli.signals import StopSignals, stop_signals
from fgcli.tree.atomic import first_missing, remove_created
from fgcli.tree.lock import LockedError
from fgcli.tree.shards import Shard
from fgcli.tree.writer import OutputTree

__all__ = ["Compute", "Dump", "LocalCompute", "check_options", "run"]


@dataclass
class Dump:
    """The parts of one run, as its :class:`Compute` sees them (``ledger`` and ``plan``
    exist once the model is loaded)."""

    cfg: RunConfig
    reporter: Reporter
    stop: StopSignals
    shard: Shard | None
    tree: OutputTree
    session: Session
    report: RunReport
    ledger: ManifestLedger = field(init=False)
    plan: Plan = field(init=False)


class Compute:
    """How a run computes its images, between set-up and ``run.json``. The hooks do
    nothing by default; :meth:`execute` must be given."""

    def prepared(self, dump: Dump) -> None:
        """The model is loaded, the tree locked but not read yet."""

    def started(self, dump: Dump, info: dict[str, Any]) -> dict[str, Any]:
        """What the reporter's ``started`` gets (``info``: a local run's)."""
        return info

    def execute(self, dump: Dump) -> None:
        """Every image of ``dump.plan`` computed, its record given to ``dump.ledger``."""
        raise NotImplementedError

    def describe(self, dump: Dump, info: dict[str, Any]) -> dict[str, Any]:
        """What ``run.json`` says (``info``: a local run's)."""
        return info

    def close(self) -> None:
        """After the tree is released, whatever happened."""


class LocalCompute(Compute):
    """This process: DataLoader workers decode, the session computes, a writer pool
    writes; chunk by chunk until done or halted."""

    def execute(self, dump: Dump) -> None:
        session, ledger = dump.session, dump.ledger
        writeback = WriteBack(dump.tree, dump.cfg, ledger, session.writers)
        try:
            for todo in dump.plan.chunks(session.batch_size):
                batches = iter(session.loader(todo))
                try:
                    for batch in batches:
                        if ledger.halting():
                            break
                        step(session, ledger, writeback, todo, batch)
                finally:  # the workers are joined here, where a signal cannot get lost
                    with dump.stop.deferred():
                        del batches
                writeback.drain(0)
                if ledger.halting():
                    break
            writeback.drain(0)
        except BaseException:  # a second signal: stop at once, the writes left unread
            writeback.abort()
            raise
        writeback.close()


def run(cfg: RunConfig, reporter: Reporter | None = None, stdin: Any = None, *,
        compute: Compute | None = None) -> RunReport:
    """Run a dump. Raises UsageError / SetupError before anything is written;
    :class:`fgcli.tree.atomic.TreeWriteError` (:class:`fgcli.tree.atomic.DiskFullError`)
    when the tree could no longer be written, after keeping what was finished;
    :class:`fgcli.signals.Interrupted` for a stop signal before the run loop or a second
    one. A first SIGINT / SIGTERM in the loop ends it early: ``report.interrupted``.
    Signal handlers are installed only for the call (main thread only; a caller's
    :func:`~fgcli.signals.stop_signals` is shared). ``compute``: how the images are
    computed (default :class:`LocalCompute`)."""
    reporter = reporter or SilentReporter()
    compute = compute or LocalCompute()
    with stop_signals() as stop:
        try:
            started = time.perf_counter()
            started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            dump = _start(cfg, reporter, stdin if stdin is not None else sys.stdin, stop,
                          compute)
            try:
                _execute(dump, compute, started, started_at)
            finally:
                dump.tree.release()
        finally:
            compute.close()
    if dump.ledger.halted is not None:
        raise dump.ledger.halted
    reporter.finished(dump.report)
    return dump.report


def check_options(cfg: RunConfig) -> None:
    """The checks that need neither model nor device: --files-from, --colormap."""
    if cfg.files_from is not None and not os.path.isfile(cfg.files_from):
        raise UsageError(f"--files-from: {cfg.files_from}: no such file")
    from fgcli import render

    try:
        render.colormap_table(cfg.colormap)
    except ValueError as exc:
        raise UsageError(f"--colormap: {exc}") from exc


def _start(cfg: RunConfig, reporter: Reporter, stdin: Any, stop: StopSignals,
           compute: Compute) -> Dump:
    """Options, then the lock (a locked --out is refused before the model loads),
    then the model and the tree's index. A failure after the lock releases it and
    leaves no folder this run created."""
    shard = Shard.parse(cfg.shard) if cfg.shard else None
    tree = OutputTree(cfg.out, shard.name if shard else None)
    check_options(cfg)
    session = Session(cfg, reporter)
    dump = Dump(cfg, reporter, stop, shard, tree, session,
                RunReport(out=cfg.out, device=str(session.device)))
    created = _lock(tree, cfg)
    try:
        session.load()
        dump.report.objects = objects_tally(session)
        compute.prepared(dump)
        dump.ledger = ManifestLedger(tree, cfg, session.fingerprint, session.ranks[0],
                                     reporter, stop, dump.report)
        dump.plan = Plan(cfg, tree, shard, dump.ledger, session.ranks, stdin)
        dump.plan.open()
    except BaseException:
        tree.abandon(created)
        raise
    return dump


def _lock(tree: OutputTree, cfg: RunConfig) -> Path | None:
    """Take the tree's lock (or this shard's): SetupError naming the holder. Returns the
    topmost folder this run made for --out (None: none)."""
    created = first_missing(cfg.out)
    try:
        tree.acquire(list(cfg.command))
    except LockedError as exc:
        remove_created(cfg.out, created)
        raise SetupError(str(exc)) from exc
    except OSError as exc:  # --out is a file, unwritable, on a full disk...
        remove_created(cfg.out, created)
        raise SetupError(f"--out {cfg.out}: cannot write there "
                         f"({exc.strerror or exc})") from exc
    return created


def _execute(dump: Dump, compute: Compute, started: float, started_at: str) -> None:
    """Report the start, compute every image, then compact the manifest and write
    ``run.json``; a first stop signal ends the computing early."""
    cfg, session = dump.cfg, dump.session
    dump.reporter.started(compute.started(dump, {
        "model": cfg.spec.model, "weights": session.loaded.config.weights,
        "device": str(session.device), "batch_size": session.batch_size,
        "workers": session.workers, "out": cfg.out}))
    with dump.stop.graceful():
        compute.execute(dump)
        finish(dump.tree, lambda: compute.describe(
            dump, run_info(cfg, session, dump.ledger, dump.shard, started_at)),
            dump.ledger, started)


def objects_tally(session: Session) -> ObjectsTally | None:
    """The --boxes / --masks summary's counters (None without annotations)."""
    if session.annotations is None:
        return None
    return ObjectsTally(session.annotations.source, len(session.annotations),
                        by_class=session.by_class)
