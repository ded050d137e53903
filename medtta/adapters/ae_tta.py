"""Autoencoder-based test-time adaptation (He, Carass, Zuo, Dewey, Prince, "Autoencoder based self-supervised
test-time adaptation for medical image analysis", MedIA 2021; official code: heyufan1995/self-domain-adapted-network,
`models/adapmodel.py`)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medtta.adapters.base import Adapter


class ImageAdaptor(nn.Module):
    """x + g(x), with g a 1x1 network (He et al.'s adpNet: 64 channels, LeakyReLU, instance norm) whose last conv
    starts at zero, so the adaptor starts as the identity (He et al. start from a random adpNet instead)."""

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.g = nn.Sequential(nn.Conv2d(1, channels, 1), nn.LeakyReLU(0.2), nn.InstanceNorm2d(channels),
                               nn.Conv2d(channels, channels, 1), nn.LeakyReLU(0.2), nn.InstanceNorm2d(channels),
                               nn.Conv2d(channels, 1, 1))
        nn.init.zeros_(self.g[-1].weight)
        nn.init.zeros_(self.g[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.g(x)


def identity_conv(channels: int) -> nn.Conv2d:
    """A 1x1 convolution initialized to the identity (He et al.'s feature adaptor)."""
    conv = nn.Conv2d(channels, channels, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels)[:, :, None, None])
        conv.bias.zero_()
    return conv


def orthogonality_penalty(weight: torch.Tensor) -> torch.Tensor:
    """SRIP (Bansal et al., NeurIPS 2018), as He et al. regularize their adaptors: the squared spectral norm of
    W W^T - I, estimated by one power iteration (from a fixed vector, so the loss is deterministic)."""
    w = weight.flatten(1)
    residual = w @ w.T - torch.eye(len(w), device=w.device)
    u = torch.full((len(w),), len(w) ** -0.5, device=w.device)
    v = F.normalize(residual.T @ u, dim=0, eps=1e-12)
    u = F.normalize(residual @ v, dim=0, eps=1e-12)
    return (u @ residual @ v) ** 2


class AutoencoderTTA(Adapter):
    """He et al. 2021: adapt 1x1 image and feature adaptors so that frozen source autoencoders reconstruct them.

    The image adaptor and the identity-initialized feature adaptors are all that changes; UNet and autoencoders
    stay frozen.

    Per volume: Adam (lr 1e-3) on the summed reconstruction errors plus the orthogonality penalty of the feature
    adaptors, gradients accumulated over the volume's batches (one update is one pass), up to `steps` passes
    (He et al.: 10); it stops when the loss rises and keeps the adaptors with the lowest loss. Continual: one
    update per batch, no reset.

    Hyper-parameters:
        lr: Adam learning rate (He et al.: 1e-3).
        ortho_weight: weight of the orthogonality penalty (He et al.: 1).
    """

    architecture: ClassVar[str] = "unet-autoencoders"
    paradigm: ClassVar[str] = "feature"
    defaults: ClassVar[dict[str, Any]] = {"lr": 1e-3, "ortho_weight": 1.0}
    default_steps: ClassVar[int] = 10
    logits_in_objective: ClassVar[bool] = False

    def configure(self, model: nn.Module) -> None:
        super().configure(model)
        self.image_adaptor = ImageAdaptor()
        levels = len(model.autoencoders) - 1  # the autoencoders beyond the input's tap encoder levels 0, 1, ...
        self.feature_adaptors = nn.ModuleList(identity_conv(c) for c in model.channels[:levels])

    def collect_params(self, model: nn.Module) -> list[nn.Parameter]:
        return [*self.image_adaptor.parameters(), *self.feature_adaptors.parameters()]

    def _adapt_features(self, level: int, features: torch.Tensor) -> torch.Tensor:
        return self.feature_adaptors[level](features) if level < len(self.feature_adaptors) else features

    def objective(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        features = self.model.tapped_features(self.image_adaptor(x), self._adapt_features)
        penalty = sum(orthogonality_penalty(a.weight) for a in self.feature_adaptors)
        return self.model.reconstruction_loss(features) + self.hparams["ortho_weight"] * penalty, None

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.decode(self.model.encode(self.image_adaptor(x), self._adapt_features))

    def adapt(self, x: torch.Tensor, steps: int, batch_size: int) -> None:
        best_loss, best_state = float("inf"), None
        for _ in range(steps):
            state = {k: v.clone() for k, v in self.state_dict().items() if not k.startswith("model.")}
            loss = self.accumulate(x, batch_size, lambda _, b: self.objective(b)[0])
            if loss > best_loss:  # early stopping: back to the adaptors before the last update
                self.load_state_dict(best_state, strict=False)
                self.optimizer.zero_grad(set_to_none=True)
                return
            best_loss, best_state = loss, state
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
