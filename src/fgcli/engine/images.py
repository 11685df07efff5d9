"""Image indices: which image of the batch every element of an activation belongs to.

Every activation's elements belong to one image (images never interact in eval mode);
the bias terms are split between images by these indices, exactly, whatever the
layout (heads == N, batch merged with windows in any order, batch not in dim 0).
They are followed from the input on by the rules of pixel positions
(:mod:`fgcli.engine.positions`) where those apply, plus per-sample ops such as
convolutions and pooling, reductions, and class tokens or padding joined to an
image's rows: the op table's ``images`` column (:mod:`fgcli.engine.optable`) says
which rule an op takes; :data:`RULES` holds them. Whether an op keeps row r of dim
0 at row r (the ``rows`` column, :func:`keeps_rows`) lets the tracker skip the rules
for a batch in dim 0, or merged batch-major with windows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from fgcli.engine.ops import is_activation
from fgcli.engine.optable import OpRule, dim_arg
from fgcli.engine.positions import Index, broadcast_index, collapse, dims_of, elementwise, follow

IMG_ATTR = "_fgcli_images"


@dataclass(frozen=True)
class ImageIndex:
    """index: int64 (int32 for the shared batch views), broadcastable to (and with the
    shape of) the tensor: the image of each element, or -1 (of no image)."""

    index: torch.Tensor

    def rebuilt(self, index: torch.Tensor) -> ImageIndex:
        return ImageIndex(index)

    def joins(self, other: Index) -> bool:
        return isinstance(other, ImageIndex)


def images_of(t: Any) -> ImageIndex | None:
    """Which image each element of ``t`` belongs to, if followed."""
    return getattr(t, IMG_ATTR, None) if isinstance(t, torch.Tensor) else None


def lead_images(base: torch.Tensor, shape: torch.Size) -> ImageIndex:
    """Plain image indices for a tensor of ``shape`` whose dim 0 is the batch."""
    return ImageIndex(base.view(-1, *([1] * (len(shape) - 1))).expand(shape))


# -- does the op keep rows of dim 0? (the ``rows`` column) ---------------------------
RowRule = Callable[[OpRule, tuple, dict[str, Any], list[torch.Tensor]], bool]


def _dim_index(row: OpRule, args: tuple, kwargs: dict[str, Any], ndim: int) -> int | None:
    """The op's ``dim`` argument as a non-negative int (None if not an int)."""
    dim = dim_arg(row, args, kwargs)
    return dim % ndim if isinstance(dim, int) and ndim else None


def _permute_rows(row: OpRule, args: tuple, kwargs: dict[str, Any],
                  acts: list[torch.Tensor]) -> bool:
    dims = args[1:] if len(args) > 2 else kwargs.get("dims", args[1] if len(args) > 1
                                                     else None)
    return bool(dims) and isinstance(dims[0], int) and dims[0] % acts[0].dim() == 0


def _transpose_rows(row: OpRule, args: tuple, kwargs: dict[str, Any],
                    acts: list[torch.Tensor]) -> bool:
    d = [v for v in list(args[1:3]) + [kwargs.get("dim0"), kwargs.get("dim1")]
         if isinstance(v, int)]
    return len(d) == 2 and all(v % acts[0].dim() != 0 for v in d)


def _roll_rows(row: OpRule, args: tuple, kwargs: dict[str, Any],
               acts: list[torch.Tensor]) -> bool:
    dims = kwargs.get("dims", args[2] if len(args) > 2 else None)
    if dims is None:
        return False
    dims = [dims] if isinstance(dims, int) else list(dims)
    return all(v % acts[0].dim() != 0 for v in dims)


def _pad_rows(row: OpRule, args: tuple, kwargs: dict[str, Any],
              acts: list[torch.Tensor]) -> bool:
    pad = kwargs.get("pad", args[1] if len(args) > 1 else None)
    return pad is not None and len(pad) // 2 < acts[0].dim()


def _norm_rows(row: OpRule, args: tuple, kwargs: dict[str, Any],
               acts: list[torch.Tensor]) -> bool:
    shape = kwargs.get("normalized_shape", args[1] if len(args) > 1 else None)
    return acts[0].dim() > (1 if shape is None else len(tuple(shape)))


ROW_RULES: dict[str, RowRule] = {
    "keep": lambda row, args, kwargs, acts: True,
    "glu": lambda row, args, kwargs, acts: _dim_index(row, args, kwargs, acts[0].dim()) != 0,
    "reshape": lambda row, args, kwargs, acts: False,  # the tracker's own case
    "mix_last": lambda row, args, kwargs, acts: acts[0].dim() > 1,
    "mix_norm": _norm_rows,
    "dim": lambda row, args, kwargs, acts: _dim_index(row, args, kwargs, acts[0].dim())
    not in (0, None),
    "batched": lambda row, args, kwargs, acts: all(t.dim() >= 3 for t in acts),
    "permute": _permute_rows, "transpose": _transpose_rows, "roll": _roll_rows,
    "pad": _pad_rows,
}
"""Whether an op keeps rows, by the op table's ``rows`` column."""


def keeps_rows(row: OpRule, args: tuple, kwargs: dict[str, Any], acts: list[torch.Tensor]
               ) -> bool:
    """Whether the op maps row r of dim 0 of its activation inputs to row r of its
    outputs (given that all have the same size in dim 0)."""
    rule = ROW_RULES.get(row.rows) if row.rows is not None else None
    return rule is not None and rule(row, args, kwargs, acts)


# -- image-index rules (the ``images`` column) -----------------------------------------
ImageRule = Callable[..., Any]


