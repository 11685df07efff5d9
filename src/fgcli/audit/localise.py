"""Does a map hit the object? The pointing game and the energy inside the object.

Coordinates are the original image's pixels (pixel i covers [i, i + 1)); a map covers
the region of the original the model saw (:class:`fgcli.data.decode.Box`), its pixel
(i, j) centred at ``(left + (j + 0.5) * width / w, top + (i + 0.5) * height / h)``,
whatever ``--crop`` and ``--size`` did to the model input. Definitions
(docs/audit.md#localisation):

* **pointing game** (Zhang et al., 2016): the map's maximum (its pixel's centre) lies
  within ``tolerance`` pixels (Euclidean distance to the box, 0 inside) of an object:
  a box used, or, for a mask, a mask pixel's square;
* **energy** (Score-CAM's energy-based pointing game): the share of the map's mass
  (m - min(m): the heatmap's values, as in :mod:`fgcli.audit.stats`) in the map pixels
  whose centre lies inside a box used (a mask pixel), no tolerance;
* **box**: the index, in the image's annotation order, of the used box nearest the
  peak among those within tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fgcli.audit.stats import rounded
from fgcli.data.decode import Box

TOLERANCE = 15.0  # pixels, Zhang et al. 2016


def _centres(region: Box, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Original-image x of each map column's centre, y of each row's centre."""
    h, w = shape
    xs = region.left + (np.arange(w) + 0.5) * ((region.right - region.left) / w)
    ys = region.top + (np.arange(h) + 0.5) * ((region.bottom - region.top) / h)
    return xs, ys


def _peak(saliency: np.ndarray, region: Box) -> tuple[float, float]:
    i, j = divmod(int(np.argmax(saliency)), saliency.shape[1])
    xs, ys = _centres(region, saliency.shape)
    return float(xs[j]), float(ys[i])


def _box_distances(px: float, py: float, boxes: Sequence[Any]) -> np.ndarray:
    """Euclidean distance from (px, py) to each box (0 inside or on its edge)."""
    out = np.empty(len(boxes))
    for k, b in enumerate(boxes):
        dx = max(b.x0 - px, 0.0, px - b.x1)
        dy = max(b.y0 - py, 0.0, py - b.y1)
        out[k] = math.hypot(dx, dy)
    return out


def _energy(positive: np.ndarray, inside: np.ndarray) -> float | None:
    total = float(positive.sum(dtype=np.float64))
    if total <= 0:
        return None
    return float(positive[inside].sum(dtype=np.float64)) / total


def boxes_in_map(saliency: np.ndarray, region: Box, boxes: Sequence[Any]) -> np.ndarray:
    """(h, w) bool: the map pixels whose centre lies inside any of ``boxes``."""
    xs, ys = _centres(region, saliency.shape)
    inside = np.zeros(saliency.shape, dtype=bool)
    for b in boxes:
        rows = (ys >= b.y0) & (ys <= b.y1)
        cols = (xs >= b.x0) & (xs <= b.x1)
        inside |= rows[:, None] & cols[None, :]
    return inside


def mask_in_map(saliency: np.ndarray, region: Box, mask: np.ndarray) -> np.ndarray:
    """(h, w) bool: the map pixels whose centre falls on an object pixel of ``mask``
    ((H, W) bool at the original image's resolution)."""
    xs, ys = _centres(region, saliency.shape)
    rows = np.clip(np.floor(ys).astype(np.int64), 0, mask.shape[0] - 1)
    cols = np.clip(np.floor(xs).astype(np.int64), 0, mask.shape[1] - 1)
    return mask[np.ix_(rows, cols)]


