"""Faithfulness metrics for saliency maps: small, exact, batched, deterministic.

* :func:`pixel_perturbation` — Srinivas & Fleuret (NeurIPS 2019), section 5.1: remove the
  k % *least* salient pixels, measure ``|f(x') - f(x)| / |f(x)|`` of the clean class's
  logit. Lower is better.
* :func:`deletion_auc` — Petsiuk et al. (BMVC 2018, RISE): remove the *most* salient pixels
  first; area under the softmax probability of the clean class. Lower is better.
* :func:`insertion_auc` — Petsiuk et al.: insert the most salient pixels first into a
  blurred copy; area under the same probability. Higher is better.

Conventions shared by all three:

* ``x`` is the model's input ``(N, 3, H, W)``, already normalised; :class:`Normalisation`
  maps it to image space ``[0, 1]`` and back. "Black" is 0 in image space, i.e.
  ``(0 - mean) / std`` in model space; a removed pixel is set to black in all three
  channels. Pixels that are not removed are passed through bit for bit.
* ``saliency`` is ``(N, H, W)`` or ``(N, 1, H, W)`` at the input resolution (resize other
  maps first). Pixels are ordered by saliency with a stable sort on the row-major
  (``h * W + w``) index: among equal saliencies the lower index is removed / inserted first.
* Removing "k %" of ``n = H * W`` pixels removes ``floor(k * n / 100 + 1/2)`` of them
  (nearest integer, halves up); curve step ``t`` of ``steps`` covers
  ``floor(t * n / steps + 1/2)`` pixels (:func:`step_counts`).
* ``target``: ``None`` = the clean top-1 class (first maximal logit); otherwise an int
  (every image) or one class index per image.
* The model must return logits ``(N, classes)``. It runs in eval mode under
  ``torch.no_grad()``; every submodule's ``training`` flag is restored afterwards. All
  perturbed copies go through the model in chunks of at most ``max_batch`` images, so memory
  is bounded whatever the number of k's or steps. Everything runs on ``x``'s device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "IMAGENET",
    "Normalisation",
    "curve_fractions",
    "deletion_auc",
    "gaussian_blur",
    "insertion_auc",
    "pixel_perturbation",
    "step_counts",
]

#: Blur of the insertion metric's starting image, as in RISE's code (``gkern(11, 5)``).
BLUR_KERNEL = 11
BLUR_SIGMA = 5.0

Target = int | Sequence[int] | torch.Tensor | None


@dataclass(frozen=True)
class Normalisation:
    """Per-channel normalisation ``x = (image - mean) / std`` of the model's input."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            value = getattr(self, name)
            try:
                value = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"normalisation {name} must be 3 numbers, got {value!r}") from None
            if len(value) != 3 or not all(math.isfinite(v) for v in value):
                raise ValueError(f"normalisation {name} must be 3 finite numbers, got {value!r}")
            object.__setattr__(self, name, value)
        if not all(s > 0 for s in self.std):
            raise ValueError(f"normalisation std must be positive, got {self.std!r}")

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kw = {"dtype": like.dtype, "device": like.device}
        return (torch.tensor(self.mean, **kw).view(1, 3, 1, 1),
                torch.tensor(self.std, **kw).view(1, 3, 1, 1))

    def to_image(self, x: torch.Tensor) -> torch.Tensor:
        """Model input ``(N, 3, H, W)`` -> image space (``[0, 1]`` for in-range images)."""
        mean, std = self._stats(x)
        return x * std + mean

    def to_model(self, image: torch.Tensor) -> torch.Tensor:
        """Image space ``(N, 3, H, W)`` -> model input."""
        mean, std = self._stats(image)
        return (image - mean) / std

    def black(self, like: torch.Tensor) -> torch.Tensor:
        """Black (0 in image space) in model space, shape ``(1, 3, 1, 1)``, ``like``'s
        dtype and device."""
        mean, std = self._stats(like)
        return (0 - mean) / std


