"""Volume-level segmentation metrics (MONAI) and the headline number, Dice recovery (see DESIGN.md)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def _masks(labels: torch.Tensor, values: list[int]) -> torch.Tensor:
    """(1, K, ...) binary masks of a label map, one channel per label value in `values`."""
    return torch.stack([labels == v for v in values])[None].float()


def _foreground(labels: dict[str, int]) -> dict[str, int]:
    return {name: value for name, value in labels.items() if value > 0}


def volume_metrics(pred: torch.Tensor, reference: torch.Tensor, labels: dict[str, int],
                   spacing: tuple[float, ...]) -> dict[str, float]:
    """Dice per scored foreground label (`dice_<name>`), their mean (`dice`) and the mean 95th-percentile
    Hausdorff distance in mm (`hd95`) of one volume. A label absent from the reference is left out of
    the means (its Dice is NaN); a label missing from either side has no HD95."""
    out = volume_dice(pred, reference, labels)
    pred_np, reference_np = pred.cpu().numpy(), reference.cpu().numpy()
    hd = [hd95(pred_np == value, reference_np == value, spacing) for value in _foreground(labels).values()]
    out["hd95"] = _nanmean(torch.tensor(hd, dtype=torch.float32))
    return out


def hd95(pred: np.ndarray, reference: np.ndarray, spacing: tuple[float, ...]) -> float:
    """The symmetric 95th-percentile Hausdorff distance (mm) between two binary masks' surfaces, NaN when either is
    empty: MONAI's `compute_hausdorff_distance(percentile=95)` exactly (surface = mask minus its binary erosion,
    nearest surface voxel by a KD-tree, float32 linear quantile), without its per-call transform overhead (10x)."""
    from scipy.ndimage import binary_erosion
    from scipy.spatial import KDTree

    if not (pred.any() and reference.any()):
        return math.nan
    box = tuple(slice(a.min(), a.max() + 1) for a in np.nonzero(pred | reference))  # erosion treats outside as 0
    scale = np.asarray(spacing, dtype=np.float64)
    surfaces = [np.argwhere(m ^ binary_erosion(m)).astype(np.float64) * scale for m in (pred[box], reference[box])]
    directed = [KDTree(to, leafsize=32).query(frm, k=1)[0] for frm, to in (surfaces, surfaces[::-1])]
    return max(float(torch.quantile(torch.from_numpy(d).float(), 0.95)) for d in directed)


def volume_dice(pred: torch.Tensor, reference: torch.Tensor, labels: dict[str, int]) -> dict[str, float]:
    """Dice per foreground label of `labels` (`dice_<name>`, NaN when absent from the reference) and their mean
    (`dice`). Only the labels given are scored: a protocol passes its `scored_labels`, so labels without ground
    truth at its sites count nowhere."""
    from monai.metrics import compute_dice

    scored = _foreground(labels)
    values = list(scored.values())
    dice = compute_dice(_masks(pred, values), _masks(reference, values), include_background=True,
                        ignore_empty=True)[0]
    out = {f"dice_{name}": float(d) for name, d in zip(scored, dice, strict=True)}
    out["dice"] = _nanmean(dice)
    return out


def _nanmean(values: torch.Tensor) -> float:
    values = values[~torch.isnan(values)]
    return float(values.mean()) if len(values) else math.nan


COLLAPSE_FRACTION = 0.2
"""A prediction whose foreground falls below this fraction of the unadapted prediction's foreground has collapsed
(with labels: of all scored foreground labels together; label-free: of any one label)."""


def collapse_reason(pred: torch.Tensor, reference: torch.Tensor, labels: dict[str, int],
                    source_pred: torch.Tensor) -> str:
    """Why an adapted prediction counts as collapsed, '' when it does not: a scored foreground label of the
    reference is absent from it, or its scored foreground is below `COLLAPSE_FRACTION` of the unadapted
    prediction's (`source_pred`) of the same volume."""
    scored = _foreground(labels)
    present = set(torch.unique(pred).tolist())
    reasons = [f"{name} vanished" for name, value in scored.items()
               if value not in present and bool((reference == value).any())]
    kept, before = foreground_voxels(pred, labels), foreground_voxels(source_pred, labels)
    if before and kept < COLLAPSE_FRACTION * before:
        reasons.append(f"foreground at {kept / before:.0%} of unadapted")
    return "; ".join(reasons)


def foreground_voxels(pred: torch.Tensor, labels: dict[str, int]) -> int:
    """Voxels of `pred` in a scored foreground label."""
    return int(torch.isin(pred, torch.tensor(list(_foreground(labels).values()))).sum())


def dice_recovery(adapted: float, source: float, in_domain: float) -> float:
    """(adapted - source) / (in_domain - source): 1 closes the domain gap, 0 does nothing, < 0 harms.
    NaN when there is no gap to close (in-domain Dice not above source Dice)."""
    gap = in_domain - source
    return (adapted - source) / gap if gap > 1e-6 else math.nan


RECOVERY_RANGE = (-1.0, 1.5)
"""Recoveries outside this range rest on a gap too small for the change measured: they are flagged, with why."""


def recovery_flag(adapted: float, source: float, in_domain: float) -> str:
    """Why a site's recovery is outside `RECOVERY_RANGE`, '' when it is inside (or undefined)."""
    recovery, gap = dice_recovery(adapted, source, in_domain), in_domain - source
    low, high = RECOVERY_RANGE
    if math.isnan(recovery) or low <= recovery <= high:
        return ""
    if recovery > high:
        return (f"adapted Dice {adapted:.3f} is above the in-domain Dice {in_domain:.3f} (the source model's on its "
                f"own site), so the gap of {gap:.3f} it is measured against understates what adaptation can reach")
    return (f"adapted Dice {adapted:.3f} fell {source - adapted:.3f} below unadapted, more than the gap of {gap:.3f} "
            "to the in-domain Dice: a small gap magnifies the harm")


def site_recovery_flag(summary: dict[str, float], in_domain: float) -> str:
    """`recovery_flag` of a site's summary (its mean Dice adapted and unadapted)."""
    return recovery_flag(summary.get("dice", math.nan), summary.get("dice_source", math.nan), in_domain)


def mean(values: list[float]) -> float:
    """Mean ignoring NaN; NaN when nothing is left."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def label_free_indicators(pred: torch.Tensor, source_pred: torch.Tensor, labels: dict[str, int],
                          spacing: tuple[float, ...]) -> dict[str, Any]:
    """What can be said of an adapted prediction without a reference, against the unadapted one of the same volume:
    the fraction of voxels whose label changed (`changed_vs_source`), the volume of each scored foreground label in
    mL (`volume_<name>_ml`) and as a fraction of the unadapted volume (`volume_ratio_<name>`, NaN when the unadapted
    prediction has none), and a collapse flag (`collapsed`) with its reasons (`collapse`): a label of the unadapted
    prediction that vanished, or shrank below `COLLAPSE_FRACTION` of it."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    out: dict[str, Any] = {"changed_vs_source": float((pred != source_pred).float().mean())}
    reasons = []
    for name, value in _foreground(labels).items():
        count, before = int((pred == value).sum()), int((source_pred == value).sum())
        ratio = count / before if before else math.nan
        out[f"volume_{name}_ml"] = count * voxel_ml
        out[f"volume_ratio_{name}"] = ratio
        if before and count == 0:
            reasons.append(f"{name} vanished")
        elif ratio < COLLAPSE_FRACTION:
            reasons.append(f"{name} at {ratio:.0%} of source")
    out["collapsed"] = bool(reasons)
    out["collapse"] = "; ".join(reasons)
    return out
