"""What the map statistics cost (fgcli.audit.stats.map_stats) against the engine, side by
side in one process: ms per image, and the share of the engine's time per image (an upper
bound on their share of a dump, which adds decoding and writing).

    OMP_WAIT_POLICY=PASSIVE python scripts/audit_cost.py [--models squeezenet1_1,resnet50]
        [--batch 8] [--size 224] [--rounds 5] [--dump 48]

Random weights, random input: the cost depends on the map's size, not its values.
``--dump N`` also times whole dumps of N copies of the example photos (default outputs,
squeezenet's real weights) with the statistics and with them replaced by a no-op, in
alternating rounds: the statistics' share of a real dump.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

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
    ap.add_argument("--dump", type=int, default=0, help="also time dumps of N photos")
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
    if args.dump:
        dump_share(args.dump, args.rounds)


def dump_share(n: int, rounds: int) -> None:
    """Seconds per image of whole dumps with and without the statistics."""
    import fgcli.dump.host as host
    from fgcli.config import build_config
    from fgcli.dump.run import run

    root = Path(__file__).resolve().parents[1]
    photos = sorted((root / "examples" / "photos").iterdir())
    work = Path(tempfile.mkdtemp(prefix="audit-cost-"))
    inputs = work / "photos"  # the outputs go beside it, never inside
    inputs.mkdir()
    for k in range(n):
        src = photos[k % len(photos)]
        shutil.copy(src, inputs / f"{k:04d}{src.suffix}")
    real = host.map_stats
    times: dict[str, list[float]] = {"with statistics": [], "without statistics": []}
    try:
        for r in range(rounds):
            for label in times:
                host.map_stats = real if label == "with statistics" else (
                    lambda maps: torch.zeros(maps.shape[0], 8))
                out = work / f"out-{r}-{label.split()[0]}"
                cfg = build_config({"inputs": (str(inputs),), "model": "squeezenet1_1",
                                    "weights": str(root / "examples" / "weights" /
                                                   "squeezenet1_1_imagenet.pth"),
                                    "out": str(out), "quiet": True})
                start = time.perf_counter()
                run(cfg)
                times[label].append((time.perf_counter() - start) / n)
    finally:
        host.map_stats = real
        shutil.rmtree(work, ignore_errors=True)
    with_s, without = min(times["with statistics"]), min(times["without statistics"])
    print(f"\ndump of {n} photos, squeezenet1_1, default outputs: {with_s * 1e3:.1f} ms/img "
          f"with the statistics, {without * 1e3:.1f} without: "
          f"{(with_s - without) * 1e3:+.2f} ms/img ({(with_s - without) / without:+.1%})")


if __name__ == "__main__":
    main()
