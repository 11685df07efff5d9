"""fgcli's speed against its floors, measured side by side in one process.

    OMP_WAIT_POLICY=PASSIVE python scripts/bench.py
    OMP_WAIT_POLICY=PASSIVE python scripts/bench.py --models resnet50:16,timm:resnet18 --skip-e2e

Engine table, per model (random weights, ``--size`` px, one batch of random input):

  floor    one forward + one backward of the summed target logits to the input only,
           parameters frozen (``requires_grad_(False)``);
  FullGrad ``fgcli.engine.FullGrad(model).saliency(x)`` on the same batch.

  After one warm-up of each, ``--repeats`` rounds alternate the two (so machine load hits
  both alike); img/s are medians, engine/floor the median of the per-round ratios.

Dump rows (``--dump-model``, default resnet50, at the dump's default CPU batch unless
``--dump-batch``), for the default outputs and for ``--save map``:

  dump          ``fgcli.dump.run.run`` (what ``fullgrad dump`` runs) on N copies of the
                example photos, in this process; steady-state rate = (128 - 64) / (t128 - t64)
                between a 64- and a 128-image run (start-up cancels out);
  dump floor    the compute floor per image at the dump's batch, plus the I/O a dump cannot
                avoid for the chosen outputs, serially on the same cores: each input decoded
                once (Pillow: open, load, EXIF orientation, as fgcli.data.decode), each
                requested file encoded once at its resolution with the dump's codec
                settings (8-bit palette PNG heatmap at compress_level 1, JPEG overlay at
                quality 90, ``.npy`` map of the model-resolution float32 map) into a file.
                The files encoded are the dump's own outputs, read back.
  ratio         dump / dump floor, median over rounds that interleave floor and dumps.
  engine        ``FullGrad.saliency`` per image at the dump's batch: dump / (engine + I/O
                floor) is what the dump itself adds, apart from the engine's own cost.
  core-ms       the same figures in CPU time (every thread and DataLoader worker): on a
                shared, loaded machine wall-clock rates swing with other processes, CPU
                time much less; the load average of each round is printed.

Batch per model: ``name:N`` in ``--models``, else ``--batch-size N``, else the reference
batch: 16 for resnet50 and vgg16_bn, 8 for every other model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "examples" / "photos"
DEFAULT_MODELS = "resnet50,vgg16_bn,efficientnet_b0,convnext_tiny,vit_b_16,swin_t"
DUMP_SIZES = (64, 128)  # the steady-state window: images 64..127 of a 128-image run


REFERENCE_BATCH = {"resnet50": 16, "vgg16_bn": 16}  # the reference batch for these


def parse_models(text: str, batch: int | None = None) -> list[tuple[str, int]]:
    """``a,b:16,timm:c`` -> [(a, B), (b, 16), (timm:c, B)]: a trailing ``:N`` of digits is
    that model's batch, any other colon is part of the name (``timm:``). B is ``batch``
    when given, else 16 for resnet50 and vgg16_bn, 8 for the others."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, tail = part.rpartition(":")
        if sep and tail.isdigit() and name:
            if int(tail) < 1:
                raise ValueError(f"--models {part!r}: the batch must be >= 1")
            out.append((name, int(tail)))
        else:
            out.append((part, batch or REFERENCE_BATCH.get(part, 8)))
    if not out:
        raise ValueError("--models: name at least one model")
    return out


def build_model(name: str, size: int, device: torch.device) -> torch.nn.Module:
    """The model as ``fullgrad dump --weights random`` loads it (frozen, eval mode)."""
    from fgcli.config import ModelSpec
    from fgcli.models.load import load

    torch.manual_seed(0)
    return load(ModelSpec(model=name, weights="random", size=size), device).model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def core_seconds() -> float:
    """CPU time of this process's threads and of its finished children (DataLoader
    workers): the work done, which other processes on a shared machine barely change."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def floor_fn(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Forward + backward of the summed target logits to the input, parameters frozen."""
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> torch.Tensor:
        for p in params:
            p.requires_grad_(False)
        try:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                logits = model(xg)
                target = logits.detach().argmax(1)
                (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), xg)
            return g
        finally:
            for p in params:
                p.requires_grad_(True)

    return run


