"""Engine semantics: exactness, implicit biases, batching, targets, errors, methods."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from helpers import assert_complete, random_images, randomise
from torch import nn

from fgcli import Decomposition, FullGrad, SimpleFullGrad, SmoothFullGrad
from fgcli.engine.postprocess import psi_channel_sum

# ---------------------------------------------------------------- exactness (float64)

def test_completeness_float64_tiny(tiny_cnn):
    x = random_images(3, size=16, dtype=torch.float64)
    dec = FullGrad(tiny_cnn).decompose(x)
    assert isinstance(dec, Decomposition)
    assert_complete(dec.logit, dec.residual, rel=1e-10)
    # exactly the explicit bias carriers: relu, max-pool, flatten, in-place add carry none
    assert list(dec.bias_terms) == ["0", "1", "3.conv", "3.bn", "6", "10"]
    assert [layer.kind for layer in dec.layers] == ["conv", "norm", "conv", "norm", "norm",
                                                   "linear"]
    for layer, term in zip(dec.layers, dec.bias_terms.values()):
        assert tuple(term.shape) == layer.shape


def test_bias_terms_equal_parameter_gradients(tiny_cnn):
    """Independent check: sum of a layer's bias term = <df/db, b> (plain autograd, no tracer)."""
    x = random_images(1, size=16, dtype=torch.float64)
    dec = FullGrad(tiny_cnn).decompose(x)
    model = tiny_cnn.eval()
    params = dict(model.named_parameters())
    logit = model(x)[0, dec.target[0]]
    names = ["0.bias", "1.bias", "3.conv.bias", "3.bn.bias", "6.bias", "10.bias"]
    grads = torch.autograd.grad(logit, [params[n] for n in names])
    for term, name, g in zip(dec.bias_terms.values(), names, grads, strict=True):
        module = model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(module, nn.BatchNorm2d):  # effective bias beta - gamma mean / sqrt(var+eps)
            b = module.bias - module.weight * module.running_mean / torch.sqrt(
                module.running_var + module.eps)
        else:
            b = module.bias
        expected = (g * b).sum()
        torch.testing.assert_close(term.sum(), expected.detach(), rtol=1e-9, atol=1e-12)
    for p in model.parameters():
        p.grad = None


