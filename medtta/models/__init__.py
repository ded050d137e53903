"""Source architectures (plugins of the `medtta.architectures` entry-point group) and their training."""

from typing import Any

from medtta.models.base import Architecture
from medtta.registry import ARCHITECTURES


def build_network(architecture: str, in_channels: int, n_classes: int, **config: Any) -> Architecture:
    """Build the named architecture; an unknown name or config key fails listing the known ones."""
    return ARCHITECTURES.create(architecture, in_channels, n_classes, **config)


__all__ = ["ARCHITECTURES", "Architecture", "build_network"]
