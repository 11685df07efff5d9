"""Post-processing of gradient terms: the reference's ``psi``, per-image sums, upsampling.

Everything here is batched tensor maths on the tensors' own device; nothing
leaves the device and nothing synchronises with the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fgcli.engine.layout import Layout, on_grid

EPS = 1e-6  # the reference's rescale epsilon: a constant map becomes 0, never NaN


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
    belongs to, followed through the forward pass (fgcli.engine.images); exact
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


def _reduce(fn: str, a: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """``a.<fn>(dims, keepdim=True)`` one dim at a time, innermost first: a reduction
    over non-adjacent dims (attention scores' heads and keys) runs ~1.4x (min, max) to
    1.5x (sum) faster so on the CPU; the min and max are the same, sums differ by float
    rounding."""
    for d in sorted(dims, reverse=True):
        a = getattr(a, fn)(d, keepdim=True)
    return a


def psi_tracked(t: torch.Tensor, positions, n: int, psi: str = "abs-rescale",
                inplace: bool = False, whole: bool = False) -> torch.Tensor:
    """psi + sum per pixel for a ``tracked`` layer (see :mod:`fgcli.engine.positions`):
    (N, 1, h, w), every element that belongs to a pixel counting like a channel of it.

    As :func:`psi_channel_sum`: ``(sum |t| - count * min) / (max - min + eps)`` per pixel,
    min and max per image over the elements on the grid (``psi``: see :data:`PSI_CHOICES`;
    ``signed`` and ``abs`` sum ``t`` / ``|t|`` per pixel, ``positive`` rescales
    ``max(t, 0)``).
    """
    if psi == "abs-rescale":
        a = t.float().abs_() if t.dtype in (torch.float16, torch.bfloat16) else \
            t.abs_() if inplace else t.abs()
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
    sum_r = _reduce("sum", a, dims)
    cell, image, cells = _cells(index, positions.grid, n)
    if whole:  # image i's elements are block i of dim 0, all of them pixels
        lo, hi = a.reshape(n, -1).amin(1), a.reshape(n, -1).amax(1)
    else:
        lo_r, hi_r = _reduce("amin", a, dims), _reduce("amax", a, dims)
        lo = a.new_full((n + 1,), float("inf")).scatter_reduce(0, image, lo_r.reshape(-1),
                                                               "amin")
        hi = a.new_full((n + 1,), float("-inf")).scatter_reduce(0, image, hi_r.reshape(-1),
                                                                "amax")
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
            m = psi_tracked(t, positions, self.total.shape[0], self.psi, inplace,
                            layout.whole)
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
