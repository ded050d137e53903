"""`unet`: the MONAI 2D UNet every UNet-family architecture keeps as its backbone, run as encoder and decoder."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from monai.networks.layers import Norm
from monai.networks.nets import UNet
from torch import nn

from medtta.models.base import Architecture, batchnorm_params, params_of

FeatureTransform = Callable[[int, torch.Tensor], torch.Tensor]


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
    """MONAI 2D UNet with BatchNorm: 4 levels (16-128 channels), 2 residual units per level (the `unet` backbone).

    `encode` returns the features of every encoder level (the last is the bottleneck, 1/8 of the input size)
    and `decode` maps them to logits, so auxiliary heads and adaptors can tap the levels; `forward` equals
    MONAI's own forward.
    """

    defaults: ClassVar[dict[str, Any]] = {}
    channels: ClassVar[tuple[int, ...]] = (16, 32, 64, 128)

    def __init__(self, in_channels: int, n_classes: int, **config: Any) -> None:
        super().__init__(in_channels, n_classes, **config)
        self.backbone = UNet(spatial_dims=2, in_channels=in_channels, out_channels=n_classes, channels=self.channels,
                             strides=(2,) * (len(self.channels) - 1), num_res_units=2, norm=Norm.BATCH)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def parts(self) -> dict[str, list[nn.Parameter]]:
        return {"norm": batchnorm_params(self.backbone), "encoder": params_of(self.encoder_blocks),
                "decoder": params_of(self.decoder_blocks)}
