"""Post-processing of gradient terms: the reference's ``psi``, layouts, upsampling.

Everything here is batched tensor maths on the tensors' own device; nothing
leaves the device and nothing synchronises with the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS = 1e-6  # the reference's rescale epsilon: a constant map becomes 0, never NaN

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
    leading tokens are not on the grid (1 for a class token).
    """

    kind: str
    batch: str
    grid: tuple[int, int] | None = None
    skip: int = 0

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
    :func:`fgcli.engine.ops.layout_tag`); without one, a 4-D shape is read as
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


def compact_index(index: torch.Tensor) -> torch.Tensor:
    """An index tensor with its broadcast (zero-stride) dims cut to size 1."""
    for d in range(index.dim()):
        if index.stride(d) == 0 and index.shape[d] > 1:
            index = index.narrow(d, 0, 1)
    return index


def per_image_sum(t: torch.Tensor, layout: Layout, n: int, dtype: torch.dtype,
                  images: torch.Tensor | None = None) -> torch.Tensor:
    """Sum ``t`` over everything but the batch: (n,) in ``dtype``.

    ``images`` (broadcastable to ``t``, every entry in [0, n)): the image each element
    belongs to, followed through the forward pass (fgcli.engine.positions); exact
    whatever the layout. Without it the batch dim is read from ``layout``.
    The reduction runs in ``t``'s own precision (torch sums pairwise, so float32
    is accurate to ~1e-7 relative) and only the (n,) result is widened: casting
    whole layers to float64 first would double the hook's memory traffic.
    Raises ValueError when the batch dimension cannot be told from the shape
    (only possible with n > 1).
    """
    if n == 1:
        return t.sum().reshape(1).to(dtype)
    if images is not None:
        index = images.expand(t.shape)
        dims = [d for d in range(index.dim()) if index.stride(d) == 0 and index.shape[d] > 1]
        s = t.sum(dims, keepdim=True) if dims else t
        index = compact_index(index).reshape(-1)
        return s.new_zeros(n, dtype=dtype).index_add_(0, index, s.reshape(-1).to(dtype))
    if layout.batch == "lead":
        return t.sum(dim=tuple(range(1, t.dim()))).to(dtype)
    if layout.batch.startswith("dim:"):
        d = int(layout.batch[4:])
        return t.sum(dim=tuple(i for i in range(t.dim()) if i != d)).to(dtype)
    if layout.batch == "merged":
        return t.reshape(n, -1).sum(1).to(dtype)
    raise ValueError(
        f"cannot tell which dimension of a tensor of shape {tuple(t.shape)} holds the "
        f"batch of {n} images; run with a batch of one image"
    )


PSI_CHOICES = ("abs-rescale", "signed", "abs", "positive")
"""The post-processing ``psi`` choices, applied to the input term and to each mapped layer's
term before the channel sum (``t``: the term; min / max per image over every channel and
position of the layer, on-grid elements only):

* ``abs-rescale`` (default; the paper's and the reference code's):
  ``(|t| - min|t|) / (max|t| - min|t| + EPS)``, then summed over channels;
* ``signed``: ``t`` summed over channels (no abs, no rescale; for signed tasks, paper
  section 6);
* ``abs``: ``|t|`` summed over channels (no rescale: layers weigh by their magnitude);
* ``positive``: ``p = max(t, 0)``, then ``(p - min p) / (max p - min p + EPS)`` summed over
  channels (the same rescale as ``abs-rescale``, on the positive part).

Each layer's result is then upsampled bilinearly (``align_corners=True``, the reference's)
to the input size and summed with the input term's (already at the input size).

With ``signed`` the map is linear in the terms: it is the input term's channel sum plus each
mapped layer's signed per-pixel sum (``CompactDecomposition.layers``) upsampled. Its pixel
sum is *not* the logit: upsampling an (h, w) layer to (H, W) multiplies its sum by about
H·W / (h·w), and not uniformly (with ``align_corners=True`` the border cells of the layer's
grid weigh about half as much as interior ones; measured on resnet18 / vgg11 at 64 px: the
upsampled sum differs from the area-scaled one by up to 25–34 % of the area-scaled sum of
the layer's |per-pixel sums|, on their 2×2–4×4 grids).
Exact: a layer at the input's resolution keeps its sum, and ``CompactDecomposition`` (the
same signed sums at each layer's own resolution) + off-grid sums + the residual add up to the
logit. ``abs`` keeps each layer's scale (deep layers with large terms dominate);
``abs-rescale`` and ``positive`` put every element of a layer in [0, 1) per image, so a
layer weighs by its channel count and how its values spread, not by its magnitude.
"""


