"""The output tree: the only place tensors become files.

Layout under ``--out``::

    heatmaps/<key>[.top<R>_<class>].png   colormapped map at the original resolution
    overlays/<key>[.top<R>_<class>].jpg   the image blended with the heatmap
    maps/<key>[.top<R>_<class>].npy       float32 map at model resolution (engine output)
    decomp/<key>[.top<R>_<class>].npz     compact decomposition (``--save decomp``)
    manifest.jsonl                        one JSON line per image (and per target)
    run.json                              what the last run (or merge) did
    shards/<I>-of-<N>/manifest.jsonl      a shard's lines until `fullgrad merge` takes them
    shards/<I>-of-<N>/run.json            what that shard did
    .fullgrad.lock                        held while a run is writing here
    .tmp/                                 scratch for atomic writes; emptied at every start

``<key>`` is the manifest's key (valid UTF-8, see :mod:`fgcli.names`); a path component
longer than the file system allows (255 bytes) is cut and ends in ``~`` and a hash.

Every file is written to ``.tmp/`` and moved into place with ``os.replace``,
so a killed run leaves only whole files; the next run clears ``.tmp/``
(:func:`atomic_write`; eval's report and the gallery use it too, with a hidden temporary
file beside each destination). Every write is
checked to the last byte (:func:`write_all`; encoders never get the file descriptor, so a
short write on a full disk cannot go unnoticed) and the file is closed before it moves.
A full disk (ENOSPC, EDQUOT) raises :class:`DiskFullError` (the run stops, exit 2);
any other write error names the file. Manifest appends are one checked write per line,
cut back to the last whole line when they fail.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import math
import os
import shutil
import socket
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fgcli import names, render
from fgcli.errors import SetupError

MANIFEST = "manifest.jsonl"
RUN_JSON = "run.json"
LOCK = ".fullgrad.lock"
TMP = ".tmp"
SHARDS = "shards"
SUFFIX = {"heatmap": ".png", "overlay": ".jpg", "map": ".npy", "decomp": ".npz"}
FOLDER = {"heatmap": "heatmaps", "overlay": "overlays", "map": "maps", "decomp": "decomp"}
MANIFEST_SCHEMA = 1
STATUSES = ("ok", "failed", "skipped")
NUMBERS = {"logit": float, "prob": float, "residual": float, "seconds": float, "target": int}
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# fsync before the move: off. Measured on ext4 (virtio SSD) it costs 0.3-0.8 ms per file,
# against ~0.04-0.13 ms for the write itself: 3-6% of a small CPU run, and a cap of a
# few thousand files/s for a GPU run writing three files an image (far less on disks
# or network file systems). The checked write + close + move keeps every visible file
# whole whenever the process dies or the disk fills; only a power loss is not covered.
FSYNC = False
SINK_BUFFER = 1 << 20  # bytes gathered before one write (large outputs stream through)


class TreeWriteError(SetupError):
    """The tree cannot be written any more (its manifest, or a full disk): the run stops,
    exit 2, one line; what was finished is kept and a rerun resumes."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:  # pickled whole (a Ray actor raises it)
        return (TreeWriteError, (str(self), self.path))


