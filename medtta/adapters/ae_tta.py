"""Autoencoder-based test-time adaptation (He, Carass, Zuo, Dewey, Prince, "Autoencoder based self-supervised
test-time adaptation for medical image analysis", MedIA 2021; official code: heyufan1995/self-domain-adapted-network,
`models/adapmodel.py` (the adaptors), `models/basemodel.py` (`opt_ANet`, the objective) and `train.py` (the
test-time schedule))."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from medtta.adapters.base import Adapter

EPS = 1e-5  # InstanceNorm's: the adaptor's output moments and the slice moments it restores use the same


def slice_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slice, per-channel mean and standard deviation (as InstanceNorm computes them) of (N, C, H, W) `x`."""
    var, mean = torch.var_mean(x, dim=(-2, -1), keepdim=True, correction=0)
    return mean, torch.sqrt(var + EPS)


class ImageAdaptor(nn.Module):
    """He et al.'s image adaptor (`adpNet` of `ANet`, `models/adapmodel.py`), its output put back on the input's scale.

    `adpNet` is three 1x1 convolutions, 1 -> 64 -> 64 -> 1 channels, each followed by LeakyReLU(0.2) and then
    InstanceNorm (no affine), Kaiming-normal weights and zero biases drawn from seed 0 (`init_weights`). Its output is
    every slice z-scored: He et al.'s slices were z-scored one by one (`datasets/transform.py`, `_normalize_worker`),
    so that was the network's input space. Ours are z-scored per volume (MR), windowed (CT) or min-max scaled (OCT),
    so each output slice is mapped back to the mean and standard deviation of its input slice: like He et al.'s,
    the adaptor can reshape a slice's intensity curve but never change its mean or contrast (the residual adaptor
    it replaces collapsed the contrast to please the autoencoders).

    The start is not the identity (no fixed weights make this stack of InstanceNorms one): it is a random
    per-pixel intensity curve, which `AutoencoderTTA` first fits to the identity on each volume (He et al.'s
    "stable" epochs).
    """

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        widths = [(1, channels), (channels, channels), (channels, 1)]
        self.net = nn.Sequential(*(Convolution(spatial_dims=2, in_channels=a, out_channels=b, kernel_size=1,
                                               act=("leakyrelu", {"negative_slope": 0.2}), norm="instance",
                                               adn_ordering="AN") for a, b in widths))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He et al.'s `init_weights`: Kaiming-normal weights, zero biases, from seed 0 (without touching the
        global random state)."""
        generator = torch.Generator().manual_seed(0)
        for block in self.net:
            nn.init.kaiming_normal_(block.conv.weight, generator=generator)
            nn.init.zeros_(block.conv.bias)

    def standardized(self, x: torch.Tensor) -> torch.Tensor:
        """He et al.'s `adpNet(x)`: every slice with zero mean and unit standard deviation."""
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = slice_moments(x)
        return self.standardized(x) * std + mean

    def identity_loss(self, x: torch.Tensor) -> torch.Tensor:
        """He et al.'s "stable" loss (`opt_ANet(stable=True)`): MSE between the adaptor's output and its input,
        both as z-scored slices (their inputs were)."""
        mean, std = slice_moments(x)
        return F.mse_loss(self.standardized(x), (x - mean) / std)


def identity_conv(channels: int) -> nn.Conv2d:
    """A 1x1 convolution initialized to the identity (He et al.'s feature adaptor, `init_weights_eye`)."""
    conv = nn.Conv2d(channels, channels, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels)[:, :, None, None])
        conv.bias.zero_()
    return conv


def orthogonality_penalty(weight: torch.Tensor) -> torch.Tensor:
    """SRIP (Bansal et al., NeurIPS 2018), as He et al. regularize their feature adaptors (`utils/util.py`,
    `l2_reg_ortho`): the squared spectral norm of W W^T - I, estimated by one power iteration (from a fixed vector
    rather than their random one, so that the loss is deterministic)."""
    w = weight.flatten(1)
    residual = w @ w.T - torch.eye(len(w), device=w.device)
    u = torch.full((len(w),), len(w) ** -0.5, device=w.device)
    v = F.normalize(residual.T @ u, dim=0, eps=1e-12)
    u = F.normalize(residual @ v, dim=0, eps=1e-12)
    return (u @ residual @ v) ** 2


