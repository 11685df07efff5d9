"""Shared fixtures: deterministic weight recipes, tiny models, paths.

Random initialisation leaves biases at zero and BatchNorm at mean 0 / var 1,
which makes every bias-gradient vanish; the recipes below re-draw them so the
tests exercise non-trivial bias terms.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
REFERENCE = FIXTURES / "reference"
SQUEEZENET_WEIGHTS = ROOT / "examples" / "weights" / "squeezenet1_1_imagenet.pth"

torch.set_num_threads(2)  # the golden fixtures were made with two threads


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def reference_recipe(name: str) -> nn.Module:
    """The golden fixtures' weights, re-implemented from fixtures/reference/README.md."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    rs = np.random.RandomState(0)

    def put(t: torch.Tensor, arr: np.ndarray) -> None:
        with torch.no_grad():
            t.copy_(torch.from_numpy(np.asarray(arr, dtype=np.float64).astype(np.float32))
                    .reshape(t.shape))

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            put(m.weight, rs.standard_normal(m.weight.shape) * np.sqrt(2.0 / fan_in))
            if m.bias is not None:
                put(m.bias, rs.normal(0, 0.1, m.bias.shape))
        elif isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            put(m.running_mean, rs.normal(0, 0.2, c))
            put(m.running_var, rs.uniform(0.5, 2.0, c))
            put(m.weight, rs.uniform(0.5, 1.5, c))
            put(m.bias, rs.normal(0, 0.2, c))
    return model.eval()


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights for any architecture (the same recipe as ``--weights random``)."""
    from fgcli.models.base import randomise_weights

    return randomise_weights(model, seed)


def random_images(n: int, size: int = 64, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed),
                       dtype=dtype)


@pytest.fixture(scope="session")
def resnet18_ref() -> nn.Module:
    return reference_recipe("resnet18")


@pytest.fixture(scope="session")
def vgg16_bn_ref() -> nn.Module:
    return reference_recipe("vgg16_bn")


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
    for i, photo in enumerate(sorted((ROOT / "examples" / "photos").iterdir())):
        (root / ("sub" if i % 2 else "") / photo.name).write_bytes(photo.read_bytes())
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return root


@contextlib.contextmanager
def one_thread():
    """Run torch with one compute thread, as torchrun ranks, shard processes and Ray actors
    do here: another thread count reorders float sums inside convolutions, which can flip
    near-tied ReLU / max-pool decisions (maps then differ by up to ~5e-3 of their max)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Keep each phase's report on the item (``item.rep_call``): fixtures that hold a
    browser save a screenshot when the test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)
