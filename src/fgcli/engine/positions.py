"""Pixel positions tracked through structural ops (windowed attention, partitions).

Some layers hold image features in layouts no shape rule can read: Swin's shifted
windows (padded, rolled, cut into windows and merged into the batch), MaxViT's
window and grid partitions (``(N, windows, pixels per window, C)``, in two different
orders), the attention scores and head-split tensors inside them. Their positions
are exact, though, if we follow them: a tensor whose elements sit on an image grid
(a conv / batch-norm / pooling output, or a channels-last tensor verified by shape)
gets an integer *position tensor* of the same shape holding, for every element, the
flat index ``image * h * w + row * w + col`` of its pixel on that grid, and each op
applied to the features is applied to the positions too:

* moves (views, reshapes, permutes, transposes, rolls, slicing, chunking,
  concatenation, padding) run the same op on the position tensor; padding and
  concatenated tensors no rule placed (a class token) get ``-1``, "not on the grid";
* elementwise ops (eval-mode batch norm among them: LeViT's norms on tokens flattened
  to (N * L, C)) keep the positions (broadcast to the output's shape; two
  position-carrying operands must agree element by element, else ``-1``; an operand
  without positions may only be smaller or broadcast, like a per-channel scale);
* ops that mix along some dims (linear layers, layer norms and softmax over the
  last dim, ``normalize``) need the positions to be constant along those dims, as
  they are along channels; rows where they are not get ``-1``. A softmax or
  ``normalize`` across pixels (CoaT's keys, XCiT's queries) rescales each element
  in place: it keeps its pixel;
* convolutions and pooling that keep the spatial size of (N, C, h, w) windows
  merged into the batch (EfficientViT-M) keep each window pixel's position;
* products that contract a dim (``matmul``, ``einsum``, attention): an output
  element takes the position of its row in the first operand, i.e. an attention
  score or attention output belongs to its *query* pixel; where the first operand's
  positions vary along the contracted dim, the column of the second operand
  (``v @ attn.T`` with channels-first values);
* any other op (strided pooling, reductions, strided convolutions, ...) ends
  tracking; its output is either a new grid tensor or not an image layout at all.

A tensor whose positions turn out to be entirely ``-1`` after a mixing op (e.g.
Swin's patch merging, which concatenates four neighbouring pixels along channels)
is not tracked further; the next grid tensor starts afresh at its own resolution.

Position tensors are integer tensors on the features' device, mostly
zero-stride views (channels are never materialised), built and moved without
any host synchronisation except one check after a mixing op that is not free.

Image indices (which image each element belongs to) follow the same rules where
they can: :mod:`fgcli.engine.images`. The op table's ``position`` column
(:mod:`fgcli.engine.optable`) says which rule an op takes; :data:`RULES` holds them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils import _pytree as pytree

from fgcli.engine.ops import is_activation
from fgcli.engine.optable import OpRule, dim_arg

POS_ATTR = "_fgcli_positions"
OFF_GRID = -1


class Index(Protocol):
    """What the shared rules follow: pixel :class:`Positions` or image indices
    (:class:`fgcli.engine.images.ImageIndex`), an int64 ``index`` per element."""

    index: torch.Tensor

    def rebuilt(self, index: torch.Tensor) -> Index:
        """The same kind of index (same grid) holding ``index``."""

    def joins(self, other: Index) -> bool:
        """Whether ``other`` indexes the same space (so the two may be compared)."""


@dataclass(frozen=True)
class Positions:
    """index: int64, broadcastable to (and with the shape of) the tracked tensor;
    ``image * h * w + row * w + col`` on ``grid`` = (h, w), or -1 (not a pixel)."""

    index: torch.Tensor
    grid: tuple[int, int]

    def rebuilt(self, index: torch.Tensor) -> Positions:
        return Positions(index, self.grid)

    def joins(self, other: Index) -> bool:
        return isinstance(other, Positions) and other.grid == self.grid


Getter = Callable[[Any], "Index | None"]


def positions_of(t: Any) -> Positions | None:
    return getattr(t, POS_ATTR, None) if isinstance(t, torch.Tensor) else None


def start(t: torch.Tensor, tag: str) -> Positions | None:
    """Positions of a 4-D grid tensor whose layout tag is ``nchw`` or ``nhwc``."""
    n = t.shape[0]
    h, w = (t.shape[2], t.shape[3]) if tag == "nchw" else (t.shape[1], t.shape[2])
    if h * w <= 1:
        return None  # a globally pooled vector is not a map
    base = torch.arange(n * h * w, device=t.device)
    shape = (n, 1, h, w) if tag == "nchw" else (n, h, w, 1)
    return Positions(base.view(shape).expand(t.shape), (h, w))


def dims_of(d: Any, ndim: int) -> list[int]:
    """A ``dim`` argument (an int or a sequence) as non-negative dims."""
    if isinstance(d, int):
        d = [d]
    return [x % ndim for x in d]


def collapse(index: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, bool]:
    """``index`` with ``dims`` reduced to size 1: the common position along them, or -1;
    and whether any position had to be compared (not free: a zero stride is)."""
    compared = False
    for d in dims:
        if index.shape[d] == 1:
            continue
        first = index.narrow(d, 0, 1)
        if index.stride(d) == 0:
            index = first
            continue
        same = (index == first).all(d, keepdim=True)
        index = torch.where(same, first, OFF_GRID)
        compared = True
    return index, compared


def broadcast_index(index: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    try:
        return index.expand(shape) if index.dim() == len(shape) else \
            torch.broadcast_to(index, shape)
    except RuntimeError:
        return None


# -- rules ---------------------------------------------------------------------
# Each rule gives the output's index after one op from the inputs' indices read by
# ``get`` (pixel positions or image indices); None where it does not place it.
Rule = Callable[[OpRule, Any, tuple, dict[str, Any], Any, Getter], Any]


def mixed(p: Index, dims: list[int], out_shape: torch.Size) -> Index | None:
    """``p`` after mixing along ``dims`` (kept as size 1, then broadcast to the output)."""
    index, compared = collapse(p.index, dims)
    if index.dim() != len(out_shape):
        return None
    if compared and not bool((index >= 0).any()):  # the one host check: nothing left
        return None
    out = broadcast_index(index, out_shape)
    return None if out is None else p.rebuilt(out)


def elementwise(args: tuple, kwargs: dict[str, Any], out: torch.Tensor, get: Getter
                ) -> Index | None:
    """Each output element at the index of the same element of the input(s)."""
    operands = [x for x in pytree.tree_leaves((args, kwargs)) if is_activation(x)]
    found = [get(x) for x in operands]
    known = [p for p in found if p is not None]
    if not known:
        return None
    if any(not known[0].joins(p) for p in known):
        return None
    # an activation operand of the output's full shape whose positions are unknown hides
    # where the result's elements come from; smaller ones (per-channel scales) broadcast,
    # and so do ones expanded to the full shape (MobileViT-v2's context vector)
    for x, p in zip(operands, found):
        if p is None and x.shape == out.shape and not any(
                x.stride(d) == 0 and x.shape[d] > 1 for d in range(x.dim())):
            return None
    index = broadcast_index(known[0].index, out.shape)
    if index is None:
        return None
    for p in known[1:]:
        other = broadcast_index(p.index, out.shape)
        if other is None:
            return None
        if other.data_ptr() == index.data_ptr() and other.stride() == index.stride():
            continue  # the same positions
        # compare only where either varies: dims both broadcast (channels) stay free
        free = [d for d in range(index.dim()) if index.stride(d) == 0 and other.stride(d) == 0]
        a, b = index, other
        for d in free:
            a, b = a.narrow(d, 0, 1), b.narrow(d, 0, 1)
        index = torch.where(a == b, a, OFF_GRID).expand(out.shape)
    return known[0].rebuilt(index)


def _moved_leaves(row: OpRule, args: tuple, kwargs: dict[str, Any], get: Getter
                  ) -> tuple[list[Any], Any, Index] | None:
    """The call's arguments with each floating tensor replaced by its index (-1 for a
    tensor joined in without one), the pytree spec, and one of the indices."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    ref = None
    new = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            p = get(leaf)
            if p is None:
                if row.position != "join":
                    return None  # image features from an unknown place
                # a constant joined in (a class token), or features no rule placed (a
                # grid tensor would have been given positions when the op started):
                # not on the grid
                new.append(torch.full(leaf.shape, OFF_GRID, dtype=torch.long,
                                      device=leaf.device))
                continue
            if ref is not None and not ref.joins(p):
                return None
            ref = p
            new.append(p.index)
        else:
            new.append(leaf)
    return None if ref is None else (new, spec, ref)


