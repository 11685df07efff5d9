"""Who may write a tree: POSIX record locks on ``.fullgrad.lock`` (and a shard's own).

A plain run, a merge and a Ray driver hold ``.fullgrad.lock`` exclusively; a shard holds
it shared, plus its own ``shards/<name>/.lock`` exclusively. So shards of one count run
side by side, and a plain run and shards exclude each other, each naming the holders.
The lock files hold the holder's pid, host, start time and command (shards leave the
tree's lock file empty). Released by the OS when a process dies.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import shutil
import socket
import time
from pathlib import Path

from fgcli.tree.layout import LOCK, MANIFEST, SHARDS


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



def refuse_if_held(root: str | Path) -> None:
    """Refuse at once, before torch and the model load, when a plain run, a merge or a
    Ray driver holds ``root``'s lock (:class:`LockedError` naming it). Only a probe:
    :meth:`TreeLock.acquire` takes the lock for real and decides every other case
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


class TreeLock:
    """The lock files one tree (``shard`` None) or one shard of it holds while it runs;
    ``home``: the shard's folder (``shards/<name>/``), the root for a plain run."""

    def __init__(self, root: Path, shard: str | None, home: Path) -> None:
        self.root, self.shard, self.home = root, shard, home
        self.handles: list[io.TextIOWrapper] = []

    def acquire(self, command: list[str]) -> None:
        """Take the tree's lock (exclusive for a plain run, shared for a shard), then a
        shard's own; :class:`LockedError` names whoever holds them. After a failure on
        the shard's lock the tree's is still held: the caller releases it.

        A POSIX record lock (``lockf``), not ``flock``: forked DataLoader workers
        do not inherit it, so a killed run's lingering workers cannot keep the
        directory locked.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": _now(), "command": command})
        self._acquire_tree(info)
        if self.shard is not None:
            self._acquire_shard(info)

    def _acquire_tree(self, info: str) -> None:
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
            raise _shards_hold(self.root) from exc
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
        self.handles.append(tree_fh)

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
        self.handles.append(fh)
        self._refuse_other_counts()

    def _refuse_other_counts(self) -> None:
        """Shards running together must share their count N."""
        shard = self.shard or ""
        count = shard.rpartition("-of-")[2]
        others = {name: text for name, text in running_shards(self.root, skip=shard).items()
                  if name.rpartition("-of-")[2] != count}
        if others:
            if not (self.home / MANIFEST).exists():  # leave no empty shard folder behind
                (self.home / LOCK).unlink(missing_ok=True)
                shutil.rmtree(self.home, ignore_errors=True)
            name, text = next(iter(others.items()))
            raise LockedError(f"{self.root} has shards of another count running (shard "
                              f"{name} by {text}): shards running together must share N")

    def release(self) -> None:
        """Empty the lock files this process holds and unlock them."""
        for fh in reversed(self.handles):
            fh.seek(0)
            fh.truncate()
            fcntl.lockf(fh.fileno(), fcntl.LOCK_UN)
            fh.close()
        self.handles = []

    def alone(self) -> bool:
        """True when no other process holds the tree (a shard's shared lock becomes
        exclusive when no one shares it)."""
        try:
            fcntl.lockf(self.handles[0].fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True


def _shards_hold(root: Path) -> LockedError:
    """The refusal when the tree's lock is held without holder text: by shards."""
    shards = running_shards(root)
    if not shards:
        return LockedError(f"{root} is in use by another fullgrad run")
    name, text = next(iter(shards.items()))
    more = f" and {len(shards) - 1} more" if len(shards) > 1 else ""
    return LockedError(f"{root} is in use by {len(shards)} running shard(s): "
                       f"shard {name} by {text}{more}")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