#: torchvision's ImageNet normalisation.
IMAGENET = Normalisation(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


# ---------------------------------------------------------------------------- helpers


def step_counts(n_pixels: int, steps: int) -> list[int]:
    """Pixels covered at each of the ``steps + 1`` curve points: ``floor(t * n / steps +
    1/2)`` for ``t = 0..steps`` (0 and ``n`` at the endpoints)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return [(2 * t * n_pixels + steps) // (2 * steps) for t in range(steps + 1)]


def curve_fractions(steps: int, height: int, width: int) -> torch.Tensor:
    """The x-axis of the deletion / insertion curves: fraction of pixels removed or inserted
    at each point, ``(steps + 1,)`` float64 from 0 to 1."""
    n = height * width
    return torch.tensor(step_counts(n, steps), dtype=torch.float64) / n


def gaussian_blur(image: torch.Tensor, kernel: int = BLUR_KERNEL,
                  sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, C, H, W)``: weights ``exp(-d^2 / (2 sigma^2))`` for
    ``d = -(kernel // 2)..kernel // 2``, normalised to sum 1, edges replicated (so borders
    are not darkened). The kernel sums to 1, so blurring commutes with the per-channel
    normalisation: the result is the same in image and in model space."""
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"blur kernel must be an odd integer >= 1, got {kernel!r}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"blur sigma must be a positive number, got {sigma!r}")
    r = kernel // 2
    d = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-(d * d) / (2.0 * float(sigma) ** 2))
    g = (g / g.sum()).to(dtype=image.dtype, device=image.device)
    n, c, h, w = image.shape
    out = nn.functional.pad(image.reshape(n * c, 1, h, w), (r, r, r, r), mode="replicate")
    out = nn.functional.conv2d(out, g.view(1, 1, 1, -1))
    out = nn.functional.conv2d(out, g.view(1, 1, -1, 1))
    return out.reshape(n, c, h, w)


def _check_inputs(x: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
    """Validate shapes; return the saliency flattened to ``(N, H * W)`` on ``x``'s device."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a (N, 3, H, W) tensor, got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    n, _, h, w = x.shape
    if n == 0 or h * w == 0:
        raise ValueError(f"x must hold at least one image of at least one pixel, got "
                         f"{tuple(x.shape)}")
    if not isinstance(saliency, torch.Tensor):
        saliency = torch.as_tensor(saliency)
    sal = saliency
    if sal.dim() == 4 and sal.shape[1] == 1:
        sal = sal[:, 0]
    if sal.dim() != 3 or tuple(sal.shape) != (n, h, w):
        raise ValueError(f"saliency must be ({n}, {h}, {w}) or ({n}, 1, {h}, {w}) to match x "
                         f"{tuple(x.shape)}, got {tuple(saliency.shape)}")
    if sal.is_complex() or sal.dtype == torch.bool:
        raise ValueError(f"saliency must be real numbers, got {sal.dtype}")
    if sal.is_floating_point() and not bool(torch.isfinite(sal).all()):
        raise ValueError("saliency holds NaN or infinite values")
    return sal.reshape(n, h * w).to(x.device)


def _ranks(sal: torch.Tensor, most_salient_first: bool) -> torch.Tensor:
    """``rank[i, p]`` = position of pixel ``p`` in image ``i``'s removal order (stable:
    ties keep the row-major order)."""
    order = torch.argsort(sal, dim=1, descending=most_salient_first, stable=True)
    rank = torch.empty_like(order)
    pos = torch.arange(sal.shape[1], device=sal.device).expand_as(order)
    return rank.scatter_(1, order, pos)


def _check_max_batch(max_batch: int) -> None:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")


def _forward(model: nn.Module, batch: torch.Tensor, expected: int) -> torch.Tensor:
    out = model(batch)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != expected:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must return logits of shape ({expected}, classes), "
                         f"got {shape}")
    return out


def _targets(target: Target, clean: torch.Tensor) -> torch.Tensor:
    n, classes = clean.shape
    if target is None:
        return clean.argmax(dim=1)
    if isinstance(target, int) and not isinstance(target, bool):
        t = torch.full((n,), target, dtype=torch.long, device=clean.device)
    else:
        t = torch.as_tensor(target, device=clean.device)
        if t.dim() == 0:
            t = t.expand(n)
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise ValueError(f"target must be integer class indices, got {t.dtype}")
        if tuple(t.shape) != (n,):
            raise ValueError(f"target must be one class index per image ({n}), got shape "
                             f"{tuple(t.shape)}")
        t = t.long()
    if n and (int(t.min()) < 0 or int(t.max()) >= classes):
        raise ValueError(f"target class out of range [0, {classes}): {t.tolist()}")
    return t


class _EvalMode:
    """``model.eval()`` and ``torch.no_grad()`` for the block; every submodule's training
    flag restored afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.no_grad = torch.no_grad()

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.no_grad.__exit__(*exc)
        for m, flag in self.flags:
            m.training = flag


