"""``fullgrad eval``: how faithful the maps are, as a table and eval.json/.csv/.png."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

import fgcli.cli.options as options
from fgcli import names
from fgcli.cli.console import count_bar, say
from fgcli.cli.exits import guard
from fgcli.cli.options import To
from fgcli.errors import UsageError


def _methods(text: str) -> tuple[str, ...]:
    """``--methods``: checked names (all: every method); unknown ones are a usage error."""
    from fgcli.evaluate.methods import parse_methods

    try:
        return tuple(parse_methods(text))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def evaluate(
    images: Annotated[list[str], typer.Argument(
        help="Image files or directories (two or more images).", show_default=False),
        To(options.repeated, field="inputs")],
    model: options.EvalModel,
    weights: options.EvalWeights = "DEFAULT",
    model_args: options.ModelArgs = None,
    trust_pickle: options.TrustPickle = False,
    device: options.Device = "auto",
    size: options.Size = None,
    crop: options.EvalCrop = False,
    mean: options.EvalMean = None,
    std: options.EvalStd = None,
    labels: options.EvalLabels = None,
    target: options.EvalTarget = "pred",
    out: options.EvalOut = "fullgrad-eval",
    methods: Annotated[str | None, typer.Option(
        help="Comma-separated methods, or all: fullgrad, fullgrad-signed, fullgrad-abs, "
             "fullgrad-positive, simple, smooth, gradient, input-x-gradient, smoothgrad, "
             "integrated-gradients, gradcam, random.  [default: all]"), To(_methods)] = None,
    metrics: Annotated[str, typer.Option(
        help="Comma-separated: perturbation, deletion, insertion."), To(options.items)
    ] = "perturbation,deletion,insertion",
    ks: Annotated[str, typer.Option(
        help="Pixel perturbation: percentages of pixels removed, each in (0, 100)."),
        To(options.floats("--ks"))] = "10,30,50,70,90",
    steps: Annotated[int, typer.Option(help="Deletion / insertion: steps of the curve.")
    ] = 20,
    batch_size: options.EvalBatchSize = 4,
    samples: options.EvalSamples = 25,
    seed: options.EvalSeed = 0,
    layers: options.EvalLayers = None,
    boxes: options.Boxes = None,
    masks: options.Masks = None,
    point_tolerance: options.PointTolerance = 15.0,
    sanity: Annotated[bool, typer.Option(
        "--sanity", help="Also the sanity check: randomise the model's layers cumulatively "
                         "from the logits down (seeded by --seed) and compare each method's "
                         "maps with the original's (Spearman, SSIM): sanity.csv, sanity.png."
    )] = False,
    sanity_steps: Annotated[int, typer.Option(
        help="--sanity: steps of the cascade, evenly spread; the logits' layer alone and "
             "all layers always among them.")] = 6,
    quiet: options.EvalQuiet = False,
    debug: options.Debug = False,
) -> None:
    """Measure how faithful the maps are: pixel perturbation (the paper's 5.1),
    deletion and insertion AUC, for fgcli's methods against baselines (with --boxes or
    --masks also pointing-game accuracy and energy in the objects); prints a table and
    writes eval.json, eval.csv and eval.png (--sanity: also the sanity check of Adebayo
    et al. 2018, sanity.csv and sanity.png)."""
    given = dict(locals())  # every parameter is an EvalConfig field, but quiet and debug
    with guard("eval", debug):
        from fgcli.config import from_options
        from fgcli.evaluate.run import EvalConfig

        values = options.config_values(evaluate, given, exclude=("quiet", "debug"))
        cfg = from_options(EvalConfig, {**values, "command": tuple(sys.argv)})
        _run_eval(cfg, quiet)


def _run_eval(cfg: Any, quiet: bool) -> None:
    """Evaluate, write the files, and print the table (unless quiet)."""
    from fgcli.evaluate import report
    from fgcli.evaluate.run import run_eval

    def failure(path: str, reason: str) -> None:
        say(f"fullgrad: failed: {names.display(path)}: {reason}")

    with count_bar(quiet, "img", f"eval {cfg.spec.model}") as progress:
        result = run_eval(cfg, progress, failure)
    paths = report.write(cfg, result)
    if not quiet:
        _print_table(cfg, result, paths)


def _print_table(cfg: Any, result: Any, paths: list[Any]) -> None:
    """Plain columns, not a rich table: the width must not depend on the terminal."""
    header = ["method"]
    for metric in cfg.metrics:
        if metric == "perturbation":
            header += [f"pert {k:g}%" for k in result.ks]
        else:
            header.append(f"{metric} AUC")
    loc = result.localisation
    if loc is not None:
        from fgcli.evaluate.localisation import cells as loc_cells

        header += ["pointing", "energy"]
    lines = []
    for method, per in result.results.items():
        row = [method]
        for metric in cfg.metrics:
            s = per[metric]
            row += [f"{m:.3f}±{e:.3f}" for m, e in zip(s.mean, s.se)]
        lines.append(row + (loc_cells(loc, method) if loc is not None else []))
    width = max(len(c[0]) for c in [header, *lines])
    typer.echo(f"{result.model}, {len(result.images)} images: mean ± standard error")
    for line in [header, *lines]:
        typer.echo(f"{line[0]:{width}s}  " + "  ".join(f"{c:>13s}" for c in line[1:]))
    typer.echo("pixel perturbation: lower is better; deletion: lower; insertion: higher"
               + ("; pointing, energy: higher" if loc is not None else ""))
    if loc is not None:
        typer.echo(loc["summary"])
    if "sanity" in result.extra:
        from fgcli.evaluate.sanity import table

        for line in table(result.extra["sanity"]):
            typer.echo(line)
    typer.echo("wrote " + ", ".join(str(p) for p in paths))
