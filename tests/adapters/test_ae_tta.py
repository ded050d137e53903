"""ae-tta (He et al., MedIA 2021): the image adaptor, the autoencoded levels, the test-time schedule, and no harm on
the source site."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medtta.models import build_network
from medtta.registry import ADAPTERS


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean((-2, -1)), x.std((-2, -1))


@pytest.fixture
def adapter() -> nn.Module:
    torch.manual_seed(0)
    return ADAPTERS.create("ae-tta", build_network("unet-autoencoders", 1, 4).eval())


@pytest.fixture
def volume() -> torch.Tensor:
    """Four slices on a per-volume z-score-like scale: each slice with its own mean and contrast."""
    g = torch.Generator().manual_seed(1)
    smooth = nn.functional.avg_pool2d(torch.randn(4, 1, 40, 40, generator=g), 9, stride=1)
    scale, shift = torch.tensor([0.5, 1.0, 1.5, 2.0]).view(4, 1, 1, 1), torch.arange(4.0).view(4, 1, 1, 1)
    return smooth / smooth.std() * scale + shift


def test_image_adaptor_is_he_et_al_adpnet(adapter: nn.Module) -> None:
    """1x1 convs 1 -> 64 -> 64 -> 1, each followed by LeakyReLU(0.2) then InstanceNorm (models/adapmodel.py)."""
    layers = [m for m in adapter.image_adaptor.modules() if isinstance(m, (nn.Conv2d, nn.LeakyReLU, nn.InstanceNorm2d))]
    assert [type(m) for m in layers] == [nn.Conv2d, nn.LeakyReLU, nn.InstanceNorm2d] * 3
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in layers[::3]] == [(1, 64, (1, 1)), (64, 64, (1, 1)),
                                                                                     (64, 1, (1, 1))]
    assert {m.negative_slope for m in layers[1::3]} == {0.2} and not any(m.affine for m in layers[2::3])


def test_image_adaptor_keeps_every_slices_mean_and_contrast(adapter: nn.Module, volume: torch.Tensor) -> None:
    """Adam steps on the reconstruction errors cannot shrink the input's contrast (the residual adaptor this replaces
    cut it to 0.76x in one step): each output slice has its input slice's mean and standard deviation."""
    for _ in range(3):
        adapter.update(volume)
    with torch.no_grad():
        adapted = adapter.image_adaptor(volume)
    assert not torch.allclose(adapted, volume, atol=1e-2)  # it did change the image
    for got, expected in zip(_moments(adapted), _moments(volume), strict=True):
        assert torch.allclose(got, expected, rtol=1e-3, atol=1e-4)


def test_stable_passes_fit_the_image_adaptor_to_the_identity(adapter: nn.Module, volume: torch.Tensor) -> None:
    """He et al.'s random start is a random intensity curve; their stable passes bring it near the identity."""
    def error() -> float:
        with torch.no_grad():
            return float((adapter.image_adaptor(volume) - volume).norm() / volume.norm())

    start = error()
    assert start > 0.5
    adapter.stabilize(volume)  # 5 passes of 4 slices: 20 Adam steps
    assert error() < start / 4


def test_autoencoders_tap_the_input_encoder_and_decoder_features_and_the_output(adapter: nn.Module) -> None:
    model = adapter.model
    x = torch.randn(2, 1, 64, 48)
    features = model.tapped_features(x)
    assert [tuple(f.shape[1:]) for f in features] == [(1, 64, 48), (32, 32, 24), (64, 16, 12), (192, 8, 6),
                                                      (4, 64, 48)]  # encoder + decoder channels per resolution
    assert torch.equal(features[0], x) and torch.equal(features[-1], model(x))
    assert len(model.autoencoders) + 1 == len(model.reconstruction_losses(features)) == 5
    with torch.no_grad():  # the output's autoencoder is part of the adaptation objective
        before = float(adapter.objective(x)[0])
        model.output_autoencoder.decode[-1].resunit.conv.unit0.conv.bias.add_(1.0)
        assert float(adapter.objective(x)[0]) != pytest.approx(before)


def _scripted(adapter: nn.Module, monkeypatch: pytest.MonkeyPatch, pass_losses: list[float], slices: int) -> list:
    """Make the objective return `pass_losses[k]` on every slice of pass k; returns the list of batch sizes seen."""
    seen = []

    def objective(x: torch.Tensor) -> tuple[torch.Tensor, None]:
        seen.append(len(x))
        anchor = sum(p.sum() for p in adapter.params) * 0.0
        return anchor + pass_losses[min((len(seen) - 1) // slices, len(pass_losses) - 1)], None

    monkeypatch.setattr(adapter, "objective", objective)
    return seen


def test_episodic_schedule_steps_per_slice_for_up_to_ten_passes(adapter: nn.Module, volume: torch.Tensor,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """train.py --test with scripts/test_oct.sh: one Adam step per slice (--batch-size=1), --tepochs=10 passes."""
    assert type(adapter).default_steps == 10 and adapter.hparams["step_slices"] == 1
    seen = _scripted(adapter, monkeypatch, [10.0 - k for k in range(10)], len(volume))
    adapter.adapt(volume, steps=10, batch_size=32)  # the engine's batch size only sets the prediction batches
    assert seen == [1] * 40
    assert all(s["step"] == 40 for s in adapter.optimizer.state.values())  # fresh Adam after the stable passes


def test_episodic_schedule_stops_after_the_first_pass_whose_loss_rises(adapter: nn.Module, volume: torch.Tensor,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _scripted(adapter, monkeypatch, [3.0, 2.0, 2.5, 1.0], len(volume))
    adapter.adapt(volume, steps=10, batch_size=32)
    assert len(seen) == 3 * len(volume)  # the third pass rose: its steps are kept and adaptation stops
