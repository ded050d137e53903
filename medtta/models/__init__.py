"""Segmentation networks and source-model training with a checkpoint cache."""

from medtta.models.networks import ARCHITECTURES, build_network

__all__ = ["ARCHITECTURES", "build_network"]
