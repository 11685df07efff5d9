"""Shards: ``--shard I/N`` takes the images whose output key hashes to I mod N.

The hash is BLAKE2b of the key's UTF-8 bytes (the relative output path, with ``/``
separators), so an image's shard depends on nothing but its key: not on the order
of a listing, the machine, the Python process (``hash()`` is salted), or files
added later. Shards of one count write into one tree side by side (see
:class:`fgcli.tree.writer.OutputTree`); :func:`merge` folds their manifests into
``manifest.jsonl``.

Shards of another count (``shards/1-of-3`` left from an earlier run next to
``0-of-2`` and ``1-of-2``) are merged too, never dropped: every line is a result of
the same tree keyed by image key (and rank) and carries its settings fingerprint and
``time``, so the newest line of each (key, rank) wins by :class:`fgcli.tree.manifest.Latest`,
the rule a resumed run already uses (a shard indexes shards of other counts as earlier
results, and recomputes an image whose settings differ). So no result is lost, and
none is mixed up with another image's; the merge names such shards in one warning line.

Lines of any manifest that are malformed (:func:`fgcli.tree.manifest.check_record`) are
dropped from the merged manifest, one warning line per file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fgcli.errors import SetupError, UsageError
from fgcli.tree.atomic import atomic_write
from fgcli.tree.layout import LOCK, MANIFEST, RUN_JSON, SHARDS
from fgcli.tree.lock import LockedError
from fgcli.tree.manifest import MANIFEST_SCHEMA, BadLines, Latest, iter_manifest, shard_manifests
from fgcli.tree.writer import OutputTree


def shard_of(key: str, count: int) -> int:
    """The shard (0..count-1) that owns an output key."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``I/N`` with 0 <= I < N (SLURM's ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``
        when the array starts at 0)."""
        index, sep, count = text.strip().partition("/")
        try:
            shard = cls(int(index), int(count))
        except ValueError:
            shard = None
        if not sep or shard is None or shard.count < 1 or not 0 <= shard.index < shard.count:
            raise UsageError(f"--shard: expected I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
        return shard

    @property
    def name(self) -> str:
        """The shard's folder under ``shards/``."""
        return f"{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, key: str) -> bool:
        return shard_of(key, self.count) == self.index


@dataclass
class MergeReport:
    shards: list[str] = field(default_factory=list)  # shard folders merged
    lines: int = 0  # lines read from every manifest
    records: int = 0  # lines written: one per (key, rank)
    counts: dict[str, int] = field(default_factory=dict)  # per image (first rank)
    warnings: list[str] = field(default_factory=list)  # one line each, for the caller


def merge(out: str | Path, command: list[str]) -> MergeReport:
    """``fullgrad merge OUT``: take the tree's lock and fold the shards in."""
    tree = OutputTree(out)
    if not tree.root.is_dir():
        raise SetupError(f"{out}: no such output directory")
    try:
        tree.acquire(command)
    except LockedError as exc:
        raise SetupError(str(exc)) from exc
    except OSError as exc:
        raise SetupError(f"{out}: cannot lock it ({exc.strerror or exc})") from exc
    try:
        return merge_locked(tree)
    finally:
        tree.release()


def merge_locked(tree: OutputTree) -> MergeReport:
    """Fold every shard manifest into ``manifest.jsonl``; the caller holds the tree's lock.

    One line per (key, rank): the latest by :class:`fgcli.tree.manifest.Latest` (within a file
    the later line; across files the later ``time``, ties to the shards). Lines are written
    sorted by key (path components), then rank, so the result does not depend on how
    the images were sharded. The new manifest replaces the old one atomically before
    any shard file is removed, so a merge killed at any point loses nothing, and merging
    again gives the same manifest.
    """
    report = MergeReport()
    folder = tree.root / SHARDS
    dirs = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not any((d / MANIFEST).exists() or (d / RUN_JSON).exists() for d in dirs):
        _remove(folder, dirs)  # folders of shards that were refused: nothing to merge
        return report
    main = tree.root / MANIFEST
    best = _read_all(tree.root, report)
    ordered = sorted(best, key=lambda k: (k[0].split("/"), k[1] or 0))
    counts = {"ok": 0, "skipped": 0, "failed": 0}

    def write(out: Any) -> None:
        readers: dict[Path, Any] = {}
        try:
            for key in ordered:
                _, path, offset = best[key]
                fh = readers.get(path) or readers.setdefault(path, open(path, "rb"))  # noqa: SIM115
                fh.seek(offset)
                line = fh.readline()
                if key[1] in (None, 1):
                    status = json.loads(line).get("status")
                    counts[status if status in counts else "failed"] += 1
                out.write(line if line.endswith(b"\n") else line + b"\n")
        finally:
            for fh in readers.values():
                fh.close()

    if best or main.exists():
        atomic_write(main, write, tree.scratch)  # through the tree's scratch folder
    report.records = len(ordered)
    report.counts = counts
    runs = []
    for sub in dirs:
        if not (sub / MANIFEST).exists() and not (sub / RUN_JSON).exists():
            continue  # a shard that was refused or never wrote a line: nothing to report
        index, _, count = sub.name.partition("-of-")
        try:
            runs.append({"shard": f"{index}/{count}",
                         **json.loads((sub / RUN_JSON).read_text("utf-8"))})
        except (OSError, ValueError):
            runs.append({"shard": f"{index}/{count}", "finished": None})  # it crashed
    _write_merged_run_json(tree, runs, counts)
    report.shards = [d.name for d in dirs if (d / MANIFEST).exists() or (d / RUN_JSON).exists()]
    _remove(folder, dirs)
    return report


