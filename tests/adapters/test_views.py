"""Augmented views: every view maps back onto the original grid, so averaged predictions line up."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medtta.adapters.views import AffineView, View, all_flips, mean_probabilities


@pytest.mark.parametrize("view", [View(turns, flips) for turns in range(4) for flips in all_flips(2)])
def test_geometric_views_invert_exactly(view: View) -> None:
    x = torch.randn(2, 3, 16, 24)  # not square: quarter turns swap the axes
    assert torch.equal(view.invert(view.apply(x), (16, 24)), x)


@pytest.mark.parametrize("view", [View(turns, flips) for turns in (0, 1) for flips in all_flips(3)])
def test_3d_views_flip_every_axis_and_invert_exactly(view: View) -> None:
    x = torch.randn(2, 1, 8, 16, 24)
    assert torch.equal(view.invert(view.apply(x), (8, 16, 24)), x)
    assert len(all_flips(3)) == 8 and len(set(all_flips(3))) == 8


def test_3d_affine_view_inverts_where_it_reached() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 16, 16)
    view = AffineView.random(2, 0.05, spatial_dims=3)
    assert view.theta.shape == (2, 3, 4)
    back, seen = view.invert(view.apply(x), (16, 16, 16)), view.seen((16, 16, 16))
    assert seen.shape == (2, 1, 16, 16, 16) and seen.float().mean() > 0.5
    identity = AffineView(torch.eye(3, 4).expand(2, 3, 4))
    assert torch.allclose(identity.invert(identity.apply(x), (16, 16, 16)), x, atol=1e-5)
    assert (back - x)[seen.expand_as(x)].abs().mean() < (x - x.mean()).abs().mean()


def test_scaled_view_maps_back_to_the_grid() -> None:
    x = torch.zeros(1, 1, 32, 32)
    x[..., 8:24, 8:24] = 1
    view = View(flips=(-1,), scale=0.5)
    assert view.apply(x).shape[-2:] == (16, 16)
    back = view.invert(view.apply(x), (32, 32))
    assert back.shape == x.shape and ((back > 0.5) == (x > 0.5)).float().mean() > 0.97


def test_contrast_keeps_each_slice_mean() -> None:
    x = torch.rand(3, 1, 8, 8) * 5
    y = View(contrast=1.1).apply(x)
    assert torch.allclose(y.mean((-2, -1)), x.mean((-2, -1)), atol=1e-5)
    assert torch.allclose(y.std((-2, -1)), 1.1 * x.std((-2, -1)), atol=1e-5)


def test_averaging_over_views_of_a_pointwise_model_changes_nothing() -> None:
    """A per-pixel model commutes with flips and turns: averaging over them gives its own probabilities."""
    model = nn.Conv2d(1, 4, 1)
    x = torch.randn(2, 1, 16, 16)
    views = [View(turns, flips) for turns in range(4) for flips in all_flips(2)]
    assert torch.allclose(mean_probabilities(model, x, views), model(x).softmax(1), atol=1e-6)
