"""Closed-form implicit biases of attention ops (``b = y - J u``, no forward-mode AD).

For scores ``S = scale * q k^T`` (plus a constant mask) and ``A = softmax(S)`` along the
keys, the Jacobian-vector product with the op's own activation inputs as tangents is
``J y = dA v + A dv`` with ``dA = A * (dS - rowsum(A * dS))`` and
``dS = scale * (dq k^T + q dk^T)`` (``dq = q`` for an activation query, else 0; likewise
``dk``, ``dv``). Row-constant parts of ``dS`` cancel in ``dA``. So

* ``scaled_dot_product_attention``: ``b = (1 - a_v) A v - dA v`` with
  ``dS = (a_q + a_k) S`` (``a_x`` = 1 when ``x`` is an activation);
* ``multi_head_attention_forward`` (projections with biases ``b_q, b_k, b_v`` inside the
  op, output projection ``W_o, b_o``): ``dq = q - b_q`` etc., so
  ``dS = (a_q + a_k) S - a_q scale b_q k^T`` (the ``q b_k^T`` part is row-constant) and
  ``b = W_o ((1 - a_v) A v + a_v b_v - dA v) + b_o``.

This costs one attention (scores, softmax, one ``A v`` product) and, for the module op,
its projections; forward-mode AD costs about twice the op. Cases outside the formulas
(dropout, key biases, zero attention, separate weights given as activations, need_weights)
return None and take the forward-AD path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fgcli.engine.ops import arg, is_activation


def _softmax_jvp_residual(scores: torch.Tensor, mask: torch.Tensor | None, v: torch.Tensor,
                          ds_scale: float, ds_extra: torch.Tensor | None, need_y: bool
                          ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(A v or None, dA v) for ``A = softmax(scores + mask)`` and
    ``dS = ds_scale * scores - ds_extra`` (``A v`` only if ``need_y``)."""
    a = torch.softmax(scores if mask is None else scores + mask, dim=-1)
    ds = scores * ds_scale
    if ds_extra is not None:
        ds = ds - ds_extra
    da = ds.sub_(torch.einsum("...i,...i->...", a, ds).unsqueeze(-1)).mul_(a)
    return (a @ v if need_y else None), da @ v


def _mask(attn_mask: Any, is_causal: bool, length: int, source: int,
          like: torch.Tensor) -> torch.Tensor | None | bool:
    """The additive mask of an attention call; False when it is not a plain one."""
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        return False
    if isinstance(attn_mask, torch.Tensor) and is_activation(attn_mask):
        return False
    mask = None
    if is_causal:
        keep = torch.ones(length, source, dtype=torch.bool, device=like.device).tril()
        mask = torch.zeros(length, source, dtype=like.dtype, device=like.device) \
            .masked_fill_(~keep, float("-inf"))
    if attn_mask is not None:
        extra = attn_mask.detach()
        if extra.dtype == torch.bool:
            extra = torch.zeros(extra.shape, dtype=like.dtype, device=like.device) \
                .masked_fill_(~extra, float("-inf"))
        mask = extra.to(like.dtype) if mask is None else mask + extra.to(like.dtype)
    return mask


