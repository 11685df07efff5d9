"""One batch from decoded tensors to records and writer jobs: the compute step a local
run's loop and a Ray actor share (:func:`step`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from fgcli.audit.localise import locate
from fgcli.audit.stats import stats_record
from fgcli.data.decode import Batch, Box
from fgcli.data.discover import Item
from fgcli.dump.host import MapOf, decomp_arrays, first_reasons
from fgcli.dump.ledger import Ledger
from fgcli.dump.session import OutOfMemory, Session
from fgcli.dump.writeback import ImageJob, WriteBack
from fgcli.errors import SetupError


def step(session: Session, ledger: Ledger, writeback: WriteBack, todo: list[Item],
         batch: Batch) -> None:
    """``batch`` (item j of it is ``todo[j]``) through the engine, its files queued for
    writing; images that failed to decode, that do not fit on the device or whose
    results are not finite get their failed line."""
    batch = session.decode(batch)
    for failure in batch.failures:
        ledger.fail(todo[failure.index], failure.error)
    if batch.x is None or ledger.halting():
        return
    start = time.perf_counter()
    try:
        results = session.compute(batch.x)
    except OutOfMemory as exc:
        for sample in batch.samples:
            ledger.fail(todo[sample.index], str(exc))
        return
    except SetupError:  # the model exited: the batches before keep their lines
        writeback.drain(0)
        raise
    finally:
        ledger.reporter.progress()
    seconds = (time.perf_counter() - start) / len(batch.samples)
    writeback.submit(_jobs(session, ledger, todo, batch, results, seconds))


def _jobs(session: Session, ledger: Ledger, todo: list[Item], batch: Batch,
          results: list[tuple[Any, dict]], seconds: float
          ) -> list[tuple[dict[str, Any], ImageJob]]:
    """Records and writer jobs of a computed batch; an image with a non-finite result
    gets one failed line instead (and no files), the others are written."""
    save = session.cfg.save
    categories = session.categories
    bad = first_reasons([host["nonfinite"] for _, host in results])
    for j, sample in enumerate(batch.samples):
        if bad[j] is not None:  # one failed line per image, whatever --topk says
            ledger.fail(todo[sample.index], bad[j])
    jobs: list[tuple[dict[str, Any], ImageJob]] = []
    for rank, host in results:
        for j, sample in enumerate(batch.samples):
            if bad[j] is not None:
                continue
            item = todo[sample.index]
            cls = int(host["target"][j])
            rec = ledger.base(item)
            rec.update(
                status="ok", error=None, rank=rank, target=cls,
                target_name=categories[cls] if categories else str(cls),
                logit=float(host["logit"][j]), prob=float(host["prob"][j]),
                residual=float(host["residual"][j]), seconds=round(seconds, 6),
            )
            decomp = decomp_arrays(host, j, cls) if "decomp" in save else None
            box = sample.box
            original = sample.original
            if original is not None and not sample.on_device:
                original = original.numpy()
            rec["stats"] = stats_record(host["stats"][j], box)
            job = ImageJob(item.key, rank, cls, MapOf(host["maps"], j), original,
                           (box.right - box.left, box.bottom - box.top), decomp,
                           _locator(session, item.key, box, cls, rec["target_name"]))
            jobs.append((rec, job))
    return jobs


def _locator(session: Session, key: str, region: Box, cls: int, name: str
             ) -> Callable[[np.ndarray], dict[str, Any]] | None:
    """With --boxes/--masks and an annotation for ``key``: the record's ``objects`` as a
    function of the image's map (run in a writer thread, on the host map)."""
    annotations = session.annotations
    objects = annotations.find(key) if annotations is not None else None
    if objects is None:
        return None
    return partial(locate, region=region, objects=objects, target=cls, target_name=name,
                   tolerance=session.cfg.point_tolerance, by_class=session.by_class)
