"""Model spec -> (model, preprocessing, class names). No saliency code here.

``--model`` takes four forms, each resolved by its own source in :mod:`fgcli.models.sources`,
all returning the same :class:`LoadedModel`:

* a torchvision classifier name (``resnet50``): :mod:`fgcli.models.sources.tvision`;
* ``timm/NAME`` (``timm/convnext_tiny.fb_in1k``), with the ``timm`` extra:
  :mod:`fgcli.models.sources.timm_source`;
* ``path/to/file.py:factory`` or ``package.module:factory``, a function of yours that
  returns an ``nn.Module`` (``--model-arg key=value`` passes keyword arguments):
  :mod:`fgcli.models.sources.usercode`;
* a whole pickled model file (``torch.save(model)``), only with ``--trust-pickle``.

``--weights``: ``DEFAULT`` (the source's own: torchvision's or timm's pretrained weights,
cached or downloaded; for your factory or pickled model, the weights it comes with),
a torchvision weights name, a local checkpoint (state_dicts in any of the containers
:mod:`fgcli.models.sources.checkpoint` reads; the class count comes from its classifier), ``none``
(the architecture's own initialisation) or ``random`` (seeded, non-trivial weights, see
:func:`randomise_weights`). Preprocessing and class names come from the source's
metadata; ``--size``, ``--mean``, ``--std`` and ``--labels`` override them.
"""

from __future__ import annotations

import codecs
import difflib
import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import nn

from fgcli.errors import (
    UsageError,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# file names that are checkpoints or model files, not torchvision names
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".pkl", ".tar")


def classifier_names() -> list[str]:
    """Every classification model torchvision registers (not detection / segmentation)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def matching_models(pattern: str | None) -> list[str]:
    """Names matching a shell pattern (``resnet*``) or containing a plain substring."""
    names = classifier_names()
    if not pattern:
        return names
    if any(ch in pattern for ch in "*?["):
        return [n for n in names if fnmatch.fnmatch(n, pattern)]
    return [n for n in names if pattern.lower() in n]


def check_model_name(name: str) -> str:
    names = classifier_names()
    if name in names:
        return name
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
    if _is_timm_model(name):
        close = [f"timm/{name}"]
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `fullgrad models`"
    raise UsageError(f"--model: unknown classifier {name!r}{hint}")


def _is_timm_model(name: str) -> bool:
    """Whether timm (if installed) knows ``name`` (for a hint on an unknown name)."""
    try:
        import timm
    except ImportError:
        return False
    return bool(timm.is_model(name.partition(".")[0]))


@dataclass(frozen=True)
class Built:
    """What a model source returns, before the command line's overrides.

    ``size`` is the source's input size (h, w) and ``crop_fraction`` the share of the
    resized image its centre crop keeps (for ``--crop``); ``smallest`` the smallest side
    the model accepts, if known; ``randomise``: draw ``--weights random`` once the input
    size is known (batch norms are calibrated at that size).
    """

    name: str
    model: nn.Module
    weights: str  # what was loaded, for run.json
    identity: str  # stable description of the weights, for the resume fingerprint
    source: str  # torchvision | timm | code | pickle
    categories: tuple[str, ...] | None = None
    labels_from: str | None = None  # where the class names come from
    size: tuple[int, int] = (224, 224)
    crop_fraction: float = 224 / 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    smallest: int | None = None
    fixed_size: bool = False  # the model only takes ``size`` (ViTs)
    checkpoint: dict[str, Any] | None = None  # entry / prefix / kind of a weights file
    randomise: bool = False
    num_classes: int | None = None  # when the source knows better than the head's width


@dataclass(frozen=True)
class ModelConfig:
    """What a loaded model takes and gives, once the command line's overrides are applied
    (as timm's ``PretrainedCfg``): input size (h, w), resize side and crop, mean/std,
    interpolation, class count and names, and where the weights and names came from.
    run.json's model fields are written from it (:func:`model_info`)."""

    name: str
    weights: str  # what was loaded, for run.json
    identity: str  # stable description of the weights, for the resume fingerprint
    source: str  # the model source's name: torchvision | timm | code | pickle
    size: tuple[int, int]  # model input size
    resize: int  # shorter side before the centre crop (only with crop=True)
    crop: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"  # or "bicubic" (antialiased either way)
    num_classes: int | None = None  # from the model's head (or one probe forward)
    categories: tuple[str, ...] | None = None  # class names, index order
    labels_from: str | None = None  # where the class names come from, for run.json
    checkpoint: dict[str, Any] | None = None  # entry / prefix / kind of a weights file


def model_info(config: ModelConfig) -> dict[str, Any]:
    """The model's part of run.json (between ``weights`` and ``method``)."""
    return {"source": config.source, "classes": config.num_classes,
            "labels": config.labels_from or "none (class indices)",
            "checkpoint": config.checkpoint,
            "preprocessing": {"size": list(config.size), "crop": config.crop,
                              "resize": config.resize, "mean": list(config.mean),
                              "std": list(config.std), "interpolation": config.interpolation}}


@dataclass(frozen=True)
class LoadedModel:
    """A built model and its :class:`ModelConfig`.

    ``preprocessing``, ``categories``, ``num_classes`` and ``describe()`` are the Python
    API documented before the config existed (``fgcli.models.load_model``); they read
    ``config`` and stay for users' code. fgcli itself reads ``config``.
    """

    model: nn.Module
    config: ModelConfig

    @property
    def preprocessing(self) -> ModelConfig:
        """The input size, crop, mean/std and interpolation: the config itself."""
        return self.config

    @property
    def categories(self) -> tuple[str, ...] | None:
        return self.config.categories

    @property
    def num_classes(self) -> int | None:
        return self.config.num_classes

    def describe(self) -> dict[str, Any]:
        """The model's part of run.json (:func:`model_info`)."""
        return model_info(self.config)


def default_weights(name: str) -> Any | None:
    """The model's DEFAULT weights enum member (metadata only: nothing is downloaded)."""
    try:
        return torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError, KeyError):
        return None


