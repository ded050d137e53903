"""Test-time augmentation: predictions averaged over flips, 90-degree rotations and mild contrast changes."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from medtta.adapters.base import Adapter
from medtta.adapters.views import View, mean_probabilities
from medtta.errors import RegistryError


class TestTimeAugmentation(Adapter):
    """Average the softmax over flipped, rotated and contrast-changed views, each mapped back; no weight changes.

    The baseline that tells whether adapting weights beats not adapting them. Views: the slice and its mirror
    image (`flip`), each at its 4 quarter turns (`rotations`), plus the slice at contrast 1 - `contrast` and
    1 + `contrast` (around each slice's mean): 10 forward passes per batch by default. The logits returned are the
    log of the averaged probabilities.
    """

    paradigm: ClassVar[str] = "output"
    defaults: ClassVar[dict[str, Any]] = {"flip": True, "rotations": True, "contrast": 0.1}

    def __init__(self, model: torch.nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        h = self.hparams
        if not 0 <= h["contrast"] < 1:
            raise RegistryError(f"{type(self).__name__} hyper-parameter contrast must be in [0, 1), "
                                f"got {h['contrast']}")
        flips = (False, True) if h["flip"] else (False,)
        self.views = [View(turns, flip) for turns in range(4 if h["rotations"] else 1) for flip in flips]
        if h["contrast"]:
            self.views += [View(contrast=1 - h["contrast"]), View(contrast=1 + h["contrast"])]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return mean_probabilities(self.model, x, self.views).clamp_min(1e-8).log()