def check_psi(psi: str) -> str:
    """``psi`` if it is one of :data:`PSI_CHOICES`, else a ValueError listing them."""
    if not isinstance(psi, str) or psi not in PSI_CHOICES:
        raise ValueError(f"unknown psi {psi!r}; choose one of: {', '.join(PSI_CHOICES)}")
    return psi


def psi_channel_sum(t: torch.Tensor, channel_dim: int = 1, inplace: bool = False,
                    psi: str = "abs-rescale") -> torch.Tensor:
    """The reference's psi followed by the sum over channels, for a 4-D tensor.

    psi(t) = (|t| - min) / (max(|t| - min) + eps) with one min and max per
    image over all channels and positions. Summing over channels afterwards
    equals ``(sum_c |t| - C * min) / (max - min + eps)``, which needs only the
    channel sum and the per-image min and max. ``inplace`` lets it overwrite ``t``
    with ``|t|`` (for tensors the caller no longer needs). Returns (N, 1, h, w)
    in float32 or wider. Other ``psi`` (see :data:`PSI_CHOICES`): ``signed`` sums ``t``
    over channels, ``abs`` sums ``|t|``, ``positive`` rescales ``max(t, 0)`` as above.
    """
    if t.dtype in (torch.float16, torch.bfloat16):
        t, inplace = t.float(), True
    if psi != "abs-rescale":
        return _psi_channel_sum_other(t, channel_dim, inplace, psi)
    a = t.abs_() if inplace else t.abs()
    # two reductions: measured faster than one torch.aminmax on the CPU
    lo = a.amin(dim=(1, 2, 3), keepdim=True)
    hi = a.amax(dim=(1, 2, 3), keepdim=True)
    s = a.sum(dim=channel_dim, keepdim=True)
    if channel_dim != 1:
        s = s.movedim(channel_dim, 1)
    channels = t.shape[channel_dim]
    return (s - channels * lo) / (hi - lo + EPS)


def _psi_channel_sum_other(t: torch.Tensor, channel_dim: int, inplace: bool,
                           psi: str) -> torch.Tensor:
    """:func:`psi_channel_sum` for the ``signed``, ``abs`` and ``positive`` choices."""
    if psi == "signed":
        a = t
    elif psi == "abs":
        a = t.abs_() if inplace else t.abs()
    elif psi == "positive":
        a = t.clamp_(min=0) if inplace else t.clamp(min=0)
    else:
        raise ValueError(f"unknown psi {psi!r}; choose one of: {', '.join(PSI_CHOICES)}")
    s = a.sum(dim=channel_dim, keepdim=True)
    if channel_dim != 1:
        s = s.movedim(channel_dim, 1)
    if psi != "positive":
        return s
    lo = a.amin(dim=(1, 2, 3), keepdim=True)
    hi = a.amax(dim=(1, 2, 3), keepdim=True)
    return (s - t.shape[channel_dim] * lo) / (hi - lo + EPS)


