"""Preprocessing: intensity schemes, resizing or resampling to the protocol's spacing, and the way back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtta.data.layout import Volume
from medtta.data.preprocess import image_slices, label_slices, resampled_shape, to_native
from medtta.protocol import Preprocessing


def _volume(shape: tuple[int, ...], spacing: tuple[float, ...]) -> Volume:
    label = np.zeros(shape, np.int64)
    label[10:40, 20:50] = 1
    label[60:80, 8:30] = 2
    image = np.random.default_rng(0).normal(100, 10, shape).astype(np.float32) + 50 * label
    return Volume("v", image, label, spacing)


def _round_trip(volume: Volume, prep: Preprocessing) -> torch.Tensor:
    logits = torch.nn.functional.one_hot(label_slices(volume, prep), 3).permute(0, 3, 1, 2).float()
    return to_native(logits, volume, prep)


@pytest.mark.parametrize("shape", [(100, 80, 3), (100, 80)])
def test_resize_round_trip(shape: tuple[int, ...]) -> None:
    volume, prep = _volume(shape, (0.5, 0.5, 4.0)[: len(shape)]), Preprocessing(size=(64, 64))
    x = image_slices(volume, prep)
    assert x.shape == (shape[2] if len(shape) == 3 else 1, 1, 64, 64)
    assert x.mean() == pytest.approx(0, abs=1e-2) and x.std() == pytest.approx(1, abs=0.1)  # z-score, then resized
    back = _round_trip(volume, prep)
    assert back.shape == shape and (back == torch.as_tensor(volume.label)).float().mean() > 0.98


def test_resampling_to_spacing_keeps_physical_size() -> None:
    volume = _volume((100, 80, 3), (0.5, 0.5, 4.0))
    prep = Preprocessing(size=(64, 64), spacing=(1.0, 1.0))
    assert resampled_shape(volume, prep) == (50, 40)
    labels = label_slices(volume, prep)
    assert labels.shape == (3, 64, 64)
    assert (labels[0] == 1).sum() == pytest.approx(15 * 15, rel=0.1)  # 30 x 30 voxels of 0.5 mm -> 15 x 15 of 1 mm
    back = _round_trip(volume, prep)
    assert (back == torch.as_tensor(volume.label)).float().mean() > 0.98


@pytest.mark.parametrize("axis", [0, 1])
def test_slice_axis(axis: int) -> None:
    """A volume cut along another axis gives the same slices as the same volume with that axis moved last, and
    comes back in its own orientation."""
    last = _volume((100, 80, 3), (0.5, 0.5, 4.0))
    spacing = list(last.spacing[:2])
    spacing.insert(axis, last.spacing[2])
    moved = Volume("v", np.moveaxis(last.image, 2, axis), np.moveaxis(last.label, 2, axis), tuple(spacing))
    prep_last = Preprocessing(size=(64, 64), spacing=(1.0, 1.0))
    prep = Preprocessing(size=(64, 64), spacing=(1.0, 1.0), slice_axis=axis)
    assert resampled_shape(moved, prep) == resampled_shape(last, prep_last) == (50, 40)
    assert torch.equal(image_slices(moved, prep), image_slices(last, prep_last))
    assert torch.equal(_round_trip(moved, prep), _round_trip(last, prep_last).movedim(2, axis))


def test_what_is_cropped_away_comes_back_as_background() -> None:
    volume = _volume((100, 80, 3), (1.0, 1.0, 4.0))
    prep = Preprocessing(size=(64, 64), spacing=(1.0, 1.0))  # 100 x 80 cropped to 64 x 64 around the centre
    back = _round_trip(volume, prep)
    assert back.shape == (100, 80, 3)
    assert (back[:18] == 0).all() and (back[82:] == 0).all()  # outside the crop
    inside = torch.as_tensor(volume.label)[18:82, 8:72]
    assert torch.equal(back[18:82, 8:72], inside)


def test_ct_window() -> None:
    volume = Volume("v", np.array([[-1000.0, -160.0], [40.0, 1000.0]], np.float32), np.zeros((2, 2), np.int64),
                    (1.0, 1.0))
    x = image_slices(volume, Preprocessing(size=(2, 2), intensity="ct", window=(-160.0, 240.0)))
    assert x.flatten().tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0])
