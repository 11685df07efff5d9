"""Pixel positions tracked through windowing ops (fgcli.engine.positions).

A tiny Swin-like block, float64: pad to a multiple of the window, cyclic shift,
window partition with the batch merged into windows, a constant added per window
position, attention scores, and the way back. The compact decomposition of each
tracked layer must equal that layer's bias term mapped back to pixels by the
*inverse* ops written out by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_complete, random_images
from torch import nn

from fgcli import FullGrad

WS = 2  # window size


def unwindow(t: torch.Tensor, n: int, hp: int, wp: int) -> torch.Tensor:
    """(n * windows, WS * WS, C) -> (n, hp, wp, C): the inverse of the partition."""
    c = t.shape[-1]
    t = t.reshape(n, hp // WS, wp // WS, WS, WS, c).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(n, hp, wp, c)


class WindowBlock(nn.Module):
    def __init__(self, shift: int) -> None:
        super().__init__()
        self.shift = shift
        self.conv = nn.Conv2d(3, 4, 1)
        self.q = nn.Linear(4, 4)
        self.k = nn.Linear(4, 4)
        self.register_buffer("table", torch.randn(WS * WS, 4, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x).permute(0, 2, 3, 1)  # (N, H, W, C): a grid, channels last
        n, h, w, c = z.shape
        z = F.pad(z, (0, 0, 0, (-w) % WS, 0, (-h) % WS))
        hp, wp = z.shape[1], z.shape[2]
        z = torch.roll(z, shifts=(-self.shift, -self.shift), dims=(1, 2))
        win = z.view(n, hp // WS, WS, wp // WS, WS, c).permute(0, 1, 3, 2, 4, 5)
        win = win.reshape(-1, WS * WS, c)  # windows merged into the batch
        win = win + self.table  # a constant per position in the window
        scores = self.q(win) @ self.k(win).transpose(-2, -1)  # (N * nW, L, L)
        attn = scores.softmax(-1) @ win
        back = torch.roll(unwindow(attn, n, hp, wp), shifts=(self.shift, self.shift),
                          dims=(1, 2))[:, :h, :w, :]
        return back.mean((1, 2))  # (N, C) logits


def expected_grid(term: torch.Tensor, n: int, h: int, w: int, shift: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A windowed term summed per pixel (by the inverse ops), and the rest (padding)."""
    hp, wp = h + (-h) % WS, w + (-w) % WS
    c = term.shape[-1]
    full = torch.roll(unwindow(term.reshape(-1, WS * WS, c), n, hp, wp), (shift, shift), (1, 2))
    on_grid = full[:, :h, :w, :].sum(-1)
    return on_grid, full.sum((1, 2, 3)) - on_grid.sum((1, 2))


def test_windowed_layers_map_back_to_their_pixels():
    torch.manual_seed(0)
    model = WindowBlock(shift=1).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    x = random_images(2, size=5, dtype=torch.float64)  # 5x5: padded to 6x6
    fg = FullGrad(model)
    exp = fg.explain(x, target=1, compact=True)
    dec = fg.decompose(x, target=1)
    layers = {layer.name: layer for layer in exp.layers}
    table_add = next(name for name, layer in layers.items() if layer.op == "add")
    for name in (table_add, "q", "k"):
        layer = layers[name]
        assert layer.layout.kind == "tracked" and layer.layout.grid == (5, 5), layer
        grid, rest = expected_grid(dec.bias_terms[name], 2, 5, 5, shift=1)
        assert torch.allclose(exp.compact.layers[name].double(), grid, atol=1e-10)
        assert torch.allclose(exp.compact.offgrid[name].double(), rest, atol=1e-10)
        # padded pixels matter as keys and values, not as (cropped) queries
        assert (rest.abs().max() > 1e-3) == (name != "q")
    # attention scores belong to their query pixel: sum each row, then map the rows back
    softmax = layers["softmax"]
    assert softmax.layout.kind == "tracked"
    rows = dec.bias_terms["softmax"].sum(-1, keepdim=True)  # (N * nW, L, 1)
    grid, rest = expected_grid(rows, 2, 5, 5, shift=1)
    assert torch.allclose(exp.compact.layers["softmax"].double(), grid, atol=1e-10)
    assert torch.allclose(exp.compact.offgrid["softmax"].double(), rest, atol=1e-10)
    assert exp.residual.abs().max() < 1e-10


