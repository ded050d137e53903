"""Network builders, by the architecture name an adapter declares."""

from __future__ import annotations

from collections.abc import Callable

from monai.networks.layers import Norm
from monai.networks.nets import UNet
from torch import nn

from medtta.errors import MedttaError


def unet(in_channels: int, out_channels: int) -> nn.Module:
    """MONAI 2D UNet with BatchNorm: 4 levels (16-128 channels), 2 residual units per level."""
    return UNet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels,
                channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2, norm=Norm.BATCH)


ARCHITECTURES: dict[str, Callable[[int, int], nn.Module]] = {"unet": unet}


def build_network(architecture: str, in_channels: int, out_channels: int) -> nn.Module:
    """Build the named architecture."""
    if architecture not in ARCHITECTURES:
        raise MedttaError(f"unknown architecture '{architecture}' (available: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[architecture](in_channels, out_channels)
