"""`fullgrad eval --boxes / --masks`: pointing-game accuracy and energy per method, on maps
whose answer is known (with and without --crop: boxes stay in original pixels), and end to
end on the example photos."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import PHOTOS, SQUEEZENET, cli, one_error_line
from PIL import Image

from fgcli.evaluate.localisation import mean_se, pointing_summary

# A 200 x 100 image at --size 64: without --crop the 64 x 64 map covers the whole image
# (a map pixel is 3.125 x 1.5625 original pixels); with --crop (resize side round(64 /
# 0.875) = 73: the image becomes 146 x 73, its centre 64 x 64 kept from (41, 4)) the map
# covers the original's [56, 144] x [5, 93] (1.375 pixels a map pixel).
HOT = {"fullgrad": (32, 8), "gradient": (32, 56)}  # the map's hot pixel (row, column)
# centres of those pixels in original pixels:
#   no crop: fullgrad (26.6, 50.8), gradient (176.6, 50.8)
#   crop:    fullgrad (67.7, 49.7), gradient (133.7, 49.7)
BOXES = "path,x0,y0,x1,y1\na.png,60,40,80,60\nb.png,170,40,190,60\n"  # c.png: none


def _hot_spot(name: str, *_: Any, **__: Any) -> Any:
    """A stand-in method: a map that is 0 but for one pixel, where the answer is known."""
    row, col = HOT[name]

    def run(_model: Any, x: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
        maps = torch.zeros(x.shape[0], x.shape[2], x.shape[3], device=x.device)
        maps[:, row, col] = 1.0
        return maps

    return run


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name, shade in (("a", 90), ("b", 150), ("c", 210)):
        Image.fromarray(np.full((100, 200, 3), shade, np.uint8)).save(folder / f"{name}.png")
    return folder


def _eval(monkeypatch: pytest.MonkeyPatch, images: Path, out: Path, *args: str
          ) -> dict[str, Any]:
    from fgcli.evaluate import methods

    monkeypatch.setattr(methods, "build", _hot_spot)
    result = cli("eval", str(images), *SQUEEZENET, "--methods", "fullgrad,gradient",
                 "--metrics", "perturbation", "--ks", "50", "-o", str(out), *args)
    assert result.exit_code == 0, result.output
    return json.loads((out / "eval.json").read_text())["localisation"]


@pytest.mark.parametrize("crop, expected", [
    ([], {"fullgrad": [0, 0], "gradient": [0, 1]}),
    (["--crop"], {"fullgrad": [1, 0], "gradient": [0, 0]}),
])
def test_pointing_and_energy_on_known_maps_with_and_without_crop(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, images: Path, crop: list[str],
        expected: dict[str, list[int]]) -> None:
    (tmp_path / "boxes.csv").write_text(BOXES, encoding="utf-8")
    loc = _eval(monkeypatch, images, tmp_path / "out", "--boxes", str(tmp_path / "boxes.csv"),
                *crop)
    assert (loc["images"], loc["annotated"], loc["unannotated"]) == (3, 2, 1)
    assert loc["summary"].startswith("boxes: 2 of 3 images annotated; 1 without an "
                                     "annotation; 0 annotations match no image")
    for method, hits in expected.items():
        r = loc["results"][method]
        p = sum(hits) / 2
        assert (r["located"], r["hits"], r["absent"]) == (2, sum(hits), 0)
        assert r["pointing"] == p and r["pointing_se"] == pytest.approx(
            math.sqrt(p * (1 - p) / 2))
        # a one-hot map: all its mass is in the box exactly when its peak is
        assert r["energy"] == p and r["energy_n"] == 2
        assert r["energy_se"] == pytest.approx(np.std(hits, ddof=1) / math.sqrt(2))


def test_the_tolerance_reaches_a_peak_outside_the_box(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path, images: Path) -> None:
    (tmp_path / "boxes.csv").write_text(BOXES, encoding="utf-8")
    # no crop: fullgrad's peak (26.6, 50.8) is 33.4 px left of a.png's box
    loc = _eval(monkeypatch, images, tmp_path / "out", "--boxes", str(tmp_path / "boxes.csv"),
                "--point-tolerance", "34")
    r = loc["results"]["fullgrad"]
    assert loc["tolerance"] == 34 and (r["hits"], r["energy"]) == (1, 0.0)


def test_masks_and_an_unreadable_mask(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                      images: Path) -> None:
    masks = tmp_path / "masks"
    masks.mkdir()
    mask = np.zeros((100, 200), np.uint8)
    mask[40:60, 170:190] = 1  # gradient's peak without crop, at (176.6, 50.8)
    Image.fromarray(mask).save(masks / "a.png")
    (masks / "b.png").write_bytes(b"broken")
    Image.fromarray(np.ones((10, 10), np.uint8)).save(masks / "c.png")  # not the image's size
    loc = _eval(monkeypatch, images, tmp_path / "out", "--masks", str(masks))
    assert (loc["source"], loc["annotated"], loc["unannotated"]) == ("masks", 1, 0)
    errors = [(Path(e["image"]).name, e["error"]) for e in loc["mask_errors"]]
    assert [name for name, _ in errors] == ["b.png", "c.png"]
    assert "b.png" in errors[0][1] and "smaller than its image" in errors[1][1]
    assert "2 masks not usable (eval.json: mask_errors)" in loc["summary"]
    assert loc["results"]["gradient"]["hits"] == 1 and loc["results"]["fullgrad"]["hits"] == 0
    assert loc["results"]["gradient"]["energy"] == 1.0


def test_labels_that_name_classes_count_apart_when_absent(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path,
                                                          images: Path) -> None:
    # --target 0 (tench): a.png's box is a tench, b.png's a goldfish (class 1): "absent"
    (tmp_path / "boxes.csv").write_text("a.png,60,40,80,60,tench\nb.png,170,40,190,60,1\n",
                                        encoding="utf-8")
    loc = _eval(monkeypatch, images, tmp_path / "out", "--boxes", str(tmp_path / "boxes.csv"),
                "--crop", "--target", "0")
    assert loc["by_class"] is True
    r = loc["results"]["fullgrad"]
    assert (r["located"], r["hits"], r["absent"]) == (1, 1, 1)
    assert (r["pointing"], r["pointing_se"]) == (1.0, 0.0)


def test_summaries() -> None:
    assert pointing_summary([]) == (None, None)
    assert pointing_summary([True, False, True, True]) == (0.75, math.sqrt(0.75 * 0.25 / 4))
    assert mean_se([]) == (None, None) and mean_se([0.5]) == (0.5, 0.0)
    mean, se = mean_se([0.2, 0.4, 0.9])
    assert mean == pytest.approx(0.5) and se == pytest.approx(np.std([0.2, 0.4, 0.9],
                                                                     ddof=1) / math.sqrt(3))


@pytest.mark.parametrize("args, message", [
    (["--boxes", "{bad}"], "bad.csv:3: x0 is not a number: 'one'"),
    (["--boxes", "{tmp}/nothing.csv"], "no such file"),
    (["--boxes", "{bad}", "--masks", "{tmp}"], "--boxes and --masks exclude each other"),
    (["--point-tolerance", "-1"], "--point-tolerance must be >= 0"),
])
def test_bad_annotations_are_one_line_before_the_model_loads(tmp_path: Path, args: list[str],
                                                             message: str) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("path,x0,y0,x1,y1\na.png,0,0,1,1\nb.png,one,0,1,1\n", encoding="utf-8")
    args = [a.format(bad=bad, tmp=tmp_path) for a in args]
    result = cli("eval", str(PHOTOS), "--model", "squeezenet1_1", "--weights",
                 str(tmp_path / "no-such-weights.pth"), "-o", str(tmp_path / "out"), *args)
    one_error_line(result, message)
    assert not (tmp_path / "out").exists()


def test_eval_on_the_photos_with_boxes_for_some(tmp_path: Path) -> None:
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,x0,y0,x1,y1,label\ncoffee.png,170,15,412,305,espresso cup\n"
                     "chelsea.png,0,0,395,300,cat\n", encoding="utf-8")  # rocket.jpg: none
    photos = [str(PHOTOS / n) for n in ("coffee.png", "chelsea.png", "rocket.jpg")]
    methods = ["fullgrad", "gradcam", "gradient", "integrated-gradients", "random"]
    out = tmp_path / "out"
    result = cli("eval", *photos, *SQUEEZENET, "--methods", ",".join(methods), "--metrics",
                 "deletion", "--steps", "4", "--boxes", str(boxes), "-o", str(out))
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if line.startswith("method"))
    assert header.split()[-2:] == ["pointing", "energy"]
    assert "boxes: 2 of 3 images annotated; 1 without an annotation" in result.stdout
    loc = json.loads((out / "eval.json").read_text())["localisation"]
    assert list(loc["results"]) == methods and loc["annotated"] == 2
    for r in loc["results"].values():
        assert r["located"] == 2 and 0 <= r["hits"] <= 2
        for key in ("pointing", "pointing_se", "energy", "energy_se"):
            assert math.isfinite(r[key]) and 0.0 <= r[key] <= 1.0
    rows = list(csv.DictReader((out / "eval.csv").open()))
    for metric in ("pointing", "energy"):
        got = {r["method"]: r for r in rows if r["metric"] == metric}
        assert list(got) == methods
        assert all(math.isfinite(float(r["mean"])) and r["n"] == "2" for r in got.values())
    row = next(line for line in result.stdout.splitlines() if line.startswith("fullgrad "))
    p = loc["results"]["fullgrad"]
    assert row.split()[-2] == f"{p['pointing']:.3f}±{p['pointing_se']:.3f}"
