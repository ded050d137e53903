"""Test-batch BatchNorm statistics (Nado et al. 2020; Schneider et al., NeurIPS 2020)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from medtta.adapters.base import Adapter, use_batch_statistics


class BNStats(Adapter):
    """Re-estimate BatchNorm statistics on each test batch, optionally mixed with the source statistics.

    Hyper-parameters:
        source_weight: weight of the source statistics, N/(N+n) in Schneider et al. (default 0:
            test-batch statistics only).
    """

    paradigm: ClassVar[str] = "feature"
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)
    norms: ClassVar[tuple[str, ...]] = ("batch",)  # it needs batch statistics
    defaults: ClassVar[dict[str, Any]] = {"source_weight": 0.0}
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {"source_weight": (0.0, 0.5, 0.9)}

    def configure(self, model: nn.Module) -> None:
        super().configure(model)
        use_batch_statistics(model, float(self.hparams["source_weight"]))
