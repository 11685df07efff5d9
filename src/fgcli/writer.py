"""The output tree: the only place tensors become files.

Layout under ``--out``::

    heatmaps/<key>[.top<R>_<class>].png   colormapped map at the original resolution
    overlays/<key>[.top<R>_<class>].jpg   the image blended with the heatmap
    maps/<key>[.top<R>_<class>].npy       float32 map at model resolution (engine output)
    decomp/<key>[.top<R>_<class>].npz     compact decomposition (``--save decomp``)
    manifest.jsonl                        one JSON line per image (and per target)
    run.json                              what the last run did
    .fullgrad.lock                        held while a run is writing here
    .tmp/                                 scratch for atomic writes; emptied at every start

Every file is written to ``.tmp/`` and moved into place with ``os.replace``,
so a killed run leaves only whole files; the next run clears ``.tmp/``.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fgcli import render

MANIFEST = "manifest.jsonl"
RUN_JSON = "run.json"
LOCK = ".fullgrad.lock"
TMP = ".tmp"
SUFFIX = {"heatmap": ".png", "overlay": ".jpg", "map": ".npy", "decomp": ".npz"}
FOLDER = {"heatmap": "heatmaps", "overlay": "overlays", "map": "maps", "decomp": "decomp"}
MANIFEST_SCHEMA = 1


class LockedError(Exception):
    """Another run holds the output directory."""


class OutputTree:
    """Paths, atomic writes, the lock and the manifest of one output directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._lock_fh: io.TextIOWrapper | None = None
        self._manifest_fh: io.TextIOWrapper | None = None
        self._reader: io.BufferedReader | None = None

    # -- lock ----------------------------------------------------------------------
    def acquire(self, command: list[str]) -> None:
        """Take the directory's lock (released by the OS if the process dies).

        A POSIX record lock (``lockf``), not ``flock``: forked DataLoader workers
        do not inherit it, so a killed run's lingering workers cannot keep the
        directory locked.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK
        fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the run
        try:
            fcntl.lockf(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                fh.close()
                raise
            fh.seek(0)
            holder = fh.read().strip()
            fh.close()
            try:
                info = json.loads(holder)
                who = (f"pid {info.get('pid')} on {info.get('host')} since "
                       f"{info.get('started')} ({' '.join(info.get('command', []))})")
            except (ValueError, AttributeError):
                who = "another fullgrad run"
            raise LockedError(f"{self.root} is in use by {who}") from exc
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": _now(), "command": command}))
        fh.flush()
        self._lock_fh = fh
        shutil.rmtree(self.root / TMP, ignore_errors=True)  # leftovers of a killed run
        (self.root / TMP).mkdir(exist_ok=True)

    def release(self) -> None:
        self._close_manifest()
        shutil.rmtree(self.root / TMP, ignore_errors=True)
        if self._lock_fh is not None:
            self._lock_fh.seek(0)
            self._lock_fh.truncate()
            fcntl.lockf(self._lock_fh.fileno(), fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    # -- paths and atomic writes ----------------------------------------------------------
    def path(self, kind: str, key: str, rank: int | None, cls: int | None) -> Path:
        stem = key if rank is None else f"{key}.top{rank}_{cls}"
        return self.root / FOLDER[kind] / (stem + SUFFIX[kind])

    def _atomic(self, dest: Path, write: Any) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.root / TMP / f"{uuid.uuid4().hex}{dest.suffix}"
        try:
            with open(tmp, "wb") as fh:
                write(fh)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write_palette_png(self, dest: Path, indices: np.ndarray, palette: np.ndarray) -> None:
        """An 8-bit palette PNG: a colormapped heatmap is exactly a table lookup, and this
        encodes ~6x faster than RGB, at half the size, with identical colours."""
        img = Image.frombytes("P", (indices.shape[1], indices.shape[0]),
                              np.ascontiguousarray(indices).tobytes())
        img.putpalette(palette.tobytes())
        self._atomic(dest, lambda fh: img.save(fh, "PNG", compress_level=1))

    def write_jpeg(self, dest: Path, rgb: np.ndarray) -> None:
        self._atomic(dest, lambda fh: Image.fromarray(rgb, "RGB").save(fh, "JPEG", quality=90))

    def write_npy(self, dest: Path, array: np.ndarray) -> None:
        self._atomic(dest, lambda fh: np.save(fh, array, allow_pickle=False))

    def write_npz(self, dest: Path, arrays: dict[str, np.ndarray]) -> None:
        self._atomic(dest, lambda fh: np.savez_compressed(fh, **arrays))

    def write_json(self, dest: Path, data: dict[str, Any]) -> None:
        blob = (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        self._atomic(dest, lambda fh: fh.write(blob))

    # -- manifest -------------------------------------------------------------------
    # Memory stays small for huge runs: records are kept on disk and found again by
    # byte offset; only (key, rank) -> offset is held in memory.
    def index_manifest(self) -> dict[tuple[str, int | None], int]:
        """(key, rank) -> byte offset of its latest line, in order of first appearance.

        Torn lines (a killed run's last write) and foreign lines are skipped.
        """
        index: dict[tuple[str, int | None], int] = {}
        path = self.root / MANIFEST
        if not path.exists():
            return index
        offset = 0
        with open(path, "rb") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                    index[(rec["key"], rec.get("rank"))] = offset
                except (ValueError, KeyError, TypeError):
                    pass
                offset += len(line)
        return index

    def read_record(self, offset: int) -> dict[str, Any]:
        """The manifest record that starts at ``offset``."""
        if self._reader is None:
            self._reader = open(self.root / MANIFEST, "rb")  # noqa: SIM115 - kept for the run
        self._reader.seek(offset)
        return json.loads(self._reader.readline())

    def append(self, record: dict[str, Any]) -> str:
        """Append one record (flushed, so a killed run keeps every finished line)."""
        if self._manifest_fh is None:
            path = self.root / MANIFEST
            torn = False
            if path.exists() and path.stat().st_size:
                with open(path, "rb") as fh:
                    fh.seek(-1, os.SEEK_END)
                    torn = fh.read(1) != b"\n"  # a killed run's half-written last line
            self._manifest_fh = open(path, "a", encoding="utf-8")  # noqa: SIM115
            if torn:
                self._manifest_fh.write("\n")
        line = json.dumps(record, ensure_ascii=False)
        self._manifest_fh.write(line + "\n")
        self._manifest_fh.flush()
        return line

    def compact_manifest(self) -> None:
        """Rewrite the manifest with one line per (key, rank), the latest, atomically."""
        self._close_manifest()
        index = self.index_manifest()
        src = self.root / MANIFEST
        if not src.exists():
            return

        def write(out: Any) -> None:
            with open(src, "rb") as fh:
                for offset in index.values():
                    fh.seek(offset)
                    out.write(fh.readline())

        self._atomic(src, write)

    def _close_manifest(self) -> None:
        for name in ("_manifest_fh", "_reader"):
            fh = getattr(self, name)
            if fh is not None:
                fh.close()
                setattr(self, name, None)


@dataclass
class ImageJob:
    """Everything needed to write one image's outputs (runs in a writer thread)."""

    key: str
    rank: int | None
    cls: int
    saliency: Callable[[], np.ndarray]  # (h, w) float32 at model resolution, when ready
    original: np.ndarray | None  # (H, W, 3) uint8 region the model saw
    size: tuple[int, int]  # (width, height) of that region
    decomp: dict[str, np.ndarray] | None


def write_outputs(tree: OutputTree, job: ImageJob, save: tuple[str, ...], colormap: str,
                  alpha: float) -> dict[str, str]:
    """Write the requested outputs; returns kind -> path relative to the tree root."""
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
                base = job.original if job.original is not None else np.zeros_like(heat)
                tree.write_jpeg(dest, render.overlay(base, heat, alpha))
        written[kind] = dest.relative_to(tree.root).as_posix()
    return written


def outputs_present(tree: OutputTree, outputs: dict[str, str], save: tuple[str, ...]) -> bool:
    return all(kind in outputs and (tree.root / outputs[kind]).is_file() for kind in save)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
