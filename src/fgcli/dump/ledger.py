"""Where a run's records go and what they count.

A :class:`Ledger` makes the records of images that fail or are skipped, knows when the
run must take no new batch (:meth:`Ledger.halting`) and hands every finished record to
:meth:`Ledger.emit`. Two kinds: :class:`ManifestLedger` appends each record to the tree's
manifest, counts it and reports it (a plain run, a shard, a torchrun rank, the Ray
driver); :class:`CollectLedger` keeps the records for someone else to write (a Ray
actor returns them to the driver).
"""

from __future__ import annotations

import datetime
from typing import Any

from fgcli import names
from fgcli.config import RunConfig
from fgcli.data.discover import Item
from fgcli.dump.report import Reporter, RunReport, SilentReporter
from fgcli.signals import StopSignals
from fgcli.tree.atomic import TreeWriteError
from fgcli.tree.manifest import MANIFEST_SCHEMA
from fgcli.tree.writer import OutputTree


class Ledger:
    """Records of one run; ``settings``: the fingerprint every record carries,
    ``first_rank``: the rank of an image's failed line (None, or 1 with --topk)."""

    def __init__(self, cfg: RunConfig, settings: str, first_rank: int | None,
                 reporter: Reporter | None = None, stop: StopSignals | None = None,
                 report: RunReport | None = None) -> None:
        self.cfg = cfg
        self.settings = settings
        self.first_rank = first_rank
        self.reporter = reporter or SilentReporter()
        self.stop = stop or StopSignals(installed=False)
        self.report = report or RunReport(out=cfg.out)
        self.halted: TreeWriteError | None = None  # the tree cannot be written: stop

    def emit(self, record: dict[str, Any]) -> None:
        """One finished record (ok, failed or skipped)."""
        raise NotImplementedError

    def halt(self, exc: TreeWriteError) -> None:
        """The tree cannot be written: the run takes no new batch (the first error wins)."""
        self.halted = self.halted or exc

    def halting(self) -> bool:
        """True once the run must take no new batch: --fail-fast after a failure, a tree
        that cannot be written, or a stop signal."""
        return self.report.stopped_early or self.halted is not None or self.stop.requested

    def base(self, item: Item) -> dict[str, Any]:
        """The fields every record of ``item`` starts with."""
        return {"schema": MANIFEST_SCHEMA, **names.record_fields(item.path), "key": item.key,
                "settings": self.settings}

    def fail(self, item: Item, error: str) -> None:
        """One failed line for ``item``, whatever --topk says; --fail-fast stops the run."""
        rec = self.base(item)
        rec.update(status="failed", error=error, outputs={}, rank=self.first_rank)
        self.emit(rec)
        if self.cfg.fail_fast:
            self.report.stopped_early = True

    def write_failed(self, rec: dict[str, Any], error: str) -> None:
        """A computed image whose files could not be written: its record fails."""
        rec.update(status="failed", outputs={}, error=error)
        if self.cfg.fail_fast:
            self.report.stopped_early = True
        self.emit(rec)


class ManifestLedger(Ledger):
    """Each record appended to ``tree``'s manifest as it comes, counted and reported."""

    def __init__(self, tree: OutputTree, cfg: RunConfig, settings: str,
                 first_rank: int | None, reporter: Reporter, stop: StopSignals,
                 report: RunReport) -> None:
        super().__init__(cfg, settings, first_rank, reporter, stop, report)
        self.tree = tree

    def emit(self, record: dict[str, Any]) -> None:
        try:
            self.write_record(record)
        except TreeWriteError as exc:  # the manifest cannot take it: stop the run
            self.halt(exc)

    def write_record(self, record: dict[str, Any]) -> None:
        """Append one finished record to the manifest, count it and report it."""
        record = names.clean(record)  # valid Unicode even where a message quoted a raw path
        record["time"] = stamp()
        line = self.tree.append(record)
        status = record["status"]
        first_rank = record.get("rank") in (None, 1)
        if first_rank:
            if status in ("ok", "skipped") and self.report.objects is not None:
                self.report.objects.count(record)  # a skipped line keeps its objects
            if status == "ok":
                self.report.ok += 1
            elif status == "skipped":
                self.report.skipped += 1
            else:
                self.report.failed += 1
                if self.report.first_error is None:
                    self.report.first_error = f"{record['input']}: {record['error']}"
        self.reporter.record(record, line, first_rank)


class CollectLedger(Ledger):
    """Records kept, not written: a Ray actor returns them and the driver writes them."""

    def __init__(self, cfg: RunConfig, settings: str, first_rank: int | None) -> None:
        super().__init__(cfg, settings, first_rank)
        self.records: list[dict[str, Any]] = []

    def emit(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def take(self) -> list[dict[str, Any]]:
        """The records kept since the last call."""
        records, self.records = self.records, []
        return records


def stamp() -> str:
    """When a manifest line is written: UTC, milliseconds, sortable as text (merge keeps
    the newest line of a key by it)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
