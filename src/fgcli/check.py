"""``fullgrad check``: the completeness self-check of the decomposition, per image.

Knows neither typer nor rich; returns rows the CLI prints.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fgcli.config import ModelSpec, model_arg_pairs
from fgcli.engine.ops import CLOSED_FORM_KINDS, IMPLICIT_KINDS
from fgcli.models.outputs import nonfinite_logit

TOLERANCE = 1e-4  # |residual| <= TOLERANCE * max(1, |logit|), float32


@dataclass
class ImageCheck:
    name: str
    target: int
    logit: float
    total: float  # input term + every bias term
    residual: float
    # the same image decomposed on its own (batch of one): its residual, and whether its
    # logit and target equal the batch's (None: not run)
    alone: float | None = None
    alone_agrees: bool = True

    def _within(self, residual: float) -> bool:
        return abs(residual) <= TOLERANCE * max(1.0, abs(self.logit))

    @property
    def ok(self) -> bool:
        alone = self.alone is None or (self._within(self.alone) and self.alone_agrees)
        return self._within(self.residual) and alone

    @property
    def nonfinite(self) -> str | None:
        """Why completeness cannot hold at all: a NaN or infinite logit or residual
        (NaN weights, a model that overflows); None when both are finite numbers."""
        if not math.isfinite(self.logit):
            return nonfinite_logit(self.logit)
        if not math.isfinite(self.residual):
            return f"non-finite completeness residual ({self.residual})"
        return None

    @property
    def worst(self) -> float:
        """The larger |residual| / max(1, |logit|) of the batch run and the run alone."""
        worst = abs(self.residual)
        if self.alone is not None:
            worst = max(worst, abs(self.alone))
        return worst / max(1.0, abs(self.logit))


@dataclass
class ModelCheck:
    model: str
    images: list[ImageCheck] = field(default_factory=list)
    kinds: Counter = field(default_factory=Counter)
    map_layers: list[str] = field(default_factory=list)
    other_layers: list[str] = field(default_factory=list)
    # why each layer outside the map is out (LayerInfo.excluded): reason -> layer names;
    # reasons "vector", "ambiguous", "off-grid", "untracked"
    excluded: dict[str, list[str]] = field(default_factory=dict)
    # layers whose terms were split between images by reading the batch dim off the
    # shape, not by followed image indices (LayerInfo.split == "shape"); empty normally
    split_by_shape: list[str] = field(default_factory=list)
    seconds_per_image: float = 0.0
    size: tuple[int, int] = (0, 0)
    error: str | None = None
    weights: str = ""  # what was loaded (for the report)

    @property
    def ok(self) -> bool:
        return self.error is None and all(i.ok for i in self.images)

    @property
    def worst(self) -> float:
        return max((i.worst for i in self.images), default=float("nan"))


def check_batch(model: torch.nn.Module, name: str, x: torch.Tensor,
                labels: list[str], alone: bool = True) -> ModelCheck:
    """Decompose every image of ``x`` and compare the terms' sum with its logit; with
    ``alone`` (and more than one image), also each image on its own, which must give the
    same logit and an exact decomposition too (batch-dependent bugs show there)."""
    from fgcli import FullGrad

    result = ModelCheck(name, size=(int(x.shape[2]), int(x.shape[3])))
    start = time.perf_counter()
    dec = FullGrad(model).decompose(x)
    result.seconds_per_image = (time.perf_counter() - start) / len(x)
    n = len(x)
    total = dec.logit.double() - dec.residual  # the residual is logit - input - bias terms
    for j in range(n):
        image = ImageCheck(labels[j], int(dec.target[j]), float(dec.logit[j]),
                           float(total[j]), float(dec.residual[j]))
        if alone and n > 1:
            one = FullGrad(model).decompose(x[j:j + 1], target=dec.target[j:j + 1])
            image.alone = float(one.residual[0])
            image.alone_agrees = abs(float(one.logit[0]) - image.logit) <= \
                TOLERANCE * max(1.0, abs(image.logit))
        result.images.append(image)
    result.kinds = Counter(layer.kind for layer in dec.layers)
    result.map_layers = [layer.name for layer in dec.layers if layer.in_map]
    result.other_layers = [layer.name for layer in dec.layers if not layer.in_map]
    for layer in dec.layers:
        if layer.excluded is not None:
            result.excluded.setdefault(layer.excluded, []).append(layer.name)
    if n > 1:
        result.split_by_shape = [layer.name for layer in dec.layers if layer.split == "shape"]
    return result


def random_inputs(size: tuple[int, int], n: int = 2, seed: int = 1
                  ) -> tuple[torch.Tensor, list[str]]:
    """The seeded photo-like inputs ``check`` decomposes when given no images (another
    seed than the batch-norm calibration of ``--weights random``)."""
    from fgcli.models.base import calibration_batch

    return calibration_batch(size, seed=seed, n=n), [f"random(seed={seed})#{i}" for i in range(n)]


def check_model(spec: str | ModelSpec, weights: str = "random",
                device: torch.device | str = "cpu", *, size: int | None = None,
                smallest: bool = False, model_args: dict[str, Any] | None = None,
                trust_pickle: bool = False, images: Sequence[str] = (),
                alone: bool = True) -> ModelCheck:
    """Load a model (a :class:`ModelSpec`, or any ``--model`` form with the other model
    options) and check its decomposition on ``images``, or on :func:`random_inputs`
    without them (``alone``: each image on its own too, see :func:`check_batch`). Raises
    UsageError for an image that cannot be read, SetupError / UsageError for the model."""
    from fgcli.models.load import load
    from fgcli.models.sources.usercode import FORWARD_HINT, user_code

    if not isinstance(spec, ModelSpec):
        spec = ModelSpec(spec, weights, model_arg_pairs(model_args or {}), trust_pickle, size)
    loaded = load(spec, device, smallest=smallest)
    x, labels = _inputs(images, loaded.config, spec.max_pixels)
    with user_code(f"model {spec.model}", "being checked", FORWARD_HINT):
        result = check_batch(loaded.model, loaded.config.name, x.to(device), labels, alone)
    result.weights = loaded.config.weights
    return result


def _inputs(images: Sequence[str], config: Any, max_pixels: int
            ) -> tuple[torch.Tensor, list[str]]:
    """The images preprocessed as ``config`` says, or :func:`random_inputs` without any;
    and their printable names."""
    from fgcli.data.decode import DecodeError, decode, preprocess
    from fgcli.errors import UsageError
    from fgcli.names import display

    if not images:
        return random_inputs(config.size)
    batch = []
    for path in images:
        try:
            x, _ = preprocess(decode(path, max_pixels), config.size, config.crop,
                              config.resize, config.mean, config.std, config.interpolation)
        except DecodeError as exc:
            raise UsageError(f"{display(path)}: {exc}") from exc
        batch.append(x)
    return torch.stack(batch), [display(p) for p in images]


def kind_summary(kinds: Counter) -> str:
    """``closed-form conv 13, norm 13, linear 3; implicit activation 2`` (zero counts left out)."""
    closed = ", ".join(f"{k} {kinds[k]}" for k in CLOSED_FORM_KINDS if kinds[k])
    implicit = ", ".join(f"{k} {kinds[k]}" for k in IMPLICIT_KINDS if kinds[k])
    return f"closed-form: {closed or 'none'}; implicit: {implicit or 'none'}"