def engine_row(name: str, batch: int, size: int, device: torch.device, repeats: int
               ) -> dict[str, float | int | str]:
    """Floor and FullGrad img/s and their ratio, rounds interleaved, medians."""
    from fgcli.engine import FullGrad

    model = build_model(name, size, device)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    floor = floor_fn(model, x)
    engine = FullGrad(model)
    fns = {"floor": floor, "fullgrad": lambda: engine.saliency(x)}
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(seconds(fn, device))
    ratio = statistics.median(f / e for f, e in zip(times["floor"], times["fullgrad"]))
    return {"model": name, "batch": batch,
            "floor_img_s": batch / statistics.median(times["floor"]),
            "fullgrad_img_s": batch / statistics.median(times["fullgrad"]),
            "engine_floor": ratio}


# ------------------------------------------------------------------------------ dump


def make_folder(n: int, root: Path) -> Path:
    """N files, the example photos in turn (image i is photo i mod count)."""
    photos = sorted(PHOTOS.iterdir())
    folder = root / f"images-{n}"
    folder.mkdir()
    for i in range(n):
        src = photos[i % len(photos)]
        shutil.copyfile(src, folder / f"{i:05d}{src.suffix}")
    return folder


def dump_seconds(args: argparse.Namespace, folder: Path, out: Path, save: tuple[str, ...]
                 ) -> tuple[float, float]:
    """Wall and core seconds of one whole dump (set-up included) of ``folder`` into
    ``out``."""
    from fgcli.config import RunConfig, from_options
    from fgcli.dump.run import run

    cfg = from_options(RunConfig, {
        "inputs": (str(folder),), "model": args.dump_model, "weights": "random",
        "device": args.device, "batch_size": args.dump_batch, "workers": args.workers,
        "size": args.size, "out": str(out), "overwrite": True, "quiet": True, "save": save})
    start, cpu = time.perf_counter(), core_seconds()
    report = run(cfg)
    if report.failed:
        raise RuntimeError(f"dump failed: {report.first_error}")
    return time.perf_counter() - start, core_seconds() - cpu


def decode_once(path: Path) -> Image.Image:
    """What any dump must do to a file: Pillow decode, EXIF orientation applied."""
    with Image.open(path) as img:
        img.load()
        return ImageOps.exif_transpose(img)


def io_floor_seconds(photo: Path, outputs: dict[str, Path], scratch: Path
                     ) -> tuple[float, float]:
    """Decode ``photo`` once and encode each of ``outputs`` (kind -> the dump's file,
    read back) once into ``scratch`` with the dump's codec settings: wall and CPU
    seconds."""
    payload: dict[str, object] = {}
    if "heatmap" in outputs:
        with Image.open(outputs["heatmap"]) as img:
            payload["heatmap"] = (np.asarray(img), np.asarray(img.getpalette(), np.uint8))
    if "overlay" in outputs:
        payload["overlay"] = np.asarray(Image.open(outputs["overlay"]).convert("RGB"))
    if "map" in outputs:
        payload["map"] = np.load(outputs["map"])
    start, cpu = time.perf_counter(), time.thread_time()
    decode_once(photo)
    for kind, data in payload.items():
        dest = scratch / f"{kind}.out"
        if kind == "heatmap":
            indices, palette = data  # type: ignore[misc]
            img = Image.frombytes("P", indices.shape[::-1], indices.tobytes())
            img.putpalette(palette.tobytes())
            img.save(dest, "PNG", compress_level=1)
        elif kind == "overlay":
            Image.fromarray(data, "RGB").save(dest, "JPEG", quality=90)  # type: ignore[arg-type]
        else:
            with open(dest, "wb") as fh:
                np.save(fh, data, allow_pickle=False)  # type: ignore[arg-type]
    return time.perf_counter() - start, time.thread_time() - cpu


def dump_outputs(out: Path, key: str, save: tuple[str, ...]) -> dict[str, Path]:
    """The files one image got in a dump's tree (kind -> path)."""
    from fgcli.tree.layout import FOLDER, SUFFIX

    return {kind: out / FOLDER[kind] / f"{key}{SUFFIX[kind]}" for kind in save}


