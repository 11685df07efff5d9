"""The tracker that follows pixel positions and image indices through a forward pass.

After each op the tracer (:mod:`fgcli.engine.decompose`) hands the call to
:meth:`PositionTracker.after`, which reads the op's row in the op table
(:mod:`fgcli.engine.optable`) and attaches image indices
(:mod:`fgcli.engine.images`) and, where the inputs carry or can start them, pixel
positions (:mod:`fgcli.engine.positions`) to the op's activation outputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from fgcli.engine.images import (
    IMG_ATTR,
    ImageIndex,
    follow_images,
    images_of,
    keeps_rows,
    lead_images,
)
from fgcli.engine.layout import GRID_TAGS, LAYOUT_ATTR, grid_tag
from fgcli.engine.ops import is_activation, is_inplace
from fgcli.engine.optable import OpRule
from fgcli.engine.positions import POS_ATTR, follow, positions_of, start


class PositionTracker:
    """Attaches :class:`Positions` to op outputs during the traced forward pass of a
    batch of ``n`` images of (height, width)."""

    def __init__(self, n: int, height: int, width: int) -> None:
        self.n, self.height, self.width = n, height, width

    def start_images(self, x: torch.Tensor) -> None:
        """Image indices of the input batch: element [j, ...] belongs to image j."""
        self._n = x.shape[0]
        self._device = x.device
        self._bases: dict[int, torch.Tensor] = {}  # k -> arange(n).repeat_interleave(k)
        self._base_k: dict[int, int] = {}  # data_ptr of a base -> its k
        self._lead: dict[tuple[torch.Size, int], ImageIndex] = {}  # read-only, shared
        setattr(x, IMG_ATTR, self._block_images(x.shape, 1))

    def _block_images(self, shape: torch.Size, k: int) -> ImageIndex:
        """Image indices of a tensor whose dim 0 is the batch merged batch-major with k
        blocks per image (k = 1: the plain batch): row r belongs to image r // k."""
        p = self._lead.get((shape, k))
        if p is None:
            base = self._bases.get(k)
            if base is None:
                base = torch.arange(self._n, device=self._device, dtype=torch.int32)
                base = self._bases[k] = base.repeat_interleave(k)
                self._base_k[base.data_ptr()] = k
            p = self._lead[(shape, k)] = lead_images(base, shape)
        return p

    def block_of(self, p: ImageIndex | None) -> int | None:
        """k if image indices are those of :meth:`_block_images` (told from strides and
        the data pointer, no tensor work), else None."""
        if p is None or not hasattr(self, "_base_k"):
            return None
        index = p.index
        if index.dim() == 0 or index.stride(0) != 1 or any(index.stride()[1:]):
            return None
        k = self._base_k.get(index.data_ptr())
        return k if k is not None and index.shape[0] == self._n * k else None

    def is_lead(self, p: ImageIndex | None) -> bool:
        """Whether image indices are the plain batch-in-dim-0 ones (element [j, ...] of
        image j)."""
        return self.block_of(p) == 1

    def _follow_images(self, row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any],
                       leaves: list[Any], out: Any) -> None:
        """Image indices for the op's outputs. Batch-major merged inputs (plain batch or
        windows, all with the same k) skip the rules where the op keeps rows of dim 0
        (per-sample, elementwise, mixing along other dims, batched products, moves that
        leave dim 0 alone) or reshapes: their outputs are batch-major merged too, with
        k = rows / N (a reshape keeps the flat order, and each image's elements are one
        contiguous block of it). Most ops of most models take this path."""
        acts = [x for x in leaves if is_activation(x)]
        ks = {self.block_of(images_of(x)) for x in acts}
        if len(ks) == 1 and None not in ks:
            k = ks.pop()
            outs = [out] if isinstance(out, torch.Tensor) else \
                [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
            outs = [o for o in outs if is_activation(o)]
            if row.rows == "reshape":
                ok = all(o.dim() > 0 and o.shape[0] % self._n == 0 for o in outs)
            else:
                ok = all(o.dim() > 0 and o.shape[0] == self._n * k for o in outs) and \
                    keeps_rows(row, args, kwargs, acts)
            if ok and outs:
                for o in outs:
                    setattr(o, IMG_ATTR, self._block_images(o.shape, o.shape[0] // self._n))
                return
        follow_images(row, func, args, kwargs, leaves, out)

    def after(self, name: str, row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any],
              leaves: list[Any], out: Any) -> None:
        """Give the op's activation outputs image indices and, if its inputs have (or can
        get) them, pixel positions."""
        self._follow_images(row, func, args, kwargs, leaves, out)
        if row.position is None:
            if is_inplace(name, kwargs):  # changed in place by an op we cannot follow
                forget(out)
            return
        tensors = [x for x in leaves if is_activation(x)]
        tracked = any(positions_of(x) for x in tensors)
        if row.position == "pooled" and not tracked:  # never a place to start
            return
        if not tracked and _keeps_grid_tag(out):
            return  # the output's own tag still locates it: nothing to start
        for x in tensors:  # grid tensors join in (e.g. cat of a tracked and a tagged one)
            if positions_of(x) is None:
                tag = grid_tag(x, self.n, self.height, self.width)
                p = start(x, tag) if tag else None
                if p is not None:
                    setattr(x, POS_ATTR, p)
                    tracked = True
        if not tracked:
            return
        try:
            result = follow(row.position, row, func, args, kwargs, out, positions_of)
        except (RuntimeError, TypeError, ValueError, IndexError):
            result = None  # an op the integer rerun does not support: stop tracking
        outs = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        results = result if isinstance(result, list) else [result] * len(outs)
        for o, p in zip(outs, results):
            if p is not None and is_activation(o) and p.index.shape == o.shape:
                if p.index.device != o.device:
                    p = p.rebuilt(p.index.to(o.device))
                setattr(o, POS_ATTR, p)
            elif positions_of(o) is not None:
                delattr(o, POS_ATTR)  # an in-place op on a tracked tensor we cannot follow


def forget(t: Any) -> None:
    """Drop a tensor's positions and image indices (an op overwrote its elements in a
    way not followed)."""
    for attr in (POS_ATTR, IMG_ATTR):
        if isinstance(t, torch.Tensor) and hasattr(t, attr):
            delattr(t, attr)


def _keeps_grid_tag(out: Any) -> bool:
    outs = [o for o in pytree.tree_leaves(out) if is_activation(o)]
    return bool(outs) and all(getattr(o, LAYOUT_ATTR, None) in GRID_TAGS for o in outs)
