"""Which torch ops carry a bias, and how to get it (the ``bias`` column of the op table).

Every torch function call made during the traced forward pass is classified by
its row in :mod:`fgcli.engine.optable` into one of three groups:

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
  :mod:`fgcli.engine.implicit`). An op that is in fact homogeneous but has no
  zero-bias rule still gets the right answer (b == 0), only slower.

The rules are an optimisation, never a correctness requirement: unknown ops
are handled by the generic path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Number
from typing import Any

import torch

from fgcli.engine.optable import OpRule

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


def operands(args: Sequence[Any], kwargs: dict[str, Any], second: str = "other") -> list[Any]:
    """An op's first two operands (the second may be the keyword ``second``)."""
    ops = list(args[:2])
    if len(ops) < 2 and second in kwargs:
        ops.append(kwargs[second])
    return ops


def is_inplace(name: str, kwargs: dict[str, Any]) -> bool:
    """Whether the op writes into its first argument (``relu_``, ``+=``, ``inplace=True``)."""
    if name in _INPLACE_DUNDER or kwargs.get("inplace") is True:
        return True
    return name.endswith("_") and not name.endswith("__")


Rule = Callable[[Sequence[Any], dict[str, Any], Sequence[Any]], bool]


def _structural(args: Sequence[Any], kwargs: dict[str, Any], leaves: Sequence[Any]) -> bool:
    """Linear / positively homogeneous: zero when every floating tensor argument is an
    activation (index tensors and Python numbers are fine)."""
    return not any(_is_constant_operand(x) and isinstance(x, torch.Tensor) for x in leaves)


def _additive(args: Sequence[Any], kwargs: dict[str, Any], leaves: Sequence[Any]) -> bool:
    """A sum of two operands: zero iff both are activations."""
    ops = operands(args, kwargs)
    return len(ops) == 2 and all(is_activation(x) for x in ops)


def _additive_seq(args: Sequence[Any], kwargs: dict[str, Any], leaves: Sequence[Any]) -> bool:
    """A concatenation or stack: zero iff every joined tensor is an activation."""
    seq = args[0] if args else kwargs.get("tensors", ())
    return all(is_activation(x) for x in seq)


def _product(args: Sequence[Any], kwargs: dict[str, Any], leaves: Sequence[Any]) -> bool:
    """A product of two operands: zero iff exactly one is an activation."""
    ops = operands(args, kwargs)
    return sum(is_activation(x) for x in ops) == 1 and len(ops) == 2


def _einsum(args: Sequence[Any], kwargs: dict[str, Any], leaves: Sequence[Any]) -> bool:
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    return sum(is_activation(x) for x in tensors) == 1


def _quotient(args: Sequence[Any], kwargs: dict[str, Any], leaves: Sequence[Any]) -> bool:
    """A true division: zero iff the numerator is the only activation."""
    ops = operands(args, kwargs)
    return (len(ops) == 2 and is_activation(ops[0]) and not is_activation(ops[1])
            and kwargs.get("rounding_mode") is None)


def _pad(args: Sequence[Any], kwargs: dict[str, Any], leaves: Sequence[Any]) -> bool:
    """Padding with zeros, or by reflection / replication: zero."""
    mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
    value = kwargs.get("value", args[3] if len(args) > 3 else None)
    return mode != "constant" or not value


def _prelu(args: Sequence[Any], kwargs: dict[str, Any], leaves: Sequence[Any]) -> bool:
    ops = operands(args, kwargs, "weight")
    return len(ops) == 2 and is_activation(ops[0]) and not is_activation(ops[1])


ZERO_BIAS: dict[str, Rule] = {
    "structural": _structural, "additive": _additive, "additive_seq": _additive_seq,
    "product": _product, "einsum": _einsum, "quotient": _quotient, "pad": _pad,
    "prelu": _prelu,
}
"""The zero-bias rules, by the op table's ``bias`` column."""


def zero_bias(row: OpRule, args: Sequence[Any], kwargs: dict[str, Any],
              leaves: Sequence[Any]) -> bool:
    """True if the op is known to have exactly zero linearisation residual here."""
    rule = ZERO_BIAS.get(row.bias)
    return rule is not None and rule(args, kwargs, leaves)


def implicit_category(row: OpRule, args: Sequence[Any], kwargs: dict[str, Any]) -> str:
    """Which kind of implicit bias a generic op carries (for reports only)."""
    if row.category == "operands":
        return "product" if sum(is_activation(x) for x in operands(args, kwargs)) > 1 \
            else "constant"
    return row.category


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


def arg(args: Sequence[Any], kwargs: dict[str, Any], index: int, key: str,
        default: Any = None) -> Any:
    """Argument ``index`` of a call, or its keyword ``key``, or ``default``."""
    if len(args) > index:
        return args[index]
    return kwargs.get(key, default)


def _conv(args: Sequence[Any], kwargs: dict[str, Any]) -> ClosedForm | None:
    weight, bias = arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    if is_activation(weight) or is_activation(bias):
        raise _NotClosedForm
    return None if bias is None else ClosedForm("conv", bias.detach(), 1)


def _linear(args: Sequence[Any], kwargs: dict[str, Any]) -> ClosedForm | None:
    weight, bias = arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    if is_activation(weight) or is_activation(bias):
        raise _NotClosedForm
    return None if bias is None else ClosedForm("linear", bias.detach(), -1)


def _batch_norm(args: Sequence[Any], kwargs: dict[str, Any]) -> ClosedForm | None:
    """Eval-mode batch norm is affine: its bias is ``beta - gamma * mean / sqrt(var + eps)``."""
    mean = arg(args, kwargs, 1, "running_mean")
    var = arg(args, kwargs, 2, "running_var")
    weight = arg(args, kwargs, 3, "weight")
    bias = arg(args, kwargs, 4, "bias")
    training = arg(args, kwargs, 5, "training", False)
    eps = arg(args, kwargs, 7, "eps", 1e-5)
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
    "conv": _conv, "linear": _linear, "batch_norm": _batch_norm,
}
"""The closed-form bias rules, by the op table's ``bias`` column."""


def closed_form(row: OpRule, args: Sequence[Any], kwargs: dict[str, Any]
                ) -> tuple[bool, ClosedForm | None]:
    """(handled, bias): handled is False when the generic path must be used."""
    rule = CLOSED_FORM.get(row.bias)
    if rule is None:
        return False, None
    try:
        return True, rule(args, kwargs)
    except _NotClosedForm:
        return False, None
