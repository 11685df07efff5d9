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


# Which layouts a family's map is built from (verified by tracing in the tests):
# ``grid`` channels-first conv layers only; ``channels-last`` (N, h, w, C) blocks too;
# ``tokens`` (N, 1 + h*w, C) token sequences; ``+windows`` marks windowed attention
# tensors that are not mapped (they still count for completeness).
_MAP_LAYOUTS = (
    ("vit_", "tokens"),
    ("swin_", "channels-last+windows"),
    ("maxvit_", "grid+windows"),
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


def randomise_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights for exactness checks on any architecture (``--weights random``).

    Random initialisation leaves biases at zero and BatchNorm at mean 0 / var 1, which
    makes bias terms vanish. Here conv / linear weights are He-scaled normals with
    N(0, 0.1) biases; batch norms get random statistics and affine parameters; layer /
    group norms random affine parameters; every other parameter (class tokens,
    positional embeddings, layer scales) a small normal around its mean.
    """
    g = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_(torch.randn(t.shape, generator=g) * std + mean)

    done: set[int] = set()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                normal(m.weight, (2.0 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    normal(m.bias, 0.1)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    normal(m.running_mean, 0.2)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    normal(m.bias, 0.2)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                normal(m.bias, 0.2)
            else:
                continue
            done.update(id(p) for p in m.parameters(recurse=False))
        for p in model.parameters():
            if id(p) not in done:
                normal(p, 0.1, mean=float(p.detach().mean()))
    return model.eval()


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
               crop: bool = False, mean: tuple[float, float, float] | None = None,
               std: tuple[float, float, float] | None = None,
               labels: str | None = None) -> LoadedModel:
    """Build the named classifier with its weights, preprocessing and class names."""
    name = check_model_name(name)
    spec = weights.strip()
    meta_source = None
    if spec.lower() == "none":
        model = torchvision.models.get_model(name, weights=None)
        label, identity = "none (random initialisation)", "none"
    elif spec.lower() == "random":
        torch.manual_seed(0)
        model = randomise_weights(torchvision.models.get_model(name, weights=None))
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
    crop_size, resize_size = input_size(name), None
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
    side = size or crop_size
    resize = round(side * resize_size / crop_size) if resize_size else round(side * 256 / 224)
    proc = Preprocessing((side, side), resize, crop, tuple(mean or proc_mean),
                         tuple(std or proc_std))
    return LoadedModel(name, model.eval(), label, identity, categories, proc, n_classes)
