"""What the tests share: paths, the small squeezenet set-up, an in-process CLI runner,
manifest readers, the completeness check and the weight recipes.

One home for each helper: a test module imports it from here (``from helpers import cli``)
instead of copying it. Fixtures live in conftest.py; fault injection in faults.py; gallery
trees in gallery_util.py.
"""

from __future__ import annotations

import contextlib
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner, Result

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
REFERENCE = FIXTURES / "reference"
PHOTOS = ROOT / "examples" / "photos"
SQUEEZENET_WEIGHTS = ROOT / "examples" / "weights" / "squeezenet1_1_imagenet.pth"
# the real squeezenet weights at 64 px: the fast model of every end-to-end test
SQUEEZENET = ["--model", "squeezenet1_1", "--weights", str(SQUEEZENET_WEIGHTS), "--size", "64"]

# the skip reason of a test the fast tier leaves out (conftest.py's --full)
FULL_TIER = "full tier: run `python -m pytest --full`"


# ------------------------------------------------------------------------------ the CLI

def cli(*args: str, **kwargs: Any) -> Result:
    """``fullgrad ARGS`` in process (Typer's CliRunner). An exception other than the exit
    is raised again, so a traceback fails the test instead of hiding in the result."""
    from fgcli.cli import app  # here: a broken CLI fails the CLI tests, not every test

    result = CliRunner().invoke(app, list(args), **kwargs)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def one_error_line(result: Result, *parts: str, exit_code: int = 2) -> str:
    """The run exited ``exit_code`` after printing exactly one line, ``fullgrad: error:
    ...`` holding each of ``parts``: no traceback, no usage text."""
    assert result.exit_code == exit_code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fullgrad: error: "), lines[0]
    assert "usage:" not in result.output and "Traceback" not in result.output, result.output
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


# a tiny user model (``--model FILE.py:build``): 16 px input, a 3x3 conv and a linear head
NET = '''
import torch
from torch import nn

INPUT_SIZE = 16
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


class Net(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, n)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))
'''


def model_file(folder: Path, body: str, name: str = "net.py") -> str:
    """Write NET plus ``body`` to ``folder/name``; returns its ``file.py:build`` spec."""
    path = folder / name
    path.write_text(NET + textwrap.dedent(body))
    return f"{path}:build"


# ------------------------------------------------------------------------------ manifests

def manifest(tree: Path) -> list[dict[str, Any]]:
    """The records of ``tree/manifest.jsonl``, in file order."""
    return [json.loads(line) for line in (tree / "manifest.jsonl").read_text().splitlines()]


def reject_constant(name: str) -> None:
    """json.loads's ``parse_constant``: NaN, Infinity and -Infinity are not JSON."""
    raise ValueError(f"not JSON (RFC 8259): {name}")


def strict_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a manifest, parsed strictly: UTF-8, no NaN/Infinity, each a JSON
    object, the file ending in a newline (no torn last line); [] when there is none."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), f"{path} ends in a torn line: {raw[-80:]!r}"
    records = []
    for line in raw.decode("utf-8").splitlines():
        rec = json.loads(line, parse_constant=reject_constant)
        assert isinstance(rec, dict), line
        records.append(rec)
    return records


# ------------------------------------------------------------------------------ the engine

def assert_complete(logit: torch.Tensor, residual: torch.Tensor, rel: float = 1e-4) -> None:
    """Completeness: ``|residual| <= rel * max(1, |logit|)`` for every image (the bound in
    float64)."""
    bound = rel * logit.double().abs().clamp(min=1.0)
    assert (residual.abs() <= bound).all(), (residual, logit)


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


def random_images(n: int, size: int = 64, seed: int = 1,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` normal-noise images (a fixed generator: the same tensor on every call)."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed),
                       dtype=dtype)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch with one compute thread, as torchrun ranks, shard processes and Ray actors
    do here: another thread count reorders float sums inside convolutions, which can flip
    near-tied ReLU / max-pool decisions (maps then differ by up to ~5e-3 of their max)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
