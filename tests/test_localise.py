"""The pointing game and energy (fgcli.audit.localise) on synthetic maps whose answers
are known, including the tolerance's edge and a crop region."""

from __future__ import annotations

import numpy as np
import pytest
from audit_util import direct_objects

from fgcli.audit.annotations import ImageObjects, Obj
from fgcli.audit.localise import locate, mask_hit, point_boxes, point_mask
from fgcli.data.decode import Box

REGION = Box(0, 0, 100, 100)


def hot(i: int, j: int, shape: tuple[int, int] = (10, 10)) -> np.ndarray:
    m = np.zeros(shape, np.float32)
    m[i, j] = 1.0
    return m


def test_a_peak_inside_a_box_hits_with_all_its_energy() -> None:
    m = hot(2, 3)  # peak at (35, 25) in a 100 x 100 image
    hit, energy, box = point_boxes(m, REGION, [Obj(60, 60, 90, 90, None),
                                               Obj(30, 20, 40, 30, None)], 0.0)
    assert (hit, energy, box) == (True, 1.0, 1)


@pytest.mark.parametrize(("gap", "hit"), [(15.0, True), (15.01, False)])
def test_the_tolerance_is_a_euclidean_distance_to_the_box(gap: float, hit: bool) -> None:
    m = hot(2, 3)  # peak (35, 25)
    dx = dy = gap / np.sqrt(2)
    b = Obj(35 + dx, 25 + dy, 80, 80, None)  # the corner nearest the peak, diagonal
    got = point_boxes(m, REGION, [b], 15.0)
    assert got[0] is hit and got[1] == 0.0 and got[2] == (0 if hit else None)


def test_energy_is_the_share_of_mass_above_the_minimum_in_the_boxes() -> None:
    rng = np.random.default_rng(0)
    m = rng.random((16, 12)).astype(np.float32) + 3.0
    region = Box(40, 10, 340, 410)  # a crop of a bigger photo
    boxes = [(50.0, 20.0, 150.0, 200.0), (120.0, 150.0, 300.0, 390.0)]
    want = direct_objects(m, region, boxes, 15.0)
    hit, energy, box = point_boxes(m, region, [Obj(*b, None) for b in boxes], 15.0)
    assert (hit, box) == (want["hit"], want["box"])
    assert energy == pytest.approx(want["energy"], rel=1e-6)


def test_a_mask_counts_like_the_boxes_of_its_pixels() -> None:
    mask = np.zeros((100, 100), bool)
    mask[20:30, 30:40] = True  # the pixel squares [30, 40] x [20, 30]
    m = hot(2, 3)  # (35, 25): on it
    assert point_mask(m, REGION, mask, 0.0) == (True, 1.0)
    far = hot(6, 3)  # (35, 65): 35 px below the mask
    assert point_mask(far, REGION, mask, 34.9) == (False, 0.0)
    assert mask_hit(35, 65, mask, 35.0) is True


def test_locate_writes_the_record_of_the_spec() -> None:
    objects = ImageObjects("a.jpg", [Obj(0, 0, 10, 10, "cat"), Obj(30, 20, 40, 30, "dog")])
    rec = locate(hot(2, 3), REGION, objects, 5, "dog", by_class=True)
    assert rec == {"source": "boxes", "name": "a.jpg", "tolerance": 15.0, "match": "class",
                   "boxes": 1, "hit": True, "energy": 1.0, "box": 1, "label": "dog"}
    absent = locate(hot(2, 3), REGION, objects, 7, "bird", by_class=True)
    assert (absent["match"], absent["hit"], absent["energy"], absent["box"]) == (
        "absent", False, 0.0, None)
    anybox = locate(hot(2, 3), REGION, objects, 7, "bird", tolerance=0.0)
    assert (anybox["match"], anybox["boxes"], anybox["box"]) == ("any", 2, 1)


def test_a_constant_map_has_no_peak_to_point_with() -> None:
    objects = ImageObjects("a.jpg", [Obj(0, 0, 20, 20, None)])
    rec = locate(np.zeros((10, 10), np.float32), REGION, objects, 1, "x")
    assert (rec["hit"], rec["energy"], rec["box"]) == (None, None, None)