def io_floor_per_image(folder: Path, out: Path, save: tuple[str, ...], scratch: Path,
                       sizes: tuple[int, int] = DUMP_SIZES) -> tuple[float, float]:
    """Mean unavoidable I/O per image over images 64..127 (the steady-state window),
    wall and CPU seconds: each distinct photo timed (median of 3 rounds), weighted by
    how often it occurs there."""
    files = sorted(folder.iterdir())
    count = min(len(files), len(list(PHOTOS.iterdir())))
    per_photo = []
    for f in files[:count]:
        times = [io_floor_seconds(f, dump_outputs(out, f.name, save), scratch)
                 for _ in range(3)]
        per_photo.append([statistics.median(t[k] for t in times) for k in (0, 1)])
    window = [per_photo[i % count] for i in range(*sizes)]
    return statistics.fmean(w[0] for w in window), statistics.fmean(w[1] for w in window)


def per_image(fn: Callable[[], object], batch: int, device: torch.device
              ) -> tuple[float, float]:
    """Wall and core seconds per image of ``fn`` (one batch): median / mean of 3 calls."""
    cpu = core_seconds()
    wall = statistics.median(seconds(fn, device) for _ in range(3)) / batch
    return wall, (core_seconds() - cpu) / 3 / batch


def dump_round(args: argparse.Namespace, folders: dict[int, Path],
               fns: dict[str, Callable[[], object]], batch: int, save: tuple[str, ...],
               root: Path) -> dict[str, float]:
    """One round: compute floor and engine per image (3 batches each), the two dumps,
    then the I/O floor of the larger dump's own outputs."""
    device = torch.device(args.device)
    load = os.getloadavg()[0]
    compute, compute_cpu = per_image(fns["floor"], batch, device)
    engine, engine_cpu = per_image(fns["engine"], batch, device)
    small, big = args.dump_images
    t = {n: dump_seconds(args, folders[n], root / f"out-{n}", save) for n in (small, big)}
    scratch = root / "scratch"
    scratch.mkdir(exist_ok=True)
    io, io_cpu = io_floor_per_image(folders[big], root / f"out-{big}", save, scratch,
                                    (small, big))
    dump_rate = (big - small) / (t[big][0] - t[small][0])
    dump_cpu = (t[big][1] - t[small][1]) / (big - small)
    return {"compute_floor_ms": compute * 1e3, "io_floor_ms": io * 1e3,
            "dump_floor_img_s": 1.0 / (compute + io), "dump_img_s": dump_rate,
            "ratio": dump_rate * (compute + io), f"t{small}": t[small][0],
            f"t{big}": t[big][0], "engine_ms": engine * 1e3,
            "dump_vs_engine": dump_rate * (engine + io),
            "floor_core_ms": (compute_cpu + io_cpu) * 1e3, "dump_core_ms": dump_cpu * 1e3,
            "engine_core_ms": engine_cpu * 1e3, "core_ratio": (compute_cpu + io_cpu) / dump_cpu,
            "core_vs_engine": (engine_cpu + io_cpu) / dump_cpu,
            "load_before": load, "load_after": os.getloadavg()[0]}


SAVES = {"default": ("heatmap", "overlay", "map"), "map": ("map",)}


def dump_rows(args: argparse.Namespace) -> list[dict[str, object]]:
    """Dump vs dump floor for the default outputs and ``--save map``, rounds interleaved
    (each round runs both), medians."""
    device = torch.device(args.device)
    batch = args.dump_batch or (32 if device.type == "cuda" else 8)
    model = build_model(args.dump_model, args.size, device)
    x = torch.randn(batch, 3, args.size, args.size,
                    generator=torch.Generator().manual_seed(0)).to(device)
    from fgcli.engine import FullGrad

    engine = FullGrad(model)
    fns = {"floor": floor_fn(model, x), "engine": lambda: engine.saliency(x)}
    for fn in fns.values():
        fn()
    saves = {k: SAVES[k] for k in args.dump_outputs.split(",")}
    rounds: dict[str, list[dict[str, float]]] = {k: [] for k in saves}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = {n: make_folder(n, root) for n in args.dump_images}
        for save in saves.values():  # warm-up: page cache, imports, allocator
            dump_seconds(args, folders[args.dump_images[0]], root / "warm", save)
        for _ in range(args.repeats):
            for label, save in saves.items():
                rounds[label].append(dump_round(args, folders, fns, batch, save, root))
    rows = []
    for label, found in rounds.items():
        row: dict[str, object] = {"model": args.dump_model, "batch": batch, "save": label}
        row.update({k: statistics.median(r[k] for r in found) for k in found[0]})
        row["rounds"] = found
        rows.append(row)
    return rows


