"""Measure fgcli on a CUDA box in one command (issue #19, item 3): one JSON and Markdown tables.

    PYTHONPATH=src python3 scripts/gpu_check.py --out /tmp/gpu-check [--quick]

Sections, each with its own time cap inside a total budget (default 420 s; ``--quick``
shrinks every size), run in this order and written to ``OUT/gpu_check.json`` and
``OUT/gpu_check.md`` after each one. A section that fails or runs out of time is recorded
as skipped (or partial, with the rows it finished) with its reason; the others still run.

* maps: GPU vs CPU maps on examples/photos (squeezenet1_1 with examples/weights, random
  resnet50), max |difference| / max |CPU map|, with cuDNN's TF32 as torch ships it and off;
* residuals: completeness residual, max |residual| / max(1, |logit|), in float32 and under
  ``--amp``'s autocast (float16 on CUDA, bfloat16 on the CPU, as ``fullgrad dump --amp``);
* engine: engine (``FullGrad.saliency``) / floor (forward + backward to the input only,
  parameters frozen) and img/s at batch 32 and 64, random weights, 224 px; warm-up, then
  the median of interleaved timings with CUDA synchronised around each; peak GPU memory
  (``torch.cuda.max_memory_allocated``) of one call of each;
* dump: ``fullgrad dump`` of 2,000 synthetic photos of mixed sizes (JPEG, every 8th PNG),
  random resnet50, default outputs, ``--device-jpeg`` and ``--no-device-jpeg``: img/s
  (whole command, and run.json's seconds), CPU cores used (children's CPU time / wall),
  the dump process's peak GPU memory (run.json does not record it);
* torchrun: ``torchrun --standalone --nproc-per-node 1 -m fgcli dump`` (nccl on CUDA) of
  256 of those photos: exit code, images, img/s.

Without a CUDA device it exits 2 with one line on stderr. ``--device cpu`` (a developer's
dry run, with ``--quick`` and the small-size flags ``--models/--batches/--size/--images``)
runs every section on the CPU to check the code paths; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

NO_CUDA = ("gpu_check: no CUDA device (torch.cuda.is_available() is False); "
           "run it on a GPU machine")
ENGINE_MODELS = ("resnet50", "vgg16_bn", "efficientnet_b0", "vit_b_16", "convnext_tiny")
PHOTOS = ROOT / "examples" / "photos"
SQUEEZENET_WEIGHTS = ROOT / "examples" / "weights" / "squeezenet1_1_imagenet.pth"
# seconds per section at most; the total budget (--budget) caps their sum
CAPS = {"maps": 45, "residuals": 45, "engine": 150, "dump": 150, "torchrun": 60}
TITLES = {
    "maps": "GPU vs CPU maps (examples/photos)",
    "residuals": "Completeness residuals: max abs(residual) / max(1, abs(logit))",
    "engine": "Engine / floor (random weights)",
    "dump": "End-to-end dump (synthetic photos, random weights, default outputs)",
    "torchrun": "torchrun --nproc-per-node 1",
}
# (key, header, format) per section: the Markdown tables' columns
COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    "maps": [("model", "model", "s"), ("weights", "weights", "s"), ("tf32", "cuDNN TF32", "s"),
             ("images", "images", "d"), ("max_rel_diff", "max abs(GPU − CPU) / max abs(CPU)", ".1e")],
    "residuals": [("model", "model", "s"), ("images", "images", "d"),
                  ("fp32", "float32", ".1e"), ("amp", "--amp", ".1e"),
                  ("amp_dtype", "amp dtype", "s")],
    "engine": [("model", "model", "s"), ("batch", "batch", "d"),
               ("floor_img_s", "floor img/s", ".1f"), ("engine_img_s", "engine img/s", ".1f"),
               ("engine_floor", "engine / floor", ".2f"),
               ("floor_peak_mb", "peak MB floor", ".0f"),
               ("engine_peak_mb", "peak MB engine", ".0f")],
    "dump": [("jpeg", "JPEG decode", "s"), ("images", "images", "d"), ("exit", "exit", "d"),
             ("ok", "ok", "d"),
             ("wall_s", "wall s", ".1f"), ("img_s", "img/s (wall)", ".1f"),
             ("run_img_s", "img/s (run.json)", ".1f"), ("cores", "CPU cores used", ".1f"),
             ("peak_gpu_mb", "peak GPU MB", ".0f")],
    "torchrun": [("backend", "backend", "s"), ("ranks", "ranks", "d"), ("images", "images", "d"),
                 ("exit", "exit", "d"), ("ok", "ok", "d"), ("wall_s", "wall s", ".1f"),
                 ("img_s", "img/s (wall)", ".1f")],
}
# photo sizes (w, h) of the synthetic dump, cycled
PHOTO_SIZES = ((640, 480), (500, 375), (375, 500), (800, 600), (1024, 768), (1280, 720),
               (1600, 1200), (320, 240))
# the dump child: fgcli's CLI, then its peak GPU memory written to $GPU_CHECK_PEAK at exit
DUMP_CHILD = """\
import atexit, json, os, runpy, sys
def _peak():
    import torch
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else None
    with open(os.environ["GPU_CHECK_PEAK"], "w") as fh:
        json.dump(peak, fh)
