"""What the commands print: one-line messages on stderr, the dump's reporter (progress
bar, --json lines, summary table) and the progress bar of eval and gallery."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import typer
from rich.console import Console

from fgcli import names

# no emoji codes: a path like "net.py:x" must not print as "net.py❌"
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


def say(message: str) -> None:
    """One message line on stderr: raw bytes of a path as ``\\xNN``, control characters
    escaped (:func:`fgcli.names.display`), so a name never splits a line or the console."""
    err.print(names.display(message), markup=False)


def fail(message: str, code: int) -> NoReturn:
    """``fullgrad: error: MESSAGE`` on stderr, then exit ``code``."""
    say(f"fullgrad: error: {message}")
    raise typer.Exit(code)


class ConsoleReporter:
    """tqdm progress on stderr (only on a terminal), --json lines on stdout, a summary.

    ``quiet`` silences progress, warnings and the summary, never failed images or alerts
    (cron mails what a job prints on stderr). ``prefix`` (``shard 1/8: ``) starts the
    lines of one of many processes; ``lead`` is False on all but the process that shows
    progress (its own shard's) and the summary (every rank's totals): torchrun's rank 0.
    """

    def __init__(self, quiet: bool, as_json: bool, prefix: str = "", lead: bool = True
                 ) -> None:
        self.quiet = quiet
        self.lead = lead
        self.as_json = as_json
        self.prefix = prefix
        self.bar: Any = None

    def _stderr(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            say(message)

    def started(self, info: dict[str, Any]) -> None:
        if not self.quiet and self.lead and sys.stderr.isatty():
            import os

            from tqdm import tqdm

            try:
                width, height = os.get_terminal_size(sys.stderr.fileno())
            except OSError:
                width = height = 0
            # a terminal that reports no size (some ptys, `script`) still gets a bar
            self.bar = tqdm(unit="img", file=sys.stderr, dynamic_ncols=width > 0,
                            ncols=None if width > 0 else 100,
                            nrows=None if height > 0 else 24,
                            desc=f"{info['model']} on {info['device']}")

    def warn(self, message: str) -> None:
        if not self.quiet:
            self._stderr(f"fullgrad: {self.prefix}warning: {message}")

    def alert(self, message: str) -> None:
        self._stderr(f"fullgrad: {self.prefix}warning: {message}")

    def progress(self) -> None:
        pass

    def record(self, record: dict[str, Any], line: str, image_done: bool) -> None:
        if self.as_json:
            try:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
            except BrokenPipeError:
                # the reader went away (`| head`): keep writing results to disk, stop printing
                import os

                self.as_json = False
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if record["status"] == "failed":
            self._stderr(f"fullgrad: {self.prefix}failed: {names.display(record['input'])}: "
                         f"{record['error']}")
        if self.bar is not None and image_done:
            self.bar.update(1)

    def finished(self, report: Any) -> None:
        if self.bar is not None:
            self.bar.close()
        if getattr(report, "interrupted", None):  # one line, even with --quiet
            say(f"fullgrad: {self.prefix}interrupted by {report.interrupted} after "
                f"{report.ok + report.failed} image(s); rerun the same command to resume")
            return
        if self.quiet or not self.lead:
            return
        from rich.table import Table

        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_row("ok", str(report.ok))
        table.add_row("skipped", str(report.skipped))
        table.add_row("failed", f"[red]{report.failed}[/red]" if report.failed else "0")
        rate = report.ok / report.seconds if report.seconds > 0 else 0.0
        table.add_row("time", f"{report.seconds:.1f} s ({rate:.2f} img/s)")
        table.add_row("output", report.out)
        if getattr(report, "objects", None) is not None:
            table.add_row("annotations", report.objects.line())
        if report.stopped_early:
            table.add_row("stopped", "--fail-fast: stopped at the first failure")
        err.print(table)


@contextlib.contextmanager
def count_bar(quiet: bool, unit: str, desc: str) -> Iterator[Callable[[int, int], None] | None]:
    """A tqdm bar on stderr, only on a terminal and unless quiet, fed by the
    ``progress(done, total)`` callback it yields (None when there is no bar)."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(unit=unit, file=sys.stderr, desc=desc)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield progress
    finally:
        bar.close()