def print_tables(engine: list[dict], dumps: list[dict], args: argparse.Namespace) -> None:
    print(f"# fgcli bench: {args.size}px, {args.device}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, median of {args.repeats} interleaved rounds")
    if engine:
        print("\n| model | batch | floor img/s | FullGrad img/s | engine/floor |")
        print("|---|---|---|---|---|")
        for r in engine:
            print(f"| {r['model']} | {r['batch']} | {r['floor_img_s']:.2f} | "
                  f"{r['fullgrad_img_s']:.2f} | {r['engine_floor']:.2f} |")
    if dumps:
        small, big = args.dump_images
        print(f"\nDump steady state ({small}- vs {big}-image runs of the "
              "example photos; floor = compute floor + unavoidable I/O, serial)\n")
        print("| model | batch | outputs | compute floor ms/img | I/O floor ms/img | "
              "dump-floor img/s | dump img/s | dump/dump-floor | engine ms/img | "
              "dump/(engine+I/O) | core-ms/img floor / engine / dump | core ratios |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in dumps:
            print(f"| {r['model']} | {r['batch']} | {r['save']} | {r['compute_floor_ms']:.1f} "
                  f"| {r['io_floor_ms']:.1f} | {r['dump_floor_img_s']:.2f} | "
                  f"{r['dump_img_s']:.2f} | {r['ratio']:.2f} | {r['engine_ms']:.1f} | "
                  f"{r['dump_vs_engine']:.2f} | {r['floor_core_ms']:.0f} / "
                  f"{r['engine_core_ms']:.0f} / {r['dump_core_ms']:.0f} | "
                  f"{r['core_ratio']:.2f} / {r['core_vs_engine']:.2f} |")
        print("\ncore-ms: CPU time of every thread and DataLoader worker, which other "
              "processes on a shared machine barely change; core ratios: floor / dump and "
              "(engine + I/O floor) / dump. Load average (1 min) over the rounds: "
              + ", ".join(f"{r['load_before']:.1f}-{r['load_after']:.1f}"
                          for d in dumps for r in d["rounds"]))


def image_counts(text: str) -> tuple[int, int]:
    """``64,128`` -> (64, 128): two image counts, the second larger."""
    small, big = (int(v) for v in text.split(","))
    if not 0 < small < big:
        raise argparse.ArgumentTypeError(f"{text!r}: two counts, 0 < first < second")
    return small, big


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS,
                        help="comma-separated torchvision names or timm:NAME, each "
                             "optionally NAME:BATCH (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch of every model given no :BATCH (default: 16 for "
                             "resnet50 and vgg16_bn, 8 for the others)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--skip-engine", action="store_true", help="dump rows only")
    parser.add_argument("--skip-e2e", action="store_true", help="engine table only")
    parser.add_argument("--dump-model", default="resnet50")
    parser.add_argument("--dump-batch", type=int, default=None,
                        help="the dump's --batch-size (default: the dump's own, 8 on a CPU)")
    parser.add_argument("--dump-outputs", default="default,map", choices=[
        "default,map", "default", "map"], help="which dump rows (default: both)")
    parser.add_argument("--dump-images", default="64,128", type=image_counts,
                        help="the two runs whose difference is the steady state "
                             "(default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None,
                        help="the dump's --workers (default: the dump's own)")
    parser.add_argument("--json", default=None, help="write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    models = parse_models(args.models, args.batch_size)
    device = torch.device(args.device)
    engine = [] if args.skip_engine else [
        engine_row(name, batch, args.size, device, args.repeats) for name, batch in models]
    dumps = [] if args.skip_e2e else dump_rows(args)
    print_tables(engine, dumps, args)
    result = {"size": args.size, "device": str(device), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "repeats": args.repeats, "engine": engine,
              "dump": dumps}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
