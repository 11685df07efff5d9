"""The ``fullgrad`` command line (Typer): parses options and reports; the work is below."""

from fgcli.cli.app import app, main

__all__ = ["app", "main"]
