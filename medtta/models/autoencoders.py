"""`unet-autoencoders`: the `unet` plus autoencoders of its input, of its encoder and decoder features at every
resolution and of its output, trained after it (He, Carass, Zuo, Dewey, Prince, "Autoencoder based
self-supervised test-time adaptation for medical image analysis", MedIA 2021; official code:
heyufan1995/self-domain-adapted-network, `models/basemodel.py` `def_AENet` and `opt_AENet`)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from monai.networks.layers import Norm
from monai.networks.nets import AutoEncoder
from torch import nn

from medtta.models.base import SourceVolume, Stage
from medtta.models.unet import FeatureTransform, UNetModel

AE_WIDTH = 64
"""He et al.'s `--ad` (`aenet_dim`): autoencoders of one map are 32-16-8 channels wide, of a pair of maps 64-32-16."""


def level_autoencoder(channels: int, paired: bool) -> nn.Module:
    """A MONAI 2D autoencoder shaped like He et al.'s (their `UNet(..., skip=False, isn=True)` in `def_AENet`): a
    full-resolution residual block, two 2x downsampling blocks with halving widths, and back, instance norm, PReLU."""
    top = AE_WIDTH if paired else AE_WIDTH // 2
    return AutoEncoder(spatial_dims=2, in_channels=channels, out_channels=channels, channels=(top, top // 2, top // 4),
                       strides=(1, 2, 2), num_res_units=2, norm=Norm.INSTANCE)


def reconstruct(autoencoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`autoencoder(x)` for any H, W: replicate-padded to a multiple of 4 (its two 2x levels), and to at least 8 (an
    InstanceNorm needs more than one pixel at its bottom), then cropped back."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (0, max(-w % 4, 8 - w), 0, max(-h % 4, 8 - h)), mode="replicate")
    return autoencoder(padded)[..., :h, :w]


class AutoencoderUNet(UNetModel):
    """`unet` + He et al.'s autoencoders (`models/basemodel.py`, `def_AENet`), trained after it on source slices.

    He et al. tap the input image, the encoder and decoder features of every resolution (concatenated per
    resolution, one autoencoder each) and the segmentation output (raw logits: their default, no `--segsoftmax`).
    Their test scripts weigh the levels 1,0,1,1,1,1 (`--wt`): the 0 is their full-resolution feature level, which
    the MONAI UNet does not have (its first block downsamples). Here, for the 16-32-64-128 UNet: the input, then
    encoder 16 + decoder 16 at 1/2, encoder 32 + decoder 32 at 1/4, encoder 64 + bottom 128 at 1/8 (He et al. pair
    their last encoder level with the bottleneck too), then the logits; every level weighs 1.

    Two stages take `ae_batch_slices` random slices of one source volume per Adam step, every slice once per
    epoch, as He et al.'s `train_*.sh` (`--batch-size=2`, 20 epochs of slices): the input and feature autoencoders
    (`ae_epochs`, here 30), then the output's (`ae_output_epochs`) on the frozen network's logits, computed once.
    He et al. train all levels together for the same epochs; the output's needs more: after 30 epochs it still
    reconstructed OCT logits poorly (training MSE 0.31), and at test time the feature adaptors then left the
    identity to make the logits easier to reconstruct, which cost the source site 0.2-0.3 Dice.
    """

    defaults: ClassVar[dict[str, Any]] = {"ae_epochs": 30, "ae_output_epochs": 90, "ae_lr": 1e-3,
                                          "ae_batch_slices": 2}

    def __init__(self, in_channels: int, n_classes: int, **config: Any) -> None:
        super().__init__(in_channels, n_classes, **config)
        *upper, last, bottom = self.channels
        paired = [*(2 * c for c in upper), last + bottom]  # encoder + decoder features of each resolution
        self.autoencoders = nn.ModuleList([level_autoencoder(in_channels, paired=False),
                                           *(level_autoencoder(c, paired=True) for c in paired)])
        self.output_autoencoder = level_autoencoder(n_classes, paired=False)

    def tapped_features(self, x: torch.Tensor, transform: FeatureTransform | None = None) -> list[torch.Tensor]:
        """What the autoencoders reconstruct, in their order: the input, then per resolution from 1/2 down to the
        bottom the encoder features concatenated with the decoder features of that resolution (the bottom block at
        1/8), then the logits (their last map). Encoder features are taken after `transform`, when given."""
        encoded = self.encode(x, transform)
        decoded = self.decoder_features(encoded)
        partners = [*reversed(decoded[:-1]), encoded[-1]]  # decoder outputs top-down, then the bottom block
        pairs = [torch.cat([e, d], dim=1) for e, d in zip(encoded[:-1], partners, strict=True)]
        return [x, *pairs, decoded[-1]]

    def reconstruction_losses(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Mean squared reconstruction error of each level's autoencoder (He et al.'s `AELoss`, `nn.MSELoss`)."""
        return mse_per_level([*self.autoencoders, self.output_autoencoder], features)

    def reconstruction_loss(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Sum over levels of the reconstruction errors (He et al.'s `opt_AENet` and `opt_ANet`, weights all 1)."""
        return torch.stack(self.reconstruction_losses(features)).sum()

    def post_training(self) -> list[Stage]:
        c, shared = self.config, ("ae_lr", "ae_batch_slices")
        return [Stage("autoencoders", self._autoencoder_loss, epochs=c["ae_epochs"], lr=c["ae_lr"],
                      config_keys=("ae_epochs", *shared), slices_per_batch=c["ae_batch_slices"]),
                Stage("output_autoencoder", self._output_loss, epochs=c["ae_output_epochs"], lr=c["ae_lr"],
                      config_keys=("ae_output_epochs", *shared), slices_per_batch=c["ae_batch_slices"],
                      prepare=self._logits)]

    def _autoencoder_loss(self, volumes: list[SourceVolume]) -> torch.Tensor:
        # Every slice, also those without foreground (He et al. skip those batches): at test time the
        # objective runs on every slice of a volume, so the autoencoders should know them all.
        with torch.no_grad():  # the segmentation network is frozen
            features = self.tapped_features(torch.cat([images for images, _ in volumes]))[:-1]
        return torch.stack(mse_per_level(list(self.autoencoders), features)).sum()

    def _logits(self, volume: SourceVolume) -> SourceVolume:
        images, labels = volume  # the network is frozen: its logits are computed once per volume
        return self(images), labels

    def _output_loss(self, volumes: list[SourceVolume]) -> torch.Tensor:
        logits = torch.cat([x for x, _ in volumes])
        return F.mse_loss(reconstruct(self.output_autoencoder, logits), logits)


def mse_per_level(autoencoders: list[nn.Module], features: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each autoencoder's mean squared error on its own feature map."""
    return [F.mse_loss(reconstruct(ae, f), f) for ae, f in zip(autoencoders, features, strict=True)]
