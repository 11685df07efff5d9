"""Statistics of a saliency map: where it peaks, where its mass lies, how spread it is.

Computed on the maps' own device for a whole batch at once (:func:`map_stats`), before
the maps leave it, then placed in the original image's pixels per image
(:func:`stats_record`). Definitions (docs/audit.md#statistics), with m the engine's map
(at model resolution, over the region of the original image the model saw) and its mass
m+ = m - min(m): the heatmap's values up to scale (a heatmap shows (m - min) / (max - min)).
FullGrad's maps sum per-layer maps rescaled to [0, 1], so they carry a floor that would
make every raw map look spread out; the mass above the minimum is what a heatmap shows
and what these statistics measure.

* ``peak_x``, ``peak_y``: the centre of the map pixel holding m's maximum (the first in
  row-major order on ties), in original-image pixels (pixel i covers [i, i + 1));
* ``com_x``, ``com_y``: m+'s centre of mass, same coordinates;
* ``concentration``: the smallest fraction of the map's pixels whose largest m+ values
  hold at least half of m+'s total (small: concentrated; 0.5: uniform);
* ``entropy``: -Σ p ln p / ln n over the n map pixels, p = m+ / Σ m+ (0: one pixel,
  1: uniform);
* ``border``: m+'s share in the pixels whose centre lies in the outer 10 % of the
  region's width or height;
* ``centre``: m+'s share in the pixels whose centre lies in the middle half of both the
  width and the height.

All but the peak are undefined (``None``) for a constant map.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fgcli.audit import STAT_NAMES
from fgcli.data.decode import Box

BORDER = 0.1  # the border band: outer tenth of each side
CENTRE = (0.25, 0.75)  # the central region: the middle half of each side
DIGITS = 6  # significant digits kept in the manifest
BINS = 1024  # value bins of the concentration's search on the CPU


def _centres(n: int, device: torch.device) -> torch.Tensor:
    """Pixel centres across one side, as fractions of it: (i + 0.5) / n."""
    return (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n


def _needed_by_sort(flat: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Per row of ``flat`` (mass >= 0), how many of its largest values hold half of
    ``total``: one sort (fast on a GPU)."""
    ordered = flat.sort(1, descending=True).values.cumsum(1)
    return (ordered < 0.5 * total[:, None]).sum(1) + 1


def _needed_by_bins(flat: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """:func:`_needed_by_sort` without sorting every value (four times faster on a CPU):
    the mass per value bin (``BINS`` of them between 0 and the row's maximum) finds the
    bin where the mass from the top reaches half, and only that bin's values are sorted.
    The same count, in float64."""
    rows = flat.shape[0]
    top = flat.amax(1, keepdim=True)
    scale = torch.where(top > 0, (BINS - 0.5) / top, torch.zeros_like(top))
    index = (flat * scale).long().clamp_(0, BINS - 1)
    key = (index + torch.arange(rows)[:, None] * BINS).reshape(-1)
    mass = torch.bincount(key, weights=flat.reshape(-1).double(), minlength=rows * BINS)
    count = torch.bincount(key, minlength=rows * BINS)
    mass_from_top = mass.view(rows, BINS).flip(1).cumsum(1)
    count_from_top = count.view(rows, BINS).flip(1).cumsum(1)
    half = 0.5 * total.double()
    crossing = (mass_from_top < half[:, None]).sum(1).clamp(max=BINS - 1)
    needed = []
    for i, c in enumerate(crossing.tolist()):
        mass_before = float(mass_from_top[i, c - 1]) if c > 0 else 0.0
        count_before = int(count_from_top[i, c - 1]) if c > 0 else 0
        inside = flat[i][index[i] == BINS - 1 - c].double().sort(descending=True).values
        short = (inside.cumsum(0) + mass_before < float(half[i])).sum()
        needed.append(count_before + int(short) + 1)
    return torch.tensor(needed)


__all__ = ["STAT_NAMES", "map_stats", "rounded", "stats_record"]


def map_stats(maps: torch.Tensor) -> torch.Tensor:
    """(N, 8) float32 statistics of a batch of maps ((N, 1, h, w) or (N, h, w)), on
    their device, in the order of :data:`STAT_NAMES`; positions are fractions (u, v) of
    the region's width and height, NaN where a statistic is undefined."""
    m = maps.detach().float()
    n, h, w = m.shape[0], m.shape[-2], m.shape[-1]
    m = m.reshape(n, h, w)
    u, v = _centres(w, m.device), _centres(h, m.device)
    peak = m.reshape(n, -1).argmax(1)
    pos = m - m.amin((1, 2), keepdim=True)
    pos = pos / pos.amax((1, 2), keepdim=True).clamp(min=torch.finfo(pos.dtype).tiny)
    # scale-free statistics: the mass in [0, 1] cannot overflow float32 when summed
    total = pos.sum((1, 2))
    defined = total > 0
    safe = torch.where(defined, total, torch.ones_like(total))
    com_u = (pos.sum(1) @ u) / safe
    com_v = (pos.sum(2) @ v) / safe
    flat = pos.reshape(n, -1)
    needed = (_needed_by_bins(flat, total) if m.device.type == "cpu"
              else _needed_by_sort(flat, total))
    concentration = needed.clamp(max=h * w).to(m.device, torch.float32) / (h * w)
    p = flat / safe[:, None]
    entropy = -torch.xlogy(p, p).sum(1) / math.log(h * w) if h * w > 1 else total * 0
    inner_u, inner_v = ((u >= BORDER) & (u <= 1 - BORDER)).float(), \
        ((v >= BORDER) & (v <= 1 - BORDER)).float()
    mid_u = ((u >= CENTRE[0]) & (u <= CENTRE[1])).float()
    mid_v = ((v >= CENTRE[0]) & (v <= CENTRE[1])).float()
    border = 1 - torch.einsum("nhw,h,w->n", pos, inner_v, inner_u) / safe
    centre = torch.einsum("nhw,h,w->n", pos, mid_v, mid_u) / safe
    out = torch.stack([u[peak % w], v[peak // w], com_u, com_v, concentration, entropy,
                       border.clamp(min=0), centre], 1)
    out[:, 2:] = torch.where(defined[:, None], out[:, 2:], torch.nan)
    return out


def rounded(value: float | None) -> float | None:
    """``value`` to 6 significant digits; None for None, NaN or infinity."""
    if value is None or not math.isfinite(value):
        return None
    if value == 0:
        return 0.0
    return round(value, DIGITS - 1 - math.floor(math.log10(abs(value))))


def stats_record(row: np.ndarray | Any, region: Box) -> dict[str, float | None]:
    """One image's statistics (a row of :func:`map_stats`, on the host) as the manifest's
    ``stats`` record: positions in the original image's pixels, through ``region`` (the
    part of the original the model saw), 6 significant digits, undefined ones None."""
    row = np.asarray(row, dtype=np.float64)
    width, height = region.right - region.left, region.bottom - region.top
    values = row.copy()
    values[[0, 2]] = region.left + row[[0, 2]] * width
    values[[1, 3]] = region.top + row[[1, 3]] * height
    return {name: rounded(float(v)) for name, v in zip(STAT_NAMES, values)}