def _read_all(root: Path, report: MergeReport) -> Latest:
    """The latest line of each (key, rank) in the merged manifest and every shard's;
    malformed lines are dropped and shards of another count named, one warning line each
    (in ``report.warnings``)."""
    best = Latest()
    bad = BadLines()
    newest: dict[str, str] = {}  # shard count -> the newest time in its lines
    shards = shard_manifests(root)
    for path in [root / MANIFEST, *shards]:
        count = path.parent.name.rpartition("-of-")[2] if path in shards else None
        for offset, rec in iter_manifest(path, bad):
            report.lines += 1
            best.offer(rec, path, offset)
            if count is not None:
                newest[count] = max(newest.get(count, ""), str(rec.get("time") or ""))
    report.warnings += bad.warnings(lambda _: True)
    counts = {p.parent.name.rpartition("-of-")[2] for p in shards}
    if len(counts) > 1:  # name the shards of every count but the newest one's
        latest = max(counts, key=lambda c: (newest.get(c, ""), int(c) if c.isdigit() else 0))
        names = [p.parent.name for p in shards]
        stale = [n for n in names if n.rpartition("-of-")[2] != latest]
        current = [n for n in names if n.rpartition("-of-")[2] == latest]
        report.warnings.append(
            f"shards {', '.join(stale)} are from another shard count than "
            f"{', '.join(current)}; their lines were merged by time (the newest line of "
            "each image wins)")
    return best


def _remove(folder: Path, dirs: list[Path]) -> None:
    """Delete merged shard folders (the caller holds the tree exclusively: none runs)."""
    for sub in dirs:
        for name in (MANIFEST, RUN_JSON, LOCK):
            (sub / name).unlink(missing_ok=True)
        shutil.rmtree(sub, ignore_errors=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


# run.json's fields that describe one shard's run: in its entry of the merged "shards"
PER_SHARD = ("shard", "host", "device", "started", "finished", "seconds", "counts",
             "stopped_early", "interrupted", "error")


def _write_merged_run_json(tree: OutputTree, runs: list[dict[str, Any]],
                           counts: dict[str, int]) -> None:
    """``run.json`` after a merge: the newest shard's settings, the merged counts, and
    what each shard reported (earlier merges' shards kept). What one shard's run did
    (:data:`PER_SHARD`: its times, counts, stop signal, error) is only in its entry."""
    finished = [r for r in runs if r.get("finished")]
    base: dict[str, Any] = {}
    if finished:
        base = dict(max(finished, key=lambda r: str(r.get("finished"))))
        for name in PER_SHARD:
            base.pop(name, None)
    previous: list[dict[str, Any]] = []
    try:
        old = json.loads((tree.root / RUN_JSON).read_text("utf-8"))
        previous = list(old.get("shards", []))
        if not base:
            base = {k: v for k, v in old.items()
                    if k not in ("shards", "counts", "merged", *PER_SHARD)}
    except (OSError, ValueError, AttributeError):
        pass
    merged_runs = previous + [{k: r.get(k) for k in PER_SHARD if k in r} for r in runs]
    tree.write_json(tree.root / RUN_JSON, {
        "schema": MANIFEST_SCHEMA, **base,
        "merged": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "counts": counts, "shards": merged_runs,
    })