def _clean_logits(model: nn.Module, x: torch.Tensor, max_batch: int) -> torch.Tensor:
    n = x.shape[0]
    parts = [_forward(model, x[s:s + max_batch], min(max_batch, n - s))
             for s in range(0, n, max_batch)]
    return torch.cat(parts)


def _perturbed_outputs(model: nn.Module, base: torch.Tensor, fill: torch.Tensor,
                       rank: torch.Tensor, counts: Sequence[int], target: torch.Tensor,
                       max_batch: int, read: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                       ) -> torch.Tensor:
    """For every image ``i`` and count ``c = counts[j]``: the image ``base[i]`` with its
    first ``c`` pixels in removal order (``rank[i] < c``) replaced by ``fill`` (``(1, 3, 1,
    1)`` or ``(N, 3, H, W)``), through the model in chunks of at most ``max_batch``; returns
    ``read(logits, target)`` per copy as ``(N, len(counts))``."""
    n, _, h, w = base.shape
    n_counts = len(counts)
    counts_t = torch.tensor(list(counts), dtype=rank.dtype, device=rank.device)
    per_image_fill = fill.shape[0] != 1
    total = n * n_counts
    parts = []
    for s in range(0, total, max_batch):
        job = torch.arange(s, min(s + max_batch, total), device=base.device)
        img, step = job // n_counts, job % n_counts
        mask = (rank[img] < counts_t[step].unsqueeze(1)).view(-1, 1, h, w)
        batch = torch.where(mask, fill[img] if per_image_fill else fill, base[img])
        parts.append(read(_forward(model, batch, job.numel()), target[img]))
    return torch.cat(parts).view(n, n_counts)


def _logit(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, target.unsqueeze(1)).squeeze(1)


def _probability(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)


