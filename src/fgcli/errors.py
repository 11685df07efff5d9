"""Errors that end a run before any image is processed. No torch here."""

from __future__ import annotations


class SetupError(Exception):
    """The run cannot start (missing or unloadable model or weights, offline, locked
    output): exit code 2, one line."""


class _Signalled:
    """Whether SIGINT / SIGTERM reached this process (set by the run's signal handler).

    A KeyboardInterrupt raised while user model code runs is the user's Ctrl-C only
    when this is set; otherwise the model raised it itself, and that is the model's
    failure (exit 2), not an interrupt.
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def set(self, signum: int) -> None:
        self.signum = signum

    def clear(self) -> None:
        self.signum = None

    def __bool__(self) -> bool:
        return self.signum is not None


SIGNALLED = _Signalled()


class UsageError(Exception):
    """A bad option, file or combination: exit code 2, one line."""