def input_size(name: str) -> int:
    """The crop size of the model's default weights (224 for most, 299 for inception_v3)."""
    w = default_weights(name)
    if w is not None:
        crop = getattr(w.transforms(), "crop_size", None)
        if crop:
            return int(crop[0])
    return 224


def _fixed_size(model: nn.Module | None) -> int | None:
    """The input size a built model is fixed to: a ViT's, set at construction (vit_h_14
    is 518 with its SWAG weights but 224 without weights); None for the others."""
    fixed = getattr(model, "image_size", None)
    return fixed if isinstance(fixed, int) else None


def smallest_input_size(name: str, model: nn.Module | None = None) -> int:
    """The smallest square input the classifier accepts: a ViT's fixed size, else the
    ``min_size`` of torchvision's weights metadata (1 for ResNets, 32 for VGG, 75 for
    Inception v3, 224 for Swin and MaxViT)."""
    fixed = _fixed_size(model)
    if fixed is not None:
        return fixed
    w = default_weights(name)
    low = w.meta.get("min_size") if w is not None else None
    return int(max(low)) if low else 32


# Which layouts a family's map is built from (verified by tracing in the tests):
# ``grid`` channels-first conv layers only; ``channels-last`` (N, h, w, C) blocks too;
# ``tokens`` (N, 1 + h*w, C) token sequences; ``+tracked``: windowed attention tensors
# mapped through pixel positions tracked from the grid (fgcli.engine.positions).
_MAP_LAYOUTS = (
    ("vit_", "tokens"),
    ("swin_", "channels-last+tracked"),
    ("maxvit_", "grid+tracked"),
    ("convnext_", "channels-last"),
)


def map_layout(name: str) -> str:
    """The layouts of the layers that build this classifier's saliency map."""
    for prefix, layout in _MAP_LAYOUTS:
        if name.startswith(prefix):
            return layout
    return "grid"


def head_size(model: nn.Module) -> int | None:
    """The class count of a model's classifier: ``num_classes`` where the model states it
    (timm), else the width of its last linear or conv layer; None when neither tells."""
    stated = getattr(model, "num_classes", None)
    if isinstance(stated, int) and not isinstance(stated, bool) and stated > 0:
        return stated
    last = None
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last = m
    if isinstance(last, nn.Linear):
        return last.out_features
    if isinstance(last, nn.Conv2d):
        return last.out_channels
    return None


def randomise_weights(model: nn.Module, seed: int = 0,
                      calibration: torch.Tensor | None = None) -> nn.Module:
    """Non-trivial weights for exactness checks on any architecture (``--weights random``).

    Random initialisation leaves biases at zero and BatchNorm at mean 0 / var 1, which
    makes bias terms vanish. The recipe:

    * conv weights He-scaled normals (variance 2 / fan-in), linear weights and every
      other weight matrix (attention in-projections) LeCun-scaled (1 / fan-in), biases
      N(0, 0.1);
    * batch norms random affine parameters (gamma U(0.5, 1.5), beta N(0, 0.2)) and
      random statistics. With ``calibration`` (a batch of inputs) the statistics are
      data-dependent, as a trained network's are: one forward pass measures each batch
      norm's input per channel, and its running variance becomes the measured mean
      square times U(0.5, 2), its running mean N(0, 0.2) root-mean-squares. Without it
      they are N(0, 0.2) and U(0.5, 2), which makes activations grow geometrically
      with depth in deep nets (EfficientNet-B6: logits of 1e4 and cancelling terms of
      1e11, beyond float32);
    * layer / group norms random affine parameters; every other parameter (class
      tokens, positional embeddings, layer scales, position-bias tables) a normal with
      standard deviation 0.1 around its mean.
    """
    g = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_(torch.randn(t.shape, generator=g) * std + mean)

    def uniform(t: torch.Tensor, low: float, high: float) -> None:
        t.copy_(torch.rand(t.shape, generator=g) * (high - low) + low)

    def fan_in(w: torch.Tensor) -> int:
        return max(1, w[0].numel())

    done: set[int] = set()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                normal(m.weight, (2.0 / fan_in(m.weight)) ** 0.5)
            elif isinstance(m, nn.Linear):
                normal(m.weight, (1.0 / fan_in(m.weight)) ** 0.5)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    normal(m.running_mean, 0.2)
                    uniform(m.running_var, 0.5, 2.0)
                if m.weight is not None:
                    uniform(m.weight, 0.5, 1.5)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                uniform(m.weight, 0.5, 1.5)
            else:
                continue
            bias = getattr(m, "bias", None)
            if isinstance(bias, torch.Tensor):
                normal(bias, 0.1 if isinstance(m, (nn.Conv2d, nn.Linear)) else 0.2)
            done.update(id(p) for p in m.parameters(recurse=False))
        for pname, p in model.named_parameters():
            if id(p) in done:
                continue
            if pname.endswith("weight") and p.dim() >= 2:
                normal(p, (1.0 / fan_in(p)) ** 0.5)
            else:
                normal(p, 0.1, mean=float(p.detach().mean()))
    model.eval()
    if calibration is not None:
        _calibrate_batch_norms(model, calibration, g)
    return model


