"""What a model returns, read the same way everywhere: logits out of any output, checked."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for one call; flags restored in ``finally``.

    With every parameter frozen, ``requires_grad`` marks exactly the tensors
    that depend on the input, and no weight gradient is ever computed.
    """
    training = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in params:
            p.requires_grad_(flag)
        for m, flag in training:
            m.training = flag


def extract_logits(out: Any) -> torch.Tensor:
    """The class scores of a model output: a tensor; an object with a ``.logits`` tensor
    (Hugging Face style); a dict with a ``logits`` tensor, or with one tensor only; a
    tuple or list whose first item is a tensor (inception's and GoogLeNet's namedtuples)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        tensors = [v for v in out.values() if isinstance(v, torch.Tensor)]
        if isinstance(out.get("logits"), torch.Tensor):
            return out["logits"]
        if len(tensors) == 1:
            return tensors[0]
    elif hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        return out.logits
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model returned {describe_output(out)}; expected (N, classes) logits: "
                    "a tensor, a tuple whose first item is one, a dict with 'logits', or an "
                    "object with .logits")


def describe_output(out: Any) -> str:
    """A short description of a model output, for error messages."""
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, Mapping):
        keys = ", ".join(repr(k) for k in list(out)[:5])
        return f"a dict with keys {keys}" if keys else "an empty dict"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)} items" + (
            f" starting with {describe_output(out[0])}" if out else "")
    return f"a {type(out).__name__}"


def checked_logits(out: Any, n: int) -> torch.Tensor:
    """The logits of a model output for a batch of ``n``: (n, classes) with at least one
    class, floating point. Raises TypeError / ValueError saying what came instead."""
    logits = extract_logits(out)
    if logits.dim() != 2 or logits.shape[0] != n:
        raise ValueError(
            f"the model's output has shape {tuple(logits.shape)}; expected ({n}, classes)")
    if not logits.is_floating_point():
        raise TypeError(f"the model returned {logits.dtype} logits of shape "
                        f"{tuple(logits.shape)}; expected floating-point logits")
    check_classes(int(logits.shape[1]), f": it returned logits of shape "
                                        f"{tuple(logits.shape)} for a batch of {n}")
    return logits


def check_classes(n: int, detail: str) -> None:
    """A classifier has at least one class: the one check of a class count, whether it
    comes from the head or from the logits (``detail`` says which). ValueError."""
    if n < 1:
        raise ValueError(f"the model has no classes{detail}")


def nonfinite_logit(value: float) -> str:
    """Why an image has no result when its logit is NaN or infinite (dump, eval, check)."""
    return f"non-finite logit ({value}) from the model"
