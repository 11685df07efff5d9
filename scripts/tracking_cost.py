"""What pixel-position tracking costs: FullGrad.explain() with and without it, side by side.

    OMP_WAIT_POLICY=PASSIVE python scripts/tracking_cost.py swin_t maxvit_t vit_b_16 resnet50

"Tracking" is everything fgcli.engine.positions follows: pixel positions and each
element's image (the per-image split of bias terms). Without it, windowed attention layers
are left out of the map and terms are split between images by shape (the results differ);
this measures time only. Randomised weights (``--weights random``), batch 4 at 224.
"""

from __future__ import annotations

import argparse
import functools
import time

from fgcli import FullGrad
from fgcli.check import random_inputs
from fgcli.config import ModelSpec
from fgcli.engine import decompose
from fgcli.models.load import load


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tracked_begin = decompose.BiasTracer.begin
    for name in args.models:
        loaded = load(ModelSpec(name, "random"), "cpu")
        x, _ = random_inputs(loaded.config.size, n=args.batch_size)
        fg = FullGrad(loaded.model)
        run = functools.partial(fg.explain, x)
        run()  # warm-up
        on = best_of(run, args.repeats)
        decompose.BiasTracer.begin = lambda self, *a: None  # no position tracker
        try:
            off = best_of(run, args.repeats)
        finally:
            decompose.BiasTracer.begin = tracked_begin
        on = min(on, best_of(run, args.repeats))
        print(f"{name:16s} with tracking {on:6.2f} s  without {off:6.2f} s  ratio {on / off:.2f}",
              flush=True)


if __name__ == "__main__":
    main()
