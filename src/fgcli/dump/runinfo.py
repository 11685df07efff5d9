"""``run.json``: what a run did, written when it ends (with the compacted manifest)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any

from fgcli import names
from fgcli.config import RunConfig
from fgcli.dump.ledger import Ledger
from fgcli.dump.session import Session
from fgcli.models.base import model_info
from fgcli.tree.atomic import TreeWriteError
from fgcli.tree.info import versions
from fgcli.tree.manifest import MANIFEST_SCHEMA
from fgcli.tree.shards import Shard
from fgcli.tree.writer import OutputTree


def finish(tree: OutputTree, info: Callable[[], dict[str, Any]], ledger: Ledger,
           started: float) -> None:
    """Compact the manifest and write ``run.json`` (``info()``, called once the counts
    are final). After a write failure that halted the run only ``run.json`` is tried
    (compaction needs room for a second copy of the manifest; the appended one is whole,
    and the next run compacts it)."""
    report = ledger.report
    report.seconds = time.perf_counter() - started
    try:
        if ledger.halted is None:
            tree.compact_manifest()
        tree.write_json(tree.run_json_path, info())
    except TreeWriteError as exc:
        ledger.halt(exc)
    report.interrupted = ledger.stop.name  # also a signal during these writes


def run_info(cfg: RunConfig, session: Session, ledger: Ledger, shard: Shard | None,
             started_at: str) -> dict[str, Any]:
    """What ``run.json`` says about this run."""
    model, report = session.loaded.config, ledger.report
    return {
        "schema": MANIFEST_SCHEMA,
        **({"shard": str(shard)} if shard else {}),
        "command": list(cfg.command),
        "model": model.name,
        "model_args": cfg.spec.arguments,
        "weights": model.weights,
        **model_info(model),
        "method": cfg.method.value, "psi": cfg.psi, "layers": cfg.layers,
        "settings": session.fingerprint,
        "target": cfg.target, "topk": cfg.topk,
        "input_size": list(model.size),
        "crop": cfg.spec.crop, "save": list(cfg.save), "overlay": cfg.overlay,
        "device": str(session.device), "host": platform.node(),
        # relative inputs are relative to it (the gallery's originals); cwd_bytes too
        # where it is not UTF-8 (fgcli.names)
        **names.record_fields(os.getcwd(), "cwd"),
        "jpeg": "device" if session.device_jpeg else "pillow",
        "batch_size": session.batch_size, "workers": session.workers,
        "writers": session.writers,
        "versions": versions(),
        "started": started_at, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(report.seconds, 3),
        "counts": {"ok": report.ok, "failed": report.failed, "skipped": report.skipped},
        "stopped_early": report.stopped_early,
        "interrupted": ledger.stop.name,  # "SIGINT" / "SIGTERM", or null
        "error": str(ledger.halted) if ledger.halted is not None else None,
    }
