"""Completeness: logit = sum(input term) + sum(bias terms), for real architectures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from helpers import ROOT, SQUEEZENET_WEIGHTS, assert_complete, random_images, randomise
from PIL import Image

from fgcli import FullGrad

MODELS = [
    "vgg11", "vgg16_bn", "resnet18", "resnet50", "densenet121", "squeezenet1_1",
    "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf",
    "convnext_tiny", "googlenet",
]
# a second model of a family above (vgg, resnet): the full tier only
SECOND = {"vgg16_bn", "resnet50"}
# networks whose non-homogeneous ops carry implicit biases the reference misses
IMPLICIT = {
    "mobilenet_v2": {"activation"},  # ReLU6 where saturated
    "mobilenet_v3_small": {"activation", "product"},  # hardswish, squeeze-excitation
    "efficientnet_b0": {"activation", "product"},  # SiLU, squeeze-excitation
    "regnet_y_400mf": {"activation", "product"},
    "convnext_tiny": {"normalisation", "activation"},  # LayerNorm, GELU
}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"init_weights": False} if name == "googlenet" else {}
    return randomise(torchvision.models.get_model(name, weights=None, **kwargs))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SECOND else n
                                  for n in MODELS])
def test_completeness_float32(name):
    model = _model(name)
    x = random_images(2, size=64)
    dec = FullGrad(model).decompose(x)
    assert_complete(dec.logit, dec.residual)

    bias_sum = sum(t.reshape(2, -1).sum(1, dtype=torch.float64) for t in dec.bias_terms.values())
    # bias terms are not trivially zero with these weights
    assert (bias_sum.abs() > 1e-3 * dec.logit.double().abs()).all(), bias_sum
    kinds = {layer.kind for layer in dec.layers}
    assert IMPLICIT.get(name, set()) <= kinds, kinds
    if name not in IMPLICIT:
        assert kinds <= {"conv", "linear", "norm"}, kinds  # ReLU/BN nets: the reference's set

    # the map-building path computes the same residual
    assert_complete(dec.logit, FullGrad(model).explain(x).residual)


@pytest.mark.parametrize("name", sorted(IMPLICIT))
def test_implicit_biases_are_needed(name):
    """Without the implicit-bias ops (what the reference counts) completeness fails."""
    model = _model(name)
    x = random_images(2, size=64)
    dec = FullGrad(model).decompose(x)
    closed = sum(t.reshape(2, -1).sum(1, dtype=torch.float64)
                 for layer, t in zip(dec.layers, dec.bias_terms.values()) if layer.closed_form)
    partial = dec.logit.double() - dec.input_term.reshape(2, -1).sum(1, dtype=torch.float64) - closed
    assert (partial.abs() > 1e-2 * dec.logit.double().abs().clamp(min=1.0)).any(), partial


def _photos(names: list[str]) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    out = []
    for name in names:
        img = Image.open(ROOT / "examples" / "photos" / name).convert("RGB").resize((224, 224))
        t = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
        out.append((t - mean) / std)
    return torch.stack(out)


def test_completeness_real_squeezenet_weights():
    model = torchvision.models.squeezenet1_1()
    model.load_state_dict(torch.load(SQUEEZENET_WEIGHTS, weights_only=True))
    x = _photos(["chelsea.png", "coffee.png", "grace_hopper.jpg"])
    dec = FullGrad(model.eval()).decompose(x)
    assert_complete(dec.logit, dec.residual)
    assert dec.target[1].item() == 967  # espresso: the weights are really loaded
    assert len(dec.bias_terms) == 26 and all(layer.kind == "conv" for layer in dec.layers)
