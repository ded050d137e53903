"""DG-TTA: the affine views invert exactly, the consistency loss vanishes only when the views agree, and the
hyper-parameters reach the method."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medtta.adapters.base import MixedBatchNorm
from medtta.adapters.dg_tta import DGTTA
from medtta.adapters.views import AffineView
from medtta.errors import RegistryError
from medtta.models import build_network


def _smooth(n: int, size: tuple[int, int] = (32, 32)) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, size[0]), torch.linspace(-1, 1, size[1]), indexing="ij")
    return (torch.sin(3 * x) * torch.cos(2 * y)).expand(n, 1, *size).clone()


def _eroded(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """`mask` shrunk by `pixels`, the slice's own border counting as outside."""
    inside = F.pad(mask.float(), (pixels,) * 4)
    return -F.max_pool2d(-inside, 2 * pixels + 1, 1) > 0.5


@pytest.fixture
def unet() -> nn.Module:
    torch.manual_seed(0)
    net = build_network("unet", 1, 4)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(4, 1, 32, 32) * 2 + 1)
    return net.eval()


def test_warping_there_and_back_is_the_identity_on_the_interior() -> None:
    torch.manual_seed(0)
    x = _smooth(8, (32, 24))
    view = AffineView.random(8, strength=0.05)
    back = view.invert(view.apply(x), (32, 24))
    seen = view.seen((32, 24))
    assert 0.6 < seen.float().mean() < 1  # the warps move some pixels out of view
    interior = _eroded(seen, 2)
    error = (back - x).abs()[interior]
    assert error.max() < 0.03 and error.mean() < 0.01  # two bilinear resamplings of a smooth image
    wrong = AffineView(view.inverse()).invert(view.apply(x), (32, 24))  # the warp applied twice
    assert (wrong - x).abs()[interior].max() > 0.05


def test_inverse_of_the_inverse_is_the_map() -> None:
    view = AffineView.random(4, strength=0.2)
    assert torch.allclose(AffineView(view.inverse()).inverse(), view.theta, atol=1e-5)


def test_seen_leaves_out_what_a_translation_moves_out_of_view() -> None:
    theta = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]])  # the view samples the slice a quarter width right
    seen = AffineView(theta).seen((16, 16))[0, 0]
    assert AffineView(torch.eye(2, 3)[None]).seen((16, 16)).all()
    assert not seen[:, :4].any() and seen[:, 5:].all()  # the slice's left quarter has no view pixel


@torch.no_grad()
def test_consistency_is_zero_without_warps(unet: nn.Module) -> None:
    adapter = DGTTA(unet, strength=0.0)
    x = torch.randn(6, 1, 32, 32)
    assert float(adapter.consistency(x)) < 1e-5


@torch.no_grad()
def test_consistency_is_near_zero_for_an_equivariant_model_and_positive_otherwise(unet: nn.Module) -> None:
    x = _smooth(6) * 3
    torch.manual_seed(0)
    pointwise = float(DGTTA(nn.Conv2d(1, 4, 1), norm="source").consistency(x))  # commutes with any warp
    torch.manual_seed(0)
    network = float(DGTTA(unet, norm="source").consistency(x))
    assert pointwise < 1e-3 and network > 10 * pointwise


def test_an_episodic_pass_is_one_update(unet: nn.Module) -> None:
    adapter = DGTTA(unet)
    adapter.adapt(torch.randn(6, 1, 32, 32), steps=3, batch_size=4)  # two batches per pass
    assert {int(s["step"]) for s in adapter.optimizer.state.values()} == {3}


@pytest.mark.parametrize("norm", ["batch", "source"])
def test_norm_picks_the_statistics_and_the_weights(unet: nn.Module, norm: str) -> None:
    adapter = DGTTA(unet, norm=norm)
    layers = [m for m in adapter.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(isinstance(m, MixedBatchNorm) == (norm == "batch") for m in layers)
    every = len(list(adapter.model.parameters()))
    assert (len(adapter.params) == every) == (norm == "source")  # batch statistics cancel the conv biases


def test_optimizer_hyper_parameters_reach_adamw(unet: nn.Module) -> None:
    adapter = DGTTA(unet, lr=3e-5, weight_decay=0.5)
    assert isinstance(adapter.optimizer, torch.optim.AdamW)
    assert [(g["lr"], g["weight_decay"]) for g in adapter.optimizer.param_groups] == [(3e-5, 0.5)]
    with pytest.raises(RegistryError, match="norm must be one of batch, source"):
        DGTTA(unet, norm="instance")


def test_ensemble_averages_independent_adaptations(unet: nn.Module) -> None:
    x = torch.randn(6, 1, 32, 32)
    adapter = DGTTA(unet, ensemble=2, lr=1e-3)
    torch.manual_seed(0)
    adapter.adapt(x, steps=1, batch_size=6)
    first, second = adapter.members
    assert any(not torch.equal(first[k], second[k]) for k in first)  # each adapted with its own warps
    probabilities = []
    for state in (first, second):
        adapter.model.load_state_dict(state)
        with torch.no_grad():
            probabilities.append(adapter.model(x).softmax(1))
    expected = torch.stack(probabilities).mean(0)
    assert torch.allclose(adapter.predict(x).exp(), expected, atol=1e-5)
    adapter.reset()
    assert adapter.members == []
