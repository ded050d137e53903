"""Test-time training as Sun et al. and Gandelsman et al. run it: a learnable rotation task (horizontal flips
only), the auxiliary pass on the batch statistics its head was trained with, and MAE's per-patch normalized target."""

from __future__ import annotations

import copy

import pytest
import torch

from medtta.engine import create_adapter
from medtta.models import build_network
from medtta.models.base import batch_statistics
from medtta.models.ttt import random_flips


def _validation_slices(source) -> torch.Tensor:
    return torch.cat([source.volumes.get(case).x for case in source.dataset.cases_of("A", "val")])


def test_random_flips_only_mirror_the_lateral_axis() -> None:
    x = torch.randn(64, 1, 8, 8)
    torch.manual_seed(0)
    flipped = random_flips(x)
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(-2)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()


def test_a_half_turn_of_a_layered_b_scan_never_looks_like_a_flipped_copy() -> None:
    """An OCT B-scan (H lateral, W depth) with layers that change with depth only: a 180° rotation turns it upside
    down, which no flip of the augmentation may do, or the rotation task cannot tell 0° from 180° (measured before
    the fix: rotation accuracy 0.47-0.50 on synth-oct's source validation slices)."""
    depth_profile = torch.linspace(0, 1, 8) ** 2
    scan = depth_profile.expand(1, 1, 8, 8).clone()  # every A-scan alike: symmetric left-right
    copies = random_flips(scan.expand(32, 1, 8, 8))
    half_turns = torch.rot90(copies, 2, dims=(-2, -1))
    assert not (half_turns[:, None] == copies[None]).flatten(2).all(2).any()


def test_the_rotation_head_tells_the_four_rotations_apart_on_source_validation_slices(trained_sources) -> None:
    """With flips up-down too, k and k + 2 quarter turns gave identical inputs: accuracy 0.5 at best."""
    model = trained_sources("unet-rotation").model
    slices = _validation_slices(trained_sources("unet-rotation"))
    torch.manual_seed(0)
    with torch.no_grad(), batch_statistics(model):  # as the head was trained
        logits, rotations = model.rotation_logits(slices)
    assert (logits.argmax(1) == rotations).float().mean() > 0.75


@pytest.mark.parametrize("architecture", ["unet-rotation", "unet-mae"])
def test_the_auxiliary_pass_uses_batch_statistics_and_keeps_the_source_ones(architecture: str,
                                                                            trained_sources) -> None:
    """The head was trained on the rotated or masked copies' batch statistics: at test time the auxiliary loss on
    source slices is lower with them than with the source running statistics, and the running statistics that
    prediction uses stay as they were."""
    source = trained_sources(architecture)
    slices = _validation_slices(source)
    adapter = create_adapter("ttt-rot" if architecture == "unet-rotation" else "ttt-mae",
                             copy.deepcopy(source.model), source.record)
    running = {k: v.clone() for k, v in adapter.model.state_dict().items() if "running" in k}
    torch.manual_seed(0)
    with torch.no_grad():
        batch_loss = float(adapter.objective(slices)[0])
    torch.manual_seed(0)
    with torch.no_grad():
        running_loss = float(adapter.model.auxiliary_loss(slices))  # eval mode: the source running statistics
    assert batch_loss < running_loss
    adapter.update(slices)
    assert all(torch.equal(v, adapter.model.state_dict()[k]) for k, v in running.items())
    assert not adapter.model.training


def test_mae_target_is_each_patch_normalized() -> None:
    model = build_network("unet-mae", 1, 3)
    x = torch.randn(2, 1, 16, 24) * 5 + 3
    target = model.normalized_patches(x)
    patches = target.unfold(-2, model.patch, model.patch).unfold(-2, model.patch, model.patch).flatten(-2)
    assert torch.allclose(patches.mean(-1), torch.zeros(()), atol=1e-5)
    assert torch.allclose(patches.var(-1), torch.ones(()), atol=1e-3)
