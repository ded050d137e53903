"""Volume -> network input and back: intensity normalization per modality and per-slice resizing (MONAI)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose, NormalizeIntensity, Resize, ScaleIntensityRange, ScaleIntensityRangePercentiles
from monai.utils import convert_to_tensor

from medtta.data.layout import Volume
from medtta.protocol import Preprocessing


def intensity_transform(prep: Preprocessing) -> Compose:
    """MR: percentile clipping then z-score; CT: HU window to [0, 1]; OCT: percentile window to [0, 1]."""
    low, high = prep.clip_percentiles
    if prep.intensity == "mr":
        # the z-score makes the intermediate [0, 1] range irrelevant; it only clips the outliers
        return Compose([ScaleIntensityRangePercentiles(low, high, b_min=0.0, b_max=1.0, clip=True),
                        NormalizeIntensity()])
    if prep.intensity == "ct":
        return Compose([ScaleIntensityRange(*prep.window, b_min=0.0, b_max=1.0, clip=True)])
    if prep.intensity == "oct":
        return Compose([ScaleIntensityRangePercentiles(low, high, b_min=0.0, b_max=1.0, clip=True)])
    raise ValueError(f"unknown intensity scheme '{prep.intensity}'")


def _as_slices(array: np.ndarray) -> np.ndarray:
    """(X, Y[, Z]) -> (Z, X, Y): slices along the last axis; a 2D image is one slice."""
    return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)


def image_slices(volume: Volume, prep: Preprocessing) -> torch.Tensor:
    """Normalized, resized slices of a volume as a (slices, 1, H, W) float tensor."""
    slices = _as_slices(volume.image)
    normalized = intensity_transform(prep)(slices[None])[0]
    resized = Resize(prep.size, mode="bilinear", anti_aliasing=True)(torch.as_tensor(normalized))
    return convert_to_tensor(resized, dtype=torch.float32, track_meta=False).unsqueeze(1).contiguous()


def label_slices(volume: Volume, prep: Preprocessing) -> torch.Tensor:
    """Labels resized like `image_slices` (nearest neighbour), as a (slices, H, W) long tensor."""
    resized = Resize(prep.size, mode="nearest")(torch.as_tensor(_as_slices(volume.label)))
    return convert_to_tensor(resized, dtype=torch.long, track_meta=False)


def to_native(logits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Network logits (slices, C, H, W) -> label map in the volume's own shape, on the CPU."""
    in_plane = shape[:2]
    resized = F.interpolate(logits.float(), size=in_plane, mode="bilinear", align_corners=False)
    labels = resized.argmax(1).cpu()  # (slices, X, Y)
    return labels[0] if len(shape) == 2 else labels.permute(1, 2, 0)
