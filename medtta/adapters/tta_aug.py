"""Test-time augmentation: predictions averaged over mild intensity changes (contrast, or gamma for networks that
normalize each input) and, optionally, flips and 90-degree rotations."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from medtta.adapters.base import Adapter
from medtta.adapters.views import View, all_flips, mean_probabilities
from medtta.errors import RegistryError

flip_sets = {2: [(), (-1,)], 3: all_flips(3)}  # 2D: the mirror image (left-right); 3D: every axis


class TestTimeAugmentation(Adapter):
    """Average the softmax over intensity-changed (and, when asked, flipped and rotated) views, each mapped back; no
    weight changes.

    The baseline that tells whether adapting weights beats not adapting them. Views: the slice, plus two intensity
    views chosen by the network's normalization: on a BatchNorm network the slice at contrast 1 - `contrast` and
    1 + `contrast` (around each slice's mean); on an InstanceNorm or GroupNorm network, which normalizes each input's
    features by their own statistics and so sees a linear contrast change as nothing (identical Dice), the slice at
    gamma 1 - `gamma` and 1 + `gamma` over its intensity range (nnU-Net's gamma augmentation spans 0.7-1.5). With
    `flip` its mirror image too (a 3D volume: its 8 flips of the three axes), with `rotations` each at its 4
    (in-plane) quarter turns. The logits returned are the log of the averaged probabilities.

    Geometric views are off by default: TTA averages over the transformations a model was trained to be invariant
    to (nnU-Net mirrors because it trains with mirroring), and medtta's source models are trained without geometric
    augmentation on lateralized anatomy, where flips and quarter turns lower even the source site's own Dice
    (0.81 -> 0.74 on the test suite's small cardiac model). Turn them on for a model trained with them.
    """

    other_architectures: ClassVar[tuple[str, ...]] = ("nnunet",)  # a trained nnU-Net (InstanceNorm)
    paradigm: ClassVar[str] = "output"
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)
    defaults: ClassVar[dict[str, Any]] = {"flip": False, "rotations": False, "contrast": 0.1, "gamma": 0.25}
    #: the intensity views' hyper-parameter per normalization (`-a norm`)
    intensity_views: ClassVar[dict[str, str]] = {"batch": "contrast", "instance": "gamma", "group": "gamma"}

    def __init__(self, model: torch.nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        h = self.hparams
        for key in ("contrast", "gamma"):
            if not 0 <= h[key] < 1:
                raise RegistryError(f"{type(self).__name__} hyper-parameter {key} must be in [0, 1), got {h[key]}")
        kind = self.intensity_views[model.norm_of(model.config) if hasattr(model, "norm_of") else "batch"]
        intensity = [View(**{kind: 1 + sign * h[kind]}) for sign in (-1, 1)] if h[kind] else []
        self.views = {dims: [View(turns, flips) for turns in range(4 if h["rotations"] else 1)
                             for flips in (flip_sets[dims] if h["flip"] else [()])] + intensity
                      for dims in (2, 3)}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return mean_probabilities(self.model, x, self.views[x.dim() - 2]).clamp_min(1e-8).log()
