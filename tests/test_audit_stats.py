"""The map statistics (fgcli.audit.stats) against a direct NumPy computation of each
definition (docs/audit.md#statistics), on hand-made maps whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from audit_util import direct_stats as direct

from fgcli.audit.stats import STAT_NAMES, map_stats, stats_record
from fgcli.data.decode import Box


def check(m: np.ndarray, region: Box) -> dict[str, float | None]:
    got = stats_record(map_stats(torch.from_numpy(m)[None, None])[0].numpy(), region)
    want = direct(m, region)
    assert list(got) == list(STAT_NAMES)
    for name in STAT_NAMES:
        if want[name] is None:
            assert got[name] is None, name
        else:
            assert got[name] == pytest.approx(want[name], rel=2e-5, abs=1e-6), name
    return got


def test_a_single_hot_pixel() -> None:
    m = np.zeros((20, 30), np.float32)
    m[4, 7] = 3.0
    got = check(m, Box(0, 0, 300, 200))
    assert (got["peak_x"], got["peak_y"]) == (75.0, 45.0)  # centre of pixel (4, 7), x10 scale
    assert (got["com_x"], got["com_y"]) == (75.0, 45.0)
    assert got["concentration"] == pytest.approx(1 / 600, rel=1e-5)
    assert got["entropy"] == 0.0
    assert got["border"] == 0.0 and got["centre"] == 0.0  # u = 0.25, v = 0.225: neither


def test_a_uniform_map() -> None:
    m = np.ones((20, 20), np.float32)
    m[0, 0] = 0.0  # one pixel at the minimum: the rest is uniform mass
    got = check(m, Box(0, 0, 40, 40))
    assert got["entropy"] == pytest.approx(math.log(399) / math.log(400), rel=1e-5)
    assert got["concentration"] == pytest.approx(0.5)  # 200 pixels hold 199.5 of 399
    assert got["border"] == pytest.approx((400 - 16 * 16 - 1) / 399, rel=1e-5)  # 16 of 20
    assert got["centre"] == pytest.approx(100 / 399, rel=1e-5)  # centres inside per side: 10


def test_a_map_in_the_border_only() -> None:
    m = np.zeros((40, 40), np.float32)
    m[:2, :] = 1.0  # the top rows: v < 0.1
    m[:, -3:] = 2.0
    got = check(m, Box(0, 0, 40, 40))
    assert got["border"] == pytest.approx(1.0)
    assert got["centre"] == 0.0


def test_random_maps_with_negative_values_and_a_crop_region() -> None:
    rng = np.random.default_rng(0)
    for shape in ((7, 7), (14, 10), (56, 56)):
        m = rng.standard_normal(shape).astype(np.float32)
        got = check(m, Box(32, 16, 288, 272))  # the centre crop of a 320x288 photo
        assert 32 <= got["peak_x"] <= 288 and 16 <= got["peak_y"] <= 272


def test_a_constant_map_has_only_a_peak() -> None:
    m = np.full((5, 5), 0.7, np.float32)
    got = check(m, Box(0, 0, 5, 5))
    assert (got["peak_x"], got["peak_y"]) == (0.5, 0.5)  # the first maximum
    assert all(got[k] is None for k in STAT_NAMES[2:])


def test_the_mass_is_measured_above_the_map_minimum() -> None:
    m = np.full((10, 10), 5.0, np.float32)  # a floor, as FullGrad's rescaled layers give
    m[3, 4] = 6.0
    got = check(m, Box(0, 0, 10, 10))
    assert got["entropy"] == 0.0 and got["concentration"] == pytest.approx(0.01)


def test_a_batch_is_computed_image_by_image() -> None:
    rng = np.random.default_rng(1)
    maps = rng.random((4, 1, 9, 11)).astype(np.float32)
    rows = map_stats(torch.from_numpy(maps)).numpy()
    for k in range(4):
        alone = map_stats(torch.from_numpy(maps[k:k + 1])).numpy()[0]
        np.testing.assert_allclose(rows[k], alone, rtol=1e-6)


def test_values_are_rounded_to_six_significant_digits() -> None:
    m = np.zeros((3, 3), np.float32)
    m[0, 0] = 1.0
    got = stats_record(map_stats(torch.from_numpy(m)[None, None])[0].numpy(),
                       Box(0, 0, 1000, 7))
    assert got["peak_x"] == 166.667 and got["peak_y"] == 1.16667


@pytest.mark.parametrize("power", [1, 4, 16])
def test_the_cpu_concentration_counts_as_a_full_sort_does(power: int) -> None:
    """The CPU's binned search and the GPU's sort give the same count of pixels."""
    from fgcli.audit.stats import _needed_by_bins, _needed_by_sort

    rng = np.random.default_rng(power)
    flat = torch.from_numpy(rng.random((6, 3000)) ** power).float()
    flat[1] = 0.0  # a row without mass
    flat[1, 5] = 2.0
    flat[2, :10] = 1.0  # ties
    total = flat.sum(1)
    assert _needed_by_bins(flat, total).tolist() == _needed_by_sort(flat, total).tolist()


def test_huge_finite_maps_do_not_overflow() -> None:
    rng = np.random.default_rng(3)
    m = rng.random((64, 64)).astype(np.float32)
    small = stats_record(map_stats(torch.from_numpy(m)[None, None])[0].numpy(), Box(0, 0, 64, 64))
    huge = stats_record(map_stats(torch.from_numpy(m * 1e37)[None, None])[0].numpy(),
                        Box(0, 0, 64, 64))
    assert huge == pytest.approx(small, rel=1e-4)
