"""Load a model from its spec: pick the source by the spec's form, build, place, freeze."""

from __future__ import annotations

from typing import Any

from fgcli.errors import SetupError, UsageError
from fgcli.models.base import (
    LoadedModel,
    calibration_batch,
    Preprocessing,
    head_size,
    randomise_weights,
    read_labels,
    source_of,
)


def load_model(name: str, weights: str = "DEFAULT", *, size: int | None = None,
               smallest: bool = False, crop: bool = False,
               mean: tuple[float, float, float] | None = None,
               std: tuple[float, float, float] | None = None,
               labels: str | None = None, model_args: dict[str, Any] | None = None,
               trust_pickle: bool = False) -> LoadedModel:
    """Resolve ``--model`` / ``--weights`` through the model's source (see the module
    docstring) and apply the command line's overrides.

    size: the input side (default: the source's); smallest: the smallest side the
    built model accepts instead. A model fixed to one input size (ViTs) refuses
    another.
    """
    names = read_labels(labels) if labels is not None else None  # before any slow loading
    source = source_of(name)
    if source == "timm":
        from fgcli.models.sources import timm_source

        built = timm_source.load(name[len("timm/"):], weights, model_args=model_args,
                                 trust_pickle=trust_pickle, size=size)
    elif source in ("code", "pickle"):
        from fgcli.models.sources import usercode

        built = usercode.load(name, weights, model_args=model_args,
                              trust_pickle=trust_pickle, size=size)
    else:
        from fgcli.models.sources import tvision

        built = tvision.load(name, weights, model_args=model_args, trust_pickle=trust_pickle)
    model = built.model
    categories, labels_from = built.categories, built.labels_from
    if names is not None:
        categories, labels_from = names, f"--labels {labels}"
    n_classes = built.num_classes if built.num_classes is not None else head_size(model)
    if n_classes is not None and n_classes < 1:
        raise SetupError(f"--model {name}: the model has no classes (its head has "
                         f"{n_classes} outputs)")
    if categories is not None and n_classes is not None and len(categories) != n_classes:
        where = f"--labels: {labels}" if labels else labels_from
        raise UsageError(f"{where}: {len(categories)} class names for a model "
                         f"with {n_classes} classes")
    if smallest and built.smallest is not None:
        side: tuple[int, int] = (built.smallest, built.smallest)
    elif size is not None:
        side = (size, size)
    else:
        side = built.size
    if built.fixed_size and side != built.size:
        raise UsageError(f"--size: {built.name} takes {built.size[0]}x{built.size[1]} inputs "
                         f"only, not {side[0]}x{side[1]}")
    if built.randomise:  # batch norms calibrated at the size the model will see
        from fgcli.models.sources.usercode import FORWARD_HINT, user_code

        with user_code(f"model {name}", "calibrating random weights", FORWARD_HINT):
            randomise_weights(model, calibration=calibration_batch(side))
    proc = Preprocessing(side, round(min(side) / built.crop_fraction), crop,
                         tuple(mean or built.mean), tuple(std or built.std),
                         built.interpolation)
    return LoadedModel(built.name, model.eval(), built.weights, built.identity, categories,
                       proc, n_classes, built.source, labels_from, built.checkpoint)
