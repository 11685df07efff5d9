"""Shared fixtures and the two test tiers.

``python -m pytest`` runs the fast tier; ``python -m pytest --full`` runs every test. A test
marked ``slow`` is in the full tier only: the fast run skips it with the reason
``full tier: run `python -m pytest --full```. Helpers (paths, the CLI runner, weight
recipes, ...) live in helpers.py.

Random initialisation leaves biases at zero and BatchNorm at mean 0 / var 1,
which makes every bias-gradient vanish; helpers.py's recipes re-draw them so the
tests exercise non-trivial bias terms.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import FULL_TIER, PHOTOS, SQUEEZENET_WEIGHTS, randomise, reference_recipe
from PIL import Image
from torch import nn

torch.set_num_threads(2)  # the golden fixtures were made with two threads


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true", default=False,
                     help="run the full tier too: every model family member, subprocess, "
                          "torchrun, Ray and browser tests, big checkpoints (tests marked "
                          "slow)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the full tier's tests (marked ``slow``) unless --full; CUDA tests without one."""
    full = config.getoption("--full")
    cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not full:
            item.add_marker(pytest.mark.skip(reason=FULL_TIER))
        if "cuda" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="session")
def resnet18_ref() -> nn.Module:
    return reference_recipe("resnet18")


@pytest.fixture(scope="session")
def vgg16_bn_ref() -> nn.Module:
    return reference_recipe("vgg16_bn")


@pytest.fixture(scope="module")
def squeezenet() -> nn.Module:
    """squeezenet1_1 with the real example weights, in eval mode."""
    model = torchvision.models.squeezenet1_1()
    model.load_state_dict(torch.load(SQUEEZENET_WEIGHTS, weights_only=True))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_cnn() -> nn.Module:
    """A small float64 ReLU/BN CNN with in-place ops, biases and a non-zero head."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(6, 6, 3, padding=1)
            self.bn = nn.BatchNorm2d(6)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.bn(self.conv(x))
            out += x  # in place on a recorded batch-norm output
            return self.relu(out)  # and in-place ReLU on top

    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
        Block(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )
    return randomise(model.double())


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    """Six photos in two folders and a broken file: for runs split into shards."""
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    for i, photo in enumerate(sorted(PHOTOS.iterdir())):
        (root / ("sub" if i % 2 else "") / photo.name).write_bytes(photo.read_bytes())
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return root


@pytest.fixture()
def imgs(tmp_path: Path) -> Path:
    """Three small noise images and a white one (sorted: a, b, c, white)."""
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        noise = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(noise).save(root / f"{name}.png")
    Image.new("RGB", (20, 20), (255, 255, 255)).save(root / "white.png")
    return root


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Keep each phase's report on the item (``item.rep_call``): fixtures that hold a
    browser save a screenshot when the test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)
