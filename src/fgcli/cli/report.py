"""``fullgrad report``: a dataset audit of a dump's tree, in OUT/report/."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from fgcli.cli.console import count_bar, say
from fgcli.cli.exits import EXIT_FAILED, EXIT_OK, guard
from fgcli.cli.options import Debug
from fgcli.config import check_not_blank


def report(
    out: Annotated[str, typer.Argument(help="The output tree of a dump.")],
    top: Annotated[int, typer.Option(
        "--top", help="Entries in each off-object list (0: none).")] = 50,
    grid: Annotated[int, typer.Option(
        "--grid", help="Cells per side of the common grid of the class-mean maps.")] = 32,
    quiet: Annotated[bool, typer.Option(
        "--quiet/--no-quiet", "-q", help="No progress bar, notes or summary line.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the summary as one JSON object on stdout.")] = False,
    debug: Debug = False,
) -> None:
    """Write OUT/report/: per-class statistics and pointing game (classes.csv), the
    class-mean maps (class_means.png), the most off-object images (offobject.csv), all
    of it as index.html and report.json; rebuilds OUT's gallery, when it has one, to add
    its class view. Reads a finished, sharded or running tree. Exit 0, 1 when a gallery
    thumbnail failed, 2 when OUT is not a tree or OUT/report cannot be written."""
    with guard("report", debug):
        from fgcli.report import write_report

        check_not_blank({"OUT": out})
        with count_bar(quiet, "line", "manifest") as progress:
            summary = write_report(out, top=top, grid=grid, progress=progress)
    raise typer.Exit(_print(summary, quiet, as_json))


def _print(summary: Any, quiet: bool, as_json: bool) -> int:
    """Warnings and notes (unless quiet), thumbnail failures (always), then the summary
    line (or its JSON); the exit code."""
    if not quiet:
        for line in summary.warnings:
            say(f"fullgrad: warning: {line}")
        for line in summary.notes:
            say(f"fullgrad: report: {line}")
    gallery = summary.gallery
    if gallery is not None:
        for line in gallery.thumbs.failed.values():
            say(f"fullgrad: gallery: {line}")
    if as_json:
        typer.echo(json.dumps(summary.as_dict(), ensure_ascii=False))
    elif not quiet:
        say(f"report: {summary.folder} ({summary.records} records, {summary.images} images, "
            f"{summary.failed} failed, {summary.classes} classes; {summary.with_stats} with "
            f"stats, {summary.with_objects} with objects; {summary.maps} maps averaged"
            f"{'' if gallery is None else '; gallery rebuilt'}; {summary.seconds:.1f}s)")
    return EXIT_FAILED if gallery is not None and gallery.thumbs.failed else EXIT_OK