def follow_images(row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any],
                  leaves: list[Any], out: Any) -> None:
    """Attach image indices to the op's activation outputs (dropped where not followed)."""
    if not any(images_of(x) is not None for x in leaves if is_activation(x)):
        return
    try:
        result = _image_rule(row, func, args, kwargs, leaves, out)
    except (RuntimeError, TypeError, ValueError, IndexError):
        result = None
    outs = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
    results = result if isinstance(result, list) else [result] * len(outs)
    for o, p in zip(outs, results):
        if p is not None and is_activation(o) and p.index.shape == o.shape:
            setattr(o, IMG_ATTR, p)
        elif images_of(o) is not None:
            delattr(o, IMG_ATTR)


def _image_rule(row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any],
                leaves: list[Any], out: Any) -> Any:
    first = out[0] if isinstance(out, (tuple, list)) and out else out
    if not isinstance(first, torch.Tensor) or row.images is None:
        return None
    x = next((t for t in leaves if is_activation(t)), None)
    return RULES[row.images](row, func, args, kwargs, leaves, out, first, x)


def _per_sample(row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any],
                leaves: list[Any], out: Any, first: torch.Tensor, x: Any) -> Any:
    """Dim 0 holds independent samples, everything else mixes (conv, pooling, norms)."""
    p = images_of(x)
    if p is None or first.dim() == 0 or first.shape[0] != x.shape[0]:
        return None
    index, _ = collapse(p.index, list(range(1, x.dim())))
    index = index.reshape(-1, *([1] * (first.dim() - 1)))
    res = ImageIndex(index.expand(first.shape))
    return [res, None] if isinstance(out, tuple) else res


def _elementwise(row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any],
                 leaves: list[Any], out: Any, first: torch.Tensor, x: Any) -> Any:
    return elementwise(args, kwargs, first, images_of)


def _minmax(row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any],
            leaves: list[Any], out: Any, first: torch.Tensor, x: Any) -> Any:
    """``max(a, b)`` is elementwise, ``max(x, dim)`` a reduction."""
    if len(args) > 1 and isinstance(args[1], torch.Tensor):
        return _elementwise(row, func, args, kwargs, leaves, out, first, x)
    return _reduction(row, func, args, kwargs, leaves, out, first, x)


def _reduction(row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any],
               leaves: list[Any], out: Any, first: torch.Tensor, x: Any) -> Any:
    """A reduction of one activation along ``dim``: the reduced dims collapse."""
    if x is not args[0] or any(is_activation(t) for t in leaves[1:]):
        return None
    p = images_of(x)
    first = out[0] if isinstance(out, (tuple, list)) else out
    dim = dim_arg(row, args, kwargs)
    if p is None or isinstance(dim, torch.Tensor):
        return None
    dims = list(range(x.dim())) if dim is None else dims_of(dim, x.dim()) if x.dim() else []
    index, _ = collapse(p.index, dims)
    if row.images == "cumulative" or first.dim() == x.dim():
        index = broadcast_index(index, first.shape)  # cumulative, or keepdim=True
    else:  # keepdim=False
        index = index.reshape(first.shape)
    if index is None:
        return None
    res = ImageIndex(index)
    if isinstance(out, (tuple, list)):  # (values, indices)
        return [res if is_activation(o) else None for o in out]
    return res


def _cat(row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any],
         leaves: list[Any], out: Any, first: torch.Tensor, x: Any) -> Any:
    """A constant joined along a dim other than the batch's (a class token per image)
    belongs to the image of its row; joined along the batch's dim, to none (-1)."""
    seq = args[0] if args else kwargs.get("tensors", ())
    dim = dim_arg(row, args, kwargs)
    ref = next((t for t in seq if images_of(t) is not None), None)
    if ref is None:
        return None
    d = dim % ref.dim()
    common, _ = collapse(images_of(ref).index, [d])
    parts = []
    for t in seq:
        p = images_of(t)
        if p is not None:
            parts.append(p.index)
        elif is_activation(t):
            return None  # image features from an unknown place
        else:
            part = broadcast_index(common, t.shape)
            if part is None:
                return None
            parts.append(part)
    return ImageIndex(torch.cat(parts, d))


def _pad(row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any],
         leaves: list[Any], out: Any, first: torch.Tensor, x: Any) -> Any:
    """Padding the last dims: the padded elements belong to their row's image."""
    p = images_of(x)
    pad = kwargs.get("pad", args[1] if len(args) > 1 else None)
    if p is None or pad is None:
        return None
    index, _ = collapse(p.index, list(range(x.dim() - len(pad) // 2, x.dim())))
    index = broadcast_index(index, first.shape)
    return None if index is None else ImageIndex(index)


def _by_positions(row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any],
                  leaves: list[Any], out: Any, first: torch.Tensor, x: Any) -> Any:
    """The op's pixel-position rule, on image indices."""
    return follow(row.position, row, func, args, kwargs, out, images_of)


def _contract(row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any],
              leaves: list[Any], out: Any, first: torch.Tensor, x: Any) -> Any:
    """The matrix-product position rule (gather & co. get it: it places none of
    their usual calls, whose second argument is not a matrix)."""
    return follow("contract", row, func, args, kwargs, out, images_of)


def _unfold(row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any],
            leaves: list[Any], out: Any, first: torch.Tensor, x: Any) -> Any:
    """``F.unfold`` (im2col) is per sample; ``Tensor.unfold`` takes the product rule."""
    rule = _per_sample if func is torch.nn.functional.unfold else _contract
    return rule(row, func, args, kwargs, leaves, out, first, x)


RULES: dict[str, ImageRule] = {
    "per_sample": _per_sample, "elementwise": _elementwise, "minmax": _minmax,
    "reduction": _reduction, "cumulative": _reduction, "cat": _cat, "pad": _pad,
    "positions": _by_positions, "contract": _contract, "unfold": _unfold,
}
"""The image-index rules, by the op table's ``images`` column."""
