"""`fullgrad eval` end to end: files, determinism, the table, bad inputs."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import PHOTOS, SQUEEZENET, cli


def run(*args: str):
    return cli("eval", *args)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    photos = [str(PHOTOS / n) for n in ("coffee.png", "chelsea.png", "rocket.jpg")]
    args = [*photos, *SQUEEZENET, "--methods", "fullgrad,gradient,gradcam,random", "--steps", "8",
            "--samples", "2"]
    first = run(*args, "--out", str(out / "a"))
    second = run(*args, "--out", str(out / "b"), "-q")
    return out, first, second


def test_eval_writes_json_csv_png_and_prints_the_table(evaluated):
    out, first, _ = evaluated
    assert first.exit_code == 0, first.stderr
    for name in ("eval.json", "eval.csv", "eval.png"):
        assert (out / "a" / name).stat().st_size > 0
    assert (out / "a" / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "a" / "eval.json").read_text())
    assert len(data["images"]) == 3 and data["ks"] == [10, 30, 50, 70, 90]
    assert set(data["results"]) == {"fullgrad", "gradient", "gradcam", "random"}
    pert = data["results"]["fullgrad"]["perturbation"]
    assert len(pert["mean"]) == 5 and pert["n"] == 3
    assert all(0 <= v for v in pert["mean"]) and all(e >= 0 for e in pert["se"])
    for metric in ("deletion", "insertion"):
        auc = data["results"]["fullgrad"][metric]["mean"][0]
        assert 0.0 <= auc <= 1.0
        assert len(data["curves"]["fullgrad"][metric]) == 9
        assert len(data["curves_se"]["fullgrad"][metric]) == 9
        assert all(e >= 0 for e in data["curves_se"]["fullgrad"][metric])
    rows = list(csv.DictReader((out / "a" / "eval.csv").open()))
    assert len(rows) == 4 * (5 + 2) and {r["method"] for r in rows} == set(data["results"])
    table = first.stdout.splitlines()
    assert table[1].split()[:2] == ["method", "pert"] and "deletion AUC" in table[1]
    row = next(line for line in table if line.startswith("fullgrad "))
    mean = data["results"]["fullgrad"]["perturbation"]["mean"][0]
    assert row.split()[1].startswith(f"{mean:.3f}±")


def test_eval_is_deterministic(evaluated):
    out, _, second = evaluated
    assert second.exit_code == 0 and second.stdout == ""
    a = json.loads((out / "a" / "eval.json").read_text())["results"]
    b = json.loads((out / "b" / "eval.json").read_text())["results"]
    assert a == b


@pytest.mark.parametrize("args, message", [
    (["--methods", "fullgrad,nope"], "unknown method 'nope'"),
    (["--metrics", "accuracy"], "unknown metric 'accuracy'"),
    (["--ks", "0,50"], "strictly between 0 and 100"),
    (["--ks", "10,100"], "strictly between 0 and 100"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, message):
    result = run(str(PHOTOS), *SQUEEZENET, "--out", str(tmp_path), *args)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_too_few_images(tmp_path):
    (tmp_path / "bad.jpg").write_text("no")
    result = run(str(PHOTOS / "coffee.png"), str(tmp_path / "bad.jpg"), *SQUEEZENET,
                 "--out", str(tmp_path / "o"), "--methods", "fullgrad")
    assert result.exit_code == 2
    assert "at least two readable images" in result.stderr
    assert f"failed: {tmp_path / 'bad.jpg'}" in result.stderr


@pytest.mark.slow
def test_fullgrad_perturbation_curve_equals_the_reference_maps_curve(resnet18_ref):
    """eval's FullGrad row is the reference's curve: pixel perturbation of fgcli's maps and
    of the authors' reference maps (golden fixtures) agree on the same images and model."""
    import numpy as np
    import torch
    from helpers import REFERENCE

    from fgcli import FullGrad
    from fgcli.evaluate.metrics import IMAGENET, deletion_auc, pixel_perturbation

    with np.load(REFERENCE / "resnet18.npz") as ref:
        x = torch.from_numpy(ref["inputs"][:4])  # images 0-3: reproducible arithmetic
        reference_maps = torch.from_numpy(ref["fullgrad"][:4, 0])
    ours = FullGrad(resnet18_ref).saliency(x)[:, 0]
    a = pixel_perturbation(resnet18_ref, x, ours, norm=IMAGENET)
    b = pixel_perturbation(resnet18_ref, x, reference_maps, norm=IMAGENET)
    assert torch.allclose(a.mean(0), b.mean(0), atol=1e-3), (a.mean(0), b.mean(0))
    da = deletion_auc(resnet18_ref, x, ours, norm=IMAGENET, steps=10)
    db = deletion_auc(resnet18_ref, x, reference_maps, norm=IMAGENET, steps=10)
    assert torch.allclose(da, db, atol=1e-3)
    # and the metric can tell maps apart: a random map's curve is elsewhere
    noise = torch.rand(ours.shape, generator=torch.Generator().manual_seed(0))
    c = pixel_perturbation(resnet18_ref, x, noise, norm=IMAGENET)
    assert (c.mean(0) - a.mean(0)).abs().max() > 0.01


@pytest.mark.parametrize("name, kwargs, size, kind", [
    ("squeezenet1_1", {}, 64, "nchw"),
    ("swin_t", {}, 64, "nhwc"),
    ("vit_b_16", {"image_size": 64}, 64, "tokens"),
])
def test_gradcam_finds_a_grid_layer_in_every_layout(name, kwargs, size, kind):
    import torch
    import torchvision
    from helpers import randomise

    from fgcli.evaluate.methods import build, last_spatial_module

    torch.manual_seed(0)
    model = randomise(torchvision.models.get_model(name, **kwargs)).eval()
    x = torch.randn(2, 3, size, size)
    module, layout = last_spatial_module(model, x)
    assert layout.kind == kind and layout.grid[0] * layout.grid[1] > 1, (module, layout)
    maps = build("gradcam", model, samples=1, seed=0, mean=(0.5,) * 3, std=(0.5,) * 3)(
        model, x, torch.tensor([1, 2]))
    assert maps.shape == (2, size, size) and (maps >= 0).all() and torch.isfinite(maps).all()
