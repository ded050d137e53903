"""Augmented views: every view maps back onto the original grid, so averaged predictions line up."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medtta.adapters.views import View, mean_probabilities


@pytest.mark.parametrize("view", [View(turns, flip) for turns in range(4) for flip in (False, True)])
def test_geometric_views_invert_exactly(view: View) -> None:
    x = torch.randn(2, 3, 16, 24)  # not square: quarter turns swap the axes
    assert torch.equal(view.invert(view.apply(x), (16, 24)), x)


def test_scaled_view_maps_back_to_the_grid() -> None:
    x = torch.zeros(1, 1, 32, 32)
    x[..., 8:24, 8:24] = 1
    view = View(flip=True, scale=0.5)
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
    views = [View(turns, flip) for turns in range(4) for flip in (False, True)]
    assert torch.allclose(mean_probabilities(model, x, views), model(x).softmax(1), atol=1e-6)
