"""Throughput of fgcli against the forward+backward floor, measured side by side.

One process, one model, one batch size, resolution and device; warm-up first,
then the median of ``--repeats`` timings of:

  (a) floor: forward + backward of the summed target logits to the input only
      (plus the forward alone, plain and under fgcli's tracer: the tracer's cost)
  (b) FullGrad.saliency and SimpleFullGrad.saliency on the same batch
  (c) end-to-end ``fullgrad dump`` of ``--images`` files (default outputs:
      heatmap, overlay, map), from paths to files on disk
  (d) pytorch-grad-cam's FullGradCAM on the same batch, if ``grad-cam`` is installed

Prints a table and writes JSON (images/s, ratios b/a, c/a, b/d, peak memory:
process RSS on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA).

    OMP_WAIT_POLICY=PASSIVE python scripts/bench.py --model resnet50 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory during a block: sampled RSS on the CPU, the allocator's peak on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._stop = threading.Event()
        self.peak = _rss_bytes()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, _rss_bytes())
                time.sleep(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, int]:
    """(median seconds, peak memory bytes) after one warm-up call."""
    fn()
    times = []
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times), mem.peak


def build_model(name: str, weights: str | None) -> torch.nn.Module:
    if weights:
        model = torchvision.models.get_model(name)
        model.load_state_dict(torch.load(weights, weights_only=True))
        return model.eval()
    from conftest import randomise

    torch.manual_seed(0)
    return randomise(torchvision.models.get_model(name))


def floor_fn(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    params = list(model.parameters())

    def run() -> torch.Tensor:
        for p in params:
            p.requires_grad_(False)
        try:
            xg = x.detach().requires_grad_(True)
            logits = model(xg)
            target = logits.detach().argmax(1)
            (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), xg)
            return g
        finally:
            for p in params:
                p.requires_grad_(True)

    return run


def forward_fns(model: torch.nn.Module, x: torch.Tensor
                ) -> tuple[Callable[[], object], Callable[[], object]]:
    """A forward pass that records the graph, plain and under fgcli's bias tracer."""
    from fgcli.engine.decompose import traced_model

    def plain() -> torch.Tensor:
        with torch.enable_grad():
            params = [p.requires_grad_(False) for p in model.parameters()]
            try:
                return model(x.detach().requires_grad_(True))
            finally:
                for p in params:
                    p.requires_grad_(True)

    def traced() -> torch.Tensor:
        with traced_model(model) as tracer, torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            with tracer:
                return model(xg)

    return plain, traced


def gradcam_fn(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object] | None:
    try:
        from pytorch_grad_cam import FullGrad as FullGradCAM
    except ImportError:
        return None
    cam = FullGradCAM(model=model, target_layers=[])
    return lambda: cam(input_tensor=x, targets=None)


def end_to_end(args: argparse.Namespace, folder: Path, out: Path) -> float:
    from fgcli.config import RunConfig, from_options
    from fgcli.dump.run import run

    cfg = from_options(RunConfig, {
        "inputs": (str(folder),), "model": args.model, "weights": args.weights or "none",
        "device": args.device, "batch_size": args.batch_size, "workers": args.workers,
        "size": args.size, "out": str(out), "overwrite": True, "quiet": True})
    start = time.perf_counter()
    report = run(cfg)
    if report.failed:
        raise RuntimeError(f"end-to-end run failed: {report.first_error}")
    return time.perf_counter() - start


def make_folder(n: int, root: Path) -> Path:
    photos = sorted((ROOT / "examples" / "photos").iterdir())
    folder = root / f"images-{n}"
    folder.mkdir()
    for i in range(n):
        src = photos[i % len(photos)]
        shutil.copyfile(src, folder / f"{i:05d}{src.suffix}")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--weights", default=None,
                        help="state_dict file (default: randomised weights, as in the tests)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=32, help="N for the end-to-end run")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--gradcam-repeats", type=int, default=1,
                        help="FullGradCAM is slow: fewer repeats (after its warm-up); 0 skips it")
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args()

    from fgcli import FullGrad, SimpleFullGrad

    device = torch.device(args.device)
    model = build_model(args.model, args.weights).to(device)
    x = torch.randn(args.batch_size, 3, args.size, args.size,
                    generator=torch.Generator().manual_seed(0)).to(device)
    n = args.batch_size
    rows: dict[str, dict[str, float]] = {}

    def add(name: str, seconds: float, peak: int, images: int = n) -> None:
        rows[name] = {"seconds": seconds, "images_per_s": images / seconds,
                      "peak_mb": peak / 2**20}

    add("floor", *timed(floor_fn(model, x), args.repeats, device))
    plain, traced = forward_fns(model, x)
    add("forward", *timed(plain, args.repeats, device))
    add("traced_forward", *timed(traced, args.repeats, device))
    add("fullgrad", *timed(lambda: FullGrad(model).saliency(x), args.repeats, device))
    add("simple", *timed(lambda: SimpleFullGrad(model).saliency(x), args.repeats, device))
    cam = gradcam_fn(model, x) if args.gradcam_repeats > 0 else None
    if cam is not None:
        add("gradcam_fullgrad", *timed(cam, args.gradcam_repeats, device))
    if not args.skip_e2e:
        with tempfile.TemporaryDirectory() as tmp:
            folder = make_folder(args.images, Path(tmp))
            end_to_end(args, folder, Path(tmp) / "warm")  # warm-up (page cache, workers)
            times = []
            with PeakMemory(device) as mem:
                for r in range(args.repeats):
                    times.append(end_to_end(args, folder, Path(tmp) / f"out{r}"))
            add("dump_e2e", statistics.median(times), mem.peak, images=args.images)

    floor = rows["floor"]["images_per_s"]
    ratios = {f"{k}/floor": v["images_per_s"] / floor for k, v in rows.items() if k != "floor"}
    ratios["traced_forward/forward"] = (rows["traced_forward"]["images_per_s"]
                                        / rows["forward"]["images_per_s"])
    if "gradcam_fullgrad" in rows:
        ratios["fullgrad/gradcam"] = (rows["fullgrad"]["images_per_s"]
                                      / rows["gradcam_fullgrad"]["images_per_s"])
    result = {"model": args.model, "batch_size": n, "size": args.size, "device": str(device),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "images": args.images, "rows": rows, "ratios": ratios}
    print(f"{args.model}  batch {n}  {args.size}px  {device}  threads {torch.get_num_threads()}")
    print(f"{'':18s}{'img/s':>9s}{'x floor':>9s}{'peak MB':>9s}")
    for name, row in rows.items():
        print(f"{name:18s}{row['images_per_s']:9.2f}"
              f"{row['images_per_s'] / floor:9.2f}{row['peak_mb']:9.0f}")
    print(f"tracer overhead on the forward pass: "
          f"{1 / ratios['traced_forward/forward']:.3f}x the plain forward's time")
    if "fullgrad/gradcam" in ratios:
        print(f"fullgrad / pytorch-grad-cam FullGradCAM: {ratios['fullgrad/gradcam']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
