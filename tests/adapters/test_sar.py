"""SAR's model recovery as the official code does it: after a reset the low loss average is kept."""

from __future__ import annotations

import copy

import torch

from medtta.models import build_network
from medtta.registry import ADAPTERS


def test_after_a_reset_the_loss_average_stays_low_so_it_resets_again_until_it_climbs() -> None:
    torch.manual_seed(0)
    sar = ADAPTERS.create("sar", build_network("unet", 1, 4).eval())
    initial = copy.deepcopy(sar.model.state_dict())
    threshold = 0.05
    sar.loss_ema.fill_(0.04)
    with torch.no_grad():
        sar.params[0].add_(1.0)
    sar._recover(0.03, threshold)  # 0.9 * 0.04 + 0.1 * 0.03 = 0.039 < threshold: reset
    assert all(torch.equal(v, sar.model.state_dict()[k]) for k, v in initial.items())
    assert abs(float(sar.loss_ema) - 0.039) < 1e-6  # official: self.ema = ema after reset()
    sar._recover(1.0, threshold)  # 0.9 * 0.039 + 0.1 = 0.1351: climbs back, no reset
    assert abs(float(sar.loss_ema) - 0.1351) < 1e-6
