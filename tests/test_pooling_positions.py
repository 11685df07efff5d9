"""Pixel positions through pooling reductions of tracked tokens (Hiera's max-pool over
unrolled tokens): the pooled tokens sit on a grid twice as coarse, at their own cells,
even when their order is not row-major."""

from __future__ import annotations

import torch
from helpers import randomise
from torch import nn

from fgcli import FullGrad


class UnrolledPool(nn.Module):
    """conv -> tokens unrolled so each 2x2 block's pixels lead (coarse cells column-major)
    -> max over the block -> linear on the pooled tokens -> head."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.proj = nn.Linear(c, c)
        self.head = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], self.conv.out_channels
        f = self.conv(x)  # (N, C, 8, 8); pixel (2R + dy, 2Q + dx)
        t = f.view(n, c, 4, 2, 4, 2).permute(0, 3, 5, 4, 2, 1).reshape(n, 64, c)
        pooled = t.view(n, 4, 16, c).amax(dim=1)  # token Q * 4 + R: cell (R, Q)
        return self.head(torch.tanh(self.proj(pooled)).mean(1))


def test_pooled_tokens_sit_on_their_coarse_cells():
    torch.manual_seed(0)
    model = randomise(UnrolledPool().double())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fg = FullGrad(model)
    dec = fg.decompose(x)
    exp = fg.explain(x, compact=True)
    layer = next(info for info in exp.layers if info.name == "proj")
    assert layer.in_map and layer.layout.kind == "tracked" and layer.layout.grid == (4, 4)
    term = dec.bias_terms["proj"].sum(-1)  # (N, 16): token Q * 4 + R
    expected = term.view(2, 4, 4).transpose(1, 2)  # [n, R, Q]
    torch.testing.assert_close(exp.compact.layers["proj"].double(), expected, rtol=1e-6,
                               atol=1e-9)
    assert (dec.residual.abs() < 1e-10).all()


class ChannelSum(nn.Module):
    """Column-major tokens whose channel halves are summed: every element of a pixel."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.proj = nn.Linear(c // 2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], self.conv.out_channels
        t = self.conv(x).permute(0, 3, 2, 1).reshape(n, 64, c)  # token Q * 8 + R
        halves = t.view(n, 64, 2, c // 2).sum(2)
        return self.head(torch.tanh(self.proj(halves)).mean(1))


def test_a_reduction_along_channels_keeps_each_pixel():
    torch.manual_seed(0)
    model = randomise(ChannelSum().double())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fg = FullGrad(model)
    term = fg.decompose(x).bias_terms["proj"].sum(-1)  # (N, 64): token Q * 8 + R
    exp = fg.explain(x, compact=True)
    torch.testing.assert_close(exp.compact.layers["proj"].double(),
                               term.view(2, 8, 8).transpose(1, 2), rtol=1e-6, atol=1e-9)