def _calibrate_batch_norms(model: nn.Module, x: torch.Tensor, g: torch.Generator) -> None:
    """Give every tracked-statistics batch norm data-dependent running statistics."""

    def pre_hook(m: nn.Module, args: tuple) -> None:
        u = args[0].detach().double()
        dims = [d for d in range(u.dim()) if d != 1]
        # the second moment, not the variance: the output's RMS is then about gamma, and the
        # per-channel means are not subtracted (subtracting them makes the effective biases
        # -gamma * mean / std large and their terms cancel: ResNet-152 2e-4 of the logit)
        power = u.square().mean(dims)
        power = power.clamp_min(max(1e-4, 0.01 * float(power.mean())))  # near-dead channels
        shift = torch.randn(power.shape, generator=g, dtype=torch.float64) * 0.2
        scale = torch.rand(power.shape, generator=g, dtype=torch.float64) * 1.5 + 0.5
        m.running_mean.copy_(shift * power.sqrt())
        m.running_var.copy_(power * scale)

    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    if norms:  # none: no running statistics (ViT, Swin, ConvNeXt), nothing to measure
        forward_with_pre_hooks(model, x, norms, pre_hook)


def forward_with_pre_hooks(model: nn.Module, x: torch.Tensor, modules: list[nn.Module],
                           hook: Any) -> None:
    """One forward pass of ``x`` without gradients, ``hook`` a forward pre-hook on each of
    ``modules`` for that pass only (removed in ``finally``)."""
    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()


def calibration_batch(size: int | tuple[int, int], seed: int = 0, n: int | None = None
                      ) -> torch.Tensor:
    """Seeded photo-like random inputs: noise upsampled from 1x1 to full-resolution
    grids in octaves, equal weight per octave (a roughly 1/f spectrum like natural
    images), scaled to unit standard deviation like ImageNet-normalised photos.
    ``--weights random`` calibrates batch-norm statistics on such a batch, and
    ``fullgrad check`` without images decomposes one (with another seed)."""
    h, w = (size, size) if isinstance(size, int) else size
    if n is None:  # enough samples per channel also where the grid has shrunk to 2x2:
        n = max(4, min(256, -(-200_000 // (h * w))))  # 4 at 224, 184 at 33, 256 at 1
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 3, h, w)
    cells = 1
    while True:
        coarse = torch.randn(n, 3, min(cells, h), min(cells, w), generator=g)
        x += torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear",
                                             align_corners=False)
        if cells >= max(h, w):
            break
        cells *= 2
    return x / x.std()


def read_labels(path: str) -> tuple[str, ...]:
    """Class names, one a line: UTF-8 (a byte-order mark is dropped) or UTF-16 with its
    byte-order mark; blank lines are skipped and names stripped (``\r`` of Windows line
    ends too). Anything else is a one-line UsageError naming the file."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise UsageError(f"--labels: {path}: cannot read it ({exc.strerror or exc})") from exc
    labels = tuple(line.strip() for line in _label_text(path, data).splitlines()
                   if line.strip())
    if not labels:
        raise UsageError(f"--labels: {path}: no class names in it")
    return labels


def _label_text(path: str, data: bytes) -> str:
    """A labels file's bytes as text: UTF-16 by its byte-order mark, else UTF-8 (a BOM
    dropped); a byte that fits neither is named with its offset in the file."""
    if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        what, start, encoding = "UTF-16", 0, "utf-16"  # the BOM gives the byte order
    else:
        what, encoding = "UTF-8", "utf-8"
        start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[start:].decode(encoding)
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        raise UsageError(f"--labels: {path}: not {what} text (invalid byte "
                         f"0x{data[offset]:02x} at offset {offset})") from exc
    if what == "UTF-8" and b"\x00" in data:  # UTF-16 without its BOM, or a binary file
        raise UsageError(f"--labels: {path}: not UTF-8 text (invalid byte 0x00 at offset "
                         f"{data.index(0)})")
    return text
