"""Independent, straightforward computations of the audit's definitions
(docs/audit.md), one pixel at a time, for checking fgcli.audit against."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fgcli.audit.stats import STAT_NAMES
from fgcli.data.decode import Box


def direct_stats(m: np.ndarray, region: Box) -> dict[str, float | None]:
    """Each statistic straight from its definition, one pixel at a time where simple."""
    h, w = m.shape
    bw, bh = region.right - region.left, region.bottom - region.top
    i, j = np.unravel_index(np.argmax(m), m.shape)
    out: dict[str, float | None] = {
        "peak_x": region.left + (j + 0.5) * bw / w, "peak_y": region.top + (i + 0.5) * bh / h}
    p = m.astype(np.float64) - m.min()
    total = p.sum()
    if total == 0:
        return out | {k: None for k in STAT_NAMES[2:]}
    xs = region.left + (np.arange(w) + 0.5) * bw / w
    ys = region.top + (np.arange(h) + 0.5) * bh / h
    out["com_x"] = float((p * xs[None, :]).sum() / total)
    out["com_y"] = float((p * ys[:, None]).sum() / total)
    values = sorted(p.ravel(), reverse=True)
    acc, k = 0.0, 0
    while acc < 0.5 * total:
        acc += values[k]
        k += 1
    out["concentration"] = k / (h * w)
    q = p.ravel() / total
    out["entropy"] = float(-sum(x * math.log(x) for x in q if x > 0) / math.log(h * w))
    border = centre = 0.0
    for r in range(h):
        for c in range(w):
            u, v = (c + 0.5) / w, (r + 0.5) / h
            if u < 0.1 or u > 0.9 or v < 0.1 or v > 0.9:
                border += p[r, c]
            if 0.25 <= u <= 0.75 and 0.25 <= v <= 0.75:
                centre += p[r, c]
    out["border"], out["centre"] = border / total, centre / total
    return out



def centre_of(i: int, j: int, shape: tuple[int, int], region: Box) -> tuple[float, float]:
    h, w = shape
    return (region.left + (j + 0.5) * (region.right - region.left) / w,
            region.top + (i + 0.5) * (region.bottom - region.top) / h)


def direct_objects(m: np.ndarray, region: Box, boxes: list[tuple[float, float, float, float]],
                   tolerance: float) -> dict[str, Any]:
    """Pointing game and energy of map ``m`` against boxes (x0, y0, x1, y1) in original
    pixels: the peak's distance to each box, and the mass of map pixels whose centre is
    inside one."""
    i, j = np.unravel_index(np.argmax(m), m.shape)
    px, py = centre_of(int(i), int(j), m.shape, region)
    dist = [math.hypot(max(x0 - px, 0, px - x1), max(y0 - py, 0, py - y1))
            for x0, y0, x1, y1 in boxes]
    near = [k for k, d in enumerate(dist) if d <= tolerance]
    best = min(near, key=lambda k: (dist[k], k)) if near else None
    s = m.astype(np.float64) - m.min()
    inside = 0.0
    for r in range(m.shape[0]):
        for c in range(m.shape[1]):
            x, y = centre_of(r, c, m.shape, region)
            if any(x0 <= x <= x1 and y0 <= y <= y1 for x0, y0, x1, y1 in boxes):
                inside += s[r, c]
    return {"hit": best is not None, "box": best,
            "energy": inside / s.sum() if s.sum() > 0 else None}
