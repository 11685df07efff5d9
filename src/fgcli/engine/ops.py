"""Which torch ops carry a bias, and how to get it.

Every torch function call made during the traced forward pass is classified by
its name (``func.__name__``) into one of three groups:

* **zero bias** -- ops that are positively homogeneous of degree 1 in their
  activation inputs (ReLU, pooling, views, concatenation and addition of
  activations, scaling by a constant, ...). Their linearisation residual is
  exactly zero, so they are skipped. Each rule below also checks that the
  op's operands really are activations: ``x + pos_embedding`` or ``x + 3`` is
  *not* zero-bias and falls through to the generic path.
* **closed form** -- conv / linear / eval-mode batch norm with fixed
  parameters: the bias is a per-channel vector, broadcast to the output.
* **generic** -- everything else. The implicit bias is the linearisation
  residual ``b = phi(u) - J u`` computed with forward-mode AD (see
  ``decompose.py``). An op that is in fact homogeneous but missing from the
  zero list still gets the right answer (b == 0), only slower.

The lists are an optimisation, never a correctness requirement: unknown ops
are handled by the generic path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Number
from typing import Any

import torch

# Calls that never produce an activation tensor worth looking at.
PASSTHROUGH = frozenset(
    {
        "__get__", "__set__", "dim", "size", "numel", "__len__", "stride", "storage_offset",
        "is_floating_point", "is_complex", "is_contiguous", "data_ptr", "element_size",
        "__format__", "__repr__", "__bool__", "__hash__", "__eq__", "__ne__", "__lt__",
        "__le__", "__gt__", "__ge__", "item", "tolist", "numpy", "detach", "detach_",
        "requires_grad_", "register_hook", "__setstate__", "__reduce_ex__", "__deepcopy__",
        "eq", "ne", "lt", "le", "gt", "ge", "argmax", "argmin", "argsort", "isnan", "isinf",
        "isfinite", "sign", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor",
        "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
        "__setitem__",
    }
)

# Linear / positively homogeneous ops: zero bias when every floating tensor
# argument is an activation (index tensors and Python numbers are fine).
STRUCTURAL = frozenset(
    {
        # views and layout
        "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute",
        "transpose", "transpose_", "swapaxes", "swapdims", "movedim", "moveaxis", "t",
        "squeeze", "unsqueeze", "squeeze_", "unsqueeze_", "expand", "expand_as", "repeat",
        "repeat_interleave", "tile", "narrow", "select", "__getitem__", "flip", "roll",
        "contiguous", "clone", "chunk", "split", "tensor_split", "unbind", "unfold",
        "diagonal", "gather", "index_select", "take_along_dim", "pixel_shuffle",
        "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle", "to", "float",
        "double", "half", "bfloat16", "type", "type_as", "cpu", "cuda",
        # positively homogeneous nonlinearities and reductions
        "relu", "relu_", "leaky_relu", "leaky_relu_", "abs", "abs_", "neg", "neg_", "__neg__",
        "positive", "__pos__", "max_pool1d", "max_pool2d", "max_pool3d",
        "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
        "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
        "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices",
        "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
        "adaptive_avg_pool2d", "adaptive_avg_pool3d", "sum", "mean", "nansum", "cumsum",
        "max", "min", "amax", "amin", "maximum", "minimum", "fmax", "fmin",
        "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
        # eval-mode dropout is the identity; train-mode dropout is a random mask (linear)
        "dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
        "feature_alpha_dropout", "feature_dropout",
    }
)

# Sums of operands: zero bias iff every operand is an activation.
_ADDITIVE_PAIR = frozenset(
    {"add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__",
     "__isub__", "sub_", "subtract"}
)
_ADDITIVE_SEQ = frozenset(
    {"cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack", "column_stack"}
)
# Products: zero bias iff exactly one operand is an activation.
_PRODUCT_PAIR = frozenset(
    {"mul", "__mul__", "__rmul__", "__imul__", "mul_", "multiply", "matmul", "__matmul__",
     "__rmatmul__", "mm", "bmm", "mv", "dot", "inner", "outer", "kron", "tensordot"}
)
# Quotients: zero bias iff the numerator is the only activation.
_QUOTIENT = frozenset({"div", "__truediv__", "__itruediv__", "div_", "true_divide", "divide"})

# Categories reported for implicit-bias ops (by name; "product"/"constant"
# are decided from the operands).
_CATEGORY_BY_NAME = {
    "normalisation": (
        "layer_norm", "group_norm", "instance_norm", "local_response_norm", "batch_norm",
        "normalize", "rms_norm",
    ),
    "attention": (
        "multi_head_attention_forward", "scaled_dot_product_attention", "softmax",
        "log_softmax", "softmin",
    ),
    "activation": (
        "silu", "silu_", "gelu", "gelu_", "sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_",
        "hardswish", "hardswish_", "relu6", "relu6_", "hardtanh", "hardtanh_", "tanh", "tanh_",
        "elu", "elu_", "selu", "selu_", "celu", "celu_", "softplus", "mish", "mish_",
        "logsigmoid", "tanhshrink", "softsign", "hardshrink", "softshrink", "rrelu", "glu",
        "clamp", "clamp_", "clip", "clip_", "exp", "log", "sqrt", "rsqrt", "pow", "__pow__",
        "erf", "threshold", "threshold_",
    ),
}
CATEGORY = {name: cat for cat, names in _CATEGORY_BY_NAME.items() for name in names}

# Ops whose 4-D output is channels-first by definition.
CHANNELS_FIRST = frozenset(
    {
        "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
        "batch_norm", "instance_norm", "group_norm", "local_response_norm", "max_pool2d",
        "max_pool2d_with_indices", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d",
        "adaptive_max_pool2d_with_indices", "interpolate", "upsample", "upsample_nearest",
        "upsample_bilinear", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
        "native_channel_shuffle",
    }
)

LAYOUT_ATTR = "_fgcli_layout"

# Ops that can keep a tensor's shape while moving its elements to other pixels (a roll,
# a transposed square grid): their outputs do not inherit a layout tag, so a tag always
# means "element (h, w) belongs to pixel (h, w)" (fgcli.engine.positions relies on it).
_MOVES_PIXELS = frozenset(
    {"roll", "flip", "fliplr", "flipud", "rot90", "transpose", "transpose_", "swapaxes",
     "swapdims", "movedim", "moveaxis", "gather", "index_select", "take_along_dim", "t",
     "view", "reshape", "view_as", "reshape_as", "unflatten", "flatten", "scatter",
     "index_put", "index_add"}
)


def layout_tag(name: str, args: Sequence[Any], kwargs: dict[str, Any], leaves: Sequence[Any],
               out: torch.Tensor) -> str | None:
    """The memory-independent layout of a 4-D op output, from the op's semantics.

    ``nchw`` for conv / batch norm / pooling outputs, ``nhwc`` for a layer norm
    over the last dim, permutes between the two are followed, and an op whose
    output keeps the batch and grid dims of a tagged activation input inherits its
    tag (elementwise ops, channel concatenation, a linear layer on channels-last).
    Returns None when the op says nothing (the caller falls back to shapes).
    """
    if out.dim() != 4:
        return None
    if name in CHANNELS_FIRST:
        return "nchw"
    if name == "layer_norm":
        # over the last dim of a 4-D tensor: channels-last if the other dims are the
        # (N, h, w) of an image grid, which the caller checks against the input's shape
        shape = _arg(args, kwargs, 1, "normalized_shape")
        if shape is None or len(tuple(shape)) != 1:
            return None
        first = args[0] if args else kwargs.get("input")
        return "nhwc" if getattr(first, LAYOUT_ATTR, None) == "nhwc" else "nhwc?"
    if name in _MOVES_PIXELS:
        return None  # same shape, but elements moved: the grid no longer locates them
    if name == "__getitem__" and len(args) > 1:
        items = args[1] if isinstance(args[1], tuple) else (args[1],)
        if any(isinstance(i, (torch.Tensor, list)) for i in items):
            return None  # advanced indexing can permute pixels
    sources = [x for x in leaves if is_activation(x) and getattr(x, LAYOUT_ATTR, None)]
    if not sources:
        return None
    if name == "permute":
        tag = getattr(sources[0], LAYOUT_ATTR)
        dims = tuple(args[1:]) if len(args) > 2 else tuple(_arg(args, kwargs, 1, "dims", ()))
        dims = tuple(d % 4 for d in dims)
        if dims == (0, 2, 3, 1) and tag == "nchw":
            return "nhwc"
        if dims == (0, 3, 1, 2) and tag == "nhwc":
            return "nchw"
        return None if dims != (0, 1, 2, 3) else tag
    for source in sources:  # e.g. x * scale: x's grid, not the (N, C, 1, 1) scale's
        tag = getattr(source, LAYOUT_ATTR)
        same_grid = (out.shape[2:] == source.shape[2:]) if tag == "nchw" else (
            out.shape[1:3] == source.shape[1:3])
        if source.dim() == 4 and out.shape[0] == source.shape[0] and same_grid:
            return tag
    return None


def _unary_bias(name: str, u: torch.Tensor, out: torch.Tensor,
                kwargs: dict[str, Any]) -> torch.Tensor | None:
    """``phi(u) - phi'(u) u`` in closed form for common elementwise activations.

    ``phi(u)`` is the kernel's own output and ``phi'`` the derivative autograd's
    backward uses (same conventions at the kinks), so completeness is exactly as
    with forward-mode AD; only that extra pass is saved. None: no formula here.
    """
    base = name.rstrip("_")
    if base == "silu":
        # u s - u * s (1 + u (1 - s)) = -u^2 s (1 - s) = out (out - u): two passes, no sigmoid
        return out * (out - u)
    if base == "sigmoid":
        slope = out * (1 - out)
    elif base == "tanh":
        slope = 1 - out * out
    elif base == "hardswish":
        slope = torch.where(u < -3, 0.0, torch.where(u <= 3, u / 3 + 0.5, 1.0))
    elif base == "hardsigmoid":
        slope = torch.where((u > -3) & (u < 3), 1.0 / 6.0, 0.0)
    elif base == "relu6":
        slope = ((u > 0) & (u < 6)).to(u.dtype)
    elif base == "gelu" and kwargs.get("approximate", "none") == "none":
        cdf = 0.5 * (1 + torch.erf(u * 0.7071067811865476))
        pdf = torch.exp(-0.5 * u * u) * 0.3989422804014327  # 1 / sqrt(2 pi)
        slope = cdf + u * pdf
    else:
        return None
    return out - u * slope


_BILINEAR = _PRODUCT_PAIR | {"einsum"}


def fast_implicit_bias(name: str, args: Sequence[Any], kwargs: dict[str, Any],
                       acts: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor | None:
    """Implicit biases with a closed form, else None (use forward-mode AD).

    * an elementwise activation of one activation input: see ``_unary_bias``;
    * a product of exactly two activations (squeeze-excitation, attention
      scores): bilinear, so ``J u = 2 out`` and ``b = -out``;
    * a quotient of two activations: homogeneous of degree 0, ``b = out``.

    ``acts`` are the op's activation inputs as they were before the call.
    """
    if len(acts) == 1 and name.rstrip("_") in _UNARY and acts[0].shape == out.shape:
        others = [x for x in list(args[1:]) + list(kwargs.values()) if isinstance(x, torch.Tensor)]
        if not others:
            return _unary_bias(name, acts[0], out.detach(), kwargs)
    if len(acts) == 2 and name in _BILINEAR:
        operands = _operands(args, kwargs) if name != "einsum" else list(acts)
        if len(operands) == 2 and all(is_activation(x) for x in operands):
            return -out.detach()
    if len(acts) == 2 and name in _QUOTIENT and kwargs.get("rounding_mode") is None:
        operands = _operands(args, kwargs)
        if len(operands) == 2 and all(is_activation(x) for x in operands):
            return out.detach().clone()
    return None


_UNARY = frozenset({"silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "relu6", "gelu"})

CLOSED_FORM_KINDS = ("conv", "linear", "norm")
IMPLICIT_KINDS = ("activation", "normalisation", "attention", "product", "constant", "other")

_INPLACE_DUNDER = frozenset({"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ipow__"})


def is_activation(obj: Any) -> bool:
    """An activation is a floating tensor that depends on the input image.

    During the traced pass every model parameter is frozen, so "depends on the
    input" is exactly ``requires_grad``.
    """
    return isinstance(obj, torch.Tensor) and obj.requires_grad and obj.is_floating_point()


def _is_constant_operand(obj: Any) -> bool:
    """A constant that an op adds: a floating tensor that is not an activation, or a number."""
    if isinstance(obj, torch.Tensor):
        return obj.is_floating_point() and not obj.requires_grad
    return isinstance(obj, Number) and not isinstance(obj, bool)


def _operands(args: Sequence[Any], kwargs: dict[str, Any], second: str = "other") -> list[Any]:
    ops = list(args[:2])
    if len(ops) < 2 and second in kwargs:
        ops.append(kwargs[second])
    return ops


def is_inplace(name: str, kwargs: dict[str, Any]) -> bool:
    if name in _INPLACE_DUNDER or kwargs.get("inplace") is True:
        return True
    return name.endswith("_") and not name.endswith("__")


def zero_bias(name: str, args: Sequence[Any], kwargs: dict[str, Any],
              leaves: Sequence[Any]) -> bool:
    """True if the op is known to have exactly zero linearisation residual here."""
    if name in STRUCTURAL:
        return not any(_is_constant_operand(x) and isinstance(x, torch.Tensor) for x in leaves)
    if name in _ADDITIVE_PAIR:
        ops = _operands(args, kwargs)
        return len(ops) == 2 and all(is_activation(x) for x in ops)
    if name in _ADDITIVE_SEQ:
        seq = args[0] if args else kwargs.get("tensors", ())
        return all(is_activation(x) for x in seq)
    if name in _PRODUCT_PAIR:
        ops = _operands(args, kwargs)
        return sum(is_activation(x) for x in ops) == 1 and len(ops) == 2
    if name == "einsum":
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        return sum(is_activation(x) for x in tensors) == 1
    if name in _QUOTIENT:
        ops = _operands(args, kwargs)
        return (len(ops) == 2 and is_activation(ops[0]) and not is_activation(ops[1])
                and kwargs.get("rounding_mode") is None)
    if name == "pad":
        mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
        value = kwargs.get("value", args[3] if len(args) > 3 else None)
        return mode != "constant" or not value
    if name == "prelu":
        ops = _operands(args, kwargs, "weight")
        return len(ops) == 2 and is_activation(ops[0]) and not is_activation(ops[1])
    return False


def implicit_category(name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> str:
    """Which kind of implicit bias a generic op carries (for reports only)."""
    if name in CATEGORY:
        return CATEGORY[name]
    if name in _PRODUCT_PAIR or name in _QUOTIENT or name == "einsum":
        return "product" if sum(is_activation(x) for x in _operands(args, kwargs)) > 1 \
            else "constant"
    if name in _ADDITIVE_PAIR or name in _ADDITIVE_SEQ or name in {"pad", "where",
                                                                    "masked_fill"}:
        return "constant"
    return "other"


@dataclass(frozen=True)
class ClosedForm:
    """A per-channel bias ``vector`` broadcast along ``channel_dim`` of the output."""

    kind: str
    vector: torch.Tensor
    channel_dim: int  # negative means counted from the end

    def broadcast(self, ndim: int) -> torch.Tensor:
        """The bias reshaped to broadcast against an output with ``ndim`` dims."""
        shape = [1] * ndim
        shape[self.channel_dim] = -1
        return self.vector.reshape(shape)


def _arg(args: Sequence[Any], kwargs: dict[str, Any], index: int, key: str,
         default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(key, default)


def _conv(args: Sequence[Any], kwargs: dict[str, Any]) -> ClosedForm | None:
    weight, bias = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    if is_activation(weight) or is_activation(bias):
        raise _NotClosedForm
    return None if bias is None else ClosedForm("conv", bias.detach(), 1)


def _linear(args: Sequence[Any], kwargs: dict[str, Any]) -> ClosedForm | None:
    weight, bias = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    if is_activation(weight) or is_activation(bias):
        raise _NotClosedForm
    return None if bias is None else ClosedForm("linear", bias.detach(), -1)


def _batch_norm(args: Sequence[Any], kwargs: dict[str, Any]) -> ClosedForm | None:
    """Eval-mode batch norm is affine: its bias is ``beta - gamma * mean / sqrt(var + eps)``."""
    mean = _arg(args, kwargs, 1, "running_mean")
    var = _arg(args, kwargs, 2, "running_var")
    weight = _arg(args, kwargs, 3, "weight")
    bias = _arg(args, kwargs, 4, "bias")
    training = _arg(args, kwargs, 5, "training", False)
    eps = _arg(args, kwargs, 7, "eps", 1e-5)
    if training or mean is None or var is None or any(
        is_activation(t) for t in (mean, var, weight, bias)
    ):
        raise _NotClosedForm  # batch statistics: generic path
    scale = torch.rsqrt(var.detach() + eps)
    if weight is not None:
        scale = scale * weight.detach()
    vec = -mean.detach() * scale
    if bias is not None:
        vec = vec + bias.detach()
    return ClosedForm("norm", vec, 1)


class _NotClosedForm(Exception):
    """The op's parameters are not constants here: use the generic path."""


CLOSED_FORM: dict[str, Callable[[Sequence[Any], dict[str, Any]], ClosedForm | None]] = {
    "conv1d": _conv, "conv2d": _conv, "conv3d": _conv,
    "conv_transpose1d": _conv, "conv_transpose2d": _conv, "conv_transpose3d": _conv,
    "linear": _linear,
    "batch_norm": _batch_norm,
}


def closed_form(name: str, args: Sequence[Any], kwargs: dict[str, Any]
                ) -> tuple[bool, ClosedForm | None]:
    """(handled, bias): handled is False when the generic path must be used."""
    rule = CLOSED_FORM.get(name)
    if rule is None:
        return False, None
    try:
        return True, rule(args, kwargs)
    except _NotClosedForm:
        return False, None