def _trapezoid_auc(curves: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    fractions = fractions.to(dtype=curves.dtype, device=curves.device)
    return torch.trapezoid(curves, fractions, dim=1)


# ---------------------------------------------------------------------------- metrics


def pixel_perturbation(model: nn.Module, x: torch.Tensor, saliency: torch.Tensor,
                       ks: Sequence[float] = (10, 30, 50, 70, 90), *, norm: Normalisation,
                       target: Target = None, max_batch: int = 64) -> torch.Tensor:
    """Srinivas & Fleuret 2019, section 5.1: for each image and each ``k`` in ``ks`` (percent,
    strictly between 0 and 100), set the ``k`` % *least* salient pixels to black in image
    space and return ``|f(x') - f(x)| / |f(x)|``, ``f`` the logit (pre-softmax) of the clean
    top-1 class (or ``target``), as ``(N, len(ks))``.

    Rewards maps whose low-saliency pixels really do not matter to the output: **lower is
    better** (0 = removing them changes nothing). Where ``f(x) == 0`` the ratio is ``inf``
    (``nan`` if ``f(x')`` is 0 too)."""
    ks = _check_ks(ks)
    sal = _check_inputs(x, saliency)
    _check_max_batch(max_batch)
    n_pixels = x.shape[2] * x.shape[3]
    counts = [math.floor(k * n_pixels / 100 + 0.5) for k in ks]
    rank = _ranks(sal, most_salient_first=False)
    with _EvalMode(model):
        clean = _clean_logits(model, x, max_batch)
        t = _targets(target, clean)
        f = _logit(clean, t)
        perturbed = _perturbed_outputs(model, x, norm.black(x), rank, counts, t, max_batch,
                                       _logit)
    return (perturbed - f.unsqueeze(1)).abs() / f.abs().unsqueeze(1)


def _check_ks(ks: Sequence[float]) -> list[float]:
    try:
        values = list(ks)
    except TypeError:
        raise ValueError(f"ks must be a sequence of percentages, got {ks!r}") from None
    if not values:
        raise ValueError("ks must hold at least one percentage")
    for k in values:
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k < 100:
            raise ValueError(f"k must be a percentage strictly between 0 and 100, got {k!r}")
    return [float(k) for k in values]


def deletion_auc(model: nn.Module, x: torch.Tensor, saliency: torch.Tensor, *,
                 norm: Normalisation, steps: int = 20, target: Target = None,
                 max_batch: int = 64, return_curves: bool = False
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Petsiuk et al. 2018 (RISE) deletion: set the *most* salient pixels to black in image
    space, ``step_counts(H * W, steps)`` of them at the ``steps + 1`` points (0 % to 100 %,
    both included); the curve is the softmax probability of the clean top-1 class (or
    ``target``); the AUC is its trapezoidal area over the removed fraction in ``[0, 1]``
    (:func:`curve_fractions`). Returns the AUCs ``(N,)``, and with ``return_curves`` also the
    curves ``(N, steps + 1)``.

    Rewards maps whose most salient pixels are the ones the prediction needs, so the
    probability falls fast: **lower AUC is better**."""
    return _curve_metric(model, x, saliency, norm=norm, steps=steps, target=target,
                         max_batch=max_batch, return_curves=return_curves, insertion=False,
                         blur_kernel=BLUR_KERNEL, blur_sigma=BLUR_SIGMA)


def insertion_auc(model: nn.Module, x: torch.Tensor, saliency: torch.Tensor, *,
                  norm: Normalisation, steps: int = 20, target: Target = None,
                  max_batch: int = 64, return_curves: bool = False,
                  blur_kernel: int = BLUR_KERNEL, blur_sigma: float = BLUR_SIGMA
                  ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Petsiuk et al. 2018 (RISE) insertion: start from a blurred copy of the image
    (:func:`gaussian_blur`, kernel 11 and sigma 5 as in RISE's code, edges replicated) and
    put back the *most* salient original pixels first, ``step_counts(H * W, steps)`` of them
    at the ``steps + 1`` points (0 % = the blurred image, 100 % = the image); the curve is the
    softmax probability of the clean top-1 class (or ``target``); the AUC is its trapezoidal
    area over the inserted fraction in ``[0, 1]``. Returns the AUCs ``(N,)``, and with
    ``return_curves`` also the curves ``(N, steps + 1)``.

    Rewards maps whose most salient pixels alone bring the prediction back, so the
    probability rises fast: **higher AUC is better**."""
    return _curve_metric(model, x, saliency, norm=norm, steps=steps, target=target,
                         max_batch=max_batch, return_curves=return_curves, insertion=True,
                         blur_kernel=blur_kernel, blur_sigma=blur_sigma)


def _curve_metric(model: nn.Module, x: torch.Tensor, saliency: torch.Tensor, *,
                  norm: Normalisation, steps: int, target: Target, max_batch: int,
                  return_curves: bool, insertion: bool, blur_kernel: int, blur_sigma: float
                  ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    sal = _check_inputs(x, saliency)
    _check_max_batch(max_batch)
    h, w = x.shape[2], x.shape[3]
    counts = step_counts(h * w, steps)
    rank = _ranks(sal, most_salient_first=True)
    if insertion:
        # the original pixels (fill) replace the blurred ones (base) in saliency order
        base = norm.to_model(gaussian_blur(norm.to_image(x), blur_kernel, blur_sigma))
        fill = x
    else:
        base, fill = x, norm.black(x)
    with _EvalMode(model):
        t = _targets(target, _clean_logits(model, x, max_batch))
        curves = _perturbed_outputs(model, base, fill, rank, counts, t, max_batch,
                                    _probability)
    auc = _trapezoid_auc(curves, curve_fractions(steps, h, w))
    return (auc, curves) if return_curves else auc
