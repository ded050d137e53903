"""Self-training on confident pseudo-labels (Lee, ICML-W 2013), the plain output-level baseline."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medtta.adapters.base import Adapter, use_batch_statistics
from medtta.errors import RegistryError
from medtta.models.base import norm_params, weights_under_batch_statistics

PARAMETER_SETS = ("norm", "all")


class PseudoLabel(Adapter):
    """Cross-entropy towards the model's own confident per-pixel predictions (its argmax where its softmax exceeds
    `threshold`; other pixels do not count).

    Hyper-parameters: `threshold` (0.9), `params`: `norm` (the norm layers' affine parameters, BatchNorm on
    test-batch statistics, as TENT) or `all` (every weight, BatchNorm still on test-batch statistics), Adam at `lr`
    (1e-3 for `norm`; lower it for `all`).
    """

    other_architectures: ClassVar[tuple[str, ...]] = ("nnunet",)  # a trained nnU-Net (InstanceNorm)
    paradigm: ClassVar[str] = "output"
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)
    defaults: ClassVar[dict[str, Any]] = {"lr": 1e-3, "threshold": 0.9, "params": "norm"}
    default_steps: ClassVar[int] = 1

    def configure(self, model: nn.Module) -> None:
        if self.hparams["params"] not in PARAMETER_SETS:
            raise RegistryError(f"{type(self).__name__} hyper-parameter params must be one of "
                                f"{', '.join(PARAMETER_SETS)}, got {self.hparams['params']!r}")
        super().configure(model)
        use_batch_statistics(model)

    def collect_params(self, model: nn.Module) -> list[nn.Parameter]:
        return norm_params(model) if self.hparams["params"] == "norm" else weights_under_batch_statistics(model)

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        confidence, labels = logits.detach().softmax(1).max(1)
        per_pixel = F.cross_entropy(logits, labels, reduction="none")
        return (per_pixel * (confidence > self.hparams["threshold"])).sum() / per_pixel.numel()
