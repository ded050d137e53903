"""Y-shaped UNets for test-time training: the `unet` encoder shared by the segmentation decoder and a
self-supervised auxiliary head, trained jointly on the source site.

- `unet-rotation`: 4-way rotation prediction from the bottleneck (Sun et al., "Test-Time Training with
  Self-Supervision for Generalization under Distribution Shifts", ICML 2020; yueatsprograms/ttt_cifar_release).
- `unet-mae`: masked-image reconstruction, 75 % of the patches masked (Gandelsman et al., "Test-Time Training
  with Masked Autoencoders", NeurIPS 2022; yossigandelsman/test_time_training_mae). The patch is the
  bottleneck's stride, so each bottleneck position reconstructs one patch, as an MAE token does.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medtta.models.base import running_statistics_kept, segmentation_loss
from medtta.models.unet import UNetModel


def random_flips(x: torch.Tensor) -> torch.Tensor:
    """Each slice mirrored at random along its first in-plane axis (H: the volume's x, the patient's left-right or
    OCT's lateral axis, the one viewers show horizontally), as both TTT papers augment (horizontal flips only).

    Mirroring the other axis (W: y, OCT's depth) would make a flip followed by a 180° rotation look like the
    mirrored original wherever the anatomy is nearly symmetric left-right (OCT B-scans), so that the rotation task
    could not tell k from k + 2 quarter turns."""
    flip = torch.rand(len(x), device=x.device) < 0.5
    return torch.where(flip.view(-1, *([1] * (x.dim() - 1))), x.flip(-2), x)


class AuxiliaryUNet(UNetModel):
    """A `unet` with an auxiliary head on its encoder; subclasses define the head and `auxiliary_loss`."""

    def auxiliary_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The self-supervised loss on (augmented copies of) a batch of slices."""
        raise NotImplementedError

    def source_losses(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Segmentation plus weighted auxiliary loss. The auxiliary pass sees masked or rotated copies: it must not
        move the BatchNorm running statistics the segmentation path is evaluated with (masked slices, 75 % zeros,
        pulled them so far on synth-oct that the in-domain Dice of `unet-mae` fell to 0.10)."""
        segmentation = segmentation_loss(self(x), labels)
        with running_statistics_kept(self):
            auxiliary = self.auxiliary_loss(x)
        return {"segmentation": segmentation, "auxiliary": self.config["aux_weight"] * auxiliary}

    def parts(self) -> dict[str, list[nn.Parameter]]:
        return {**super().parts(), "aux": list(self.head.parameters())}


class RotationUNet(AuxiliaryUNet):
    """`unet` + a 4-way rotation classifier on the bottleneck (Sun et al. 2020); in 3D the rotations are in-plane."""

    defaults: ClassVar[dict[str, Any]] = {**UNetModel.defaults, "aux_weight": 1.0}

    def __init__(self, in_channels: int, n_classes: int, **config: Any) -> None:
        super().__init__(in_channels, n_classes, **config)
        conv, pool = (nn.Conv2d, nn.AdaptiveAvgPool2d) if self.spatial_dims == 2 else (nn.Conv3d, nn.AdaptiveAvgPool3d)
        self.head = nn.Sequential(conv(self.channels[-1], 64, 3, padding=1), nn.ReLU(), pool(1), nn.Flatten(),
                                  nn.Linear(64, 4))

    def rotation_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each slice flipped at random and rotated by a random multiple of 90°: the head's (N, 4) logits and the
        rotations (N,) in the order of `x`. Slices of one shape run through the encoder together (all of them when
        the slices are square)."""
        rotations = torch.randint(0, 4, (len(x),), device=x.device)
        rotated = [torch.rot90(s, k, dims=(-2, -1)) for s, k in zip(random_flips(x), rotations.tolist(), strict=True)]
        parts, order = [], []
        for shape in dict.fromkeys(r.shape for r in rotated):
            chosen = [i for i, r in enumerate(rotated) if r.shape == shape]
            parts.append(self.head(self.encode(torch.stack([rotated[i] for i in chosen]))[-1]))
            order += chosen
        return torch.cat(parts)[torch.argsort(torch.tensor(order, device=x.device))], rotations

    def auxiliary_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the predicted rotation of randomly flipped and rotated copies of the slices."""
        return F.cross_entropy(*self.rotation_logits(x))


class MaskedUNet(AuxiliaryUNet):
    """`unet` + a light head reconstructing masked patches from the bottleneck (Gandelsman et al. 2022)."""

    defaults: ClassVar[dict[str, Any]] = {"norm": "batch", "source_aug": "none", "aux_weight": 1.0, "mask_ratio": 0.75}

    def __init__(self, in_channels: int, n_classes: int, **config: Any) -> None:
        super().__init__(in_channels, n_classes, **config)
        self.patch = 2 ** (len(self.channels) - 1)
        self.head = nn.Sequential(nn.Conv2d(self.channels[-1], 64, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(64, in_channels * self.patch**2, 1), nn.PixelShuffle(self.patch))

    def patch_mask(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) mask, 1 on the `mask_ratio` of patches hidden from the encoder in each slice."""
        n, _, h, w = x.shape
        grid = (-(-h // self.patch), -(-w // self.patch))
        scores = torch.rand(n, grid[0] * grid[1], device=x.device)
        hidden = int(round(self.config["mask_ratio"] * scores.shape[1]))
        mask = torch.zeros_like(scores).scatter_(1, scores.argsort(1)[:, :hidden], 1.0)
        mask = mask.view(n, 1, *grid).repeat_interleave(self.patch, 2).repeat_interleave(self.patch, 3)
        return mask[..., :h, :w]

    def normalized_patches(self, x: torch.Tensor) -> torch.Tensor:
        """`x` with every patch normalized to zero mean and unit variance (MAE's `norm_pix_loss` target, which
        TTT-MAE's checkpoints are trained with: the head predicts each patch's structure, not its brightness)."""
        n, c, h, w = x.shape
        rows, cols = -(-h // self.patch), -(-w // self.patch)
        padded = F.pad(x, (0, cols * self.patch - w, 0, rows * self.patch - h), mode="replicate")
        patches = padded.view(n, c, rows, self.patch, cols, self.patch)
        mean = patches.mean((1, 3, 5), keepdim=True)
        var = patches.var((1, 3, 5), keepdim=True)
        return ((patches - mean) / (var + 1e-6).sqrt()).view_as(padded)[..., :h, :w]

    def auxiliary_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Mean squared error, on the masked pixels, between the reconstruction of flipped slices whose masked
        patches are zeroed and the per-patch normalized slices (MAE: the loss on masked patches only)."""
        x = random_flips(x)
        mask = self.patch_mask(x)
        reconstruction = self.head(self.encode(x * (1 - mask))[-1])[..., : x.shape[-2], : x.shape[-1]]
        return (((reconstruction - self.normalized_patches(x)) ** 2) * mask).sum() / mask.sum().clamp(min=1)
