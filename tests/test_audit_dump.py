"""The dump's audit fields end to end (in process): every ok record's ``stats`` and,
with --boxes / --masks, its ``objects``, checked against an independent computation from
the saved maps, the photos' sizes and the annotation (tests/audit_util.py); with and
without --crop; the summary line; malformed annotations refused before the model loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from audit_util import direct_objects, direct_stats
from helpers import PHOTOS, SQUEEZENET, cli, manifest, one_error_line
from PIL import Image

from fgcli.audit.stats import STAT_NAMES
from fgcli.data.decode import Box, preprocess

BASE = ["dump", *SQUEEZENET, "--workers", "0", "--save", "map", str(PHOTOS)]


def region_of(tree: Path, rec: dict) -> Box:
    """The region of the original photo the model saw, from the run's own settings."""
    w, h = Image.open(rec["input"]).size
    run = json.loads((tree / "run.json").read_text())
    info = run["preprocessing"]
    if not info["crop"]:
        return Box(0, 0, w, h)
    size = tuple(info["size"])
    _, box = preprocess(np.zeros((h, w, 3), np.float32), size, True, info["resize"],
                        (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    return box


def saved_map(tree: Path, rec: dict) -> np.ndarray:
    return np.load(tree / rec["outputs"]["map"])


def check_stats(tree: Path) -> list[dict]:
    recs = [r for r in manifest(tree) if r["status"] in ("ok", "skipped")]
    assert len(recs) == len(list(PHOTOS.iterdir()))
    for rec in recs:
        want = direct_stats(saved_map(tree, rec), region_of(tree, rec))
        for name in STAT_NAMES:
            assert rec["stats"][name] == pytest.approx(want[name], rel=5e-5, abs=1e-4), \
                (rec["key"], name)
    return recs


@pytest.mark.parametrize("crop", [False, True])
def test_every_record_has_its_maps_statistics(tmp_path: Path, crop: bool) -> None:
    out = tmp_path / "out"
    result = cli(*BASE, "-o", str(out), "-q", *(["--crop"] if crop else []))
    assert result.exit_code == 0, result.output
    recs = check_stats(out)
    run = json.loads((out / "run.json").read_text())
    assert run["preprocessing"]["crop"] is crop
    for rec in recs:  # the peak lies inside the region the model saw
        region = region_of(out, rec)
        assert region.left <= rec["stats"]["peak_x"] <= region.right
        assert region.top <= rec["stats"]["peak_y"] <= region.bottom


def _boxes_csv(path: Path, rows: list[tuple]) -> Path:
    path.write_text("path,x0,y0,x1,y1,label\n" + "".join(
        ",".join(str(v) for v in row) + "\n" for row in rows))
    return path


def _peaks(tmp_path: Path, crop: list[str]) -> dict[str, dict]:
    """A first dump's records: where each map peaks (the boxes are drawn around them)."""
    out = tmp_path / "first"
    assert cli(*BASE, "-o", str(out), "-q", *crop).exit_code == 0
    return {r["key"]: r for r in manifest(out)}


@pytest.mark.parametrize("crop", [[], ["--crop"]])
def test_boxes_give_the_pointing_game_and_energy(tmp_path: Path, crop: list[str]) -> None:
    first = _peaks(tmp_path, crop)
    cat, cup = first["chelsea.png"]["stats"], first["coffee.png"]["stats"]
    rows = [("chelsea.png", cat["peak_x"] - 40, cat["peak_y"] - 30, cat["peak_x"] + 25,
             cat["peak_y"] + 20, "cat"),  # around the peak: a hit
            ("chelsea.png", 0, 0, 5, 5, "cat"),
            ("coffee.png", cup["peak_x"] + 30, cup["peak_y"] + 30, cup["peak_x"] + 90,
             cup["peak_y"] + 80, "cup"),  # 30 px right and down: a miss at 15 px
            ("sub/grace_hopper.jpg", 10, 10, 60, 90, "person"),  # matched by its stem
            ("nowhere.jpg", 1, 1, 2, 2, "x")]  # matches no image
    csv = _boxes_csv(tmp_path / "boxes.csv", rows)
    out = tmp_path / "out"
    result = cli(*BASE, "-o", str(out), "--boxes", str(csv), *crop)
    assert result.exit_code == 0, result.output
    assert ("boxes: 3 of 6 images annotated; 3 without an annotation; 1 annotation matches "
            "no image; labels are not all class names: every box counts"
            ) in " ".join(result.output.split())
    again = cli(*BASE, "-o", str(out), "--boxes", str(csv), *crop)  # a resumed run
    assert "boxes: 3 of 6 images annotated" in " ".join(again.output.split())
    recs = {r["key"]: r for r in check_stats(out)}
    assert {k for k, r in recs.items() if "objects" in r} == {
        "chelsea.png", "coffee.png", "grace_hopper.jpg"}
    for key, rec in recs.items():
        if "objects" not in rec:
            continue
        boxes = [tuple(float(v) for v in row[1:5]) for row in rows
                 if Path(row[0]).stem == Path(key).stem]
        want = direct_objects(saved_map(out, rec), region_of(out, rec), boxes, 15.0)
        got = rec["objects"]
        assert (got["match"], got["source"], got["boxes"]) == ("any", "boxes", len(boxes))
        assert got["hit"] is want["hit"] and got["box"] == want["box"], key
        assert got["energy"] == pytest.approx(want["energy"], rel=1e-4, abs=1e-6), key
        assert got["label"] == (None if want["box"] is None else rows[0][5] if key ==
                                "chelsea.png" else got["label"])
    assert recs["chelsea.png"]["objects"]["hit"] is True
    assert recs["chelsea.png"]["objects"]["box"] == 0
    assert recs["coffee.png"]["objects"]["hit"] is False


def test_labels_that_name_classes_use_the_targets_boxes(tmp_path: Path) -> None:
    first = _peaks(tmp_path, [])
    names = {k: r["target_name"] for k, r in first.items()}
    cat = first["chelsea.png"]["stats"]
    assert "goldfish" not in names.values()
    rows = [("chelsea.png", 0, 0, 10, 10, "goldfish"),  # every label names a class
            ("chelsea.png", cat["peak_x"] - 5, cat["peak_y"] - 5, cat["peak_x"] + 5,
             cat["peak_y"] + 5, names["chelsea.png"].upper().replace(" ", "_")),
            ("coffee.png", 0, 0, 30, 30, "Goldfish"),
            ("rocket.jpg", 0, 0, 30, 30, str(first["rocket.jpg"]["target"]))]  # an index
    csv = _boxes_csv(tmp_path / "boxes.csv", rows)
    out = tmp_path / "out"
    assert cli(*BASE, "-o", str(out), "-q", "--boxes", str(csv)).exit_code == 0
    recs = {r["key"]: r for r in manifest(out)}
    cat_objects = recs["chelsea.png"]["objects"]
    assert (cat_objects["match"], cat_objects["boxes"], cat_objects["hit"],
            cat_objects["box"]) == ("class", 1, True, 1)
    assert (recs["coffee.png"]["objects"]["match"], recs["coffee.png"]["objects"]["hit"],
            recs["coffee.png"]["objects"]["energy"]) == ("absent", False, 0.0)
    assert recs["rocket.jpg"]["objects"]["match"] == "class"


def test_masks_give_the_pointing_game_and_energy(tmp_path: Path) -> None:
    first = _peaks(tmp_path, [])
    cat = first["chelsea.png"]["stats"]
    w, h = Image.open(PHOTOS / "chelsea.png").size
    mask = np.zeros((h, w), np.uint8)
    x0, y0 = int(cat["peak_x"]) - 20, int(cat["peak_y"]) - 20
    mask[y0:y0 + 50, x0:x0 + 60] = 255
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(mask).save(masks / "chelsea.png")
    cw, ch = Image.open(PHOTOS / "coffee.png").size
    Image.fromarray(np.zeros((ch, cw), np.uint8)).save(masks / "coffee.png")  # no object
    Image.fromarray(np.ones((8, 8), np.uint8)).save(masks / "rocket.png")  # too small
    (masks / "astronaut.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert cli(*BASE, "-o", str(out), "-q", "--masks", str(masks)).exit_code == 0
    rec = {r["key"]: r for r in manifest(out)}
    got = rec["chelsea.png"]["objects"]
    want = direct_objects(saved_map(out, rec["chelsea.png"]), Box(0, 0, w, h),
                          [(x0, y0, x0 + 60, y0 + 50)], 15.0)
    assert (got["source"], got["match"], got["hit"]) == ("masks", "any", True)
    assert got["energy"] == pytest.approx(want["energy"], rel=1e-3)
    empty = rec["coffee.png"]["objects"]
    assert (empty.get("match"), empty.get("hit"), empty.get("energy"), empty.get("boxes")
            ) == ("absent", False, 0.0, 0), empty
    for key, why in (("rocket.jpg", "8x8 pixels, smaller than its image"),
                     ("astronaut.png", "cannot read the PNG")):
        assert rec[key]["status"] == "ok" and rec[key]["outputs"]["map"]  # the result stays
        error = rec[key]["objects"]["error"]
        assert why in error and str(masks / Path(key).with_suffix(".png")) in error, error


def test_a_malformed_annotation_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    csv = tmp_path / "boxes.csv"
    csv.write_text("a.jpg,1,2,3,4\nb.jpg,1,2,three,4\n")
    result = cli(*BASE, "-o", str(tmp_path / "out"), "--boxes", str(csv))
    line = one_error_line(result, str(csv), ":2")
    assert "three" in line or "number" in line
    assert not (tmp_path / "out").exists()
    both = cli(*BASE, "-o", str(tmp_path / "out"), "--boxes", str(csv), "--masks",
               str(tmp_path))
    one_error_line(both, "--boxes and --masks")