class AutoencoderTTA(Adapter):
    """He et al. 2021: fit an image adaptor and 1x1 feature adaptors so that frozen source autoencoders reconstruct
    the input, the features and the output well; the UNet and the autoencoders stay frozen.

    What is adapted: the image adaptor (`ImageAdaptor`, their `adpNet`) and identity-initialized 1x1 convolutions
    after every encoder level but the bottom one (their `--seq=1,2,3`: after each downsampling block, none at the
    bottleneck or in the decoder). The objective (`opt_ANet`) is the sum of the mean squared reconstruction errors
    of the autoencoders of `unet-autoencoders` (input, encoder + decoder features at 1/2, 1/4, 1/8, logits) plus
    `ortho_weight` times the SRIP penalty of the feature adaptors (`--wo=1` for segmentation).

    Episodic schedule, per volume, as `train.py --test` runs it with `scripts/test_oct.sh`: start again from the
    initial adaptors (`ANet.reset`), then `stable_epochs` passes fitting the image adaptor to the identity (their
    `--sepochs`), then a fresh Adam (lr 1e-3, their `--alr`; `set_opt`) for up to `steps` passes (`--tepochs=10`),
    one step per `step_slices` slices (their `--batch-size=1`: a step per slice), stopping after the first pass
    whose mean loss exceeds the previous pass's (the adaptors are kept as that pass left them, as theirs are).
    The engine's batch size only sets the prediction batches.

    Deviations: `stable_epochs` defaults to 5 (their default is 0; their README advises 5 "to stabilize the
    convergence"): from their random start the image adaptor is a random intensity curve, and on our volumes it
    lowered the source-site Dice of the first steps. The continual setting (which He et al. do not have) runs the
    stable passes on the first batch only, then predicts and makes one step per batch, without reset.

    Hyper-parameters:
        lr: Adam learning rate (He et al.: 1e-3).
        ortho_weight: weight of the SRIP penalty (He et al.: 1 for segmentation, 5 for synthesis).
        stable_epochs: passes fitting the image adaptor to the identity before adapting (He et al.: 0, 5 advised).
        step_slices: slices per adaptation step in the episodic setting (He et al.: 1).
    """

    architecture: ClassVar[str] = "unet-autoencoders"
    paradigm: ClassVar[str] = "feature"
    defaults: ClassVar[dict[str, Any]] = {"lr": 1e-3, "ortho_weight": 1.0, "stable_epochs": 5, "step_slices": 1}
    default_steps: ClassVar[int] = 10

    def configure(self, model: nn.Module) -> None:
        super().configure(model)
        self.image_adaptor = ImageAdaptor()
        self.feature_adaptors = nn.ModuleList(identity_conv(c) for c in model.channels[:-1])
        self.register_buffer("stabilized", torch.tensor(False))  # continual: whether the stable passes ran

    def collect_params(self, model: nn.Module) -> list[nn.Parameter]:
        return [*self.image_adaptor.parameters(), *self.feature_adaptors.parameters()]

    def _adapt_features(self, level: int, features: torch.Tensor) -> torch.Tensor:
        return self.feature_adaptors[level](features) if level < len(self.feature_adaptors) else features

    def objective(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.tapped_features(self.image_adaptor(x), self._adapt_features)
        penalty = torch.stack([orthogonality_penalty(a.weight) for a in self.feature_adaptors]).sum()
        return self.model.reconstruction_loss(features) + self.hparams["ortho_weight"] * penalty, features[-1]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.decode(self.model.encode(self.image_adaptor(x), self._adapt_features))

    def stabilize(self, x: torch.Tensor) -> None:
        """He et al.'s stable passes: fit the image adaptor to the identity on `x`, one Adam step per `step_slices`
        slices (only the image adaptor has a gradient there; this optimizer is discarded afterwards)."""
        params = list(self.image_adaptor.parameters())
        optimizer = torch.optim.Adam(params, lr=self.hparams["lr"])
        with torch.enable_grad():
            for _ in range(self.hparams["stable_epochs"]):
                for b in torch.split(x, self.hparams["step_slices"]):
                    self.backward(self.image_adaptor.identity_loss(b))
                    self.optimizer_step(optimizer)
        self.stabilized.fill_(True)

    def step(self, x: torch.Tensor) -> float:
        """One Adam step on the objective of `x`; returns the loss before the step."""
        with torch.enable_grad():
            loss, _ = self.objective(x)
            self.backward(loss)
        self.optimizer_step()
        return float(loss.detach())

    def adapt(self, x: torch.Tensor, steps: int, batch_size: int) -> None:
        self.stabilize(x)
        self.optimizer = self.make_optimizer(self.params)  # their `set_opt`: fresh moments after the stable passes
        previous = float("inf")
        for _ in range(steps):
            losses = [self.step(b) for b in torch.split(x, self.hparams["step_slices"])]
            loss = sum(losses) / len(losses)
            if loss > previous:  # early stopping, as `train.py`: the pass's steps are kept
                return
            previous = loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.stabilized:
            self.stabilize(x)
        return super().forward(x)