def sdpa_bias(args: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The implicit bias of ``F.scaled_dot_product_attention`` (see the module docstring)."""
    q, k, v = (arg(args, kwargs, i, key) for i, key in enumerate(("query", "key", "value")))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or q.dim() < 2:
        return None
    if arg(args, kwargs, 4, "dropout_p", 0.0) or kwargs.get("enable_gqa", False):
        return None
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-1] != v.shape[:-1]:
        return None  # grouped-query heads: forward AD
    scale = kwargs.get("scale", args[6] if len(args) > 6 else None)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    causal = bool(arg(args, kwargs, 5, "is_causal", False))
    mask = _mask(arg(args, kwargs, 3, "attn_mask"), causal, q.shape[-2], k.shape[-2], q)
    if mask is False:
        return None
    aq, ak, av = (float(is_activation(t)) for t in (q, k, v))
    q, k, v = q.detach(), k.detach(), v.detach()
    scores = (q * scale) @ k.transpose(-2, -1)
    y, dav = _softmax_jvp_residual(scores, mask, v, aq + ak, None, av != 1)
    return dav.neg_() if y is None else y.mul_(1 - av).sub_(dav)


_MHA_UNSUPPORTED = (("bias_k", 7), ("bias_v", 8), ("static_k", 21), ("static_v", 22),
                    ("key_padding_mask", 14))


def mha_bias(args: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The implicit bias of ``F.multi_head_attention_forward``'s attention output, for
    (L, N, E) inputs with the in-projection packed or separate (see the module
    docstring); None outside the formula."""
    query, key, value = (arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    heads = arg(args, kwargs, 4, "num_heads")
    if not all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in (query, key, value)):
        return None
    if any(arg(args, kwargs, i, n) is not None for n, i in _MHA_UNSUPPORTED) or \
            arg(args, kwargs, 9, "add_zero_attn", False) or \
            (arg(args, kwargs, 13, "training", True) and arg(args, kwargs, 10, "dropout_p", 0)):
        return None
    weights = _mha_weights(args, kwargs)
    if weights is None:
        return None
    (wq, wk, wv), (bq, bk, bv), (wo, bo) = weights
    causal = bool(arg(args, kwargs, 24, "is_causal", False))
    mask = _mask(arg(args, kwargs, 16, "attn_mask"), causal, query.shape[0], key.shape[0], query)
    if mask is False or (mask is not None and mask.dim() != 2):
        return None
    aq, ak, av = (float(is_activation(t)) for t in (query, key, value))
    length, n, embed = query.shape
    d = embed // heads
    scale = 1.0 / math.sqrt(d)

    def project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x.detach(), w, b).reshape(x.shape[0], n * heads, d).transpose(0, 1)

    q, k, v = project(query, wq, bq), project(key, wk, bk), project(value, wv, bv)
    extra = None
    if aq and bq is not None:  # scale * b_q k^T, one row per head
        extra = (bq.reshape(1, heads, 1, d).expand(n, heads, 1, d).reshape(n * heads, 1, d)
                 * (aq * scale)) @ k.transpose(-2, -1)
    scores = (q * scale) @ k.transpose(-2, -1)
    y, dav = _softmax_jvp_residual(scores, mask, v, aq + ak, extra, av != 1)
    core = dav.neg_() if y is None else y.mul_(1 - av).sub_(dav)
    core = core.transpose(0, 1).reshape(length, n, embed)
    if av and bv is not None:
        core = core + bv
    return F.linear(core, wo, bo)


def _mha_weights(args: Sequence[Any], kwargs: dict[str, Any]):
    """((W_q, W_k, W_v), (b_q, b_k, b_v), (W_o, b_o)) as constants, or None when one
    of them is an activation or missing."""
    in_w, in_b = arg(args, kwargs, 5, "in_proj_weight"), arg(args, kwargs, 6, "in_proj_bias")
    out_w, out_b = arg(args, kwargs, 11, "out_proj_weight"), arg(args, kwargs, 12, "out_proj_bias")
    if arg(args, kwargs, 17, "use_separate_proj_weight", False):
        ws = tuple(arg(args, kwargs, i, n) for i, n in
                   ((18, "q_proj_weight"), (19, "k_proj_weight"), (20, "v_proj_weight")))
    else:
        ws = tuple(in_w.chunk(3)) if isinstance(in_w, torch.Tensor) else (None,) * 3
    bs = tuple(in_b.chunk(3)) if isinstance(in_b, torch.Tensor) else (None,) * 3
    every = (*ws, *bs, out_w, out_b)
    if any(w is None for w in (*ws, out_w)) or any(is_activation(t) for t in every):
        return None
    detach = [t.detach() if isinstance(t, torch.Tensor) else None for t in every]
    return tuple(detach[:3]), tuple(detach[3:6]), (detach[6], detach[7])
