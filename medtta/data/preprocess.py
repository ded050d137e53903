"""Volume -> network input and back: intensity normalization per modality, then per slice either a resize to
the protocol's `size` or, when the protocol fixes a `spacing`, resampling to that spacing and a centred
pad/crop to `size` (MONAI transforms). A 3D network sees the same slices stacked depth first, (1, 1, D, H, W),
resampled along the slice axis to the protocol's `slice_spacing`."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    NormalizeIntensity,
    Resize,
    ResizeWithPadOrCrop,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
)
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


def _as_slices(array: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """A 3D array as slices along the protocol's `slice_axis`, first: (X, Y, Z) -> (Z, X, Y) for axis 2;
    a 2D image is one slice."""
    return array[None] if array.ndim == 2 else np.moveaxis(array, prep.slice_axis, 0)


def _in_plane(values: tuple, prep: Preprocessing) -> tuple:
    """The entries of a volume's shape or spacing (one per axis) that belong to its slices: all of a 2D image's,
    all but the slice axis of a 3D volume's."""
    return tuple(values) if len(values) == 2 else tuple(v for i, v in enumerate(values) if i != prep.slice_axis)


def resampled_shape(volume: Volume, prep: Preprocessing) -> tuple[int, int]:
    """In-plane shape of a slice at the protocol's spacing; `size` itself when the protocol fixes none."""
    if prep.spacing is None:
        return tuple(prep.size)
    shape, spacing = _in_plane(volume.label.shape, prep), _in_plane(volume.spacing, prep)
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, prep.spacing, strict=True))


def _fit(slices: torch.Tensor, volume: Volume, prep: Preprocessing, mode: str) -> torch.Tensor:
    """(slices, X, Y) -> (slices, H, W): resampled, then centred-padded/cropped to `size` if needed."""
    out = Resize(resampled_shape(volume, prep), mode=mode, **({"anti_aliasing": True} if mode != "nearest" else {})
                 )(slices)
    if prep.spacing is not None:
        out = ResizeWithPadOrCrop(prep.size)(out)
    return convert_to_tensor(out, track_meta=False)


def image_slices(volume: Volume, prep: Preprocessing) -> torch.Tensor:
    """Normalized slices of a volume at network size, as a (slices, 1, H, W) float tensor."""
    normalized = intensity_transform(prep)(_as_slices(volume.image, prep)[None])[0]
    return _fit(torch.as_tensor(normalized), volume, prep, "bilinear").float().unsqueeze(1).contiguous()


def label_slices(volume: Volume, prep: Preprocessing) -> torch.Tensor:
    """Labels brought to network size like `image_slices` (nearest neighbour), as a (slices, H, W) long tensor."""
    return _fit(torch.as_tensor(_as_slices(volume.label, prep)), volume, prep, "nearest").long()


def to_native(logits: torch.Tensor, volume: Volume, prep: Preprocessing) -> torch.Tensor:
    """Network logits (slices, C, H, W), or 3D (1, C, D, H, W), -> label map in the volume's own shape, on the CPU.
    With a protocol spacing the pad/crop is undone first; what was cropped away is background (all-zero logits)."""
    logits = as_slices(logits, 1 if volume.label.ndim == 2 else volume.label.shape[prep.slice_axis])
    n_slices, n_classes = logits.shape[:2]
    if prep.spacing is not None:
        flat = logits.float().reshape(n_slices * n_classes, *logits.shape[2:])
        flat = convert_to_tensor(ResizeWithPadOrCrop(resampled_shape(volume, prep))(flat), track_meta=False)
        logits = flat.reshape(n_slices, n_classes, *flat.shape[1:])
    resized = F.interpolate(logits.float(), size=_in_plane(volume.label.shape, prep), mode="bilinear",
                            align_corners=False)
    labels = resized.argmax(1).cpu()  # slices first
    return labels[0] if volume.label.ndim == 2 else labels.movedim(0, prep.slice_axis)


def depth(volume: Volume, prep: Preprocessing) -> int:
    """Slices of the 3D network input: the volume's, resampled to `slice_spacing` when the protocol fixes one."""
    return stack_depth(volume.label.shape, volume.spacing, prep)


def stack_depth(shape: tuple[int, ...], spacing: tuple[float, ...], prep: Preprocessing) -> int:
    """`depth` of a volume of `shape` and `spacing` (mm per axis): what the 3D plan reads from image headers."""
    if len(shape) == 2:
        return 1
    n = shape[prep.slice_axis]
    return n if prep.slice_spacing is None else max(1, round(n * spacing[prep.slice_axis] / prep.slice_spacing))


def _stacked(slices: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """(slices, C, H, W) -> (1, C, n, H, W): the slices as one volume, resampled to `n` slices."""
    stack = slices.movedim(0, 1).unsqueeze(0)
    if stack.shape[2] == n:
        return stack.contiguous()
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    return F.interpolate(stack.float(), size=(n, *stack.shape[3:]), mode=mode, **kwargs).to(slices.dtype)


def image_input(volume: Volume, prep: Preprocessing) -> torch.Tensor:
    """The network input of a volume: its slices (slices, 1, H, W), or in 3D the volume (1, 1, D, H, W)."""
    slices = image_slices(volume, prep)
    return slices if prep.dims == 2 else _stacked(slices, depth(volume, prep), "trilinear")


def label_input(volume: Volume, prep: Preprocessing) -> torch.Tensor:
    """Labels as the network sees them, like `image_input`: (slices, H, W), or in 3D (1, D, H, W)."""
    labels = label_slices(volume, prep)
    return labels if prep.dims == 2 else _stacked(labels.unsqueeze(1), depth(volume, prep), "nearest")[:, 0]


def as_slices(logits: torch.Tensor, n_slices: int) -> torch.Tensor:
    """3D logits (1, C, D, H, W) -> (n_slices, C, H, W), resampled along depth (linearly, before the argmax);
    slice logits pass unchanged."""
    if logits.dim() == 4:
        return logits
    if logits.shape[2] != n_slices:
        logits = F.interpolate(logits.float(), size=(n_slices, *logits.shape[3:]), mode="trilinear",
                               align_corners=False)
    return logits[0].movedim(1, 0)
