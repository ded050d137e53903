"""No adaptation: the source model as trained (the baseline every method is measured against)."""

from __future__ import annotations

from typing import ClassVar

from medtta.adapters.base import Adapter


class SourceOnly(Adapter):
    """No adaptation: the source model with its training-time BatchNorm statistics."""

    other_architectures: ClassVar[tuple[str, ...]] = ("nnunet",)  # a trained nnU-Net (InstanceNorm)
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)
