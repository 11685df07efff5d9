"""Where the time of a dump goes: each stage per image, measured on this machine's CPU.

    OMP_WAIT_POLICY=PASSIVE python scripts/stages.py --json scripts/stages-cpu.json \\
        | tee scripts/stages-cpu.txt

Stages, as ``fullgrad dump`` runs them (see src/fgcli/pipeline.py):

  decode      fgcli.data.decode.decode (Pillow, EXIF orientation, float32 RGB at full resolution)
              for JPEG (quality 90), PNG (Pillow's default level) and WebP (quality 90)
              files at 500x375 (ImageNet-typical), 1024x768, 1920x1080 and 4000x3000;
              for comparison: Pillow's decode alone (uint8), Pillow's JPEG draft mode
              (DCT-domain downscale to >= 448 px, enough for a 224 input but not for
              full-resolution outputs) and torchvision.io.decode_jpeg on the CPU.
  preprocess  fgcli.data.decode.preprocess to 224x224 (antialiased squash, normalise), and the
              uint8 copy of the original the DataLoader worker keeps for the overlay.
  engine      FullGrad(model).explain at batch 8, 224x224, for resnet50 and vgg16_bn
              (torchvision builders, weights=None), side by side with the floor: one
              forward + one backward to the input, parameters frozen. Repeats alternate
              the two, so machine load hits both alike; the ratio is the figure to keep.
  encode      at the original resolution: render.heatmap_indices (bilinear resize of the
              224 map + min-max), the heatmap as an 8-bit palette PNG (compress_level=1,
              as writer.OutputTree.write_palette_png), the colormap lookup (lut[indices], as
              writer.write_outputs; and by Pillow, P -> RGB, for comparison),
              the overlay blend (render.overlay, integer), the overlay JPEG (quality 90, Pillow, as
              writer.write_jpeg; and torchvision.io.encode_jpeg on the CPU for comparison),
              the .npy of the 224 map; and writer.write_outputs with the default outputs
              (heatmap, overlay, map), and with each alone, into a real output tree on
              disk (atomic writes).

Test images are mosaics of native-resolution crops of the example photos: real per-pixel
detail at every size (upscaling one small photo would make a smooth, unrealistically
cheap-to-code 12-megapixel image). The saliency maps encoded are real FullGrad maps of
those images (SqueezeNet 1.1 with the shipped ImageNet weights), so PNG sizes are real.

CPU stages run with one torch thread (DataLoader workers use one; each decode or encode
is one core's work); the engine uses every core (``--threads``). Each figure is the median
of ``--repeats`` timings after a warm-up; cheap calls are looped to >= 50 ms per timing.
The default clock is CPU time (``--clock cpu``): core-milliseconds per image, the unit of
a capacity estimate, and nearly blind to other processes on a shared machine (wall time
there is inflated by however many other jobs run; ``--clock wall`` measures it anyway).
Also counts the forward and backward-to-input FLOPs per image at 224 with
torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add; convolutions and
matrix products only).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import floor_fn  # noqa: E402 - the floor pass bench.py measures

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "examples" / "photos"
SIZES = [(500, 375), (1024, 768), (1920, 1080), (4000, 3000)]
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MAX_PIXELS = 178956970

warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities")


# "cpu": CPU time of the calling thread (the CPU stages run on one thread), robust to other
# processes on a shared machine; "wall": elapsed time. See --clock.
CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def measure(fn: Callable[[], object], repeats: int, min_seconds: float = 0.05) -> float:
    """Median seconds per call after a warm-up; fast calls are looped to >= min_seconds."""
    start = clock()
    fn()
    first = clock() - start
    inner = max(1, math.ceil(min_seconds / max(first, 1e-6)))
    times = []
    for _ in range(repeats):
        start = clock()
        for _ in range(inner):
            fn()
        times.append((clock() - start) / inner)
    return statistics.median(times)


def mosaic(width: int, height: int, seed: int, tile: int = 250) -> np.ndarray:
    """(height, width, 3) uint8: tiles cropped at native resolution from the example photos."""
    rng = np.random.default_rng(seed)
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(PHOTOS.iterdir())]
    out = np.zeros((height, width, 3), np.uint8)
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            src = photos[rng.integers(len(photos))]
            h, w = min(tile, height - top), min(tile, width - left)
            y = rng.integers(0, src.shape[0] - h + 1)
            x = rng.integers(0, src.shape[1] - w + 1)
            out[top:top + h, left:left + w] = src[y:y + h, x:x + w]
    return out


def make_images(folder: Path) -> dict[str, dict[str, Path]]:
    files: dict[str, dict[str, Path]] = {}
    for i, (w, h) in enumerate(SIZES):
        img = Image.fromarray(mosaic(w, h, seed=i))
        name = f"{w}x{h}"
        files[name] = {}
        for fmt, ext, kwargs in (("JPEG", "jpg", {"quality": 90}), ("PNG", "png", {}),
                                 ("WEBP", "webp", {"quality": 90})):
            path = folder / f"{name}.{ext}"
            img.save(path, fmt, **kwargs)
            files[name][fmt.lower()] = path
    return files


def pil_decode(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def pil_draft(path: Path, side: int = 448) -> np.ndarray:
    with Image.open(path) as img:
        img.draft("RGB", (side, side))
        return np.asarray(img.convert("RGB"))


def tv_decode(path: Path) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    return decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB, apply_exif_orientation=True)


def decode_row(width: int, height: int, by_fmt: dict[str, Path],
               repeats: int) -> dict[str, float]:
    from fgcli.data.decode import decode

    row: dict[str, float] = {}
    for fmt, path in by_fmt.items():
        row[f"{fmt}_bytes"] = path.stat().st_size
        row[f"{fmt}_bits_per_pixel"] = 8 * path.stat().st_size / (width * height)
        row[f"{fmt}_fgcli_decode_ms"] = 1e3 * measure(
            lambda p=path: decode(str(p), MAX_PIXELS), repeats)
        row[f"{fmt}_pil_uint8_ms"] = 1e3 * measure(lambda p=path: pil_decode(p), repeats)
    jpg = by_fmt["jpeg"]
    row["jpeg_pil_draft448_ms"] = 1e3 * measure(lambda: pil_draft(jpg), repeats)
    row["jpeg_tv_decode_jpeg_ms"] = 1e3 * measure(lambda: tv_decode(jpg), repeats)
    return row


def stage_decode(files: dict[str, dict[str, Path]], repeats: int) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name, by_fmt in files.items():
        w, h = (int(v) for v in name.split("x"))
        out[name] = decode_row(w, h, by_fmt, repeats)
        print(f"  decode {name} done", file=sys.stderr)
    return out


def preprocess_row(rgb: np.ndarray, repeats: int) -> dict[str, float]:
    from fgcli.data.decode import preprocess

    return {
        "preprocess_224_ms": 1e3 * measure(
            lambda: preprocess(rgb, (224, 224), False, 256, MEAN, STD), repeats),
        "original_uint8_copy_ms": 1e3 * measure(
            lambda: (rgb * 255.0 + 0.5).astype(np.uint8), repeats),
    }


def stage_preprocess(files: dict[str, dict[str, Path]], repeats: int) -> dict[str, dict]:
    from fgcli.data.decode import decode

    return {name: preprocess_row(decode(str(by_fmt["jpeg"]), MAX_PIXELS), repeats)
            for name, by_fmt in files.items()}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


def count_flops(model: torch.nn.Module, size: int) -> dict[str, float]:
    """GFLOPs per image: forward, backward to the input, and FullGrad.explain in total."""
    from torch.utils.flop_counter import FlopCounterMode

    from fgcli.engine import FullGrad

    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    params = [p.requires_grad_(False) for p in model.parameters()]
    try:
        xg = x.requires_grad_(True)
        with FlopCounterMode(display=False) as fwd:
            logits = model(xg)
        target = logits.detach().argmax(1)
        with FlopCounterMode(display=False) as bwd:
            torch.autograd.grad(logits.gather(1, target[:, None]).sum(), xg)
    finally:
        for p in params:
            p.requires_grad_(True)
    f, b = (m.get_total_flops() / 1e9 for m in (fwd, bwd))
    try:  # the counter's module hooks may clash with the engine's autograd.grad
        with FlopCounterMode(display=False) as fg:
            FullGrad(model).explain(x.detach())
        e: float | None = fg.get_total_flops() / 1e9
    except RuntimeError:
        e = None
    return {"forward_gflops": f, "backward_to_input_gflops": b, "total_gflops": f + b,
            "fullgrad_explain_gflops": e}


def engine_row(name: str, batch: int, repeats: int, threads: int) -> dict:
    from fgcli.engine import FullGrad

    model = build(name)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    engine = FullGrad(model)
    runs = {"floor": floor_fn(model, x), "fullgrad": lambda: engine.explain(x)}
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}  # process CPU time, all threads
    walls: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(repeats):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]  # alternate
        for key in order:
            start, cpu = time.perf_counter(), time.process_time()
            runs[key]()
            times[key].append(time.process_time() - cpu)
            walls[key].append(time.perf_counter() - start)
    if clock is CLOCKS["wall"]:
        times = walls
    floor = statistics.median(times["floor"]) / batch
    fullgrad = statistics.median(times["fullgrad"]) / batch
    flops = count_flops(model, 224)
    paired = [f / g for f, g in zip(times["fullgrad"], times["floor"])]
    return {"batch": batch, "threads": threads, "floor_ms": 1e3 * floor,
            "fullgrad_ms": 1e3 * fullgrad, "fullgrad_over_floor": fullgrad / floor,
            "fullgrad_over_floor_paired": statistics.median(paired),
            "floor_wall_ms": 1e3 * statistics.median(walls["floor"]) / batch,
            "fullgrad_wall_ms": 1e3 * statistics.median(walls["fullgrad"]) / batch,
            "floor_gflop_per_s": flops["total_gflops"] / floor,
            "per_repeat_ratio": paired,
            **flops}


def stage_engine(models: list[str], batch: int, repeats: int, threads: int) -> dict[str, dict]:
    torch.set_num_threads(threads)
    out = {}
    for name in models:
        out[name] = engine_row(name, batch, repeats, threads)
        print(f"  engine {name} done", file=sys.stderr)
    torch.set_num_threads(1)
    return out


def real_map(rgb_u8: np.ndarray) -> np.ndarray:
    """A real 224x224 FullGrad map of the image (SqueezeNet 1.1, shipped ImageNet weights)."""
    from fgcli.data.decode import preprocess
    from fgcli.engine import FullGrad

    model = torchvision.models.squeezenet1_1()
    model.load_state_dict(torch.load(ROOT / "examples" / "weights" /
                                     "squeezenet1_1_imagenet.pth", weights_only=True))
    x, _ = preprocess(rgb_u8.astype(np.float32) / 255.0, (224, 224), False, 256, MEAN, STD)
    return FullGrad(model.eval()).saliency(x[None])[0, 0].numpy()


def encode_row(original: np.ndarray, tree: object, repeats: int) -> dict[str, float]:
    from torchvision.io import encode_jpeg

    from fgcli import render
    from fgcli.dump.writeback import ImageJob, write_outputs

    lut = render.colormap_table("inferno")
    h, w = original.shape[:2]
    sal = real_map(original)
    indices = render.heatmap_indices(sal, w, h)
    heat = lut[indices]
    blended = render.overlay(original, heat, 0.5)
    chw = torch.from_numpy(blended).permute(2, 0, 1)

    def png() -> int:
        img = Image.frombytes("P", (w, h), np.ascontiguousarray(indices).tobytes())
        img.putpalette(lut.tobytes())
        buf = io.BytesIO()
        img.save(buf, "PNG", compress_level=1)
        return buf.tell()

    def jpeg() -> int:
        buf = io.BytesIO()
        Image.fromarray(blended, "RGB").save(buf, "JPEG", quality=90)
        return buf.tell()

    def lut_pil() -> np.ndarray:  # the same colours, looked up by Pillow in C
        img = Image.frombytes("P", (w, h), np.ascontiguousarray(indices).tobytes())
        img.putpalette(lut.tobytes())
        return np.asarray(img.convert("RGB"))

    def npy() -> int:
        buf = io.BytesIO()
        np.save(buf, sal.astype(np.float32, copy=False), allow_pickle=False)
        return buf.tell()

    count = iter(range(10**9))

    def write(save: tuple[str, ...]) -> None:
        job = ImageJob(f"{w}x{h}-{next(count)}.jpg", None, 0, lambda: sal, original, (w, h),
                       None)
        write_outputs(tree, job, save, "inferno", 0.5)

    return {
        "heatmap_indices_ms": 1e3 * measure(lambda: render.heatmap_indices(sal, w, h), repeats),
        "palette_png_ms": 1e3 * measure(png, repeats),
        "palette_png_bytes": png(),
        "colormap_lut_ms": 1e3 * measure(lambda: lut[indices], repeats),
        "colormap_lut_pillow_ms": 1e3 * measure(lut_pil, repeats),
        "overlay_blend_ms": 1e3 * measure(lambda: render.overlay(original, heat, 0.5), repeats),
        "overlay_jpeg_pil_ms": 1e3 * measure(jpeg, repeats),
        "overlay_jpeg_bytes": jpeg(),
        "overlay_tv_encode_jpeg_ms": 1e3 * measure(
            lambda: encode_jpeg(chw.contiguous(), quality=90), repeats),
        "npy_ms": 1e3 * measure(npy, repeats),
        "write_outputs_disk_ms": 1e3 * measure(
            lambda: write(("heatmap", "overlay", "map")), repeats),
        "write_heatmap_only_disk_ms": 1e3 * measure(lambda: write(("heatmap",)), repeats),
        "write_overlay_only_disk_ms": 1e3 * measure(lambda: write(("overlay",)), repeats),
        "write_map_only_disk_ms": 1e3 * measure(lambda: write(("map",)), repeats),
    }


def stage_encode(files: dict[str, dict[str, Path]], repeats: int,
                 folder: Path) -> dict[str, dict]:
    from fgcli.tree.writer import OutputTree

    out = {}
    tree = OutputTree(folder / "out")
    tree.acquire(["stages.py"])
    try:
        for name, by_fmt in files.items():
            out[name] = encode_row(pil_decode(by_fmt["jpeg"]), tree, repeats)
            print(f"  encode {name} done", file=sys.stderr)
    finally:
        tree.release()
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gf(value: float | None) -> str:
    return "not countable" if value is None else f"{value:.2f}"


def report(result: dict) -> str:
    lines = []
    m = result["machine"]
    lines.append(f"# fgcli stages on {m['cpu']} ({m['cores']} cores), torch {m['torch']}, "
                 f"torchvision {m['torchvision']}, Pillow {m['pillow']}")
    what = ("CPU time (core-ms: the calling thread's CPU time for the one-thread CPU "
            "stages, the process's CPU time over all threads for the engine)"
            if result["clock"] == "cpu" else "wall time")
    lines.append(f"Clock: {what}. CPU stages: one thread, median ms per image. Engine: "
                 f"{result['engine_threads']} threads, batch {result['batch']}, ms per image "
                 "(wall-clock ms per image in the JSON).")
    lines.append("Load average (1 min) at each stage's start and end, this machine is shared: "
                 + ", ".join(f"{k} {v[0]:.1f}-{v[1]:.1f}" for k, v in result["load"].items()))
    lines.append("")
    lines.append("## Decode (file on disk -> pixels)")
    lines.append("")
    lines.append("| size | JPEG KB (bpp) | JPEG fgcli.decode | JPEG Pillow uint8 | JPEG "
                 "torchvision decode_jpeg | JPEG Pillow draft>=448 | PNG KB | PNG fgcli.decode "
                 "| PNG Pillow uint8 | WebP KB | WebP fgcli.decode | WebP Pillow uint8 |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in result["decode"].items():
        lines.append(
            f"| {name} | {r['jpeg_bytes'] / 1024:.0f} ({r['jpeg_bits_per_pixel']:.1f}) "
            f"| {r['jpeg_fgcli_decode_ms']:.1f} | {r['jpeg_pil_uint8_ms']:.1f} "
            f"| {r['jpeg_tv_decode_jpeg_ms']:.1f} | {r['jpeg_pil_draft448_ms']:.1f} "
            f"| {r['png_bytes'] / 1024:.0f} | {r['png_fgcli_decode_ms']:.1f} "
            f"| {r['png_pil_uint8_ms']:.1f} | {r['webp_bytes'] / 1024:.0f} "
            f"| {r['webp_fgcli_decode_ms']:.1f} | {r['webp_pil_uint8_ms']:.1f} |")
    lines.append("")
    lines.append("## Preprocess (float RGB -> 224x224 model input)")
    lines.append("")
    lines.append("| size | data.preprocess to 224 | uint8 copy of the original (overlay) |")
    lines.append("|---|---|---|")
    for name, r in result["preprocess"].items():
        lines.append(f"| {name} | {r['preprocess_224_ms']:.2f} "
                     f"| {r['original_uint8_copy_ms']:.2f} |")
    lines.append("")
    lines.append("## Engine (224x224, ms per image; FLOPs per image)")
    lines.append("")
    lines.append("| model | floor (fwd + bwd to input) | FullGrad.explain | FullGrad / floor "
                 "(median of paired runs) "
                 "| forward GFLOPs | backward GFLOPs | total GFLOPs | floor GFLOP/s per core "
                 "| FLOPs counted in FullGrad.explain |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name, r in result["engine"].items():
        lines.append(f"| {name} | {r['floor_ms']:.0f} | {r['fullgrad_ms']:.0f} "
                     f"| {r['fullgrad_over_floor_paired']:.2f} | {r['forward_gflops']:.2f} "
                     f"| {r['backward_to_input_gflops']:.2f} | {r['total_gflops']:.2f} "
                     f"| {r['floor_gflop_per_s']:.0f} | {_gf(r['fullgrad_explain_gflops'])} |")
    lines.append("")
    lines.append("## Encode outputs at the original resolution")
    lines.append("")
    lines.append("| size | heatmap_indices | palette PNG (KB) | LUT (lut[indices]) "
                 "| LUT by Pillow P->RGB | overlay blend | overlay JPEG "
                 "Pillow (KB) | overlay torchvision encode_jpeg | .npy | write_outputs "
                 "(heatmap+overlay+map, disk) | heatmap only | overlay only | map only |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in result["encode"].items():
        lines.append(f"| {name} | {r['heatmap_indices_ms']:.2f} | {r['palette_png_ms']:.1f} "
                     f"({r['palette_png_bytes'] / 1024:.0f}) | {r['colormap_lut_ms']:.2f} "
                     f"| {r['colormap_lut_pillow_ms']:.2f} "
                     f"| {r['overlay_blend_ms']:.2f} "
                     f"| {r['overlay_jpeg_pil_ms']:.1f} ({r['overlay_jpeg_bytes'] / 1024:.0f}) "
                     f"| {r['overlay_tv_encode_jpeg_ms']:.1f} | {r['npy_ms']:.3f} "
                     f"| {r['write_outputs_disk_ms']:.1f} "
                     f"| {r['write_heatmap_only_disk_ms']:.1f} "
                     f"| {r['write_overlay_only_disk_ms']:.1f} "
                     f"| {r['write_map_only_disk_ms']:.2f} |")
    lines.append("")
    lines.append("## CPU work per image of a default dump (JPEG input, heatmap+overlay+map)")
    lines.append("")
    lines.append("decode side = fgcli.decode + preprocess + uint8 copy (DataLoader worker); "
                 "write side = write_outputs (writer thread); core-milliseconds per image. "
                 "--save map: no uint8 copy, only the .npy written.")
    lines.append("")
    lines.append("| size | decode side ms | write side ms | total CPU ms | "
                 "images/s per core | --save map: decode side | write side | total "
                 "| images/s per core |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name, s in result["summary"].items():
        lines.append(f"| {name} | {s['decode_side_ms']:.1f} | {s['write_side_ms']:.1f} "
                     f"| {s['cpu_ms']:.1f} | {1e3 / s['cpu_ms']:.1f} "
                     f"| {s['map_only_decode_side_ms']:.1f} | {s['map_only_write_side_ms']:.2f} "
                     f"| {s['map_only_cpu_ms']:.1f} | {1e3 / s['map_only_cpu_ms']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--repeats", type=int, default=5, help="CPU stages")
    parser.add_argument("--engine-repeats", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads for the engine")
    parser.add_argument("--models", default="resnet50,vgg16_bn")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: CPU time (core-ms; robust on a shared machine); wall: "
                             "elapsed time")
    parser.add_argument("--quick", action="store_true",
                        help="two small sizes, one repeat, resnet18 only (a smoke test)")
    args = parser.parse_args()
    global SIZES, clock
    clock = CLOCKS[args.clock]
    if args.quick:
        SIZES = SIZES[:2]
        args.repeats = args.engine_repeats = 1
        args.models = "resnet18"
        args.batch_size = 2
    import PIL

    start = time.perf_counter()
    torch.set_num_threads(1)
    result: dict = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "torchvision": torchvision.__version__, "pillow": PIL.__version__,
                    "numpy": np.__version__, "python": platform.python_version(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
        "clock": args.clock,
        "batch": args.batch_size, "engine_threads": args.threads, "repeats": args.repeats,
        "engine_repeats": args.engine_repeats,
    }
    load: dict[str, tuple[float, float]] = {}
    result["load"] = load

    def staged(name: str, fn: Callable[[], dict]) -> None:
        before = os.getloadavg()[0]
        result[name] = fn()
        load[name] = (before, os.getloadavg()[0])

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = make_images(folder)
        staged("decode", lambda: stage_decode(files, args.repeats))
        staged("preprocess", lambda: stage_preprocess(files, args.repeats))
        staged("encode", lambda: stage_encode(files, args.repeats, folder))
    staged("engine", lambda: stage_engine(args.models.split(","), args.batch_size,
                                          args.engine_repeats, args.threads))
    result["summary"] = {}
    for name in result["decode"]:
        dec = (result["decode"][name]["jpeg_fgcli_decode_ms"]
               + result["preprocess"][name]["preprocess_224_ms"]
               + result["preprocess"][name]["original_uint8_copy_ms"])
        wr = result["encode"][name]["write_outputs_disk_ms"]
        dec_map = (result["decode"][name]["jpeg_fgcli_decode_ms"]
                   + result["preprocess"][name]["preprocess_224_ms"])
        wr_map = result["encode"][name]["write_map_only_disk_ms"]
        result["summary"][name] = {"decode_side_ms": dec, "write_side_ms": wr,
                                   "cpu_ms": dec + wr, "map_only_decode_side_ms": dec_map,
                                   "map_only_write_side_ms": wr_map,
                                   "map_only_cpu_ms": dec_map + wr_map}
    result["seconds"] = time.perf_counter() - start
    print(report(result))
    print(f"\n(total {result['seconds']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