def _move(row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any], out: Any,
          get: Getter) -> Any:
    """Rerun the op on the index tensors (-1 for untracked tensors and padding)."""
    moved = _moved_leaves(row, args, kwargs, get)
    if moved is None:
        return None
    new, spec, ref = moved
    if row.position == "copy":  # same values: keep the (zero-stride) view
        return ref.rebuilt(next(x for x in new if isinstance(x, torch.Tensor)))
    a, k = pytree.tree_unflatten(new, spec)
    if row.position == "reshape":
        first = out if isinstance(out, torch.Tensor) else None
        if first is None or any(isinstance(v, torch.dtype) for v in a):  # view(dtype)
            return None
        # the features' own shape; never materialise dims broadcast before and after
        return ref.rebuilt(reshape_index(a[0], first.shape))
    if row.position == "pad":
        mode = k.get("mode", a[2] if len(a) > 2 else "constant")
        if mode != "constant":
            return None
        a = tuple(a[:2])
        k = {"value": OFF_GRID}
    res = func(*a, **k)
    if isinstance(res, torch.Tensor):
        return ref.rebuilt(res)
    if isinstance(res, (tuple, list)):
        return [ref.rebuilt(r) if isinstance(r, torch.Tensor) else None for r in res]
    return None


def reshape_index(index: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``index.reshape(shape)`` that keeps broadcast dims broadcast.

    An index is mostly zero-stride (channels; for image indices everything but the
    batch), and ``reshape`` copies the whole tensor as soon as one merge is not a view
    (Swin's windows merge the batch with window rows and columns). Dims are matched in
    groups whose sizes multiply to the same number; a group whose input dims are all
    broadcast stays broadcast, and only the other groups are materialised. Also works
    where ``view`` would not (an index kept as a view through ``contiguous``).
    """
    a, b = tuple(index.shape), tuple(shape)
    if index.numel() == 0 or 0 in b or all(index.stride(d) for d in range(len(a))):
        return index.reshape(b)
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        gi, gj, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                gi.append(i)
                pa, i = pa * a[i], i + 1
            elif pb < pa and j < len(b):
                gj.append(j)
                pb, j = pb * b[j], j + 1
            else:
                return index.reshape(b)
        groups.append((gi, gj))
    if not groups or any(a[d] != 1 for d in range(i, len(a))) or \
            any(b[d] != 1 for d in range(j, len(b))):
        return index.reshape(b)
    small = list(b)
    compact = index
    for gi, gj in groups:
        if all(index.stride(d) == 0 or a[d] == 1 for d in gi):
            for d in gi:
                compact = compact.narrow(d, 0, 1)
            for d in gj:
                small[d] = 1
    return compact.reshape(small).expand(b)


def _pooled(row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any], out: Any,
            get: Getter) -> Any:
    """A reduction of a tracked tensor along ``dim``: at the common pixel of the reduced
    elements, or at their common cell of a grid ``s`` times coarser when they are the
    ``s * s`` pixels of one cell (pooling); None when they are neither."""
    x = args[0] if args else kwargs.get("input")
    p = get(x) if isinstance(x, torch.Tensor) else None
    dim = dim_arg(row, args, kwargs)
    if p is None or dim is None or isinstance(dim, torch.Tensor) or (
            len(args) > 1 and isinstance(args[1], torch.Tensor)):
        return None
    first = out[0] if isinstance(out, tuple) else out
    dims = dims_of(dim, x.dim())
    index = p.index.expand(x.shape)
    common, compared = collapse(index, dims)
    grid = p.grid
    if compared and not bool((common >= 0).any()):
        k = 1
        for d in dims:
            k *= x.shape[d]
        s = math.isqrt(k)
        h, w = grid
        if s < 2 or s * s != k or h % s or w % s or (h // s) * (w // s) < 2:
            return None
        pixel = index % (h * w)
        cell = (index // (h * w)) * (h // s) * (w // s) + (pixel // w // s) * (w // s) \
            + (pixel % w) // s
        common, _ = collapse(torch.where(index >= 0, cell, OFF_GRID), dims)
        if not bool((common >= 0).any()):
            return None
        grid = (h // s, w // s)
    if first.dim() != x.dim():  # keepdim=False
        common = common.squeeze(tuple(dims))
    common = broadcast_index(common, first.shape)
    if common is None:
        return None
    res = Positions(common, grid)
    return [res, None] if isinstance(out, tuple) else res


def _einsum_index(args: tuple, out: torch.Tensor, get: Getter) -> Index | None:
    """``einsum(eq, a, b, ...)``: each output element at the position of its index in the
    first operand, which must carry positions constant along its contracted indices."""
    if not args or not isinstance(args[0], str):
        return None
    operands = list(args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    eq = args[0].replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    lhs, rhs = eq.split("->")
    terms = lhs.split(",")
    for term, x in list(zip(terms, operands))[:1]:  # the first operand's rows, as matmul
        p = get(x)
        if p is None or len(term) != x.dim() or len(set(term)) != len(term):
            return None
        contracted = [d for d, c in enumerate(term) if c not in rhs]
        index, compared = collapse(p.index, contracted)
        if compared and not bool((index >= 0).any()):
            return None
        kept = "".join(c for c in term if c in rhs)
        index = index.squeeze(tuple(contracted)) if contracted else index
        # lay the kept dims out in output order, new output dims as size 1
        order = sorted(range(len(kept)), key=lambda i: rhs.index(kept[i]))
        index = index.permute(order) if order else index
        shape = [1] * len(rhs)
        for i, c in enumerate(sorted(kept, key=rhs.index)):
            shape[rhs.index(c)] = index.shape[i]
        out_index = broadcast_index(index.reshape(shape), out.shape)
        return None if out_index is None else p.rebuilt(out_index)
    return None


def _first(out: Any) -> torch.Tensor | None:
    first = out[0] if isinstance(out, tuple) else out
    return first if isinstance(first, torch.Tensor) else None


def _conversion(row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any], out: Any,
                get: Getter) -> Any:
    """``x.to(y)``, ``x.type_as(y)``: x's elements, whatever y is."""
    return get(args[0] if args else None)


def _elementwise(row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any], out: Any,
                 get: Getter) -> Any:
    return elementwise(args, kwargs, _first(out), get)


def _same_grid(row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any], out: Any,
               get: Getter) -> Any:
    """A conv or pooling that keeps the spatial size of (N, C, *spatial): output pixel
    (i, j) sits where input pixel (i, j) does (windows merged into the batch)."""
    first = _first(out)
    x = args[0] if args else kwargs.get("input")
    p = get(x)
    if p is None or x.dim() < 3 or x.shape[0] != first.shape[0] or \
            x.shape[2:] != first.shape[2:]:
        return None
    res = mixed(p, [1], first.shape)
    return [res, None] if isinstance(out, tuple) else res


