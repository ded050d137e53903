"""How a volume becomes the network's input and how its logits go back to the volume's own grid: by default the
protocol's preprocessing (`medtta.data.preprocess`); an architecture with preprocessing of its own (a trained
nnU-Net and its plans) gives its own pipeline (`Architecture.pipeline`)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from medtta.data.layout import Volume
from medtta.data.preprocess import image_input, label_input, to_native
from medtta.protocol import Preprocessing


class Pipeline:
    """The protocol's preprocessing: `prepare` a volume into network input (and what `to_native` needs to undo it,
    nothing here), `to_native` logits into a label map of the volume's shape."""

    def __init__(self, prep: Preprocessing) -> None:
        self.prep = prep

    def key(self) -> Any:
        """What the prepared inputs depend on (part of their cache key)."""
        return asdict(self.prep)

    def prepare(self, volume: Volume) -> tuple[torch.Tensor, dict[str, Any]]:
        """The network input of `volume` (slices (S, 1, H, W), or 3D (1, 1, D, H, W)) and what `to_native` needs."""
        return image_input(volume, self.prep), {}

    def source_volume(self, volume: Volume) -> tuple[torch.Tensor, torch.Tensor]:
        """A labelled source volume as training and source statistics see it: input and labels on the network's grid."""
        return image_input(volume, self.prep), label_input(volume, self.prep)

    def to_native(self, logits: torch.Tensor, volume: Volume, meta: dict[str, Any]) -> torch.Tensor:
        """The label map of `logits` in the shape of `volume.label`, on the CPU."""
        return to_native(logits, volume, self.prep)
