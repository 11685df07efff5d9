"""The manifest: one strict JSON line per image (and per target), appended as each
finishes, read back by (file, byte offset), checked by one rule everywhere.

Memory stays small for huge runs: records are kept on disk and found again by
(file, byte offset); only (key, rank) -> (file, offset) is held in memory. Appends are
one checked write per line, cut back to the last whole line when they fail, so the
manifest never ends in a torn line; a run's manifest is compacted (one line per
(key, rank), atomically) when it ends.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fgcli import names
from fgcli.tree.atomic import TreeWriteError, atomic_write, named_error, write_all
from fgcli.tree.layout import MANIFEST, SHARDS, SUFFIX

MANIFEST_SCHEMA = 1
STATUSES = ("ok", "failed", "skipped")
NUMBERS = {"logit": float, "prob": float, "residual": float, "seconds": float, "target": int}


class Manifest:
    """One run's manifest file (``path``): appended line by line, compacted at the end
    (atomically, through ``scratch``); and the earlier records it reads back."""

    def __init__(self, path: Path, scratch: Path) -> None:
        self.path = path
        self.scratch = scratch
        self._fd: int | None = None
        self._size = 0  # bytes of whole lines in the manifest
        self._readers: dict[Path, io.BufferedReader] = {}

    def append(self, record: dict[str, Any]) -> str:
        """Append one record as one line of strict JSON (RFC 8259: ``allow_nan=False``).

        One checked write per line, straight to the file (a killed run keeps every
        finished line); a write that fails midway is cut back to the last whole line, so
        the manifest never ends in a torn line. Raises :class:`TreeWriteError` (or
        :class:`DiskFullError`) when the manifest cannot be written."""
        line = json.dumps(record, ensure_ascii=False, allow_nan=False)
        data = (line + "\n").encode("utf-8")
        try:
            if self._fd is None:
                self._open()
            write_all(self._fd, data)
        except BaseException as exc:
            self._cut_back()
            if isinstance(exc, OSError):
                named = named_error(exc, self.path)
                raise (named if isinstance(named, TreeWriteError) else TreeWriteError(
                    f"cannot write {self.path}: {exc.strerror or exc}",
                    self.path)) from exc
            raise
        self._size += len(data)
        return line

    def _open(self) -> None:
        """Open the manifest for appending; a torn last line (a run killed mid-write on
        an older version, or a foreign writer) is cut off first."""
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            size = os.fstat(fd).st_size
            whole = _whole_lines(fd, size)
            if whole < size:
                os.ftruncate(fd, whole)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._size = fd, whole

    def _cut_back(self) -> None:
        """Drop the bytes of a line whose append failed midway."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if os.fstat(self._fd).st_size != self._size:
                os.ftruncate(self._fd, self._size)

    def compact(self, bad: BadLines | None = None) -> None:
        """Rewrite the manifest with one line per (key, rank), the latest, atomically,
        in order of first appearance. Malformed lines are dropped (counted in ``bad``)."""
        self.close()
        src = self.path
        latest: dict[tuple[str, int | None], int] = {}
        for offset, rec in iter_manifest(src, bad):
            latest[(rec["key"], rec.get("rank"))] = offset
        if not latest and not src.exists():
            return

        def write(out: Any) -> None:
            with open(src, "rb") as fh:
                for offset in latest.values():
                    fh.seek(offset)
                    line = fh.readline()  # the file's last line may lack its newline
                    out.write(line if line.endswith(b"\n") else line + b"\n")

        atomic_write(src, write, self.scratch)

    def read_record(self, where: tuple[Path, int]) -> dict[str, Any] | None:
        """The manifest record at (file, byte offset); None when it is not a well-formed
        record (:func:`check_record`)."""
        path, offset = where
        reader = self._readers.get(path)
        if reader is None:
            reader = self._readers[path] = open(path, "rb")  # noqa: SIM115 - kept for the run
        reader.seek(offset)
        try:
            rec = parse_line(reader.readline())
        except (ValueError, RecursionError):
            return None
        return rec if check_record(rec) is None else None

    def close(self) -> None:
        """Close the appending descriptor and the readers."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):  # every line was checked when written
                os.close(fd)
        for reader in self._readers.values():
            reader.close()
        self._readers = {}


def index_manifests(root: Path, shard: str | None, own: Path,
                    owns: Callable[[str], bool] | None = None, bad: BadLines | None = None
                    ) -> dict[tuple[str, int | None], tuple[Path, int]]:
    """(key, rank) -> (manifest file, byte offset) of the latest line for each key.

    A plain run reads ``manifest.jsonl``. A shard reads it too, then the manifests
    of shards of other counts, then its own (``own``; latest wins), keeping only the keys
    ``owns`` accepts: a shard of the same count never holds this shard's keys.
    Malformed lines are skipped (counted in ``bad``).
    """
    sources = [root / MANIFEST]
    if shard is not None:
        count = shard.rpartition("-of-")[2]
        sources += [p for p in shard_manifests(root)
                    if p.parent.name.rpartition("-of-")[2] != count]
        sources.append(own)
    latest = Latest()
    for path in sources:
        for offset, rec in iter_manifest(path, bad):
            if owns is None or owns(rec["key"]):
                latest.offer(rec, path, offset)
    return {key: (path, offset) for key, (_, path, offset) in latest.items()}


class Latest(dict):
    """(key, rank) -> (time, file, offset) of the latest record, by one rule everywhere
    (resume and merge): within one file the later line wins; across files the later
    ``time`` wins, ties to the file read later. Lines without ``time`` (older versions)
    count as oldest."""

    def offer(self, rec: dict[str, Any], path: Path, offset: int) -> None:
        key = (rec["key"], rec.get("rank"))
        stamp = str(rec.get("time") or "")
        old = self.get(key)
        if old is None or old[1] == path or stamp >= old[0]:
            self[key] = (stamp, path, offset)


def iter_manifest(path: Path, bad: BadLines | None = None
                  ) -> Iterator[tuple[int, dict[str, Any]]]:
    """(byte offset, record) of every well-formed line (:func:`check_record`).

    Torn lines (a killed run's last), lines that are not strict JSON and malformed
    records are skipped, and counted in ``bad`` when given; blank lines are ignored.
    """
    if not path.exists():
        return
    offset = 0
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rec: Any = parse_line(line)
                    reason = check_record(rec)
                except _Constant as exc:
                    rec, reason = None, str(exc)
                except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
                    rec, reason = None, ("not JSON" if line.endswith(b"\n")
                                         else "torn (no newline: a killed run's last line?)")
                if reason is None:
                    yield offset, rec
                elif bad is not None:
                    bad.add(path, f"line {number}", reason)
            offset += len(line)


class _Constant(ValueError):
    """A bare NaN or Infinity: Python's json reads it, strict JSON parsers do not."""


def _no_constant(name: str) -> Any:
    raise _Constant(f"not strict JSON (bare {name})")


_STRICT = json.JSONDecoder(parse_constant=_no_constant)  # made once: json.loads with
# options would build a decoder for every line


def parse_line(line: bytes | str) -> Any:
    """A manifest line as strict JSON (RFC 8259): UTF-8, bare ``NaN`` and ``Infinity``
    refused (:class:`UnicodeDecodeError` and :class:`ValueError` say why)."""
    return _STRICT.decode(line.decode("utf-8-sig") if isinstance(line, bytes) else line)


def path_problem(text: Any) -> str | None:
    """Why ``text`` is not a safe path relative to a tree (a record's key or output),
    or None."""
    if not isinstance(text, str) or not text:
        return "is not a non-empty string"
    if "\0" in text:
        return "contains NUL"
    if os.path.isabs(text):
        return "is an absolute path"
    if ".." in text and ".." in text.split("/"):
        return "has a '..' component"
    if not text.isascii() and names.needs_bytes(text):
        return "is not valid Unicode"
    return None


def check_record(rec: Any) -> str | None:
    """Why a manifest record is malformed (a short phrase), or None when readers may use it.

    The one validation every reader of a manifest applies (resume, compaction, merge,
    gallery): an object; ``key`` a safe relative path (:func:`path_problem`); ``rank``
    absent, null or an integer >= 1; ``status`` ok, failed or skipped; ``input`` a string;
    ``outputs`` an object of known kinds (:data:`SUFFIX`) to safe relative paths (input
    and outputs may be absent, as in lines of older versions and hand-made ones); the
    numbers (:data:`NUMBERS`) null or finite of their type; ``time`` and ``error`` null
    or strings. Whether an output's file leads out of the tree (a symbolic link) is
    checked where the file is used (:class:`TreeFiles`).
    """
    if not isinstance(rec, dict):
        return "not a JSON object"
    problem = path_problem(rec.get("key"))
    if problem:
        return f"key {problem}"
    rank = rec.get("rank")
    if rank is not None and (type(rank) is not int or rank < 1):
        return "rank is not a positive integer"
    if rec.get("status") not in STATUSES:
        return "status is not ok, failed or skipped"
    if "input" in rec and (not isinstance(rec["input"], str) or names.needs_bytes(rec["input"])):
        return "input is not a string"
    outputs = rec.get("outputs", {})
    if not isinstance(outputs, dict):
        return "outputs is not an object"
    for kind, rel in outputs.items():
        if kind not in SUFFIX:
            return f"outputs has an unknown kind {str(kind)[:40]!r}"
        problem = path_problem(rel)
        if problem:
            return f"outputs.{kind} {problem}"
    for name, kind in NUMBERS.items():
        value = rec.get(name)
        if value is None:
            continue
        if type(value) not in ((int,) if kind is int else (int, float)):
            return f"{name} is not {'an integer' if kind is int else 'a number'}"
        if kind is int and value < 0:
            return f"{name} is not >= 0"
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer beyond any float: readers could not use it
            finite = False
        if not finite:
            return f"{name} is not finite"
    for name in ("time", "error"):
        if rec.get(name) is not None and not isinstance(rec[name], str):
            return f"{name} is not a string"
    return None


class BadLines:
    """Malformed manifest lines one reader skipped: per file, how many and the first
    reason, so that each file gets one warning line however many lines are bad."""

    def __init__(self) -> None:
        self.files: dict[Path, list[Any]] = {}

    def add(self, path: Path, where: str, reason: str) -> None:
        entry = self.files.setdefault(Path(path), [0, f"{where}: {reason}"])
        entry[0] += 1

    def warnings(self, dropped: Callable[[Path], bool] | None = None) -> list[str]:
        """``PATH: skipped N malformed line(s) (first: line L: REASON)`` per file;
        ``dropped(path)``: this reader rewrites that file without them (says dropped)."""
        return [f"{path}: {'dropped' if dropped is not None and dropped(path) else 'skipped'}"
                f" {n} malformed line(s) (first: {first})"
                for path, (n, first) in self.files.items()]


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class TreeFiles:
    """Where records' output paths lead in one tree: ``file``, ``missing`` or ``outside``
    (a symbolic link, of the file or of a folder above it, that leads out of the tree;
    never read). Folders are resolved once each, so a file costs one ``lstat``."""

    def __init__(self, root: str | Path) -> None:
        self.root = os.path.realpath(root)
        self._folders: dict[str, bool] = {}

    def state(self, rel: str) -> str:
        if path_problem(rel) is not None:
            return "outside"
        full = os.path.join(self.root, rel)
        folder = os.path.dirname(full)
        inside = self._folders.get(folder)
        if inside is None:
            inside = self._folders[folder] = _within(os.path.realpath(folder), self.root)
        if not inside:
            return "outside"
        try:
            mode = os.lstat(full).st_mode
        except (OSError, ValueError):
            return "missing"
        if stat.S_ISLNK(mode):
            real = os.path.realpath(full)
            if not _within(real, self.root):
                return "outside"
            return "file" if os.path.isfile(real) else "missing"
        return "file" if stat.S_ISREG(mode) else "missing"

    def outside(self, outputs: dict[str, str]) -> str | None:
        """The first output kind whose path leads out of the tree, or None."""
        return next((kind for kind, rel in outputs.items() if self.state(rel) == "outside"),
                    None)


def _whole_lines(fd: int, size: int) -> int:
    """The length of ``fd``'s content up to its last newline (``size`` when it ends in
    one, or when the text after it is a whole JSON record that only lacks the newline:
    then the newline is added)."""
    if size == 0:
        return 0
    end = size
    while end > 0:
        start = max(0, end - 65536)
        block = os.pread(fd, end - start, start)
        cut = block.rfind(b"\n")
        if cut >= 0:
            end = start + cut + 1
            break
        end = start
    if end == size:
        return size
    try:
        complete = isinstance(parse_line(os.pread(fd, size - end, end)), dict)
    except ValueError:
        complete = False
    if complete:
        write_all(fd, b"\n")
        return size + 1
    return end



def shard_manifests(root: Path) -> list[Path]:
    """The manifests under ``shards/``, by shard name."""
    folder = Path(root) / SHARDS
    if not folder.is_dir():
        return []
    return sorted(p / MANIFEST for p in folder.iterdir() if (p / MANIFEST).is_file())

