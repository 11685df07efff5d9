"""`fullgrad eval --sanity`: the cascading randomisation test (Adebayo et al. 2018), its
metrics against direct NumPy computations, and the files the CLI writes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from helpers import PHOTOS, SQUEEZENET, cli
from torch import nn

from fgcli.evaluate.methods import build
from fgcli.evaluate.sanity import (
    Cascade,
    cut_points,
    fresh_tensors,
    parameterised_modules,
    sanity_batches,
    spearman,
    ssim,
)

# ------------------------------------------------------------------ slow, direct references


def numpy_ssim(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """Wang et al.'s mean SSIM written out window by window (min-max to [0, 1] first)."""

    def unit(m: np.ndarray) -> np.ndarray:
        span = m.max() - m.min()
        return (m - m.min()) / span if span > 0 else np.zeros_like(m)

    x, y = unit(a.astype(np.float64)), unit(b.astype(np.float64))
    offsets = np.arange(size) - (size - 1) / 2
    g = np.exp(-offsets ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    values = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            px, py = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cov = (w * (px - mx) * (py - my)).sum()
            c1, c2 = 0.01 ** 2, 0.03 ** 2
            values.append((2 * mx * my + c1) * (2 * cov + c2)
                          / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def numpy_spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of average ranks, ranks counted pairwise (ties: mean rank)."""

    def ranks(v: np.ndarray) -> np.ndarray:
        v = v.ravel()
        less = (v[None, :] < v[:, None]).sum(1)
        equal = (v[None, :] == v[:, None]).sum(1)
        return 1 + less + (equal - 1) / 2

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def test_ssim_equals_the_window_by_window_numpy_computation():
    rng = np.random.default_rng(0)
    a = rng.random((3, 17, 21))
    b = a + rng.normal(0, 0.3, a.shape)
    b[2] = rng.random((17, 21)) ** 3  # unrelated
    ours = ssim(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    expected = [numpy_ssim(a[i], b[i]) for i in range(3)]
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-12)
    assert ours[0] > ours[2]
    # identical maps, and a map against a positive rescaling of itself: 1
    same = ssim(torch.from_numpy(a), torch.from_numpy(3 * a + 1)).numpy()
    np.testing.assert_allclose(same, 1.0, atol=1e-12)
    # a map smaller than the window uses the largest odd window that fits
    small_a, small_b = rng.random((1, 8, 9)), rng.random((1, 8, 9))
    np.testing.assert_allclose(
        ssim(torch.from_numpy(small_a), torch.from_numpy(small_b)).numpy(),
        [numpy_ssim(small_a[0], small_b[0], size=7)], rtol=1e-10)


def test_spearman_equals_the_direct_computation_with_ties():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 5, (2, 12, 13)).astype(np.float32)  # many ties
    b = a + rng.integers(0, 3, a.shape)
    ours = spearman(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(ours, [numpy_spearman(a[i], b[i]) for i in range(2)],
                               rtol=1e-12)
    c = rng.random((2, 10, 10))
    t = torch.from_numpy(c)
    np.testing.assert_allclose(spearman(t, t.exp()).numpy(), 1.0)  # monotone: 1
    np.testing.assert_allclose(spearman(t, -t).numpy(), -1.0)
    # a constant map has no ranking: 0, not NaN
    assert spearman(t, torch.ones_like(t)).tolist() == [0.0, 0.0]


# ------------------------------------------------------------------ the cascade


class Tiny(nn.Module):
    """Attributes declared in another order than the forward pass calls them; a module
    that is never called; a parameter of the root module itself."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 5)
        self.unused = nn.Linear(2, 2)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.offset = nn.Parameter(torch.full((3, 1, 1), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x + self.offset)))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


def tiny() -> Tiny:
    torch.manual_seed(123)
    model = Tiny().eval()
    with torch.no_grad():  # "trained" batch-norm statistics, not the defaults
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
    return model


X = torch.randn(4, 3, 24, 24, generator=torch.Generator().manual_seed(5))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_modules_are_ordered_from_the_logits_down_by_the_forward_pass():
    model = tiny()
    assert [n for n, _ in parameterised_modules(model, X[:1])] == [
        "head", "conv2", "bn", "conv1", ""]  # 'unused' is never called
    assert cut_points(5, 6) == [1, 2, 3, 4, 5]
    assert cut_points(26, 6) == [1, 6, 11, 16, 21, 26]
    assert cut_points(26, 2) == [1, 26]
    assert cut_points(1, 6) == [1]


def test_what_is_randomised_and_how():
    model = tiny()
    values, how = fresh_tensors(model.bn, seed=3)
    assert how == "reset_parameters"
    assert torch.equal(values["weight"], torch.ones(8)) and torch.equal(values["bias"],
                                                                        torch.zeros(8))
    assert torch.equal(values["running_mean"], torch.zeros(8))
    assert torch.equal(values["running_var"], torch.ones(8))
    values, how = fresh_tensors(model.conv1, seed=3)
    assert how == "reset_parameters" and set(values) == {"weight", "bias"}
    assert not torch.equal(values["weight"], model.conv1.weight)
    big = nn.Module()
    big.table = nn.Parameter(torch.randn(200, 100) * 0.5 + 2.0)  # no reset_parameters
    values, how = fresh_tensors(big, seed=3)
    assert how == "normal"
    assert abs(float(values["table"].std()) - float(big.table.detach().std())) < 0.02
    assert abs(float(values["table"].mean())) < 0.02


def test_the_cascade_randomises_a_copy_top_down_and_deterministically():
    model = tiny()
    before = snapshot(model)
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    cascade = Cascade.build(model, X[:1], steps=6, seed=0)
    assert cascade.cuts == [1, 2, 3, 4, 5] and cascade.how[-1] == "normal"
    assert [cascade.label(k) for k in range(5)] == ["head", "conv2", "bn", "conv1", "(model)"]
    twin = cascade.randomise(2)  # head and conv2
    changed = {k.split(".")[0] for k, v in twin.state_dict().items()
               if not torch.equal(v, before[k])}
    assert changed == {"head", "conv2"}
    full = snapshot(cascade.randomise(5))
    assert {k.split(".")[0] for k, v in full.items() if not torch.equal(v, before[k])} == {
        "head", "conv2", "bn", "conv1", "offset"}
    cascade.restore()
    assert all(torch.equal(v, before[k]) for k, v in cascade.twin.state_dict().items())
    # the caller's model: untouched, no hook left
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert hooks == sum(len(m._forward_pre_hooks) + len(m._forward_hooks)
                        for m in model.modules())
    # the same seed draws the same values, another seed others; a module gets the same
    # values at every step (cumulative)
    again = Cascade.build(model, X[:1], steps=6, seed=0)
    assert all(torch.equal(v, full[k]) for k, v in snapshot(again.randomise(5)).items())
    assert torch.equal(again.randomise(1).head.weight, full["head.weight"])
    other = snapshot(Cascade.build(model, X[:1], steps=6, seed=1).randomise(5))
    assert not torch.equal(other["head.weight"], full["head.weight"])


def _sanity(model: nn.Module, seed: int = 0):
    def make(name, m, s):
        return build(name, m, samples=2, seed=s, mean=(0.5,) * 3, std=(0.25,) * 3)

    with torch.no_grad():
        target = model(X).argmax(1)
    batches = iter([(X[:2], target[:2]), (X[2:], target[2:])])
    return sanity_batches(model, ["fullgrad", "gradient", "random"], make, batches, steps=6,
                          seed=seed)


def test_randomising_the_model_changes_the_maps():
    model = tiny()
    before = snapshot(model)
    result = _sanity(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert result.labels == ["head", "conv2", "bn", "conv1", "(model)"]
    for method in ("fullgrad", "gradient"):
        rho = result.results[method]["spearman"].mean
        assert rho[-1] < rho[0] - 0.1 and rho[0] < 0.99, (method, rho)
        assert result.results[method]["spearman"].n == 4
        s = result.results[method]["ssim"].mean
        assert s[-1] < s[0], (method, s)
    for metric in ("spearman", "ssim"):
        assert max(abs(v) for v in result.results["random"][metric].mean) < 0.1
    # deterministic under the seed
    again = _sanity(tiny())
    assert again.results == result.results


# ------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def sanity_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sanity")
    photos = [str(PHOTOS / n) for n in ("coffee.png", "chelsea.png")]
    result = cli("eval", *photos, *SQUEEZENET, "--methods", "fullgrad,gradient,random",
                 "--metrics", "perturbation", "--ks", "50", "--sanity", "--sanity-steps", "3",
                 "--out", str(out))
    return out, result


def test_cli_writes_the_sanity_table_json_csv_and_plot(sanity_run):
    out, result = sanity_run
    assert result.exit_code == 0, result.stderr
    data = json.loads((out / "eval.json").read_text())["sanity"]
    assert [s["module"] for s in data["steps"]] == ["classifier.1", "features.7.expand3x3",
                                                    "features.0"]
    assert [s["randomised"] for s in data["steps"]] == [1, 14, 26]
    assert len(data["modules"]) == 26 and data["modules"][0] == {"module": "classifier.1",
                                                                 "init": "reset_parameters"}
    assert set(data["methods"]) == {"fullgrad", "gradient", "random"}
    step = data["methods"]["fullgrad"][0]
    assert step["module"] == "classifier.1" and step["n"] == 2
    assert -1 <= step["spearman"]["mean"] <= 1 and step["ssim"]["se"] >= 0
    rows = list(csv.DictReader((out / "sanity.csv").open()))
    assert len(rows) == 3 * 3 and rows[0]["module"] == "classifier.1"
    assert float(rows[0]["spearman_mean"]) == pytest.approx(step["spearman"]["mean"],
                                                            abs=1e-5)
    assert (out / "sanity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = result.stdout.splitlines()
    assert any(line.startswith("sanity check: layers randomised") for line in lines)
    row = next(line for line in lines if line.startswith("fullgrad ")
               and "±" in line and len(line.split()) == 4)
    assert row.split()[1].startswith(f"{step['spearman']['mean']:.3f}±")
    assert "sanity.csv" in lines[-1] and "sanity.png" in lines[-1]


def test_without_sanity_nothing_of_it_is_written(tmp_path):
    photos = [str(PHOTOS / n) for n in ("coffee.png", "chelsea.png")]
    result = cli("eval", *photos, *SQUEEZENET, "--methods", "random", "--metrics",
                 "perturbation", "--ks", "50", "--out", str(tmp_path), "-q")
    assert result.exit_code == 0, result.stderr
    assert "sanity" not in json.loads((tmp_path / "eval.json").read_text())
    assert not (tmp_path / "sanity.csv").exists() and not (tmp_path / "sanity.png").exists()


def test_sanity_steps_below_two_is_a_usage_error(tmp_path):
    result = cli("eval", str(PHOTOS), *SQUEEZENET, "--out", str(tmp_path), "--sanity",
                 "--sanity-steps", "1")
    assert result.exit_code == 2 and "--sanity-steps must be >= 2" in result.stderr
