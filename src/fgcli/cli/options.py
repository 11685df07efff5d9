"""The options that several commands take, each spelled once: flags, help and how its
text becomes a config value (:class:`To`, read by :func:`config_values`).

``dump``'s spellings (``Dump*``) default to None, "not given", so that a ``--config``
file can set them; ``check`` and ``eval`` spell theirs shorter, with the defaults in the
signature. Parameters are named like the config fields they fill (``model_args`` for
``--model-arg``), so a command hands what it parsed to :func:`fgcli.config.from_options`
without a mapping of its own.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from fgcli.errors import UsageError


@dataclass(frozen=True)
class To:
    """``Annotated`` metadata of an option: how its parsed value becomes the config's
    (``convert``, applied when the option was given) and under which field name
    (``field``, where the parameter's name must differ: it shows in the help)."""

    convert: Callable[[Any], Any] | None = None
    field: str | None = None


def config_values(command: Callable[..., Any], values: Mapping[str, Any],
                  exclude: Collection[str] = ()) -> dict[str, Any]:
    """``command``'s parsed parameters (``locals()`` at its start) as config values: each
    converted by its option's :class:`To`, None kept as "not given", ``exclude`` left out
    (parameters that are not config fields)."""
    hints = typing.get_type_hints(command, include_extras=True)
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name in exclude:
            continue
        to = next((m for m in getattr(hints[name], "__metadata__", ()) if isinstance(m, To)),
                  To())
        if to.convert is not None and value is not None:
            value = to.convert(value)
        out[to.field or name] = value
    return out


def floats(option: str) -> Callable[[str], tuple[float, ...]]:
    """``"a,b,c"`` -> a tuple of floats; anything else is a usage error naming ``option``."""

    def convert(text: str) -> tuple[float, ...]:
        try:
            return tuple(float(v) for v in text.split(","))
        except ValueError as exc:
            raise UsageError(f"{option}: expected comma-separated numbers, got {text!r}"
                             ) from exc

    return convert


def items(text: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``: comma-separated names, blanks dropped."""
    return tuple(s.strip() for s in text.split(",") if s.strip())


def repeated(values: list[str]) -> tuple[str, ...] | None:
    """A repeatable option or a list argument: a tuple, None when empty (not given)."""
    return tuple(values) if values else None


# -- the model -----------------------------------------------------------------------------
DumpModel = Annotated[str | None, typer.Option(
    "--model", "-m", help="A torchvision classifier name (see `fullgrad models`), "
                          "timm/NAME, path/to/file.py:factory, package.module:factory, "
                          "or a pickled model file (with --trust-pickle).")]
EvalModel = Annotated[str, typer.Option(
    "--model", "-m", help="Model, as for dump.", show_default=False)]
CheckModels = Annotated[list[str] | None, typer.Option(
    "--model", "-m", help="Model, as for dump; give several for a table.",
    show_default=False)]

DumpWeights = Annotated[str | None, typer.Option(
    help="DEFAULT, a weights name (IMAGENET1K_V1), a local checkpoint (.pth/.pt/.ckpt/"
         ".safetensors; any head size), none or random.  [default: DEFAULT]")]
EvalWeights = Annotated[str, typer.Option(help="As for dump.")]
CheckWeights = Annotated[str, typer.Option(
    help="As for dump; `random` draws seeded non-trivial weights (offline).")]

DumpModelArgs = Annotated[list[str] | None, typer.Option(
    "--model-arg", help="key=value keyword argument for the model's builder or factory "
                        "(value: a TOML literal, else a string); repeatable.",
    show_default=False), To(repeated)]
ModelArgs = Annotated[list[str] | None, typer.Option(
    "--model-arg", help="key=value keyword argument for the model's builder or factory; "
                        "repeatable.", show_default=False), To(repeated)]

DumpTrustPickle = Annotated[bool | None, typer.Option(
    "--trust-pickle/--no-trust-pickle", help="Allow checkpoints and model files that hold "
                                             "pickled Python objects (unpickling runs code "
                                             "from the file: only for files you trust).")]
TrustPickle = Annotated[bool, typer.Option(
    "--trust-pickle", help="Allow checkpoints and model files with pickled objects.")]

DumpDevice = Annotated[str | None, typer.Option(
    help="auto, cpu, cuda, cuda:N or mps (auto: cuda if available).  [default: auto]")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]

# -- the input: size, crop, normalisation, labels, target ----------------------------------
DumpSize = Annotated[int | None, typer.Option(
    help="Model input size in pixels.  [default: the weights' crop size, e.g. 224]")]
Size = Annotated[int | None, typer.Option(help="Input size.  [default: the model's]")]

DumpCrop = Annotated[bool | None, typer.Option(
    "--crop/--no-crop", help="Resize + centre-crop like the weights' own transform "
                             "instead of squashing the whole image.  [default: no-crop]")]
EvalCrop = Annotated[bool, typer.Option("--crop/--no-crop", help="As for dump.")]

DumpMean = Annotated[str | None, typer.Option(
    help="Normalisation mean R,G,B.  [default: from the weights, else ImageNet]"),
    To(floats("--mean"))]
DumpStd = Annotated[str | None, typer.Option(
    help="Normalisation std R,G,B.  [default: from the weights, else ImageNet]"),
    To(floats("--std"))]
EvalMean = Annotated[str | None, typer.Option(help="Normalisation mean R,G,B."),
                     To(floats("--mean"))]
EvalStd = Annotated[str | None, typer.Option(help="Normalisation std R,G,B."),
                    To(floats("--std"))]

DumpLabels = Annotated[str | None, typer.Option(
    help="Text file with one class name per line.")]
EvalLabels = Annotated[str | None, typer.Option(help="Class names file.")]

DumpTarget = Annotated[str | None, typer.Option(
    help="pred (top-1), a class index, or a class name.  [default: pred]")]
EvalTarget = Annotated[str, typer.Option(help="pred (top-1), a class index or name.")]

# -- the map and the run -------------------------------------------------------------------
DumpLayers = Annotated[str | None, typer.Option(
    help="Only these layers in the map: comma-separated name patterns ('features.*') "
         "or K, the last K spatial layers.  [default: all]")]
EvalLayers = Annotated[str | None, typer.Option(
    help="fgcli's methods: only these layers in the map (comma-separated name "
         "patterns, e.g. 'features.*', or K: the last K spatial layers).")]

DumpOut = Annotated[str | None, typer.Option(
    "--out", "-o", help="Output directory.  [default: fullgrad-out]")]
EvalOut = Annotated[str, typer.Option(
    "--out", "-o", help="Where eval.json, eval.csv and eval.png go.")]

DumpBatchSize = Annotated[int | None, typer.Option(
    "--batch-size", "-b", help="Images per batch.  [default: 32 on a GPU, 8 on the CPU]")]
EvalBatchSize = Annotated[int, typer.Option("--batch-size", "-b", help="Images per batch.")]

DumpSamples = Annotated[int | None, typer.Option(
    help="SmoothFullGrad: noisy samples per image.  [default: 25]")]
EvalSamples = Annotated[int, typer.Option(help="smooth and smoothgrad: noisy samples.")]

DumpSeed = Annotated[int | None, typer.Option(help="SmoothFullGrad: noise seed.  [default: 0]")]
EvalSeed = Annotated[int, typer.Option(help="Seed of the noisy and random methods.")]

# -- the console ---------------------------------------------------------------------------
DumpQuiet = Annotated[bool | None, typer.Option(
    "--quiet/--no-quiet", "-q", help="No progress bar, warnings or summary; failed "
                                     "images still get their line on stderr.")]
EvalQuiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table.")]
GalleryQuiet = Annotated[bool, typer.Option(
    "--quiet/--no-quiet", "-q", help="No progress bar or summary; thumbnails that fail "
                                     "still get their line on stderr.")]

_DEBUG_HELP = "Show tracebacks of unexpected errors (the exit code stays 3)."
DumpDebug = Annotated[bool | None, typer.Option("--debug/--no-debug", help=_DEBUG_HELP)]
Debug = Annotated[bool, typer.Option("--debug/--no-debug", help=_DEBUG_HELP)]

# -- object annotations: the pointing game and energy (dump, eval) ---------------------------
_BOXES_HELP = ("Object boxes in original-image pixels: a folder of Pascal VOC / ImageNet XML "
               "files, a COCO instances .json, or a .csv (path,x0,y0,x1,y1[,label]); adds the "
               "pointing game and the energy inside the boxes (docs/audit.md).")
_MASKS_HELP = "A folder of object-mask PNGs named like the images (nonzero = object)."
_TOLERANCE_HELP = ("Pointing game: a peak this many original pixels from an object still "
                   "hits it (Zhang et al. 2016).")
DumpBoxes = Annotated[str | None, typer.Option("--boxes", help=_BOXES_HELP,
                                               show_default=False)]
DumpMasks = Annotated[str | None, typer.Option("--masks", help=_MASKS_HELP,
                                               show_default=False)]
DumpTolerance = Annotated[float | None, typer.Option(
    "--point-tolerance", help=_TOLERANCE_HELP + "  [default: 15]")]
Boxes = Annotated[str | None, typer.Option("--boxes", help=_BOXES_HELP, show_default=False)]
Masks = Annotated[str | None, typer.Option("--masks", help=_MASKS_HELP, show_default=False)]
PointTolerance = Annotated[float, typer.Option("--point-tolerance", help=_TOLERANCE_HELP)]
