"""The one exit-code policy of every command: :func:`guard` turns what a command raises
into one line on stderr and its exit code.

* 0: every image ok, or skipped as already done.
* 1: some images failed (each has a ``failed`` manifest line); the rest were written.
* 2: usage or setup error, one line: a bad or empty option, an unreadable labels file,
  an unknown model, missing weights, a locked output, the user's model failing
  (SystemExit / argparse / KeyboardInterrupt raised by the model file, zero classes,
  non-float logits), an output place that cannot be written (also a disk that fills
  up mid-run: "no space left on device writing PATH").
* 3: an unexpected internal error: one line; ``--debug`` prints the traceback first
  and still exits 3.
* 130: SIGINT (Ctrl-C), 143: SIGTERM: finished images kept, ``run.json`` says
  ``"interrupted"`` (see :mod:`fgcli.signals`).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import traceback
from collections.abc import Iterator
from typing import NoReturn

import typer

from fgcli.cli.console import fail, say

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# Exceptions that end a command with exit 2 and their text as the one line, per command
# ("*": every command). Elsewhere they are internal errors (exit 3). Named, not imported:
# their modules load torch or PIL, and a command that never loaded one cannot raise it.
USAGE_ERRORS: dict[str, tuple[str, ...]] = {
    "*": ("fgcli.errors:UsageError", "fgcli.errors:SetupError"),
    # a locked --out, refused before torch is even imported
    "dump": ("fgcli.tree.lock:LockedError",),
    # OUT not a tree; a page file that cannot be written (a full disk is a SetupError)
    "gallery": ("fgcli.gallery:GalleryError", "fgcli.tree.atomic:WriteFailed"),
    # OUT not a tree; a file of OUT/report (or of the gallery it rebuilds) not writable
    "report": ("fgcli.report:ReportError", "fgcli.gallery:GalleryError",
               "fgcli.tree.atomic:WriteFailed"),
}
# commands whose interrupted line says that a rerun resumes
RESUMABLE = frozenset({"dump"})
# exits the command itself asked for: passed through untouched
_EXITS = (typer.Exit, typer.Abort, SystemExit)


class Policy:
    """What :func:`guard` needs to know while a command runs: ``debug`` may be set once
    the configuration is read (dump's ``--config`` can turn it on)."""

    def __init__(self, debug: bool) -> None:
        self.debug = debug


def usage_errors(row: str) -> tuple[type[BaseException], ...]:
    """The exception types of one row of :data:`USAGE_ERRORS` (a command, or "*")."""
    found = []
    for spec in USAGE_ERRORS.get(row, ()):
        module, _, name = spec.partition(":")
        found.append(getattr(importlib.import_module(module), name))
    return tuple(found)


@contextlib.contextmanager
def guard(command: str, debug: bool | None = False) -> Iterator[Policy]:
    """Run the body of ``command`` under the exit-code policy (the module docstring's
    table), with the stop handlers of :mod:`fgcli.signals` installed from the start (a
    signal while torch is imported or the model loads is one line and exit 130 / 143
    too) and restored afterwards (in-process callers keep theirs)."""
    from fgcli.signals import Interrupted, stop_signals

    policy = Policy(bool(debug))
    try:
        with stop_signals():
            try:
                yield policy
            except _EXITS:
                raise
            except KeyboardInterrupt:
                say("fullgrad: interrupted")
                raise typer.Exit(EXIT_INTERRUPTED) from None
            except Exception as exc:  # noqa: BLE001 - the last line of defence
                _exit_for(command, exc, policy.debug)
    except Interrupted as exc:
        more = ("; finished images are kept: rerun the same command to resume"
                if command in RESUMABLE else "")
        say(f"fullgrad: interrupted by {exc.name}{more}")
        raise typer.Exit(exc.exit_code) from None


def _exit_for(command: str, exc: Exception, debug: bool) -> NoReturn:
    """A usage error's text, exit 2; anything else: internal error, exit 3."""
    for row in ("*", command):  # "*" first: loaded already; a command's row may import
        if isinstance(exc, usage_errors(row)):
            fail(str(exc), EXIT_USAGE)
    if debug:
        sys.stderr.write(traceback.format_exc())
        sys.stderr.flush()
    text = str(exc).strip().splitlines()
    hint = "" if debug else " (rerun with --debug for the traceback)"
    fail(f"internal error: {type(exc).__name__}: {text[0] if text else ''}{hint}",
         EXIT_INTERNAL)
