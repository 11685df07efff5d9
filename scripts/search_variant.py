"""Issue #12 item 3: a small, honest search for a FullGrad variant that beats Grad-CAM.

Chooses one candidate on a *selection* set of photos with a rule fixed in advance, then
reports every candidate on a disjoint *report* set. Protocol and results:
docs/variant-search.md. Reproduce (about 10 minutes on 2 CPU cores):

    OMP_WAIT_POLICY=PASSIVE python scripts/search_variant.py > scripts/variant-search.txt

Only the shipped real weights exist here (torchvision squeezenet1_1), so this is one
model and six photos; each photo is used at six deterministic views (the whole image
squashed to 224, its horizontal flip, and the four corner crops of 75 % of each side).
The views of a photo are correlated: they are not independent images, so standard errors
over views understate the uncertainty. Per-photo numbers are printed too.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fgcli.config import ModelSpec
from fgcli.data.decode import decode, resize_normalise
from fgcli.engine import FullGrad, SimpleFullGrad, SmoothFullGrad
from fgcli.evaluate import metrics as M
from fgcli.evaluate.methods import build, last_spatial_module
from fgcli.models.load import load

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "examples/weights/squeezenet1_1_imagenet.pth"
PHOTOS = ROOT / "examples/photos"
SELECTION = ("astronaut.png", "coffee.png", "rocket.jpg")
REPORT = ("chelsea.png", "grace_hopper.jpg", "hubble_deep_field.jpg")
VIEWS = ("full", "flip", "crop-tl", "crop-tr", "crop-bl", "crop-br")
CROP = 0.75  # corner crops keep 75 % of each side
KS = (10.0, 30.0, 50.0, 70.0, 90.0)
STEPS = 20
SMOOTH_SAMPLES = 10
SEED = 0
MAX_BATCH = 8  # perturbed copies per forward: fastest for squeezenet on this CPU
COLUMNS = [f"pert {k:g}%" for k in KS] + ["deletion AUC", "insertion AUC"]
LOWER_IS_BETTER = [True] * len(KS) + [True, False]

# name -> what it is; every name but the last two may be chosen
CANDIDATES = {
    "fullgrad": "FullGrad, psi abs-rescale, all 26 layers (fgcli's default)",
    "fullgrad-signed": "FullGrad, psi signed",
    "fullgrad-abs": "FullGrad, psi abs",
    "fullgrad-positive": "FullGrad, psi positive",
    "fullgrad-L4": "FullGrad, last 4 spatial layers (--layers 4)",
    "fullgrad-L8": "FullGrad, last 8 spatial layers",
    "fullgrad-L13": "FullGrad, last 13 spatial layers",
    "fullgrad-L20": "FullGrad, last 20 spatial layers",
    "simple": "SimpleFullGrad",
    "smooth-0.15": f"SmoothFullGrad, {SMOOTH_SAMPLES} samples, sigma 0.15",
    "smooth-0.30": f"SmoothFullGrad, {SMOOTH_SAMPLES} samples, sigma 0.30",
    "fullgrad*gradcam": "n(fullgrad) * n(gradcam), n = per-image min-max to [0, 1]",
    "fullgrad+gradcam": "(n(fullgrad) + n(gradcam)) / 2",
    "positive+smooth": "(n(fullgrad-positive) + n(smooth-0.15)) / 2",
    "gradcam": "baseline: Grad-CAM on the last NCHW layer (captum LayerGradCam), not eligible",
    "random": "floor: seeded uniform noise, not eligible",
}
NOT_ELIGIBLE = ("gradcam", "random")


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def views(path: Path, proc) -> torch.Tensor:
    """(6, 3, H, W) model inputs: the photo's deterministic views, squashed to the input."""
    rgb = torch.from_numpy(np.ascontiguousarray(decode(str(path), 1 << 30)))
    t = rgb.permute(2, 0, 1)[None]  # (1, 3, H, W) in [0, 1]
    h, w = t.shape[2], t.shape[3]
    ch, cw = round(CROP * h), round(CROP * w)
    regions = {
        "full": t,
        "flip": t.flip(3),
        "crop-tl": t[:, :, :ch, :cw],
        "crop-tr": t[:, :, :ch, w - cw:],
        "crop-bl": t[:, :, h - ch:, :cw],
        "crop-br": t[:, :, h - ch:, w - cw:],
    }
    out = [resize_normalise(regions[v].contiguous(), proc.size, False, proc.resize, proc.mean,
                            proc.std, proc.interpolation)[0] for v in VIEWS]
    return torch.stack(out)


