"""Heatmaps and overlays: pure functions on NumPy arrays.

Colormap tables come from matplotlib (perceptually uniform ``inferno`` by
default); any matplotlib colormap name works. A saliency map is resized to
the original image's resolution (bilinear), then min-max normalised per image
as the reference's writer does; a constant map renders as the colormap's
lowest colour, never NaN.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image


def colormap_names() -> list[str]:
    import matplotlib

    return sorted(matplotlib.colormaps)


@lru_cache(maxsize=16)
def colormap_table(name: str) -> np.ndarray:
    """(256, 3) uint8 lookup table for a matplotlib colormap; ValueError if unknown."""
    import matplotlib

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError as exc:
        raise ValueError(f"unknown colormap {name!r}; e.g. inferno, viridis, magma, turbo, "
                         "jet, gray") from exc
    rgba = cmap(np.linspace(0.0, 1.0, 256))
    return (rgba[:, :3] * 255.0 + 0.5).astype(np.uint8)


def resize_map(saliency: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of a 2-D float map to (height, width)."""
    if saliency.shape == (height, width):
        return saliency.astype(np.float32, copy=False)
    img = Image.fromarray(np.ascontiguousarray(saliency, dtype=np.float32), mode="F")
    return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def normalise(saliency: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant (or non-finite) map becomes all zeros."""
    finite = np.where(np.isfinite(saliency), saliency, 0.0)
    if finite.size == 0:
        return finite.astype(np.float32)
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo <= 0.0:
        return np.zeros_like(finite, dtype=np.float32)
    return ((finite - lo) / (hi - lo)).astype(np.float32)


def heatmap_indices(saliency: np.ndarray, width: int, height: int) -> np.ndarray:
    """(height, width) uint8 colormap indices of a 2-D map (0: its minimum, 255: its maximum)."""
    unit = normalise(resize_map(saliency, width, height))
    return np.clip(unit * 255.0 + 0.5, 0, 255).astype(np.uint8)


def heatmap(saliency: np.ndarray, width: int, height: int, colormap: str) -> np.ndarray:
    """(height, width, 3) uint8 RGB heatmap of a 2-D map."""
    return colormap_table(colormap)[heatmap_indices(saliency, width, height)]


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float) -> np.ndarray:
    """Blend an RGB uint8 image with an RGB uint8 heatmap: (1 - alpha) * image + alpha * heat.

    Integer arithmetic in 1/256 steps of alpha (within one grey level of the float blend).
    """
    a = int(round(alpha * 256))
    mixed = image.astype(np.uint16) * (256 - a) + heat.astype(np.uint16) * a + 128
    return (mixed >> 8).astype(np.uint8)
