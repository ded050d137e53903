"""No adaptation: the source model as trained (the baseline every method is measured against)."""

from __future__ import annotations

from typing import ClassVar

from medtta.adapters.base import Adapter


class SourceOnly(Adapter):
    """No adaptation: the source model with its training-time BatchNorm statistics."""

    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)