class Implicit(nn.Module):
    """A network touching every kind of implicit bias, with in-place variants."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.SiLU()
        self.hs = nn.Hardswish(inplace=True)
        self.relu6 = nn.ReLU6()
        self.norm = nn.LayerNorm(8)
        self.gelu = nn.GELU()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.offset = nn.Parameter(torch.randn(8, 4, 4))
        self.token = nn.Parameter(torch.randn(1, 1, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        z = self.hs(self.act(z)) * 3.0
        z = self.relu6(z) + self.offset  # saturating ReLU6, then a constant tensor
        z = z * torch.sigmoid(z.mean((2, 3), keepdim=True))  # product of two activations
        t = z.flatten(2).transpose(1, 2)  # (N, 16, 8) tokens
        t = torch.cat([self.token.expand(len(t), -1, -1), t], 1)  # class token (a constant)
        t = self.gelu(self.norm(t))
        t = t + self.attn(t, t, t, need_weights=False)[0]
        t = t.softmax(-1) + 1.0  # softmax and a Python constant
        return self.head(t[:, 0])


def test_implicit_biases_complete_float64():
    torch.manual_seed(0)
    model = randomise(Implicit().double())
    x = random_images(2, size=4, dtype=torch.float64) * 3
    dec = FullGrad(model).decompose(x)
    assert_complete(dec.logit, dec.residual, rel=1e-10)
    kinds = {layer.kind for layer in dec.layers}
    assert {"activation", "normalisation", "attention", "product", "constant"} <= kinds
    # modules running one op are named by their path; ops of the model's own forward by
    # op name, numbered when repeated; `* 3.0`, flatten, transpose, expand carry no bias
    assert [layer.name for layer in dec.layers] == [
        "conv", "act", "hs", "relu6", "add.0", "sigmoid", "mul", "cat", "norm", "gelu",
        "attn", "softmax", "add.1", "head"]
    assert dec.layers[10].layout.batch == "dim:1"  # attention works on (L, N, E) internally
    # ReLU6 carries a bias exactly where it saturates
    relu6 = dec.bias_terms["relu6"]
    assert relu6.abs().sum() > 0


def test_inplace_ops_do_not_corrupt_recorded_outputs():
    """BN output modified in place by `+=` and ReLU(inplace): same terms as out-of-place."""

    class Net(nn.Module):
        def __init__(self, inplace: bool) -> None:
            super().__init__()
            self.inplace = inplace
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.relu = nn.ReLU(inplace=inplace)
            self.hs = nn.Hardswish(inplace=inplace)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            y = self.bn(self.conv(x))
            skip = self.conv(x)
            if self.inplace:
                y += skip
            else:
                y = y + skip
            y = self.relu(self.hs(y))
            return self.fc(y.mean((2, 3)))

    torch.manual_seed(0)
    a = randomise(Net(True).double())
    b = Net(False).double().eval()
    b.load_state_dict(a.state_dict())
    x = random_images(2, size=8, dtype=torch.float64)
    da, db = FullGrad(a).decompose(x), FullGrad(b).decompose(x)
    assert list(da.bias_terms) == list(db.bias_terms)
    for name in da.bias_terms:
        torch.testing.assert_close(da.bias_terms[name], db.bias_terms[name], rtol=1e-12,
                                   atol=1e-12)
    assert (da.residual.abs() < 1e-10).all()


def test_layer_names_with_several_ops_per_module():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Parameter(torch.ones(1))

        def forward(self, x):
            x = x + self.c
            x = x * x
            return x + self.c

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.two = Two()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.two(x).mean((2, 3)))

    dec = FullGrad(Net().double()).decompose(random_images(1, size=4, dtype=torch.float64))
    assert list(dec.bias_terms) == ["two:add.0", "two:mul", "two:add.1", "fc"]


# ---------------------------------------------------------------- batching and layout

@pytest.fixture(scope="module")
def resnet18_small() -> nn.Module:
    torch.manual_seed(0)
    return randomise(torchvision.models.resnet18())


def test_batch_equals_one_by_one(resnet18_small):
    x = random_images(4, size=64)
    targets = torch.tensor([3, 1, 4, 1])
    for method in (FullGrad, SimpleFullGrad):
        batch = method(resnet18_small).saliency(x, targets)
        single = torch.cat([method(resnet18_small).saliency(x[i:i + 1], int(targets[i]))
                            for i in range(4)])
        torch.testing.assert_close(batch, single, rtol=1e-4, atol=1e-4 * batch.abs().max().item())


def test_channels_last_gives_same_maps(resnet18_small):
    x = random_images(2, size=64)
    ref = FullGrad(resnet18_small).saliency(x)
    model = resnet18_small.to(memory_format=torch.channels_last)
    try:
        got = FullGrad(model).saliency(x.contiguous(memory_format=torch.channels_last))
    finally:
        resnet18_small.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_map_shape_dtype_and_range(resnet18_small):
    x = random_images(3, size=48)
    exp = FullGrad(resnet18_small).explain(x)
    assert exp.maps.shape == (3, 1, 48, 48) and exp.maps.dtype == torch.float32
    assert (exp.maps >= 0).all() and torch.isfinite(exp.maps).all()
    n_map_layers = sum(layer.in_map for layer in exp.layers)
    # each psi-normalised channel-summed term is <= channels; the map is their sum
    assert exp.maps.amax() > 1 and n_map_layers == 20


def test_constant_image_gives_finite_maps(resnet18_small):
    x = torch.zeros(2, 3, 32, 32)
    for method in (FullGrad(resnet18_small), SimpleFullGrad(resnet18_small),
                   SmoothFullGrad(resnet18_small, n_samples=2, seed=0)):
        maps = method.saliency(x)
        assert torch.isfinite(maps).all()
    # with no noise the input term of a constant zero image is exactly zero
    dec = FullGrad(resnet18_small).decompose(x)
    assert torch.equal(psi_channel_sum(dec.input_term), torch.zeros(2, 1, 32, 32))


def test_autocast_bfloat16_cpu(resnet18_small):
    x = random_images(2, size=64)
    ref = FullGrad(resnet18_small).explain(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = FullGrad(resnet18_small).explain(x)
    assert low.maps.dtype == torch.float32 and torch.isfinite(low.maps).all()
    corr = np.corrcoef(low.maps.flatten().numpy(), ref.maps.flatten().numpy())[0, 1]
    assert corr > 0.9, corr
    assert_complete(low.logit, low.residual, rel=0.05)


@pytest.mark.cuda
def test_cuda_matches_cpu(resnet18_small):
    x = random_images(2, size=64)
    ref = FullGrad(resnet18_small).saliency(x)
    model = resnet18_small.to("cuda")
    try:
        got = FullGrad(model).saliency(x.cuda()).cpu()
    finally:
        resnet18_small.to("cpu")
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())


# ---------------------------------------------------------------- targets

def test_targets(tiny_cnn):
    x = random_images(3, size=16, dtype=torch.float64)
    fg = FullGrad(tiny_cnn)
    exp = fg.explain(x)
    assert torch.equal(exp.target, exp.logits.argmax(1))
    assert fg.explain(x, 2).target.tolist() == [2, 2, 2]
    assert fg.explain(x, torch.tensor([0, 1, 2])).target.tolist() == [0, 1, 2]
    assert fg.explain(x, [4, 3, 2]).target.tolist() == [4, 3, 2]
    assert fg.explain(x, np.array([1, 1, 0])).target.tolist() == [1, 1, 0]
    assert fg.explain(x, np.int64(4)).target.tolist() == [4, 4, 4]
    # the map depends on the target
    assert not torch.allclose(fg.saliency(x, 0), fg.saliency(x, 1))


@pytest.mark.parametrize("target,error,match", [
    (5, ValueError, "out of range"),
    (-1, ValueError, "out of range"),
    ([0, 1], ValueError, "2 entries but the batch has 3"),
    (torch.tensor([0.5, 1.0, 2.0]), TypeError, "integers"),
    (True, TypeError, "bool"),
    ("cat", TypeError, "int"),
])
def test_bad_targets(tiny_cnn, target, error, match):
    with pytest.raises(error, match=match):
        FullGrad(tiny_cnn).saliency(random_images(3, size=16, dtype=torch.float64), target)


# ---------------------------------------------------------------- errors

def test_bad_inputs(tiny_cnn):
    fg = FullGrad(tiny_cnn)
    with pytest.raises(TypeError, match="torch.Tensor"):
        fg.saliency(np.zeros((1, 3, 16, 16)))
    with pytest.raises(TypeError, match="floating-point"):
        fg.saliency(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        fg.saliency(torch.zeros(3, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        fg.saliency(torch.zeros(0, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="nn.Module"):
        FullGrad(lambda x: x)


def test_model_without_differentiable_path():
    class Detached(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x.detach().mean((2, 3)))

    with pytest.raises(ValueError, match="does not depend differentiably"):
        FullGrad(Detached()).saliency(torch.randn(1, 3, 4, 4))


def test_model_with_wrong_output_shape():
    with pytest.raises(ValueError, match="expected \\(1, classes\\)"):
        FullGrad(nn.Conv2d(3, 2, 1)).saliency(torch.randn(1, 3, 4, 4))


# ---------------------------------------------------------------- SmoothFullGrad

def test_smooth_sigma_zero_equals_fullgrad(resnet18_small):
    x = random_images(2, size=32)
    plain = FullGrad(resnet18_small).saliency(x)
    smooth = SmoothFullGrad(resnet18_small, n_samples=3, sigma=0.0).saliency(x)
    torch.testing.assert_close(smooth, plain, rtol=1e-4, atol=1e-4 * plain.abs().max().item())


def test_smooth_is_seedable_and_keeps_clean_target(resnet18_small):
    x = random_images(2, size=32)
    a = SmoothFullGrad(resnet18_small, n_samples=3, seed=7).explain(x)
    b = SmoothFullGrad(resnet18_small, n_samples=3, seed=7).explain(x)
    c = SmoothFullGrad(resnet18_small, n_samples=3, seed=8).explain(x)
    assert torch.equal(a.maps, b.maps)
    assert not torch.allclose(a.maps, c.maps)
    clean = FullGrad(resnet18_small).explain(x)
    assert torch.equal(a.target, clean.target) and torch.equal(a.logits, clean.logits)
    # completeness holds for every noisy copy, so for their mean too
    assert_complete(a.logit, a.residual)


@pytest.mark.parametrize("kwargs", [{"n_samples": 0}, {"n_samples": 2.5}, {"sigma": -1.0}])
def test_smooth_rejects_bad_settings(tiny_cnn, kwargs):
    with pytest.raises(ValueError):
        SmoothFullGrad(tiny_cnn, **kwargs)


@pytest.mark.parametrize("name,fn", [
    ("silu", torch.nn.functional.silu), ("sigmoid", torch.sigmoid), ("tanh", torch.tanh),
    ("hardswish", torch.nn.functional.hardswish),
    ("hardsigmoid", torch.nn.functional.hardsigmoid), ("relu6", torch.nn.functional.relu6),
    ("gelu", torch.nn.functional.gelu),
])
def test_closed_form_activation_biases_equal_forward_ad(name, fn):
    """The fast path's phi(u) - phi'(u) u equals the forward-mode AD linearisation."""
    import torch.autograd.forward_ad as fwAD

    from fgcli.engine.implicit import fast_implicit_bias

    u = torch.linspace(-9, 9, 2001, dtype=torch.float64).reshape(1, -1)
    out = fn(u)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(fn(fwAD.make_dual(u, u))).tangent
    expected = out - tangent
    got = fast_implicit_bias(name, (u.requires_grad_(True),), {}, [u.detach()], out)
    assert got is not None
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_closed_form_products_and_quotients():
    from fgcli.engine.implicit import fast_implicit_bias

    a = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    out = a * s
    assert torch.equal(fast_implicit_bias("mul", (a, s), {}, [a.detach(), s.detach()], out),
                       -out.detach())
    q = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    out = q @ k
    assert torch.equal(fast_implicit_bias("matmul", (q, k), {}, [q.detach(), k.detach()], out),
                       -out.detach())
    out = a / (s.abs() + 1)
    assert fast_implicit_bias("div", (a, s.abs() + 1), {}, [a.detach(), s.detach()], out) \
        is not None
    # a product with a constant has no bias and is not on this path
    assert fast_implicit_bias("mul", (a, s.detach()), {}, [a.detach()], a * s.detach()) is None


def test_batchnorm_without_affine_parameters():
    """affine=False: the effective bias is -mean / sqrt(var + eps) (the reference crashes)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4, affine=False)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), bn, nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(4))
        bn.running_var.copy_(torch.rand(4) + 0.5)
    model.eval()
    x = random_images(2, size=8, dtype=torch.float64)
    dec = FullGrad(model).decompose(x)
    assert list(dec.bias_terms) == ["1", "5"]
    assert (dec.residual.abs() < 1e-10).all()
    # the term is grad_z * b with b = -mean / sqrt(var + eps), per channel (plain autograd)
    b = -bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
    z = bn(model[0](x))
    logits = model[5](model[4](model[3](model[2](z))))
    (grad_z,) = torch.autograd.grad(logits.gather(1, dec.target[:, None]).sum(), z)
    torch.testing.assert_close(dec.bias_terms["1"], grad_z * b.view(1, 4, 1, 1),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,fn,kwargs", [
    ("layer_norm", torch.nn.functional.layer_norm, {"normalized_shape": (6,)}),
    ("layer_norm", torch.nn.functional.layer_norm, {"normalized_shape": (5, 6)}),
    ("layer_norm", torch.nn.functional.layer_norm, {"normalized_shape": (6,), "eps": 0.3}),
    ("layer_norm", torch.nn.functional.layer_norm, {"normalized_shape": (6,), "affine": 1}),
    ("rms_norm", torch.nn.functional.rms_norm, {"normalized_shape": (6,), "affine": 1}),
    ("rms_norm", torch.nn.functional.rms_norm, {"normalized_shape": (5, 6), "eps": 0.2}),
    ("softmax", torch.softmax, {"dim": -1}),
    ("softmax", torch.softmax, {"dim": 1}),
])
@pytest.mark.parametrize("graph", [False, True])
def test_closed_form_norm_and_softmax_biases_equal_forward_ad(name, fn, kwargs, graph):
    """Layer norm, RMS norm and softmax: the closed-form residual equals forward-mode AD's
    (with affine parameters held fixed; a large eps so its term is visible), with and
    without an autograd graph (layer norm reads its saved statistics from the graph)."""
    import torch.autograd.forward_ad as fwAD

    from fgcli.engine.implicit import fast_implicit_bias

    g = torch.Generator().manual_seed(3)
    u = torch.randn(3, 4, 5, 6, dtype=torch.float64, generator=g) * 2 + 0.5
    kwargs = dict(kwargs)
    if kwargs.pop("affine", None):
        shape = kwargs["normalized_shape"]
        kwargs["weight"] = torch.randn(shape, dtype=torch.float64, generator=g)
        if name == "layer_norm":
            kwargs["bias"] = torch.randn(shape, dtype=torch.float64, generator=g)
    ug = u.clone().requires_grad_(True)
    out = fn(ug if graph else u, **kwargs)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(fn(fwAD.make_dual(u, u), **kwargs)).tangent
    got = fast_implicit_bias(name, (ug,), kwargs, [u], out)
    assert got is not None
    expected = out.detach() - tangent
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert expected.abs().max() > 1e-3  # the residual is not trivially zero
    if graph:  # the graph's saved tensors are untouched: the gradient is still right
        (g,) = torch.autograd.grad(out.sum(), ug)
        ref = u.clone().requires_grad_(True)
        (g_ref,) = torch.autograd.grad(fn(ref, **kwargs).sum(), ref)
        torch.testing.assert_close(g, g_ref)


