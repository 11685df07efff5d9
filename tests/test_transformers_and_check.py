"""Maps from transformer layers (token and channels-last layouts) and `fullgrad check`."""

from __future__ import annotations

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from conftest import ROOT, SQUEEZENET_WEIGHTS, random_images, randomise
from fgcli import FullGrad
from fgcli.cli import app
from fgcli.engine.postprocess import psi_channel_sum

PHOTOS = ROOT / "examples" / "photos"


@pytest.mark.parametrize("name,layout", [("vit_b_16", "tokens"), ("swin_t", "nhwc")])
def test_transformer_maps_come_from_transformer_layers(name, layout):
    torch.manual_seed(0)
    model = randomise(torchvision.models.get_model(name))
    x = random_images(2, size=224)
    fg = FullGrad(model)
    exp = fg.explain(x)
    assert exp.maps.shape == (2, 1, 224, 224) and torch.isfinite(exp.maps).all()
    token_layers = [layer for layer in exp.layers if layer.in_map and layer.layout.kind == layout]
    kinds = {layer.kind for layer in token_layers}
    assert len(token_layers) >= 20 and {"normalisation", "linear"} <= kinds, kinds
    # the map is more than the input term: transformer layers contribute
    dec = fg.decompose(x)
    only_input = psi_channel_sum(dec.input_term)
    assert (exp.maps - only_input).abs().amax() > 1.0
    # and it depends on the image
    assert not torch.allclose(exp.maps[0], exp.maps[1], rtol=1e-3)


def test_vit_class_token_is_left_out_of_the_grid():
    from fgcli.engine.postprocess import layout_of

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


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("convnext_tiny", 64), ("vit_b_32", 224),
                                       ("swin_t", 224), ("maxvit_t", 224)])
def test_models_map_layout_column_matches_tracing(name, size):
    from fgcli.models import map_layout

    torch.manual_seed(0)
    model = randomise(torchvision.models.get_model(name))
    layers = FullGrad(model).explain(random_images(1, size=size)).layers
    kinds = {layer.layout.kind for layer in layers if layer.in_map}
    windowed = any(layer.layout.batch == "merged" or
                   (len(layer.shape) == 4 and not layer.in_map and layer.kind != "linear")
                   for layer in layers)
    expected = {"grid": {"nchw"}, "channels-last": {"nchw", "nhwc"}, "tokens": {"nchw", "tokens"},
                # a Swin stage whose single window is the whole grid reads as tokens
                "channels-last+windows": {"nchw", "nhwc", "tokens"}, "grid+windows": {"nchw"}}
    layout = map_layout(name)
    assert kinds <= expected[layout] and kinds & (expected[layout] - {"nchw"} or {"nchw"})
    assert windowed == layout.endswith("+windows"), [
        (layer.name, layer.shape, layer.layout) for layer in layers if not layer.in_map][:5]