class DiskFullError(TreeWriteError):
    """No space left (ENOSPC) or quota exceeded (EDQUOT) while writing ``path``."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"no space left on device writing {path}", path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (DiskFullError, (self.path,))


class WriteFailed(OSError):
    """Writing ``path`` failed for a reason other than a full disk (``reason``: the
    system's words); its text names the file."""

    def __init__(self, code: int | None, reason: str, path: Path) -> None:
        super().__init__(code, f"{reason} writing {path}")
        self.reason = reason
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:  # pickled whole (a Ray actor may raise it)
        return (WriteFailed, (self.errno, self.reason, self.path))


def _named(exc: OSError, path: Path) -> Exception:
    """A full disk as :class:`DiskFullError`; any other write error naming ``path``."""
    if isinstance(exc, WriteFailed):
        return exc
    if exc.errno in DISK_FULL:
        return DiskFullError(path)
    return WriteFailed(exc.errno, str(exc.strerror or exc), path)


def atomic_write(dest: Path, write: Callable[[Any], None], scratch: Path | None = None
                 ) -> None:
    """``write(sink)`` into a temporary file, checked and closed, then moved to ``dest``:
    ``dest`` is whole or untouched. The temporary file is in ``scratch`` when given (a
    tree's ``.tmp/``), else hidden beside ``dest``; it is removed on any failure.

    A full disk raises :class:`DiskFullError`; other ``OSError``s are
    :class:`WriteFailed`, naming ``dest`` (never the temporary file)."""
    name = uuid.uuid4().hex
    tmp = scratch / f"{name}{dest.suffix}" if scratch is not None else (
        dest.parent / f".{name}{dest.suffix}.tmp")
    fd = -1
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        sink = _Sink(fd)
        write(sink)
        sink.flush()
        if FSYNC:
            os.fsync(fd)
        fd, closing = -1, fd
        os.close(closing)  # errors surface here on some file systems (NFS)
        os.replace(tmp, dest)
    except BaseException as exc:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _named(exc, dest) from exc
        raise


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write every byte of ``data`` to ``fd`` or raise: ``os.write`` may write less than
    asked (a disk that fills up midway), and the rest must not be lost silently."""
    view = memoryview(data).cast("B")
    while len(view):
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "the file system accepted no bytes")
        view = view[written:]


class _Sink:
    """A write-only file object for encoders (Pillow, NumPy, zipfile) over a descriptor.

    It has no ``fileno()`` on purpose: Pillow then hands its encoder's output to
    :meth:`write` instead of writing to the descriptor itself, which ignores short writes
    (how a truncated overlay reached the tree on a full disk)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.size += len(view)
        if not self.buffer and len(view) >= SINK_BUFFER:
            write_all(self.fd, view)  # a large block: no copy
            return len(view)
        self.buffer += view
        if len(self.buffer) >= SINK_BUFFER:
            self.flush()
        return len(view)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        if self.buffer:
            write_all(self.fd, self.buffer)
            self.buffer.clear()


class LockedError(Exception):
    """Another run holds the output directory (or the shard)."""


def _busy(exc: OSError) -> bool:
    return exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)


def _holder_text(raw: str) -> str | None:
    try:
        info = json.loads(raw)
        return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')} "
                f"({' '.join(info.get('command', []))})")
    except (ValueError, AttributeError, TypeError):
        return None


