"""Load a model from its spec: pick the source, build, apply the overrides, place, freeze.

:func:`load` is the one way a command gets its model: ``dump``, ``eval``, ``check`` and the
scripts call it with a :class:`fgcli.config.ModelSpec`.
"""

from __future__ import annotations

from typing import Any

import torch

from fgcli.config import ModelSpec
from fgcli.errors import SetupError, UsageError
from fgcli.models.base import (
    Built,
    LoadedModel,
    ModelConfig,
    calibration_batch,
    head_size,
    randomise_weights,
    read_labels,
)
from fgcli.models.outputs import check_classes, checked_logits
from fgcli.models.sources import get_source
from fgcli.models.sources import timm_source as _timm  # noqa: F401 - registers "timm"
from fgcli.models.sources import tvision as _tvision  # noqa: F401 - registers "torchvision"
from fgcli.models.sources import usercode as _usercode  # registers "code" and "pickle"


def load(spec: ModelSpec, device: torch.device | str, *, smallest: bool = False
         ) -> LoadedModel:
    """The model of ``spec`` on ``device``, frozen (eval mode, every parameter's
    ``requires_grad`` off), with its :class:`ModelConfig`.

    smallest: the smallest input side the built model accepts instead of ``spec.size``.
    The class count is always known: from the source, the head, or one probe forward of
    zeros on the device. The memory format stays the caller's (``dump --channels-last``).
    """
    loaded = load_model(spec.model, spec.weights, size=spec.size, smallest=smallest,
                        crop=spec.crop, mean=spec.mean, std=spec.std, labels=spec.labels,
                        model_args=spec.arguments, trust_pickle=spec.trust_pickle)
    model = loaded.model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    config = loaded.config
    if config.num_classes is None:
        config = _with_classes(config, _probe_classes(model, spec.model, config.size, device))
    return LoadedModel(model, config)


def _probe_classes(model: torch.nn.Module, spec: str, size: tuple[int, int],
                   device: torch.device | str) -> int:
    """Class count from one eval forward, for models whose head is not a plain layer
    (the output is checked as user models' is: see ``usercode.probe``)."""
    probe = torch.zeros(1, 3, *size, device=device)
    with _usercode.user_code(f"model {spec}", "computing a probe batch",
                             _usercode.FORWARD_HINT), torch.no_grad():
        out = model(probe)
    try:
        return int(checked_logits(out, 1).shape[1])
    except (TypeError, ValueError) as exc:
        raise SetupError(f"--model {spec}: {exc}") from exc


def _with_classes(config: ModelConfig, n: int) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(config, num_classes=n)


def load_model(name: str, weights: str = "DEFAULT", *, size: int | None = None,
               smallest: bool = False, crop: bool = False,
               mean: tuple[float, float, float] | None = None,
               std: tuple[float, float, float] | None = None,
               labels: str | None = None, model_args: dict[str, Any] | None = None,
               trust_pickle: bool = False) -> LoadedModel:
    """The model built by its source with the command line's overrides applied, on the
    CPU, in eval mode, not yet frozen: :func:`load`'s first half (and ``dump``'s until it
    calls :func:`load`).

    size: the input side (default: the source's); smallest: the smallest side the
    built model accepts instead. A model fixed to one input size (ViTs) refuses
    another.
    """
    names = read_labels(labels) if labels is not None else None  # before any slow loading
    built = get_source(name).load(name, weights, model_args=model_args,
                                  trust_pickle=trust_pickle, size=size)
    categories, labels_from = built.categories, built.labels_from
    if names is not None:
        categories, labels_from = names, f"--labels {labels}"
    n_classes = built.num_classes if built.num_classes is not None else head_size(built.model)
    try:
        check_classes(1 if n_classes is None else n_classes, f" (its head has {n_classes} "
                                                              "outputs)")
    except ValueError as exc:
        raise SetupError(f"--model {name}: {exc}") from exc
    if categories is not None and n_classes is not None and len(categories) != n_classes:
        where = f"--labels: {labels}" if labels else labels_from
        raise UsageError(f"{where}: {len(categories)} class names for a model "
                         f"with {n_classes} classes")
    side = _side(built, size, smallest)
    if built.randomise:  # batch norms calibrated at the size the model will see
        with _usercode.user_code(f"model {name}", "calibrating random weights",
                                 _usercode.FORWARD_HINT):
            randomise_weights(built.model, calibration=calibration_batch(side))
    config = ModelConfig(built.name, built.weights, built.identity, built.source, side,
                         round(min(side) / built.crop_fraction), crop,
                         tuple(mean or built.mean), tuple(std or built.std),
                         built.interpolation, n_classes, categories, labels_from,
                         built.checkpoint)
    return LoadedModel(built.model.eval(), config)


def _side(built: Built, size: int | None, smallest: bool) -> tuple[int, int]:
    """The input size (h, w): the smallest the model takes, ``--size``, or the source's."""
    if smallest and built.smallest is not None:
        side: tuple[int, int] = (built.smallest, built.smallest)
    elif size is not None:
        side = (size, size)
    else:
        side = built.size
    if built.fixed_size and side != built.size:
        raise UsageError(f"--size: {built.name} takes {built.size[0]}x{built.size[1]} inputs "
                         f"only, not {side[0]}x{side[1]}")
    return side
