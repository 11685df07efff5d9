"""Class-mean maps on a common grid, and the one PNG that shows them.

Each map's mass s = m - min(m) (the heatmap's values up to scale, as the statistics use
it: docs/audit.md) is normalised to sum 1, then resampled to
``cells`` x ``cells`` by area: a grid cell gets the mass of the map pixels it covers
(a map pixel split between cells is split by the area of its parts), so the resampled
map still sums to 1 whatever the map's size or aspect. A class's mean is the mean of
its maps so resampled; a constant map (no mass) or one that is not finite is left out.
Memory: one float64 grid per class.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fgcli.render import colormap_table, colormapped, normalise

TILE = 96  # smallest tile side in pixels (a whole number of pixels per cell)
LABEL = 16  # the class name's band below each tile
GAP = 4  # pixels between tiles
COLORMAP = "inferno"


@lru_cache(maxsize=64)
def area_weights(size: int, cells: int) -> np.ndarray:
    """(cells, size): the share of source pixel j (covering [j, j+1)) that falls in cell
    i (covering [i, i+1) * size / cells); every column sums to 1."""
    src = np.arange(size + 1, dtype=np.float64)
    cell = np.linspace(0.0, float(size), cells + 1)
    lo = np.maximum(cell[:-1, None], src[None, :-1])
    hi = np.minimum(cell[1:, None], src[None, 1:])
    weights = np.clip(hi - lo, 0.0, None)
    weights.setflags(write=False)
    return weights


def to_grid(saliency: np.ndarray, cells: int) -> np.ndarray | None:
    """The map's mass m - min(m) normalised to sum 1 and resampled to (cells, cells) by
    area; None for a constant map or one that is not a finite 2-D array."""
    m = np.asarray(saliency)
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2 or m.size == 0 or not np.issubdtype(m.dtype, np.number):
        return None
    pos = m.astype(np.float64)
    pos -= pos.min()
    total = float(pos.sum())
    if not math.isfinite(total) or total <= 0.0:
        return None
    pos /= total
    return area_weights(m.shape[0], cells) @ pos @ area_weights(m.shape[1], cells).T


class MeanMaps:
    """Running sums of resampled maps per class (by target)."""

    def __init__(self, cells: int) -> None:
        self.cells = cells
        self.sums: dict[int, np.ndarray] = {}
        self.counts: dict[int, int] = {}
        self.unusable = 0  # map files that could not be read, or constant maps

    def add(self, target: int, path: Path) -> None:
        try:
            grid = to_grid(np.load(path, allow_pickle=False), self.cells)
        except (OSError, ValueError, EOFError):
            grid = None
        if grid is None:
            self.unusable += 1
            return
        if target in self.sums:
            self.sums[target] += grid
        else:
            self.sums[target] = grid
        self.counts[target] = self.counts.get(target, 0) + 1

    def mean(self, target: int) -> np.ndarray | None:
        count = self.counts.get(target)
        return self.sums[target] / count if count else None


def tile_indices(mean: np.ndarray, side: int) -> np.ndarray:
    """(side, side) uint8 colormap indices of a mean map: min-max over the tile (0: its
    least, 255: its most), each cell a square block of side / cells pixels."""
    unit = normalise(mean)
    idx = np.clip(unit * 255.0 + 0.5, 0, 255).astype(np.uint8)
    scale = side // mean.shape[0]
    return np.repeat(np.repeat(idx, scale, axis=0), scale, axis=1)


def tile_side(cells: int) -> int:
    """The smallest multiple of ``cells`` that is at least :data:`TILE` pixels."""
    return cells * max(1, math.ceil(TILE / cells))


def draw_grid(tiles: list[tuple[str, np.ndarray]], cells: int) -> tuple[Image.Image,
                                                                        dict[str, Any],
                                                                        list[list[int]]]:
    """The grid image of (name, mean map) tiles, in order, row by row; its layout
    (``tile``, ``label``, ``gap``, ``columns``) and each tile's [row, column]."""
    side = tile_side(cells)
    columns = max(1, math.ceil(math.sqrt(len(tiles))))
    rows = max(1, math.ceil(len(tiles) / columns))
    width = columns * side + (columns + 1) * GAP
    height = rows * (side + LABEL) + (rows + 1) * GAP
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    lut = colormap_table(COLORMAP)
    places = []
    for i, (name, mean) in enumerate(tiles):
        row, col = divmod(i, columns)
        x, y = tile_origin(row, col, side)
        canvas.paste(Image.fromarray(np.array(colormapped(tile_indices(mean, side), lut))),
                     (x, y))
        draw.text((x, y + side + 1), _fit(name, font, side), fill=(0, 0, 0), font=font)
        places.append([row, col])
    layout = {"tile": side, "label": LABEL, "gap": GAP, "columns": columns}
    return canvas, layout, places


def tile_origin(row: int, col: int, side: int) -> tuple[int, int]:
    """The top-left pixel of the tile at (row, col)."""
    return GAP + col * (side + GAP), GAP + row * (side + LABEL + GAP)


def _fit(text: str, font: Any, width: int) -> str:
    """``text`` cut (ending in ``...``) to fit ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."
