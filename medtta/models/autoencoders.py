"""`unet-autoencoders`: the `unet` plus autoencoders of its frozen source features at several levels, trained
after it (He et al., "Autoencoder based self-supervised test-time adaptation for medical image analysis",
MedIA 2021; official code: heyufan1995/self-domain-adapted-network, `models/basemodel.py`)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from monai.networks.layers import Norm
from monai.networks.nets import AutoEncoder
from torch import nn

from medtta.models.base import SourceVolume, Stage
from medtta.models.unet import FeatureTransform, UNetModel


def level_autoencoder(channels: int) -> nn.Module:
    """A MONAI 2D convolutional autoencoder (two strided levels, instance norm, no skips) for `channels` maps."""
    hidden = (max(16, channels), max(32, 2 * channels))
    return AutoEncoder(spatial_dims=2, in_channels=channels, out_channels=channels, channels=hidden, strides=(2, 2),
                       num_res_units=1, norm=Norm.INSTANCE)


class AutoencoderUNet(UNetModel):
    """`unet` + autoencoders of its input and first two encoder levels, trained after it (He et al. 2021).

    He et al. tap the input and the encoder and decoder features of every level; we tap the input and encoder
    levels 0 and 1, where the adaptors sit.
    """

    defaults: ClassVar[dict[str, Any]] = {"ae_epochs": 30, "ae_lr": 1e-3}

    def __init__(self, in_channels: int, n_classes: int, **config: Any) -> None:
        super().__init__(in_channels, n_classes, **config)
        self.autoencoders = nn.ModuleList(level_autoencoder(c) for c in (in_channels, *self.channels[:-2]))

    def tapped_features(self, x: torch.Tensor, transform: FeatureTransform | None = None) -> list[torch.Tensor]:
        """The input and the encoder features the autoencoders reconstruct (after `transform`, when given)."""
        return [x, *self.encode(x, transform)[: len(self.autoencoders) - 1]]

    def reconstruction_loss(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Sum over levels of the mean squared reconstruction error of each level's autoencoder."""
        return sum(((ae(f) - f) ** 2).mean() for ae, f in zip(self.autoencoders, features, strict=True))

    def post_training(self) -> list[Stage]:
        return [Stage("autoencoders", self._autoencoder_loss, epochs=self.config["ae_epochs"],
                      lr=self.config["ae_lr"], config_keys=("ae_epochs", "ae_lr"))]

    def _autoencoder_loss(self, volumes: list[SourceVolume]) -> torch.Tensor:
        with torch.no_grad():  # the segmentation network is frozen
            features = self.tapped_features(torch.cat([images for images, _ in volumes]))
        return self.reconstruction_loss(features)
