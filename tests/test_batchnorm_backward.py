"""torch's CPU batch-norm backward (eval) is wrong for one NCHW image whose output gradient
arrives channels-last (a BN output flattened and transposed into tokens, as in LeViT's and
EfficientViT-M's stems). The engine hands batch norms their gradient in the output's own
memory format; these tests fail without that."""

from __future__ import annotations

import pytest
import torch
from helpers import randomise
from torch import nn

from fgcli import FullGrad


class TokenStem(nn.Module):
    """conv -> batch norm -> tokens (flatten + transpose) -> mean -> MLP head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.bn(self.conv(x)).flatten(2).transpose(1, 2)  # (N, h*w, C)
        # the mean's backward expands the gradient (a zero stride) and the transpose makes
        # it channels-last: the batch-norm backward's trigger
        return self.head(torch.nn.functional.gelu(self.mix(tokens.mean(1))))


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_of_one_through_a_token_stem_is_exact(channels_last):
    torch.manual_seed(0)
    model = randomise(TokenStem().double())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    fg = FullGrad(model)
    pair = fg.decompose(x, target=[1, 2])
    for j in range(2):
        one = fg.decompose(x[j:j + 1], target=[1 + j])
        assert abs(one.residual.item()) < 1e-10, one.residual
        torch.testing.assert_close(one.input_grad[0], pair.input_grad[j], rtol=1e-10, atol=1e-12)
        assert torch.allclose(one.logit, pair.logit[j:j + 1])


def test_the_engine_does_not_change_plain_autograd_elsewhere():
    """The fix lives in the engine's own hooks: the model's own backward outside a call is
    untouched, and no hook is left behind."""
    torch.manual_seed(0)
    model = randomise(TokenStem().double())
    FullGrad(model).decompose(torch.randn(1, 3, 16, 16, dtype=torch.float64))
    assert not model.bn._forward_hooks and not model.bn._backward_hooks