def _unlock(fh: io.TextIOWrapper) -> None:
    """Unlock and close a lock file whose holder text could not be written."""
    with contextlib.suppress(OSError, ValueError):
        fcntl.lockf(fh.fileno(), fcntl.LOCK_UN)
    with contextlib.suppress(OSError, ValueError):
        fh.close()  # closes the descriptor even when flushing the text fails again


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float as None, through dicts, lists and tuples:
    strict JSON (RFC 8259 has no NaN) for files whose numbers are reports, not results
    (eval.json, the gallery's data). Manifest lines never need it: a non-finite result
    fails its image before it is written."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def refuse_if_held(root: str | Path) -> None:
    """Refuse at once, before torch and the model load, when a plain run, a merge or a
    Ray driver holds ``root``'s lock (:class:`LockedError` naming it). Only a probe:
    :meth:`OutputTree.acquire` takes the lock for real and decides every other case
    (running shards among them), so this never refuses what it would allow. The file is
    opened read-only and never created; the probe's shared lock goes with the close."""
    path = Path(root) / LOCK
    try:
        fh = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError:
        return  # no lock file (a new tree) or unreadable: acquire will say
    with fh:
        try:
            fcntl.lockf(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder_text(fh.read().strip()) if _busy(exc) else None
            if holder is not None:  # an exclusive holder (shards leave no text)
                raise LockedError(f"{root} is in use by {holder}") from exc


class OutputTree:
    """Paths, atomic writes, the locks and the manifest of one output directory.

    ``shard`` (a name like ``0-of-4``) makes this the view of one shard: its manifest,
    ``run.json`` and lock live in ``shards/<name>/``, its scratch in ``.tmp/<name>/``;
    the output files go to the same folders as a plain run's.

    Locking (POSIX record locks, released by the OS when a process dies): a plain run,
    a merge and a Ray driver hold ``.fullgrad.lock`` exclusively; a shard holds it
    shared, plus its own ``shards/<name>/.lock`` exclusively. So shards of one count run
    side by side, and a plain run and shards exclude each other, each naming the holders.
    """

    def __init__(self, root: str | Path, shard: str | None = None) -> None:
        self.root = Path(root)
        self.shard = shard
        self.home = self.root if shard is None else self.root / SHARDS / shard
        self.scratch = self.root / TMP if shard is None else self.root / TMP / shard
        self.manifest_path = self.home / MANIFEST
        self.run_json_path = self.home / RUN_JSON
        self._locks: list[io.TextIOWrapper] = []
        self._manifest_fd: int | None = None
        self._manifest_size = 0  # bytes of whole lines in the manifest
        self._readers: dict[Path, io.BufferedReader] = {}
        self._files: TreeFiles | None = None

    # -- locks -----------------------------------------------------------------------
    def acquire(self, command: list[str]) -> None:
        """Take the locks; :class:`LockedError` names whoever holds them.

        A POSIX record lock (``lockf``), not ``flock``: forked DataLoader workers
        do not inherit it, so a killed run's lingering workers cannot keep the
        directory locked.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": _now(), "command": command})
        tree_fh = open(self.root / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 - held
        exclusive = self.shard is None
        try:
            fcntl.lockf(tree_fh.fileno(),
                        (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as exc:
            if not _busy(exc):
                tree_fh.close()
                raise
            tree_fh.seek(0)
            plain = _holder_text(tree_fh.read().strip())
            tree_fh.close()
            if plain is not None:
                raise LockedError(f"{self.root} is in use by {plain}") from exc
            shards = running_shards(self.root)
            if not shards:
                raise LockedError(f"{self.root} is in use by another fullgrad run") from exc
            name, text = next(iter(shards.items()))
            more = f" and {len(shards) - 1} more" if len(shards) > 1 else ""
            raise LockedError(f"{self.root} is in use by {len(shards)} running shard(s): "
                              f"shard {name} by {text}{more}") from exc
        # holding the tree lock (either way) means no plain run is writing: any holder
        # text left in the file is a killed run's
        try:
            tree_fh.seek(0)
            tree_fh.truncate()
            if exclusive:
                tree_fh.write(info)
                tree_fh.flush()
        except BaseException:  # e.g. a full disk: give the lock back, leak no handle
            _unlock(tree_fh)
            raise
        self._locks.append(tree_fh)
        if not exclusive:
            try:
                self._acquire_shard(info)
            except BaseException:
                self.release()
                raise
        shutil.rmtree(self.scratch, ignore_errors=True)  # leftovers of a killed run
        self.scratch.mkdir(parents=True, exist_ok=True)

    def _acquire_shard(self, info: str) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        fh = open(self.home / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 - held
        for attempt in range(20):
            try:
                fcntl.lockf(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if not _busy(exc):
                    fh.close()
                    raise
                if attempt < 19:  # another shard's running_shards() probe holds it briefly
                    time.sleep(0.05)
                    continue
                fh.seek(0)
                who = _holder_text(fh.read().strip()) or "another fullgrad run"
                fh.close()
                raise LockedError(f"shard {self.shard} of {self.root} is in use by "
                                  f"{who}") from exc
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(info)
            fh.flush()
        except BaseException:
            _unlock(fh)
            raise
        self._locks.append(fh)
        count = self.shard.rpartition("-of-")[2]
        others = {name: text for name, text in running_shards(self.root, skip=self.shard).items()
                  if name.rpartition("-of-")[2] != count}
        if others:
            if not self.manifest_path.exists():  # leave no empty shard folder behind
                (self.home / LOCK).unlink(missing_ok=True)
                shutil.rmtree(self.home, ignore_errors=True)
            name, text = next(iter(others.items()))
            raise LockedError(f"{self.root} has shards of another count running (shard "
                              f"{name} by {text}): shards running together must share N")

    def release(self) -> None:
        self._close_manifest()
        shutil.rmtree(self.scratch, ignore_errors=True)
        for fh in reversed(self._locks):
            fh.seek(0)
            fh.truncate()
            fcntl.lockf(fh.fileno(), fcntl.LOCK_UN)
            fh.close()
        self._locks = []

    def abandon(self, created: Path | None) -> None:
        """Release after a start that failed. When no other process holds the tree, also
        remove what :meth:`acquire` put there and nothing else uses (a lock file alone,
        empty scratch and shard folders) and, when this run created the directory
        (``created``: the topmost folder it made, see :func:`first_missing`), the folders
        up to ``created`` that are then empty: a failed start leaves no new empty tree."""
        if not self._locks:
            return
        try:  # alone here? (a shard's shared lock becomes exclusive when no one shares it)
            fcntl.lockf(self._locks[0].fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.release()
            return
        self._close_manifest()
        shutil.rmtree(self.scratch, ignore_errors=True)
        leftovers = [self.root / TMP]
        if self.shard is not None:
            (self.home / LOCK).unlink(missing_ok=True)
            leftovers = [self.home, self.root / SHARDS, self.root / TMP]
        for folder in leftovers:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        with contextlib.suppress(OSError):
            if os.listdir(self.root) == [LOCK]:
                (self.root / LOCK).unlink()
        self.release()
        remove_created(self.root, created)

    # -- paths and atomic writes ----------------------------------------------------------
    def path(self, kind: str, key: str, rank: int | None, cls: int | None) -> Path:
        stem = key if rank is None else f"{key}.top{rank}_{cls}"
        # a name near the file system's limit gets a shortened, hashed one (fgcli.names.fit)
        return self.root / FOLDER[kind] / (names.fit(stem) + SUFFIX[kind])

    def _atomic(self, dest: Path, write: Callable[[Any], None]) -> None:
        """``write(sink)`` into a scratch file in ``.tmp/``, then moved to ``dest``
        (:func:`atomic_write`)."""
        atomic_write(dest, write, self.scratch)

    def write_palette_png(self, dest: Path, indices: np.ndarray, palette: np.ndarray) -> None:
        """An 8-bit palette PNG: a colormapped heatmap is exactly a table lookup, and this
        encodes ~6x faster than RGB, at half the size, with identical colours."""
        img = Image.frombytes("P", (indices.shape[1], indices.shape[0]),
                              np.ascontiguousarray(indices).tobytes())
        img.putpalette(palette.tobytes())
        self._atomic(dest, lambda fh: img.save(fh, "PNG", compress_level=1))

    def write_jpeg(self, dest: Path, rgb: np.ndarray) -> None:
        self._atomic(dest, lambda fh: Image.fromarray(rgb, "RGB").save(fh, "JPEG", quality=90))

    def write_bytes(self, dest: Path, blob: bytes) -> None:
        self._atomic(dest, lambda fh: fh.write(blob))

    def write_npy(self, dest: Path, array: np.ndarray) -> None:
        self._atomic(dest, lambda fh: np.save(fh, array, allow_pickle=False))

    def write_npz(self, dest: Path, arrays: dict[str, np.ndarray]) -> None:
        encoded = io.BytesIO()  # zipfile wants a readable, seekable file
        np.savez_compressed(encoded, **arrays)
        self._atomic(dest, lambda fh: fh.write(encoded.getbuffer()))

    def write_json(self, dest: Path, data: dict[str, Any]) -> None:
        data = names.clean(data)  # a command line or path with raw bytes: valid text
        blob = (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        self._atomic(dest, lambda fh: fh.write(blob))

    # -- manifest -------------------------------------------------------------------
    # Memory stays small for huge runs: records are kept on disk and found again by
    # (file, byte offset); only (key, rank) -> (file, offset) is held in memory.
    def index_manifest(self, owns: Callable[[str], bool] | None = None,
                       bad: BadLines | None = None
                       ) -> dict[tuple[str, int | None], tuple[Path, int]]:
        """(key, rank) -> (manifest file, byte offset) of the latest line for each key.

        A plain run reads ``manifest.jsonl``. A shard reads it too, then the manifests
        of shards of other counts, then its own (latest wins), keeping only the keys
        ``owns`` accepts: a shard of the same count never holds this shard's keys.
        Malformed lines are skipped (counted in ``bad``).
        """
        sources = [self.root / MANIFEST]
        if self.shard is not None:
            count = self.shard.rpartition("-of-")[2]
            sources += [p for p in shard_manifests(self.root)
                        if p.parent.name.rpartition("-of-")[2] != count]
            sources.append(self.manifest_path)
        latest = Latest()
        for path in sources:
            for offset, rec in iter_manifest(path, bad):
                if owns is None or owns(rec["key"]):
                    latest.offer(rec, path, offset)
        return {key: (path, offset) for key, (_, path, offset) in latest.items()}

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

    @property
    def files(self) -> TreeFiles:
        """Where the records' output paths lead (symbolic links out are refused)."""
        if self._files is None:
            self._files = TreeFiles(self.root)
        return self._files

    def append(self, record: dict[str, Any]) -> str:
        """Append one record as one line of strict JSON (RFC 8259: ``allow_nan=False``).

        One checked write per line, straight to the file (a killed run keeps every
        finished line); a write that fails midway is cut back to the last whole line, so
        the manifest never ends in a torn line. Raises :class:`TreeWriteError` (or
        :class:`DiskFullError`) when the manifest cannot be written."""
        line = json.dumps(record, ensure_ascii=False, allow_nan=False)
        data = (line + "\n").encode("utf-8")
        try:
            if self._manifest_fd is None:
                self._open_manifest()
            write_all(self._manifest_fd, data)
        except BaseException as exc:
            self._cut_back()
            if isinstance(exc, OSError):
                named = _named(exc, self.manifest_path)
                raise (named if isinstance(named, TreeWriteError) else TreeWriteError(
                    f"cannot write {self.manifest_path}: {exc.strerror or exc}",
                    self.manifest_path)) from exc
            raise
        self._manifest_size += len(data)
        return line

    def _open_manifest(self) -> None:
        """Open the manifest for appending; a torn last line (a run killed mid-write on
        an older version, or a foreign writer) is cut off first."""
        path = self.manifest_path
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
        self._manifest_fd, self._manifest_size = fd, whole

    def _cut_back(self) -> None:
        """Drop the bytes of a line whose append failed midway."""
        if self._manifest_fd is None:
            return
        with contextlib.suppress(OSError):
            if os.fstat(self._manifest_fd).st_size != self._manifest_size:
                os.ftruncate(self._manifest_fd, self._manifest_size)

    def compact_manifest(self, bad: BadLines | None = None) -> None:
        """Rewrite this run's manifest with one line per (key, rank), the latest, atomically,
        in order of first appearance. Malformed lines are dropped (counted in ``bad``)."""
        self._close_manifest()
        src = self.manifest_path
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

        self._atomic(src, write)

    def _close_manifest(self) -> None:
        if self._manifest_fd is not None:
            fd, self._manifest_fd = self._manifest_fd, None
            with contextlib.suppress(OSError):  # every line was checked when written
                os.close(fd)
        for reader in self._readers.values():
            reader.close()
        self._readers = {}


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


def running_shards(root: Path, skip: str | None = None) -> dict[str, str]:
    """Shard name -> holder, for every shard whose lock is held right now.

    ``skip``: this process's own shard. It must not be probed: closing any descriptor
    of a file drops every POSIX lock the process holds on it.
    """
    folder = Path(root) / SHARDS
    found: dict[str, str] = {}
    if not folder.is_dir():
        return found
    for sub in sorted(folder.iterdir()):
        lock = sub / LOCK
        if sub.name == skip or not lock.is_file():
            continue
        with open(lock, "a+", encoding="utf-8") as fh:
            try:
                fcntl.lockf(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                if not _busy(exc):
                    raise
                fh.seek(0)
                found[sub.name] = _holder_text(fh.read().strip()) or "a fullgrad run"
            # closing drops the probe's lock (we hold no other lock on this file)
    return found


@dataclass
class ImageJob:
    """Everything needed to write one image's outputs (runs in a writer thread)."""

    key: str
    rank: int | None
    cls: int
    saliency: Callable[[], np.ndarray]  # (h, w) float32 at model resolution, when ready
    original: np.ndarray | Any  # (H, W, 3) uint8 region the model saw, or a (3, H, W)
    # tensor on the model's device (--device-jpeg), or None
    size: tuple[int, int]  # (width, height) of that region
    decomp: dict[str, np.ndarray] | None


def write_outputs(tree: OutputTree, job: ImageJob, save: tuple[str, ...], colormap: str,
                  alpha: float, overlay: str = "blend") -> dict[str, str]:
    """Write the requested outputs; returns kind -> path relative to the tree root.

    ``overlay``: the overlay style, ``blend`` or ``heat`` (:func:`render.overlay_style`).
    """
    written: dict[str, str] = {}
    indices = None
    saliency = job.saliency()
    for kind in save:
        dest = tree.path(kind, job.key, job.rank, job.cls)
        if kind == "map":
            tree.write_npy(dest, saliency.astype(np.float32, copy=False))
        elif kind == "decomp":
            if job.decomp is None:
                continue
            tree.write_npz(dest, job.decomp)
        else:
            lut = render.colormap_table(colormap)
            if indices is None:
                indices = render.heatmap_indices(saliency, job.size[0], job.size[1])
            if kind == "heatmap":
                tree.write_palette_png(dest, indices, lut)
            else:
                heat = lut[indices]
                if job.original is not None and not isinstance(job.original, np.ndarray):
                    from fgcli.render.device import encode_overlays  # blend + encode on device

                    blob = encode_overlays([job.original], [heat], alpha, style=overlay,
                                           indices=[indices])[0]
                    tree.write_bytes(dest, blob)
                    written[kind] = dest.relative_to(tree.root).as_posix()
                    continue
                base = job.original if job.original is not None else np.zeros_like(heat)
                tree.write_jpeg(dest, render.overlay_style(overlay, base, heat, indices, alpha))
        written[kind] = dest.relative_to(tree.root).as_posix()
    return written


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# -- output places that are not a tree (eval's --out, a gallery's OUT) ------------------

def first_missing(path: str | Path) -> Path | None:
    """The topmost folder of ``path`` that does not exist yet (None: it exists): what
    creating ``path`` makes, so that a run that then fails can take it away again."""
    missing = None
    p = Path(os.path.abspath(path))
    while not os.path.lexists(p):
        missing = p
        if p.parent == p:
            break
        p = p.parent
    return missing


def remove_created(path: str | Path, created: Path | None) -> None:
    """Remove ``path`` and its parents up to ``created`` while they are empty folders."""
    p = Path(os.path.abspath(path))
    if created is None or (created != p and created not in p.parents):
        return
    while True:
        try:
            p.rmdir()
        except OSError:
            return
        if p == created or p.parent == p:
            return
        p = p.parent


def writable_dir(path: str | Path, label: str) -> Path | None:
    """Create folder ``path`` if needed and check that files can be written in it (a
    temporary file, removed at once), before any slow work. Returns the topmost folder
    it created (None: none; see :func:`remove_created`); raises SetupError
    ``LABEL PATH: cannot write there (reason)``."""
    created = first_missing(path)
    p = Path(path)
    try:
        if os.path.lexists(p) and not p.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(p))
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fullgrad-probe-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        remove_created(p, created)
        raise SetupError(f"{label} {path}: cannot write there ({exc.strerror or exc})"
                         ) from exc
    return created
