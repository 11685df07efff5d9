"""torchvision classifiers: ``--model resnet50``, with torchvision's weights or a checkpoint.

A checkpoint's class count comes from its classifier (``fc.weight`` of a 7-class
fine-tune leads with 7): the architecture is built with that many classes through
the builder's own ``num_classes``, which also sizes auxiliary heads (Inception v3,
GoogLeNet) and transformer heads (ViT, Swin, MaxViT). A checkpoint without the
auxiliary heads (fine-tuned with ``aux_logits=False``) builds the model without them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torchvision
from torch import nn

from fgcli.errors import SetupError, UsageError
from fgcli.models.base import (
    WEIGHT_FILE_SUFFIXES,
    Built,
    check_model_name,
    default_weights,
    head_size,
    input_size,
    smallest_input_size,
)
from fgcli.models.sources import checkpoint as ckpt
from fgcli.models.sources import register_source

# auxiliary classifiers that a fine-tuned checkpoint may have dropped (aux_logits=False)
_AUX_PREFIXES = {"inception_v3": ("AuxLogits.",), "googlenet": ("aux1.", "aux2.")}


def looks_like_file(spec: str) -> bool:
    """A ``--weights`` value that names a file rather than torchvision weights (a weights
    name such as ``DEFAULT`` or ``IMAGENET1K_V1`` stays a name even if a file of that
    name lies in the working directory)."""
    if re.fullmatch(r"(\w+_Weights\.)?[A-Z0-9_]+", spec):
        return False
    return ("/" in spec or "\\" in spec or spec.startswith((".", "~"))
            or spec.lower().endswith(WEIGHT_FILE_SUFFIXES) or Path(spec).exists())


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
                         "a file, none or random") from exc


def _build(name: str, kwargs: dict[str, Any], **extra: Any) -> nn.Module:
    try:
        return torchvision.models.get_model(name, **{**extra, **kwargs})
    except TypeError as exc:  # an unknown --model-arg keyword
        raise UsageError(f"--model-arg: {name} does not take these arguments "
                         f"({ckpt._first_line(exc)})") from exc
    except ValueError as exc:  # e.g. num_classes that contradicts named weights
        raise UsageError(f"--model {name}: {ckpt._first_line(exc)}") from exc


def _metadata(built: dict[str, Any], meta: Any, n_classes: int | None) -> None:
    """Preprocessing (and class names, when the head fits them) from a weights enum
    (``n_classes`` None: preprocessing only)."""
    t = meta.transforms()
    crop = int(getattr(t, "crop_size", [built["size"][0]])[0])
    resize = int(getattr(t, "resize_size", [0])[0]) or round(crop * 256 / 224)
    built.update(size=(crop, crop), crop_fraction=crop / resize,
                 mean=tuple(getattr(t, "mean", built["mean"])),
                 std=tuple(getattr(t, "std", built["std"])),
                 interpolation=getattr(getattr(t, "interpolation", None), "value", "bilinear"))
    categories = tuple(meta.meta.get("categories") or ())
    if categories and n_classes is not None and len(categories) == n_classes:
        built.update(categories=categories, labels_from=f"torchvision weights metadata "
                                                        f"({meta})")


@register_source("torchvision")  # the fallback: every --model value no other source claims
def load(name: str, weights: str, *, model_args: dict[str, Any] | None = None,
         trust_pickle: bool = False, size: int | None = None) -> Built:
    """Build torchvision's ``name`` with ``weights`` (see :mod:`fgcli.models.base`)."""
    name = check_model_name(name)
    kwargs = dict(model_args or {})
    spec = weights.strip()
    fixed = name.startswith("vit_")
    out: dict[str, Any] = {"size": (input_size(name),) * 2, "mean": Built.mean,
                           "std": Built.std}
    meta = default_weights(name)  # metadata only: nothing is downloaded
    if spec.lower() in ("none", "random"):
        extra: dict[str, Any] = {}
        if name in _AUX_PREFIXES and "init_weights" not in kwargs:
            # say which initialisation (torchvision warns otherwise): its own for none,
            # none at all for random (every weight is drawn again)
            extra["init_weights"] = spec.lower() == "none"
        model = _build(name, kwargs, weights=None, **extra)
        if spec.lower() == "none":
            label, identity = "none (random initialisation)", "none"
        else:
            label = "random (seeded, non-trivial biases and norm statistics)"
            identity = "random"
        out["randomise"] = spec.lower() == "random"
    elif looks_like_file(spec):
        model, label, identity, info = _from_file(name, Path(spec).expanduser(), kwargs,
                                                  trust_pickle)
        out["checkpoint"] = info
    else:
        member = _resolve_enum(name, spec)
        try:
            model = _build(name, kwargs, weights=member)
        except UsageError:  # a bad --model-arg: not a download problem
            raise
        except Exception as exc:  # noqa: BLE001 - URLError, HTTP errors, hash mismatch...
            raise SetupError(
                f"--weights {spec}: cannot load {member} ({ckpt._first_line(exc)}); offline? "
                "Use --weights PATH for a local checkpoint, or --weights none") from exc
        label = identity = str(member)
        meta = member
    if meta is not None:  # class names only for trained weights
        _metadata(out, meta, None if spec.lower() in ("none", "random") else head_size(model))
    image_size = getattr(model, "image_size", None)  # a ViT's size is fixed when built
    if isinstance(image_size, int):
        out["size"] = (image_size, image_size)
    return Built(name=name, model=model, weights=label, identity=identity, source="torchvision",
                 smallest=smallest_input_size(name, model), fixed_size=fixed, **out)


def _from_file(name: str, path: Path, kwargs: dict[str, Any], trust_pickle: bool
               ) -> tuple[nn.Module, str, str, dict[str, Any]]:
    """The architecture with a checkpoint's weights, its head sized by the checkpoint."""
    found = ckpt.read_checkpoint(path, trust_pickle=trust_pickle)
    model = _build(name, kwargs, weights=None)
    fitted = ckpt.fit(found, model.state_dict(), name)
    extra: dict[str, Any] = {}
    aux = _AUX_PREFIXES.get(name, ())
    if aux and "aux_logits" not in kwargs and not any(
            k.startswith(aux) for k in fitted.state):
        extra["aux_logits"] = False  # fine-tuned without its auxiliary heads
    if name in _AUX_PREFIXES and "init_weights" not in kwargs:
        extra["init_weights"] = False  # every weight comes from the file: skip scipy's init
    classes = ckpt.head_classes(fitted.state, model.state_dict(), head_size(model))
    if classes is not None and "num_classes" not in kwargs:
        extra["num_classes"] = classes
    if extra:
        model = _build(name, kwargs, weights=None, **extra)
    ckpt.load_into(model, fitted.state, name, path)
    return model, str(path), f"file:{ckpt.file_identity(path)}", ckpt.describe(found, fitted)
