"""Implicit biases: the linearisation residual ``b = phi(u) - J u`` of a generic op.

For an op ``y = phi(u1, u2, ...)`` with its parameters held fixed, ``J u`` is the
Jacobian-vector product with the op's own activation inputs as tangents, computed
with forward-mode AD (double backward for ops without a forward-mode formula). Ops
whose op-table row names a ``fast`` rule get the same residual in closed form
instead (elementwise activations, products and quotients of two activations),
saving that extra pass.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils import _pytree as pytree

from fgcli.engine.attention import mha_bias, sdpa_bias
from fgcli.engine.ops import arg, is_activation, operands
from fgcli.engine.optable import OpRule, rule_of

_A = torch.ops.aten
_UNARY_JVP = {
    "silu": lambda u, out, kw: _A.silu_backward(u, u),
    "gelu": lambda u, out, kw: _A.gelu_backward(u, u, approximate=kw.get("approximate", "none")),
    "sigmoid": lambda u, out, kw: _A.sigmoid_backward(u, out),
    "tanh": lambda u, out, kw: _A.tanh_backward(u, out),
    "hardswish": lambda u, out, kw: _A.hardswish_backward(u, u),
    "hardsigmoid": lambda u, out, kw: _A.hardsigmoid_backward(u, u),
    "relu6": lambda u, out, kw: _A.hardtanh_backward(u, u, 0.0, 6.0),
}
"""``J u = phi'(u) u`` of elementwise activations by the kernels autograd's own backward
runs (``*_backward(grad=u, ...)``): one fused pass, the same derivative conventions at the
kinks as the gradients the map is built from."""


_FROM_INPUT = frozenset({"silu", "gelu", "hardswish", "hardsigmoid", "relu6"})


def jvp_before_inplace(name: str, row: OpRule, args: Sequence[Any], kwargs: dict[str, Any],
                       acts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """``J u`` of an in-place activation whose derivative reads ``u`` alone, computed
    before the op overwrites ``u`` (``silu_``, ``SiLU(inplace=True)``), so ``u`` need not
    be copied first; the bias is then ``residual(out, jvp)``. None: copy ``u``."""
    base = name.rstrip("_")
    if row.fast != "unary" or base not in _FROM_INPUT or len(acts) != 1:
        return None
    if any(isinstance(x, torch.Tensor) for x in list(args[1:]) + list(kwargs.values())):
        return None
    return _UNARY_JVP[base](acts[0].detach(), None, kwargs)


def _unary_bias(name: str, u: torch.Tensor, out: torch.Tensor,
                kwargs: dict[str, Any]) -> torch.Tensor | None:
    """``phi(u) - phi'(u) u`` in closed form for common elementwise activations.

    ``phi(u)`` is the kernel's own output and ``phi'(u) u`` comes from the activation's
    backward kernel (:data:`_UNARY_JVP`), so completeness is exactly as with forward-mode
    AD; only that extra pass is saved: two passes, one new tensor. None: no formula here.
    """
    jvp = _UNARY_JVP.get(name.rstrip("_"))
    if jvp is None:
        return None
    return residual(out, jvp(u.to(out.dtype), out, kwargs))


def residual(out: torch.Tensor, jvp: torch.Tensor) -> torch.Tensor:
    """``out - jvp`` written into ``jvp`` (a tensor of our own): one pass."""
    return torch.sub(out.detach(), jvp, out=jvp) if jvp.shape == out.shape \
        else out.detach() - jvp




def fast_implicit_bias(name: str, args: Sequence[Any], kwargs: dict[str, Any],
                       acts: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor | None:
    """Implicit biases with a closed form, else None (use forward-mode AD).

    * an elementwise activation of one activation input: see ``_unary_bias``;
    * a product of exactly two activations (squeeze-excitation, attention
      scores): bilinear, so ``J u = 2 out`` and ``b = -out``;
    * a quotient of two activations: homogeneous of degree 0, ``b = out``.

    ``acts`` are the op's activation inputs as they were before the call.
    """
    return _fast_bias(name, rule_of(name), args, kwargs, acts, out)


def _fast_bias(name: str, row: OpRule, args: Sequence[Any], kwargs: dict[str, Any],
               acts: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor | None:
    """:func:`fast_implicit_bias` by the row's ``fast`` column."""
    if row.fast == "unary" and len(acts) == 1 and acts[0].shape == out.shape:
        others = [x for x in list(args[1:]) + list(kwargs.values()) if isinstance(x, torch.Tensor)]
        if not others:
            return _unary_bias(name, acts[0], out.detach(), kwargs)
    if row.fast == "bilinear" and len(acts) == 2:
        ops = operands(args, kwargs) if row.bias != "einsum" else \
            [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if len(ops) == 2 and all(is_activation(x) for x in ops):
            return -out.detach()
    if row.fast in _NORM_BIASES and len(acts) == 1 and acts[0].shape == out.shape:
        return _NORM_BIASES[row.fast](args, kwargs, acts[0], out)
    if row.fast == "shift" and len(acts) == 1:
        return _shift_bias(name, args, kwargs, acts[0], out)
    if row.fast == "sdpa":
        return sdpa_bias(args, kwargs)
    if row.fast == "mha":
        return mha_bias(args, kwargs)
    if row.fast == "quotient" and len(acts) == 2 and kwargs.get("rounding_mode") is None:
        ops = operands(args, kwargs)
        if len(ops) == 2 and all(is_activation(x) for x in ops):
            return out.detach().clone()
    return None


def _constants(*tensors: Any) -> bool:
    return not any(is_activation(t) for t in tensors)


def _layer_norm_bias(args: Sequence[Any], kwargs: dict[str, Any], u: torch.Tensor,
                     out: torch.Tensor) -> torch.Tensor | None:
    """``y = g n + beta`` with ``n = (u - mean) / sqrt(var + eps)`` over the normalised
    dims: along ``u`` itself ``J n u = n eps / (var + eps)`` (``n`` is shift and scale
    invariant but for ``eps``), so ``b = y - (y - beta) r = y (1 - r) + beta r`` with
    ``r = eps / (var + eps)`` per row: one pass (a ``lerp``), no forward AD."""
    shape = arg(args, kwargs, 1, "normalized_shape")
    weight, beta = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
    eps = arg(args, kwargs, 4, "eps", 1e-5)
    if not _constants(weight, beta) or isinstance(eps, torch.Tensor):
        return None
    r = _layer_norm_rstd(out, u, shape, eps).square().mul_(eps)  # eps / (var + eps)
    if beta is None:
        return out.detach() * (1 - r)
    return torch.lerp(out.detach(), beta.detach().to(out.dtype), r)  # y + r (beta - y)


def _layer_norm_rstd(out: torch.Tensor, u: torch.Tensor, shape: Any,
                     eps: float) -> torch.Tensor:
    """``1 / sqrt(var + eps)`` per row (read-only): the one the kernel saved for its
    backward where autograd exposes it (no pass over the tensor), else from
    ``native_layer_norm`` (torch's ``var`` over a short last dim is ~6x slower than the
    layer norm itself)."""
    saved = getattr(out.grad_fn, "_saved_result2", None)
    if isinstance(saved, torch.Tensor) and saved.dim() == out.dim():
        return saved.detach().to(out.dtype)
    shape = list(shape) if isinstance(shape, (tuple, list, torch.Size)) else [shape]
    return torch.native_layer_norm(u.to(out.dtype), shape, None, None, eps)[2]


def _rms_norm_bias(args: Sequence[Any], kwargs: dict[str, Any], u: torch.Tensor,
                   out: torch.Tensor) -> torch.Tensor | None:
    """``y = g u / sqrt(ms + eps)``: ``J u = y eps / (ms + eps)``, so
    ``b = y ms / (ms + eps)`` (``ms`` the mean square over the normalised dims)."""
    shape = arg(args, kwargs, 1, "normalized_shape")
    weight, eps = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "eps")
    if not _constants(weight) or isinstance(eps, torch.Tensor):
        return None
    if eps is None:
        eps = torch.finfo(u.dtype).eps  # torch's default
    dims = tuple(range(-len(shape), 0)) if isinstance(shape, (tuple, list, torch.Size)) \
        else (-1,)
    ms = u.to(out.dtype).square().mean(dim=dims, keepdim=True)
    return out.detach() * (ms / (ms + eps))


