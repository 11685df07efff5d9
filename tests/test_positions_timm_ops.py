"""Pixel positions through the ops timm's hybrid models use (fgcli.engine.positions).

A float64 block with, on a 4x4 grid and a batch of two: batch norm on tokens flattened
to (N * L, C) (LeViT), a softmax over the token dim (CoaT's keys), a 3x3 conv on windows
merged into the batch (EfficientViT-M), attention scores and ``v @ attn.T`` with
channels-first values (EfficientViT-M, CoaT). The compact decomposition of each layer
must equal its bias term mapped back to pixels by hand-written inverse ops; a wrong
position rule moves sums between pixels and fails.
"""

from __future__ import annotations

import torch
from helpers import random_images
from torch import nn

from fgcli import FullGrad

N, C, H, W, WS = 2, 4, 4, 4, 2


def unwindow(t: torch.Tensor) -> torch.Tensor:
    """(N * windows, C, WS, WS) -> (N, C, H, W)."""
    t = t.reshape(N, H // WS, W // WS, C, WS, WS).permute(0, 3, 1, 4, 2, 5)
    return t.reshape(N, C, H, W)


class HybridBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 1)
        self.bn = nn.BatchNorm1d(C)
        self.wconv = nn.Conv2d(C, C, 3, padding=1, groups=C)
        self.q = nn.Linear(C, C)
        self.head = nn.Linear(C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.stem(x)  # (N, C, H, W)
        n = z.shape[0]
        tokens = z.flatten(2).transpose(1, 2)  # (N, L, C)
        tokens = self.bn(tokens.flatten(0, 1)).reshape_as(tokens)  # batch norm on (N*L, C)
        keys = tokens.softmax(dim=1)  # normalised over the pixels, per channel
        grid = tokens.transpose(1, 2).reshape(n, C, H, W)
        win = grid.view(n, C, H // WS, WS, W // WS, WS).permute(0, 2, 4, 1, 3, 5)
        win = self.wconv(win.reshape(-1, C, WS, WS))  # a conv on windows
        back = win.reshape(n, H // WS, W // WS, C, WS, WS).permute(0, 3, 1, 4, 2, 5)
        v = back.reshape(n, C, H * W)  # channels-first values (N, C, L)
        scores = (self.q(tokens) @ keys.transpose(1, 2)).softmax(-1)  # (N, Lq, Lk)
        out = v @ scores.transpose(-2, -1)  # (N, C, Lq): column j is query pixel j
        return self.head(out.mean(-1))


def test_hybrid_ops_map_back_to_their_pixels():
    torch.manual_seed(0)
    model = HybridBlock().double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
        model.bn.running_mean.copy_(torch.randn(C))
        model.bn.running_var.copy_(torch.rand(C) + 0.5)
    x = random_images(N, size=H, dtype=torch.float64)
    fg = FullGrad(model)
    exp = fg.explain(x, target=1, compact=True)
    dec = fg.decompose(x, target=1)
    layers = {layer.name: layer for layer in exp.layers}
    terms = dec.bias_terms

    def by_op(op: str, index: int = 0) -> str:
        return [name for name, layer in layers.items() if layer.op == op][index]

    expected = {
        "bn": terms["bn"].reshape(N, H, W, C).sum(-1),
        by_op("softmax", 0): terms[by_op("softmax", 0)].sum(-1).reshape(N, H, W),
        "wconv": unwindow(terms["wconv"]).sum(1),
        "q": terms["q"].sum(-1).reshape(N, H, W),
        by_op("softmax", 1): terms[by_op("softmax", 1)].sum(-1).reshape(N, H, W),
        by_op("matmul", 1): terms[by_op("matmul", 1)].sum(1).reshape(N, H, W),
    }
    for name, grid in expected.items():
        layer = layers[name]
        assert layer.in_map and layer.layout.grid == (H, W), layer
        assert layer.split == "images"
        assert torch.allclose(exp.compact.layers[name].double(), grid, atol=1e-10), name
        assert grid.abs().max() > 1e-6
    # the wrong reading of ``v @ attn.T`` (rows: the value's channels) is not a pixel grid
    assert layers["wconv"].layout.kind == "tracked"
    assert exp.residual.abs().max() < 1e-10
    assert [layer.excluded for layer in exp.layers if not layer.in_map] == ["vector"]


def test_excluded_reasons_and_check_field():
    from fgcli.check import check_batch

    torch.manual_seed(0)
    model = HybridBlock().double()
    x = random_images(N, size=H, dtype=torch.float64)
    result = check_batch(model, "hybrid", x, ["a", "b"])
    assert result.excluded == {"vector": ["head"]} and result.split_by_shape == []
    assert set(result.map_layers) | {"head"} == {
        layer for layer in result.map_layers + result.other_layers}
