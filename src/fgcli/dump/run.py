"""``run(config) -> RunReport``: paths -> decoded batches -> engine -> maps -> files.

Knows neither typer nor rich: progress and printing go through a
:class:`Reporter`. Data flows one way; decoding happens in DataLoader
workers, encoding and writing in a bounded background thread pool, so the
engine does not wait on PNG/JPEG encoding and memory stays flat whatever the
number of images.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fgcli import names
from fgcli.config import Method, RunConfig, parse_model_args
from fgcli.data.decode import Batch, ImageDataset, collate
from fgcli.data.discover import Item, discover
from fgcli.errors import SetupError, UsageError
from fgcli.models.base import LoadedModel
from fgcli.models.load import load_model
from fgcli.models.device import resolve_device
from fgcli.models.targets import resolve_target
from fgcli.signals import EXIT_CODES, StopSignals, ignore_stop_signals, stop_signals
from fgcli.tree.info import versions
from fgcli.tree.shards import Shard, merge_locked
from fgcli.tree.writer import (
    MANIFEST_SCHEMA,
    BadLines,
    ImageJob,
    LockedError,
    OutputTree,
    TreeWriteError,
    first_missing,
    remove_created,
    shard_manifests,
    write_outputs,
)

CHUNK_BATCHES = 32  # batches per DataLoader (bounds memory for endless input lists)
PENDING_BATCHES = 3  # batches being encoded / written at once
DRAIN_SECONDS = 30.0  # after a stop signal: how long writes in flight may take to finish


@dataclass
class RunReport:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    out: str = ""
    stopped_early: bool = False
    first_error: str | None = None
    device: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    interrupted: str | None = None  # "SIGINT" / "SIGTERM": stopped by that signal

    @property
    def images(self) -> int:
        return self.ok + self.failed + self.skipped

    @property
    def exit_code(self) -> int:
        """0: every image ok or skipped as done; 1: some images failed; 130 / 143:
        stopped by SIGINT / SIGTERM."""
        if self.interrupted:
            return EXIT_CODES.get(self.interrupted, 130)
        return 1 if self.failed else 0


class Reporter(Protocol):
    """How a run talks to its caller. ``alert`` is for problems that must reach the user
    even with ``--quiet`` (an input without images); failed images come through
    ``record`` with status ``failed``; ``progress`` is called after every batch the
    engine finishes (torchrun's heartbeat counts it as a sign of life)."""

    def started(self, info: dict[str, Any]) -> None: ...

    def warn(self, message: str) -> None: ...

    def alert(self, message: str) -> None: ...

    def progress(self) -> None: ...

    def record(self, record: dict[str, Any], line: str, image_done: bool) -> None: ...

    def finished(self, report: RunReport) -> None: ...


class SilentReporter:
    def started(self, info: dict[str, Any]) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def alert(self, message: str) -> None:
        pass

    def progress(self) -> None:
        pass

    def record(self, record: dict[str, Any], line: str, image_done: bool) -> None:
        pass

    def finished(self, report: RunReport) -> None:
        pass


def _chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


class DumpRun:
    """State of one dump run (see :func:`run`; ``fgcli.distributed.ray_data`` drives its steps too)."""

    def __init__(self, cfg: RunConfig, reporter: Reporter, stdin: Any) -> None:
        self.cfg = cfg
        self.reporter = reporter
        self.stdin = stdin
        self.report = RunReport(out=cfg.out)
        self.pending: deque[tuple[list[dict[str, Any]], list[Future]]] = deque()
        self.shard: Shard | None = Shard.parse(cfg.shard) if cfg.shard else None
        self.collected: list[dict[str, Any]] | None = None  # records kept, not written
        self.outside_seen = False  # an earlier output leading out of the tree was reported
        self.tree = OutputTree(cfg.out, self.shard.name if self.shard else None)
        self.created: Path | None = None  # the topmost folder this run made for --out
        self.locked = False
        self.stop = StopSignals(installed=False)  # run() puts the installed handlers here
        self.halted: TreeWriteError | None = None  # the tree cannot be written: stop
        self.drain_until: float | None = None  # deadline for writes in flight once stopping

    def setup(self) -> None:
        """Options, then the lock (a locked --out is refused before the model loads),
        then the model and the tree's index. A failure after the lock releases it and
        leaves no folder this run created."""
        self.check_options()
        self.lock()
        try:
            self.prepare()
            self.open_tree()
        except BaseException:
            self.unlock()
            raise

    # -- setup -----------------------------------------------------------------------
    def check_options(self) -> None:
        """The checks that need no model: --files-from, --colormap, --device."""
        cfg = self.cfg
        if cfg.files_from is not None and not os.path.isfile(cfg.files_from):
            raise UsageError(f"--files-from: {cfg.files_from}: no such file")
        from fgcli import render

        try:
            render.colormap_table(cfg.colormap)
        except ValueError as exc:
            raise UsageError(f"--colormap: {exc}") from exc
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # streams and events of cuda:N, not cuda:0
        self.report.device = str(self.device)

    def prepare(self) -> None:
        """Model, engine, batch size and fingerprint: everything but the output tree
        (after :meth:`check_options`)."""
        cfg = self.cfg
        self.loaded: LoadedModel = load_model(
            cfg.model, cfg.weights, size=cfg.size, crop=cfg.crop, mean=cfg.mean, std=cfg.std,
            labels=cfg.labels, model_args=parse_model_args(cfg.model_args),
            trust_pickle=cfg.trust_pickle)
        model = self.loaded.model.to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.categories = self.loaded.categories
        self.n_classes = self.loaded.num_classes or self._probe_classes(model)
        self.fixed_target = resolve_target(cfg.target, self.categories, self.n_classes)
        if cfg.topk is not None and cfg.topk > self.n_classes:
            raise UsageError(f"--topk {cfg.topk}: the model has only {self.n_classes} classes")
        from fgcli.engine import METHODS, SmoothFullGrad, parse_layers

        try:
            layers = parse_layers(cfg.layers)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--layers: {exc}") from exc
        if cfg.method is Method.smooth:
            self.engine = SmoothFullGrad(model, n_samples=cfg.samples, sigma=cfg.sigma,
                                         seed=cfg.seed, psi=cfg.psi, layers=layers)
        else:
            self.engine = METHODS[cfg.method.value](model, psi=cfg.psi, layers=layers)
        if layers is not None:  # a pattern that matches no layer: say so before any image
            probe = torch.zeros(1, 3, *self.loaded.preprocessing.size, device=self.device)
            try:
                with _model_code(cfg.model, "computing a probe batch"):
                    explained = METHODS["fullgrad"](model).explain(probe)
                self.engine.map_layers(explained.layers)
            except ValueError as exc:
                raise UsageError(f"--layers: {exc}") from exc
        self.batch_size = cfg.batch_size or (32 if self.device.type == "cuda" else 8)
        self.max_batch = self.batch_size  # lowered when the device runs out of memory
        cores = cores_per_process()
        self.workers = cfg.workers if cfg.workers is not None else max(1, min(4, cores - 1))
        # writer threads encode heatmaps and overlays (Pillow and NumPy release the GIL):
        # the cores left after decoding and the main thread, at least 2
        self.writers = max(2, min(16, cores - self.workers - 1))
        self.fingerprint = cfg.settings_fingerprint(self.loaded.identity,
                                                    self.loaded.preprocessing.interpolation)
        self.ranks: list[int | None] = (list(range(1, cfg.topk + 1)) if cfg.topk
                                        else [None])
        from fgcli.data import devicejpeg

        self.device_jpeg = (cfg.device_jpeg if cfg.device_jpeg is not None
                            else devicejpeg.available(self.device))

    def lock(self) -> None:
        """Take the tree's lock (or this shard's): SetupError naming the holder."""
        cfg = self.cfg
        self.created = first_missing(cfg.out)
        try:
            self.tree.acquire(list(cfg.command))
        except LockedError as exc:
            remove_created(cfg.out, self.created)
            raise SetupError(str(exc)) from exc
        except OSError as exc:  # --out is a file, unwritable, on a full disk...
            remove_created(cfg.out, self.created)
            raise SetupError(f"--out {cfg.out}: cannot write there "
                             f"({exc.strerror or exc})") from exc
        self.locked = True

    def unlock(self) -> None:
        """Release the lock after a failed start (see :meth:`OutputTree.abandon`)."""
        if self.locked:
            self.locked = False
            self.tree.abandon(self.created)

    def open_tree(self) -> None:
        """Index what earlier runs did (after :meth:`lock`).

        A plain run first folds shards left unmerged into ``manifest.jsonl``.
        """
        if self.shard is None and shard_manifests(self.tree.root):
            try:
                merged = merge_locked(self.tree)
            except BaseException:
                self.unlock()
                raise
            for line in merged.warnings:
                self.reporter.warn(line)
            self.reporter.warn(f"merged {len(merged.shards)} shard manifest(s) into "
                               f"{self.tree.root / 'manifest.jsonl'} first")
        # (key, rank) -> (file, offset), not records; malformed lines are skipped, one
        # warning per file (this run's own manifest drops them when it is compacted); of
        # the files every shard reads, shard 0 alone speaks
        bad = BadLines()
        self.previous = self.tree.index_manifest(self.shard.owns if self.shard else None, bad)
        own = self.tree.manifest_path
        lead = self.shard is None or self.shard.index == 0
        for path, line in zip(bad.files, bad.warnings(lambda path: path == own)):
            if lead or path == own:
                self.reporter.warn(line)

    def _probe_classes(self, model: torch.nn.Module) -> int:
        """Class count from one eval forward, for models whose head is not a plain layer
        (the output is checked as user models' is: see ``fgcli.models.sources.usercode.probe``)."""
        from fgcli.models.outputs import checked_logits, frozen_eval

        probe = torch.zeros(1, 3, *self.loaded.preprocessing.size, device=self.device)
        with _model_code(self.cfg.model, "computing a probe batch"), frozen_eval(model), \
                torch.no_grad():
            out = model(probe)
        try:
            return int(checked_logits(out, 1).shape[1])
        except (TypeError, ValueError) as exc:
            raise SetupError(f"--model {self.cfg.model}: {exc}") from exc

    # -- records -----------------------------------------------------------------------
    def _emit(self, record: dict[str, Any]) -> None:
        if self.collected is not None:  # a Ray actor: the driver writes the manifest
            self.collected.append(record)
            return
        try:
            self.write_record(record)
        except TreeWriteError as exc:  # the manifest cannot take it: stop the run
            self.halted = self.halted or exc

    def halting(self) -> bool:
        """True once the run must take no new batch: --fail-fast after a failure, a tree
        that cannot be written, or a stop signal."""
        return self.report.stopped_early or self.halted is not None or self.stop.requested

    def write_record(self, record: dict[str, Any]) -> None:
        """Append one finished record to the manifest, count it and report it."""
        record = names.clean(record)  # valid Unicode even where a message quoted a raw path
        record["time"] = _stamp()
        line = self.tree.append(record)
        status = record["status"]
        first_rank = record.get("rank") in (None, 1)
        if first_rank:
            if status == "ok":
                self.report.ok += 1
            elif status == "skipped":
                self.report.skipped += 1
            else:
                self.report.failed += 1
                if self.report.first_error is None:
                    self.report.first_error = f"{record['input']}: {record['error']}"
        self.reporter.record(record, line, first_rank)

    def _base(self, item: Item) -> dict[str, Any]:
        return {"schema": MANIFEST_SCHEMA, **names.record_fields(item.path), "key": item.key,
                "settings": self.fingerprint}

    def _fail(self, item: Item, error: str) -> None:
        rec = self._base(item)  # one failed line per image, whatever --topk says
        rec.update(status="failed", error=error, outputs={}, rank=self.ranks[0])
        self._emit(rec)
        if self.cfg.fail_fast:
            self.report.stopped_early = True

    def _done_before(self, item: Item) -> list[dict[str, Any]] | None:
        if self.cfg.overwrite:
            return None
        found = []
        for rank in self.ranks:
            where = self.previous.get((item.key, rank))
            rec = self.tree.read_record(where) if where is not None else None
            if (rec is None or rec.get("status") not in ("ok", "skipped")
                    or rec.get("settings") != self.fingerprint or names.path_of(rec) != item.path
                    or not self._outputs_whole(where[0], rec)):
                return None
            found.append(rec)
        return found

    def _outputs_whole(self, path: Path, rec: dict[str, Any]) -> bool:
        """Every kind in --save of an earlier record is a file inside the tree (each
        output looked at once). An output that leads out of the tree (a symbolic link) is
        never trusted: the image is computed again (its file replaced); the first one met
        is reported, in one line."""
        states = {kind: self.tree.files.state(rel)
                  for kind, rel in (rec.get("outputs") or {}).items()}
        outside = next((kind for kind, state in states.items() if state == "outside"), None)
        if outside is not None:
            if not self.outside_seen:
                self.outside_seen = True
                self.reporter.warn(f"{path}: outputs.{outside} of {rec['key']} leads outside "
                                   "the tree: not trusted, the image is computed again (and "
                                   "any other such image)")
            return False
        return all(states.get(kind) == "file" for kind in self.cfg.save)

    # -- main loop ---------------------------------------------------------------------
    def todo_chunks(self) -> Iterator[list[Item]]:
        """The images still to compute, in chunks; on the way, images that cannot be read
        get their failed line and images already done with these settings a skipped line.
        Stops after a failure under ``--fail-fast``."""
        cfg = self.cfg
        alert = self.reporter.alert if self.shard is None or self.shard.index == 0 else None
        items: Iterable[Item] = discover(cfg.inputs, cfg.files_from, cfg.null, self.stdin,
                                         exclude=cfg.out, on_empty=alert)
        if self.shard is not None:
            owns = self.shard.owns
            items = (item for item in items if owns(item.key))
        for chunk in _chunks(items, self.batch_size * CHUNK_BATCHES):
            todo: list[Item] = []
            for item in chunk:
                if self.halting():
                    break
                if item.error is not None:
                    self._fail(item, item.error)
                    continue
                done = self._done_before(item)
                if done is not None:
                    for old in done:
                        rec = dict(old, status="skipped", error=None, seconds=0.0)
                        rec.pop("time", None)
                        self._emit(rec)
                    continue
                todo.append(item)
            if todo and not self.halting():
                yield todo
            if self.halting():
                return

    def dataset(self, todo: list[Item]) -> ImageDataset:
        """Decoding and preprocessing of ``todo`` (item i of the dataset is todo[i])."""
        proc = self.loaded.preprocessing
        return ImageDataset(todo, proc.size, proc.crop, proc.resize, proc.mean, proc.std,
                            "overlay" in self.cfg.save, self.cfg.max_pixels,
                            proc.interpolation, encoded_jpeg=self.device_jpeg)

    def execute(self) -> None:
        """Every chunk through the engine, writing as it goes, until done or halted."""
        pool = ThreadPoolExecutor(max_workers=self.writers, thread_name_prefix="fgcli-writer")
        self.pool = pool
        try:
            for todo in self.todo_chunks():
                loader = torch.utils.data.DataLoader(
                    self.dataset(todo), batch_size=self.batch_size, shuffle=False,
                    num_workers=self.workers, collate_fn=collate,
                    pin_memory=self.device.type == "cuda",
                    prefetch_factor=2 if self.workers > 0 else None,
                    worker_init_fn=ignore_stop_signals if self.workers > 0 else None)
                batches = iter(loader)
                try:
                    for batch in batches:
                        if self.halting():
                            break
                        self._batch(todo, batch)
                finally:  # the workers are joined here, where a signal cannot get lost
                    with self.stop.deferred():
                        del batches
                self._drain(0)
                if self.halting():
                    break
            self._drain(0)
        except BaseException:  # a second signal: stop at once, the writes left unread
            pool.shutdown(wait=False, cancel_futures=True)
            self._salvage()
            raise
        # writes given up on after a stop signal are not waited for again
        pool.shutdown(wait=not self.stop.requested, cancel_futures=True)

    def compute(self, todo: list[Item], batch: Batch) -> list[dict[str, Any]]:
        """One batch through the engine with its files written, returning its records
        instead of writing manifest lines (a Ray actor's step; the driver writes them)."""
        self.collected = []
        if getattr(self, "pool", None) is None:
            self.pool = ThreadPoolExecutor(max_workers=self.writers,
                                           thread_name_prefix="fgcli-writer")
        try:
            self._batch(todo, batch)
            self._drain(0)
            if self.halted is not None:  # a full disk: the driver stops the run
                raise self.halted
            return self.collected
        finally:
            self.collected = None

    def _batch(self, todo: list[Item], batch: Batch) -> None:
        if batch.encoded:  # --device-jpeg: JPEG bytes become model input on the device
            from fgcli.data.devicejpeg import decode_into

            proc = self.loaded.preprocessing
            batch = decode_into(batch, self.device, (proc.size, proc.crop, proc.resize,
                                                     proc.mean, proc.std, proc.interpolation),
                                "overlay" in self.cfg.save, self.cfg.max_pixels)
        for failure in batch.failures:
            self._fail(todo[failure.index], failure.error)
        if batch.x is None or self.halting():
            return
        cfg = self.cfg
        start = time.perf_counter()
        x = batch.x.to(self.device, non_blocking=True)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        results = []
        target: Any = self.fixed_target
        top = None
        try:
            for rank in self.ranks:
                if rank is not None and rank > 1:
                    target = top[:, rank - 1]
                exp = self._explain(x, target)
                if rank == 1:
                    top = exp.logits.topk(len(self.ranks), dim=1).indices
                results.append((rank, _to_host(exp)))
        except OutOfMemory as exc:
            for sample in batch.samples:
                self._fail(todo[sample.index], str(exc))
            return
        except SetupError:  # the model exited: the batches before keep their lines
            self._drain(0)
            raise
        finally:
            self.reporter.progress()
        self._submit(todo, batch, results, (time.perf_counter() - start) / len(batch.samples))

    def _submit(self, todo: list[Item], batch: Batch, results: list[tuple[Any, dict]],
                seconds: float) -> None:
        """Records and writer jobs of a computed batch; an image with a non-finite result
        gets one failed line instead (and no files), the others are written."""
        cfg = self.cfg
        bad = _first_reasons([host["nonfinite"] for _, host in results])
        for j, sample in enumerate(batch.samples):
            if bad[j] is not None:  # one failed line per image, whatever --topk says
                self._fail(todo[sample.index], bad[j])
        records: list[dict[str, Any]] = []
        futures: list[Future] = []
        for rank, host in results:
            for j, sample in enumerate(batch.samples):
                if bad[j] is not None:
                    continue
                item = todo[sample.index]
                cls = int(host["target"][j])
                rec = self._base(item)
                rec.update(
                    status="ok", error=None, rank=rank, target=cls,
                    target_name=self.categories[cls] if self.categories else str(cls),
                    logit=float(host["logit"][j]), prob=float(host["prob"][j]),
                    residual=float(host["residual"][j]), seconds=round(seconds, 6),
                )
                decomp = _decomp_arrays(host, j, cls) if "decomp" in cfg.save else None
                box = sample.box
                original = sample.original
                if original is not None and not sample.on_device:
                    original = original.numpy()
                job = ImageJob(item.key, rank, cls, _MapOf(host["maps"], j), original,
                               (box.right - box.left, box.bottom - box.top), decomp)
                records.append(rec)
                futures.append(self.pool.submit(write_outputs, self.tree, job, cfg.save,
                                                cfg.colormap, cfg.alpha, cfg.overlay))
        self.pending.append((records, futures))
        self._drain(PENDING_BATCHES)

    def _explain(self, x: torch.Tensor, target: Any) -> Any:
        """The engine on one batch; on device out-of-memory, halve the batch and retry.

        The smaller size is kept for the rest of the run (logged once per halving).
        """
        if len(x) > self.max_batch:
            step = self.max_batch  # fixed here: a part may lower self.max_batch further
            parts = [self._explain(x[i:i + step], _slice(target, i, step))
                     for i in range(0, len(x), step)]
            return _concat(parts)
        try:
            with self._autocast(), _model_code(self.cfg.model, "computing a batch"):
                return self.engine.explain(x, target, compact="decomp" in self.cfg.save)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled here
            if not _is_oom(exc):
                raise
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(x) == 1:
            raise OutOfMemory(f"out of memory on {self.device} even for one image")
        self.max_batch = max(1, len(x) // 2)
        self.reporter.warn(f"out of memory on {self.device} with a batch of {len(x)}; "
                           f"retrying with batches of {self.max_batch}")
        return self._explain(x, target)

    def _autocast(self) -> Any:
        """--amp: bfloat16 autocast on the CPU, float16 on CUDA, nothing otherwise."""
        if not self.cfg.amp or self.device.type not in ("cpu", "cuda"):
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _drain(self, keep: int) -> None:
        """Write manifest lines of finished batches, oldest first, until ``keep`` remain.

        An image whose write hit a full disk gets no line (a rerun computes it) and halts
        the run; any other write error fails that image. After a stop signal the wait is
        bounded (``DRAIN_SECONDS``): writes still running then get no line either."""
        while len(self.pending) > keep:
            records, futures = self.pending[0]
            while records:  # each record leaves the queue once handled: a second signal
                if self._finished(futures[0]):  # in the wait leaves it to _salvage
                    self._settle(records[0], futures[0])
                del records[0], futures[0]
            self.pending.popleft()

    def _settle(self, rec: dict[str, Any], fut: Future) -> None:
        """The manifest line of one image whose writes are done."""
        try:
            rec["outputs"] = fut.result()
        except TreeWriteError as exc:
            self.halted = self.halted or exc
            return
        except Exception as exc:  # noqa: BLE001 - a write error fails one image
            rec.update(status="failed", outputs={},
                       error=f"cannot write outputs: {_one_line(exc)}")
            if self.cfg.fail_fast:
                self.report.stopped_early = True
        self._emit(rec)

    def _salvage(self) -> None:
        """On the way out of a failed or interrupted loop: the lines of images whose
        writes are already done (no waiting), so a rerun does not compute them again."""
        with contextlib.suppress(Exception):
            while self.pending:
                records, futures = self.pending.popleft()
                for rec, fut in zip(records, futures):
                    if fut.done() and not fut.cancelled() and fut.exception() is None:
                        rec["outputs"] = fut.result()
                        self._emit(rec)

    def _finished(self, fut: Future) -> bool:
        """Wait for one write: without limit, or until the deadline once a stop signal
        came (polled, so a signal that arrives meanwhile starts the deadline)."""
        while True:
            if self.stop.requested and self.drain_until is None:
                self.drain_until = time.monotonic() + DRAIN_SECONDS
            left = None if self.drain_until is None else self.drain_until - time.monotonic()
            if left is not None and left <= 0:
                return fut.done()
            wait([fut], timeout=0.5 if left is None else min(left, 0.5))
            if fut.done():
                return True

    def finish(self, started: float, started_at: str) -> None:
        """Compact the manifest and write ``run.json``. After a write failure that halted
        the run only ``run.json`` is tried (compaction needs room for a second copy of
        the manifest; the appended one is whole, and the next run compacts it)."""
        self.report.seconds = time.perf_counter() - started
        try:
            if self.halted is None:
                self.tree.compact_manifest()
            self.tree.write_json(self.tree.run_json_path, self.run_info(started_at))
        except TreeWriteError as exc:
            self.halted = self.halted or exc
        self.report.interrupted = self.stop.name  # also a signal during these writes

    def run_info(self, started_at: str) -> dict[str, Any]:
        """What ``run.json`` says about this run."""
        cfg = self.cfg
        return {
            "schema": MANIFEST_SCHEMA,
            **({"shard": str(self.shard)} if self.shard else {}),
            "command": list(cfg.command),
            "model": self.loaded.name,
            "model_args": parse_model_args(cfg.model_args),
            "weights": self.loaded.weights,
            **self.loaded.describe(),
            "method": cfg.method.value, "psi": cfg.psi, "layers": cfg.layers,
            "settings": self.fingerprint,
            "target": cfg.target, "topk": cfg.topk,
            "input_size": list(self.loaded.preprocessing.size),
            "crop": cfg.crop, "save": list(cfg.save), "overlay": cfg.overlay,
            "device": str(self.device), "host": platform.node(),
            # relative inputs are relative to it (the gallery's originals); cwd_bytes too
            # where it is not UTF-8 (fgcli.names)
            **names.record_fields(os.getcwd(), "cwd"),
            "jpeg": "device" if self.device_jpeg else "pillow",
            "batch_size": self.batch_size, "workers": self.workers,
            "writers": self.writers,
            "versions": versions(),
            "started": started_at, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(self.report.seconds, 3),
            "counts": {"ok": self.report.ok, "failed": self.report.failed,
                       "skipped": self.report.skipped},
            "stopped_early": self.report.stopped_early,
            "interrupted": self.stop.name,  # "SIGINT" / "SIGTERM", or null
            "error": str(self.halted) if self.halted is not None else None,
        }


def _model_code(spec: str, doing: str) -> Any:
    """The model's forward as user code: its sys.exit / own KeyboardInterrupt is the
    model's failure (SetupError, exit 2), see ``fgcli.models.sources.usercode.user_code``."""
    from fgcli.models.sources.usercode import FORWARD_HINT, user_code

    return user_code(f"model {spec}", doing, FORWARD_HINT)


class _MapOf:
    """One image's map from a :class:`DeviceMaps`, materialised in the writer thread."""

    def __init__(self, maps: "DeviceMaps", j: int) -> None:
        self.maps, self.j = maps, j

    def __call__(self) -> np.ndarray:
        return self.maps.image(self.j)


class OutOfMemory(Exception):
    """Even a batch of one image does not fit on the device."""


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _slice(target: Any, start: int, size: int) -> Any:
    return target[start:start + size] if isinstance(target, torch.Tensor) else target


def _concat(parts: list[Any]) -> Any:
    """One Explanation from the Explanations of consecutive sub-batches."""
    from fgcli.engine import CompactDecomposition, Explanation

    def joined(field: str) -> OrderedDict[str, torch.Tensor]:
        first = getattr(parts[0].compact, field)
        return OrderedDict((k, torch.cat([getattr(p.compact, field)[k] for p in parts]))
                           for k in first)

    compact = None
    if parts[0].compact is not None:
        compact = CompactDecomposition(torch.cat([p.compact.input for p in parts]),
                                       joined("layers"), joined("offgrid"))
    return Explanation(
        maps=torch.cat([p.maps for p in parts]), logits=torch.cat([p.logits for p in parts]),
        target=torch.cat([p.target for p in parts]),
        residual=torch.cat([p.residual for p in parts]), layers=parts[0].layers,
        compact=compact)


class DeviceMaps:
    """A batch of maps on their way to the host.

    On CUDA the copy goes into pinned memory with ``non_blocking=True`` and an
    event; writer threads wait for that event, so the next batch is queued on
    the device while the maps are still in flight. Elsewhere it is a plain copy.
    """

    def __init__(self, maps: torch.Tensor) -> None:
        maps = maps.detach().float()
        self.event = None
        if maps.device.type == "cuda":
            self.host = torch.empty(maps.shape, dtype=maps.dtype, pin_memory=True)
            with torch.cuda.device(maps.device):  # copy and event on the maps' device
                self.host.copy_(maps, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record(torch.cuda.current_stream(maps.device))
        else:
            self.host = maps.cpu()

    def image(self, j: int) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.host[j, 0].numpy()


def _first_reasons(per_rank: list[list[str | None]]) -> list[str | None]:
    """Per image, the first reason any rank (``--topk``) gave for failing it."""
    return [next((r for r in reasons if r is not None), None) for reasons in zip(*per_rank)]


def _nonfinite(exp: Any, prob: torch.Tensor) -> list[str | None]:
    """Per image of a batch, why its results are not finite numbers (None: all finite).

    A NaN or infinite logit, class probability, completeness residual, map or
    decomposition term makes that image fail: JSON has no NaN, and an all-NaN heatmap
    is no result. Other images of the batch are not affected.
    """
    n = len(exp.target)
    logits = exp.logits.detach().float().cpu()
    rows = torch.isfinite(logits).all(1).tolist()
    residual = exp.residual.detach().cpu()
    maps_ok = torch.isfinite(exp.maps.detach()).reshape(n, -1).all(1).cpu().tolist()
    prob_ok = torch.isfinite(prob.detach()).cpu().tolist()
    terms_ok = [True] * n
    if exp.compact is not None:
        parts = [exp.compact.input, *exp.compact.layers.values(), *exp.compact.offgrid.values()]
        for part in parts:
            ok = torch.isfinite(part.detach()).reshape(n, -1).all(1).cpu().tolist()
            terms_ok = [a and b for a, b in zip(terms_ok, ok)]
    reasons: list[str | None] = []
    for j in range(n):
        if not rows[j]:
            value = logits[j][~torch.isfinite(logits[j])][0].item()
            reasons.append(f"non-finite logit ({value}) from the model")
        elif not bool(torch.isfinite(residual[j])):
            reasons.append(f"non-finite completeness residual ({residual[j].item()})")
        elif not maps_ok[j]:
            reasons.append("non-finite saliency map")
        elif not prob_ok[j]:
            reasons.append("non-finite class probability")
        elif not terms_ok[j]:
            reasons.append("non-finite decomposition term")
        else:
            reasons.append(None)
    return reasons


def _to_host(exp: Any) -> dict[str, Any]:
    """Scores (small, synchronous) and maps (asynchronous on CUDA) for one batch, and
    per image why it has no finite result (``nonfinite``: None when it has one)."""
    logit = exp.logit
    prob = torch.softmax(exp.logits.float(), dim=1).gather(1, exp.target[:, None])[:, 0]
    host: dict[str, Any] = {
        "nonfinite": _nonfinite(exp, prob),
        "maps": DeviceMaps(exp.maps),
        "target": exp.target.cpu().numpy(),
        "logit": logit.double().cpu().numpy(),
        "prob": prob.cpu().numpy(),
        "residual": exp.residual.double().cpu().numpy(),
    }
    if exp.compact is not None:
        host["compact_input"] = exp.compact.input.float().cpu().numpy()
        host["compact_layers"] = {k: v.float().cpu().numpy()
                                  for k, v in exp.compact.layers.items()}
        host["compact_offgrid"] = {k: v.float().cpu().numpy()
                                   for k, v in exp.compact.offgrid.items()}
    return host


def _decomp_arrays(host: dict[str, Any], j: int, cls: int) -> dict[str, np.ndarray]:
    arrays = {
        "input": host["compact_input"][j],
        "logit": np.float64(host["logit"][j]),
        "target": np.int64(cls),
        "residual": np.float64(host["residual"][j]),
        "layers": np.array(list(host["compact_layers"]), dtype=str),
    }
    for name, value in host["compact_layers"].items():
        arrays[f"bias/{name}"] = value[j]
    for name, value in host["compact_offgrid"].items():
        arrays[f"offgrid/{name}"] = np.float32(value[j])
    return arrays


def cores_per_process() -> int:
    """This process's share of the cores: the CPUs it may run on, divided among the
    processes torchrun started on this node (``LOCAL_WORLD_SIZE``)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, cores // local)


def _stamp() -> str:
    """When a manifest line is written: UTC, milliseconds, sortable as text (merge keeps
    the newest line of a key by it)."""
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def run(cfg: RunConfig, reporter: Reporter | None = None, stdin: Any = None) -> RunReport:
    """Run a dump. Raises UsageError / SetupError before anything is written;
    :class:`fgcli.tree.writer.TreeWriteError` (:class:`fgcli.tree.writer.DiskFullError`) when the
    tree could no longer be written, after keeping what was finished;
    :class:`fgcli.signals.Interrupted` for a stop signal before the run loop or a second
    one. A first SIGINT / SIGTERM in the loop ends it early: ``report.interrupted``.
    Signal handlers are installed only for the call (main thread only)."""
    reporter = reporter or SilentReporter()
    with stop_signals() as stop:
        started = time.perf_counter()
        started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        state = DumpRun(cfg, reporter, stdin if stdin is not None else sys.stdin)
        state.stop = stop
        state.setup()
        try:
            reporter.started({"model": cfg.model, "weights": state.loaded.weights,
                              "device": str(state.device), "batch_size": state.batch_size,
                              "workers": state.workers, "out": cfg.out})
            with stop.graceful():
                state.execute()
                state.finish(started, started_at)
        finally:
            state.tree.release()
    if state.halted is not None:
        raise state.halted
    reporter.finished(state.report)
    return state.report
