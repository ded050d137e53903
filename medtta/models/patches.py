"""3D source-training patches as nnU-Net samples them: the last third of each batch centred on foreground, the rest
uniformly random (`medtta.models.volumetric.random_patches`). Uniform patches of a large volume mostly miss small
organs; the oversampled ones make every batch show the network some foreground."""

from __future__ import annotations

import torch

from medtta.models.base import SourceVolume
from medtta.models.volumetric import Window, padded_to, random_patches, window_at

OVERSAMPLE_FOREGROUND = 0.33  # nnU-Net's oversample_foreground_percent


def foreground_patch(x: torch.Tensor, labels: torch.Tensor, window: Window,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A patch of `window` of the (1, C, D, H, W) volume `x` and of its (1, D, H, W) `labels`, centred on a random
    voxel of a random foreground class present (nnU-Net's choice: small organs as often as large ones) and moved
    to lie inside the volume, zero-padded where it is smaller than `window`; uniformly random without foreground."""
    classes = labels.unique()
    classes = classes[classes > 0]
    if not len(classes):
        return random_patches(x, window, 1, labels, generator)
    x, labels = padded_to(x, window), padded_to(labels.unsqueeze(1), window)[:, 0]
    chosen = classes[int(torch.randint(len(classes), (1,), generator=generator))]
    voxels = (labels[0] == chosen).nonzero()
    centre = voxels[int(torch.randint(len(voxels), (1,), generator=generator))].tolist()
    corner = [min(max(c - n // 2, 0), s - n) for c, n, s in zip(centre, window, labels.shape[1:], strict=True)]
    return window_at(x, corner, window), window_at(labels, corner, window)


def training_patches(volumes: list[SourceVolume], window: Window, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One patch of each (image, labels) volume, as a batch: the last `OVERSAMPLE_FOREGROUND` of them (rounded as
    nnU-Net rounds: one of a batch of 2) by `foreground_patch`, the others by `random_patches`."""
    uniform = round(len(volumes) * (1 - OVERSAMPLE_FOREGROUND))
    picked = [random_patches(x, window, 1, y, generator) if i < uniform else foreground_patch(x, y, window, generator)
              for i, (x, y) in enumerate(volumes)]
    images, labels = zip(*picked, strict=True)
    return torch.cat(images), torch.cat(labels)
