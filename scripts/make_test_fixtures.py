"""Copy the parts of the golden reference fixtures the tests need into tests/fixtures/.

Usage: python scripts/make_test_fixtures.py [SHARED_REFERENCE_DIR]
(default ../shared/fixtures/reference). Users never have ../shared; the
reduced copies are committed so the test suite is self-contained.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

KEEP = (
    "inputs", "logits", "pred", "fullgrad", "simple_fullgrad", "input_term", "bias_grad_sums",
    "layer_names", "layer_in_saliency", "target_logit", "completeness_residual", "meta",
)


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else root.parent / "shared/fixtures/reference"
    dst = root / "tests/fixtures/reference"
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("resnet18", "vgg16_bn"):
        data = np.load(src / f"{name}.npz")
        np.savez_compressed(dst / f"{name}.npz", **{k: data[k] for k in KEEP})
    data = np.load(src / "resnet18_biasgrads_img0.npz")
    np.savez_compressed(dst / "resnet18_biasgrads_img0.npz", **{k: data[k] for k in data.files})
    (dst / "README.md").write_text((src / "README.md").read_text())


if __name__ == "__main__":
    main()
