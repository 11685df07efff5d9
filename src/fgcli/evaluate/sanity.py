"""``fullgrad eval --sanity``: the model-parameter randomisation test of Adebayo et al.,
"Sanity checks for saliency maps" (NeurIPS 2018), cascading from the logits down.

A map that explains the model must change when the model's learned weights are replaced
by random ones. The test:

* **What is randomised.** The model's parameterised modules (every module that owns
  parameters itself, ``parameters(recurse=False)``; in practice the leaf layers, plus a
  container's own tensors such as a ViT's class token) that the forward pass calls, in
  reverse order of their first call (recorded with forward pre-hooks on one image, not
  ``named_modules`` order): the logits' layer first. Step ``k`` randomises every module
  from the top down to its cut. A leaf module with ``reset_parameters()`` is
  re-initialised by it (PyTorch's own default init: Kaiming-uniform conv and linear
  weights and uniform biases; BatchNorm / LayerNorm / GroupNorm back to weight 1, bias
  0, and BatchNorm's running mean 0, variance 1, count 0); any other module's own
  parameters are drawn from N(0, σ²), σ the tensor's own standard deviation (its RMS
  when that is 0, 1 for an all-zero tensor). Buffers other than those
  ``reset_parameters()`` resets stay. Modules the forward pass does not call stay.
  Seeded (``--seed``): module ``i`` (from the top, 0 first) is drawn with the seed
  ``20181003 + seed * 1000003 + i`` on the CPU in float32, so a module gets the same
  values at every step, on every device and in every batch (the cascade is cumulative).
* **On a copy.** The caller's model is never written: one deep copy is randomised in
  place step by step and put back from the original after each batch.
* **What is compared.** Each method's map of the randomised model against its map of the
  original model, for the same images and the same target (the original model's clean
  top-1 class, or ``--target``); noisy methods keep their seed, but ``random`` draws a
  new map at each step (seed + step), so its row is the floor (about 0) a map that
  ignores the model would reach if it were redrawn.
* **Metrics** (per image, then mean and standard error over images), both on ``|map|``
  (the ranking every eval metric uses; every method's map but ``fullgrad-signed`` is
  non-negative already): :func:`spearman`, the Spearman rank correlation (Pearson
  correlation of average ranks, ties sharing their mean rank), the one Adebayo et al.
  headline ("rank correlation (absolute value)"); and :func:`ssim`, the structural
  similarity of Wang et al. (2004) of the maps min-max normalised to [0, 1], Gaussian
  window 11, σ 1.5, C1 = 0.01², C2 = 0.03², averaged over the window positions inside
  the map (no padding). A constant map has no ranking: its rank correlation is 0.

Memory: the model, one copy, and the randomised tensors once more on the CPU; per image
only two floats per method and step. Cost: one map per method per step and image, plus
the original's.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fgcli.errors import SetupError
from fgcli.evaluate.summary import Summary, summarise
from fgcli.models.base import forward_with_pre_hooks

SANITY_METRICS = {
    "spearman": "Spearman rank correlation of |map| with the original model's "
                "(Adebayo et al.'s headline metric; 1 = same ranking, 0 = unrelated)",
    "ssim": "SSIM of the min-max normalised |map| with the original's (Gaussian window "
            "11, sigma 1.5)",
}
WINDOW = 11
SIGMA = 1.5
SEED_STRIDE = 1_000_003
SEED_OFFSET = 20_181_003  # not a small seed: a model built after manual_seed(0) would draw
# its first layer with the very values that re-initialise it


# ---------------------------------------------------------------------------- metrics

def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """(N, P) -> (N, P) float64 ranks 1..P of each row, ties sharing their mean rank."""
    values = values.detach().double().cpu()
    out = torch.empty_like(values)
    for i, row in enumerate(values):
        ordered, order = torch.sort(row, stable=True)
        _, group, counts = torch.unique_consecutive(ordered, return_inverse=True,
                                                    return_counts=True)
        last = counts.cumsum(0).double()  # the 1-based rank of each tie group's last value
        out[i, order] = (last - (counts.double() - 1) / 2)[group]
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image (dim 0), the Spearman rank correlation of ``a`` and ``b`` (any shape
    after dim 0): Pearson's correlation of their average ranks; 0 where either is
    constant (no ranking to compare). Float64, on the CPU."""
    ra = average_ranks(a.reshape(len(a), -1))
    rb = average_ranks(b.reshape(len(b), -1))
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    norm = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    dot = (ra * rb).sum(1)
    return torch.where(norm > 0, dot / norm.clamp_min(1e-300), torch.zeros_like(dot))


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> each map scaled to [0, 1] (a constant map becomes 0). Float64, CPU."""
    maps = maps.detach().double().cpu()
    flat = maps.reshape(len(maps), -1)
    lo = flat.amin(1)[:, None, None]
    span = flat.amax(1)[:, None, None] - lo
    return torch.where(span > 0, (maps - lo) / span.clamp_min(1e-300), torch.zeros_like(maps))


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> torch.Tensor:
    """(size, size) float64 Gaussian weights summing to 1."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x.square() / (2 * sigma * sigma))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, size: int = WINDOW,
         sigma: float = SIGMA) -> torch.Tensor:
    """Per image, the mean SSIM (Wang et al. 2004) of (N, H, W) maps ``a`` and ``b``, each
    min-max normalised to [0, 1] first (data range 1): Gaussian-weighted local means,
    variances and covariance over every window position inside the map (no padding);
    C1 = 0.01², C2 = 0.03². A map smaller than the window uses the largest odd window
    that fits. Float64, on the CPU."""
    x, y = minmax(a)[:, None], minmax(b)[:, None]
    size = min(size, x.shape[2], x.shape[3])
    size -= 1 - size % 2
    w = gaussian_window(size, sigma)[None, None]

    def mean(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w)

    mx, my = mean(x), mean(y)
    vx = mean(x * x) - mx.square()
    vy = mean(y * y) - my.square()
    cov = mean(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx.square() + my.square() + c1)
                                                 * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


