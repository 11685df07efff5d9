"""``fullgrad gallery``: OUT/index.html for a dump's tree, and the lines a gallery
prints (also after ``dump --gallery``)."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

import fgcli.cli.options as options
from fgcli.cli.console import count_bar, fail, say
from fgcli.cli.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE, guard
from fgcli.config import check_not_blank


def gallery(
    out: Annotated[str, typer.Argument(help="The output tree of a dump.")],
    threads: Annotated[int | None, typer.Option(
        "--threads", help="Threads making thumbnails.  [default: the CPUs this process may "
                          "use]")] = None,
    quiet: options.GalleryQuiet = False,
    debug: options.Debug = False,
) -> None:
    """Write OUT/index.html: a static gallery of the tree's maps that opens from disk
    (no server, no network). Thumbnails go to OUT/thumbs/ once; rerun after a dump to
    add its new images. Exit 0, 1 when a thumbnail failed, 2 when OUT is not a tree or a
    file of the page cannot be written (a full disk: one line naming the file)."""
    with guard("gallery", debug):
        from fgcli.gallery import build_gallery

        if threads is not None and threads < 1:
            fail("--threads must be >= 1", EXIT_USAGE)
        check_not_blank({"OUT": out})
        if os.path.isdir(out):  # else build_gallery says what OUT is not
            from fgcli.tree.atomic import writable_dir

            writable_dir(out, "OUT")
        with count_bar(quiet, "thumb", "thumbnails") as progress:
            report = build_gallery(out, threads, progress)
    raise typer.Exit(report_gallery(report, quiet))


def report_gallery(report: Any, quiet: bool) -> int:
    """Print a gallery's thumbnail failures (always) and its summary line (unless quiet);
    returns the exit code: 1 when a thumbnail failed. Malformed manifest lines it skipped
    are warnings (one line per file, unless quiet)."""
    if not quiet:
        for line in report.warnings:
            say(f"fullgrad: warning: {line}")
    for line in report.thumbs.failed.values():
        say(f"fullgrad: gallery: {line}")
    if not quiet:
        say(f"gallery: {report.index} ({report.images} images, {report.maps} maps, "
            f"{report.failed} failed; thumbnails made {report.thumbs.made}, kept "
            f"{report.thumbs.kept}; {report.seconds:.1f}s)")
    return EXIT_FAILED if report.thumbs.failed else EXIT_OK
