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


class GaussianBump(torch.autograd.Function):
    """exp(-z^2), saving z and the output, in three passes over the tensor forward and three backward: autograd's
    composition takes more, each allocating, and at full resolution N's activations cost as much as its convs."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor) -> torch.Tensor:
        y = torch.mul(z, z).neg_().exp_()
        ctx.save_for_backward(z, y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        z, y = ctx.saved_tensors
        return torch.mul(grad, y).mul_(z).mul_(-2)


class GaussianActivation(nn.Module):
    """exp(-x^2 / s^2) with a learnable scale s per channel, initialized around 0.2 (Karani's 'rbf').

    `Normalizer` does not call it on a conv's output: it folds 1/s into the conv's weight and bias instead."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(1, channels, 1, 1) * 0.05 + 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return GaussianBump.apply(x / self.scale)


class Normalizer(nn.Module):
    """N: two hidden 3x3 convs (16 channels, bias, no BatchNorm) with Gaussian activations, then a 16 -> 1 conv
    whose output is added to the image (x + delta).

    Each activation's scale is folded into the conv before it, conv(h; W, b) / s = conv(h; W/s, b/s): the same
    function and parameters (and the scale's gradient reaches it through the small weight tensors), with no division
    and no scale-gradient reduction at full resolution, where N's elementwise work cost as much as its convs."""

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
        *hidden, last = self.delta
        h = x
        for conv, activation in zip(hidden[::2], hidden[1::2], strict=True):
            inverse = 1 / activation.scale.flatten()
            h = GaussianBump.apply(F.conv2d(h, conv.weight * inverse[:, None, None, None], conv.bias * inverse,
                                            padding=conv.padding))
        return x + last(h)


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
    connection (MONAI's first block is strided), as Karani's DAE has none at its first layer.

    It denoises on a fixed 3D `grid` (depth, height, width), a buffer so that the checkpoint that holds the weights
    holds the grid they were trained on; each side must be a multiple of `factor` to pass the strided levels."""

    def __init__(self, n_classes: int, grid: tuple[int, int, int], channels: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.net = UNet(spatial_dims=3, in_channels=n_classes, out_channels=n_classes, channels=channels,
                        strides=(2,) * (len(channels) - 1), num_res_units=1, norm=Norm.INSTANCE)
        self.factor = 2 ** (len(channels) - 1)
        self.register_buffer("grid", torch.tensor(grid))

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Denoised class probabilities of (B, C, D, H, W) class probabilities."""
        return self.net(probabilities).softmax(1)


class NormalizerUNet(UNetModel):
    """`unet` behind Karani's normalization sub-network, trained jointly, + a DAE of label volumes (trained after).

    The denoising autoencoder of source label volumes is the shape prior `norm-net` adapts towards at test time.
    """

    defaults: ClassVar[dict[str, Any]] = {
        "prior_size": (16, 64, 64),  # the DAE's largest 3D grid (depth, height, width), see `_fit_grid`
        # synth-mri, 8x64x64 grid, foreground Dice loss on val: 0.102 at 1e-2, 0.111 at 3e-3 (0.374 at 3e-3 with the
        # foreground-only loss: the DAE learnt its last class after 40 epochs); 0.116 on the former 16x64x64 grid
        "dae_epochs": 30, "dae_lr": 1e-2,
        "jigsaw_boxes": 12, "jigsaw_radius": 6,  # Karani: 200 boxes of half-side <= 10 on 64x256x256
    }

    def __init__(self, in_channels: int, n_classes: int, **config: Any) -> None:
        super().__init__(in_channels, n_classes, **config)
        self.normalizer = Normalizer()
        self.dae = LabelDAE(n_classes, tuple(self.config["prior_size"]))
        # Karani's DAE loss is 1 - the mean Dice over every label, background included. Over the foreground alone,
        # a class absent from many volumes is cheapest predicted nowhere: in 30 epochs the DAE never learned
        # synth-ct's spleen nor synth-oct's IRF (hard Dice 0.04 and 0.02; 0.93 and 0.91 with the background).
        self._dice = DiceLoss(include_background=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.normalizer(x))

    def parts(self) -> dict[str, list[nn.Parameter]]:
        return {**super().parts(), "normalizer": list(self.normalizer.parameters())}

    def prior_size(self) -> tuple[int, int, int]:
        """The DAE's 3D grid: `prior_size` until the DAE is trained, then what `_fit_grid` chose."""
        return tuple(self.dae.grid.tolist())

    def denoise(self, probabilities: torch.Tensor) -> torch.Tensor:
        """The DAE's shape-prior version of one volume's (slices, C, H, W) probabilities, at the same size."""
        grid = to_prior_grid(probabilities, self.prior_size())
        return from_prior_grid(self.dae(grid), (len(probabilities), *probabilities.shape[2:]))

    def post_training(self) -> list[Stage]:
        c = self.config
        return [Stage("dae", self._dae_loss, epochs=c["dae_epochs"], lr=c["dae_lr"], config_keys=tuple(self.defaults),
                      setup=self._fit_grid, prepare=self._label_grid)]

    def _fit_grid(self, volumes: list[SourceVolume]) -> dict[str, Any]:
        """Cap each side of `prior_size` at the smallest source label volume's (slices, height, width), rounded down
        to a multiple of the DAE's `factor`, so that the DAE never learns from a label volume upsampled: Karani's
        downsamples the volumes (256 slices to 64), and upsampled slices are interpolated work, not shape."""
        smallest = [min(sizes) for sizes in zip(*(labels.shape for _, labels in volumes), strict=True)]
        f = self.dae.factor
        grid = [min(size, max(f, n // f * f)) for size, n in zip(self.config["prior_size"], smallest, strict=True)]
        self.dae.grid.copy_(torch.tensor(grid))
        return {"grid": grid}

    def _label_grid(self, volume: SourceVolume) -> torch.Tensor:
        """A source volume's one-hot labels on the DAE's grid, (1, C, D, h, w): computed once per volume."""
        onehot = F.one_hot(volume[1], self.n_classes).permute(0, 3, 1, 2).float()
        return to_prior_grid(onehot, self.prior_size())

    def _dae_loss(self, grids: list[torch.Tensor]) -> torch.Tensor:
        """Dice loss (every label) of the DAE reconstructing clean label grids (`_label_grid`) from jigsaw-corrupted
        ones."""
        clean = torch.cat(grids)
        noisy = squares_jigsaw(clean, self.config["jigsaw_boxes"], self.config["jigsaw_radius"])
        return self._dice(self.dae(noisy), clean)