def _mix_last(row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any], out: Any,
              get: Getter) -> Any:
    """A linear layer: mixes the last dim."""
    x = args[0] if args else kwargs.get("input")
    p = get(x)
    return None if p is None else mixed(p, dims_of([-1], x.dim()), _first(out).shape)


def _mix_norm(row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any], out: Any,
              get: Getter) -> Any:
    """A layer / RMS norm: mixes the dims of its ``normalized_shape``."""
    x = args[0] if args else kwargs.get("input")
    p = get(x)
    if p is None:
        return None
    shape = kwargs.get("normalized_shape", args[1] if len(args) > 1 else None)
    k = len(tuple(shape)) if shape is not None else 1
    return mixed(p, dims_of(list(range(-k, 0)), x.dim()), _first(out).shape)


def _mix_dim(row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any], out: Any,
             get: Getter) -> Any:
    """Softmax or ``normalize`` along ``dim``. Across pixels (CoaT's key softmax over
    tokens, XCiT's normalize along tokens) each element is its own input element
    rescaled: it keeps its pixel."""
    x = args[0] if args else kwargs.get("input")
    p = get(x)
    dim = dim_arg(row, args, kwargs)
    if p is None or dim is None:
        return None
    first = _first(out)
    res = mixed(p, dims_of([dim], x.dim()), first.shape)
    if res is None and isinstance(p, Positions):
        res = p if p.index.shape == first.shape else None
    return res


