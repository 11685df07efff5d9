"""psi choices and layer selection for the FullGrad family (issue #12, item 2).

Every map is checked against a direct computation from ``decompose()`` written here with
plain torch ops (in float64): per layer, psi on the term (abs / clamp / none, then the
per-image min-max rescale with the same EPS where the choice has one), the sum over
channels (over every element of a pixel, for tracked layers), bilinear upsampling with
``align_corners=True`` (the reference's) to the input size, summed with the input term's.
"""

from __future__ import annotations

import fnmatch

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import random_images, randomise

from fgcli.engine import (
    PSI_CHOICES,
    FullGrad,
    SimpleFullGrad,
    SmoothFullGrad,
    parse_layers,
)
from fgcli.engine.postprocess import EPS

RESCALED = ("abs-rescale", "positive")


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomise(torchvision.models.get_model(name, weights=None))


@pytest.fixture(scope="module")
def resnet18():
    return _model("resnet18")


@pytest.fixture(scope="module")
def vgg11():
    return _model("vgg11")


@pytest.fixture(scope="module")
def swin_t():
    return _model("swin_t")  # channels-last and tracked (windowed) layers


@pytest.fixture(scope="module")
def x64():
    return random_images(2, size=64)


def _transform(t: torch.Tensor, psi: str) -> torch.Tensor:
    t = t.double()
    return {"signed": t, "abs": t.abs(), "abs-rescale": t.abs(),
            "positive": t.clamp(min=0)}[psi]


def _psi_grid(t: torch.Tensor, psi: str, channel_dim: int) -> torch.Tensor:
    """(N, 1, h, w) from a 4-D term with channels at ``channel_dim``."""
    a = _transform(t, psi)
    if psi in RESCALED:
        lo = a.amin(dim=(1, 2, 3), keepdim=True)
        hi = a.amax(dim=(1, 2, 3), keepdim=True)
        a = (a - lo) / (hi - lo + EPS)
    return a.sum(channel_dim, keepdim=True).movedim(channel_dim, 1)


def _psi_tracked(t: torch.Tensor, positions, psi: str, n: int) -> torch.Tensor:
    """(N, 1, h, w) from a tracked term: each element goes to the pixel its position says."""
    h, w = positions.grid
    index = positions.index.expand(t.shape).reshape(-1)
    a = _transform(t, psi).reshape(-1)
    on = index >= 0
    index, a = index[on], a[on]
    image = index // (h * w)
    if psi in RESCALED:
        lo = torch.stack([a[image == i].min() for i in range(n)])
        hi = torch.stack([a[image == i].max() for i in range(n)])
        a = (a - lo[image]) / (hi[image] - lo[image] + EPS)
    return torch.zeros(n * h * w, dtype=torch.float64).index_add_(0, index, a).view(n, 1, h, w)


def _layer_psi(info, term: torch.Tensor, positions, psi: str, n: int) -> torch.Tensor:
    kind = info.layout.kind
    if kind == "nchw":
        return _psi_grid(term, psi, 1)
    if kind == "nhwc":
        return _psi_grid(term, psi, 3)
    if kind == "tracked":
        return _psi_tracked(term, positions, psi, n)
    raise AssertionError(f"no direct computation for a {kind} layer here")


def _direct(input_term, terms, layers, positions, psi: str, names=None) -> torch.Tensor:
    """The map from a decomposition's terms; ``names``: the layers that enter (None: all
    spatial layers)."""
    n, _, height, width = input_term.shape
    out = _psi_grid(input_term, psi, 1)
    for info in layers:
        if not info.in_map or (names is not None and info.name not in names):
            continue
        term = terms[info.name]
        if info.layout.kind == "tracked" and info.name not in positions:
            assert not term.any()  # never reached the logit: its term is zero
            continue
        m = _layer_psi(info, term, positions.get(info.name), psi, n)
        out = out + F.interpolate(m, size=(height, width), mode="bilinear", align_corners=True)
    return out


def _from_dec(dec, psi, names=None):
    return _direct(dec.input_term, dec.bias_terms, dec.layers, dec.positions, psi, names)


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 2e-5) -> None:
    got, want = got.double(), want.double()
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rel * max(scale, 1e-12), (err, scale)


