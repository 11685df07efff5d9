"""``fullgrad check``: completeness per image for one model, or a table of models."""

from __future__ import annotations

from typing import Annotated, Any

import typer

import fgcli.cli.options as options
from fgcli.cli.console import say
from fgcli.cli.exits import EXIT_FAILED, EXIT_OK, guard
from fgcli.errors import UsageError

# what each reason for leaving a layer out of the map means (LayerInfo.excluded)
_REASONS = {
    "vector": "(N, K) heads and pooled features: no grid",
    "ambiguous": "two readings of the shape fit the grid and nothing tracked it",
    "off-grid": "tracked, but none of its elements is a pixel (class-token layers)",
    "untracked": "nothing placed its elements on the image grid",
}


def check(
    images: Annotated[list[str] | None, typer.Argument(
        help="Images to decompose (default: two seeded photo-like random inputs).",
        show_default=False)] = None,
    model: options.CheckModels = None,
    weights: options.CheckWeights = "DEFAULT",
    model_args: options.ModelArgs = None,
    trust_pickle: options.TrustPickle = False,
    device: options.Device = "auto",
    size: options.Size = None,
    smallest: Annotated[bool, typer.Option(
        "--smallest", help="Use the smallest input size each model accepts.")] = False,
    all_models: Annotated[bool, typer.Option(
        "--all", help="Check every torchvision classifier (two random inputs each) and print "
                      "a table.")] = False,
    debug: options.Debug = False,
) -> None:
    """Check completeness per image: logit = input term + bias terms, within
    1e-4 * max(1, |logit|); list the bias-carrying ops and why any are not in the map."""
    with guard("check", debug):
        from fgcli.config import parse_model_args

        ok = _run_check(images or [], list(model or []), weights,
                        parse_model_args(tuple(model_args or ())), trust_pickle, device,
                        size, smallest, all_models)
    raise typer.Exit(EXIT_OK if ok else EXIT_FAILED)


def _run_check(images: list[str], models: list[str], weights: str, model_args: dict[str, Any],
               trust_pickle: bool, device: str, size: int | None, smallest: bool,
               all_models: bool) -> bool:
    """Check one model on ``images`` (a report), or several (a table); True if all pass."""
    from fgcli.models.base import classifier_names
    from fgcli.models.device import resolve_device

    dev = resolve_device(device)
    if all_models == bool(models):
        raise UsageError("give --model NAME (one or more), or --all")
    if smallest and size is not None:
        raise UsageError("--size and --smallest exclude each other")
    if images and len(models) != 1:
        raise UsageError("images are checked on one model: give one --model")
    options = {"size": size, "smallest": smallest, "model_args": model_args,
               "trust_pickle": trust_pickle}
    if len(models) == 1:
        return _check_one(models[0], weights, dev, images, options)
    return _check_table(classifier_names() if all_models else models, weights, dev, options)


def _check_one(model: str, weights: str, dev: Any, images: list[str],
               options: dict[str, Any]) -> bool:
    """One model: a line per image, then its layers and bias-carrying ops."""
    from fgcli.check import TOLERANCE, check_model, kind_summary

    result = check_model(model, weights, dev, images=images, **options)
    n = len(result.images)
    typer.echo(f"model {result.model}  weights {result.weights}  device {dev}  "
               f"input {result.size[0]}x{result.size[1]}, batch {n}  "
               f"tolerance {TOLERANCE:g} * max(1, |logit|)")
    typer.echo(f"{'image':32s} {'target':>6s} {'logit':>14s} {'sum of terms':>14s} "
               f"{'residual':>11s} {'alone':>11s}  ok")
    for im in result.images:
        alone = "-" if im.alone is None else f"{im.alone:.2e}"
        if not im.alone_agrees:
            alone += " (logit differs)"
        typer.echo(f"{im.name[-32:]:32s} {im.target:6d} {im.logit:14.6f} {im.total:14.6f} "
                   f"{im.residual:11.2e} {alone:>11s}  {'yes' if im.ok else 'NO'}")
    for im in result.images:
        if im.nonfinite:  # NaN weights or an overflow: say so, not just NO
            say(f"fullgrad: failed: {im.name}: {im.nonfinite}")
    typer.echo(f"bias-carrying ops: {sum(result.kinds.values())} "
               f"({kind_summary(result.kinds)})")
    typer.echo(f"layers in the map ({len(result.map_layers)}): "
               f"{', '.join(result.map_layers) or 'none'}")
    typer.echo(f"not in the map, completeness only ({len(result.other_layers)}): "
               f"{_counts(result.excluded)}")
    for reason, names in result.excluded.items():
        typer.echo(f"  {reason} ({_REASONS.get(reason, reason)}): {', '.join(names)}")
    if result.split_by_shape:
        typer.echo(f"split between images by shape ({len(result.split_by_shape)}): "
                   f"{', '.join(result.split_by_shape)}")
    return bool(result.ok)


def _check_table(models: list[str], weights: str, dev: Any, options: dict[str, Any]) -> bool:
    """Several models: one line each; a model that cannot be checked is an ``error`` row
    (the table goes on), not the command's exit."""
    from fgcli.check import check_model, kind_summary
    from fgcli.errors import SetupError

    typer.echo(f"{'model':28s} {'size':>7s} {'residual':>9s} {'ok':>3s} {'ops':>5s} {'map':>5s} "
               f"{'s/img':>6s}  not in the map; bias-carrying ops")
    all_ok = True
    for name in models:
        try:
            result = check_model(name, weights, dev, **options)
        except (SetupError, UsageError, RuntimeError, ValueError, TypeError) as exc:
            all_ok = False
            text = str(exc).strip().splitlines()
            typer.echo(f"{name:28s} error: {text[0] if text else type(exc).__name__}")
            continue
        all_ok &= result.ok
        typer.echo(f"{name:28s} {result.size[0]:>3d}x{result.size[1]:<3d} {result.worst:9.1e} "
                   f"{'yes' if result.ok else 'NO':>3s} "
                   f"{sum(result.kinds.values()):5d} {len(result.map_layers):5d} "
                   f"{result.seconds_per_image:6.2f}  {_counts(result.excluded)}; "
                   f"{kind_summary(result.kinds)}")
        del result
    return all_ok


def _counts(groups: dict[str, list[str]]) -> str:
    return ", ".join(f"{reason} {len(names)}" for reason, names in groups.items()) or "none"