atexit.register(_peak)
sys.argv[0] = "fullgrad"
runpy.run_module("fgcli", run_name="__main__")
"""


class OutOfTime(Exception):
    """A section reached its time cap."""


@dataclass
class Section:
    """One section's record: rows appended as they are measured, so a failure keeps them."""

    name: str
    deadline: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check(self, before: str) -> None:
        """Raise :class:`OutOfTime` when the cap is reached (``before``: what is left undone)."""
        if self.left() <= 0:
            raise OutOfTime(f"time cap reached before {before}")


@dataclass
class Plan:
    """Sizes of one run: the defaults, shrunk by --quick or by the developer flags."""

    device: str
    out: Path
    models: tuple[str, ...]
    batches: tuple[int, ...]
    size: int | None
    images: int
    torchrun_images: int
    repeats: int
    budget: float
    dump_model: str

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


# ---------------------------------------------------------------------------- results

def result_skeleton(plan: Plan, argv: list[str]) -> dict[str, Any]:
    """The JSON's meta block: what ran where."""
    import torch

    meta: dict[str, Any] = {
        "command": ["scripts/gpu_check.py", *argv], "device": plan.device,
        "host": platform.node(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if plan.cuda:
        meta["gpu"] = torch.cuda.get_device_name(torch.device(plan.device))
        meta["cudnn_tf32"] = torch.backends.cudnn.allow_tf32
        meta["matmul_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return {"meta": meta, "sections": {}}


def write_results(results: dict[str, Any], out: Path) -> None:
    """``gpu_check.json`` and ``gpu_check.md`` in ``out``, each replaced whole."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_check.json", json.dumps(results, indent=2) + "\n"),
                       ("gpu_check.md", markdown(results))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)


def cell(value: Any, fmt: str) -> str:
    """One table cell: ``–`` for a missing value."""
    if value is None:
        return "–"
    return format(value, fmt)


def section_markdown(name: str, section: dict[str, Any]) -> list[str]:
    """A section's heading, status line, table and notes."""
    lines = [f"### {TITLES[name]}", ""]
    status = section["status"]
    if status != "ok":
        lines += [f"{status}: {section.get('reason', '')}", ""]
    rows = section.get("rows", [])
    if rows:
        cols = COLUMNS[name]
        lines.append("| " + " | ".join(header for _, header, _ in cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for row in rows:
            lines.append("| " + " | ".join(cell(row.get(k), f) for k, _, f in cols) + " |")
        lines.append("")
    lines += [f"- {note}" for note in section.get("notes", [])]
    if section.get("notes"):
        lines.append("")
    return lines


def markdown(results: dict[str, Any]) -> str:
    """Every section as a Markdown table (to paste into docs/performance.md)."""
    meta = results["meta"]
    where = meta.get("gpu") or meta["device"]
    lines = [f"## gpu_check: {where}, {meta['cpu_count']} CPU cores, torch {meta['torch']}",
             "", f"`{' '.join(meta['command'])}`", ""]
    for name, section in results["sections"].items():
        lines += section_markdown(name, section)
    return "\n".join(lines).rstrip("\n") + "\n"


def run_section(results: dict[str, Any], plan: Plan, name: str,
                fn: Callable[[Plan, Section], None], total_deadline: float) -> None:
    """Run one section under its cap; record ok / partial / skipped; write the files."""
    start = time.monotonic()
    section = Section(name, min(start + CAPS[name], total_deadline))
    record: dict[str, Any] = {"status": "ok"}
    try:
        section.check(name)
        fn(plan, section)
    except Exception as exc:  # noqa: BLE001 - a failing section must not lose the others
        record = {"status": "partial" if section.rows else "skipped",
                  "reason": failure(exc)}
    record.update(seconds=round(time.monotonic() - start, 1), rows=section.rows,
                  notes=section.notes)
    results["sections"][name] = record
    release_memory(plan)
    write_results(results, plan.out)
    print(f"gpu_check: {name}: {record['status']} in {record['seconds']} s", flush=True)


def failure(exc: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def release_memory(plan: Plan) -> None:
    import gc

    import torch

    gc.collect()
    if plan.cuda:
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- models, inputs

def load_model(name: str, weights: str, device: str, size: int | None) -> Any:
    """fgcli's own loading (:func:`fgcli.models.load.load`, as ``fullgrad dump``):
    ``weights`` "random" builds random weights, else a checkpoint path."""
    from fgcli.config import ModelSpec
    from fgcli.models.load import load

    return load(ModelSpec(model=name, weights=weights, size=size), device)


def photo_batch(config: Any) -> Any:
    """The example photos as one CPU batch, preprocessed as ``fullgrad dump`` does."""
    import torch

    from fgcli.config import DEFAULT_MAX_PIXELS
    from fgcli.data.decode import decode, preprocess

    tensors = []
    for path in sorted(PHOTOS.iterdir()):
        rgb = decode(str(path), DEFAULT_MAX_PIXELS)
        x, _ = preprocess(rgb, config.size, config.crop, config.resize, config.mean,
                          config.std, config.interpolation)
        tensors.append(x)
    return torch.stack(tensors)


def map_models(plan: Plan) -> list[tuple[str, str]]:
    """(model, weights) of the maps and residual sections."""
    return [("squeezenet1_1", str(SQUEEZENET_WEIGHTS)), (plan.dump_model, "random")]


@contextlib.contextmanager
def cudnn_tf32(enabled: bool) -> Iterator[None]:
    import torch

    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def amp_context(device: str) -> Any:
    """``fullgrad dump --amp``'s autocast (fgcli.dump.session.Session._autocast):
    float16 on CUDA, bfloat16 on the CPU."""
    import torch

    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16 if kind == "cpu" else torch.float16)


# ---------------------------------------------------------------------------- sections

def maps_section(plan: Plan, section: Section) -> None:
    """Maps on the device against maps on the CPU, same model, same photos."""
    from fgcli.engine import FullGrad

    for name, weights in map_models(plan):
        section.check(name)
        loaded = load_model(name, weights, "cpu", None)
        x = photo_batch(loaded.config)
        ref = FullGrad(loaded.model).explain(x).maps
        model = copy.deepcopy(loaded.model).to(plan.device)
        for tf32 in ((True, False) if plan.cuda else (False,)):
            with cudnn_tf32(tf32):
                maps = FullGrad(model).explain(x.to(plan.device)).maps.cpu()
            diff = ((maps - ref).abs().flatten(1).amax(1)
                    / ref.abs().flatten(1).amax(1).clamp(min=1e-30))
            section.rows.append({"model": name, "weights": weights_label(weights),
                                 "tf32": "on" if tf32 else "off", "images": len(x),
                                 "max_rel_diff": float(diff.max())})
        del model, loaded


def weights_label(weights: str) -> str:
    return "random" if weights == "random" else Path(weights).name


def residual_section(plan: Plan, section: Section) -> None:
    """Completeness residuals on the example photos, float32 and under --amp's autocast."""
    from fgcli.engine import FullGrad

    def measure(name: str, loaded: Any) -> None:
        x = photo_batch(loaded.config).to(plan.device)
        row: dict[str, Any] = {"model": name, "images": len(x)}
        row["fp32"] = relative_residual(FullGrad(loaded.model).explain(x))
        amp = amp_context(plan.device)
        with amp:
            row["amp"] = relative_residual(FullGrad(loaded.model).explain(x))
        row["amp_dtype"] = str(amp.fast_dtype).removeprefix("torch.")
        section.rows.append(row)

    models = map_models(plan) + [(m, "random") for m in plan.models if m != plan.dump_model]
    for name, weights in models:
        section.check(name)
        per_model(plan, section, name, weights, measure)


def per_model(plan: Plan, section: Section, name: str, weights: str,
              measure: Callable[[str, Any], None]) -> None:
    """Load one model and ``measure(name, loaded)`` it: a failure becomes a note of the
    section (its time cap still ends the section), and the model's memory is released
    either way."""
    loaded = None
    try:
        loaded = load_model(name, weights, plan.device, plan.size)
        measure(name, loaded)
    except OutOfTime:
        raise
    except Exception as exc:  # noqa: BLE001 - one model's failure is a note
        section.notes.append(f"{name}: {failure(exc)}")
    finally:
        loaded = None
        release_memory(plan)


def relative_residual(exp: Any) -> float:
    """max |residual| / max(1, |logit|) over the batch (as scripts/amp_residual.py)."""
    logit = exp.logit.double().abs().clamp(min=1)
    return float((exp.residual.double().abs() / logit).max())


def synchronise(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def floor_fn(model: Any, x: Any) -> Callable[[], Any]:
    """Forward + backward of the summed top-1 logits to the input only (parameters
    frozen, as :func:`fgcli.models.load.load` leaves them)."""
    import torch

    def run() -> Any:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits = model(xg)
            top = logits.detach().argmax(1)
            (g,) = torch.autograd.grad(logits.gather(1, top[:, None]).sum(), xg)
        return g

    return run


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device: str
                ) -> dict[str, float]:
    """Median seconds of each fn, timed in turns (two warm-up calls each first)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(2):
        for fn in fns.values():
            fn()
    for _ in range(repeats):
        for key, fn in fns.items():
            synchronise(device)
            start = time.perf_counter()
            fn()
            synchronise(device)
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_mb(fn: Callable[[], Any], device: str) -> float | None:
    """Peak allocated GPU memory of one call (None on the CPU)."""
    import torch

    if not device.startswith("cuda"):
        return None
    synchronise(device)
    torch.cuda.reset_peak_memory_stats(torch.device(device))
    fn()
    synchronise(device)
    return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20


def engine_row(model: Any, name: str, batch: int, size: tuple[int, int], plan: Plan
               ) -> dict[str, Any]:
    """One model at one batch size: img/s of floor and engine, their ratio, peaks."""
    import torch

    from fgcli.engine import FullGrad

    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0))
    x = x.to(plan.device)
    fns = {"floor": floor_fn(model, x), "engine": lambda: FullGrad(model).saliency(x)}
    secs = interleaved(fns, plan.repeats, plan.device)
    return {"model": name, "batch": batch, "floor_img_s": batch / secs["floor"],
            "engine_img_s": batch / secs["engine"],
            "engine_floor": secs["floor"] / secs["engine"],
            "floor_peak_mb": peak_mb(fns["floor"], plan.device),
            "engine_peak_mb": peak_mb(fns["engine"], plan.device)}


def engine_section(plan: Plan, section: Section) -> None:
    """engine / floor per model and batch size; a model that fails is noted, not fatal."""
    def measure(name: str, loaded: Any) -> None:
        for batch in plan.batches:
            section.check(f"{name} at batch {batch}")
            section.rows.append(engine_row(loaded.model, name, batch, loaded.config.size,
                                           plan))

    for name in plan.models:
        section.check(name)
        per_model(plan, section, name, "random", measure)


# ---------------------------------------------------------------------------- photos, dumps

def photo_name(i: int) -> str:
    """Every 8th photo is a PNG, the rest JPEGs."""
    return f"img{i:05d}.png" if i % 8 == 7 else f"img{i:05d}.jpg"


def write_photo(folder: Path, i: int) -> None:
    """Photo ``i``: smooth random colour fields at two scales (textured enough for
    realistic JPEG sizes) at one of :data:`PHOTO_SIZES`, deterministic in ``i``. Pillow
    does the full-size work (it releases the GIL: threads make the photos in parallel)."""
    import numpy as np
    from PIL import Image

    w, h = PHOTO_SIZES[i % len(PHOTO_SIZES)]
    rng = np.random.default_rng(i)

    def colours(step: int) -> Image.Image:
        small = rng.integers(0, 256, (max(2, h // step), max(2, w // step), 3), dtype=np.uint8)
        return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)

    img = Image.blend(colours(32), colours(4), 0.25)
    name = photo_name(i)
    img.save(folder / name, **({"quality": 90} if name.endswith(".jpg") else {}))


def write_photos(folder: Path, n: int) -> Path:
    """``n`` synthetic photos in ``folder`` (made in threads, once: kept if present)."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(n) if not (folder / photo_name(i)).exists()]
    with ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
        list(pool.map(lambda i: write_photo(folder, i), todo))
    return folder


def child_env() -> dict[str, str]:
    """The environment of fgcli child processes: fgcli importable from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_child(cmd: list[str], timeout: float, env: dict[str, str], label: str
              ) -> dict[str, Any]:
    """Run ``cmd`` in its own process group: exit code, wall seconds and the CPU seconds
    of it and its children (decoding workers included). On timeout the group is killed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise OutOfTime(f"{label} still running after {timeout:.0f} s, killed") from None
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"exit": proc.returncode, "wall_s": wall, "cpu_s": cpu,
            "stderr": err.strip().splitlines()[-3:]}


def dump_args(plan: Plan, folder: Path, out: Path) -> list[str]:
    """``fullgrad dump`` arguments shared by the plain and the torchrun runs."""
    args = ["dump", str(folder), "-m", plan.dump_model, "--weights", "random", "-o", str(out),
            "--device", plan.device, "-q"]
    return args + (["--size", str(plan.size)] if plan.size else [])


def run_counts(out: Path) -> tuple[int | None, float | None]:
    """(ok images, seconds) from the run.json files of an output tree (shards summed)."""
    ok, seconds = None, None
    for path in sorted(out.rglob("run.json")):
        info = json.loads(path.read_text())
        ok = (ok or 0) + info["counts"]["ok"]
        seconds = max(seconds or 0.0, info["seconds"])
    return ok, seconds


def one_dump(plan: Plan, folder: Path, work: Path, jpeg: str, timeout: float
             ) -> dict[str, Any]:
    """One ``fullgrad dump`` (``--device-jpeg`` or not) of ``folder``: a table row."""
    out, peak_file = work / f"dump-{jpeg}", work / f"peak-{jpeg}.json"
    env = child_env() | {"GPU_CHECK_PEAK": str(peak_file)}
    flag = "--device-jpeg" if jpeg == "device" else "--no-device-jpeg"
    ran = run_child([sys.executable, "-c", DUMP_CHILD, *dump_args(plan, folder, out), flag],
                    timeout, env, f"the {jpeg} dump")
    ok, seconds = run_counts(out)
    peak = json.loads(peak_file.read_text()) if peak_file.exists() else None
    shutil.rmtree(out, ignore_errors=True)
    row = {"jpeg": jpeg, "images": plan.images, "ok": ok, "exit": ran["exit"],
           "wall_s": ran["wall_s"], "img_s": (ok or 0) / ran["wall_s"],
           "run_img_s": (ok or 0) / seconds if seconds else None,
           "cores": ran["cpu_s"] / ran["wall_s"],
           "peak_gpu_mb": peak / 2**20 if peak is not None else None}
    if ran["exit"] != 0:
        row["stderr"] = ran["stderr"]
    return row


def dump_section(plan: Plan, section: Section, work: Path) -> None:
    """The synthetic photos, then one dump with --device-jpeg and one without."""
    folder = write_photos(work / "photos", plan.images)
    section.notes.append(f"{plan.dump_model}, {plan.images} photos of "
                         f"{len(PHOTO_SIZES)} sizes from 320×240 to 1600×1200, every 8th a PNG")
    for jpeg in ("device", "pillow"):
        section.check(f"the {jpeg} dump")
        row = one_dump(plan, folder, work, jpeg, section.left())
        section.rows.append(row)
        if row["exit"] != 0:
            section.notes.append(f"{jpeg}: exit {row['exit']}: {' / '.join(row['stderr'])}")


def torchrun_section(plan: Plan, section: Section, work: Path) -> None:
    """``torchrun --standalone --nproc-per-node 1 -m fgcli dump`` on a subset of photos."""
    folder = work / "torchrun-photos"
    folder.mkdir(exist_ok=True)
    source = write_photos(work / "photos", plan.torchrun_images)
    for i in range(plan.torchrun_images):
        dest = folder / photo_name(i)
        if not dest.exists():
            os.link(source / photo_name(i), dest)
    out = work / "torchrun-out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", "1", "-m", "fgcli", *dump_args(plan, folder, out)]
    ran = run_child(cmd, section.left(), child_env(), "torchrun")
    ok, _ = run_counts(out)
    shutil.rmtree(out, ignore_errors=True)
    section.rows.append({"backend": "nccl" if plan.cuda else "gloo", "ranks": 1,
                         "images": plan.torchrun_images, "exit": ran["exit"], "ok": ok,
                         "wall_s": ran["wall_s"], "img_s": (ok or 0) / ran["wall_s"]})
    if ran["exit"] != 0:
        section.notes.append(f"exit {ran['exit']}: {' / '.join(ran['stderr'])}")


# ---------------------------------------------------------------------------- main

def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes everywhere (200-image dump, fewer repeats)")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="total seconds for all sections (default 420: with start-up, "
                             "under 8 minutes)")
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch folder for the photos and dumps (default: a temp folder)")
    hidden = argparse.SUPPRESS  # developer flags: a dry run on the CPU at tiny sizes
    parser.add_argument("--device", default="cuda", help=hidden)
    parser.add_argument("--models", nargs="+", default=None, help=hidden)
    parser.add_argument("--batches", nargs="+", type=int, default=None, help=hidden)
    parser.add_argument("--size", type=int, default=None, help=hidden)
    parser.add_argument("--images", type=int, default=None, help=hidden)
    parser.add_argument("--dump-model", default="resnet50", help=hidden)
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    images = args.images or (200 if args.quick else 2000)
    return Plan(device=args.device, out=args.out,
                models=tuple(args.models or ENGINE_MODELS),
                batches=tuple(args.batches or (32, 64)), size=args.size, images=images,
                torchrun_images=min(images, 64 if args.quick else 256),
                repeats=3 if args.quick else 5, budget=args.budget,
                dump_model=args.dump_model)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    plan = make_plan(args)
    deadline = time.monotonic() + plan.budget
    results = result_skeleton(plan, argv)
    write_results(results, plan.out)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = args.work or Path(tmp)
        sections: list[tuple[str, Callable[[Plan, Section], None]]] = [
            ("maps", maps_section), ("residuals", residual_section),
            ("engine", engine_section),
            ("dump", lambda p, s: dump_section(p, s, work)),
            ("torchrun", lambda p, s: torchrun_section(p, s, work))]
        for name, fn in sections:
            run_section(results, plan, name, fn, deadline)
    print(f"gpu_check: wrote {plan.out / 'gpu_check.json'} and {plan.out / 'gpu_check.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
