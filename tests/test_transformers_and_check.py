"""Maps from transformer layers (token and channels-last layouts) and `fullgrad check`."""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import PHOTOS, SQUEEZENET_WEIGHTS, random_images, randomise
from typer.testing import CliRunner

from fgcli import FullGrad
from fgcli.cli import app

TRANSFORMER_LAYOUTS = {"tokens", "nhwc", "tracked"}


@pytest.mark.parametrize("name,layouts", [("vit_b_16", {"tokens"}),
                                          ("swin_t", {"nhwc", "tracked"}),
                                          pytest.param("maxvit_t", {"tracked"},
                                                       marks=pytest.mark.slow)])  # 11 s
def test_transformer_maps_come_from_transformer_layers(name, layouts, monkeypatch):
    from fgcli.engine import decompose
    from fgcli.engine.layout import Layout

    torch.manual_seed(0)
    model = randomise(torchvision.models.get_model(name))
    x = random_images(2, size=224)
    fg = FullGrad(model)
    exp = fg.explain(x, compact=True)
    assert exp.maps.shape == (2, 1, 224, 224) and torch.isfinite(exp.maps).all()
    mapped = [layer for layer in exp.layers if layer.in_map and layer.layout.kind in layouts]
    kinds = {layer.kind for layer in mapped}
    # attention itself (softmax / attention ops), its projections and the MLPs' layers
    assert {"attention", "linear", "normalisation", "activation"} <= kinds, kinds
    assert {layer.layout.kind for layer in mapped} == layouts
    # every layer but the classifier head (vectors) is in the map
    assert {layer.layout.kind for layer in exp.layers if not layer.in_map} == {"vector"}
    # the map is more than the input term and the conv layers: without the transformer
    # layers' contributions it changes by a large fraction of its range
    real_layout = decompose._layout

    def without_transformer_layers(*args):
        layout = real_layout(*args)
        return Layout("other", layout.batch) if layout.kind in TRANSFORMER_LAYOUTS else layout

    monkeypatch.setattr(decompose, "_layout", without_transformer_layers)
    reduced = fg.explain(x).maps
    span = exp.maps.amax() - exp.maps.amin()
    assert (exp.maps - reduced).abs().amax() > 0.5 * span
    # the map depends on the image
    assert not torch.allclose(exp.maps[0], exp.maps[1], rtol=1e-3)
    # and the compact decomposition still sums to the logit (class token, padding: offgrid)
    c = exp.compact
    total = c.input.flatten(1).sum(1).double() + exp.residual
    total += sum(v.flatten(1).sum(1).double() if v.dim() > 1 else v.double()
                 for v in c.layers.values())
    total += sum((v.double() for v in c.offgrid.values()), torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(total, exp.logit.double(), atol=1e-4, rtol=1e-5)


def test_vit_class_token_is_left_out_of_the_grid():
    from fgcli.engine.layout import layout_of

    layout = layout_of((2, 197, 768), 2, 224, 224)
    assert (layout.kind, layout.grid, layout.skip) == ("tokens", (14, 14), 1)
    attention = layout_of((197, 2, 768), 2, 224, 224)  # (L, N, E) inside attention
    assert (attention.kind, attention.batch, attention.skip) == ("tokens", "dim:1", 1)
    assert layout_of((2, 196, 768), 2, 224, 224).skip == 0
    assert layout_of((2, 100, 64), 2, 224, 320).grid is None  # 10x10, 9x11: not 224x320
    assert layout_of((2, 141, 64), 2, 224, 320).grid == (10, 14)  # 1 + 10x14 does


def test_check_real_weights_passes():
    result = CliRunner().invoke(app, [
        "check", str(PHOTOS / "chelsea.png"), str(PHOTOS / "coffee.png"), "--model",
        "squeezenet1_1", "--weights", str(SQUEEZENET_WEIGHTS)])
    assert result.exit_code == 0, result.output
    assert result.output.count(" yes") == 2 and "closed-form: conv 26" in result.output
    assert "layers in the map (26)" in result.output


def test_check_random_weights_reports_implicit_ops():
    result = CliRunner().invoke(app, ["check", "--model", "mobilenet_v3_small", "--weights",
                                      "random", "--size", "64"])
    assert result.exit_code == 0, result.output
    assert "implicit: activation" in result.output and "product" in result.output


def test_check_fails_when_a_residual_is_too_large(monkeypatch):
    import fgcli.check

    monkeypatch.setattr(fgcli.check, "TOLERANCE", 0.0)
    result = CliRunner().invoke(app, ["check", "--model", "squeezenet1_1", "--weights",
                                      str(SQUEEZENET_WEIGHTS), "--size", "64"])
    assert result.exit_code == 1 and " NO" in result.output


def test_check_usage_errors():
    assert CliRunner().invoke(app, ["check"]).exit_code == 2
    bad = CliRunner().invoke(app, ["check", "--model", "resnet5", "--weights", "random"])
    assert bad.exit_code == 2 and "did you mean" in bad.stderr


# vit_b_32 (10 s) and swin_v2_t (a second swin) run in the full tier
@pytest.mark.parametrize("name,size", [("resnet18", 64), ("convnext_tiny", 64),
                                       pytest.param("vit_b_32", 224, marks=pytest.mark.slow),
                                       ("swin_t", 224),
                                       pytest.param("swin_v2_t", 256, marks=pytest.mark.slow),
                                       ("maxvit_t", 224)])
def test_models_map_layout_column_matches_tracing(name, size):
    from fgcli.models.base import map_layout

    torch.manual_seed(0)
    model = randomise(torchvision.models.get_model(name))
    layers = FullGrad(model).explain(random_images(1, size=size)).layers
    kinds = {layer.layout.kind for layer in layers if layer.in_map}
    expected = {"grid": {"nchw"}, "channels-last": {"nchw", "nhwc"}, "tokens": {"nchw", "tokens"},
                # a Swin stage whose single window is the whole grid reads as tokens
                "channels-last+tracked": {"nchw", "nhwc", "tokens", "tracked"},
                "grid+tracked": {"nchw", "tracked"}}
    layout = map_layout(name)
    assert kinds <= expected[layout] and kinds & (expected[layout] - {"nchw"} or {"nchw"})
    assert ("tracked" in kinds) == layout.endswith("+tracked")
    # nothing spatial is left out: only vectors (the classifier) stay out of the map
    assert {layer.layout.kind for layer in layers if not layer.in_map} <= {"vector"}
