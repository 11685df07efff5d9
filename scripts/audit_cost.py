"""What the map statistics cost (fgcli.audit.stats.map_stats) against the engine, side by
side in one process: ms per image, and the share of the engine's time per image (an upper
bound on their share of a dump, which adds decoding and writing).

    OMP_WAIT_POLICY=PASSIVE python scripts/audit_cost.py [--models squeezenet1_1,resnet50]
        [--batch 8] [--size 224] [--rounds 5]

Random weights, random input: the cost depends on the map's size, not its values.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

from fgcli import FullGrad
from fgcli.audit.stats import map_stats


def _best(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="squeezenet1_1,resnet50")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    print(f"| model | engine ms/img | stats ms/img | stats / engine |")
    print("|---|---|---|---|")
    for name in args.models.split(","):
        model = torchvision.models.get_model(name, weights=None).eval()
        engine = FullGrad(model)
        maps = engine.saliency(x)
        engine_s, stats_s = [], []
        for _ in range(args.rounds):  # interleaved, so load hits both alike
            engine_s.append(_best(lambda: engine.saliency(x), 1))
            stats_s.append(_best(lambda: map_stats(maps), 3))
        e, s = min(engine_s) / args.batch * 1e3, min(stats_s) / args.batch * 1e3
        print(f"| {name} | {e:.1f} | {s:.2f} | {s / e:.1%} |")


if __name__ == "__main__":
    main()
