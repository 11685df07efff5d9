"""Fault injection for the output tree: writes that fail like a full disk or a bad disk.

Every byte the tree writes goes through ``os.write`` (:func:`fgcli.tree.atomic.write_all`),
so patching ``os.write`` reaches the writer threads too. A write is matched by the path
of its file descriptor (``/proc/self/fd``), with an fnmatch pattern such as
``*/.tmp/*.jpg`` (an overlay on its way into the tree) or ``*/manifest.jsonl``.

* :func:`full_disk`: the matching files may take ``after`` bytes in all; the write that
  crosses the limit is short (as the kernel answers on a full disk), every later one
  raises ENOSPC.
* :func:`failing_files`: the first ``files`` matching files fail with ``error`` (EIO by
  default) after ``after`` bytes each; others are untouched.

Also :func:`tiny_filesystem`: a real tmpfs of a given size (root in a container), or a
skip with the reason when mounting is not allowed.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import reject_constant


def path_of(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


@dataclass
class Fault:
    """What was injected: the paths whose writes failed."""

    pattern: str
    after: int
    error: int
    files: int | None  # None: every matching file
    shared: bool  # True: ``after`` is one budget for all matching files (a disk)
    failed: list[str] = field(default_factory=list)
    written: dict[str, int] = field(default_factory=dict)
    chosen: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def allowance(self, path: str, size: int) -> int | None:
        """Bytes this write may still put down (None: not affected)."""
        with self.lock:
            if self.files is not None and path not in self.chosen:
                if len(self.chosen) >= self.files:
                    return None
                self.chosen.append(path)
            used = sum(self.written.values()) if self.shared else self.written.get(path, 0)
            room = max(0, self.after - used)
            take = min(room, size)
            self.written[path] = self.written.get(path, 0) + take
            if take == 0:
                self.failed.append(path)
            return take


@contextlib.contextmanager
def _patched(fault: Fault) -> Iterator[Fault]:
    real = os.write
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to tell which file a write goes to")

    def write(fd: int, data: bytes) -> int:
        path = path_of(fd)
        if path is None or not fnmatch.fnmatch(path, fault.pattern):
            return real(fd, data)
        take = fault.allowance(path, len(data))
        if take is None or take == len(data):
            return real(fd, data)
        if take == 0:
            raise OSError(fault.error, os.strerror(fault.error))
        return real(fd, bytes(memoryview(data)[:take]))  # a short write

    os.write = write
    try:
        yield fault
    finally:
        os.write = real


def full_disk(pattern: str = "*", after: int = 0) -> contextlib.AbstractContextManager[Fault]:
    """Writes to files matching ``pattern`` stop fitting after ``after`` bytes in all."""
    return _patched(Fault(pattern, after, errno.ENOSPC, None, shared=True))


def failing_files(pattern: str, error: int = errno.EIO, after: int = 0, files: int | None = 1
                  ) -> contextlib.AbstractContextManager[Fault]:
    """The first ``files`` files matching ``pattern`` fail with ``error`` after ``after``
    bytes each (None: every matching file)."""
    return _patched(Fault(pattern, after, error, files, shared=False))


@contextlib.contextmanager
def tiny_filesystem(where: Path, size: str = "1200k") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` for the duration; skips the test with the
    reason when this machine does not let us mount one."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(where)], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=20)


# --------------------------------------------------------------------------- checks

OUTPUT_FOLDERS = ("heatmaps", "overlays", "maps", "decomp")


def assert_tree_whole(out: Path) -> list[str]:
    """Every output file decodes fully and nothing but the tree's own files is outside
    ``.tmp/``; returns the output files (relative paths)."""
    import numpy as np
    from PIL import Image

    found = []
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if rel.startswith(".tmp") or path.is_dir():
            continue
        top = rel.split("/")[0]
        if top in OUTPUT_FOLDERS:
            found.append(rel)
            if path.suffix in (".png", ".jpg"):
                with Image.open(path) as img:
                    img.load()  # a truncated file raises here
            elif path.suffix == ".npy":
                np.load(path, allow_pickle=False)
            elif path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as npz:
                    for name in npz.files:
                        npz[name]
            else:
                raise AssertionError(f"unexpected file in the tree: {rel}")
        else:
            name = rel.split("/", 2)[-1] if top == "shards" else rel
            assert name in ("manifest.jsonl", "run.json", ".fullgrad.lock"), \
                f"unexpected file in the tree: {rel}"
            if name == "run.json":
                json.loads(path.read_text("utf-8"),
                                         parse_constant=reject_constant)
    return found


class DriverState:
    """What ``fgcli.distributed.ray_data.write_records`` needs of the driver's ledger,
    keeping the records it writes (``written``) and the warnings it gives (``warned``)."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        from fgcli.dump.report import RunReport
        from fgcli.signals import StopSignals

        self.cfg = SimpleNamespace(fail_fast=False)
        self.stop = StopSignals(installed=False)  # as the ledger has
        self.halted = None
        self.report = RunReport()
        self.written: list[dict] = []
        self.warned: list[str] = []
        self.reporter = SimpleNamespace(warn=self.warned.append)

    def write_record(self, rec: dict) -> None:
        self.written.append(rec)