def _forward_ad_residual(fn, args, active):
    """``fn(args) - J u`` by forward-mode AD, tangents = the ``active`` arguments."""
    import torch.autograd.forward_ad as fwAD

    out = fn(*args)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(a, a) if i in active else a for i, a in enumerate(args)]
        tangent = fwAD.unpack_dual(fn(*duals)).tangent
    return out, out - tangent


@pytest.mark.parametrize("case", ["x+c", "c+x", "x-c", "c-x", "rsub", "alpha", "iadd"])
def test_closed_form_shift_bias_equals_forward_ad(case):
    """A sum of an activation and a constant: b = y - k u equals the linearisation."""
    from fgcli.engine.implicit import fast_implicit_bias

    u = torch.randn(2, 5, 3, dtype=torch.float64)
    c = torch.randn(5, 3, dtype=torch.float64)
    ug = u.clone().requires_grad_(True)
    name, args, kwargs, fn = {
        "x+c": ("add", (ug, c), {}, lambda a: a + c),
        "c+x": ("add", (c, ug), {"alpha": 2.5}, lambda a: torch.add(c, a, alpha=2.5)),
        "x-c": ("sub", (ug, c), {}, lambda a: a - c),
        "c-x": ("sub", (c, ug), {"alpha": 0.5}, lambda a: torch.sub(c, a, alpha=0.5)),
        "rsub": ("__rsub__", (ug, 3.0), {}, lambda a: 3.0 - a),
        "alpha": ("add", (ug, c), {"alpha": -2.0}, lambda a: torch.add(a, c, alpha=-2.0)),
        "iadd": ("__iadd__", (ug, c), {}, lambda a: a + c),
    }[case]
    out, expected = _forward_ad_residual(fn, (u,), {0})
    got = fast_implicit_bias(name, args, kwargs, [u], out)
    assert got is not None
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["qkv", "kv-constant", "q-constant", "causal", "float-mask",
                                  "bool-mask", "scale"])
