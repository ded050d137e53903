"""TENT: fully test-time adaptation by entropy minimization (Wang et al., ICLR 2021)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from medtta.adapters.base import Adapter, use_batch_statistics
from medtta.models.base import norm_params


class Tent(Adapter):
    """Minimize the entropy of the per-pixel predictions by updating only the normalization affine parameters.

    BatchNorm normalizes with test-batch statistics; everything else stays frozen. Defaults follow the
    paper: Adam, lr 1e-3, one step per batch. On an InstanceNorm or GroupNorm network (nnU-Net's InstanceNorm)
    the affine parameters of those layers are trained, as medical TTA work on nnU-Nets does; they normalize with
    each input's own statistics anyway.
    """

    other_architectures: ClassVar[tuple[str, ...]] = ("nnunet",)  # a trained nnU-Net (InstanceNorm)
    paradigm: ClassVar[str] = "output"
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)
    own_criterion: ClassVar[str] = "entropy"  # its loss: selecting by entropy selects by its own objective
    defaults: ClassVar[dict[str, Any]] = {"lr": 1e-3}
    default_steps: ClassVar[int] = 1

    def configure(self, model: nn.Module) -> None:
        super().configure(model)
        use_batch_statistics(model)

    def collect_params(self, model: nn.Module) -> list[nn.Parameter]:
        return norm_params(model)

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        log_p = logits.log_softmax(1)
        return -(log_p.exp() * log_p).sum(1).mean()
