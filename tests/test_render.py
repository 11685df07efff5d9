"""Heatmap and overlay rendering."""

from __future__ import annotations

import numpy as np
import pytest

from fgcli import render


def test_normalise_is_min_max_and_nan_free():
    m = np.array([[2.0, 4.0], [6.0, 10.0]], dtype=np.float32)
    np.testing.assert_allclose(render.normalise(m), [[0, 0.25], [0.5, 1.0]])
    assert (render.normalise(np.full((3, 3), 7.0)) == 0).all()  # constant map: no 0/0
    assert np.isfinite(render.normalise(np.array([[np.nan, 1.0], [np.inf, 3.0]]))).all()


def test_heatmap_uses_matplotlib_table_at_requested_size():
    import matplotlib

    m = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    heat = render.heatmap(m, width=8, height=6, colormap="inferno")
    assert heat.shape == (6, 8, 3) and heat.dtype == np.uint8
    lut = (matplotlib.colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255 + 0.5)
    assert (heat[0, 0] == lut[0].astype(np.uint8)).all()
    assert (heat[-1, -1] == lut[255].astype(np.uint8)).all()
    with pytest.raises(ValueError, match="unknown colormap"):
        render.colormap_table("not-a-map")


def test_overlay_blend():
    img = np.full((2, 2, 3), 200, dtype=np.uint8)
    heat = np.zeros((2, 2, 3), dtype=np.uint8)
    heat[..., 0] = 100
    out = render.overlay(img, heat, 0.25)
    assert out.tolist()[0][0] == [175, 150, 150]  # 0.75 * 200 + 0.25 * (100, 0, 0)


def _reference_indices(saliency: np.ndarray, width: int, height: int) -> np.ndarray:
    """heatmap_indices as first written: resize, normalise, scale and round."""
    unit = render.normalise(render.resize_map(saliency, width, height))
    return np.clip(unit * 255.0 + 0.5, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [(500, 375), (224, 224), (97, 311)])
def test_heatmap_indices_and_colormap_equal_the_reference_formulas(size):
    rng = np.random.default_rng(sum(size))
    lut = render.colormap_table("inferno")
    for saliency in (rng.random((224, 224), dtype=np.float32) ** 3 * 3e-3,
                     rng.normal(size=(14, 14)).astype(np.float32),
                     rng.random((7, 9))):  # float64 in: the same float32 arithmetic
        indices = render.heatmap_indices(saliency, *size)
        assert np.array_equal(indices, _reference_indices(saliency, *size))
        assert np.array_equal(render.colormapped(indices, lut), lut[indices])
    bad = np.array([[np.nan, 1.0], [np.inf, 3.0]], dtype=np.float32)
    assert np.array_equal(render.heatmap_indices(bad, *size), _reference_indices(bad, *size))
    assert not render.heatmap_indices(np.full((4, 4), 2.0, np.float32), *size).any()


def test_overlay_is_the_integer_blend_for_every_alpha():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    heat = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for alpha in (0.0, 0.25, 0.5, 0.8, 1.0):
        a = round(alpha * 256)
        expected = (img.astype(np.uint32) * (256 - a) + heat.astype(np.uint32) * a + 128) >> 8
        assert np.array_equal(render.overlay(img, heat, alpha), expected.astype(np.uint8))


def test_heatmap_is_a_writable_array_of_its_own():
    heat = render.heatmap(np.eye(4, dtype=np.float32), 5, 3, "inferno")
    heat[0, 0] = 0  # callers may draw on it
    assert heat.flags.writeable and heat.flags.owndata