# -- psi -----------------------------------------------------------------------------------

@pytest.mark.parametrize("psi", PSI_CHOICES)
@pytest.mark.parametrize("name", ["resnet18", "vgg11", "swin_t"])
def test_psi_matches_direct_computation(request, name, psi, x64):
    model = request.getfixturevalue(name)
    dec = FullGrad(model).decompose(x64)
    if name == "swin_t":  # the test covers channels-last and tracked layers
        assert {"nhwc", "tracked"} <= {info.layout.kind for info in dec.layers}
    ex = FullGrad(model, psi=psi).explain(x64)
    _close(ex.maps, _from_dec(dec, psi))
    assert torch.equal(ex.target, dec.target)


def test_psi_on_float64_exact(tiny_cnn):
    x = random_images(3, size=16, dtype=torch.float64)
    dec = FullGrad(tiny_cnn).decompose(x)
    for psi in PSI_CHOICES:
        _close(FullGrad(tiny_cnn, psi=psi).saliency(x), _from_dec(dec, psi), rel=1e-12)


def test_psi_variants_differ(resnet18, x64):
    maps = {psi: FullGrad(resnet18, psi=psi).saliency(x64) for psi in PSI_CHOICES}
    assert (maps["signed"] < 0).any()  # signed keeps negative evidence
    for psi in ("abs-rescale", "abs", "positive"):
        assert (maps[psi] >= 0).all()
    for i, a in enumerate(PSI_CHOICES):
        for b in PSI_CHOICES[i + 1:]:
            assert not torch.allclose(maps[a], maps[b]), (a, b)


def test_default_psi_is_abs_rescale_and_unchanged(resnet18, swin_t, x64):
    for model in (resnet18, swin_t):
        default = FullGrad(model).explain(x64, compact=True)
        explicit = FullGrad(model, psi="abs-rescale", layers=None).explain(x64, compact=True)
        assert torch.equal(default.maps, explicit.maps)
        # every layer selected is the same computation as no selection
        everything = FullGrad(model, layers=10_000).saliency(x64)
        assert torch.equal(default.maps, everything)
        assert torch.equal(FullGrad(model, layers="*").saliency(x64), default.maps)
    for cls in (SimpleFullGrad, SmoothFullGrad):
        kw = {"n_samples": 2, "seed": 0} if cls is SmoothFullGrad else {}
        assert torch.equal(cls(resnet18, **kw).saliency(x64),
                           cls(resnet18, psi="abs-rescale", **kw).saliency(x64))


def test_signed_map_is_the_upsampled_compact_decomposition(vgg11, x64):
    """With psi='signed' the map is the input term's channel sum plus each spatial layer's
    signed channel sum, upsampled: its pixel sum is the logit's share of those terms only up
    to the upsampling, exact for layers at the input's resolution."""
    ex = FullGrad(vgg11, psi="signed").explain(x64, compact=True)
    c = ex.compact
    want = c.input[:, None].double()
    spatial = [info for info in ex.layers if info.in_map]
    for info in spatial:
        want = want + F.interpolate(c.layers[info.name][:, None].double(), size=(64, 64),
                                    mode="bilinear", align_corners=True)
    _close(ex.maps, want)
    # a layer at the input's resolution: upsampling is the identity, sums are exact
    assert spatial[0].name == "features.0" and spatial[0].layout.grid == (64, 64)
    only = FullGrad(vgg11, psi="signed", layers="features.0").saliency(x64)
    total = c.input.double().sum((1, 2)) + c.layers["features.0"].double().sum((1, 2))
    torch.testing.assert_close(only.double().sum((1, 2, 3)), total, rtol=1e-5, atol=1e-5)
    # every term's sum, with the residual, is the logit (non-spatial layers included)
    logit = c.input.double().sum((1, 2)) + ex.residual.double()
    for t in c.layers.values():
        logit = logit + t.double().reshape(2, -1).sum(1)
    torch.testing.assert_close(logit, ex.logit.double(), rtol=1e-5, atol=1e-5)


# -- layer selection ----------------------------------------------------------------------

def _spatial_names(layers):
    return [info.name for info in layers if info.in_map]


