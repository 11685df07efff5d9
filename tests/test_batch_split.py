"""Per-image completeness when the batch is not where the shape says (fgcli.engine.positions
image indices): each image's bias terms must be its own, whatever the layout.

Each model below has a bias-carrying layer whose batch a shape rule reads wrongly: the
batch merged into dim 0 beside a dim of size N (heads == N), or the batch moved out of
dim 0 while another dim has size N. With a batch of two, every image's decomposition
must equal the one it gets alone, layer by layer.
"""

from __future__ import annotations

import pytest
import torch
from helpers import random_images
from torch import nn

from fgcli import FullGrad
from fgcli.engine import decompose
from fgcli.engine.postprocess import per_image_sum


class MergedHeads(nn.Module):
    """(N, 4, h, w) -> (N * 2 heads, 2, h * w) -> summed per head -> (2N, 2): dim 0 is the
    batch merged with heads, dim 1 has size 2 == N."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        n = z.shape[0]
        heads = z.reshape(n, 2, 2, -1).flatten(0, 1)  # (2N, 2, h*w)
        pooled = torch.tanh(heads.sum(-1))  # (2N, 2): an implicit bias per head
        return self.fc(pooled.reshape(n, 4))


class BatchSecond(nn.Module):
    """(N, 2, h, w) transposed to (2, N, h, w): dim 0 has size 2 == N but is the channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.sigmoid(self.conv(x).transpose(0, 1))  # (C=2, N, h, w)
        return self.fc(z.mean((2, 3)).t())


def _randomised(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("cls", [MergedHeads, BatchSecond])
def test_each_image_gets_its_own_terms(cls):
    model = _randomised(cls())
    x = random_images(2, size=4, dtype=torch.float64)
    fg = FullGrad(model)
    dec = fg.decompose(x)
    assert all(layer.split == "images" for layer in dec.layers)
    assert dec.residual.abs().max() < 1e-10
    exp = fg.explain(x, compact=True)
    assert exp.residual.abs().max() < 1e-10
    for j in range(2):
        alone = fg.decompose(x[j:j + 1], target=dec.target[j:j + 1])
        for layer in dec.layers:
            both = per_image_sum(dec.bias_terms[layer.name], layer.layout, 2, torch.float64,
                                 _images(fg, x, layer.name))
            assert torch.allclose(both[j], alone.bias_terms[layer.name].sum(), atol=1e-10)


def _images(fg: FullGrad, x: torch.Tensor, name: str) -> torch.Tensor:
    """The image index the engine recorded for ``name`` (read through a sink)."""
    seen: dict[str, torch.Tensor] = {}

    class Sink:
        def layer(self, index, info, grad, bias, positions, images=None):
            if info.name == name:
                seen[name] = images

    decompose.run_pass(fg.model, x, None, Sink())
    return seen[name]


@pytest.mark.parametrize("cls", [MergedHeads, BatchSecond])
def test_shape_rule_alone_would_split_wrongly(cls, monkeypatch):
    """Without image indices the same models' per-image residuals are wrong: the test
    above has teeth."""
    model = _randomised(cls())
    x = random_images(2, size=4, dtype=torch.float64)
    monkeypatch.setattr(decompose.BiasTracer, "start_images", lambda self, x: None)
    dec = FullGrad(model).decompose(x)
    assert any(layer.split == "shape" for layer in dec.layers)
    assert dec.residual.abs().max() > 1e-3
    assert abs(float(dec.residual.sum())) < 1e-10  # the batch total is still right
