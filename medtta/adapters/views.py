"""Augmented views of a batch of slices and their inverses, for methods that average predictions over views
(test-time augmentation, CoTTA's teacher)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class View:
    """A flip of the last axis, then `turns` quarter turns, then an in-plane `scale` and a `contrast` factor."""

    turns: int = 0
    flip: bool = False
    scale: float = 1.0
    contrast: float = 1.0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) slices seen through this view."""
        if self.contrast != 1.0:  # around each slice's mean: a milder or stronger contrast, same brightness
            mean = x.mean((-2, -1), keepdim=True)
            x = mean + (x - mean) * self.contrast
        if self.flip:
            x = x.flip(-1)
        x = torch.rot90(x, self.turns, (-2, -1))
        if self.scale != 1.0:
            size = [max(8, round(n * self.scale / 8) * 8) for n in x.shape[-2:]]  # the UNet needs multiples of 8
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    def invert(self, y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Per-pixel outputs (N, C, h, w) of the viewed slices mapped back onto the original grid `size`."""
        turned = size[::-1] if self.turns % 2 else size  # the grid the view was on before its scale
        if y.shape[-2:] != torch.Size(turned):
            y = F.interpolate(y, size=turned, mode="bilinear", align_corners=False)
        y = torch.rot90(y, -self.turns, (-2, -1))
        return y.flip(-1) if self.flip else y


def mean_probabilities(model: nn.Module, x: torch.Tensor, views: list[View]) -> torch.Tensor:
    """Softmax probabilities of `model` averaged over `views` of `x`, each mapped back to `x`'s grid."""
    size = tuple(x.shape[-2:])
    return torch.stack([view.invert(model(view.apply(x)).softmax(1), size) for view in views]).mean(0)
