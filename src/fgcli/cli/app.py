"""The ``fullgrad`` Typer app: its commands, in the order ``--help`` lists them, and
:func:`main`, the console entry point. Exit codes: :mod:`fgcli.cli.exits`."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from fgcli import __version__
from fgcli.cli.check import check
from fgcli.cli.dump import dump
from fgcli.cli.eval import evaluate
from fgcli.cli.gallery import gallery
from fgcli.cli.merge import merge
from fgcli.cli.models import models
from fgcli.cli.report import report

app = typer.Typer(
    name="fullgrad",
    help="Batch FullGrad saliency maps for torchvision classifiers.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
for _name, _command in (("dump", dump), ("check", check), ("eval", evaluate),
                        ("merge", merge), ("gallery", gallery), ("report", report),
                        ("models", models)):
    app.command(_name)(_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fgcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool | None, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    """Batch FullGrad saliency maps for torchvision classifiers."""


def main() -> None:
    try:
        app()
    except SystemExit as exc:
        _leave_now_if_stopped(exc.code)
        raise


def _leave_now_if_stopped(code: Any) -> None:
    """After a stop signal, exit without waiting for writes the run gave up on (a hung
    network file system): Python would join those writer threads at exit, unbounded.
    Only here, in the console entry point: in-process callers keep their process."""
    import os
    import threading

    if code in (130, 143) and any(t.name.startswith("fgcli-writer") and t.is_alive()
                                  for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