def _query_first(row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any], out: Any,
                 get: Getter) -> Any:
    """Attention: each output element belongs to its query."""
    q = args[0] if args else kwargs.get("query")
    p = get(q)
    return None if p is None else mixed(p, [q.dim() - 1], _first(out).shape)


def _einsum(row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any], out: Any,
            get: Getter) -> Any:
    return _einsum_index(args, _first(out), get)


def _contract(row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any], out: Any,
              get: Getter) -> Any:
    """``a @ b``: an output element sits at its row of ``a`` (the query's pixel, for
    attention scores and outputs) if ``a``'s positions are constant along the contracted
    dim, else at its column of ``b`` (``v @ attn.T`` with channels-first tokens)."""
    first = _first(out)
    a, b = (list(args[:2]) + [kwargs.get("other")])[:2]
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) \
            or a.dim() < 2 or b.dim() < 2:
        return None
    pa, pb = get(a), get(b)
    res = None if pa is None else mixed(pa, [a.dim() - 1], first.shape)
    if res is None and pb is not None:
        res = mixed(pb, [b.dim() - 2], first.shape)
    return res


RULES: dict[str, Rule] = {
    "move": _move, "reshape": _move, "copy": _move, "join": _move, "pad": _move,
    "pooled": _pooled, "conversion": _conversion, "elementwise": _elementwise,
    "same_grid": _same_grid, "mix_last": _mix_last, "mix_dim": _mix_dim,
    "mix_norm": _mix_norm, "query_first": _query_first, "einsum": _einsum,
    "contract": _contract,
}
"""The position rules, by the op table's ``position`` column."""
_MOVE_RULES = frozenset({"move", "reshape", "copy", "join", "pad"})


def follow(rule: str, row: OpRule, func: Any, args: tuple, kwargs: dict[str, Any], out: Any,
           get: Getter) -> Any:
    """The output's index (or a list, one per output) after the op, by ``rule`` (a
    ``position`` column value) from the inputs' indices read by ``get``."""
    if rule not in _MOVE_RULES and _first(out) is None:
        return None
    return RULES[rule](row, func, args, kwargs, out, get)