def _reduced(positions, t: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The position index of a tracked tensor with its broadcast (zero-stride) dims cut to
    size 1, and those dims: every element along them shares a pixel, so sums, minima and
    maxima over them can run as dense reductions before any scatter."""
    index = positions.index.expand(t.shape)
    dims = [d for d in range(index.dim()) if index.stride(d) == 0 and index.shape[d] > 1]
    for d in dims:
        index = index.narrow(d, 0, 1)
    return index, dims


def _cells(index: torch.Tensor, grid: tuple[int, int], n: int
           ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Flat (cell, image) indices of each element of ``index``; elements not on the grid
    go to one extra cell / image past the end."""
    h, w = grid
    cells = n * h * w
    index = index.reshape(-1)
    on = index >= 0
    cell = torch.where(on, index, cells)
    image = torch.where(on, index // (h * w), n)
    return cell, image, cells


def psi_tracked(t: torch.Tensor, positions, n: int, psi: str = "abs-rescale") -> torch.Tensor:
    """psi + sum per pixel for a ``tracked`` layer (see :mod:`fgcli.engine.positions`):
    (N, 1, h, w), every element that belongs to a pixel counting like a channel of it.

    As :func:`psi_channel_sum`: ``(sum |t| - count * min) / (max - min + eps)`` per pixel,
    min and max per image over the elements on the grid (``psi``: see :data:`PSI_CHOICES`;
    ``signed`` and ``abs`` sum ``t`` / ``|t|`` per pixel, ``positive`` rescales
    ``max(t, 0)``).
    """
    if psi == "abs-rescale":
        a = t.float().abs() if t.dtype in (torch.float16, torch.bfloat16) else t.abs()
    else:
        check_psi(psi)
        a = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
        a = a if psi == "signed" else a.abs() if psi == "abs" else a.clamp(min=0)
    index, dims = _reduced(positions, a)
    share = 1
    for d in dims:
        share *= a.shape[d]
    if psi in ("signed", "abs"):
        s = a.sum(dims, keepdim=True) if dims else a
        cell, _, cells = _cells(index, positions.grid, n)
        h, w = positions.grid
        return s.new_zeros(cells + 1).scatter_add_(0, cell, s.reshape(-1))[:cells] \
            .view(n, 1, h, w)
    if dims:
        lo_r, hi_r, sum_r = a.amin(dims, keepdim=True), a.amax(dims, keepdim=True), \
            a.sum(dims, keepdim=True)
    else:
        lo_r = hi_r = sum_r = a
    cell, image, cells = _cells(index, positions.grid, n)
    lo = a.new_full((n + 1,), float("inf")).scatter_reduce(0, image, lo_r.reshape(-1), "amin")
    hi = a.new_full((n + 1,), float("-inf")).scatter_reduce(0, image, hi_r.reshape(-1), "amax")
    lo, hi = lo[:n].nan_to_num(posinf=0.0), hi[:n].nan_to_num(neginf=0.0)
    total = a.new_zeros(cells + 1).scatter_add_(0, cell, sum_r.reshape(-1))[:cells]
    count = a.new_zeros(cells + 1).index_add_(0, cell, a.new_full((1,), float(share))
                                             .expand(cell.shape[0]))[:cells]
    h, w = positions.grid
    total, count = total.view(n, 1, h, w), count.view(n, 1, h, w)
    lo, hi = lo.view(n, 1, 1, 1), hi.view(n, 1, 1, 1)
    return (total - count * lo) / (hi - lo + EPS)


def grid_sum(t: torch.Tensor, layout: Layout, n: int, positions=None) -> torch.Tensor:
    """The signed sum of a spatial layer's elements per pixel: (N, h, w) (``positions``:
    the pixel positions of a ``tracked`` layer)."""
    if layout.kind != "tracked":
        grid_t, channel_dim = on_grid(t, layout)
        return grid_t.sum(channel_dim)
    index, dims = _reduced(positions, t)
    s = t.sum(dims, keepdim=True) if dims else t
    cell, _, cells = _cells(index, positions.grid, n)
    h, w = positions.grid
    return s.new_zeros(cells + 1).scatter_add_(0, cell, s.reshape(-1))[:cells].view(n, h, w)


def upsample(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling with ``align_corners=True`` (the reference's choice)."""
    if tuple(m.shape[-2:]) == tuple(size):
        return m  # align_corners=True at the same size is the identity
    return F.interpolate(m, size=size, mode="bilinear", align_corners=True)


class MapAccumulator:
    """Sums layers' psi maps into one saliency map of ``size`` = (H, W) (``psi``: one of
    :data:`PSI_CHOICES`).

    Maps of the same resolution are summed first and each resolution is
    upsampled once at the end: bilinear interpolation is linear, so this equals
    upsampling every layer (to float rounding, ~1e-7 relative) at a fraction of
    the cost (ResNet-50 has 53 map layers but 5 resolutions).
    """

    def __init__(self, n: int, size: tuple[int, int], device: torch.device,
                 psi: str = "abs-rescale") -> None:
        self.size = size
        self.psi = check_psi(psi)
        self.total = torch.zeros(n, 1, *size, dtype=torch.float32, device=device)
        self.by_grid: dict[tuple[int, int], torch.Tensor] = {}

    def add_layer(self, t: torch.Tensor, layout: Layout, inplace: bool = False,
                  positions=None) -> None:
        """psi + channel sum of a spatial layer's term, added at its own resolution
        (``positions``: the pixel positions of a ``tracked`` layer)."""
        if layout.kind == "tracked":
            m = psi_tracked(t, positions, self.total.shape[0], self.psi)
        else:
            grid_t, channel_dim = on_grid(t, layout)
            m = psi_channel_sum(grid_t, channel_dim,
                                inplace and grid_t.data_ptr() == t.data_ptr(), self.psi)
        grid = (m.shape[2], m.shape[3])
        if grid in self.by_grid:
            self.by_grid[grid] += m
        else:
            self.by_grid[grid] = m

    def result(self) -> torch.Tensor:
        out = self.total
        for grid in sorted(self.by_grid):
            out = out + upsample(self.by_grid[grid], self.size)
        return out