def test_map_of_a_tracked_layer_is_psi_of_its_pixels():
    """The map contribution of a tracked layer equals psi over the unwindowed tensor."""
    from fgcli.engine.postprocess import psi_channel_sum

    torch.manual_seed(1)
    model = WindowBlock(shift=0).double()
    x = random_images(1, size=4, dtype=torch.float64)  # no padding: every element a pixel
    fg = FullGrad(model)
    dec = fg.decompose(x, target=0)
    expected = psi_channel_sum(dec.input_term)
    for layer, term in zip(dec.layers, dec.bias_terms.values()):
        if layer.layout.kind == "tracked":
            t = term if term.dim() == 3 else term.reshape(-1, WS * WS, term.shape[-1])
            full = unwindow(t, 1, 4, 4)  # (1, 4, 4, C)
            expected = expected + psi_channel_sum(full.permute(0, 3, 1, 2))
        elif layer.in_map:
            expected = expected + psi_channel_sum(term)
    maps = fg.explain(x, target=0).maps
    assert torch.allclose(maps, expected, atol=1e-10)


def test_smooth_and_simple_fullgrad_map_tracked_layers():
    from fgcli import SimpleFullGrad, SmoothFullGrad

    torch.manual_seed(2)
    model = WindowBlock(shift=1).double()
    x = random_images(2, size=5, dtype=torch.float64)
    plain = FullGrad(model).explain(x)
    assert any(layer.layout.kind == "tracked" and layer.in_map for layer in plain.layers)
    # no noise, one sample: exactly FullGrad, tracked layers included
    smooth = SmoothFullGrad(model, n_samples=1, sigma=0.0).explain(x)
    assert torch.allclose(smooth.maps, plain.maps, atol=1e-10)
    simple = SimpleFullGrad(model).explain(x)
    assert simple.maps.shape == (2, 1, 5, 5) and torch.isfinite(simple.maps).all()
    assert not torch.allclose(simple.maps, plain.maps)


def test_decomposition_exposes_positions_of_tracked_layers():
    from fgcli.engine.layout import on_grid

    torch.manual_seed(3)
    model = WindowBlock(shift=1).double()
    dec = FullGrad(model).decompose(random_images(2, size=5, dtype=torch.float64))
    tracked = [layer for layer in dec.layers if layer.layout.kind == "tracked"]
    assert tracked and set(dec.positions) == {layer.name for layer in tracked}
    for layer in tracked:
        p = dec.positions[layer.name]
        index = p.index.expand(layer.shape)
        assert p.grid == (5, 5) and int(index.max()) == 2 * 25 - 1  # every pixel of both
        with pytest.raises(ValueError, match="tracked"):
            on_grid(dec.bias_terms[layer.name], layer.layout)


@pytest.mark.parametrize("size,n", [pytest.param(224, 3, marks=pytest.mark.slow), (160, 1)])
def test_swin_batches_and_padded_windows(size, n):
    """Batch 3 = Swin-T's stage-1 head count: the batch is dim 0 (windows), not the heads.
    160: the last stage (5x5) is padded to one 7x7 window; its positions, not its shape,
    place it."""
    import torchvision
    from helpers import randomise

    torch.manual_seed(0)
    model = randomise(torchvision.models.swin_t())
    x = random_images(n, size=size)
    exp = FullGrad(model).explain(x, compact=True)
    assert_complete(exp.logit, exp.residual)
    offgrid = torch.stack(list(exp.compact.offgrid.values()))
    scale = max(float(v.abs().max()) for v in exp.compact.layers.values())
    if size == 224:  # no padding anywhere: nothing is off the grid
        assert offgrid.abs().max() <= 1e-4 * scale
    else:
        last = [layer for layer in exp.layers if layer.module.startswith("features.7")
                and layer.in_map]
        assert last and {layer.layout.grid for layer in last} == {(5, 5)}
        assert "tracked" in {layer.layout.kind for layer in last}
        assert offgrid.abs().max() > 1e-3 * scale
