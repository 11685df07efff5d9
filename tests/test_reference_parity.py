"""Parity with the authors' reference FullGrad on the golden fixtures.

The fixtures were computed on another machine. Float32 arithmetic there and
here differs in the last bits (logits by up to ~6e-5), and in a randomly
weighted network that is enough to flip a few near-zero ReLU units or
near-tied max-pool windows, which moves gradients locally. Measured here:
perturbing the fixture inputs by 1e-7 (relative) moves our own vgg16_bn maps
by up to 53x the 1e-4 * max|map| tolerance, and resnet18's images 4 and 5 by
1.2x and 3.5x; resnet18's images 0-3 are unaffected. So:

* the map tolerance of 1e-4 * max|reference map| is asserted wherever the
  arithmetic is reproducible: resnet18 images 0-3 end to end, and the
  post-processing of the reference's own per-layer gradients (image 0);
* everywhere else the bound is the measured float-chaos envelope (1e-2 of
  the map's maximum), still far below what a semantic error produces
  (``align_corners=False`` moves maps by 12-26, i.e. 6-12 %).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import REFERENCE

from fgcli import FullGrad, SimpleFullGrad
from fgcli.engine.layout import layout_of
from fgcli.engine.postprocess import psi_channel_sum, upsample

STABLE_RESNET18_IMAGES = [0, 1, 2, 3]
CHAOS_BOUND = 1e-2
# decomposition sums, relative to max(1, |logit|): vgg16_bn's measured float chaos
# moves its input term by up to 7.6e-4 of the logit
SUM_TOL = {"resnet18": 1e-4, "vgg16_bn": 2e-3}


def _load(name: str) -> dict[str, np.ndarray]:
    with np.load(REFERENCE / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def ref_resnet18() -> dict[str, np.ndarray]:
    return _load("resnet18")


@pytest.fixture(scope="module")
def ref_vgg16_bn() -> dict[str, np.ndarray]:
    return _load("vgg16_bn")


def _max_rel_diff(ours: torch.Tensor, ref: np.ndarray) -> np.ndarray:
    """Per image: max |ours - ref| / max |ref| over the whole fixture."""
    diff = (ours.detach().numpy() - ref).reshape(len(ref), -1)
    return np.abs(diff).max(1) / np.abs(ref).max()


@pytest.mark.parametrize("method,key", [(FullGrad, "fullgrad"), (SimpleFullGrad, "simple_fullgrad")])
def test_resnet18_maps_match_reference(resnet18_ref, ref_resnet18, method, key):
    x = torch.from_numpy(ref_resnet18["inputs"])
    maps = method(resnet18_ref).saliency(x)
    rel = _max_rel_diff(maps, ref_resnet18[key])
    assert maps.shape == (6, 1, 224, 224)
    assert (rel[STABLE_RESNET18_IMAGES] <= 1e-4).all(), rel
    assert (rel <= CHAOS_BOUND).all(), rel


@pytest.mark.slow
@pytest.mark.parametrize("method,key", [(FullGrad, "fullgrad"), (SimpleFullGrad, "simple_fullgrad")])
def test_vgg16_bn_maps_match_reference_within_float_chaos(vgg16_bn_ref, ref_vgg16_bn, method, key):
    x = torch.from_numpy(ref_vgg16_bn["inputs"])
    rel = _max_rel_diff(method(vgg16_bn_ref).saliency(x), ref_vgg16_bn[key])
    assert (rel <= CHAOS_BOUND).all(), rel


def test_postprocessing_of_reference_gradients_is_exact(ref_resnet18):
    """Our psi / channel sum / upsampling on the reference's own gradients (image 0)."""
    with np.load(REFERENCE / "resnet18_biasgrads_img0.npz") as grads:
        x = torch.from_numpy(ref_resnet18["inputs"][:1])
        input_grad = torch.from_numpy(grads["input_grad"])[None]
        maps = psi_channel_sum(input_grad * x)
        in_map = ref_resnet18["layer_in_saliency"]
        for i, flag in enumerate(in_map):
            bias_grad = torch.from_numpy(grads[f"bg_{i:03d}"])[None]
            layout = layout_of(tuple(bias_grad.shape), 1, 224, 224)
            assert layout.spatial == bool(flag)
            if flag:
                # one layer at a time, exactly as the reference aggregates
                maps = maps + upsample(psi_channel_sum(bias_grad), (224, 224))
    rel = _max_rel_diff(maps, ref_resnet18["fullgrad"][:1])
    assert rel[0] <= 1e-4, rel


def test_resnet18_bias_gradients_match_reference_tensors(resnet18_ref, ref_resnet18):
    x = torch.from_numpy(ref_resnet18["inputs"][:1])
    dec = FullGrad(resnet18_ref).decompose(x)
    with np.load(REFERENCE / "resnet18_biasgrads_img0.npz") as grads:
        assert list(dec.bias_terms) == list(grads["layer_names"])
        for i, term in enumerate(dec.bias_terms.values()):
            ref = torch.from_numpy(grads[f"bg_{i:03d}"])
            torch.testing.assert_close(term[0], ref, rtol=0, atol=1e-6 * ref.abs().max().item())
        torch.testing.assert_close(dec.input_grad[0], torch.from_numpy(grads["input_grad"]),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_name", [
    "resnet18", pytest.param("vgg16_bn", marks=pytest.mark.slow)])  # vgg16_bn: the full tier
def test_decomposition_matches_reference(request, model_name):
    model = request.getfixturevalue(f"{model_name}_ref")
    ref = request.getfixturevalue(f"ref_{model_name}")
    x = torch.from_numpy(ref["inputs"])
    dec = FullGrad(model).decompose(x)

    # the set of bias-carrying layers, their order and which enter the map are the reference's
    assert list(dec.bias_terms) == list(ref["layer_names"])
    assert [layer.in_map for layer in dec.layers] == list(ref["layer_in_saliency"])
    assert dec.target.tolist() == ref["pred"].tolist()

    scale = np.maximum(1.0, np.abs(ref["target_logit"]))  # (6,)
    np.testing.assert_allclose(dec.logit.double().numpy(), ref["target_logit"], rtol=0,
                               atol=1e-5 * scale.max())
    tol = SUM_TOL[model_name] * scale.max()
    input_sum = dec.input_term.reshape(6, -1).sum(1, dtype=torch.float64).numpy()
    np.testing.assert_allclose(input_sum, ref["input_term"], rtol=0, atol=tol)
    sums = torch.stack([t.reshape(6, -1).sum(1, dtype=torch.float64)
                        for t in dec.bias_terms.values()], 1).numpy()
    np.testing.assert_allclose(sums, ref["bias_grad_sums"], rtol=0, atol=tol)
    # completeness: ours and the reference's residual are both at float-noise level
    assert (np.abs(dec.residual.numpy()) <= 1e-5 * scale).all(), dec.residual
    assert (np.abs(ref["completeness_residual"]) <= 1e-5 * scale).all()
