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

from fgcli.config import OVERLAY_STYLES


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
    """(height, width) uint8 colormap indices of a 2-D map (0: its minimum, 255: its maximum).

    A finite map is normalised in place, one buffer and the same float32 operations as
    :func:`normalise` (so the same indices, at a third of the passes over the photo's
    pixels); any other goes through :func:`normalise`.
    """
    resized = resize_map(saliency, width, height)
    lo, hi = (float(resized.min()), float(resized.max())) if resized.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        unit = normalise(resized)
        return np.clip(unit * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if hi - lo <= 0.0:
        return np.zeros(resized.shape, dtype=np.uint8)
    unit = np.subtract(resized, lo, dtype=np.float32)  # lo, hi: Python floats, as normalise
    unit /= hi - lo
    unit *= 255.0
    unit += 0.5
    np.clip(unit, 0, 255, out=unit)
    return unit.astype(np.uint8)


def colormapped(indices: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 ``lut[indices]``, by Pillow's palette conversion (several times
    faster than NumPy's gather, the same bytes); read-only (a view of Pillow's buffer)."""
    img = Image.frombytes("P", (indices.shape[1], indices.shape[0]),
                          np.ascontiguousarray(indices, dtype=np.uint8).tobytes())
    img.putpalette(np.ascontiguousarray(lut, dtype=np.uint8).tobytes())
    return np.asarray(img.convert("RGB"))


def heatmap(saliency: np.ndarray, width: int, height: int, colormap: str) -> np.ndarray:
    """(height, width, 3) uint8 RGB heatmap of a 2-D map."""
    return np.array(colormapped(heatmap_indices(saliency, width, height),
                                colormap_table(colormap)))


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float) -> np.ndarray:
    """Blend an RGB uint8 image with an RGB uint8 heatmap: (1 - alpha) * image + alpha * heat.

    Integer arithmetic in 1/256 steps of alpha (within one grey level of the float blend).
    """
    a = round(alpha * 256)
    mixed = image.astype(np.uint16)  # in place from here: one buffer per operand
    mixed *= 256 - a
    weighted = heat.astype(np.uint16)
    weighted *= a
    mixed += weighted
    mixed += 128
    mixed >>= 8
    return mixed.astype(np.uint8)


def heat_weights(alpha: float) -> np.ndarray:
    """(256,) int32 per-index weights of the ``heat`` overlay in 1/256 steps.

    Index ``i`` is the normalised saliency ``s = i / 255``; its weight is
    ``round(256 * min(1, 2 * alpha * s))``: 0 at the map's minimum, 256 (the heat alone)
    wherever ``2 * alpha * s >= 1``. One table serves NumPy and the device path
    (:func:`fgcli.render.device.blend_heat`), so both are bit-identical.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, not {alpha!r}")
    s = np.arange(256, dtype=np.float64) / 255.0
    w = np.minimum(1.0, 2.0 * alpha * s)
    return np.floor(w * 256.0 + 0.5).astype(np.int32)


def overlay_heat(image: np.ndarray, heat: np.ndarray, indices: np.ndarray,
                 alpha: float) -> np.ndarray:
    """Heat drawn over an RGB uint8 image with per-pixel opacity from the saliency.

    ``w = min(1, 2 * alpha * s)`` with ``s = indices / 255`` the normalised map
    (:func:`heatmap_indices`), then ``(1 - w) * image + w * heat``: the photo shows
    unchanged where saliency is lowest and, at the default alpha 0.5, ``w = s``, so
    the heat is opaque only at the map's maximum. Integer arithmetic in 1/256 steps of
    ``w`` (:func:`heat_weights`), rounded, as :func:`overlay`.
    """
    if indices.shape != image.shape[:2] or heat.shape != image.shape:
        raise ValueError(f"overlay_heat: image {image.shape}, heat {heat.shape} and "
                         f"indices {indices.shape} must match")
    w = heat_weights(alpha).astype(np.uint16)[indices][..., None]
    # uint16 is enough: 255 * (256 - w) + 255 * w + 128 < 2**16
    mixed = image.astype(np.uint16) * (256 - w) + heat.astype(np.uint16) * w + 128
    return (mixed >> 8).astype(np.uint8)


def overlay_style(style: str, image: np.ndarray, heat: np.ndarray, indices: np.ndarray,
                  alpha: float) -> np.ndarray:
    """The overlay of one of :data:`fgcli.config.OVERLAY_STYLES`: ``blend``
    (:func:`overlay`, uniform) or ``heat`` (:func:`overlay_heat`, saliency-weighted)."""
    if style == "blend":
        return overlay(image, heat, alpha)
    if style == "heat":
        return overlay_heat(image, heat, indices, alpha)
    raise ValueError(f"unknown overlay style {style!r}; choose from {', '.join(OVERLAY_STYLES)}")
