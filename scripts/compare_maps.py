"""Maps of one checkout against another's, on the example photos (engine changes).

Seeded random weights per model, the photos preprocessed at 224 px, FullGrad maps and
completeness residuals saved by one checkout and compared by another:

    PYTHONPATH=/old/checkout/src python scripts/compare_maps.py --save /tmp/before.pt
    python scripts/compare_maps.py --against /tmp/before.pt

prints per model the largest map difference relative to the map's maximum and both
residuals (relative to the logit); exits 1 when a map moved by more than ``--tolerance``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("efficientnet_b0", "convnext_tiny", "vit_b_16", "swin_t", "maxvit_t",
          "mobilenet_v3_small", "resnet50", "regnet_y_400mf")


def photos(size: int = 224) -> torch.Tensor:
    """The example photos as one normalised (N, 3, size, size) batch."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    batch = []
    for path in sorted((ROOT / "examples" / "photos").iterdir()):
        if path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        rgb = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
        t = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float() / 255
        batch.append((t - mean) / std)
    return torch.stack(batch)


def maps(name: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    from fgcli.engine import FullGrad

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    with torch.no_grad():  # no zero-initialised head: a live logit for every class
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.weight.abs().max() == 0:
                m.weight.normal_(0, 0.01)
    e = FullGrad(model).explain(x)
    return {"maps": e.maps, "residual": e.residual / e.logit.abs().clamp_min(1e-12)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", type=Path)
    parser.add_argument("--against", type=Path)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    x = photos()
    new = {name: maps(name, x) for name in args.models.split(",")}
    if args.save:
        torch.save(new, args.save)
    if not args.against:
        return
    old = torch.load(args.against)
    worst = 0.0
    for name, cur in new.items():
        ref = old[name]
        diff = ((cur["maps"] - ref["maps"]).abs().amax() / ref["maps"].abs().amax()).item()
        worst = max(worst, diff)
        print(f"{name:20s} max |map - before| / max map = {diff:.1e}; residual/logit "
              f"before {ref['residual'].abs().max():.1e}, now {cur['residual'].abs().max():.1e}")
    sys.exit(1 if worst > args.tolerance else 0)


if __name__ == "__main__":
    main()
