"""Metrics on cases whose answer is known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance

from medtta.metrics import (
    collapse_reason,
    dice_recovery,
    foreground_voxels,
    hd95,
    recovery_flag,
    volume_dice,
    volume_metrics,
)

LABELS = {"background": 0, "a": 1, "b": 2}


def _volumes() -> tuple[torch.Tensor, torch.Tensor]:
    ref = torch.zeros(12, 12, 3, dtype=torch.long)
    ref[2:6, 2:6, :] = 1  # 48 voxels
    ref[8:10, 8:10, 1] = 2  # 4 voxels
    pred = torch.zeros_like(ref)
    pred[2:6, 2:4, :] = 1  # 24 voxels, all inside the reference
    pred[8:10, 8:10, 1] = 2
    return pred, ref


def test_dice_on_known_case() -> None:
    pred, ref = _volumes()
    d = volume_dice(pred, ref, LABELS)
    assert d["dice_a"] == pytest.approx(2 * 24 / (24 + 48))
    assert d["dice_b"] == pytest.approx(1.0)
    assert d["dice"] == pytest.approx((2 / 3 + 1) / 2)


def test_label_absent_from_reference_is_left_out() -> None:
    pred, ref = _volumes()
    ref[ref == 2] = 0
    d = volume_dice(pred, ref, LABELS)
    assert math.isnan(d["dice_b"]) and d["dice"] == pytest.approx(2 / 3)


def test_hd95_in_mm() -> None:
    pred, ref = _volumes()
    m = volume_metrics(pred, ref, LABELS, spacing=(1.0, 1.0, 1.0))
    assert m["hd95"] == pytest.approx((2.0 + 0.0) / 2)  # label a: columns 4-5 are 1-2 voxels away; b exact
    m = volume_metrics(pred, ref, LABELS, spacing=(1.0, 3.0, 1.0))
    assert m["hd95"] == pytest.approx((6.0 + 0.0) / 2)  # the gap runs along the second axis


def _blobs(rng: np.random.Generator, shape: tuple[int, ...], count: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    grid = np.indices(shape)
    for _ in range(count):
        centre, radius = rng.uniform(0, shape), rng.uniform(1, max(shape) / 3)
        mask |= sum(((g - c) / radius) ** 2 for g, c in zip(grid, centre, strict=True)) < 1
    return mask


@pytest.mark.parametrize("shape,spacing", [((40, 36), (0.7, 1.3)), ((24, 20, 6), (1.0, 0.5, 4.0))])
def test_hd95_equals_monai_on_random_masks(shape: tuple[int, ...], spacing: tuple[float, ...]) -> None:
    """The fast HD95 is MONAI's `compute_hausdorff_distance(percentile=95)`: blobs touching the border, disjoint
    ones, and an empty side."""
    rng = np.random.default_rng(0)
    for trial in range(12):
        pred, ref = _blobs(rng, shape, trial % 3 + 1), _blobs(rng, shape, 2)
        if trial == 11:
            pred[:] = False
        expected = compute_hausdorff_distance(torch.from_numpy(pred)[None, None].float(),
                                              torch.from_numpy(ref)[None, None].float(), include_background=True,
                                              percentile=95, spacing=list(spacing))[0, 0]
        got = hd95(pred, ref, spacing)
        assert math.isnan(got) if not torch.isfinite(expected) else got == float(expected), trial


def test_recovery() -> None:
    assert dice_recovery(0.8, 0.6, 0.9) == pytest.approx(2 / 3)
    assert dice_recovery(0.5, 0.6, 0.9) == pytest.approx(-1 / 3)
    assert dice_recovery(0.9, 0.6, 0.9) == pytest.approx(1.0)
    assert math.isnan(dice_recovery(0.7, 0.9, 0.9))


def test_collapse_when_a_reference_label_vanishes_or_the_foreground_shrinks() -> None:
    pred, ref = _volumes()
    source = pred.clone()
    assert collapse_reason(pred, ref, LABELS, source) == ""
    pred[pred == 2] = 0
    assert collapse_reason(pred, ref, LABELS, source).startswith("b vanished")
    assert collapse_reason(pred, ref, {"a": 1}, source) == ""  # label b is not scored
    shrunk = torch.zeros_like(source)
    kept = 3  # of the 24 voxels of a the unadapted prediction has: 12 %, below COLLAPSE_FRACTION
    shrunk.view(-1)[:kept] = 1
    assert collapse_reason(shrunk, ref, {"a": 1}, source) == "foreground at 12% of unadapted"
    shrunk.view(-1)[:5] = 1  # 21 %
    assert collapse_reason(shrunk, ref, {"a": 1}, source) == ""
    assert foreground_voxels(shrunk, LABELS) == 5


def test_only_the_scored_labels_count() -> None:
    """A protocol's `evaluate_labels` leaves labels without ground truth out of Dice, its mean and HD95."""
    pred, ref = _volumes()
    pred[0, 0, 0] = 3  # a label the reference never has (as AMOS MRI lacks bladder)
    all_labels = {**LABELS, "c": 3}
    assert volume_dice(pred, ref, all_labels)["dice"] == pytest.approx((2 / 3 + 1) / 2)  # c: NaN, left out
    d = volume_metrics(pred, ref, {"b": 2}, spacing=(1.0, 1.0, 1.0))
    assert set(d) == {"dice_b", "dice", "hd95"} and d["dice"] == pytest.approx(1.0) and d["hd95"] == 0.0


def test_recovery_outside_its_range_is_flagged_with_why() -> None:
    assert recovery_flag(0.80, 0.50, 0.90) == ""  # 0.75
    assert recovery_flag(0.80, 0.50, math.nan) == ""  # no in-domain Dice: no recovery
    above = recovery_flag(0.80, 0.50, 0.60)  # 3.0: a 1-epoch source scores below the adapted Dice at its own site
    assert above.startswith("adapted Dice 0.800 is above the in-domain Dice 0.600") and "gap of 0.100" in above
    below = recovery_flag(0.30, 0.50, 0.55)  # -4.0
    assert below.startswith("adapted Dice 0.300 fell 0.200 below unadapted, more than the gap of 0.050")
    assert recovery_flag(0.50 + 1.4 * 0.4, 0.50, 0.90) == "" and recovery_flag(0.25, 0.5, 0.8) == ""  # 1.4, -0.83
    assert recovery_flag(0.08, 0.5, 0.8) != ""  # -1.4
