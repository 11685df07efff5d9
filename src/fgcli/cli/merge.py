"""``fullgrad merge``: fold the shard manifests of a tree into one."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

import fgcli.cli.options as options
from fgcli.cli.console import say
from fgcli.cli.exits import EXIT_OK, guard
from fgcli.config import check_not_blank


def merge(
    out: Annotated[str, typer.Argument(help="The output tree of the shards.")],
    debug: options.Debug = False,
) -> None:
    """Fold the shard manifests of OUT into OUT/manifest.jsonl: one line per image (and
    target), the newest, sorted by key; OUT/run.json sums the shards. Refused while shards
    run; merging twice changes nothing. Exit 0 once merged (failed images are counted,
    not an error here: their shards reported them)."""
    with guard("merge", debug):
        from fgcli.tree.shards import merge as merge_tree

        check_not_blank({"OUT": out})
        report = merge_tree(out, list(sys.argv))
    for line in report.warnings:  # malformed lines dropped, shards of another count
        say(f"fullgrad: warning: {line}")
    if not report.shards:
        say(f"fullgrad: {out}: no shards to merge")
        raise typer.Exit(EXIT_OK)
    counts = report.counts
    say(f"merged {len(report.shards)} shard(s) into {out}/manifest.jsonl: "
        f"{report.records} lines from {report.lines}; images ok {counts['ok']}, "
        f"skipped {counts['skipped']}, failed {counts['failed']}")
    raise typer.Exit(EXIT_OK)