# ---------------------------------------------------------------------------- the cascade

def parameterised_modules(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """The modules that own parameters themselves and that a forward pass of ``x`` calls,
    in reverse order of their first call (the logits' layer first), with their paths."""
    owners = [(name, m) for name, m in model.named_modules()
              if next(m.parameters(recurse=False), None) is not None]
    first: dict[int, int] = {}

    def called(module: nn.Module, _args: Any) -> None:
        first.setdefault(id(module), len(first))

    forward_with_pre_hooks(model, x, [m for _, m in owners], called)
    used = [(name, m) for name, m in owners if id(m) in first]
    return sorted(used, key=lambda item: first[id(item[1])], reverse=True)


def cut_points(n: int, steps: int) -> list[int]:
    """``steps`` evenly spread counts of modules randomised, 1 (the logits' layer only)
    and ``n`` (all) always included; fewer when ``n`` < ``steps``."""
    if n < 1:
        raise SetupError("--sanity: the model has no parameterised module its forward "
                         "pass calls: nothing to randomise")
    if steps < 2 or n == 1:
        return [n]
    return sorted({math.floor(1 + (n - 1) * i / (steps - 1) + 0.5) for i in range(steps)})


def _normal_like(t: torch.Tensor) -> torch.Tensor:
    """N(0, σ²) float32 CPU values of ``t``'s shape, σ = ``t``'s std (RMS if 0, else 1)."""
    v = t.detach().float().cpu()
    sigma = float(v.std()) if v.numel() > 1 else 0.0
    if not sigma > 0:
        sigma = float(v.square().mean().sqrt()) or 1.0
    return torch.randn(v.shape) * sigma


def fresh_tensors(module: nn.Module, seed: int) -> tuple[dict[str, torch.Tensor], str]:
    """The re-initialised values of ``module``'s own parameters (and of the buffers its
    ``reset_parameters()`` resets), on the CPU, seeded; and how they were drawn
    (``reset_parameters`` or ``normal``). ``module`` itself is not changed."""
    leaf = next(module.children(), None) is None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if leaf and callable(getattr(module, "reset_parameters", None)):
            twin = copy.deepcopy(module).to("cpu", torch.float32)
            with torch.no_grad():
                twin.reset_parameters()
            before = dict(module.named_buffers(recurse=False))
            values = {**{n: p.detach() for n, p in twin.named_parameters(recurse=False)},
                      **{n: b for n, b in twin.named_buffers(recurse=False)
                         if not torch.equal(b.cpu(), before[n].detach().cpu().to(b.dtype))}}
            return values, "reset_parameters"
        return ({n: _normal_like(p) for n, p in module.named_parameters(recurse=False)},
                "normal")


def _assign(module: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy ``values`` into ``module``'s own parameters and buffers of those names."""
    own = {**dict(module.named_parameters(recurse=False)),
           **dict(module.named_buffers(recurse=False))}
    with torch.no_grad():
        for name, value in values.items():
            own[name].copy_(value)


@dataclass
class Cascade:
    """The randomisation of one model: its parameterised modules from the top
    (``order``: paths), how each is re-initialised (``how``), the steps' cuts (``cuts``:
    modules randomised at each step) and the copy (``twin``) that is randomised."""

    model: nn.Module
    order: list[str]
    how: list[str]
    cuts: list[int]
    twin: nn.Module
    fresh: list[dict[str, torch.Tensor]] = field(repr=False)
    done: int = 0  # modules of the twin randomised now

    @classmethod
    def build(cls, model: nn.Module, x: torch.Tensor, steps: int, seed: int) -> Cascade:
        """The cascade of ``model`` (``x``: an input for the one recording forward pass)."""
        modules = parameterised_modules(model, x)
        drawn = [fresh_tensors(m, SEED_OFFSET + seed * SEED_STRIDE + i)
                 for i, (_, m) in enumerate(modules)]
        try:
            twin = copy.deepcopy(model)
        except Exception as exc:  # a user model's own __deepcopy__ or unpicklable state
            raise SetupError(f"--sanity: cannot copy the model to randomise it "
                             f"({type(exc).__name__}: {exc})") from exc
        return cls(model, [n for n, _ in modules], [h for _, h in drawn],
                   cut_points(len(modules), steps), twin, [v for v, _ in drawn])

    def randomise(self, count: int) -> nn.Module:
        """The twin with its top ``count`` modules randomised (cumulative: only the
        modules between the last cut and this one are written)."""
        if count < self.done:
            self.restore()
        for i in range(self.done, count):
            _assign(self.twin.get_submodule(self.order[i]), self.fresh[i])
        self.done = count
        return self.twin

    def restore(self) -> None:
        """The twin back to the original model's values."""
        for name in self.order[:self.done]:
            source = self.model.get_submodule(name)
            _assign(self.twin.get_submodule(name), {
                **{n: p.detach() for n, p in source.named_parameters(recurse=False)},
                **dict(source.named_buffers(recurse=False))})
        self.done = 0

    def label(self, step: int) -> str:
        """The module at step ``step``'s cut (the lowest randomised); the root is '(model)'."""
        return self.order[self.cuts[step] - 1] or "(model)"


# ---------------------------------------------------------------------------- the run

@dataclass
class SanityResult:
    """Per method and metric, one :class:`Summary` column per step (mean and standard
    error over images); the cascade's modules from the top and its cuts."""

    seed: int
    modules: list[tuple[str, str]]  # (path, how it is re-initialised), the logits' first
    cuts: list[int]  # modules randomised at each step
    labels: list[str]  # the module at each step's cut
    results: dict[str, dict[str, Summary]]  # method -> "spearman" / "ssim" -> per step
    seconds: float = 0.0


MethodBuilder = Callable[[str, nn.Module, int], Callable[..., torch.Tensor]]


def compare(original: torch.Tensor, randomised: torch.Tensor) -> np.ndarray:
    """(N, 2) per image: Spearman rank correlation and SSIM of the two (N, H, W) maps'
    absolute values; NaN rows where either map is not finite."""
    out = np.full((len(original), 2), np.nan)
    ok = (torch.isfinite(original.reshape(len(original), -1)).all(1)
          & torch.isfinite(randomised.reshape(len(randomised), -1)).all(1)).cpu()
    rows = torch.nonzero(ok)[:, 0]
    if len(rows):
        a, b = original[rows.to(original.device)].abs(), randomised[rows.to(original.device)].abs()
        out[rows.numpy(), 0] = spearman(a, b).numpy()
        out[rows.numpy(), 1] = ssim(a, b).numpy()
    return out


class SanityTally:
    """Per method, an (images, steps, 2) record of the comparisons so far."""

    def __init__(self, methods: list[str], steps: int) -> None:
        self.steps = steps
        self.values: dict[str, list[np.ndarray]] = {m: [] for m in methods}

    def add(self, method: str, per_step: list[np.ndarray]) -> None:
        """One batch of ``method``: per step an (N, 2) array from :func:`compare`."""
        self.values[method].append(np.stack(per_step, axis=1))

    def summaries(self) -> dict[str, dict[str, Summary]]:
        """Mean and standard error over the images whose maps were finite at every step
        (an image with a non-finite map leaves that method only)."""
        out: dict[str, dict[str, Summary]] = {}
        for method, chunks in self.values.items():
            v = (np.concatenate(chunks) if chunks
                 else np.zeros((0, self.steps, 2)))
            v = v[np.isfinite(v).all(axis=(1, 2))]
            out[method] = {metric: (summarise(v[:, :, j]) if len(v) else
                                    Summary([math.nan] * self.steps, [math.nan] * self.steps, 0))
                           for j, metric in enumerate(SANITY_METRICS)}
        return out


def sanity_batches(model: nn.Module, methods: list[str], build: MethodBuilder,
                   batches: Iterator[tuple[torch.Tensor, torch.Tensor]], *, steps: int,
                   seed: int, on_batch: Callable[[int], None] | None = None) -> SanityResult:
    """The cascading randomisation test of ``model`` for ``methods`` over ``batches`` of
    (input, target classes). ``build(name, model, seed)`` makes a method for a model (as
    eval's registry does); ``random`` is rebuilt with ``seed + step + 1`` at each step,
    every other method keeps ``seed``. ``on_batch(n)`` after each batch of n images."""
    started = time.perf_counter()
    cascade: Cascade | None = None
    tally: SanityTally | None = None
    plain: dict[str, Any] = {}
    stepped: list[dict[str, Any]] = []
    for x, target in batches:
        if cascade is None:
            cascade = Cascade.build(model, x[:1], steps, seed)
            tally = SanityTally(methods, len(cascade.cuts))
            plain = {name: build(name, model, seed) for name in methods}
            stepped = [{name: build(name, cascade.twin, seed + k + 1 if name == "random"
                                    else seed) for name in methods}
                       for k in range(len(cascade.cuts))]
        _one_batch(cascade, tally, plain, stepped, x, target)
        if on_batch:
            on_batch(len(x))
    if cascade is None or tally is None:
        raise SetupError("--sanity: no image to run the sanity check on")
    return SanityResult(seed, list(zip(cascade.order, cascade.how)), cascade.cuts,
                        [cascade.label(k) for k in range(len(cascade.cuts))],
                        tally.summaries(), time.perf_counter() - started)


def _one_batch(cascade: Cascade, tally: SanityTally, plain: dict[str, Any],
               stepped: list[dict[str, Any]], x: torch.Tensor, target: torch.Tensor) -> None:
    """Every method's original map of one batch, then its map at each step, compared."""
    original = {name: _call(name, None, method, cascade.model, x, target)
                for name, method in plain.items()}
    per: dict[str, list[np.ndarray]] = {name: [] for name in plain}
    try:
        for k, count in enumerate(cascade.cuts):
            twin = cascade.randomise(count)
            for name, method in stepped[k].items():
                maps = _call(name, cascade.label(k), method, twin, x, target)
                per[name].append(compare(original[name], maps))
    finally:
        cascade.restore()
    for name, arrays in per.items():
        tally.add(name, arrays)


def _call(name: str, step: str | None, method: Any, model: nn.Module, x: torch.Tensor,
          target: torch.Tensor) -> torch.Tensor:
    """``method(model, x, target)``; a RuntimeError is a one-line SetupError naming the
    method (and the step's cut)."""
    try:
        return method(model, x, target).detach()
    except SetupError:
        raise
    except RuntimeError as exc:
        text = str(exc).strip().splitlines()
        where = f" (randomised down to {step})" if step else ""
        raise SetupError(f"--sanity: {name}{where}: {text[0] if text else exc}") from exc


def run_sanity(cfg: Any, setup: Any, items: list[Any],
               progress: Callable[[int], None] | None = None) -> SanityResult:
    """The sanity check of an eval run: ``setup``'s model and methods' settings over the
    ``items`` eval scored (``setup`` is :class:`fgcli.evaluate.run._Setup`); targets: the
    original model's clean top-1 class or ``cfg.target``'s fixed class."""
    from fgcli.evaluate.methods import build
    from fgcli.models.outputs import extract_logits
    from fgcli.models.sources.usercode import FORWARD_HINT, user_code

    c = setup.loaded.config

    def make(name: str, model: nn.Module, seed: int) -> Any:
        return build(name, model, samples=cfg.samples, seed=seed, mean=tuple(c.mean),
                     std=tuple(c.std), psi_layers=setup.layers)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in setup.batches(items, lambda _path, _reason: None):
            if batch.x is None:
                continue
            x = batch.x.to(setup.device)
            with torch.no_grad():
                logits = extract_logits(setup.model(x))
            yield x, (logits.argmax(1) if setup.fixed is None else torch.full(
                (len(x),), setup.fixed, dtype=torch.long, device=x.device))

    with user_code(f"model {cfg.spec.model}", "computing a batch", FORWARD_HINT):
        return sanity_batches(setup.model, list(cfg.methods), make, batches(),
                              steps=cfg.sanity_steps, seed=cfg.seed, on_batch=progress)


# ---------------------------------------------------------------------------- the report

def as_json(s: SanityResult) -> dict[str, Any]:
    """``eval.json``'s ``sanity`` key: settings, the cascade, and per method a list of
    steps, each with its cut and the mean and standard error of each metric."""
    steps = [{"step": k + 1, "randomised": cut, "module": label}
             for k, (cut, label) in enumerate(zip(s.cuts, s.labels))]
    return {
        "what": "cascading model-parameter randomisation (Adebayo et al. 2018), from the "
                "logits down; each step compares the randomised model's maps with the "
                "original's",
        "seed": s.seed,
        "metrics": dict(SANITY_METRICS),
        "modules": [{"module": name or "(model)", "init": how} for name, how in s.modules],
        "steps": steps,
        "methods": {method: [{**step, "n": per["spearman"].n,
                              **{metric: {"mean": per[metric].mean[k], "se": per[metric].se[k]}
                                 for metric in SANITY_METRICS}}
                             for k, step in enumerate(steps)]
                    for method, per in s.results.items()},
        "seconds": round(s.seconds, 3),
    }


def csv_bytes(s: SanityResult) -> bytes:
    """``sanity.csv``: one row per method and step."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "step", "randomised", "module", "spearman_mean", "spearman_se",
                     "ssim_mean", "ssim_se", "n"])
    for method, per in s.results.items():
        for k, (cut, label) in enumerate(zip(s.cuts, s.labels)):
            writer.writerow([method, k + 1, cut, label,
                             f"{per['spearman'].mean[k]:.6g}", f"{per['spearman'].se[k]:.3g}",
                             f"{per['ssim'].mean[k]:.6g}", f"{per['ssim'].se[k]:.3g}",
                             per["spearman"].n])
    return buf.getvalue().encode("utf-8")


def table(s: SanityResult) -> list[str]:
    """The terminal's sanity section: per metric, a row per method, a column per step."""
    lines = [(f"sanity check: layers randomised from the logits down (of {len(s.modules)} "
              f"parameterised modules; seed {s.seed}); mean ± standard error")]
    lines += [f"  step {k + 1}: {cut} randomised, down to {label}"
              for k, (cut, label) in enumerate(zip(s.cuts, s.labels))]
    width = max([len("method"), *(len(m) for m in s.results)])
    for metric, title in (("spearman", "Spearman rank correlation of |map|"),
                          ("ssim", "SSIM")):
        lines.append(f"{title} with the original model's map (1 = unchanged):")
        lines.append(f"{'method':{width}s}  " + "  ".join(f"{f'step {k + 1}':>13s}"
                                                          for k in range(len(s.cuts))))
        for method, per in s.results.items():
            cells = [f"{m:.3f}±{e:.3f}" for m, e in zip(per[metric].mean, per[metric].se)]
            lines.append(f"{method:{width}s}  " + "  ".join(f"{c:>13s}" for c in cells))
    lines.append("a method whose map does not change as the model is randomised fails it")
    return lines


def plot(s: SanityResult, title: str) -> bytes:
    """PNG bytes: one panel per metric, x = steps from the top (labelled by the cut's
    module), one line per method with a ±1 standard-error band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SANITY_METRICS), figsize=(7.0 * len(SANITY_METRICS), 4.8),
                             squeeze=False)
    palette = plt.get_cmap("tab20").colors
    xs = list(range(1, len(s.cuts) + 1))
    for ax, metric in zip(axes[0], SANITY_METRICS):
        ax.set_prop_cycle(color=[palette[(2 * i) % 20 + (2 * i) // 20]
                                 for i in range(len(s.results))])
        for method, per in s.results.items():
            mean, se = per[metric].mean, per[metric].se
            (line,) = ax.plot(xs, mean, marker="o", ms=3, label=method)
            ax.fill_between(xs, [m - e for m, e in zip(mean, se)],
                            [m + e for m, e in zip(mean, se)], color=line.get_color(),
                            alpha=0.12)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xticks(xs, [f"{k}: {label}" for k, label in zip(xs, s.labels)], fontsize=7,
                      rotation=30, ha="right")
        ax.set_xlabel("randomised from the logits down to")
        ax.set_ylabel("rank correlation of |map|" if metric == "spearman" else "SSIM")
        ax.set_title(("Spearman rank correlation" if metric == "spearman" else "SSIM")
                     + " with the original map")
        ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1.05)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)  # one legend, off the lines
    fig.suptitle(title)
    fig.tight_layout(rect=(0.0, 0.0, 0.875, 1.0))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
