"""Layouts: where a tensor's batch, channels and image grid are.

Two sources, in this order: the op that made a 4-D activation tags it (``nchw`` for
conv / batch norm / pooling outputs, ``nhwc`` for a layer norm over channels-last,
followed through permutes and inherited by ops that keep the grid: the op table's
``layout`` column, :func:`layout_tag`), and the shape read against the input's
grid (:func:`layout_of`). Tracked pixel positions (:mod:`fgcli.engine.positions`)
place what neither can.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fgcli.engine.ops import arg, is_activation
from fgcli.engine.optable import OpRule

LAYOUT_ATTR = "_fgcli_layout"
GRID_TAGS = ("nchw", "nhwc")  # tags that place a 4-D tensor's elements on a grid

# How far (in cells of the layer's grid) a layer's (h, w) may be from the input's
# aspect ratio and still count as a spatial grid. Strided convs and ceil-mode
# pooling round sizes, so exact proportionality is too strict.
GRID_TOLERANCE = 1.5


@dataclass(frozen=True)
class Layout:
    """Where a layer's batch, channels and spatial grid are.

    kind: ``nchw`` / ``nhwc`` / ``tokens`` / ``tracked`` (spatial, enters the map;
    ``tracked``: each element's pixel is known from :mod:`fgcli.engine.positions`), ``vector``
    (N, K), ``other`` (any other shape: counted for completeness, not mapped),
    ``ambiguous`` (two readings fit the input grid equally well; left out of the
    map rather than guessed) or ``off-grid`` (tracked, but no element is a pixel).
    batch: ``lead`` (dim 0 is the batch), ``dim:<d>`` (the unique dim of size N),
    ``merged`` (dim 0 is the batch times a factor, batch-major, e.g. attention
    windows) or ``unknown``.
    grid: the layer's (h, w) for spatial kinds. skip: for ``tokens``, how many
    leading tokens are not on the grid (1 for a class token). whole: for ``tracked``,
    every element is a pixel of the image whose batch-major block of dim 0 holds it
    (checked on the positions once per pass).
    """

    kind: str
    batch: str
    grid: tuple[int, int] | None = None
    skip: int = 0
    whole: bool = False

    @property
    def spatial(self) -> bool:
        return self.kind in ("nchw", "nhwc", "tokens", "tracked")

    @property
    def off_grid(self) -> bool:
        """Whether some elements may not be pixels (a class token; padding, for tracked)."""
        return self.kind == "tracked" or self.skip > 0


def _grid_error(h: int, w: int, height: int, width: int) -> float:
    """Distance of (h, w) from the input's aspect ratio, in cells of the smaller grid."""
    return abs(h * width - w * height) / max(height, width)


TOKEN_GRID_TOLERANCE = 0.5  # patch grids divide the input exactly: allow rounding only


def _token_grid(count: int, height: int, width: int) -> tuple[int, int] | None:
    """(h, w) with h * w == count on the input's aspect ratio, if there is one."""
    if count < 1:
        return None
    guess = max(1, round((count * height / width) ** 0.5))
    for h in (guess, guess - 1, guess + 1):
        if h > 0 and count % h == 0 and _grid_error(h, count // h, height, width) <= \
                TOKEN_GRID_TOLERANCE:
            return h, count // h
    return None


def _token_layout(shape: tuple[int, ...], batch: str, height: int, width: int) -> Layout:
    """(N, L, C), or (L, N, C) inside attention: tokens on the image grid, maybe after a
    class token. Both readings fitting (never for square inputs) is ambiguous."""
    length = shape[1] if batch == "lead" else shape[0]
    fits = [(skip, g) for skip in (0, 1)
            if (g := _token_grid(length - skip, height, width)) is not None]
    if len(fits) == 1:
        return Layout("tokens", batch, fits[0][1], fits[0][0])
    return Layout("ambiguous" if fits else "other", batch)


def batch_layout(shape: tuple[int, ...], n: int) -> str:
    """Which dimension of a tensor of ``shape`` holds the ``n`` images."""
    if not shape:
        return "unknown"
    if shape[0] == n:
        return "lead"
    others = [d for d, s in enumerate(shape) if s == n]
    if len(others) == 1:
        return f"dim:{others[0]}"
    if shape[0] % n == 0:
        return "merged"
    return "unknown"


def layout_of(shape: tuple[int, ...], n: int, height: int, width: int,
              hint: str | None = None) -> Layout:
    """Classify a layer output of ``shape`` for a batch of ``n`` images of (height, width).

    ``hint`` is the layout the producing op implies (``nchw`` / ``nhwc``, see
    :func:`layout_tag`); without one, a 4-D shape is read as
    channels-first or channels-last by which pair of dims fits the input's grid,
    and left out of the map when both fit equally well.
    """
    batch = batch_layout(shape, n)
    if len(shape) == 3 and batch in ("lead", "dim:1"):
        return _token_layout(shape, batch, height, width)
    if batch != "lead":
        return Layout("other", batch)
    if len(shape) == 2:
        return Layout("vector", batch)
    if len(shape) != 4:
        return Layout("other", batch)
    cf_grid, cl_grid = (shape[2], shape[3]), (shape[1], shape[2])
    cf = _grid_error(*cf_grid, height, width)
    cl = _grid_error(*cl_grid, height, width)
    cf_ok, cl_ok = cf <= GRID_TOLERANCE, cl <= GRID_TOLERANCE
    if hint == "nchw":
        return Layout("nchw", batch, cf_grid)
    if hint == "nhwc":
        return Layout("nhwc", batch, cl_grid)
    if hint == "nhwc?":  # a layer norm over the last dim: channels-last only on an image grid
        return Layout("nhwc", batch, cl_grid) if cl_ok else Layout("other", batch)
    if cf_ok and (not cl_ok or cf < cl):
        return Layout("nchw", batch, cf_grid)
    if cl_ok and (not cf_ok or cl < cf):
        return Layout("nhwc", batch, cl_grid)
    return Layout("ambiguous" if cf_ok else "other", batch)


def on_grid(t: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, int]:
    """A spatial layer's tensor as 4-D (N, C, h, w) or (N, h, w, C), and its channel dim.

    Token layouts drop their leading non-grid tokens (a class token) and are laid
    out on their (h, w) grid in row-major order, as ViT's patch embedding lays them.
    """
    if layout.kind == "nchw":
        return t, 1
    if layout.kind == "nhwc":
        return t, 3
    if layout.kind != "tokens":
        raise ValueError(f"a {layout.kind} layer has no grid reading of its shape; "
                         "tracked layers are mapped through their positions")
    if layout.batch == "dim:1":
        t = t.movedim(1, 0)
    h, w = layout.grid
    t = t[:, layout.skip:, :]
    return t.reshape(t.shape[0], h, w, t.shape[2]), 3


def layout_tag(row: OpRule, args: Sequence[Any], kwargs: dict[str, Any],
               leaves: Sequence[Any], out: torch.Tensor) -> str | None:
    """The memory-independent layout of a 4-D op output, from the op's semantics.

    ``nchw`` for conv / batch norm / pooling outputs, ``nhwc`` for a layer norm
    over the last dim, permutes between the two are followed, and an op whose
    output keeps the batch and grid dims of a tagged activation input inherits its
    tag (elementwise ops, channel concatenation, a linear layer on channels-last).
    Ops that can keep a tensor's shape while moving its elements to other pixels (a
    roll, a transposed square grid) give no tag, so a tag always means "element
    (h, w) belongs to pixel (h, w)" (:mod:`fgcli.engine.positions` relies on it).
    Returns None when the op says nothing (the caller falls back to shapes).
    """
    if out.dim() != 4:
        return None
    if row.layout == "nchw":
        return "nchw"
    if row.layout == "layer_norm":
        return _layer_norm_tag(args, kwargs)
    if row.layout == "moves" or (row.layout == "getitem" and _advanced_index(args)):
        return None  # same shape, but elements moved: the grid no longer locates them
    sources = [x for x in leaves if is_activation(x) and getattr(x, LAYOUT_ATTR, None)]
    if not sources:
        return None
    if row.layout == "permute":
        return _permuted(args, kwargs, getattr(sources[0], LAYOUT_ATTR))
    for source in sources:  # e.g. x * scale: x's grid, not the (N, C, 1, 1) scale's
        tag = getattr(source, LAYOUT_ATTR)
        same_grid = (out.shape[2:] == source.shape[2:]) if tag == "nchw" else (
            out.shape[1:3] == source.shape[1:3])
        if source.dim() == 4 and out.shape[0] == source.shape[0] and same_grid:
            return tag
    return None


def _layer_norm_tag(args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
    """Over the last dim of a 4-D tensor: channels-last if the other dims are the
    (N, h, w) of an image grid, which the caller checks against the input's shape."""
    shape = arg(args, kwargs, 1, "normalized_shape")
    if shape is None or len(tuple(shape)) != 1:
        return None
    first = args[0] if args else kwargs.get("input")
    return "nhwc" if getattr(first, LAYOUT_ATTR, None) == "nhwc" else "nhwc?"


def _advanced_index(args: Sequence[Any]) -> bool:
    """Whether ``x[...]`` indexes with tensors or lists (which can permute pixels)."""
    if len(args) > 1:
        items = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, (torch.Tensor, list)) for i in items)
    return False


def _permuted(args: Sequence[Any], kwargs: dict[str, Any], tag: str) -> str | None:
    """A permute's output tag: nchw <-> nhwc, the identity keeps it, any other none."""
    dims = tuple(args[1:]) if len(args) > 2 else tuple(arg(args, kwargs, 1, "dims", ()))
    dims = tuple(d % 4 for d in dims)
    if dims == (0, 2, 3, 1) and tag == "nchw":
        return "nhwc"
    if dims == (0, 3, 1, 2) and tag == "nhwc":
        return "nchw"
    return None if dims != (0, 1, 2, 3) else tag


def grid_tag(x: torch.Tensor, n: int, height: int, width: int) -> str | None:
    """``nchw`` / ``nhwc`` when ``x``'s layout tag places its elements on a grid of a
    batch of ``n`` images of (height, width)."""
    tag = getattr(x, LAYOUT_ATTR, None)
    if x.dim() != 4 or x.shape[0] != n:
        return None
    if tag == "nhwc?":  # a layer norm over channels: channels-last if the shape fits
        return "nhwc" if layout_of(tuple(x.shape), n, height, width, tag).kind == "nhwc" \
            else None
    return tag if tag in GRID_TAGS else None
