"""Volume-level segmentation metrics (MONAI) and the headline number, Dice recovery (see DESIGN.md)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot


def _one_hot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    return one_hot(labels[None, None].long(), num_classes=n_classes)


def volume_metrics(pred: torch.Tensor, reference: torch.Tensor, labels: dict[str, int],
                   spacing: tuple[float, ...]) -> dict[str, float]:
    """Dice per foreground label (`dice_<name>`), their mean (`dice`) and the mean 95th-percentile
    Hausdorff distance in mm (`hd95`) of one volume. A label absent from the reference is left out of
    the means (its Dice is NaN); a label missing from either side has no HD95."""
    n = len(labels)
    p, r = _one_hot(pred, n), _one_hot(reference, n)
    out = volume_dice(pred, reference, labels)
    with warnings.catch_warnings():  # MONAI warns for every empty class; the NaN carries that
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(p, r, include_background=False, percentile=95, spacing=list(spacing))[0]
    hd = torch.where(torch.isfinite(hd), hd, torch.nan)
    out["hd95"] = _nanmean(hd)
    return out


def volume_dice(pred: torch.Tensor, reference: torch.Tensor, labels: dict[str, int]) -> dict[str, float]:
    """Dice per foreground label (`dice_<name>`, NaN when absent from the reference) and their mean (`dice`)."""
    n = len(labels)
    dice = compute_dice(_one_hot(pred, n), _one_hot(reference, n), include_background=False, ignore_empty=True,
                        num_classes=n)[0]
    out = {f"dice_{name}": float(dice[i - 1]) for name, i in labels.items() if i > 0}
    out["dice"] = _nanmean(dice)
    return out


def _nanmean(values: torch.Tensor) -> float:
    values = values[~torch.isnan(values)]
    return float(values.mean()) if len(values) else math.nan


def collapsed(pred: torch.Tensor, reference: torch.Tensor) -> bool:
    """A prediction has collapsed when a foreground label of the reference is absent from it entirely."""
    missing = set(torch.unique(reference).tolist()) - set(torch.unique(pred).tolist()) - {0}
    return bool(missing)


def dice_recovery(adapted: float, source: float, in_domain: float) -> float:
    """(adapted - source) / (in_domain - source): 1 closes the domain gap, 0 does nothing, < 0 harms.
    NaN when there is no gap to close (in-domain Dice not above source Dice)."""
    gap = in_domain - source
    return (adapted - source) / gap if gap > 1e-6 else math.nan


def mean(values: list[float]) -> float:
    """Mean ignoring NaN; NaN when nothing is left."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan
