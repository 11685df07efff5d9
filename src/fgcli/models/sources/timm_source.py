"""timm models: ``--model timm/NAME`` (``pip install "fgcli[timm]"``).

``NAME`` is any of ``timm.list_models()``, with or without a pretrained tag
(``convnext_tiny`` or ``convnext_tiny.fb_in1k``). Preprocessing comes from timm's
pretrained config of that tag (input size, mean / std, interpolation, crop fraction),
class names for ImageNet heads from timm's own dataset info
(``timm.data.ImageNetInfo``). ``--weights``: ``DEFAULT`` = the tag's pretrained
weights from the Hugging Face cache or the hub; a local checkpoint (timm's training
checkpoints with ``state_dict`` / ``state_dict_ema``, ``.safetensors``, any container
:mod:`fgcli.models.sources.checkpoint` reads; a different head size builds the model with
that many classes); ``none`` (timm's initialisation); ``random``.

A model built for a fixed input size (ViTs and relatives) is built at ``--size`` when
one is given (``img_size``), as timm does for fine-tuning at another resolution.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
from pathlib import Path
from typing import Any

from torch import nn

from fgcli.errors import SetupError, UsageError
from fgcli.models.base import Built, head_size
from fgcli.models.sources import checkpoint as ckpt
from fgcli.models.sources import register_source


def _timm() -> Any:
    try:
        import timm
    except ImportError as exc:
        raise SetupError("--model timm/...: timm is not installed; pip install "
                         "\"fgcli[timm]\"") from exc
    return timm


def check_name(name: str) -> str:
    """``name`` if timm knows the architecture (a pretrained tag may follow a dot)."""
    timm = _timm()
    arch, _, tag = name.partition(".")
    if timm.is_model(arch) and (not tag or name in timm.list_models(arch, pretrained=True)):
        return name
    if timm.is_model(arch):
        tags = [n.partition(".")[2] for n in timm.list_models(arch, pretrained=True)]
        raise UsageError(f"--model timm/{name}: {arch} has no pretrained tag {tag!r}; "
                         f"tags: {', '.join(tags) or 'none'}")
    close = difflib.get_close_matches(arch, timm.list_models(), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join('timm/' + c for c in close)}?" if close else \
        "; see `fullgrad models 'timm/*'`"
    raise UsageError(f"--model: timm has no model {arch!r}{hint}")


def list_names(pattern: str) -> list[str]:
    """timm's architectures matching a shell pattern or substring; names with a tag
    (``*.fb_in1k``) list pretrained weights instead."""
    timm = _timm()
    pretrained = "." in pattern
    if not any(ch in pattern for ch in "*?["):
        pattern = f"*{pattern}*"
    names = timm.list_models(pretrained=pretrained) if pretrained else timm.list_models()
    return [n for n in names if fnmatch.fnmatch(n, pattern)]


def default_input_size(name: str) -> int | None:
    """The input side of a timm model's default pretrained config, without building it."""
    timm = _timm()
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - no config registered for it
        return None
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    return int(size[-1]) if size else None


def _create(name: str, kwargs: dict[str, Any], **extra: Any) -> nn.Module:
    timm = _timm()
    try:
        return timm.create_model(name, **{**extra, **kwargs})
    except TypeError as exc:
        raise UsageError(f"--model-arg: timm/{name} does not take these arguments "
                         f"({ckpt._first_line(exc)})") from exc


def _class_names(model: nn.Module, n_classes: int | None) -> tuple[str, ...] | None:
    """ImageNet class descriptions from timm's dataset info, when the head is ImageNet's."""
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if not subset:
            return None
        info = ImageNetInfo(subset)
        if info.num_classes() != n_classes:
            return None
        return tuple(info.index_to_description(i) for i in range(n_classes))
    except Exception:  # noqa: BLE001 - older timm, or no info for this head
        return None


def _offline_message(name: str, reason: str) -> str:
    return (f"--weights DEFAULT: cannot load timm's pretrained weights for {name} ({reason}); "
            "offline? Use --weights PATH for a local checkpoint, or --weights none")


