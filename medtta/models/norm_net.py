"""`unet-normalizer`: Karani et al.'s normalization sub-network in front of the UNet, and a denoising
autoencoder of label volumes as the shape prior (Karani, Erdil, Chaitanya, Konukoglu, "Test-time adaptable
neural networks for robust medical image segmentation", MedIA 2021; official TensorFlow code:
neerakara/test-time-adaptable-neural-networks-for-domain-generalization, `model_zoo.py`, `utils_masks.py`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.layers import Norm
from monai.networks.nets import UNet
from torch import nn

from medtta.models.base import SourceVolume, Stage
from medtta.models.unet import UNetModel


class Gaussian(torch.autograd.Function):
    """exp(-(x/s)^2) saving only x/s and the output: autograd's composition keeps an intermediate per operation,
    and at full resolution N's activations cost as much as its convolutions."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        z = x / scale
        y = torch.exp(-z * z)
        ctx.save_for_backward(z, scale, y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, scale, y = ctx.saved_tensors
        grad_z = grad * y * z * -2
        grad_scale = (grad_z * z / -scale).sum(dim=[d for d in range(z.dim()) if scale.shape[d] == 1], keepdim=True)
        return grad_z / scale, grad_scale


class GaussianActivation(nn.Module):
    """exp(-x^2 / s^2) with a learnable scale s per channel, initialized around 0.2 (Karani's 'rbf')."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(1, channels, 1, 1) * 0.05 + 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Gaussian.apply(x, self.scale)


class Normalizer(nn.Module):
    """N: two hidden 3x3 convs (16 channels, bias, no BatchNorm) with Gaussian activations, then a 16 -> 1 conv
    whose output is added to the image (x + delta)."""

    def __init__(self, channels: int = 16, hidden_layers: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 1
        for _ in range(hidden_layers):
            layers += [nn.Conv2d(in_channels, channels, 3, padding=1), GaussianActivation(channels)]
            in_channels = channels
        layers.append(nn.Conv2d(in_channels, 1, 3, padding=1))
        self.delta = nn.Sequential(*layers).to(memory_format=torch.channels_last)  # oneDNN's faster layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.delta(x)


def to_prior_grid(probabilities: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """(slices, C, H, W) class probabilities of one volume -> (1, C, D, h, w) on the DAE's fixed 3D grid."""
    volume = probabilities.permute(1, 0, 2, 3).unsqueeze(0)
    return F.interpolate(volume, size=size, mode="trilinear", align_corners=False)


def from_prior_grid(volume: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """(1, C, D, h, w) -> (slices, C, H, W), the inverse of `to_prior_grid`."""
    return F.interpolate(volume, size=shape, mode="trilinear", align_corners=False)[0].permute(1, 0, 2, 3)


def squares_jigsaw(onehot: torch.Tensor, max_boxes: int, max_radius: int, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """Karani's 'squares jigsaw' corruption of (B, C, D, H, W) one-hot label volumes: in each volume, a random
    number of boxes (half-side up to `max_radius` in-plane, scaled to the depth) take the labels of another
    random box of the same volume."""
    out = onehot.clone()
    depth, height, width = onehot.shape[2:]

    def randint(low: int, high: int) -> int:
        return int(torch.randint(low, max(high, low + 1), (1,), generator=generator))

    for b in range(len(onehot)):
        for _ in range(randint(1, max_boxes + 1)):
            r = randint(1, max_radius + 1)
            rz = max(1, round(r * depth / height))
            size = (min(2 * rz, depth), min(2 * r, height), min(2 * r, width))
            dst = [randint(0, n - s + 1) for n, s in zip((depth, height, width), size, strict=True)]
            src = [randint(0, n - s + 1) for n, s in zip((depth, height, width), size, strict=True)]
            box = tuple(slice(o, o + s) for o, s in zip(dst, size, strict=True))
            from_box = tuple(slice(o, o + s) for o, s in zip(src, size, strict=True))
            out[(b, slice(None), *box)] = onehot[(b, slice(None), *from_box)]
    return out


class LabelDAE(nn.Module):
    """Denoising autoencoder of label volumes: a small MONAI 3D UNet whose full-resolution level has no skip
    connection (MONAI's first block is strided), as Karani's DAE has none at its first layer."""

    def __init__(self, n_classes: int, channels: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.net = UNet(spatial_dims=3, in_channels=n_classes, out_channels=n_classes, channels=channels,
                        strides=(2,) * (len(channels) - 1), num_res_units=1, norm=Norm.INSTANCE)

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Denoised class probabilities of (B, C, D, H, W) class probabilities."""
        return self.net(probabilities).softmax(1)


class NormalizerUNet(UNetModel):
    """`unet` behind Karani's normalization sub-network, trained jointly, + a DAE of label volumes (trained after).

    The denoising autoencoder of source label volumes is the shape prior `norm-net` adapts towards at test time.
    """

    defaults: ClassVar[dict[str, Any]] = {
        "prior_size": (16, 64, 64),  # the DAE's 3D grid (depth, height, width)
        "dae_epochs": 30, "dae_lr": 3e-3,  # validation loss 0.116 against 0.110 with 60 at 1e-3, at half the time
        "jigsaw_boxes": 12, "jigsaw_radius": 6,  # Karani: 200 boxes of half-side <= 10 on 64x256x256
    }

    def __init__(self, in_channels: int, n_classes: int, **config: Any) -> None:
        super().__init__(in_channels, n_classes, **config)
        self.normalizer = Normalizer()
        self.dae = LabelDAE(n_classes)
        self._dice = DiceLoss(include_background=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.normalizer(x))

    def parts(self) -> dict[str, list[nn.Parameter]]:
        return {**super().parts(), "normalizer": list(self.normalizer.parameters())}

    def prior_size(self) -> tuple[int, int, int]:
        return tuple(self.config["prior_size"])

    def denoise(self, probabilities: torch.Tensor) -> torch.Tensor:
        """The DAE's shape-prior version of one volume's (slices, C, H, W) probabilities, at the same size."""
        grid = to_prior_grid(probabilities, self.prior_size())
        return from_prior_grid(self.dae(grid), (len(probabilities), *probabilities.shape[2:]))

    def post_training(self) -> list[Stage]:
        c = self.config
        return [Stage("dae", self._dae_loss, epochs=c["dae_epochs"], lr=c["dae_lr"], config_keys=tuple(self.defaults))]

    def _dae_loss(self, volumes: list[SourceVolume]) -> torch.Tensor:
        """Dice loss of the DAE reconstructing clean label volumes from jigsaw-corrupted ones."""
        size = self.prior_size()
        clean = torch.cat([to_prior_grid(F.one_hot(labels, self.n_classes).permute(0, 3, 1, 2).float(), size)
                           for _, labels in volumes])
        noisy = squares_jigsaw(clean, self.config["jigsaw_boxes"], self.config["jigsaw_radius"])
        return self._dice(self.dae(noisy), clean)
