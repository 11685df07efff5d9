"""SIGINT and SIGTERM during a dump: stop taking batches, keep what is finished, exit.

While a run is in its loop (:meth:`StopSignals.graceful`), the first SIGINT or SIGTERM
only asks it to stop: no new batch starts, the writes in flight finish (bounded), their
manifest lines are appended, ``run.json`` records ``"interrupted": "SIGINT"`` (or
``"SIGTERM"``), and the command exits 130 (143). Outside the loop (loading the model)
and for a second signal, :class:`Interrupted` is raised at once; the manifest stays
whole either way (every line is one checked write), and a rerun resumes.

Handlers are installed only from the main thread, only for signals that are not
ignored (a job started in the background with SIGINT ignored keeps it so), and the
previous handlers come back when the run ends.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

from fgcli.errors import SIGNALLED

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class Interrupted(BaseException):
    """A signal that stops the run at once (before its loop, or a second signal).

    Not a KeyboardInterrupt: code that reports a user model's own KeyboardInterrupt as
    the model's failure must let this one through."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.name, 130)


class StopSignals:
    """What the handlers saw: ``name`` of the first stop signal, None until one came."""

    def __init__(self, installed: bool) -> None:
        self.installed = installed
        self.name: str | None = None
        self._graceful = 0
        self._deferred = 0
        self._pending = False  # a signal came inside deferred(): raised when it ends
        self.signals: list[int] = []  # the signals whose handler is ours

    def reclaim(self) -> None:
        """Install the handlers again after a library replaced them (``ray.init`` sets
        its own SIGTERM handler); the ones from before the run still come back at its end."""
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                signal.signal(sig, self.handle)

    @property
    def requested(self) -> bool:
        return self.name is not None

    @contextlib.contextmanager
    def graceful(self) -> Iterator[None]:
        """Within: the first signal only sets :attr:`name`; the run polls it."""
        self._graceful += 1
        try:
            yield
        finally:
            self._graceful -= 1

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Within: a signal that would raise is raised only when the block ends. For
        clean-up that runs finalisers (a DataLoader iterator's ``__del__`` joins its
        workers): an exception raised inside ``__del__`` is printed as a traceback and
        then ignored, so the signal would be lost and the stop not taken."""
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1
        if self._pending and not self._deferred:
            self._pending = False
            raise Interrupted(self.name or "SIGINT")

    def handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.name is None
        SIGNALLED.set(signum)  # a KeyboardInterrupt from user code now is the user's
        if first:
            self.name = signal.Signals(signum).name
        if first and self._graceful:
            return
        if self._deferred:
            self._pending = True
            return
        raise Interrupted(self.name or signal.Signals(signum).name)


_active: StopSignals | None = None


@contextlib.contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """Install the stop handlers for the duration (nested calls share the outer ones;
    outside the main thread nothing is installed and nothing is ever requested)."""
    global _active
    if _active is not None:
        yield _active
        return
    if threading.current_thread() is not threading.main_thread():
        yield StopSignals(installed=False)
        return
    stop = StopSignals(installed=True)
    SIGNALLED.clear()  # a signal of an earlier run in this process is not this run's
    previous: dict[int, object] = {}
    try:
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, stop.handle)
                stop.signals.append(sig)
        _active = stop
        hook = sys.excepthook
        sys.excepthook = _quiet_after_stop(stop, hook)
        try:
            yield stop
        finally:
            sys.excepthook = hook
    finally:
        _active = None
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def _quiet_after_stop(stop: StopSignals, hook: Any) -> Any:
    """``sys.excepthook`` that, once a stop signal arrived, does not print a broken pipe
    from a background thread: multiprocessing's descriptor sharer reports it through
    ``sys.excepthook`` when DataLoader workers go away with the stopped run, and the
    stop's one line must stay the only one."""

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if stop.requested and issubclass(kind, (BrokenPipeError, ConnectionError)) and \
                threading.current_thread() is not threading.main_thread():
            return
        hook(kind, value, tb)

    return excepthook


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C reaches the whole process group, and a
    worker that dies of it would fail the batch; the main process decides instead."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