def _hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face endpoint answers on its port (one quick connection)."""
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        endpoint = urlparse(constants.ENDPOINT)
    except Exception:  # noqa: BLE001 - no hub client: timm downloads by URL
        return True
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline():
    """The Hugging Face client in offline mode for one call: the cache only, no requests."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _pretrained(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """timm's pretrained weights: from the cache when they are there (no network at all),
    else downloaded; unreachable hub: one line, at once (not the client's retry loop)."""
    try:
        with _hub_offline():
            return _create(name, kwargs, pretrained=True)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - not cached (or a cache error): try the hub
        cached_error = exc
    if not _hub_reachable():
        raise SetupError(_offline_message(name, "not in the local cache and the hub cannot "
                                                "be reached")) from cached_error
    try:
        return _create(name, kwargs, pretrained=True)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub / network / hash errors of all kinds
        raise SetupError(_offline_message(name, f"{type(exc).__name__}: "
                                                f"{ckpt._first_line(exc)}")) from exc


def _claims(spec: str) -> bool:
    return spec.strip().startswith("timm/")


@register_source("timm", claims=_claims)
def load(name: str, weights: str, *, model_args: dict[str, Any] | None = None,
         trust_pickle: bool = False, size: int | None = None) -> Built:
    """Build ``timm/name`` (the ``timm/`` prefix is optional) with ``weights`` (see the
    module docstring)."""
    name = name.strip().removeprefix("timm/")
    timm = _timm()
    name = check_name(name)
    kwargs = dict(model_args or {})
    spec = weights.strip()
    probe = _create(name, kwargs, pretrained=False)
    fixed = bool(getattr(probe, "pretrained_cfg", {}).get("fixed_input_size", False))
    if fixed and size is not None and "img_size" not in kwargs:
        kwargs["img_size"] = size
        probe = _create(name, kwargs, pretrained=False)
    checkpoint = None
    if spec.upper() == "DEFAULT":
        if not timm.list_models(name.partition(".")[0], pretrained=True):
            raise SetupError(f"--weights DEFAULT: timm has no pretrained weights for {name}; "
                             "use --weights PATH for a local checkpoint, none or random")
        model = _pretrained(name, kwargs)
        tag = getattr(model, "pretrained_cfg", {}).get("tag")
        label = f"timm pretrained {name if '.' in name or not tag else f'{name}.{tag}'}"
        identity = f"timm:{label}"
    elif spec.lower() in ("none", "random"):
        model = probe
        if spec.lower() == "none":
            label, identity = "none (timm's initialisation)", "none"
        else:
            label = "random (seeded, non-trivial biases and norm statistics)"
            identity = "random"
    else:
        path = Path(spec).expanduser()
        found = ckpt.read_checkpoint(path, trust_pickle=trust_pickle)
        arch = f"timm/{name}"
        fitted = ckpt.fit(found, probe.state_dict(), arch)
        classes = ckpt.head_classes(fitted.state, probe.state_dict(), head_size(probe))
        model = probe
        if classes is not None and "num_classes" not in kwargs:
            model = _create(name, kwargs, pretrained=False, num_classes=classes)
        ckpt.load_into(model, fitted.state, arch, path)
        label = str(path)
        identity = f"file:{ckpt.file_identity(path)}"
        checkpoint = ckpt.describe(found, fitted)
    if size is not None:  # a model built for another size may still refuse it
        from fgcli.models.sources.usercode import probe

        probe(model, (size, size), f"timm/{name}")
    config = timm.data.resolve_model_data_config(model)
    _, height, width = config["input_size"]
    if isinstance(kwargs.get("img_size"), int):  # built for another size than its config's
        height = width = kwargs["img_size"]
    n_classes = head_size(model)
    categories = _class_names(model, n_classes)
    interpolation = str(config.get("interpolation", "bilinear"))
    return Built(
        name=f"timm/{name}", model=model, weights=label, identity=identity, source="timm",
        categories=categories,
        labels_from=f"timm ImageNet info ({n_classes} classes)" if categories else None,
        size=(int(height), int(width)),
        crop_fraction=float(config.get("crop_pct", 0.875) or 0.875),
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
        interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bilinear",
        fixed_size=fixed, checkpoint=checkpoint, randomise=spec.lower() == "random")
