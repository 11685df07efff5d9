"""Every torchvision classifier decomposes exactly (issue #5).

Each model gets ``--weights random`` (He / LeCun weights, N(0, 0.1) biases, so the head
is not zero; batch-norm statistics calibrated on photo-like inputs) at the smallest
input size it accepts, and two photo-like random images. The full parametrisation is
marked ``slow``; the fast tier runs one model per family (``FAMILY_SUBSET`` less
``VARIANTS``). The full run: ``python -m pytest --full tests/test_all_classifiers.py`` (and
``fullgrad check --all --weights random --smallest`` prints the README's table).
"""

from __future__ import annotations

import math
import re

import pytest

from fgcli.check import TOLERANCE, check_model
from fgcli.models.base import classifier_names

# one model per torchvision family and variant (the smallest), run by default
FAMILY_SUBSET = (
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s",
    "googlenet", "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2",
    "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf", "resnet18", "resnext50_32x4d",
    "shufflenet_v2_x0_5", "squeezenet1_1", "swin_t", "swin_v2_t", "vgg11_bn", "vit_b_32",
    "wide_resnet50_2",
)

# a second variant of a family already in the subset: the full tier only
VARIANTS = {"efficientnet_v2_s", "mobilenet_v2", "regnet_x_400mf", "swin_v2_t"}


def _family(name: str) -> str:  # resnet18 -> resnet, efficientnet_v2_s -> efficientnet
    return re.match(r"[a-z]+", name).group()


def _assert_exact(name: str, alone: bool = True) -> None:
    result = check_model(name, "random", smallest=True, alone=alone)
    assert result.error is None
    assert len(result.images) == 2
    for im in result.images:
        assert math.isfinite(im.logit) and math.isfinite(im.residual)
        assert abs(im.residual) <= TOLERANCE * max(1.0, abs(im.logit)), (name, im)
    # nothing trivially zero: real logits that depend on the image, and bias terms
    a, b = result.images
    assert a.logit != 0.0 and (a.logit != b.logit or a.target != b.target)
    assert sum(result.kinds.values()) > 0 and result.map_layers, name


def test_family_subset_covers_every_family():
    assert set(FAMILY_SUBSET) <= set(classifier_names()) and VARIANTS <= set(FAMILY_SUBSET)
    families = {_family(n) for n in classifier_names()}
    assert families <= {_family(n) for n in FAMILY_SUBSET}
    assert families <= {_family(n) for n in FAMILY_SUBSET if n not in VARIANTS}  # fast tier


# the two costliest families (about 17 s each with the batch-of-one run): in the fast tier
# batched only (batch == one by one is test_engine's, for every layout), alone in the full
HEAVY = {"vit_b_32", "maxvit_t"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in VARIANTS else n
                                  for n in FAMILY_SUBSET])
def test_one_classifier_per_family_is_exact(name):
    _assert_exact(name, alone=name not in HEAVY)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HEAVY))
def test_heavy_families_alone_too(name):
    assert name in FAMILY_SUBSET
    _assert_exact(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in classifier_names() if n not in FAMILY_SUBSET])
def test_every_other_classifier_is_exact(name):
    _assert_exact(name, alone=False)  # each family's batch-of-one run is in the subset
