"""The saliency methods ``fullgrad eval`` compares, each as ``(model, x, target) -> maps``.

Every method returns (N, H, W) float maps at the input's resolution, larger = more
salient, for the given target classes. fgcli's own methods (FullGrad, SimpleFullGrad,
SmoothFullGrad and FullGrad with each ψ of ``--psi``) come from :mod:`fgcli.engine`.
The baselines come from captum (``pip install "fgcli[eval]"``), a well-kept library,
rather than being re-derived here:

* ``gradient``: |∂f/∂x| summed over colour channels (Simonyan et al. 2014; captum
  ``Saliency``);
* ``input-x-gradient``: |x · ∂f/∂x| summed over channels (captum ``InputXGradient``);
* ``smoothgrad``: ``gradient`` averaged over ``samples`` noisy copies, noise std 0.15 of
  the batch's mean input range (Smilkov et al. 2017; captum ``NoiseTunnel``, one std per
  call), seeded;
* ``integrated-gradients``: |IG| summed over channels, from a black image (black in
  image space), 32 steps (Sundararajan et al. 2017; captum ``IntegratedGradients``);
* ``gradcam``: Grad-CAM (Selvaraju et al. 2017), ReLU'd, bilinearly upsampled, on the
  last module of FullGrad's map whose output is a per-image grid in one of the engine's
  layouts (channels-first, channels-last or tokens), so that it works on CNNs, ConvNeXt /
  Swin-style and ViT models alike (written here: captum's ``LayerGradCam`` wants channels
  in dim 1);
* ``random``: seeded uniform noise, the floor every method should beat.

Signed attributions are ranked by magnitude (abs), as the perturbation metrics remove
"least important" pixels whatever the sign.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fgcli.errors import SetupError
from fgcli.models.outputs import extract_logits

# name -> what it is (for --help and errors); order = the report's order
FGCLI_METHODS = {
    "fullgrad": "FullGrad, psi abs-rescale (the paper's)",
    "fullgrad-signed": "FullGrad, psi signed",
    "fullgrad-abs": "FullGrad, psi abs",
    "fullgrad-positive": "FullGrad, psi positive",
    "simple": "SimpleFullGrad",
    "smooth": "SmoothFullGrad",
}
BASELINES = {
    "gradient": "input gradient (captum Saliency)",
    "input-x-gradient": "input x gradient (captum)",
    "smoothgrad": "SmoothGrad (captum NoiseTunnel)",
    "integrated-gradients": "Integrated Gradients from black (captum)",
    "gradcam": "Grad-CAM on the last spatial layer",
    "random": "seeded random map",
}
ALL_METHODS = {**FGCLI_METHODS, **BASELINES}

Method = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def parse_methods(text: str | None) -> list[str]:
    """``--methods a,b`` (default: every method); unknown names are one clear error."""
    if text is None or text.strip().lower() == "all":
        return list(ALL_METHODS)
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_METHODS]
    if unknown or not names:
        raise ValueError(f"--methods: unknown method {unknown[0] if unknown else text!r}; "
                         f"choose from {', '.join(ALL_METHODS)}")
    return list(dict.fromkeys(names))


def build(name: str, model: torch.nn.Module, *, samples: int, seed: int,
          mean: tuple[float, ...], std: tuple[float, ...], psi_layers: Any = None) -> Method:
    """The method ``name`` for ``model``. ``mean``/``std``: the input's normalisation
    (black for Integrated Gradients' baseline). ``psi_layers``: ``--layers`` for fgcli's
    methods."""
    if name in FGCLI_METHODS:
        return _fgcli(name, model, samples, seed, psi_layers)
    if name == "random":
        return _random(seed)
    if name == "gradcam":
        return _gradcam(model)
    return _captum(name, model, samples, seed, mean, std)


def _fgcli(name: str, model: torch.nn.Module, samples: int, seed: int, layers: Any) -> Method:
    """One of :data:`FGCLI_METHODS`: the engine's method (``fullgrad-PSI``: FullGrad with
    that ψ), built by :func:`fgcli.engine.build`."""
    from fgcli.engine import build as build_engine

    base, _, psi = name.partition("-")
    engine = build_engine(base, model, psi=psi or "abs-rescale", layers=layers,
                          samples=samples, seed=seed)

    def run(_: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return engine.saliency(x, target)[:, 0].float()

    return run


def _random(seed: int) -> Method:
    def run(_: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed + int(target.sum().item()))
        return torch.rand(x.shape[0], x.shape[2], x.shape[3], generator=g).to(x.device)

    return run


def _as_nchw(t: torch.Tensor, layout: Any) -> torch.Tensor:
    """A layer output in one of the engine's layouts as (N, C, h, w)."""
    if layout.kind == "nchw":
        return t
    if layout.kind == "nhwc":
        return t.permute(0, 3, 1, 2)
    h, w = layout.grid  # tokens (N, L, C), after any class token
    tokens = t[:, layout.skip:, :]
    return tokens.reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)


