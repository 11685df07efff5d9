"""Where FullGrad's time goes, per architecture, against the forward+backward floor.

One thread, CPU time of this process (``time.process_time``), so the figures hold on a
shared machine; the median of ``--repeats`` interleaved rounds after a warm-up. Per model
(random weights, batch ``--batch-size``, 224 px):

* floor: forward + backward of the summed top-1 logits to the input only (frozen
  parameters), split into its forward and backward;
* engine: ``FullGrad(model).saliency(x)``, and inside it, timed by wrapping the engine's
  own functions: ``biases`` (closed forms and implicit biases in the traced forward),
  ``tracking`` (pixel positions and image indices followed through the forward),
  ``map`` (each layer's bias term, completeness sum, psi and channel sum in the backward
  hooks); ``rest`` is the engine minus the floor minus those three (tracer dispatch,
  hooks, the backward's own extra work).

    OMP_WAIT_POLICY=PASSIVE python scripts/engine_time.py efficientnet_b0 convnext_tiny

Run it on another checkout with ``PYTHONPATH=OTHER/src`` for a before/after pair.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Callable

import torch
import torchvision

from fgcli.engine import FullGrad, decompose, saliency

PARTS = {"implicit_biases": decompose, "closed_form": decompose, "jvp_before_inplace": decompose}
"""Functions whose time is the biases' (those a checkout lacks are skipped)."""
METHODS = {"tracking": (decompose.BiasTracer, "_track"), "map": (saliency._MapSink, "layer")}


def instrument(spent: Counter) -> None:
    """Wrap the engine's functions so that their CPU time adds up in ``spent``."""

    def wrap(fn: Callable, key: str) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.process_time() - t0
        return timed

    for name, owner in PARTS.items():
        if hasattr(owner, name):
            setattr(owner, name, wrap(getattr(owner, name), "biases"))
    for key, (owner, name) in METHODS.items():
        setattr(owner, name, wrap(getattr(owner, name), key))


def measure(name: str, batch: int, repeats: int, spent: Counter) -> dict[str, float]:
    model = torchvision.models.get_model(name, weights=None).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    engine = FullGrad(model)
    split: dict[str, float] = {}

    def floor() -> None:
        xg = x.clone().requires_grad_(True)
        t0 = time.process_time()
        out = model(xg)
        split["forward"] = time.process_time() - t0
        torch.autograd.grad(out.gather(1, out.argmax(1)[:, None]).sum(), xg)

    rounds: dict[str, list[float]] = {k: [] for k in
                                      ("floor", "forward", "engine", "biases", "tracking", "map")}
    floor()
    engine.saliency(x)
    for _ in range(repeats):
        t0 = time.process_time()
        floor()
        rounds["floor"].append(time.process_time() - t0)
        rounds["forward"].append(split["forward"])
        spent.clear()
        t0 = time.process_time()
        engine.saliency(x)
        rounds["engine"].append(time.process_time() - t0)
        for key in ("biases", "tracking", "map"):
            rounds[key].append(spent[key])
    med = {k: statistics.median(v) for k, v in rounds.items()}
    med["rest"] = med["engine"] - med["floor"] - med["biases"] - med["tracking"] - med["map"]
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=["resnet50", "vgg16_bn", "efficientnet_b0",
                                                       "convnext_tiny", "vit_b_16", "swin_t"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    spent: Counter = Counter()
    instrument(spent)
    print("| model | floor s (fwd + bwd) | engine s | engine/floor | biases | tracking | "
          "map | rest |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        m = measure(name, args.batch_size, args.repeats, spent)
        share = {k: f"{m[k]:.2f} ({m[k] / m['floor']:.0%})" for k in
                 ("biases", "tracking", "map", "rest")}
        print(f"| {name} | {m['floor']:.2f} ({m['forward']:.2f} + "
              f"{m['floor'] - m['forward']:.2f}) | {m['engine']:.2f} | "
              f"{m['floor'] / m['engine']:.2f} | {share['biases']} | {share['tracking']} | "
              f"{share['map']} | {share['rest']} |", flush=True)


if __name__ == "__main__":
    main()
