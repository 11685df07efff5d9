"""The ``fullgrad`` command: options, console, progress, exit codes. No autograd here.

Exit codes: 0 every image ok (or skipped as already done); 1 some images
failed, the rest were written; 2 usage or setup error (bad option, unknown
model, missing weights, locked output); 3 an unexpected internal error (one
line; ``--debug`` shows the traceback); 130 interrupted.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from fgcli import __version__
from fgcli.config import OUTPUT_KINDS, Method, UsageError, build_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

app = typer.Typer(
    name="fullgrad",
    help="Batch FullGrad saliency maps for torchvision classifiers.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fgcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    """Batch FullGrad saliency maps for torchvision classifiers."""


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise UsageError(f"{option}: expected comma-separated numbers, got {text!r}") from exc


def _fail(message: str, code: int) -> None:
    err.print(f"fullgrad: error: {message}", markup=False)
    raise typer.Exit(code)


class ConsoleReporter:
    """tqdm progress on stderr (only on a terminal), --json lines on stdout, a summary."""

    def __init__(self, quiet: bool, as_json: bool) -> None:
        self.quiet = quiet
        self.as_json = as_json
        self.bar: Any = None

    def started(self, info: dict[str, Any]) -> None:
        if not self.quiet and sys.stderr.isatty():
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
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(f"fullgrad: warning: {message}", file=sys.stderr)
        else:
            err.print(f"fullgrad: warning: {message}", markup=False)

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
        if record["status"] == "failed" and not self.quiet:
            message = f"fullgrad: failed: {record['input']}: {record['error']}"
            if self.bar is not None:
                self.bar.write(message, file=sys.stderr)
            else:
                err.print(message, markup=False)
        if self.bar is not None and image_done:
            self.bar.update(1)

    def finished(self, report: Any) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.quiet:
            return
        from rich.table import Table

        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_row("ok", str(report.ok))
        table.add_row("skipped", str(report.skipped))
        table.add_row("failed", f"[red]{report.failed}[/red]" if report.failed else "0")
        rate = report.ok / report.seconds if report.seconds > 0 else 0.0
        table.add_row("time", f"{report.seconds:.1f} s ({rate:.2f} img/s)")
        table.add_row("output", report.out)
        if report.stopped_early:
            table.add_row("stopped", "--fail-fast: stopped at the first failure")
        err.print(table)


@app.command()
def dump(
    inputs: Annotated[Optional[list[str]], typer.Argument(
        help="Image files, directories (walked recursively) or - for a list of paths on "
             "stdin.", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="torchvision classifier name (see `fullgrad models`).")] = None,
    weights: Annotated[Optional[str], typer.Option(
        help="DEFAULT, a weights name (IMAGENET1K_V1), a local .pth/.pt/.safetensors "
             "state_dict, or none.  [default: DEFAULT]")] = None,
    method: Annotated[Optional[Method], typer.Option(
        help="Saliency method.  [default: fullgrad]")] = None,
    device: Annotated[Optional[str], typer.Option(
        help="auto, cpu, cuda, cuda:N or mps (auto: cuda if available).  [default: auto]")
    ] = None,
    out: Annotated[Optional[str], typer.Option(
        "--out", "-o", help="Output directory.  [default: fullgrad-out]")] = None,
    save: Annotated[Optional[str], typer.Option(
        help=f"Comma-separated outputs from {', '.join(OUTPUT_KINDS)}.  "
             "[default: heatmap,overlay,map]")] = None,
    target: Annotated[Optional[str], typer.Option(
        help="pred (top-1), a class index, or a class name.  [default: pred]")] = None,
    topk: Annotated[Optional[int], typer.Option(
        help="One map per top-K class (rank and class index in the file names).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", "-b", help="Images per batch.  [default: 32 on a GPU, 8 on the CPU]")
    ] = None,
    workers: Annotated[Optional[int], typer.Option(
        help="Decoding worker processes (0: decode in the main process).  "
             "[default: min(4, cores - 1)]")] = None,
    size: Annotated[Optional[int], typer.Option(
        help="Model input size in pixels.  [default: the weights' crop size, e.g. 224]")] = None,
    crop: Annotated[Optional[bool], typer.Option(
        "--crop/--no-crop", help="Resize + centre-crop like the weights' own transform "
                                 "instead of squashing the whole image.  [default: no-crop]")
    ] = None,
    mean: Annotated[Optional[str], typer.Option(
        help="Normalisation mean R,G,B.  [default: from the weights, else ImageNet]")] = None,
    std: Annotated[Optional[str], typer.Option(
        help="Normalisation std R,G,B.  [default: from the weights, else ImageNet]")] = None,
    labels: Annotated[Optional[str], typer.Option(
        help="Text file with one class name per line.")] = None,
    colormap: Annotated[Optional[str], typer.Option(
        help="matplotlib colormap for heatmaps and overlays.  [default: inferno]")] = None,
    alpha: Annotated[Optional[float], typer.Option(
        help="Heatmap weight in overlays, 0..1.  [default: 0.5]")] = None,
    samples: Annotated[Optional[int], typer.Option(
        help="SmoothFullGrad: noisy samples per image.  [default: 25]")] = None,
    sigma: Annotated[Optional[float], typer.Option(
        help="SmoothFullGrad: noise std as a fraction of each image's range.  "
             "[default: 0.15]")] = None,
    seed: Annotated[Optional[int], typer.Option(
        help="SmoothFullGrad: noise seed.  [default: 0]")] = None,
    files_from: Annotated[Optional[str], typer.Option(
        "--files-from", help="Read image paths from this file, one per line.")] = None,
    null: Annotated[Optional[bool], typer.Option(
        "--null/--no-null", "-0", help="Path lists (stdin, --files-from) are NUL-separated.")
    ] = None,
    amp: Annotated[Optional[bool], typer.Option(
        "--amp/--no-amp", help="Mixed precision: float16 autocast on CUDA, bfloat16 on the "
                               "CPU (faster on GPUs; completeness residuals grow, see README).")
    ] = None,
    channels_last: Annotated[Optional[bool], typer.Option(
        "--channels-last/--no-channels-last", help="Run the model in channels-last memory "
                                                   "format (often faster on GPUs).")] = None,
    max_pixels: Annotated[Optional[int], typer.Option(
        "--max-pixels", help="Refuse images with more pixels (decompression bombs).  "
                             "[default: 178956970]")] = None,
    overwrite: Annotated[Optional[bool], typer.Option(
        "--overwrite/--no-overwrite", help="Recompute images already done with the same "
                                           "settings.")] = None,
    fail_fast: Annotated[Optional[bool], typer.Option(
        "--fail-fast/--no-fail-fast", help="Stop at the first image that fails.")] = None,
    quiet: Annotated[Optional[bool], typer.Option(
        "--quiet/--no-quiet", "-q", help="No progress bar, no summary, no failure lines.")
    ] = None,
    as_json: Annotated[Optional[bool], typer.Option(
        "--json/--no-json", help="Print each manifest line to stdout as it is written.")
    ] = None,
    debug: Annotated[Optional[bool], typer.Option(
        "--debug/--no-debug", help="Show tracebacks of unexpected errors.")] = None,
    config: Annotated[Optional[str], typer.Option(
        help="TOML file of options (keys are option names); command-line options win.")
    ] = None,
) -> None:
    """Write FullGrad heatmaps, overlays and maps for every image."""
    debug_flag = bool(debug)
    try:
        cfg = build_config({
            "inputs": tuple(inputs) if inputs else None, "model": model, "weights": weights,
            "method": method, "device": device, "out": out,
            "save": tuple(s.strip() for s in save.split(",") if s.strip()) if save else None,
            "target": target, "topk": topk, "batch_size": batch_size, "workers": workers,
            "size": size, "crop": crop, "mean": _floats(mean, "--mean"),
            "std": _floats(std, "--std"), "labels": labels, "colormap": colormap,
            "alpha": alpha, "samples": samples, "sigma": sigma, "seed": seed,
            "files_from": files_from, "null": null, "max_pixels": max_pixels,
            "amp": amp, "channels_last": channels_last,
            "overwrite": overwrite, "fail_fast": fail_fast, "quiet": quiet, "json": as_json,
            "debug": debug, "command": tuple(sys.argv),
        }, config)
        debug_flag = cfg.debug
        from fgcli.models import SetupError
        from fgcli.pipeline import run

        try:
            report = run(cfg, ConsoleReporter(cfg.quiet, cfg.json))
        except SetupError as exc:
            _fail(str(exc), EXIT_USAGE)
    except UsageError as exc:
        _fail(str(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        err.print("fullgrad: interrupted", markup=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        if debug_flag:
            raise
        text = str(exc).strip().splitlines()
        _fail(f"internal error: {type(exc).__name__}: {text[0] if text else ''} "
              "(rerun with --debug for the traceback)", EXIT_INTERNAL)
    raise typer.Exit(report.exit_code)


@app.command()
def check(
    images: Annotated[Optional[list[str]], typer.Argument(
        help="Images to decompose (default: a seeded random input).", show_default=False)
    ] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="torchvision classifier name.")] = None,
    weights: Annotated[str, typer.Option(
        help="As for dump; `random` draws seeded non-trivial weights (offline).")
    ] = "DEFAULT",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    size: Annotated[Optional[int], typer.Option(help="Input size.  [default: the model's]")
    ] = None,
    smallest: Annotated[bool, typer.Option(
        "--smallest", help="Use the smallest input size each model accepts.")] = False,
    all_models: Annotated[bool, typer.Option(
        "--all", help="Check every classifier (two random inputs each) and print a table.")
    ] = False,
) -> None:
    """Check completeness: logit = input term + bias terms, within 1e-4 * max(1, |logit|)."""
    try:
        from fgcli.models import SetupError

        try:
            ok = _run_check(images or [], model, weights, device, size, smallest, all_models)
        except SetupError as exc:
            _fail(str(exc), EXIT_USAGE)
    except UsageError as exc:
        _fail(str(exc), EXIT_USAGE)
    raise typer.Exit(EXIT_OK if ok else EXIT_FAILED)


def _run_check(images: list[str], model: str | None, weights: str, device: str,
               size: int | None, smallest: bool, all_models: bool) -> bool:
    import torch

    from fgcli.check import TOLERANCE, check_batch, check_model, kind_summary, random_inputs
    from fgcli.data import DecodeError, decode, preprocess
    from fgcli.models import SetupError, classifier_names, load_model
    from fgcli.pipeline import resolve_device

    dev = resolve_device(device)
    if all_models == bool(model):
        raise UsageError("give --model NAME, or --all")
    if smallest and size is not None:
        raise UsageError("--size and --smallest exclude each other")
    if all_models and images:
        raise UsageError("--all checks random inputs; give images with --model NAME")

    def inputs(loaded) -> tuple[torch.Tensor, list[str]]:
        proc = loaded.preprocessing
        if not images:
            x, labels = random_inputs(proc.size)
            return x.to(dev), labels
        batch = []
        for path in images:
            try:
                x, _ = preprocess(decode(path, 178_956_970), proc.size, proc.crop,
                                  proc.resize, proc.mean, proc.std)
            except DecodeError as exc:
                raise UsageError(f"{path}: {exc}") from exc
            batch.append(x)
        return torch.stack(batch).to(dev), list(images)

    if not all_models:
        loaded = load_model(model, weights, size=size, smallest=smallest)
        x, labels = inputs(loaded)
        result = check_batch(loaded.model.to(dev), loaded.name, x, labels)
        typer.echo(f"model {loaded.name}  weights {loaded.weights}  device {dev}  "
                   f"tolerance {TOLERANCE:g} * max(1, |logit|)")
        typer.echo(f"{'image':32s} {'target':>6s} {'logit':>14s} {'sum of terms':>14s} "
                   f"{'residual':>11s}  ok")
        for im in result.images:
            typer.echo(f"{im.name[-32:]:32s} {im.target:6d} {im.logit:14.6f} {im.total:14.6f} "
                       f"{im.residual:11.2e}  {'yes' if im.ok else 'NO'}")
        typer.echo(f"bias-carrying ops: {sum(result.kinds.values())} "
                   f"({kind_summary(result.kinds)})")
        typer.echo(f"layers in the map ({len(result.map_layers)}): "
                   f"{', '.join(result.map_layers) or 'none'}")
        typer.echo(f"completeness only ({len(result.other_layers)}): "
                   f"{', '.join(result.other_layers) or 'none'}")
        return result.ok

    typer.echo(f"{'model':24s} {'size':>4s} {'residual':>9s} {'ok':>3s} {'ops':>5s} {'map':>5s} "
               f"{'s/img':>6s}  bias-carrying ops")
    all_ok = True
    for name in classifier_names():
        try:
            result = check_model(name, weights, dev, size=size, smallest=smallest)
        except (SetupError, UsageError, RuntimeError, ValueError) as exc:
            all_ok = False
            typer.echo(f"{name:24s} error: {str(exc).splitlines()[0]}")
            continue
        all_ok &= result.ok
        typer.echo(f"{name:24s} {result.size[0]:4d} {result.worst:9.1e} "
                   f"{'yes' if result.ok else 'NO':>3s} "
                   f"{sum(result.kinds.values()):5d} {len(result.map_layers):5d} "
                   f"{result.seconds_per_image:6.2f}  {kind_summary(result.kinds)}")
        del result
    return all_ok


@app.command()
def models(
    pattern: Annotated[Optional[str], typer.Argument(
        help="Shell pattern (resnet*) or substring to filter by.")] = None,
) -> None:
    """List the classifiers fgcli can load: name, default input size, map layout.

    Map layout: grid (conv layers), channels-last (also (N, h, w, C) blocks), tokens
    (ViT token sequences); +tracked: windowed attention tensors, mapped through
    pixel positions tracked from the image grid.
    """
    from fgcli.models import input_size, map_layout, matching_models

    names = matching_models(pattern)
    if not names:
        _fail(f"no classifier matches {pattern!r}", EXIT_USAGE)
    for name in names:
        typer.echo(f"{name}\t{input_size(name)}\t{map_layout(name)}")


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