def test_closed_form_sdpa_bias_equals_forward_ad(case):
    """scaled_dot_product_attention's closed-form residual equals forward-mode AD's."""
    import torch.nn.functional as F

    from fgcli.engine.implicit import fast_implicit_bias

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 7, 4, dtype=torch.float64, generator=g) for _ in range(3))
    kwargs: dict = {}
    active = {"kv-constant": {0}, "q-constant": {1, 2}}.get(case, {0, 1, 2})
    if case == "causal":
        kwargs["is_causal"] = True
    if case == "float-mask":
        kwargs["attn_mask"] = torch.randn(7, 7, dtype=torch.float64, generator=g)
    if case == "bool-mask":
        kwargs["attn_mask"] = torch.rand(7, 7, generator=g) > 0.3
        kwargs["attn_mask"].fill_diagonal_(True)
    if case == "scale":
        kwargs["scale"] = 0.3

    def fn(*qkv):
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
            return F.scaled_dot_product_attention(*qkv, **kwargs)

    out, expected = _forward_ad_residual(fn, (q, k, v), active)
    args = tuple(t.clone().requires_grad_(True) if i in active else t
                 for i, t in enumerate((q, k, v)))
    got = fast_implicit_bias("scaled_dot_product_attention", args, kwargs,
                             [args[i].detach() for i in sorted(active)], out)
    assert got is not None
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert expected.abs().max() > 1e-3


