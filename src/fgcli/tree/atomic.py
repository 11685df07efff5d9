"""Whole files or none: atomic writes, checked to the last byte, and the errors they raise.

Every file is written to a temporary file (in a tree's ``.tmp/``) and moved into place
with ``os.replace``, so a killed run leaves only whole files; the next run clears ``.tmp/``
(:func:`atomic_write`; eval's report and the gallery use it too, with a hidden temporary
file beside each destination). Every write is
checked to the last byte (:func:`write_all`; encoders never get the file descriptor, so a
short write on a full disk cannot go unnoticed) and the file is closed before it moves.
A full disk (ENOSPC, EDQUOT) raises :class:`DiskFullError` (the run stops, exit 2);
any other write error names the file. Also here: the output places that are not a tree
(eval's ``--out``, a gallery's OUT: :func:`writable_dir`) and strict JSON numbers
(:func:`finite`).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fgcli.errors import SetupError

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


def named_error(exc: OSError, path: Path) -> Exception:
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
            raise named_error(exc, dest) from exc
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
