"""Which images a run computes: discovery, this shard's share, and resume.

:meth:`Plan.open` reads what earlier runs did (after folding leftover shards into the
tree's manifest); :meth:`Plan.chunks` walks the inputs and yields the images still to
compute, giving images that cannot be read their failed line and images already done
with these settings their skipped line on the way (through the run's ledger).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fgcli import names
from fgcli.config import RunConfig
from fgcli.data.discover import Item, discover
from fgcli.dump.ledger import Ledger
from fgcli.dump.report import Reporter
from fgcli.tree.manifest import BadLines, shard_manifests
from fgcli.tree.shards import Shard, merge_locked
from fgcli.tree.writer import OutputTree

CHUNK_BATCHES = 32  # batches per DataLoader (bounds memory for endless input lists)


def _chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


class Plan:
    """The images of one run (or of one ``shard`` of it), against ``tree``'s earlier
    records; ``ranks``: the targets each image gets (``[None]``, or 1..K with --topk)."""

    def __init__(self, cfg: RunConfig, tree: OutputTree, shard: Shard | None,
                 ledger: Ledger, ranks: list[int | None], stdin: Any) -> None:
        self.cfg, self.tree, self.shard = cfg, tree, shard
        self.ledger, self.ranks, self.stdin = ledger, ranks, stdin
        self.previous: dict[tuple[str, int | None], tuple[Path, int]] = {}
        self.outside_seen = False  # an earlier output leading out of the tree was reported

    @property
    def reporter(self) -> Reporter:
        return self.ledger.reporter

    def open(self) -> None:
        """Index what earlier runs did (the tree is locked).

        A plain run first folds shards left unmerged into ``manifest.jsonl``.
        """
        if self.shard is None and shard_manifests(self.tree.root):
            merged = merge_locked(self.tree)
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

    def chunks(self, batch_size: int) -> Iterator[list[Item]]:
        """The images still to compute, in chunks; on the way, images that cannot be read
        get their failed line and images already done with these settings a skipped line.
        Stops after a failure under ``--fail-fast``."""
        cfg, ledger = self.cfg, self.ledger
        alert = self.reporter.alert if self.shard is None or self.shard.index == 0 else None
        items: Iterable[Item] = discover(cfg.inputs, cfg.files_from, cfg.null, self.stdin,
                                         exclude=cfg.out, on_empty=alert)
        if self.shard is not None:
            owns = self.shard.owns
            items = (item for item in items if owns(item.key))
        for chunk in _chunks(items, batch_size * CHUNK_BATCHES):
            todo: list[Item] = []
            for item in chunk:
                if ledger.halting():
                    break
                if item.error is not None:
                    ledger.fail(item, item.error)
                    continue
                done = self._done_before(item)
                if done is not None:
                    for old in done:
                        rec = dict(old, status="skipped", error=None, seconds=0.0)
                        rec.pop("time", None)
                        ledger.emit(rec)
                    continue
                todo.append(item)
            if todo and not ledger.halting():
                yield todo
            if ledger.halting():
                return

    def _done_before(self, item: Item) -> list[dict[str, Any]] | None:
        if self.cfg.overwrite:
            return None
        found = []
        for rank in self.ranks:
            where = self.previous.get((item.key, rank))
            rec = self.tree.read_record(where) if where is not None else None
            if (rec is None or rec.get("status") not in ("ok", "skipped")
                    or rec.get("settings") != self.ledger.settings
                    or names.path_of(rec) != item.path
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
