"""Model name -> (model, preprocessing, class names). No saliency code here.

Weights (``--weights``):

* ``DEFAULT`` or a torchvision weights name (``IMAGENET1K_V1``, or the full
  ``ResNet50_Weights.IMAGENET1K_V2``): torchvision's own loader, which uses the
  cached file under ``$TORCH_HOME`` when there is one and downloads otherwise.
* a local file: a ``state_dict`` saved with ``torch.save`` (``.pth`` / ``.pt``,
  loaded with ``weights_only=True``; a ``{"state_dict": ...}`` or
  ``{"model": ...}`` wrapper and DataParallel's ``module.`` prefixes are
  accepted) or ``.safetensors`` when the ``safetensors`` package is installed.
* ``none``: torchvision's random initialisation (only useful for testing);
  ``random``: seeded random weights with non-trivial biases and norm statistics
  (see :func:`randomise_weights`), for exactness checks.

Class names and preprocessing come from the weights' metadata. For a local
file they come from the model's ``DEFAULT`` weights metadata (available
offline) when the file's class count matches it, else ImageNet's
normalisation and numbered classes; ``--mean``, ``--std`` and ``--labels``
override either.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from fgcli.config import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


class SetupError(Exception):
    """The run cannot start (missing weights, offline, locked output): exit code 2."""


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
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `fullgrad models`"
    raise UsageError(f"--model: unknown classifier {name!r}{hint}")


@dataclass(frozen=True)
class Preprocessing:
    """How images become model input. Sizes are (height, width)."""

    size: tuple[int, int]  # model input size
    resize: int  # shorter side before the centre crop (only with crop=True)
    crop: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class LoadedModel:
    name: str
    model: nn.Module
    weights: str  # what was loaded, for run.json
    identity: str  # stable description of the weights, for the resume fingerprint
    categories: tuple[str, ...] | None
    preprocessing: Preprocessing
    num_classes: int | None = None  # from the last conv / linear layer, when there is one


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


def _resolve_enum(name: str, spec: str) -> Any:
    enum_cls = torchvision.models.get_model_weights(name)
    member = spec.split(".")[-1]
    if member == "DEFAULT":
        return enum_cls.DEFAULT
    try:
        return enum_cls[member]
    except KeyError as exc:
        options = ", ".join(["DEFAULT", *[m.name for m in enum_cls]])
        raise UsageError(f"--weights: {name} has no weights {spec!r}; choose from {options}, "
                         "a file, or none") from exc


def _looks_like_file(spec: str) -> bool:
    return (os.sep in spec or spec.startswith(".") or spec.lower().endswith(WEIGHT_FILE_SUFFIXES)
            or Path(spec).exists())


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise SetupError(f"--weights: {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError as exc:
                raise SetupError(f"--weights: {path}: reading .safetensors needs the "
                                 "'safetensors' package (pip install safetensors)") from exc
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except SetupError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling / format error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SetupError(f"--weights: {path}: not a readable state_dict ({first})") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise SetupError(f"--weights: {path}: expected a state_dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _num_classes(model: nn.Module) -> int | None:
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

    handles = [m.register_forward_pre_hook(pre_hook) for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    if not handles:
        return  # no running statistics (ViT, Swin, ConvNeXt): nothing to measure
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
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UsageError(f"--labels: {path}: cannot read it ({exc.strerror or exc})") from exc
    labels = tuple(line.strip() for line in lines if line.strip())
    if not labels:
        raise UsageError(f"--labels: {path}: no class names in it")
    return labels


def load_model(name: str, weights: str = "DEFAULT", *, size: int | None = None,
               smallest: bool = False, crop: bool = False,
               mean: tuple[float, float, float] | None = None,
               std: tuple[float, float, float] | None = None,
               labels: str | None = None) -> LoadedModel:
    """Build the named classifier with its weights, preprocessing and class names.

    size: the input side (default: the weights' crop size); smallest: the smallest
    side the built model accepts (see :func:`smallest_input_size`) instead.
    """
    name = check_model_name(name)
    spec = weights.strip()
    meta_source = None
    if spec.lower() == "none":
        model = torchvision.models.get_model(name, weights=None)
        label, identity = "none (random initialisation)", "none"
    elif spec.lower() == "random":
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None)  # randomised below
        label, identity = "random (seeded, non-trivial biases and norm statistics)", "random"
    elif _looks_like_file(spec):
        path = Path(spec).expanduser()
        state = _read_state_dict(path)
        model = torchvision.models.get_model(name, weights=None)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise SetupError(f"--weights: {path}: does not fit {name} ({first})") from exc
        stat = path.stat()
        label = str(path)
        identity = f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        meta_source = default_weights(name)
        if meta_source is not None and len(meta_source.meta.get("categories") or ()) != \
                _num_classes(model):
            meta_source = None
    else:
        enum_member = _resolve_enum(name, spec)
        try:
            model = torchvision.models.get_model(name, weights=enum_member)
        except Exception as exc:  # noqa: BLE001 - URLError, HTTP errors, hash mismatch...
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SetupError(
                f"--weights {spec}: cannot load {enum_member} ({reason}); offline? Use "
                "--weights PATH for a local state_dict, or --weights none") from exc
        label = str(enum_member)
        identity = str(enum_member)
        meta_source = enum_member

    categories: tuple[str, ...] | None = None
    proc_mean, proc_std = IMAGENET_MEAN, IMAGENET_STD
    crop_size, resize_size = _fixed_size(model) or input_size(name), None
    if meta_source is not None:
        categories = tuple(meta_source.meta.get("categories") or ()) or None
        t = meta_source.transforms()
        proc_mean = tuple(getattr(t, "mean", proc_mean))
        proc_std = tuple(getattr(t, "std", proc_std))
        crop_size = int(getattr(t, "crop_size", [crop_size])[0])
        resize_size = int(getattr(t, "resize_size", [0])[0]) or None
    if labels:
        categories = read_labels(labels)
    n_classes = _num_classes(model)
    if categories is not None and n_classes is not None and len(categories) != n_classes:
        raise UsageError(f"--labels: {len(categories)} class names for a model with "
                         f"{n_classes} classes")
    side = smallest_input_size(name, model) if smallest else size or crop_size
    if spec.lower() == "random":  # batch norms calibrated at the size the model will see
        randomise_weights(model, calibration=calibration_batch(side))
    resize = round(side * resize_size / crop_size) if resize_size else round(side * 256 / 224)
    proc = Preprocessing((side, side), resize, crop, tuple(mean or proc_mean),
                         tuple(std or proc_std))
    return LoadedModel(name, model.eval(), label, identity, categories, proc, n_classes)
