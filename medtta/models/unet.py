"""`unet`: the MONAI UNet every UNet-family architecture keeps as its backbone, run as encoder and decoder; 2D on
slices or 3D on volumes (`spatial_dims`), with BatchNorm, InstanceNorm or GroupNorm (`norm`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch
from monai.networks.layers import Norm
from monai.networks.nets import UNet
from torch import nn

from medtta.errors import RegistryError
from medtta.models.base import Architecture, norm_params, params_of
from medtta.models.dg_augment import source_augmentation
from medtta.models.volumetric import Window, sliding_window_logits, window_statistics

FeatureTransform = Callable[[int, torch.Tensor], torch.Tensor]
GROUPS = 8


class GroupNorm8(nn.GroupNorm):
    """GroupNorm with 8 groups (Wu & He's setting Sun et al. use), fewer where the channels do not divide: MONAI's UNet
    also normalizes its last up-convolution, of as many channels as classes."""

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(math.gcd(GROUPS, num_channels), num_channels, eps, affine)


if "GROUP8" not in Norm.names:
    Norm.add_factory_callable("GROUP8", lambda dims: GroupNorm8)
NORMS = {"batch": Norm.BATCH, "instance": (Norm.INSTANCE, {"affine": True}), "group": "GROUP8"}


def _levels(unet: UNet) -> tuple[list[nn.Module], list[nn.Module]]:
    """MONAI nests its UNet as Sequential(down, SkipConnection(Sequential(...)), up) down to the bottom block:
    unroll it into encoder blocks (top to bottom) and decoder blocks (bottom to top)."""
    encoder, decoder = [], []
    level = unet.model
    while True:
        down, skip, up = level
        encoder.append(down)
        decoder.insert(0, up)
        inner = skip.submodule
        if not isinstance(inner, nn.Sequential):
            encoder.append(inner)  # the bottom block
            return encoder, decoder
        level = inner


class UNetModel(Architecture):
    """MONAI UNet: 4 levels (16-128 channels), 2 residual units per level (the `unet` backbone); 2D on slices or 3D
    on volumes (`spatial_dims`); BatchNorm by default, InstanceNorm (affine) or GroupNorm (8 groups) with `norm`.
    `source_aug=gin|gin-ipa` trains it with DG pre-training (`medtta.models.dg_augment`).

    `encode` returns the features of every encoder level (the last is the bottleneck, 1/8 of the input size)
    and `decode` maps them to logits, so auxiliary heads and adaptors can tap the levels; `logits` equals
    MONAI's own forward. A 3D model given its training `window` (`use_window`) runs `forward` on a volume of
    another shape by sliding windows (`medtta.models.volumetric`).
    """

    defaults: ClassVar[dict[str, Any]] = {"spatial_dims": 2, "norm": "batch", "source_aug": "none"}
    channels: ClassVar[tuple[int, ...]] = (16, 32, 64, 128)

    def __init__(self, in_channels: int, n_classes: int, **config: Any) -> None:
        super().__init__(in_channels, n_classes, **config)
        dims, norm = self.config.get("spatial_dims", 2), self.config.get("norm", "batch")
        if dims not in (2, 3):
            raise RegistryError(f"architecture config spatial_dims must be 2 or 3, got {dims!r}")
        if norm not in NORMS:
            raise RegistryError(f"architecture config norm must be one of {', '.join(NORMS)}, got {norm!r}")
        source_augmentation(self.config.get("source_aug", "none"))  # an unknown name fails here, naming the known
        self.spatial_dims = dims
        self.window: Window | None = None
        self.backbone = UNet(spatial_dims=dims, in_channels=in_channels, out_channels=n_classes, channels=self.channels,
                             strides=(2,) * (len(self.channels) - 1), num_res_units=2, norm=NORMS[norm])
        # plain lists: the blocks stay registered once, under `backbone`
        self.encoder_blocks, self.decoder_blocks = _levels(self.backbone)

    def encode(self, x: torch.Tensor, transform: FeatureTransform | None = None) -> list[torch.Tensor]:
        """Features of each encoder level; `transform(level, features)` may change them on the way down."""
        features = []
        for level, block in enumerate(self.encoder_blocks):
            x = block(x)
            if transform is not None:
                x = transform(level, x)
            features.append(x)
        return features

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.decoder_features(features)[-1]

    def decoder_features(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The output of every decoder block, bottom to top (as `decode` runs them); the last is the logits."""
        x, outputs = features[-1], []
        for skip, block in zip(reversed(features[:-1]), self.decoder_blocks, strict=True):
            x = block(torch.cat([skip, x], dim=1))
            outputs.append(x)
        return outputs

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The network on one input as it is (a batch of slices or of patches)."""
        return self.decode(self.encode(x))

    def use_window(self, window: Window | None) -> None:
        """The 3D patch the network was trained on: `forward` slides it over volumes of any other shape."""
        self.window = window if self.spatial_dims == 3 else None

    def window_statistics(self, x: torch.Tensor) -> AbstractContextManager[None]:
        """Inside, its test-batch-statistics layers normalize with those of the sliding windows of the volume `x`
        (`medtta.models.volumetric.window_statistics`): patch updates then see what predictions see."""
        return window_statistics(self, self.logits, x, self.window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.window is not None and tuple(x.shape[2:]) != self.window:
            return sliding_window_logits(self, self.logits, x, self.window)
        return self.logits(x)

    def parts(self) -> dict[str, list[nn.Parameter]]:
        return {"norm": norm_params(self.backbone), "encoder": params_of(self.encoder_blocks),
                "decoder": params_of(self.decoder_blocks)}
