"""``fullgrad dump``: its options, read into a :class:`fgcli.config.RunConfig` (with a
``--config`` file), run by :func:`fgcli.distributed.launch.run_dump`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

import fgcli.cli.options as options
from fgcli.cli.console import ConsoleReporter, say
from fgcli.cli.exits import EXIT_FAILED, guard
from fgcli.cli.gallery import report_gallery
from fgcli.cli.options import To
from fgcli.config import OUTPUT_KINDS, Method, build_config


def dump(
    inputs: Annotated[list[str] | None, typer.Argument(
        help="Image files, directories (walked recursively) or - for a list of paths on "
             "stdin.", show_default=False), To(options.repeated)] = None,
    model: options.DumpModel = None,
    weights: options.DumpWeights = None,
    model_args: options.DumpModelArgs = None,
    trust_pickle: options.DumpTrustPickle = None,
    method: Annotated[Method | None, typer.Option(
        help="Saliency method.  [default: fullgrad]")] = None,
    psi: Annotated[str | None, typer.Option(
        help="Post-processing of each term before summing: abs-rescale (the paper's), "
             "signed, abs, positive (see README).  [default: abs-rescale]")] = None,
    layers: options.DumpLayers = None,
    device: options.DumpDevice = None,
    out: options.DumpOut = None,
    save: Annotated[str | None, typer.Option(
        help=f"Comma-separated outputs from {', '.join(OUTPUT_KINDS)}.  "
             "[default: heatmap,overlay,map]"), To(options.items)] = None,
    target: options.DumpTarget = None,
    topk: Annotated[int | None, typer.Option(
        help="One map per top-K class (rank and class index in the file names).")] = None,
    batch_size: options.DumpBatchSize = None,
    workers: Annotated[int | None, typer.Option(
        help="Decoding worker processes (0: decode in the main process).  "
             "[default: min(4, cores - 1)]")] = None,
    size: options.DumpSize = None,
    crop: options.DumpCrop = None,
    mean: options.DumpMean = None,
    std: options.DumpStd = None,
    labels: options.DumpLabels = None,
    colormap: Annotated[str | None, typer.Option(
        help="matplotlib colormap for heatmaps and overlays.  [default: inferno]")] = None,
    alpha: Annotated[float | None, typer.Option(
        help="Heatmap weight in overlays, 0..1.  [default: 0.5]")] = None,
    overlay: Annotated[str | None, typer.Option(
        help="Overlay style: blend (the heatmap over the whole image at --alpha) or heat "
             "(opacity min(1, 2*alpha*saliency): the photo stays visible where saliency is "
             "low).  [default: blend]")] = None,
    samples: options.DumpSamples = None,
    sigma: Annotated[float | None, typer.Option(
        help="SmoothFullGrad: noise std as a fraction of each image's range.  "
             "[default: 0.15]")] = None,
    seed: options.DumpSeed = None,
    files_from: Annotated[str | None, typer.Option(
        "--files-from", help="Read image paths from this file, one per line.")] = None,
    null: Annotated[bool | None, typer.Option(
        "--null/--no-null", "-0", help="Path lists (stdin, --files-from) are NUL-separated.")
    ] = None,
    amp: Annotated[bool | None, typer.Option(
        "--amp/--no-amp", help="Mixed precision: float16 autocast on CUDA, bfloat16 on the "
                               "CPU (faster on GPUs; completeness residuals grow, see README).")
    ] = None,
    channels_last: Annotated[bool | None, typer.Option(
        "--channels-last/--no-channels-last", help="Run the model in channels-last memory "
                                                   "format (often faster on GPUs).")] = None,
    device_jpeg: Annotated[bool | None, typer.Option(
        "--device-jpeg/--no-device-jpeg", help="Decode JPEGs and encode overlays on the "
                                               "model's device (nvjpeg).  [default: on with "
                                               "a CUDA device where nvjpeg works, else off]")
    ] = None,
    max_pixels: Annotated[int | None, typer.Option(
        "--max-pixels", help="Refuse images with more pixels (decompression bombs).  "
                             "[default: 178956970]")] = None,
    overwrite: Annotated[bool | None, typer.Option(
        "--overwrite/--no-overwrite", help="Recompute images already done with the same "
                                           "settings.")] = None,
    fail_fast: Annotated[bool | None, typer.Option(
        "--fail-fast/--no-fail-fast", help="Stop at the first image that fails.")] = None,
    shard: Annotated[str | None, typer.Option(
        "--shard", help="I/N: only the images whose output key hashes to I mod N (0 <= I < "
                        "N); shards share one --out and resume separately.",
        show_default=False)] = None,
    ray: Annotated[bool | None, typer.Option(
        "--ray/--no-ray", help="Run on Ray Data (`pip install \"fgcli\\[ray]\"`): decoding as "
                               "Ray tasks, the engine in a pool of actors.")] = None,
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="With --ray: the cluster to join (auto, ray://host:10001).  "
                              "[default: $RAY_ADDRESS, else a local Ray]")] = None,
    ray_actors: Annotated[int | None, typer.Option(
        "--ray-actors", help="Engine actors on Ray.  [default: one per GPU; without GPUs "
                             "one per CPU, minus one for decoding]")] = None,
    dist_timeout: Annotated[float | None, typer.Option(
        "--dist-timeout", help="torchrun: seconds a rank may go without progress (a finished "
                               "batch) before the others give up on it.  [default: 600]")
    ] = None,
    gallery: Annotated[bool | None, typer.Option(
        "--gallery/--no-gallery", help="Then write OUT/index.html, a static gallery of the "
                                       "tree (see `fullgrad gallery`).")] = None,
    boxes: options.DumpBoxes = None,
    masks: options.DumpMasks = None,
    point_tolerance: options.DumpTolerance = None,
    quiet: options.DumpQuiet = None,
    json: Annotated[bool | None, typer.Option(
        "--json/--no-json", help="Print each manifest line to stdout as it is written.")
    ] = None,
    debug: options.DumpDebug = None,
    config: Annotated[str | None, typer.Option(
        help="TOML file of options (keys are option names); command-line options win.")
    ] = None,
) -> None:
    """Write FullGrad heatmaps, overlays and maps for every image."""
    given = dict(locals())  # every parameter is a RunConfig field, but --config
    with guard("dump", debug) as policy:
        values = options.config_values(dump, given, exclude=("config",))
        cfg = build_config({**values, "command": tuple(sys.argv)}, config)
        policy.debug = cfg.debug
        from fgcli.tree.lock import refuse_if_held

        refuse_if_held(cfg.out)  # a locked --out: refused before torch is even imported
        from fgcli.distributed.launch import run_dump

        def reporter_for(prefix: str, lead: bool) -> ConsoleReporter:
            return ConsoleReporter(cfg.quiet, cfg.json, prefix, lead)

        report = run_dump(cfg, reporter_for)
    code = report.exit_code
    if "gallery_error" in report.extra:
        say(f"fullgrad: gallery: {report.extra['gallery_error']}")
        code = max(code, EXIT_FAILED)
    elif "gallery" in report.extra:
        code = max(code, report_gallery(report.extra["gallery"], cfg.quiet))
    raise typer.Exit(code)
