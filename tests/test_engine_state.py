"""An engine leaves the model exactly as it found it, also when a call raises."""

from __future__ import annotations

import pytest
import torch
from helpers import random_images
from torch import nn
from torch.overrides import _get_current_function_mode_stack

from fgcli import METHODS, FullGrad, SmoothFullGrad


def _hook_counts(model: nn.Module) -> list[tuple[int, ...]]:
    return [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
         len(m._backward_pre_hooks), len(getattr(m, "_forward_hooks_always_called", {})))
        for m in model.modules()
    ]


def _snapshot(model: nn.Module) -> dict:
    return {
        "hooks": _hook_counts(model),
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    }


def _assert_same(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["hooks"] == before["hooks"]
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    for a, b in zip(after["grad"], before["grad"]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert not _get_current_function_mode_stack()
    assert torch.is_grad_enabled()


def _engines(model: nn.Module):
    for name, cls in METHODS.items():
        yield name, (cls(model, n_samples=2, seed=0) if cls is SmoothFullGrad else cls(model))


def _prepared(tiny_cnn: nn.Module) -> nn.Module:
    """Mixed state: training on, one frozen parameter, one parameter with a .grad."""
    model = tiny_cnn
    model.train()
    model[-1].eval()  # a sub-module in eval while the rest trains
    params = list(model.parameters())
    params[0].requires_grad_(False)
    params[1].grad = torch.ones_like(params[1])
    return model


def test_construction_does_nothing(tiny_cnn):
    model = _prepared(tiny_cnn)
    before = _snapshot(model)
    for _, engine in _engines(model):
        assert engine.model is model
    _assert_same(model, before)


@pytest.mark.parametrize("call", ["saliency", "explain", "decompose"])
def test_calls_restore_model_state(tiny_cnn, call):
    model = _prepared(tiny_cnn)
    before = _snapshot(model)
    x = random_images(2, size=16, dtype=torch.float64)
    for _, engine in _engines(model):
        getattr(engine, call)(x)
        _assert_same(model, before)


class Boom(RuntimeError):
    pass


def test_state_restored_when_forward_raises(tiny_cnn):
    model = _prepared(tiny_cnn)

    def explode(_module, _args, _out):
        raise Boom("injected")

    handle = model[6].register_forward_hook(explode)  # mid-network, inside the traced forward
    before = _snapshot(model)
    x = random_images(2, size=16, dtype=torch.float64)
    try:
        for _, engine in _engines(model):
            with pytest.raises(Boom):
                engine.saliency(x)
            _assert_same(model, before)
    finally:
        handle.remove()


def test_state_restored_when_backward_raises(tiny_cnn):
    model = _prepared(tiny_cnn)
    before = _snapshot(model)
    x = random_images(2, size=16, dtype=torch.float64)

    class Exploding(FullGrad):
        @staticmethod
        def layer_map_input(grad, term):  # runs inside the backward pass
            raise Boom("injected in backward")

    with pytest.raises(Boom):
        Exploding(model).saliency(x)
    _assert_same(model, before)


def test_state_restored_on_bad_target(tiny_cnn):
    model = _prepared(tiny_cnn)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="out of range"):
        FullGrad(model).saliency(random_images(1, size=16, dtype=torch.float64), target=99)
    _assert_same(model, before)


def test_no_gradient_accumulates_on_parameters(tiny_cnn):
    model = tiny_cnn.eval()
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    FullGrad(model).saliency(random_images(2, size=16, dtype=torch.float64))
    assert all(p.grad is None for p in model.parameters())


def test_engines_do_not_interfere(tiny_cnn):
    """Many engines on one model: no hooks pile up, every call is the same."""
    model = tiny_cnn.eval()
    x = random_images(2, size=16, dtype=torch.float64)
    first = FullGrad(model).saliency(x)
    engines = [FullGrad(model) for _ in range(5)]
    for engine in engines:
        torch.testing.assert_close(engine.saliency(x), first, rtol=0, atol=0)
    assert all(count == (0, 0, 0, 0, 0) for count in _hook_counts(model))