def minmax(m: torch.Tensor) -> torch.Tensor:
    """Per-image min-max to [0, 1] (a constant map becomes 0)."""
    flat = m.reshape(m.shape[0], -1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(m)


def all_maps(model, x: torch.Tensor, target: torch.Tensor, proc) -> dict[str, torch.Tensor]:
    """Every candidate's (N, H, W) map for the batch."""
    maps: dict[str, torch.Tensor] = {}

    def engine_map(engine) -> torch.Tensor:
        return torch.cat([engine.saliency(x[s:s + 6], target[s:s + 6])[:, 0].float()
                          for s in range(0, len(x), 6)])

    for psi in ("abs-rescale", "signed", "abs", "positive"):
        name = "fullgrad" if psi == "abs-rescale" else f"fullgrad-{psi}"
        maps[name] = engine_map(FullGrad(model, psi=psi))
    for k in (4, 8, 13, 20):
        maps[f"fullgrad-L{k}"] = engine_map(FullGrad(model, layers=k))
    maps["simple"] = engine_map(SimpleFullGrad(model))
    for sigma in (0.15, 0.30):
        maps[f"smooth-{sigma:.2f}"] = engine_map(
            SmoothFullGrad(model, n_samples=SMOOTH_SAMPLES, sigma=sigma, seed=SEED))
    gradcam = build("gradcam", model, samples=1, seed=SEED, mean=proc.mean, std=proc.std)
    maps["gradcam"] = torch.cat([gradcam(model, x[s:s + 6], target[s:s + 6])
                                 for s in range(0, len(x), 6)])
    fg, cam = minmax(maps["fullgrad"]), minmax(maps["gradcam"])
    maps["fullgrad*gradcam"] = fg * cam
    maps["fullgrad+gradcam"] = (fg + cam) / 2
    maps["positive+smooth"] = (minmax(maps["fullgrad-positive"])
                               + minmax(maps["smooth-0.15"])) / 2
    g = torch.Generator().manual_seed(SEED)
    maps["random"] = torch.rand(x.shape[0], x.shape[2], x.shape[3], generator=g)
    return {name: maps[name] for name in CANDIDATES}


def score(model, x, maps, target, norm) -> dict[str, np.ndarray]:
    """name -> (N, 7): pixel perturbation at each k, deletion AUC, insertion AUC."""
    out = {}
    for name, m in maps.items():
        started = time.perf_counter()
        pert = M.pixel_perturbation(model, x, m, ks=KS, norm=norm, target=target,
                                    max_batch=MAX_BATCH)
        dele = M.deletion_auc(model, x, m, norm=norm, steps=STEPS, target=target,
                              max_batch=MAX_BATCH)
        ins = M.insertion_auc(model, x, m, norm=norm, steps=STEPS, target=target,
                              max_batch=MAX_BATCH)
        out[name] = torch.cat([pert, dele[:, None], ins[:, None]], 1).double().numpy()
        log(f"  {name}: {time.perf_counter() - started:.1f} s")
    return out


def mean_se(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return v.mean(0), v.std(0, ddof=1) / math.sqrt(v.shape[0])


def table(values: dict[str, np.ndarray], title: str) -> None:
    print(f"\n{title}")
    print(f"| method | {' | '.join(COLUMNS)} |")
    print("|---|" + "---|" * len(COLUMNS))
    means = {n: v.mean(0) for n, v in values.items()}
    best = [min(means.values(), key=lambda m: m[j] if low else -m[j])[j]
            for j, low in enumerate(LOWER_IS_BETTER)]
    for name, v in values.items():
        mean, se = mean_se(v)
        cells = []
        for j in range(len(COLUMNS)):
            cell = f"{mean[j]:.3f} ± {se[j]:.3f}"
            cells.append(f"**{cell}**" if mean[j] == best[j] else cell)
        print(f"| {name} | {' | '.join(cells)} |")
    print("(bold: best mean in the column over every row, random included)")


def ranks(values: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """Rank (1 = best, ties averaged) of each name's mean, per column, among ``names``."""
    means = np.stack([values[n].mean(0) for n in names])  # (C, 7)
    signed = np.where(LOWER_IS_BETTER, means, -means)
    out = np.zeros_like(signed)
    for j in range(signed.shape[1]):
        col = signed[:, j]
        for i in range(len(names)):
            out[i, j] = 1 + (col < col[i]).sum() + 0.5 * ((col == col[i]).sum() - 1)
    return {n: out[i] for i, n in enumerate(names)}


def per_photo(values: dict[str, np.ndarray], photos: tuple[str, ...], title: str) -> None:
    print(f"\n{title}: per-photo means over its {len(VIEWS)} views")
    print("| method | photo | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for name, v in values.items():
        for p, photo in enumerate(photos):
            row = v[p * len(VIEWS):(p + 1) * len(VIEWS)].mean(0)
            print(f"| {name} | {photo} | " + " | ".join(f"{r:.3f}" for r in row) + " |")


def run_set(model, photos, proc, norm, label):
    x = torch.cat([views(PHOTOS / p, proc) for p in photos])
    with torch.no_grad():
        logits = model(x)
    target = logits.argmax(1)
    prob = torch.softmax(logits, 1).gather(1, target[:, None])[:, 0]
    print(f"\n{label} set: {', '.join(photos)} x views {', '.join(VIEWS)} = {len(x)} inputs")
    for i in range(len(x)):
        photo, view = photos[i // len(VIEWS)], VIEWS[i % len(VIEWS)]
        print(f"  {photo:22s} {view:8s} top-1 class {int(target[i]):4d} "
              f"p = {float(prob[i]):.3f}")
    started = time.perf_counter()
    maps = all_maps(model, x, target, proc)
    log(f"{label}: maps in {time.perf_counter() - started:.1f} s")
    values = score(model, x, maps, target, norm)
    log(f"{label}: scored in {time.perf_counter() - started:.1f} s")
    return values


def main() -> None:
    torch.manual_seed(SEED)
    started = time.perf_counter()
    loaded = load(ModelSpec("squeezenet1_1", str(WEIGHTS)), "cpu")
    model = loaded.model.to(memory_format=torch.channels_last)  # ~2x faster here
    proc = loaded.config
    norm = M.Normalisation(tuple(proc.mean), tuple(proc.std))
    probe = views(PHOTOS / SELECTION[0], proc)[:1]
    spatial = [i.name for i in FullGrad(model).explain(probe).layers if i.in_map]
    print(f"model: squeezenet1_1, weights {WEIGHTS.name}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"spatial layers in the map: {len(spatial)}; Grad-CAM layer: "
          f"{last_spatial_module(model, probe)}")
    print(f"metrics: pixel perturbation at k = {', '.join(f'{k:g}' for k in KS)} %, "
          f"deletion / insertion AUC with {STEPS} steps; mean ± SE over views")
    print("\ncandidates:")
    for name, what in CANDIDATES.items():
        print(f"  {name:18s} {what}")
    print("\nselection rule (fixed before looking): among the eligible candidates, the lowest "
          "mean rank over the 7 numbers (5 ks, deletion, insertion; ranks of the means, ties "
          "averaged); ties broken by the lower mean pixel perturbation over the ks")

    sel = run_set(model, SELECTION, proc, norm, "selection")
    table(sel, "SELECTION set (mean ± SE over 18 correlated views of 3 photos)")
    eligible = [n for n in CANDIDATES if n not in NOT_ELIGIBLE]
    r = ranks(sel, eligible)
    order = sorted(eligible, key=lambda n: (r[n].mean(), sel[n][:, :len(KS)].mean()))
    print("\nselection: ranks among the eligible candidates (1 = best)")
    print("| method | " + " | ".join(COLUMNS) + " | mean rank |")
    print("|---|" + "---|" * (len(COLUMNS) + 1))
    for n in order:
        print(f"| {n} | " + " | ".join(f"{v:g}" for v in r[n]) + f" | {r[n].mean():.2f} |")
    chosen = order[0]
    print(f"\nCHOSEN on the selection set: {chosen} ({CANDIDATES[chosen]})")
    per_photo(sel, SELECTION, "selection")

    rep = run_set(model, REPORT, proc, norm, "report")
    table(rep, "REPORT set (mean ± SE over 18 correlated views of 3 photos)")
    per_photo(rep, REPORT, "report")

    print(f"\nreport set: does {chosen} win each number (best mean over every other row)?")
    wins = 0
    for j, col in enumerate(COLUMNS):
        means = {n: v[:, j].mean() for n, v in rep.items()}
        best = (min if LOWER_IS_BETTER[j] else max)(means, key=means.get)
        won = best == chosen
        wins += won
        print(f"  {col:14s} best: {best:18s} {means[best]:.3f}   {chosen}: {means[chosen]:.3f}"
              f"   {'WIN' if won else 'no'}")
    print(f"  {chosen} wins {wins} of {len(COLUMNS)}")
    rivals = [n for n in rep if n != "random"]
    wins_nr = sum(
        (min if LOWER_IS_BETTER[j] else max)(rivals, key=lambda n: rep[n][:, j].mean()) == chosen
        for j in range(len(COLUMNS)))
    print(f"  leaving the random floor out of the comparison: {wins_nr} of {len(COLUMNS)}")

    print(f"\nreport set: paired difference {chosen} - gradcam per view (mean ± SE over 18 "
          "views; better for the chosen one: negative, except insertion: positive) and per "
          "photo")
    d = rep[chosen] - rep["gradcam"]
    mean, se = mean_se(d)
    for j, col in enumerate(COLUMNS):
        photos = [d[p * len(VIEWS):(p + 1) * len(VIEWS), j].mean() for p in range(len(REPORT))]
        print(f"  {col:14s} {mean[j]:+.3f} ± {se[j]:.3f}   per photo: "
              + ", ".join(f"{v:+.3f}" for v in photos))

    print("\nraw per-view values (set, photo, view, method, 7 numbers)")
    print("set,photo,view,method," + ",".join(c.replace(" ", "_") for c in COLUMNS))
    for label, photos, values in (("selection", SELECTION, sel), ("report", REPORT, rep)):
        for name, v in values.items():
            for i in range(v.shape[0]):
                photo, view = photos[i // len(VIEWS)], VIEWS[i % len(VIEWS)]
                print(f"{label},{photo},{view},{name}," + ",".join(f"{a:.6f}" for a in v[i]))
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")
    log(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