@pytest.mark.parametrize("case", ["self", "cross", "separate", "mask", "no-bias"])
def test_closed_form_mha_bias_equals_forward_ad(case):
    """F.multi_head_attention_forward's closed-form residual (projections inside the op)
    equals forward-mode AD's."""
    import torch.nn.functional as F

    from fgcli.engine.implicit import fast_implicit_bias

    torch.manual_seed(7)
    mha = torch.nn.MultiheadAttention(8, 2, bias=case != "no-bias", kdim=6 if case ==
                                      "separate" else None, vdim=5 if case == "separate"
                                      else None).double().eval().requires_grad_(False)
    if case != "no-bias":
        torch.nn.init.normal_(mha.in_proj_bias if mha.in_proj_bias is not None else
                              mha.out_proj.bias)
    x = torch.randn(6, 3, 8, dtype=torch.float64)
    key = torch.randn(4, 3, 6 if case == "separate" else 8, dtype=torch.float64)
    value = torch.randn(4, 3, 5 if case == "separate" else 8, dtype=torch.float64)
    mask = torch.randn(6, 6, dtype=torch.float64) if case == "mask" else None
    inputs = {"self": (x, x, x), "mask": (x, x, x), "no-bias": (x, x, x),
              "cross": (x, key, key), "separate": (x, key, value)}[case]
    active = {0, 1, 2} if case != "cross" else {0}
    separate = case == "separate"

    def fn(q, k, v):
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
            return _mha(q, k, v)

    def _mha(q, k, v):
        return F.multi_head_attention_forward(
            q, k, v, 8, 2, mha.in_proj_weight, mha.in_proj_bias, None, None, False, 0.0,
            mha.out_proj.weight, mha.out_proj.bias, training=False, need_weights=False,
            attn_mask=mask, use_separate_proj_weight=separate, q_proj_weight=mha.q_proj_weight,
            k_proj_weight=mha.k_proj_weight, v_proj_weight=mha.v_proj_weight)[0]

    if case in ("self", "mask", "no-bias"):  # one tensor in three places: one tangent
        import torch.autograd.forward_ad as fwAD
        out = fn(x, x, x)
        with fwAD.dual_level():
            d = fwAD.make_dual(x, x)
            expected = out - fwAD.unpack_dual(fn(d, d, d)).tangent
    else:
        out, expected = _forward_ad_residual(fn, inputs, active)
    args = tuple(t.requires_grad_(True) if i in active else t
                 for i, t in enumerate(t.clone() for t in inputs))
    if case in ("self", "mask", "no-bias"):
        xg = x.clone().requires_grad_(True)
        args = (xg, xg, xg)
    kwargs = {"embed_dim_to_check": 8, "num_heads": 2, "in_proj_weight": mha.in_proj_weight,
              "in_proj_bias": mha.in_proj_bias, "bias_k": None, "bias_v": None,
              "add_zero_attn": False, "dropout_p": 0.0, "out_proj_weight": mha.out_proj.weight,
              "out_proj_bias": mha.out_proj.bias, "training": False, "need_weights": False,
              "attn_mask": mask, "use_separate_proj_weight": separate,
              "q_proj_weight": mha.q_proj_weight, "k_proj_weight": mha.k_proj_weight,
              "v_proj_weight": mha.v_proj_weight}
    got = fast_implicit_bias("multi_head_attention_forward", args, kwargs,
                             [a.detach() for a in args if a.requires_grad], out)
    assert got is not None
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_closed_form_tanh_gelu_bias_equals_forward_ad():
    """GELU's tanh approximation takes its own backward kernel (its ``approximate``)."""
    import torch.autograd.forward_ad as fwAD

    from fgcli.engine.implicit import fast_implicit_bias

    u = torch.linspace(-9, 9, 2001, dtype=torch.float64).reshape(1, -1)
    out = torch.nn.functional.gelu(u, approximate="tanh")
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(torch.nn.functional.gelu(
            fwAD.make_dual(u, u), approximate="tanh")).tangent
    got = fast_implicit_bias("gelu", (u.requires_grad_(True),), {"approximate": "tanh"},
                             [u.detach()], out)
    torch.testing.assert_close(got, out - tangent, rtol=1e-12, atol=1e-12)
    exact = fast_implicit_bias("gelu", (u,), {}, [u.detach()], out)
    assert not torch.allclose(got, exact, rtol=1e-9, atol=1e-9)