def last_spatial_module(model: torch.nn.Module, x: torch.Tensor) -> tuple[str, Any]:
    """The module path and output layout of the last module, in forward order, whose
    output is an image grid in one of the engine's layouts (``nchw``, ``nhwc``, or
    ``tokens`` with the batch first), among the modules of FullGrad's map layers.
    Windowed layers (batch merged with windows) are skipped: no per-image grid."""
    from fgcli.engine import FullGrad
    from fgcli.engine.layout import layout_of

    layers = FullGrad(model).explain(x[:1]).layers
    candidates = list(dict.fromkeys(info.module for info in layers if info.in_map))
    outputs: dict[str, Any] = {}
    handles = []
    for name in candidates:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue

        def keep(_m: Any, _i: Any, out: Any, name: str = name) -> None:
            if isinstance(out, torch.Tensor):
                outputs[name] = layout_of(tuple(out.shape), 1, x.shape[2], x.shape[3])

        handles.append(module.register_forward_hook(keep))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    for name in reversed(candidates):
        layout = outputs.get(name)
        if layout is not None and layout.kind in ("nchw", "nhwc", "tokens") \
                and layout.batch == "lead" and layout.grid[0] * layout.grid[1] > 1:
            return name, layout  # (a 1 x 1 grid, e.g. after global pooling, says nothing)
    raise SetupError("gradcam: no module of the map outputs a per-image grid (N, C, h, w), "
                     "(N, h, w, C) or (N, tokens, C)")


def _gradcam(model: torch.nn.Module) -> Method:
    """Grad-CAM on the layer :func:`last_spatial_module` finds: the layer's output weighted
    by its spatially averaged gradient, summed over channels, ReLU'd, bilinearly upsampled.
    Written here rather than taken from captum: captum's LayerGradCam expects channels in
    dim 1, and fgcli's models also have channels-last and token layers."""
    cache: dict[str, Any] = {}

    def run(_: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if "layer" not in cache:
            cache["layer"] = last_spatial_module(model, x)
        name, layout = cache["layer"]
        seen: dict[str, torch.Tensor] = {}

        def keep(_m: Any, _i: Any, out: Any) -> None:
            seen["out"] = out

        handle = model.get_submodule(name).register_forward_hook(keep)
        try:
            with torch.enable_grad():  # frozen parameters: the graph hangs on the input
                logits = extract_logits(model(x.detach().requires_grad_(True)))
                act = seen["out"]
                picked = logits.gather(1, target[:, None]).sum()
                (grad,) = torch.autograd.grad(picked, act)
        finally:
            handle.remove()
        a, g = _as_nchw(act.detach(), layout), _as_nchw(grad, layout)
        cam = F.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True)).float()
        return F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]

    return run


def _captum(name: str, model: torch.nn.Module, samples: int, seed: int,
            mean: tuple[float, ...], std: tuple[float, ...]) -> Method:
    try:
        from captum import attr
    except ImportError as exc:
        raise SetupError(f"--methods {name}: the baselines need captum: "
                         'pip install "fgcli[eval]"') from exc

    def channels(a: torch.Tensor) -> torch.Tensor:
        return a.detach().abs().sum(1).float()

    def black(x: torch.Tensor) -> torch.Tensor:
        m = torch.tensor(mean, dtype=x.dtype, device=x.device)[None, :, None, None]
        s = torch.tensor(std, dtype=x.dtype, device=x.device)[None, :, None, None]
        return ((0.0 - m) / s).expand_as(x).contiguous()

    if name == "gradient":
        method = attr.Saliency(model)

        def run(_: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return channels(method.attribute(x.clone().requires_grad_(True), target=target,
                                             abs=True))
    elif name == "input-x-gradient":
        method = attr.InputXGradient(model)

        def run(_: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return channels(method.attribute(x.clone().requires_grad_(True), target=target))
    elif name == "smoothgrad":
        tunnel = attr.NoiseTunnel(attr.Saliency(model))

        def run(_: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            span = (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).mean().item()
            torch.manual_seed(seed)
            return channels(tunnel.attribute(
                x.clone().requires_grad_(True), nt_type="smoothgrad", nt_samples=samples,
                nt_samples_batch_size=max(1, min(samples, 8)), stdevs=0.15 * span,
                target=target, abs=True))
    elif name == "integrated-gradients":
        method = attr.IntegratedGradients(model)

        def run(_: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return channels(method.attribute(x, baselines=black(x), target=target, n_steps=32,
                                             internal_batch_size=max(1, len(x)) * 8))
    else:  # pragma: no cover - parse_methods only lets known names through
        raise ValueError(f"unknown method {name!r}")
    return run
