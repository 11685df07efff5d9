"""``fullgrad models``: the models fgcli can load, one tab-separated line each."""

from __future__ import annotations

from typing import Annotated

import typer

import fgcli.cli.options as options
from fgcli.cli.console import fail
from fgcli.cli.exits import EXIT_USAGE, guard


def models(
    pattern: Annotated[str | None, typer.Argument(
        help="Shell pattern (resnet*) or substring to filter by; timm/PATTERN lists timm's "
             "models (timm/*.fb_in1k: pretrained tags).")] = None,
    debug: options.Debug = False,
) -> None:
    """List the models fgcli can load: name, default input size, map layout (torchvision).

    Map layout: grid (conv layers), channels-last (also (N, h, w, C) blocks), tokens
    (ViT token sequences); +tracked: windowed attention tensors, mapped through
    pixel positions tracked from the image grid. For timm models the third column is
    "timm" (`fullgrad check --model timm/NAME` shows which layers enter the map).
    """
    with guard("models", debug):
        rows = _model_rows(pattern)
    # printed outside the guard: a closed pipe (`| head`) is click's to handle, as ever
    if not rows:
        fail(f"no model matches {pattern!r}", EXIT_USAGE)
    for row in rows:
        typer.echo("\t".join(row))


def _model_rows(pattern: str | None) -> list[tuple[str, str, str]]:
    if pattern and pattern.startswith("timm/"):
        from fgcli.models.sources.timm_source import default_input_size, list_names

        rows = []
        for name in list_names(pattern[len("timm/"):]):
            side = default_input_size(name)
            rows.append((f"timm/{name}", str(side) if side else "-", "timm"))
        return rows
    from fgcli.models.base import input_size, map_layout, matching_models

    return [(name, str(input_size(name)), map_layout(name)) for name in matching_models(pattern)]
