"""The Python API documented in docs/engine.md keeps its names across the package moves."""

from __future__ import annotations

import torch
from helpers import SQUEEZENET_WEIGHTS


def test_documented_names_import():
    import fgcli
    from fgcli import FullGrad, SimpleFullGrad, SmoothFullGrad  # noqa: F401
    from fgcli.evaluate.metrics import (  # noqa: F401
        IMAGENET,
        deletion_auc,
        insertion_auc,
        pixel_perturbation,
    )

    assert set(fgcli.__all__) >= {"FullGrad", "SimpleFullGrad", "SmoothFullGrad",
                                  "Decomposition", "Explanation", "METHODS", "__version__"}


def test_load_model_and_its_documented_fields():
    from fgcli import FullGrad
    from fgcli.models import load_model

    loaded = load_model("squeezenet1_1", str(SQUEEZENET_WEIGHTS))
    assert loaded.preprocessing.size == (224, 224) and loaded.preprocessing is loaded.config
    assert loaded.categories[0] == "tench" and loaded.num_classes == 1000
    info = loaded.describe()
    assert info["source"] == "torchvision" and info["classes"] == 1000
    x = torch.zeros(1, 3, 64, 64)
    assert FullGrad(loaded.model).saliency(x).shape == (1, 1, 64, 64)
