import torch
from torch import nn

from medtta.precision import autocast


def test_a_forward_after_an_optimizer_step_sees_the_new_weights() -> None:
    """One autocast region spans many steps (a training epoch, a volume's adaptation): the low-precision copy
    of a weight must not outlive the step that changes it."""
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    conv, x = nn.Conv2d(1, 2, 3), torch.randn(2, 1, 8, 8)
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.5)
    with autocast("bf16", cpu):
        conv(x).square().mean().backward()
        optimizer.step()
        within = conv(x)
    with autocast("bf16", cpu):
        fresh = conv(x)
    assert within.dtype == torch.bfloat16 and torch.equal(within, fresh)
