"""Augmented views of a batch of slices and their inverses, for methods that average predictions over views
(test-time augmentation, CoTTA's teacher) or compare them (DG-TTA)."""

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


@dataclass(frozen=True, eq=False)
class AffineView:
    """A 2D affine warp per slice: `theta` (N, 2, 3) maps each pixel of the view, in `F.affine_grid`'s normalized
    coordinates, to where it samples the slice. `invert` samples with the exact inverse matrix, so outputs land
    back on the slice's own pixels; `seen` says which of those pixels the view kept."""

    theta: torch.Tensor

    @classmethod
    def random(cls, n: int, strength: float, device: torch.device | None = None) -> AffineView:
        """The identity plus Gaussian noise of standard deviation `strength` on every entry: a small rotation,
        scaling, shear and translation at once (DG-TTA's `get_rand_affine`, in 2D)."""
        return cls(torch.eye(2, 3, device=device) + strength * torch.randn(n, 2, 3, device=device))

    def inverse(self) -> torch.Tensor:
        """(N, 2, 3): the inverse map, from the slice's coordinates to the view's."""
        last_row = torch.tensor([0.0, 0.0, 1.0], device=self.theta.device).expand(len(self.theta), 1, 3)
        return torch.linalg.inv(torch.cat([self.theta, last_row], 1))[:, :2]

    @staticmethod
    def _warp(x: torch.Tensor, theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        grid = F.affine_grid(theta.to(x.dtype), [len(x), x.shape[1], *size], align_corners=False)
        return F.grid_sample(x, grid, padding_mode="border", align_corners=False)  # border: no black corners

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) slices seen through the warp, on the same grid."""
        return self._warp(x, self.theta, tuple(x.shape[-2:]))

    def invert(self, y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Per-pixel outputs (N, C, h, w) of the warped slices mapped back onto the slices' grid `size`; where the
        view did not reach (outside `seen`) the view's edge is repeated."""
        return self._warp(y, self.inverse(), size)

    def seen(self, size: tuple[int, int]) -> torch.Tensor:
        """(N, 1, H, W) True where a pixel of the slice maps inside the view's outermost pixel centres, so that
        `invert` interpolates real outputs there and not the repeated edge."""
        grid = F.affine_grid(self.inverse(), [len(self.theta), 1, *size], align_corners=False)
        limit = torch.tensor([1 - 1 / size[1], 1 - 1 / size[0]], device=grid.device) + 1e-5  # grid is (x, y)
        return (grid.abs() <= limit).all(-1).unsqueeze(1)


def mean_probabilities(model: nn.Module, x: torch.Tensor, views: list[View]) -> torch.Tensor:
    """Softmax probabilities of `model` averaged over `views` of `x`: each view's logits are mapped back to `x`'s
    grid, then the softmax is taken (mmseg's order, which CoTTA's official code inherits)."""
    size = tuple(x.shape[-2:])
    return torch.stack([view.invert(model(view.apply(x)), size).softmax(1) for view in views]).mean(0)


def perturb_intensity(x: torch.Tensor, contrast: float, noise: float) -> torch.Tensor:
    """(N, C, H, W) slices, each at a random contrast in [1 - `contrast`, 1 + `contrast`] around its mean, plus
    Gaussian noise of `noise` times its standard deviation: an intensity-only augmentation, so that predictions on
    it stay on the slice's own grid. Draws from torch's global generator."""
    mean = x.mean((-2, -1), keepdim=True)
    std = x.std((-2, -1), keepdim=True)
    factor = 1 + contrast * (2 * torch.rand(len(x), *([1] * (x.dim() - 1)), device=x.device) - 1)
    return mean + (x - mean) * factor + noise * std * torch.randn_like(x)