@pytest.mark.parametrize("psi", ["abs-rescale", "signed"])
def test_layer_patterns(resnet18, x64, psi):
    dec = FullGrad(resnet18).decompose(x64)
    for layers in ("layer4.*", ["bn1", "layer1.*"], ("layer2.0.downsample.1",)):
        patterns = [layers] if isinstance(layers, str) else list(layers)
        names = {n for n in _spatial_names(dec.layers)
                 if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
        assert names and names != set(_spatial_names(dec.layers))
        engine = FullGrad(resnet18, psi=psi, layers=layers)
        ex = engine.explain(x64)
        _close(ex.maps, _from_dec(dec, psi, names))
        assert {info.name for info in engine.map_layers(ex.layers)} == names


def test_layer_patterns_tracked(swin_t, x64):
    dec = FullGrad(swin_t).decompose(x64)
    names = {n for n in _spatial_names(dec.layers) if fnmatch.fnmatchcase(n, "features.1.*")}
    assert any(info.layout.kind == "tracked" for info in dec.layers if info.name in names)
    for psi in ("positive", "abs"):
        _close(FullGrad(swin_t, psi=psi, layers="features.1.*").saliency(x64),
               _from_dec(dec, psi, names))


@pytest.mark.parametrize("k", [1, 5, 13])
def test_last_k_layers(vgg11, resnet18, x64, k):
    for model in (resnet18, vgg11):
        dec = FullGrad(model).decompose(x64)
        spatial = _spatial_names(dec.layers)
        names = set(spatial[-k:])
        engine = FullGrad(model, psi="abs-rescale", layers=k)
        ex = engine.explain(x64)
        _close(ex.maps, _from_dec(dec, "abs-rescale", names))
        assert [info.name for info in engine.map_layers(ex.layers)] == spatial[-k:]


def test_selection_leaves_completeness_and_compact_alone(resnet18, x64):
    base = FullGrad(resnet18).explain(x64, compact=True)
    for psi in PSI_CHOICES:
        for layers in (None, 3, "layer3.*"):
            ex = FullGrad(resnet18, psi=psi, layers=layers).explain(x64, compact=True)
            assert torch.equal(ex.residual, base.residual)
            assert torch.equal(ex.logits, base.logits)
            assert torch.equal(ex.compact.input, base.compact.input)
            for name, t in base.compact.layers.items():
                assert torch.equal(ex.compact.layers[name], t)
            assert [i.name for i in ex.layers] == [i.name for i in base.layers]
    smooth = SmoothFullGrad(resnet18, n_samples=2, seed=0)
    chosen = SmoothFullGrad(resnet18, n_samples=2, seed=0, psi="signed", layers=2)
    assert torch.equal(smooth.explain(x64).residual, chosen.explain(x64).residual)


# -- SmoothFullGrad and SimpleFullGrad -------------------------------------------------------

@pytest.mark.parametrize("psi,layers", [("signed", None), ("positive", "layer3.*"),
                                        ("abs", 4), ("abs-rescale", ["bn1"])])
def test_smooth_accepts_psi_and_layers(resnet18, x64, psi, layers):
    """SmoothFullGrad: psi of the terms averaged over the same noisy copies."""
    seed, samples, sigma = 7, 2, 0.15
    engine = SmoothFullGrad(resnet18, samples, sigma, seed, psi=psi, layers=layers)
    ex = engine.explain(x64)
    target = FullGrad(resnet18).decompose(x64).target
    generator = torch.Generator().manual_seed(seed)
    std = sigma * (x64.amax(dim=(1, 2, 3), keepdim=True) - x64.amin(dim=(1, 2, 3), keepdim=True))
    input_term, terms, dec = 0.0, {}, None
    for _ in range(samples):
        noise = torch.randn(x64.shape, generator=generator)
        dec = FullGrad(resnet18).decompose(x64 + noise * std, target)
        input_term = input_term + dec.input_term
        for name, t in dec.bias_terms.items():
            terms[name] = terms.get(name, 0.0) + t
    terms = {name: t / samples for name, t in terms.items()}
    names = {info.name for info in engine.map_layers(dec.layers)}
    if isinstance(layers, int):
        assert len(names) == layers
    _close(ex.maps, _direct(input_term / samples, terms, dec.layers, {}, psi, names))


def test_simple_accepts_psi_and_layers(tiny_cnn):
    """SimpleFullGrad: psi of the layers' output gradients (taken here with plain autograd)."""
    x = random_images(2, size=16, dtype=torch.float64)
    chosen = ["0", "3.conv"]
    grads = {}

    def keep(name):
        def hook(module, args, out):
            out.register_hook(lambda g: grads.__setitem__(name, g))
        return hook

    modules = dict(tiny_cnn.named_modules())
    handles = [modules[name].register_forward_hook(keep(name)) for name in chosen]
    try:
        xg = x.clone().requires_grad_(True)
        logits = tiny_cnn(xg)
        target = logits.argmax(1)
        (gx,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), xg)
    finally:
        for h in handles:
            h.remove()
    for psi in PSI_CHOICES:
        ex = SimpleFullGrad(tiny_cnn, psi=psi, layers=chosen).explain(x)
        assert torch.equal(ex.target, target)
        want = _psi_grid(gx * x, psi, 1)
        for name in chosen:
            want = want + F.interpolate(_psi_grid(grads[name], psi, 1), size=(16, 16),
                                        mode="bilinear", align_corners=True)
        _close(ex.maps, want, rel=1e-12)
    full = SimpleFullGrad(tiny_cnn, psi="abs").saliency(x)
    assert not torch.allclose(full, SimpleFullGrad(tiny_cnn, psi="abs", layers=chosen)
                              .saliency(x))


