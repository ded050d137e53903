"""Augmented views of a batch of slices (or of 3D volumes and patches) and their inverses, for methods that average
predictions over views (test-time augmentation, CoTTA's teacher) or compare them (DG-TTA)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medtta.protocol import DIVISOR


def spatial(x: torch.Tensor) -> tuple[int, ...]:
    """The spatial axes of a (N, C, H, W) or (N, C, D, H, W) batch."""
    return tuple(range(2, x.dim()))


def _resized(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear" if x.dim() == 4 else "trilinear", align_corners=False)


@dataclass(frozen=True)
class View:
    """Flips of the spatial axes `flips` (counted from the end: -1 left-right, -2 up-down, -3 along depth), then
    `turns` in-plane quarter turns, then a `scale` of every spatial axis, a `contrast` factor and a `gamma`."""

    turns: int = 0
    flips: tuple[int, ...] = ()
    scale: float = 1.0
    contrast: float = 1.0
    gamma: float = 1.0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) slices, or (N, C, D, H, W) volumes, seen through this view."""
        if self.contrast != 1.0:  # around each image's mean: a milder or stronger contrast, same brightness
            mean = x.mean(spatial(x), keepdim=True)
            x = mean + (x - mean) * self.contrast
        if self.gamma != 1.0:  # each image's range mapped by a power (nnU-Net's gamma): non-linear, so a per-image
            low, high = x.amin(spatial(x), keepdim=True), x.amax(spatial(x), keepdim=True)  # normalization keeps it
            span = (high - low).clamp_min(1e-8)
            x = low + span * ((x - low) / span) ** self.gamma
        if self.flips:
            x = x.flip(self.flips)
        x = torch.rot90(x, self.turns, (-2, -1))
        if self.scale != 1.0:  # the UNet needs multiples of 8
            x = _resized(x, tuple(max(DIVISOR, round(n * self.scale / DIVISOR) * DIVISOR) for n in x.shape[2:]))
        return x

    def invert(self, y: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        """Per-pixel outputs (N, C, ...) of the viewed images mapped back onto the original grid `size`."""
        turned = (*size[:-2], size[-1], size[-2]) if self.turns % 2 else tuple(size)  # the grid before the scale
        if tuple(y.shape[2:]) != turned:
            y = _resized(y, turned)
        y = torch.rot90(y, -self.turns, (-2, -1))
        return y.flip(self.flips) if self.flips else y


def all_flips(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every combination of flips of the spatial axes: 4 in 2D, 8 in 3D (the identity first)."""
    axes = tuple(range(-spatial_dims, 0))
    return [combo for k in range(spatial_dims + 1) for combo in itertools.combinations(axes, k)]


@dataclass(frozen=True, eq=False)
class AffineView:
    """An affine warp per slice or volume: `theta` (N, d, d + 1), d the spatial dimensions, maps each pixel of the
    view, in `F.affine_grid`'s normalized coordinates, to where it samples the image. `invert` samples with the
    exact inverse matrix, so outputs land back on the image's own pixels; `seen` says which of those pixels the view
    kept."""

    theta: torch.Tensor

    @classmethod
    def random(cls, n: int, strength: float, device: torch.device | None = None, spatial_dims: int = 2) -> AffineView:
        """The identity plus Gaussian noise of standard deviation `strength` on every entry: a small rotation,
        scaling, shear and translation at once (DG-TTA's `get_rand_affine`, 3D in the official code)."""
        d = spatial_dims
        return cls(torch.eye(d, d + 1, device=device) + strength * torch.randn(n, d, d + 1, device=device))

    def inverse(self) -> torch.Tensor:
        """(N, d, d + 1): the inverse map, from the image's coordinates to the view's."""
        n, d = self.theta.shape[:2]
        last_row = F.one_hot(torch.tensor(d, device=self.theta.device), d + 1).to(self.theta.dtype).expand(n, 1, d + 1)
        return torch.linalg.inv(torch.cat([self.theta, last_row], 1))[:, :d]

    @staticmethod
    def _warp(x: torch.Tensor, theta: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        grid = F.affine_grid(theta.to(x.dtype), [len(x), x.shape[1], *size], align_corners=False)
        return F.grid_sample(x, grid, padding_mode="border", align_corners=False)  # border: no black corners

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, ...) slices or volumes seen through the warp, on the same grid."""
        return self._warp(x, self.theta, tuple(x.shape[2:]))

    def invert(self, y: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        """Per-pixel outputs (N, C, ...) of the warped images mapped back onto the images' grid `size`; where the
        view did not reach (outside `seen`) the view's edge is repeated."""
        return self._warp(y, self.inverse(), size)

    def seen(self, size: tuple[int, ...]) -> torch.Tensor:
        """(N, 1, ...) True where a pixel of the image maps inside the view's outermost pixel centres, so that
        `invert` interpolates real outputs there and not the repeated edge."""
        grid = F.affine_grid(self.inverse(), [len(self.theta), 1, *size], align_corners=False)
        limit = 1 - 1 / torch.tensor(size[::-1], device=grid.device) + 1e-5  # the grid is (x, y[, z]): last axis first
        return (grid.abs() <= limit).all(-1).unsqueeze(1)


def mean_probabilities(model: nn.Module, x: torch.Tensor, views: list[View]) -> torch.Tensor:
    """Softmax probabilities of `model` averaged over `views` of `x`: each view's logits are mapped back to `x`'s
    grid, then the softmax is taken (mmseg's order, which CoTTA's official code inherits)."""
    size = tuple(x.shape[2:])
    return torch.stack([view.invert(model(view.apply(x)), size).softmax(1) for view in views]).mean(0)


def perturb_intensity(x: torch.Tensor, contrast: float, noise: float) -> torch.Tensor:
    """(N, C, H, W) slices (or volumes), each at a random contrast in [1 - `contrast`, 1 + `contrast`] around its
    mean, plus Gaussian noise of `noise` times its standard deviation: an intensity-only augmentation, so that
    predictions on it stay on the image's own grid. Draws from torch's global generator."""
    mean = x.mean(spatial(x), keepdim=True)
    std = x.std(spatial(x), keepdim=True)
    factor = 1 + contrast * (2 * torch.rand(len(x), *([1] * (x.dim() - 1)), device=x.device) - 1)
    return mean + (x - mean) * factor + noise * std * torch.randn_like(x)
