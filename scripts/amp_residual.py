"""Completeness residual and map agreement under --amp (autocast), against float32.

    python scripts/amp_residual.py --models resnet50 efficientnet_b0 --device cpu

On the CPU autocast runs in bfloat16, on CUDA in float16 (as ``fullgrad dump --amp``).
Prints, per model, the largest |residual| / max(1, |logit|) in float32 and under autocast,
and the correlation and max relative difference of the maps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16_bn",
                                                        "efficientnet_b0"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()

    from conftest import randomise

    from fgcli import FullGrad

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    x = torch.randn(args.batch_size, 3, args.size, args.size,
                    generator=torch.Generator().manual_seed(0)).to(device)
    print(f"{'model':18s}{'fp32 residual':>15s}{'amp residual':>15s}{'map corr':>10s}"
          f"{'map max diff':>14s}   ({dtype}, {device})")
    for name in args.models:
        torch.manual_seed(0)
        model = randomise(torchvision.models.get_model(name)).to(device)
        ref = FullGrad(model).explain(x)
        with torch.autocast(device.type, dtype=dtype):
            low = FullGrad(model).explain(x)

        def rel(e) -> float:
            return float((e.residual.abs() / e.logit.double().abs().clamp(min=1)).max())

        a, b = ref.maps.flatten().cpu().numpy(), low.maps.flatten().cpu().numpy()
        corr = float(np.corrcoef(a, b)[0, 1])
        diff = float(np.abs(a - b).max() / np.abs(a).max())
        print(f"{name:18s}{rel(ref):15.1e}{rel(low):15.1e}{corr:10.4f}{diff:14.3f}")


if __name__ == "__main__":
    main()
