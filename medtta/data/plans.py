"""The 3D plan of a protocol, nnU-Net's rules read from the source site's image headers: one slice spacing for every
site (the source median, unless the protocol fixes one) and a training patch of the median resampled shape within a
voxel budget (unless the protocol fixes one). Without it, every site would keep its own slice spacing: a shift
between sites that the preprocessing itself would create."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np

from medtta.data.datasets import open_dataset
from medtta.data.layout import Dataset, read_geometry
from medtta.data.preprocess import stack_depth
from medtta.errors import DataError, MedttaWarning
from medtta.protocol import DIVISOR, Protocol

#: the most voxels a planned training patch holds. 160 x 160 x 80 = 2.0 M, about nnU-Net's 3d_fullres patch on
#: isotropic data (128^3 = 2.1 M): wide enough to see an organ in its context, small enough that a training step of
#: the 3D UNet (fp32, batch 2, 16 classes) peaks about 2.7 GiB above the model (measured on the CPU): 8 GB GPUs do
PATCH_VOXELS = 160 * 160 * 80


def fit_patch(shape: tuple[float, ...], budget: int = PATCH_VOXELS) -> tuple[int, ...]:
    """`shape` as a patch: each side rounded down to a multiple of `DIVISOR` (at least `DIVISOR`), then the longest
    side (the first of equals) shortened by `DIVISOR` until the patch holds at most `budget` voxels."""
    patch = [max(DIVISOR, int(n) // DIVISOR * DIVISOR) for n in shape]
    while math.prod(patch) > budget and max(patch) > DIVISOR:
        patch[patch.index(max(patch))] -= DIVISOR
    return tuple(patch)


def plan_3d(protocol: Protocol, dataset: Dataset | None = None) -> Protocol:
    """`protocol` with what a 3D network needs and it leaves unset planned from the headers of its source site's
    train and val images: `slice_spacing` their median slice spacing, `patch_size` their median shape resampled to
    it (in-plane the protocol's `size`, which slices are brought to) fitted by `fit_patch`. A 2D protocol, or one
    that sets both, is returned unchanged; `dataset` (the protocol's, opened) is opened here when None."""
    prep = protocol.preprocessing
    if prep.dims != 3 or (prep.slice_spacing is not None and prep.patch_size is not None):
        return protocol
    if dataset is None:
        with warnings.catch_warnings():  # what opening warns of, the run's own opening says again
            warnings.simplefilter("ignore", MedttaWarning)
            dataset = open_dataset(protocol)
    site = protocol.source_site
    geometry = [read_geometry(case.image) for split in ("train", "val") for case in dataset.cases_of(site, split)]
    slice_spacings = [spacing[prep.slice_axis] for shape, spacing in geometry if len(shape) == 3]
    if not slice_spacings:
        raise DataError(f"{dataset.root}: site '{site}' has no 3D train or val image to plan a 3D network's input "
                        "from (set preprocessing.slice_spacing and patch_size, or run it in 2D: -a spatial_dims=2)")
    if prep.slice_spacing is None:  # rounded: float32 header zooms give 0.6000000238 mm for 0.6
        prep = dataclasses.replace(prep, slice_spacing=round(float(np.median(slice_spacings)), 4))
    if prep.patch_size is None:
        depth = float(np.median([stack_depth(shape, spacing, prep) for shape, spacing in geometry]))
        prep = dataclasses.replace(prep, patch_size=fit_patch((*prep.size, depth)))
    return dataclasses.replace(protocol, preprocessing=prep)
