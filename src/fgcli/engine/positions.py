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

**Image indices** follow, from the input on, which image every element belongs to
(the same rules on a grid of one cell per image, plus per-sample ops such as
convolutions and pooling, reductions, and class tokens or padding joined to an
image's rows), so that the bias terms of any layout split exactly between the images
of a batch. The common cases cost nothing: a batch in dim 0, or merged batch-major
with windows (``k`` rows per image), is a shared view recognised by its strides, and
ops that keep rows of dim 0 or reshape pass it on without any tensor work.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from fgcli.engine import ops
from fgcli.engine.postprocess import layout_of

POS_ATTR = "_fgcli_positions"
IMG_ATTR = "_fgcli_images"
OFF_GRID = -1
# image indices are positions on a grid of one cell per image: index = image
IMAGE_GRID = (1, 1)


@dataclass(frozen=True)
class Positions:
    """index: int64, broadcastable to (and with the shape of) the tracked tensor;
    ``image * h * w + row * w + col`` on ``grid`` = (h, w), or -1 (not a pixel)."""

    index: torch.Tensor
    grid: tuple[int, int]


# ops whose output elements are input elements moved around (rerun on positions)
_MOVES = frozenset(
    {
        "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute",
        "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t", "squeeze",
        "unsqueeze", "expand", "expand_as", "repeat", "tile", "narrow", "select",
        "__getitem__", "flip", "roll", "contiguous", "clone", "chunk", "split",
        "tensor_split", "unbind", "cat", "concat", "concatenate", "stack", "pad",
        "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle",
    }
)
# elementwise: each output element at the position of the same element of the input(s)
_ELEMENTWISE = (
    frozenset(n for n, c in ops.CATEGORY.items() if c == "activation")
    | frozenset(
        {
            "relu", "relu_", "leaky_relu", "leaky_relu_", "abs", "abs_", "neg", "neg_",
            "__neg__", "positive", "__pos__", "dropout", "dropout_", "dropout1d", "dropout2d",
            "alpha_dropout", "feature_alpha_dropout", "to", "float", "double", "half",
            "bfloat16", "type_as", "add", "__add__", "__radd__", "__iadd__", "add_", "sub",
            "__sub__", "__rsub__", "__isub__", "sub_", "subtract", "mul", "__mul__",
            "__rmul__", "__imul__", "mul_", "multiply", "div", "__truediv__", "__itruediv__",
            "div_", "true_divide", "divide", "where", "masked_fill", "prelu",
            # eval-mode batch norm: a per-channel affine map of each element
            "batch_norm",
        }
    )
)
# ops on (N, C, *spatial) that keep the spatial size: output pixel (i, j) sits where input
# pixel (i, j) does (a stride-1 'same' conv or pooling on windows); channels mix
_SAME_GRID = frozenset({"conv1d", "conv2d", "conv3d", "avg_pool1d", "avg_pool2d",
                        "max_pool1d", "max_pool2d", "max_pool2d_with_indices"})
_MIX_LAST = frozenset({"linear", "softmax", "log_softmax", "softmin", "normalize",
                       "layer_norm", "rms_norm"})
# mixing ops whose every output element is its own input element rescaled by statistics
# taken along ``dim``
_RESCALE = frozenset({"softmax", "log_softmax", "softmin", "normalize"})
_CONTRACT = frozenset({"matmul", "__matmul__", "bmm", "einsum"})
_QUERY_FIRST = frozenset({"scaled_dot_product_attention", "multi_head_attention_forward"})
_CONVERSIONS = frozenset({"to", "float", "double", "half", "bfloat16", "type_as"})
TRACKED_OPS = _MOVES | _ELEMENTWISE | _MIX_LAST | _CONTRACT | _QUERY_FIRST | _SAME_GRID
# reductions over a dim whose elements are pixels: a tracked tensor keeps its place when
# the reduced elements share a pixel (a channel reduction) or fill one s x s cell of a
# grid s times coarser (Hiera's max-pooling of unrolled tokens); never a place to start
_POOLING = frozenset({"amax", "amin", "max", "min", "mean", "sum"})

# a fresh position tensor is only worth starting where an op is about to lose the layout
_GRID_TAGS = ("nchw", "nhwc")


def positions_of(t: Any) -> Positions | None:
    return getattr(t, POS_ATTR, None) if isinstance(t, torch.Tensor) else None


def images_of(t: Any) -> Positions | None:
    """Which image each element of ``t`` belongs to (grid ``IMAGE_GRID``), if followed."""
    return getattr(t, IMG_ATTR, None) if isinstance(t, torch.Tensor) else None


def start(t: torch.Tensor, tag: str) -> Positions | None:
    """Positions of a 4-D grid tensor whose layout tag is ``nchw`` or ``nhwc``."""
    n = t.shape[0]
    h, w = (t.shape[2], t.shape[3]) if tag == "nchw" else (t.shape[1], t.shape[2])
    if h * w <= 1:
        return None  # a globally pooled vector is not a map
    base = torch.arange(n * h * w, device=t.device)
    shape = (n, 1, h, w) if tag == "nchw" else (n, h, w, 1)
    return Positions(base.view(shape).expand(t.shape), (h, w))


def _dims(d: Any, ndim: int) -> list[int]:
    if isinstance(d, int):
        d = [d]
    return [x % ndim for x in d]


def _collapse(index: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, bool]:
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


def _broadcast(index: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    try:
        return index.expand(shape) if index.dim() == len(shape) else \
            torch.broadcast_to(index, shape)
    except RuntimeError:
        return None


class PositionTracker:
    """Attaches :class:`Positions` to op outputs during the traced forward pass of a
    batch of ``n`` images of (height, width)."""

    def __init__(self, n: int, height: int, width: int) -> None:
        self.n, self.height, self.width = n, height, width

    def _grid_tag(self, x: torch.Tensor) -> str | None:
        """``nchw`` / ``nhwc`` when ``x``'s layout tag places its elements on a grid."""
        tag = getattr(x, ops.LAYOUT_ATTR, None)
        if x.dim() != 4 or x.shape[0] != self.n:
            return None
        if tag == "nhwc?":  # a layer norm over channels: channels-last if the shape fits
            return "nhwc" if layout_of(tuple(x.shape), self.n, self.height, self.width,
                                       tag).kind == "nhwc" else None
        return tag if tag in _GRID_TAGS else None

    def start_images(self, x: torch.Tensor) -> None:
        """Image indices of the input batch: element [j, ...] belongs to image j."""
        self._n = x.shape[0]
        self._device = x.device
        self._bases: dict[int, torch.Tensor] = {}  # k -> arange(n).repeat_interleave(k)
        self._base_k: dict[int, int] = {}  # data_ptr of a base -> its k
        self._lead: dict[tuple[torch.Size, int], Positions] = {}  # read-only, shared
        setattr(x, IMG_ATTR, self._block_images(x.shape, 1))

    def _block_images(self, shape: torch.Size, k: int) -> Positions:
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

    def block_of(self, p: Positions | None) -> int | None:
        """k if image indices are those of :meth:`_block_images` (told from strides and
        the data pointer, no tensor work), else None."""
        if p is None or not hasattr(self, "_base_k"):
            return None
        index = p.index
        if index.dim() == 0 or index.stride(0) != 1 or any(index.stride()[1:]):
            return None
        k = self._base_k.get(index.data_ptr())
        return k if k is not None and index.shape[0] == self._n * k else None

    def is_lead(self, p: Positions | None) -> bool:
        """Whether image indices are the plain batch-in-dim-0 ones (element [j, ...] of
        image j)."""
        return self.block_of(p) == 1

    def _follow_images(self, name: str, func: Any, args: tuple, kwargs: dict[str, Any],
                       leaves: list[Any], out: Any) -> None:
        """Image indices for the op's outputs. Batch-major merged inputs (plain batch or
        windows, all with the same k) skip the rules where the op keeps rows of dim 0
        (per-sample, elementwise, mixing along other dims, batched products, moves that
        leave dim 0 alone) or reshapes: their outputs are batch-major merged too, with
        k = rows / N (a reshape keeps the flat order, and each image's elements are one
        contiguous block of it). Most ops of most models take this path."""
        acts = [x for x in leaves if ops.is_activation(x)]
        ks = {self.block_of(images_of(x)) for x in acts}
        if len(ks) == 1 and None not in ks:
            k = ks.pop()
            outs = [out] if isinstance(out, torch.Tensor) else \
                [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
            outs = [o for o in outs if ops.is_activation(o)]
            if name in _RESHAPES:
                ok = all(o.dim() > 0 and o.shape[0] % self._n == 0 for o in outs)
            else:
                ok = all(o.dim() > 0 and o.shape[0] == self._n * k for o in outs) and \
                    _keeps_rows(name, args, kwargs, acts)
            if ok and outs:
                for o in outs:
                    setattr(o, IMG_ATTR, self._block_images(o.shape, o.shape[0] // self._n))
                return
        _follow_images(name, func, args, kwargs, leaves, out)

    def after(self, name: str, func: Any, args: tuple, kwargs: dict[str, Any],
              leaves: list[Any], out: Any) -> None:
        """Give the op's activation outputs image indices and, if its inputs have (or can
        get) them, pixel positions."""
        self._follow_images(name, func, args, kwargs, leaves, out)
        if name not in TRACKED_OPS and name not in _POOLING:
            if ops.is_inplace(name, kwargs):  # changed in place by an op we cannot follow
                forget(out)
            return
        tensors = [x for x in leaves if ops.is_activation(x)]
        tracked = any(positions_of(x) for x in tensors)
        if name in _POOLING and not tracked:
            return
        if not tracked and _keeps_grid_tag(out):
            return  # the output's own tag still locates it: nothing to start
        for x in tensors:  # grid tensors join in (e.g. cat of a tracked and a tagged one)
            if positions_of(x) is None:
                tag = self._grid_tag(x)
                p = start(x, tag) if tag else None
                if p is not None:
                    setattr(x, POS_ATTR, p)
                    tracked = True
        if not tracked:
            return
        try:
            result = _rule(name, func, args, kwargs, out, positions_of)
        except (RuntimeError, TypeError, ValueError, IndexError):
            result = None  # an op the integer rerun does not support: stop tracking
        outs = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        results = result if isinstance(result, list) else [result] * len(outs)
        for o, p in zip(outs, results):
            if p is not None and ops.is_activation(o) and p.index.shape == o.shape:
                if p.index.device != o.device:
                    p = Positions(p.index.to(o.device), p.grid)
                setattr(o, POS_ATTR, p)
            elif positions_of(o) is not None:
                delattr(o, POS_ATTR)  # an in-place op on a tracked tensor we cannot follow


# -- rules ---------------------------------------------------------------------
Getter = Callable[[Any], "Positions | None"]


def _rule(name: str, func: Any, args: tuple, kwargs: dict[str, Any], out: Any, get: Getter
          ) -> Positions | list[Positions | None] | None:
    """The output's index after one op, from the inputs' indices read by ``get`` (pixel
    positions or image indices); None where the op's rule does not place it."""
    if name in _MOVES:
        return _move(name, func, args, kwargs, out, get)
    first = out[0] if isinstance(out, tuple) else out
    if not isinstance(first, torch.Tensor):
        return None
    if name in _POOLING and name not in _ELEMENTWISE:
        return _pooled(args, kwargs, out, get)
    if name in _CONVERSIONS:  # x.to(y), x.type_as(y): x's elements, whatever y is
        x = args[0] if args else None
        return get(x)
    if name in _ELEMENTWISE:
        return _elementwise(args, kwargs, first, get)
    if name in _SAME_GRID:
        x = args[0] if args else kwargs.get("input")
        p = get(x)
        if p is None or x.dim() < 3 or x.shape[0] != first.shape[0] or \
                x.shape[2:] != first.shape[2:]:
            return None
        res = _mixed(p, [1], first.shape)
        return [res, None] if isinstance(out, tuple) else res
    if name in _MIX_LAST:
        x = args[0] if args else kwargs.get("input")
        p = get(x)
        if p is None:
            return None
        dims = [-1]
        if name == "normalize":  # normalize(input, p=2.0, dim=1)
            dims = [kwargs.get("dim", args[2] if len(args) > 2 else 1)]
        elif name in ("softmax", "log_softmax", "softmin"):  # softmax(input, dim)
            dims = [kwargs.get("dim", args[1] if len(args) > 1 else None)]
            if dims[0] is None:
                return None
        elif name in ("layer_norm", "rms_norm"):
            shape = kwargs.get("normalized_shape", args[1] if len(args) > 1 else None)
            k = len(tuple(shape)) if shape is not None else 1
            dims = list(range(-k, 0))
        res = _mixed(p, _dims(dims, x.dim()), first.shape)
        if res is None and name in _RESCALE and get is positions_of:
            # normalised across pixels (CoaT's key softmax over tokens, XCiT's normalize
            # along tokens): each element is its own input element rescaled, at its pixel
            res = p if p.index.shape == first.shape else None
        return res
    if name in _QUERY_FIRST:
        q = args[0] if args else kwargs.get("query")
        p = get(q)
        return None if p is None else _mixed(p, [q.dim() - 1], first.shape)
    if name == "einsum":
        return _einsum(args, first, get)
    a, b = (list(args[:2]) + [kwargs.get("other")])[:2]
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) \
            or a.dim() < 2 or b.dim() < 2:
        return None
    # a @ b: an output element sits at its row of ``a`` (the query's pixel, for attention
    # scores and outputs) if ``a``'s positions are constant along the contracted dim,
    # else at its column of ``b`` (``v @ attn.T`` with channels-first tokens)
    pa, pb = get(a), get(b)
    res = None if pa is None else _mixed(pa, [a.dim() - 1], first.shape)
    if res is None and pb is not None:
        res = _mixed(pb, [b.dim() - 2], first.shape)
    return res


def _pooled(args: tuple, kwargs: dict[str, Any], out: Any, get: Getter
            ) -> Positions | list[Positions | None] | None:
    """A reduction of a tracked tensor along ``dim``: at the common pixel of the reduced
    elements, or at their common cell of a grid ``s`` times coarser when they are the
    ``s * s`` pixels of one cell (pooling); None when they are neither."""
    x = args[0] if args else kwargs.get("input")
    p = get(x) if isinstance(x, torch.Tensor) else None
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if p is None or dim is None or isinstance(dim, torch.Tensor) or (
            len(args) > 1 and isinstance(args[1], torch.Tensor)):
        return None
    first = out[0] if isinstance(out, tuple) else out
    dims = _dims(dim, x.dim())
    index = p.index.expand(x.shape)
    common, compared = _collapse(index, dims)
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
        common, _ = _collapse(torch.where(index >= 0, cell, OFF_GRID), dims)
        if not bool((common >= 0).any()):
            return None
        grid = (h // s, w // s)
    if first.dim() != x.dim():  # keepdim=False
        common = common.squeeze(tuple(dims))
    common = _broadcast(common, first.shape)
    if common is None:
        return None
    res = Positions(common, grid)
    return [res, None] if isinstance(out, tuple) else res


def forget(t: Any) -> None:
    """Drop a tensor's positions and image indices (an op overwrote its elements in a
    way not followed)."""
    for attr in (POS_ATTR, IMG_ATTR):
        if isinstance(t, torch.Tensor) and hasattr(t, attr):
            delattr(t, attr)


# -- image indices ---------------------------------------------------------------
# Every activation's elements belong to one image (images never interact in eval mode);
# the bias terms are split between images by these indices, exactly, whatever the
# layout (heads == N, batch merged with windows in any order, batch not in dim 0).

# ops that treat dim 0 as independent samples and mix everything else
_PER_SAMPLE = frozenset(
    {
        "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
        "conv_transpose3d", "batch_norm", "instance_norm", "group_norm", "local_response_norm",
        "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices",
        "max_pool2d_with_indices", "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d",
        "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
        "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
        "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices",
        "adaptive_max_pool3d_with_indices", "lp_pool1d", "lp_pool2d", "interpolate",
        "upsample", "upsample_nearest", "upsample_bilinear", "grid_sample", "fold",
    }
)
# reductions along ``dim`` (the second argument): the reduced dims collapse
_REDUCTIONS = frozenset(
    {"sum", "mean", "nansum", "nanmean", "amax", "amin", "max", "min", "logsumexp", "prod",
     "std", "var", "median", "cumsum", "cumprod", "logcumsumexp", "cummax", "cummin"}
)
_CUMULATIVE = frozenset({"cumsum", "cumprod", "logcumsumexp", "cummax", "cummin"})
# elementwise ops beyond those positions follow (any output element is its inputs')
_IMAGE_ELEMENTWISE = frozenset(
    {"maximum", "minimum", "fmax", "fmin", "square", "square_", "reciprocal", "sin", "cos",
     "log1p", "expm1", "lerp", "addcmul", "addcdiv", "nan_to_num", "sign", "floor", "ceil",
     "round", "trunc", "frac", "sgn", "log2", "log10", "exp2", "atan", "arctan", "sinh",
     "cosh", "asinh", "softplus", "logit", "hardtanh", "sigmoid", "clamp_min", "clamp_max"}
)
# moves by index: rerunning them on the image index is exact
_IMAGE_MOVES = frozenset({"gather", "index_select", "take_along_dim", "repeat_interleave",
                          "diagonal", "unfold"})


def lead_images(base: torch.Tensor, shape: torch.Size) -> Positions:
    """Plain image indices for a tensor of ``shape`` whose dim 0 is the batch."""
    return Positions(base.view(-1, *([1] * (len(shape) - 1))).expand(shape), IMAGE_GRID)


def _keeps_rows(name: str, args: tuple, kwargs: dict[str, Any], acts: list[torch.Tensor]
                ) -> bool:
    """Whether the op maps row r of dim 0 of its activation inputs to row r of its
    outputs (given that all have the same size in dim 0)."""
    x = acts[0]
    if name in _PER_SAMPLE or name in _ELEMENTWISE or name in _IMAGE_ELEMENTWISE or \
            name in ("contiguous", "clone"):
        return name != "glu" or _arg_dim(args, kwargs, 1, -1, x.dim()) != 0
    if name in ("linear", "layer_norm", "rms_norm"):  # mix the last dim(s) only
        shape = kwargs.get("normalized_shape", args[1] if len(args) > 1 else None)
        k = 1 if name == "linear" or shape is None else len(tuple(shape))
        return x.dim() > k
    if name in ("softmax", "log_softmax", "softmin"):
        return _arg_dim(args, kwargs, 1, None, x.dim()) not in (0, None)
    if name == "normalize":
        return _arg_dim(args, kwargs, 2, 1, x.dim()) not in (0, None)
    if name in ("matmul", "__matmul__", "bmm", "scaled_dot_product_attention"):
        return all(t.dim() >= 3 for t in acts)  # batched: dim 0 is a batch dim
    if name == "permute":
        dims = args[1:] if len(args) > 2 else kwargs.get("dims", args[1] if len(args) > 1
                                                         else None)
        return bool(dims) and isinstance(dims[0], int) and dims[0] % x.dim() == 0
    if name in ("transpose", "swapaxes", "swapdims"):
        d = [v for v in list(args[1:3]) + [kwargs.get("dim0"), kwargs.get("dim1")]
             if isinstance(v, int)]
        return len(d) == 2 and all(v % x.dim() != 0 for v in d)
    if name == "roll":
        dims = kwargs.get("dims", args[2] if len(args) > 2 else None)
        if dims is None:
            return False
        dims = [dims] if isinstance(dims, int) else list(dims)
        return all(v % x.dim() != 0 for v in dims)
    if name in ("chunk", "split", "unbind"):
        return _arg_dim(args, kwargs, 1 if name == "unbind" else 2, 0, x.dim()) \
            not in (0, None)
    if name == "pad":
        pad = kwargs.get("pad", args[1] if len(args) > 1 else None)
        return pad is not None and len(pad) // 2 < x.dim()
    return False


def _arg_dim(args: tuple, kwargs: dict[str, Any], pos: int, default: Any, ndim: int
             ) -> int | None:
    """An op's ``dim`` argument (keyword or positional), as a non-negative int."""
    dim = kwargs.get("dim", args[pos] if len(args) > pos else default)
    return dim % ndim if isinstance(dim, int) and ndim else None


def _follow_images(name: str, func: Any, args: tuple, kwargs: dict[str, Any],
                   leaves: list[Any], out: Any) -> None:
    """Attach image indices to the op's activation outputs (dropped where not followed)."""
    if not any(images_of(x) is not None for x in leaves if ops.is_activation(x)):
        return
    try:
        result = _image_rule(name, func, args, kwargs, leaves, out)
    except (RuntimeError, TypeError, ValueError, IndexError):
        result = None
    outs = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
    results = result if isinstance(result, list) else [result] * len(outs)
    for o, p in zip(outs, results):
        if p is not None and ops.is_activation(o) and p.index.shape == o.shape:
            setattr(o, IMG_ATTR, p)
        elif images_of(o) is not None:
            delattr(o, IMG_ATTR)


def _image_rule(name: str, func: Any, args: tuple, kwargs: dict[str, Any],
                leaves: list[Any], out: Any) -> Positions | list[Positions | None] | None:
    first = out[0] if isinstance(out, (tuple, list)) and out else out
    if not isinstance(first, torch.Tensor):
        return None
    x = next((t for t in leaves if ops.is_activation(t)), None)
    if (name == "unfold" and func is torch.nn.functional.unfold) or name in _PER_SAMPLE:
        p = images_of(x)
        if p is None or first.dim() == 0 or first.shape[0] != x.shape[0]:
            return None
        index, _ = _collapse(p.index, list(range(1, x.dim())))
        index = index.reshape(-1, *([1] * (first.dim() - 1)))
        res = Positions(index.expand(first.shape), IMAGE_GRID)
        return [res, None] if isinstance(out, tuple) else res
    if name in _IMAGE_ELEMENTWISE or (name in ("max", "min") and len(args) > 1
                                      and isinstance(args[1], torch.Tensor)):
        return _elementwise(args, kwargs, first, images_of)
    if name in _REDUCTIONS and x is args[0] and not any(
            ops.is_activation(t) for t in leaves[1:]):
        return _reduction(name, args, kwargs, x, out)
    if name in ("cat", "concat", "concatenate"):
        return _cat_images(args, kwargs)
    if name == "pad":
        p = images_of(x)
        pad = kwargs.get("pad", args[1] if len(args) > 1 else None)
        if p is None or pad is None:
            return None
        index, _ = _collapse(p.index, list(range(x.dim() - len(pad) // 2, x.dim())))
        index = _broadcast(index, first.shape)
        return None if index is None else Positions(index, IMAGE_GRID)
    if name in TRACKED_OPS or name in _IMAGE_MOVES:
        return _rule(name, func, args, kwargs, out, images_of)
    return None


def _reduction(name: str, args: tuple, kwargs: dict[str, Any], x: torch.Tensor,
               out: Any) -> Positions | list[Positions | None] | None:
    p = images_of(x)
    first = out[0] if isinstance(out, (tuple, list)) else out
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if p is None or isinstance(dim, torch.Tensor):
        return None
    dims = list(range(x.dim())) if dim is None else _dims(dim, x.dim()) if x.dim() else []
    index, _ = _collapse(p.index, dims)
    if name in _CUMULATIVE:
        index = _broadcast(index, first.shape)
    elif first.dim() != x.dim():  # keepdim=False
        index = index.reshape(first.shape)
    else:
        index = _broadcast(index, first.shape)
    if index is None:
        return None
    res = Positions(index, IMAGE_GRID)
    if isinstance(out, (tuple, list)):  # (values, indices)
        return [res if ops.is_activation(o) else None for o in out]
    return res


def _cat_images(args: tuple, kwargs: dict[str, Any]) -> Positions | None:
    """A constant joined along a dim other than the batch's (a class token per image)
    belongs to the image of its row; joined along the batch's dim, to none (-1)."""
    seq = args[0] if args else kwargs.get("tensors", ())
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    ref = next((t for t in seq if images_of(t) is not None), None)
    if ref is None:
        return None
    d = dim % ref.dim()
    row, _ = _collapse(images_of(ref).index, [d])
    parts = []
    for t in seq:
        p = images_of(t)
        if p is not None:
            parts.append(p.index)
        elif ops.is_activation(t):
            return None  # image features from an unknown place
        else:
            part = _broadcast(row, t.shape)
            if part is None:
                return None
            parts.append(part)
    return Positions(torch.cat(parts, d), IMAGE_GRID)


def _keeps_grid_tag(out: Any) -> bool:
    outs = [o for o in pytree.tree_leaves(out) if ops.is_activation(o)]
    return bool(outs) and all(getattr(o, ops.LAYOUT_ATTR, None) in _GRID_TAGS for o in outs)


def _mixed(p: Positions, dims: list[int], out_shape: torch.Size) -> Positions | None:
    """Positions after mixing along ``dims`` (kept as size 1, then broadcast to the output)."""
    index, compared = _collapse(p.index, dims)
    if index.dim() != len(out_shape):
        return None
    if compared and not bool((index >= 0).any()):  # the one host check: nothing left
        return None
    out = _broadcast(index, out_shape)
    return None if out is None else Positions(out, p.grid)


def _elementwise(args: tuple, kwargs: dict[str, Any], out: torch.Tensor, get: Getter
                 ) -> Positions | None:
    operands = [x for x in pytree.tree_leaves((args, kwargs)) if ops.is_activation(x)]
    found = [get(x) for x in operands]
    known = [p for p in found if p is not None]
    if not known:
        return None
    grid = known[0].grid
    if any(p.grid != grid for p in known):
        return None
    # an activation operand of the output's full shape whose positions are unknown hides
    # where the result's elements come from; smaller ones (per-channel scales) broadcast,
    # and so do ones expanded to the full shape (MobileViT-v2's context vector)
    for x, p in zip(operands, found):
        if p is None and x.shape == out.shape and not any(
                x.stride(d) == 0 and x.shape[d] > 1 for d in range(x.dim())):
            return None
    index = _broadcast(known[0].index, out.shape)
    if index is None:
        return None
    for p in known[1:]:
        other = _broadcast(p.index, out.shape)
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
    return Positions(index, grid)


def _move(name: str, func: Any, args: tuple, kwargs: dict[str, Any],
          out: Any, get: Getter) -> Positions | list[Positions | None] | None:
    """Rerun the op on the position tensors (-1 for untracked tensors and padding)."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    grid = None
    new = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            p = get(leaf)
            if p is None:
                if name not in ("cat", "concat", "concatenate", "stack"):
                    return None  # image features from an unknown place
                # a constant joined in (a class token), or features no rule placed (a
                # grid tensor would have been given positions when the op started):
                # not on the grid
                new.append(torch.full(leaf.shape, OFF_GRID, dtype=torch.long,
                                      device=leaf.device))
                continue
            if grid is not None and p.grid != grid:
                return None
            grid = p.grid
            new.append(p.index)
        else:
            new.append(leaf)
    if grid is None:
        return None
    if name in ("contiguous", "clone"):  # same values: keep the (zero-stride) view
        return Positions(next(x for x in new if isinstance(x, torch.Tensor)), grid)
    a, k = pytree.tree_unflatten(new, spec)
    if name in _RESHAPES:
        first = out if isinstance(out, torch.Tensor) else None
        if first is None or (name == "view" and any(isinstance(v, torch.dtype) for v in a)):
            return None
        # the features' own shape; never materialise dims broadcast before and after
        return Positions(_reshape_index(a[0], first.shape), grid)
    if name == "pad":
        mode = k.get("mode", a[2] if len(a) > 2 else "constant")
        if mode != "constant":
            return None
        a = tuple(a[:2])
        k = {"value": OFF_GRID}
    res = func(*a, **k)
    if isinstance(res, torch.Tensor):
        return Positions(res, grid)
    if isinstance(res, (tuple, list)):
        return [Positions(r, grid) if isinstance(r, torch.Tensor) else None for r in res]
    return None


_RESHAPES = frozenset({"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten"})


def _reshape_index(index: torch.Tensor, shape: torch.Size) -> torch.Tensor:
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


def _einsum(args: tuple, out: torch.Tensor, get: Getter) -> Positions | None:
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
        index, compared = _collapse(p.index, contracted)
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
        out_index = _broadcast(index.reshape(shape), out.shape)
        return None if out_index is None else Positions(out_index, p.grid)
    return None
