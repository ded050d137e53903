"""Test-time augmentation: predictions averaged over flips, 90-degree rotations and mild contrast changes."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from medtta.adapters.base import Adapter
from medtta.adapters.views import View, mean_probabilities
from medtta.errors import RegistryError


class TestTimeAugmentation(Adapter):
    """Average the softmax over flipped, rotated and contrast-changed views, each mapped back; no weight changes.

    The baseline that tells whether adapting weights beats not adapting them. Views: the 8 flips and quarter
    turns of the slice, plus the identity at contrast 1 - `contrast` and 1 + `contrast` (around each slice's
    mean), so 10 forward passes per batch by default. The logits returned are the log of the averaged
    probabilities.
    """

    paradigm: ClassVar[str] = "output"
    defaults: ClassVar[dict[str, Any]] = {"rotations": 4, "flip": True, "contrast": 0.1}

    def __init__(self, model: torch.nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        h = self.hparams
        if h["rotations"] not in (1, 2, 3, 4) or not 0 <= h["contrast"] < 1:
            raise RegistryError(f"{type(self).__name__}: rotations must be 1 to 4 (got {h['rotations']}) and "
                                f"contrast in [0, 1) (got {h['contrast']})")
        flips = (False, True) if h["flip"] else (False,)
        self.views = [View(turns, flip) for turns in range(int(h["rotations"])) for flip in flips]
        if h["contrast"]:
            self.views += [View(contrast=1 - h["contrast"]), View(contrast=1 + h["contrast"])]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return mean_probabilities(self.model, x, self.views).clamp_min(1e-8).log()
