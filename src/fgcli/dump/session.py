"""A dump's compute session: device, model, engine, batch sizes, and one batch through
the engine (autocast for --amp, the batch halved when the device runs out of memory).

The model comes from :func:`fgcli.models.load.load` and the method from
:func:`fgcli.engine.build`, as for every command.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from typing import Any

import torch

from fgcli.config import RunConfig
from fgcli.data.decode import Batch, ImageDataset, collate
from fgcli.data.discover import Item
from fgcli.dump.background import lower_priority
from fgcli.dump.host import to_host
from fgcli.dump.report import Reporter
from fgcli.errors import UsageError
from fgcli.models.base import LoadedModel
from fgcli.models.device import resolve_device
from fgcli.models.load import load
from fgcli.models.targets import resolve_target
from fgcli.signals import ignore_stop_signals


class Session:
    """The device (chosen at once, before the tree is locked), then with :meth:`load` the
    model, engine and sizes of one process's run; :meth:`compute` runs one batch."""

    def __init__(self, cfg: RunConfig, reporter: Reporter) -> None:
        self.cfg = cfg
        self.reporter = reporter  # warns when the batch is halved
        self.device = resolve_device(cfg.device)
        self.annotations = annotations(cfg)  # a malformed file: refused before any model
        self.by_class = False  # whether the annotations' labels name the model's classes
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # streams and events of cuda:N, not cuda:0

    def load(self) -> None:
        """Model, engine, batch size and fingerprint: everything but the output tree."""
        cfg = self.cfg
        self.loaded: LoadedModel = load(cfg.spec, self.device)
        model = self.loaded.model
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.categories = self.loaded.config.categories
        self.n_classes = self.loaded.config.num_classes
        self.fixed_target = resolve_target(cfg.target, self.categories, self.n_classes)
        if self.annotations is not None:
            self.by_class = self.annotations.names_classes(self.categories, self.n_classes)
        if cfg.topk is not None and cfg.topk > self.n_classes:
            raise UsageError(f"--topk {cfg.topk}: the model has only {self.n_classes} classes")
        self.engine = self._engine(model)
        self.batch_size = cfg.batch_size or (32 if self.device.type == "cuda" else 8)
        self.max_batch = self.batch_size  # lowered when the device runs out of memory
        cores = cores_per_process()
        self.workers = cfg.workers if cfg.workers is not None else max(1, min(4, cores - 1))
        # writer threads encode heatmaps and overlays (Pillow and NumPy release the GIL):
        # the cores left after decoding and the main thread, at least 2
        self.writers = max(2, min(16, cores - self.workers - 1))
        self.fingerprint = cfg.settings_fingerprint(
            self.loaded.config.identity, self.loaded.config.interpolation,
            None if self.annotations is None else self.annotations.identity())
        self.ranks: list[int | None] = (list(range(1, cfg.topk + 1)) if cfg.topk
                                        else [None])
        from fgcli.data import devicejpeg

        self.device_jpeg = (cfg.device_jpeg if cfg.device_jpeg is not None
                            else devicejpeg.available(self.device))

    def _engine(self, model: torch.nn.Module) -> Any:
        """The --method on ``model``, its --layers checked against the model's layers."""
        from fgcli.engine import build, parse_layers

        cfg = self.cfg
        try:
            layers = parse_layers(cfg.layers)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--layers: {exc}") from exc
        engine = build(cfg.method.value, model, psi=cfg.psi, layers=layers,
                       samples=cfg.samples, sigma=cfg.sigma, seed=cfg.seed)
        if layers is not None:  # a pattern that matches no layer: say so before any image
            probe = torch.zeros(1, 3, *self.loaded.config.size, device=self.device)
            try:
                with model_code(cfg.spec.model, "computing a probe batch"):
                    explained = build("fullgrad", model).explain(probe)
                engine.map_layers(explained.layers)
            except ValueError as exc:
                raise UsageError(f"--layers: {exc}") from exc
        return engine

    # -- batches -----------------------------------------------------------------------
    def dataset(self, todo: list[Item]) -> ImageDataset:
        """Decoding and preprocessing of ``todo`` (item i of the dataset is todo[i])."""
        proc = self.loaded.config
        return ImageDataset(todo, proc.size, proc.crop, proc.resize, proc.mean, proc.std,
                            "overlay" in self.cfg.save, self.cfg.spec.max_pixels,
                            proc.interpolation, encoded_jpeg=self.device_jpeg)

    def loader(self, todo: list[Item]) -> torch.utils.data.DataLoader:
        """``todo`` decoded in DataLoader workers, in batches of --batch-size."""
        return torch.utils.data.DataLoader(
            self.dataset(todo), batch_size=self.batch_size, shuffle=False,
            num_workers=self.workers, collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if self.workers > 0 else None,
            worker_init_fn=background_worker if self.workers > 0 else None)

    def decode(self, batch: Batch) -> Batch:
        """--device-jpeg: JPEG bytes become model input on the device."""
        if not batch.encoded:
            return batch
        from fgcli.data.devicejpeg import decode_into

        proc = self.loaded.config
        return decode_into(batch, self.device, (proc.size, proc.crop, proc.resize,
                                                proc.mean, proc.std, proc.interpolation),
                           "overlay" in self.cfg.save, self.cfg.spec.max_pixels)

    def compute(self, x: torch.Tensor) -> list[tuple[int | None, dict[str, Any]]]:
        """One batch through the engine, per rank (--topk) its results on the host
        (:func:`fgcli.dump.host.to_host`). Raises :class:`OutOfMemory` when even one image
        does not fit."""
        x = x.to(self.device, non_blocking=True)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        results = []
        target: Any = self.fixed_target
        top = None
        for rank in self.ranks:
            if rank is not None and rank > 1:
                target = top[:, rank - 1]
            exp = self.explain(x, target)
            if rank == 1:
                top = exp.logits.topk(len(self.ranks), dim=1).indices
            results.append((rank, to_host(exp)))
        return results

    def explain(self, x: torch.Tensor, target: Any) -> Any:
        """The engine on one batch; on device out-of-memory, halve the batch and retry.

        The smaller size is kept for the rest of the run (logged once per halving).
        """
        if len(x) > self.max_batch:
            step = self.max_batch  # fixed here: a part may lower self.max_batch further
            parts = [self.explain(x[i:i + step], _slice(target, i, step))
                     for i in range(0, len(x), step)]
            return _concat(parts)
        try:
            with self._autocast(), model_code(self.cfg.spec.model, "computing a batch"):
                return self.engine.explain(x, target, compact="decomp" in self.cfg.save)
        except Exception as exc:  # only out-of-memory is handled here
            if not _is_oom(exc):
                raise
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(x) == 1:
            raise OutOfMemory(f"out of memory on {self.device} even for one image")
        self.max_batch = max(1, len(x) // 2)
        self.reporter.warn(f"out of memory on {self.device} with a batch of {len(x)}; "
                           f"retrying with batches of {self.max_batch}")
        return self.explain(x, target)

    def _autocast(self) -> Any:
        """--amp: bfloat16 autocast on the CPU, float16 on CUDA, nothing otherwise."""
        if not self.cfg.amp or self.device.type not in ("cpu", "cuda"):
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


def model_code(spec: str, doing: str) -> Any:
    """The model's forward as user code: its sys.exit / own KeyboardInterrupt is the
    model's failure (SetupError, exit 2), see ``fgcli.models.sources.usercode.user_code``."""
    from fgcli.models.sources.usercode import FORWARD_HINT, user_code

    return user_code(f"model {spec}", doing, FORWARD_HINT)


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



def background_worker(worker_id: int) -> None:
    """A DataLoader worker: stop signals are the main process's, and its decoding runs
    below the compute threads' priority (:mod:`fgcli.dump.background`)."""
    ignore_stop_signals(worker_id)
    lower_priority()


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



def annotations(cfg: RunConfig) -> Any:
    """--boxes / --masks read (:func:`fgcli.audit.annotations.read_annotations`), or None.
    Raises UsageError naming the file (and line) that is malformed."""
    if cfg.boxes is None and cfg.masks is None:
        return None
    from fgcli.audit.annotations import read_annotations

    return read_annotations(boxes=cfg.boxes, masks=cfg.masks)