def mask_hit(px: float, py: float, mask: np.ndarray, tolerance: float) -> bool:
    """Whether an object pixel's square [c, c+1] x [r, r+1] lies within ``tolerance``
    of (px, py)."""
    r0, r1 = max(math.floor(py - tolerance) - 1, 0), math.ceil(py + tolerance) + 1
    c0, c1 = max(math.floor(px - tolerance) - 1, 0), math.ceil(px + tolerance) + 1
    window = mask[r0:r1, c0:c1]
    if not window.any():
        return False
    r = np.arange(r0, r0 + window.shape[0])[:, None]
    c = np.arange(c0, c0 + window.shape[1])[None, :]
    dy = np.maximum(np.maximum(r - py, 0.0), py - (r + 1))
    dx = np.maximum(np.maximum(c - px, 0.0), px - (c + 1))
    return bool((window & (np.hypot(dx, dy) <= tolerance)).any())


def check_mask(mask: np.ndarray, region: Box, name: str) -> None:
    """A mask must cover the region the model saw (it has the image's size)."""
    if mask.shape[0] < region.bottom or mask.shape[1] < region.right:
        raise ValueError(f"mask {name} is {mask.shape[1]}x{mask.shape[0]} pixels, smaller "
                         f"than its image ({region.right}x{region.bottom} or more)")


def point_boxes(saliency: np.ndarray, region: Box, boxes: Sequence[Any], tolerance: float
                ) -> tuple[bool, float | None, int | None]:
    """(hit, energy, index into ``boxes`` of the nearest box within tolerance)."""
    px, py = _peak(saliency, region)
    positive = saliency - saliency.min()
    energy = _energy(positive, boxes_in_map(saliency, region, boxes)) if boxes else (
        None if positive.sum() <= 0 else 0.0)
    dist = _box_distances(px, py, boxes)
    near = np.flatnonzero(dist <= tolerance)
    best = int(near[np.argmin(dist[near])]) if near.size else None
    return best is not None, energy, best


def point_mask(saliency: np.ndarray, region: Box, mask: np.ndarray, tolerance: float
               ) -> tuple[bool, float | None]:
    """(hit, energy) against a boolean object mask."""
    px, py = _peak(saliency, region)
    positive = saliency - saliency.min()
    return mask_hit(px, py, mask, tolerance), _energy(positive, mask_in_map(
        saliency, region, mask))


def locate(saliency: np.ndarray, region: Box, objects: Any, target: int, target_name: str,
           tolerance: float = TOLERANCE, *, by_class: bool = False) -> dict[str, Any]:
    """The manifest's ``objects`` record of one map (``saliency``: (h, w) at model
    resolution over ``region``) against one image's annotation (an
    :class:`fgcli.audit.annotations.ImageObjects`). ``by_class``: the annotation's labels
    name the model's classes, so only boxes of ``target`` count (spec: class / any /
    absent). Raises ValueError (one line) for a mask that cannot be read."""
    from fgcli.audit.annotations import boxes_for

    saliency = np.asarray(saliency, dtype=np.float32)
    rec: dict[str, Any] = {"source": "masks" if objects.mask is not None else "boxes",
                           "name": objects.name, "tolerance": float(tolerance)}
    if objects.mask is not None:
        mask = objects.mask_array()
        check_mask(mask, region, str(objects.mask))
        hit, energy = point_mask(saliency, region, mask, tolerance)
        hit = None if energy is None else hit  # a constant map has no peak
        if not mask.any():  # nothing to point at, as an image annotated with no box
            rec.update(match="absent", boxes=0, hit=False, energy=0.0, box=None, label=None)
            return rec
        rec.update(match="any", boxes=1, hit=hit, energy=rounded(energy), box=None,
                   label=None)
        return rec
    used, match = boxes_for(objects, target, target_name, by_class)
    if match == "absent" or not used:
        rec.update(match=match, boxes=0, hit=False, energy=0.0, box=None, label=None)
        return rec
    hit, energy, best = point_boxes(saliency, region, used, tolerance)
    if energy is None:  # a constant map has no peak to point with
        hit, best = None, None
    index = None if best is None else next(
        k for k, b in enumerate(objects.boxes) if b is used[best])
    rec.update(match=match, boxes=len(used), hit=hit, energy=rounded(energy), box=index,
               label=None if best is None else used[best].label)
    return rec