def _softmax_bias(args: Sequence[Any], kwargs: dict[str, Any], u: torch.Tensor,
                  out: torch.Tensor) -> torch.Tensor | None:
    """``y = softmax(u)`` along ``dim``: ``J u = y (u - <y, u>)``, so
    ``b = y (1 - u + <y, u>)`` (sums along ``dim``)."""
    dim = arg(args, kwargs, 1, "dim")
    if not isinstance(dim, int):
        return None
    u, out = u.to(out.dtype), out.detach()
    if dim % u.dim() == u.dim() - 1:  # a batched dot product: ~2.5x faster than (y u).sum
        s = torch.einsum("...i,...i->...", out, u).unsqueeze(-1).add_(1)
    else:
        s = torch.linalg.vecdot(out, u, dim=dim).unsqueeze(dim).add_(1)
    return (s - u).mul_(out)


_SUBTRACT = frozenset({"sub", "__sub__", "__isub__", "sub_", "subtract"})


def _shift_bias(name: str, args: Sequence[Any], kwargs: dict[str, Any], u: torch.Tensor,
                out: torch.Tensor) -> torch.Tensor | None:
    """A sum of one activation ``u`` and a constant (a positional embedding, an attention
    mask, ``x + 3``) is affine in ``u``: ``J u = k u`` with ``k`` = 1, ``alpha`` or
    ``-alpha`` by the operand's place, so ``b = y - k u`` (the constant, rounded as the
    op rounded it)."""
    ops = operands(args, kwargs)
    alpha = kwargs.get("alpha", 1)
    if len(ops) != 2 or isinstance(alpha, (torch.Tensor, bool)):
        return None
    first = is_activation(ops[0])
    if name == "__rsub__":  # other - self, with self the first argument
        k = -1 if first else 1
    elif first:
        k = 1
    else:
        k = -alpha if name in _SUBTRACT else alpha
    out = out.detach()
    return out - u.to(out.dtype) if k == 1 else out - k * u.to(out.dtype)


