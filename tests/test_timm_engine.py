"""timm models, random weights, a batch of two at each model's default input size:
per-image completeness (also for each image alone), every layer's terms split by followed
image indices, and which layers stay out of the map (and why).

One small model per family; the fastest are unmarked, the rest ``slow``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_complete

timm = pytest.importorskip("timm")

from fgcli import FullGrad  # noqa: E402
from fgcli.check import TOLERANCE  # noqa: E402
from fgcli.models.base import calibration_batch, randomise_weights  # noqa: E402

FAST = [
    "mobilenetv3_small_050", "regnetx_002", "levit_128s", "efficientvit_m0",
    "efficientvit_b0", "edgenext_xx_small", "mobilevit_xxs", "vit_tiny_patch16_224",
    "maxvit_nano_rw_256", "swin_tiny_patch4_window7_224",
]
SLOW = [
    "resnet18", "resnetv2_18", "nf_regnet_b0", "efficientnet_b0", "convnext_atto",
    "deit_tiny_distilled_patch16_224", "eva02_tiny_patch14_224", "maxvit_rmlp_nano_rw_256",
    "maxxvit_rmlp_nano_rw_256", "maxxvitv2_nano_rw_256", "maxvit_tiny_tf_224",
    "coat_lite_tiny", "coat_tiny", "mobilevitv2_050", "caformer_s18", "poolformer_s12",
    "poolformerv2_s12", "fastvit_t8", "convformer_s18", "nextvit_small", "repvit_m0_9",
    "ghostnet_050", "hrnet_w18_small", "cs3darknet_s", "densenet121", "inception_v3",
    "xcit_nano_12_p16_224", "cait_xxs24_224", "twins_svt_small", "pvt_v2_b0", "davit_tiny",
    "focalnet_tiny_srf", "tiny_vit_5m_224", "hiera_tiny_224",
]
# layers left out of the map for other reasons than being vectors (heads, pooled features)
OTHER_REASONS = {
    "coat_lite_tiny": {"ambiguous"},  # k^T v: channels by channels, (N, heads, C, C)
    "nextvit_small": {"untracked"},  # keys average-pooled along the flattened token dim
    "xcit_nano_12_p16_224": {"off-grid"},  # class-attention layers on the class token
    "cait_xxs24_224": {"off-grid"},
}
# (bias-carrying ops, ops in the map) measured at batch 2
COVERAGE = {"swin_tiny_patch4_window7_224": (144, 143), "levit_128s": (123, 119),
            "maxvit_nano_rw_256": (186, 185), "efficientvit_m0": (218, 216),
            "hiera_tiny_224": (103, 101)}  # pooled unrolled tokens on their coarse cells


def _model(name: str) -> tuple[torch.nn.Module, tuple[int, int]]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    size = tuple(timm.data.resolve_model_data_config(model)["input_size"][1:])
    return randomise_weights(model, calibration=calibration_batch(size)), size


def _check(name: str) -> None:
    model, size = _model(name)
    x = calibration_batch(size, seed=1, n=2)
    exp = FullGrad(model).explain(x, compact=True)
    logit = exp.logit.double()
    assert_complete(logit, exp.residual, rel=TOLERANCE)
    assert torch.isfinite(exp.maps).all() and exp.maps.shape == (2, 1, *size)
    # every layer's terms went to their own image, whatever the layout
    assert {layer.split for layer in exp.layers} == {"images"}
    # the compact decomposition sums to each image's logit
    c = exp.compact
    total = c.input.flatten(1).sum(1).double() + exp.residual
    total += sum(v.flatten(1).sum(1).double() if v.dim() > 1 else v.double()
                 for v in c.layers.values())
    total += sum((v.double() for v in c.offgrid.values()), torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(total, logit, atol=1e-4, rtol=1e-5)
    reasons = {layer.excluded for layer in exp.layers if not layer.in_map}
    assert reasons <= {"vector"} | OTHER_REASONS.get(name, set()), \
        [(layer.name, layer.excluded) for layer in exp.layers if not layer.in_map]
    # and each image alone (a run's last batch can hold one image): LeViT's and
    # EfficientViT-M's stems hit torch's batch-norm backward bug at batch 1
    for j in range(2):
        one = FullGrad(model).explain(x[j:j + 1])
        assert abs(float(one.residual[0])) <= TOLERANCE * max(1.0, abs(float(logit[j]))), \
            (j, float(one.residual[0]))
        assert torch.allclose(one.logit.double(), logit[j:j + 1], rtol=1e-4, atol=1e-4)
    if name in COVERAGE:
        ops = len(exp.layers)
        mapped = sum(layer.in_map for layer in exp.layers)
        assert (ops, mapped) == COVERAGE[name]


@pytest.mark.parametrize("name", FAST)
def test_timm_family(name):
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_timm_family_slow(name):
    _check(name)
