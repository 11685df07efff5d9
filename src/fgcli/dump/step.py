"""One batch from decoded tensors to records and writer jobs: the compute step a local
run's loop and a Ray actor share (:func:`step`)."""

from __future__ import annotations

import time
from typing import Any

from fgcli.data.decode import Batch
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
            job = ImageJob(item.key, rank, cls, MapOf(host["maps"], j), original,
                           (box.right - box.left, box.bottom - box.top), decomp)
            jobs.append((rec, job))
    return jobs