_NORM_BIASES = {"layer_norm": _layer_norm_bias, "rms_norm": _rms_norm_bias,
                "softmax": _softmax_bias}


def implicit_biases(func, name: str, row: OpRule, args: Any, kwargs: dict[str, Any],
                    leaves: list[Any], spec: Any, act_idx: list[int],
                    saved: list[torch.Tensor] | None, outs: list[torch.Tensor],
                    out_idx: list[int]) -> list[torch.Tensor]:
    """``b = phi(u) - J u`` for each activation output of a generic op.

    The Jacobian-vector product uses the op's own activation inputs as
    tangents (parameters and constants held fixed). Forward-mode AD first; ops
    without a forward-mode formula fall back to the double-backward trick.
    """
    inplace = saved is not None
    primals = saved if inplace else [leaves[i].detach() for i in act_idx]
    if len(outs) == 1:
        fast = _fast_bias(name, row, args, kwargs, primals, outs[0])
        if fast is not None:
            return [fast]
    try:
        tangents = _jvp_forward(func, leaves, spec, act_idx, primals, out_idx,
                                inplace, "attention" in name)
    except (NotImplementedError, RuntimeError):
        tangents = _jvp_double_backward(func, leaves, spec, act_idx, primals, out_idx)
    return [o.detach() - t if t is not None else o.detach().clone()
            for o, t in zip(outs, tangents)]


def _rebuild(leaves: list[Any], spec: Any, act_idx: Sequence[int], new: Sequence[Any]):
    leaves = list(leaves)
    for i, v in zip(act_idx, new):
        leaves[i] = v
    return pytree.tree_unflatten(leaves, spec)


@functools.cache
def _load_jvp_decompositions() -> None:
    """Load torch's forward-AD decompositions once, without the FutureWarning their
    loading emits (they are built with the deprecated ``torch.jit.script``): a warning
    about torch's internals on every run's stderr would only alarm cron mail."""
    load = getattr(fwAD, "_maybe_load_decompositions", None)
    if load is None:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.script")
        load()


def _jvp_forward(func, leaves, spec, act_idx, primals, out_idx, inplace: bool,
                 attention: bool) -> list[torch.Tensor | None]:
    _load_jvp_decompositions()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        if attention:
            stack.enter_context(_math_sdpa())
        stack.enter_context(fwAD.dual_level())
        # an in-place op writes into its primal and tangent: give it copies of its own
        duals = [fwAD.make_dual(p.clone() if inplace else p, p.clone() if inplace else p)
                 for p in primals]
        args, kwargs = _rebuild(leaves, spec, act_idx, duals)
        res = pytree.tree_leaves(func(*args, **kwargs))
        return [fwAD.unpack_dual(res[j]).tangent for j in out_idx]


def _jvp_double_backward(func, leaves, spec, act_idx, primals, out_idx
                         ) -> list[torch.Tensor | None]:
    """J u = d/dv <J^T v, u> at v = 0, for ops without forward-mode AD."""
    with torch.enable_grad():
        ins = [p.clone().requires_grad_(True) for p in primals]
        args, kwargs = _rebuild(leaves, spec, act_idx, ins)
        res = pytree.tree_leaves(func(*args, **kwargs))
        res = [res[j] for j in out_idx]
        live = [k for k, o in enumerate(res) if o.requires_grad]
        vs = [torch.zeros_like(res[k], requires_grad=True) for k in live]
        vjp = torch.autograd.grad([res[k] for k in live], ins, vs, create_graph=True,
                                  allow_unused=True)
        pairs = [(g, p) for g, p in zip(vjp, primals) if g is not None and g.requires_grad]
        jvp = torch.autograd.grad([g for g, _ in pairs], vs, [p for _, p in pairs],
                                  allow_unused=True) if pairs else [None] * len(vs)
    tangents: list[torch.Tensor | None] = [None] * len(res)
    for k, t in zip(live, jvp):
        tangents[k] = None if t is None else t.detach()
    return tangents


def _math_sdpa() -> contextlib.AbstractContextManager:
    """Fused attention kernels have no forward-mode AD; the math backend does."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


