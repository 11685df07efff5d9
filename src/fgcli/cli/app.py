"""The ``fullgrad`` command: options, console, progress, exit codes. No autograd here.

Exit codes, the same for every command (:func:`_exit_codes` applies them):

* 0: every image ok, or skipped as already done.
* 1: some images failed (each has a ``failed`` manifest line); the rest were written.
* 2: usage or setup error, one line: a bad or empty option, an unreadable labels file,
  an unknown model, missing weights, a locked output, the user's model failing
  (SystemExit / argparse / KeyboardInterrupt raised by the model file, zero classes,
  non-float logits), an output place that cannot be written (also a disk that fills
  up mid-run: "no space left on device writing PATH").
* 3: an unexpected internal error: one line; ``--debug`` prints the traceback first
  and still exits 3.
* 130: SIGINT (Ctrl-C), 143: SIGTERM: finished images kept, ``run.json`` says
  ``"interrupted"`` (see :mod:`fgcli.signals`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from fgcli import __version__, names
from fgcli.config import OUTPUT_KINDS, Method, build_config, check_not_blank, from_options
from fgcli.errors import UsageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

app = typer.Typer(
    name="fullgrad",
    help="Batch FullGrad saliency maps for torchvision classifiers.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# no emoji codes: a path like "net.py:x" must not print as "net.py❌"
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


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


def _say(message: str) -> None:
    """One message line on stderr: raw bytes of a path as ``\\xNN``, control characters
    escaped (:func:`fgcli.names.display`), so a name never splits a line or the console."""
    err.print(names.display(message), markup=False)


def _fail(message: str, code: int) -> None:
    _say(f"fullgrad: error: {message}")
    raise typer.Exit(code)


class _Policy:
    """What :func:`_exit_codes` needs to know while a command runs: ``debug`` may be set
    once the configuration is read (dump's ``--config`` can turn it on)."""

    def __init__(self, debug: bool) -> None:
        self.debug = debug


# exits the command itself asked for: passed through untouched
_EXITS = (typer.Exit, typer.Abort, SystemExit)


@contextlib.contextmanager
def _exit_codes(debug: bool | None = False, usage: tuple[type[Exception], ...] = ()
                ) -> Iterator[_Policy]:
    """The one exit-code policy of every command (the module docstring's table):
    UsageError, SetupError and ``usage`` -> one line, exit 2; KeyboardInterrupt -> 130;
    any other exception -> one line, exit 3, after its traceback under ``--debug``."""
    from fgcli.errors import SetupError

    policy = _Policy(bool(debug))
    try:
        yield policy
    except _EXITS:
        raise
    except (UsageError, SetupError, *usage) as exc:
        _fail(str(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        _say("fullgrad: interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        if policy.debug:
            sys.stderr.write(traceback.format_exc())
            sys.stderr.flush()
        text = str(exc).strip().splitlines()
        hint = "" if policy.debug else " (rerun with --debug for the traceback)"
        _fail(f"internal error: {type(exc).__name__}: {text[0] if text else ''}{hint}",
              EXIT_INTERNAL)


_Debug = Annotated[bool, typer.Option(
    "--debug/--no-debug", help="Show tracebacks of unexpected errors (the exit code stays 3).")]


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
            _say(message)

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
            _say(f"fullgrad: {self.prefix}interrupted by {report.interrupted} after "
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
        if report.stopped_early:
            table.add_row("stopped", "--fail-fast: stopped at the first failure")
        err.print(table)


def _refuse_if_held(out: str) -> None:
    """:func:`fgcli.tree.writer.refuse_if_held` as a usage error (exit 2, one line)."""
    from fgcli.tree.writer import LockedError, refuse_if_held

    try:
        refuse_if_held(out)
    except LockedError as exc:
        raise UsageError(str(exc)) from exc


def _stoppable(resume: bool = False) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Run a command with the stop handlers of :mod:`fgcli.signals` installed from the
    start (a signal while torch is imported or the model loads is one line and exit
    130 / 143 too), and restored afterwards (in-process callers keep theirs). ``resume``:
    the line says that a rerun resumes (dump)."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            from fgcli.signals import Interrupted, stop_signals

            try:
                with stop_signals():
                    command(*args, **kwargs)
            except Interrupted as exc:
                more = ("; finished images are kept: rerun the same command to resume"
                        if resume else "")
                _say(f"fullgrad: interrupted by {exc.name}{more}")
                raise typer.Exit(exc.exit_code) from None

        return wrapper

    return decorate


@app.command()
@_stoppable(resume=True)
def dump(
    inputs: Annotated[Optional[list[str]], typer.Argument(
        help="Image files, directories (walked recursively) or - for a list of paths on "
             "stdin.", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="A torchvision classifier name (see `fullgrad models`), "
                              "timm/NAME, path/to/file.py:factory, package.module:factory, "
                              "or a pickled model file (with --trust-pickle).")] = None,
    weights: Annotated[Optional[str], typer.Option(
        help="DEFAULT, a weights name (IMAGENET1K_V1), a local checkpoint (.pth/.pt/.ckpt/"
             ".safetensors; any head size), none or random.  [default: DEFAULT]")] = None,
    model_arg: Annotated[Optional[list[str]], typer.Option(
        "--model-arg", help="key=value keyword argument for the model's builder or factory "
                            "(value: a TOML literal, else a string); repeatable.",
        show_default=False)] = None,
    trust_pickle: Annotated[Optional[bool], typer.Option(
        "--trust-pickle/--no-trust-pickle", help="Allow checkpoints and model files that hold "
                                                 "pickled Python objects (unpickling runs code "
                                                 "from the file: only for files you trust).")
    ] = None,
    method: Annotated[Optional[Method], typer.Option(
        help="Saliency method.  [default: fullgrad]")] = None,
    psi: Annotated[Optional[str], typer.Option(
        help="Post-processing of each term before summing: abs-rescale (the paper's), "
             "signed, abs, positive (see README).  [default: abs-rescale]")] = None,
    layers: Annotated[Optional[str], typer.Option(
        help="Only these layers in the map: comma-separated name patterns ('features.*') "
             "or K, the last K spatial layers.  [default: all]")] = None,
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
    overlay: Annotated[str | None, typer.Option(
        help="Overlay style: blend (the heatmap over the whole image at --alpha) or heat "
             "(opacity min(1, 2*alpha*saliency): the photo stays visible where saliency is "
             "low).  [default: blend]")] = None,
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
    device_jpeg: Annotated[Optional[bool], typer.Option(
        "--device-jpeg/--no-device-jpeg", help="Decode JPEGs and encode overlays on the "
                                               "model's device (nvjpeg).  [default: on with "
                                               "a CUDA device where nvjpeg works, else off]")
    ] = None,
    max_pixels: Annotated[Optional[int], typer.Option(
        "--max-pixels", help="Refuse images with more pixels (decompression bombs).  "
                             "[default: 178956970]")] = None,
    overwrite: Annotated[Optional[bool], typer.Option(
        "--overwrite/--no-overwrite", help="Recompute images already done with the same "
                                           "settings.")] = None,
    fail_fast: Annotated[Optional[bool], typer.Option(
        "--fail-fast/--no-fail-fast", help="Stop at the first image that fails.")] = None,
    shard: Annotated[Optional[str], typer.Option(
        "--shard", help="I/N: only the images whose output key hashes to I mod N (0 <= I < "
                        "N); shards share one --out and resume separately.",
        show_default=False)] = None,
    ray: Annotated[Optional[bool], typer.Option(
        "--ray/--no-ray", help="Run on Ray Data (`pip install \"fgcli\\[ray]\"`): decoding as "
                               "Ray tasks, the engine in a pool of actors.")] = None,
    ray_address: Annotated[Optional[str], typer.Option(
        "--ray-address", help="With --ray: the cluster to join (auto, ray://host:10001).  "
                              "[default: $RAY_ADDRESS, else a local Ray]")] = None,
    ray_actors: Annotated[Optional[int], typer.Option(
        "--ray-actors", help="Engine actors on Ray.  [default: one per GPU; without GPUs "
                             "one per CPU, minus one for decoding]")] = None,
    dist_timeout: Annotated[Optional[float], typer.Option(
        "--dist-timeout", help="torchrun: seconds a rank may go without progress (a finished "
                               "batch) before the others give up on it.  [default: 600]")
    ] = None,
    gallery: Annotated[Optional[bool], typer.Option(
        "--gallery/--no-gallery", help="Then write OUT/index.html, a static gallery of the "
                                       "tree (see `fullgrad gallery`).")] = None,
    quiet: Annotated[Optional[bool], typer.Option(
        "--quiet/--no-quiet", "-q", help="No progress bar, warnings or summary; failed "
                                         "images still get their line on stderr.")
    ] = None,
    as_json: Annotated[Optional[bool], typer.Option(
        "--json/--no-json", help="Print each manifest line to stdout as it is written.")
    ] = None,
    debug: Annotated[Optional[bool], typer.Option(
        "--debug/--no-debug", help="Show tracebacks of unexpected errors (the exit code "
                                   "stays 3).")] = None,
    config: Annotated[Optional[str], typer.Option(
        help="TOML file of options (keys are option names); command-line options win.")
    ] = None,
) -> None:
    """Write FullGrad heatmaps, overlays and maps for every image."""
    with _exit_codes(debug) as policy:
        cfg = build_config({
            "inputs": tuple(inputs) if inputs else None, "model": model, "weights": weights,
            "model_args": tuple(model_arg) if model_arg else None,
            "trust_pickle": trust_pickle,
            "method": method, "psi": psi, "layers": layers, "device": device, "out": out,
            "save": (tuple(s.strip() for s in save.split(",") if s.strip())
                     if save is not None else None),
            "target": target, "topk": topk, "batch_size": batch_size, "workers": workers,
            "size": size, "crop": crop, "mean": _floats(mean, "--mean"),
            "std": _floats(std, "--std"), "labels": labels, "colormap": colormap,
            "alpha": alpha, "overlay": overlay, "samples": samples, "sigma": sigma, "seed": seed,
            "files_from": files_from, "null": null, "max_pixels": max_pixels,
            "amp": amp, "channels_last": channels_last, "device_jpeg": device_jpeg,
            "overwrite": overwrite, "fail_fast": fail_fast, "shard": shard, "ray": ray,
            "ray_address": ray_address, "ray_actors": ray_actors, "dist_timeout": dist_timeout,
            "gallery": gallery,
            "quiet": quiet, "json": as_json,
            "debug": debug, "command": tuple(sys.argv),
        }, config)
        policy.debug = cfg.debug
        _refuse_if_held(cfg.out)  # a locked --out: refused before torch is even imported
        from fgcli.distributed.launch import run_dump

        def reporter_for(prefix: str, lead: bool) -> ConsoleReporter:
            return ConsoleReporter(cfg.quiet, cfg.json, prefix, lead)

        report = run_dump(cfg, reporter_for)
    code = report.exit_code
    if "gallery_error" in report.extra:
        _say(f"fullgrad: gallery: {report.extra['gallery_error']}")
        code = max(code, EXIT_FAILED)
    elif "gallery" in report.extra:
        code = max(code, _report_gallery(report.extra["gallery"], cfg.quiet))
    raise typer.Exit(code)


def _report_gallery(report: Any, quiet: bool) -> int:
    """Print a gallery's thumbnail failures (always) and its summary line (unless quiet);
    returns the exit code: 1 when a thumbnail failed. Malformed manifest lines it skipped
    are warnings (one line per file, unless quiet)."""
    if not quiet:
        for line in report.warnings:
            _say(f"fullgrad: warning: {line}")
    for line in report.thumbs.failed.values():
        _say(f"fullgrad: gallery: {line}")
    if not quiet:
        _say(f"gallery: {report.index} ({report.images} images, {report.maps} maps, "
                  f"{report.failed} failed; thumbnails made {report.thumbs.made}, kept "
                  f"{report.thumbs.kept}; {report.seconds:.1f}s)")
    return EXIT_FAILED if report.thumbs.failed else EXIT_OK


# options that check and eval declare alike
_ModelArgs = Annotated[Optional[list[str]], typer.Option(
    "--model-arg", help="key=value keyword argument for the model's builder or factory; "
                        "repeatable.", show_default=False)]
_TrustPickle = Annotated[bool, typer.Option(
    "--trust-pickle", help="Allow checkpoints and model files with pickled objects.")]
_Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
_Size = Annotated[Optional[int], typer.Option(help="Input size.  [default: the model's]")]


@app.command()
@_stoppable()
def check(
    images: Annotated[Optional[list[str]], typer.Argument(
        help="Images to decompose (default: two seeded photo-like random inputs).",
        show_default=False)] = None,
    model: Annotated[Optional[list[str]], typer.Option(
        "--model", "-m", help="Model, as for dump; give several for a table.",
        show_default=False)] = None,
    weights: Annotated[str, typer.Option(
        help="As for dump; `random` draws seeded non-trivial weights (offline).")
    ] = "DEFAULT",
    model_arg: _ModelArgs = None,
    trust_pickle: _TrustPickle = False,
    device: _Device = "auto",
    size: _Size = None,
    smallest: Annotated[bool, typer.Option(
        "--smallest", help="Use the smallest input size each model accepts.")] = False,
    all_models: Annotated[bool, typer.Option(
        "--all", help="Check every torchvision classifier (two random inputs each) and print "
                      "a table.")] = False,
    debug: _Debug = False,
) -> None:
    """Check completeness per image: logit = input term + bias terms, within
    1e-4 * max(1, |logit|); list the bias-carrying ops and why any are not in the map."""
    with _exit_codes(debug):
        from fgcli.config import parse_model_args

        ok = _run_check(images or [], list(model or []), weights,
                        parse_model_args(tuple(model_arg or ())), trust_pickle, device,
                        size, smallest, all_models)
    raise typer.Exit(EXIT_OK if ok else EXIT_FAILED)


@app.command("eval")
@_stoppable()
def eval_(
    images: Annotated[list[str], typer.Argument(
        help="Image files or directories (two or more images).", show_default=False)],
    model: Annotated[str, typer.Option(
        "--model", "-m", help="Model, as for dump.", show_default=False)],
    weights: Annotated[str, typer.Option(help="As for dump.")] = "DEFAULT",
    model_arg: _ModelArgs = None,
    trust_pickle: _TrustPickle = False,
    device: _Device = "auto",
    size: _Size = None,
    crop: Annotated[bool, typer.Option("--crop/--no-crop", help="As for dump.")] = False,
    mean: Annotated[Optional[str], typer.Option(help="Normalisation mean R,G,B.")] = None,
    std: Annotated[Optional[str], typer.Option(help="Normalisation std R,G,B.")] = None,
    labels: Annotated[Optional[str], typer.Option(help="Class names file.")] = None,
    target: Annotated[str, typer.Option(help="pred (top-1), a class index or name.")
    ] = "pred",
    out: Annotated[str, typer.Option("--out", "-o", help="Where eval.json, eval.csv and "
                                                         "eval.png go.")] = "fullgrad-eval",
    methods: Annotated[Optional[str], typer.Option(
        help="Comma-separated methods, or all: fullgrad, fullgrad-signed, fullgrad-abs, "
             "fullgrad-positive, simple, smooth, gradient, input-x-gradient, smoothgrad, "
             "integrated-gradients, gradcam, random.  [default: all]")] = None,
    metrics: Annotated[str, typer.Option(
        help="Comma-separated: perturbation, deletion, insertion.")
    ] = "perturbation,deletion,insertion",
    ks: Annotated[str, typer.Option(
        help="Pixel perturbation: percentages of pixels removed, each in (0, 100).")
    ] = "10,30,50,70,90",
    steps: Annotated[int, typer.Option(help="Deletion / insertion: steps of the curve.")
    ] = 20,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per batch.")
    ] = 4,
    samples: Annotated[int, typer.Option(help="smooth and smoothgrad: noisy samples.")] = 25,
    seed: Annotated[int, typer.Option(help="Seed of the noisy and random methods.")] = 0,
    layers: Annotated[Optional[str], typer.Option(
        help="fgcli's methods: only these layers in the map (comma-separated name "
             "patterns, e.g. 'features.*', or K: the last K spatial layers).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table.")
    ] = False,
    debug: _Debug = False,
) -> None:
    """Measure how faithful the maps are: pixel perturbation (the paper's 5.1),
    deletion and insertion AUC, for fgcli's methods against baselines; prints a table and
    writes eval.json, eval.csv and eval.png."""
    from fgcli.evaluate.methods import parse_methods
    from fgcli.evaluate.run import EvalConfig

    with _exit_codes(debug):
        try:
            cfg = from_options(EvalConfig, dict(  # noqa: C408 - shim until cli/ is rewritten
                inputs=tuple(images), model=model, weights=weights,
                model_args=tuple(model_arg or ()), trust_pickle=trust_pickle, device=device,
                size=size, crop=crop, mean=_floats(mean, "--mean"), std=_floats(std, "--std"),
                labels=labels, target=target, out=out, methods=tuple(parse_methods(methods)),
                metrics=tuple(m.strip() for m in metrics.split(",") if m.strip()),
                ks=_floats(ks, "--ks") or (), steps=steps, batch_size=batch_size,
                samples=samples, seed=seed, layers=layers, command=tuple(sys.argv)))
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        _run_eval(cfg, quiet)


@contextlib.contextmanager
def _count_bar(quiet: bool, unit: str, desc: str) -> Iterator[Callable[[int, int], None] | None]:
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


def _run_eval(cfg: Any, quiet: bool) -> None:
    from fgcli.evaluate import report
    from fgcli.evaluate.run import run_eval

    def failure(path: str, reason: str) -> None:
        _say(f"fullgrad: failed: {names.display(path)}: {reason}")

    with _count_bar(quiet, "img", f"eval {cfg.model}") as progress:
        result = run_eval(cfg, progress, failure)
    paths = report.write(cfg, result)
    if quiet:
        return
    # plain columns, not a rich table: the width must not depend on the terminal
    header = ["method"]
    for metric in cfg.metrics:
        if metric == "perturbation":
            header += [f"pert {k:g}%" for k in result.ks]
        else:
            header.append(f"{metric} AUC")
    lines = []
    for method, per in result.results.items():
        cells = [method]
        for metric in cfg.metrics:
            s = per[metric]
            cells += [f"{m:.3f}±{e:.3f}" for m, e in zip(s.mean, s.se)]
        lines.append(cells)
    width = max(len(c[0]) for c in [header, *lines])
    typer.echo(f"{result.model}, {len(result.images)} images: mean ± standard error")
    for cells in [header, *lines]:
        typer.echo(f"{cells[0]:{width}s}  " + "  ".join(f"{c:>13s}" for c in cells[1:]))
    typer.echo("pixel perturbation: lower is better; deletion: lower; insertion: higher")
    typer.echo("wrote " + ", ".join(str(p) for p in paths))


@app.command()
@_stoppable()
def merge(
    out: Annotated[str, typer.Argument(help="The output tree of the shards.")],
    debug: _Debug = False,
) -> None:
    """Fold the shard manifests of OUT into OUT/manifest.jsonl: one line per image (and
    target), the newest, sorted by key; OUT/run.json sums the shards. Refused while shards
    run; merging twice changes nothing. Exit 0 once merged (failed images are counted,
    not an error here: their shards reported them)."""
    with _exit_codes(debug):
        from fgcli.tree.shards import merge as merge_tree

        check_not_blank({"OUT": out})
        report = merge_tree(out, list(sys.argv))
    for line in report.warnings:  # malformed lines dropped, shards of another count
        _say(f"fullgrad: warning: {line}")
    if not report.shards:
        _say(f"fullgrad: {out}: no shards to merge")
        raise typer.Exit(EXIT_OK)
    counts = report.counts
    _say(f"merged {len(report.shards)} shard(s) into {out}/manifest.jsonl: "
              f"{report.records} lines from {report.lines}; images ok {counts['ok']}, "
              f"skipped {counts['skipped']}, failed {counts['failed']}")
    raise typer.Exit(EXIT_OK)


@app.command("gallery")
@_stoppable()
def gallery_(
    out: Annotated[str, typer.Argument(help="The output tree of a dump.")],
    threads: Annotated[Optional[int], typer.Option(
        "--threads", help="Threads making thumbnails.  [default: the CPUs this process may "
                          "use]")] = None,
    quiet: Annotated[bool, typer.Option(
        "--quiet/--no-quiet", "-q", help="No progress bar or summary; thumbnails that fail "
                                         "still get their line on stderr.")] = False,
    debug: _Debug = False,
) -> None:
    """Write OUT/index.html: a static gallery of the tree's maps that opens from disk
    (no server, no network). Thumbnails go to OUT/thumbs/ once; rerun after a dump to
    add its new images. Exit 0, 1 when a thumbnail failed, 2 when OUT is not a tree or a
    file of the page cannot be written (a full disk: one line naming the file)."""
    from fgcli.gallery import GalleryError, build_gallery
    from fgcli.tree.writer import WriteFailed

    if threads is not None and threads < 1:
        _fail("--threads must be >= 1", EXIT_USAGE)
    # DiskFullError is a SetupError (exit 2); other OSErrors than a failed write: exit 3
    with _exit_codes(debug, usage=(GalleryError, WriteFailed)):
        check_not_blank({"OUT": out})
        if os.path.isdir(out):  # else build_gallery says what OUT is not
            from fgcli.tree.writer import writable_dir

            writable_dir(out, "OUT")
        with _count_bar(quiet, "thumb", "thumbnails") as progress:
            report = build_gallery(out, threads, progress)
    raise typer.Exit(_report_gallery(report, quiet))


def _counts(groups: dict[str, list[str]]) -> str:
    return ", ".join(f"{reason} {len(names)}" for reason, names in groups.items()) or "none"


def _run_check(images: list[str], models: list[str], weights: str, model_args: dict[str, Any],
               trust_pickle: bool, device: str, size: int | None, smallest: bool,
               all_models: bool) -> bool:
    from fgcli.check import TOLERANCE, check_model, kind_summary
    from fgcli.errors import SetupError
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
        result = check_model(models[0], weights, dev, images=images, **options)
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
                _say(f"fullgrad: failed: {im.name}: {im.nonfinite}")
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
        return result.ok

    names = classifier_names() if all_models else models
    typer.echo(f"{'model':28s} {'size':>7s} {'residual':>9s} {'ok':>3s} {'ops':>5s} {'map':>5s} "
               f"{'s/img':>6s}  not in the map; bias-carrying ops")
    all_ok = True
    for name in names:
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


# what each reason for leaving a layer out of the map means (LayerInfo.excluded)
_REASONS = {
    "vector": "(N, K) heads and pooled features: no grid",
    "ambiguous": "two readings of the shape fit the grid and nothing tracked it",
    "off-grid": "tracked, but none of its elements is a pixel (class-token layers)",
    "untracked": "nothing placed its elements on the image grid",
}


@app.command()
@_stoppable()
def models(
    pattern: Annotated[Optional[str], typer.Argument(
        help="Shell pattern (resnet*) or substring to filter by; timm/PATTERN lists timm's "
             "models (timm/*.fb_in1k: pretrained tags).")] = None,
    debug: _Debug = False,
) -> None:
    """List the models fgcli can load: name, default input size, map layout (torchvision).

    Map layout: grid (conv layers), channels-last (also (N, h, w, C) blocks), tokens
    (ViT token sequences); +tracked: windowed attention tensors, mapped through
    pixel positions tracked from the image grid. For timm models the third column is
    "timm" (`fullgrad check --model timm/NAME` shows which layers enter the map).
    """
    with _exit_codes(debug):
        rows = _model_rows(pattern)
    if not rows:
        _fail(f"no model matches {pattern!r}", EXIT_USAGE)
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