def test_closed_form_einsum_of_two_activations():
    """An einsum of two activations is bilinear: b = -y, no forward-AD pass (MaxViT's
    attention scores and values)."""
    from fgcli.engine.implicit import fast_implicit_bias

    q = torch.randn(1, 2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    eq = "B G H I D, B G H J D -> B G H I J"
    out = torch.einsum(eq, q, k)
    got = fast_implicit_bias("einsum", (eq, q, k), {}, [q.detach(), k.detach()], out)
    assert got is not None and torch.equal(got, -out.detach())
    listed = fast_implicit_bias("einsum", (eq, [q, k]), {}, [q.detach(), k.detach()], out)
    assert listed is not None and torch.equal(listed, -out.detach())
    one = torch.einsum(eq, q, k.detach())  # one activation: zero bias, not this path
    assert fast_implicit_bias("einsum", (eq, q, k.detach()), {}, [q.detach()], one) is None


@pytest.mark.parametrize("act", ["silu", "hardswish", "relu6", "gelu"])
def test_inplace_activation_bias_without_a_copy(act):
    """An in-place activation whose derivative reads its input gets J u before the op
    overwrites u (no copy of u): the decomposition still adds up, and its bias equals the
    out-of-place model's."""
    fns = {"silu": lambda x: torch.nn.functional.silu(x, inplace=True),
           "hardswish": lambda x: torch.nn.functional.hardswish(x, inplace=True),
           "relu6": lambda x: torch.nn.functional.relu6(x, inplace=True),
           "gelu": lambda x: torch._C._nn.gelu_(x)}

    class Net(torch.nn.Module):
        def __init__(self, inplace: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.head = torch.nn.Linear(4, 3)
            self.inplace = inplace

        def forward(self, x):
            y = self.conv(x) * 3
            y = fns[act](y) if self.inplace else getattr(torch.nn.functional, act)(y)
            return self.head(y.mean((2, 3)))

    x = torch.randn(2, 3, 8, 8)
    a = FullGrad(Net(True)).decompose(x)
    b = FullGrad(Net(False)).decompose(x)
    assert a.residual.abs().max() < 1e-5 * a.logit.abs().max()
    for (name, ta), tb in zip(a.bias_terms.items(), b.bias_terms.values()):
        torch.testing.assert_close(ta, tb, rtol=1e-5, atol=1e-6, msg=name)


def test_scratch_buffer_is_reused_and_shaped_like_the_term():
    """FullGrad's term buffer: one storage for every layer, shaped and strided like the
    gradient (also channels-last), and no buffer where the product needs its own tensor."""
    from fgcli.engine.saliency import Scratch

    scratch = Scratch()
    g = torch.randn(2, 3, 4, 5)
    a = scratch.like(g, torch.randn(1, 3, 1, 1))
    assert a is not None and a.shape == g.shape and a.is_contiguous()
    cl = g.contiguous(memory_format=torch.channels_last)
    b = scratch.like(cl, torch.randn(1, 3, 1, 1))
    assert b is not None and b.stride() == cl.stride()
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    torch.mul(cl, 2.0, out=b)
    torch.testing.assert_close(b, cl * 2)
    assert scratch.like(g.half(), torch.randn(1, 3, 1, 1).half()) is None
    assert scratch.like(torch.randn(1, 3, 4, 5), torch.randn(2, 3, 4, 5)) is None
    assert scratch.like(g.transpose(1, 3), torch.randn(3)) is None  # neither layout


def test_an_exception_that_empties_the_mode_stack_is_not_replaced():
    """A stop signal's exception can arise while torch has the tracer popped for a
    dispatch: the caller gets that exception, not "trying to pop from empty mode stack"
    (a second SIGINT during a dump exited 3 with that internal error)."""

    class Stop(BaseException):
        pass

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 2, 3)

        def forward(self, x):
            self.conv(x)  # one traced op, then the stack is emptied
            torch._C._pop_torch_function_stack()  # as if interrupted inside a dispatch
            raise Stop

    depth = torch._C._len_torch_function_stack()
    with pytest.raises(Stop):
        FullGrad(Net()).saliency(torch.randn(1, 3, 8, 8))
    assert torch._C._len_torch_function_stack() == depth
