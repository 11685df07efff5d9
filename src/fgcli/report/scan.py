"""The latest record of every (key, rank) of a tree, streamed in memory bounded in the
number of records.

The rule is :class:`fgcli.tree.manifest.Latest`'s (within a file the later line wins;
across files the later ``time``, ties to the file read later), over the merged manifest
and every shard's, as the gallery reads them. Holding an offset per (key, rank) as the
gallery does grows with the tree, so the manifests are read twice instead:

1. every well-formed line's ``hash((key, rank))`` goes into one int64 array (8 bytes a
   line), sorted in place: the hashes seen twice are the only (key, rank)s that need
   the rule (none in a merged or compacted tree);
2. every other line is yielded as it is read; the duplicated ones are kept as four
   numbers each (hash, time, file, offset), resolved by the rule at the end, and the
   winners read back by offset.

Each file is opened once and read only up to the size it had then, so a dump still
appending (or compacting) while the report reads cannot mix two snapshots. Times are
compared to the millisecond of the dump's ISO format; a line without one (or in another
format) counts as oldest, as ``Latest`` counts a line without ``time``.
"""

from __future__ import annotations

import os
import re
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from fgcli.tree.layout import MANIFEST
from fgcli.tree.manifest import BadLines, check_record, parse_line, shard_manifests

_STAMP = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,3}))?")
_TICK = 4096  # lines between progress calls


def stamp_code(stamp: Any) -> int:
    """A line's ``time`` as an integer in the order of the strings (to the millisecond):
    ``2026-01-02T03:04:05.678+00:00`` -> 2 * 20260102030405678 + 1 (the last bit: it has
    a fraction, which sorts after none, as ``.`` after ``+``); -1 (oldest) when missing
    or not in that format."""
    if not isinstance(stamp, str):
        return -1
    match = _STAMP.match(stamp)
    if match is None:
        return -1
    *parts, ms = match.groups()
    return 2 * int("".join(parts) + (ms or "").ljust(3, "0")) + (ms is not None)


def _parse(line: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None) for a well-formed line (:func:`check_record`), else (None, why)."""
    try:
        rec = parse_line(line)
    except (ValueError, RecursionError) as exc:
        if "bare" in str(exc):
            return None, str(exc)
        return None, ("not JSON" if line.endswith(b"\n")
                      else "torn (no newline: a killed run's last line?)")
    reason = check_record(rec)
    return (rec, None) if reason is None else (None, reason)


class _Source:
    """One manifest file, opened once; read up to the size it had when opened."""

    def __init__(self, path: Path, fh: BinaryIO) -> None:
        self.path = path
        self.fh = fh
        self.size = os.fstat(fh.fileno()).st_size

    def lines(self) -> Iterator[tuple[int, int, bytes]]:
        """(line number, byte offset, line) of every non-blank line."""
        self.fh.seek(0)
        offset = number = 0
        while offset < self.size:
            line = self.fh.readline(self.size - offset)
            if not line:
                break
            number += 1
            if line.strip():
                yield number, offset, line
            offset += len(line)

    def read(self, offset: int) -> dict[str, Any] | None:
        self.fh.seek(offset)
        return _parse(self.fh.readline(max(0, self.size - offset)))[0]


class LatestRecords:
    """The tree's latest records, read as described in the module docstring:
    :meth:`open`, :meth:`index`, iterate :meth:`records` once, :meth:`close`."""

    def __init__(self, root: Path, bad: BadLines) -> None:
        self.root = Path(root)
        self.bad = bad
        self.sources: list[_Source] = []
        self.lines = 0  # lines pass 1 found usable, every file (the progress total)
        self.repeated: set[int] = set()  # hashes of (key, rank)s seen more than once

    def open(self) -> None:
        """Open every manifest of the tree (the merged one, then the shards')."""
        for path in [self.root / MANIFEST, *shard_manifests(self.root)]:
            try:
                fh = open(path, "rb")  # noqa: SIM115 - closed by close()
            except FileNotFoundError:
                continue
            except OSError as exc:
                self.bad.add(path, "file", f"cannot read it ({exc.strerror or exc})")
                continue
            self.sources.append(_Source(path, fh))

    def close(self) -> None:
        for source in self.sources:
            source.fh.close()

    def index(self) -> int:
        """Pass 1: count the well-formed lines and find the repeated (key, rank)s."""
        hashes = array("q")
        for source in self.sources:
            for _, _, line in source.lines():
                try:  # no check_record here (a third of the time): a malformed line
                    rec = parse_line(line)  # can only add a false repeat, which the
                    key, rank = rec["key"], rec.get("rank")  # rule then resolves alone
                except (ValueError, RecursionError, TypeError, KeyError, AttributeError):
                    continue
                if isinstance(key, str) and (rank is None or type(rank) is int):
                    hashes.append(hash((key, rank)))
        self.lines = len(hashes)  # an estimate for progress: malformed lines counted
        if len(hashes) > 1:
            flat = np.frombuffer(hashes, dtype=np.int64)  # a view: sorted in place
            flat.sort()
            same = flat[1:] == flat[:-1]
            self.repeated = set(np.unique(flat[1:][same]).tolist())
        return self.lines

    def records(self, progress: Callable[[int, int], None] | None = None
                ) -> Iterator[dict[str, Any]]:
        """Pass 2: every latest record once (order: as read, the repeated ones last);
        malformed lines counted in ``bad``; ``progress(done, total)`` now and then."""
        dup_hash, dup_time, dup_file, dup_offset = array("q"), array("q"), array("h"), array("q")
        done = 0
        for index, source in enumerate(self.sources):
            for number, offset, line in source.lines():
                rec, reason = _parse(line)
                if rec is None:
                    self.bad.add(source.path, f"line {number}", str(reason))
                    continue
                done += 1
                if progress is not None and done % _TICK == 0:
                    progress(done, self.lines)
                code = hash((rec["key"], rec.get("rank")))
                if code in self.repeated:
                    dup_hash.append(code)
                    dup_time.append(stamp_code(rec.get("time")))
                    dup_file.append(index)
                    dup_offset.append(offset)
                else:
                    yield rec
        for index, offset in winners(dup_hash, dup_time, dup_file, dup_offset):
            rec = self.sources[index].read(offset)
            if rec is not None:
                yield rec
        if progress is not None:
            progress(done, self.lines)


def winners(hashes: Any, times: Any, files: Any, offsets: Any) -> list[tuple[int, int]]:
    """(file, offset) of the line that wins each hash by ``Latest``'s rule, in file and
    offset order; the inputs are parallel sequences in the order the lines were read."""
    n = len(hashes)
    if n == 0:
        return []
    h = np.asarray(hashes, dtype=np.int64)
    t = np.asarray(times, dtype=np.int64)
    f = np.asarray(files, dtype=np.int64)
    order = np.argsort(h, kind="stable")  # a group's lines stay in reading order
    sorted_h = h[order]
    starts = np.flatnonzero(np.r_[True, sorted_h[1:] != sorted_h[:-1]])
    lengths = np.diff(np.r_[starts, n])
    win = order[starts]
    for j in range(1, int(lengths.max())):  # the j-th line of every group that has one
        live = np.flatnonzero(lengths > j)
        cand = order[starts[live] + j]
        held = win[live]
        take = (f[cand] == f[held]) | (t[cand] >= t[held])
        win[live[take]] = cand[take]
    off = np.asarray(offsets, dtype=np.int64)
    return sorted(zip(f[win].tolist(), off[win].tolist()))