# -- errors ------------------------------------------------------------------------------------

def test_bad_psi(resnet18):
    for cls in (FullGrad, SimpleFullGrad):
        with pytest.raises(ValueError, match="abs-rescale, signed, abs, positive"):
            cls(resnet18, psi="absolute")
    with pytest.raises(ValueError, match="unknown psi 'ABS'"):
        SmoothFullGrad(resnet18, psi="ABS")
    with pytest.raises(ValueError, match="choose one of"):
        FullGrad(resnet18, psi=None)


@pytest.mark.parametrize("layers,error,match", [
    (0, ValueError, "at least 1"),
    (-3, ValueError, "at least 1"),
    (True, TypeError, "layers must be"),
    (2.5, TypeError, "layers must be"),
    ([], ValueError, "empty list"),
    (["layer1.*", ""], ValueError, "non-empty string"),
])
def test_bad_layer_selection(resnet18, layers, error, match):
    with pytest.raises(error, match=match):
        FullGrad(resnet18, layers=layers)
    with pytest.raises(error, match=match):
        SmoothFullGrad(resnet18, layers=layers)


def test_pattern_matching_nothing(resnet18, x64):
    with pytest.raises(ValueError, match=r"'featres\.\*' selects no spatial layer: it matches "
                                         r"no layer name; the spatial layers are bn1, "
                                         r"layer1\.0\.bn1, .*\(20 in all\)"):
        FullGrad(resnet18, layers="featres.*").explain(x64)
    with pytest.raises(ValueError, match=r"only layers that are not in the map \(fc: vector\)"):
        FullGrad(resnet18, layers=["layer1.*", "fc"]).saliency(x64)
    with pytest.raises(ValueError, match="selects no spatial layer"):
        SmoothFullGrad(resnet18, n_samples=3, layers="nope").saliency(x64)
    with pytest.raises(ValueError, match="selects no spatial layer"):
        SimpleFullGrad(resnet18, layers="nope").saliency(x64)
    # the model is left as it was: the next call works and gives the same map
    before = FullGrad(resnet18).saliency(x64)
    with pytest.raises(ValueError):
        FullGrad(resnet18, layers="nope").saliency(x64)
    assert torch.equal(FullGrad(resnet18).saliency(x64), before)


def test_parse_layers():
    assert parse_layers(None) is None
    assert parse_layers("") is None
    assert parse_layers("all") is None
    assert parse_layers("13") == 13
    assert parse_layers("features.*") == ("features.*",)
    assert parse_layers("bn1, layer4.*") == ("bn1", "layer4.*")
    with pytest.raises(ValueError, match="at least 1"):
        parse_layers("0")
