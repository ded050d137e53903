"""Adapters: exactly which parameters change, exact reset, batch statistics, and the two settings."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medtta.engine import adapt_and_predict
from medtta.errors import RegistryError
from medtta.models import build_network
from medtta.registry import ADAPTERS


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    net = build_network("unet", 1, 4)
    net.train()
    with torch.no_grad():  # give BatchNorm non-trivial source statistics
        for _ in range(3):
            net(torch.randn(4, 1, 32, 32) * 2 + 1)
    return net.eval()


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(6, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 3 - 2


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def _bn_affine_keys(model: nn.Module) -> set[str]:
    layers = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    return {f"{name}.{p}" for name in layers for p in ("weight", "bias")}


def test_tent_updates_exactly_the_batchnorm_affine_parameters(model: nn.Module, batch: torch.Tensor) -> None:
    expected = _bn_affine_keys(model)
    before = copy.deepcopy(model.state_dict())
    tent = ADAPTERS.create("tent", model)
    assert {id(p) for p in tent.params} == {id(p) for n, p in model.named_parameters() if n in expected}
    tent.update(batch)
    assert _changed(before, model.state_dict()) == expected  # running statistics and conv weights untouched


def test_reset_restores_the_exact_state(model: nn.Module, batch: torch.Tensor) -> None:
    tent = ADAPTERS.create("tent", model, lr=1e-2)
    initial_state = copy.deepcopy(model.state_dict())
    first = tent.predict(batch)
    for _ in range(3):
        tent.update(batch)
    assert not torch.equal(tent.predict(batch), first)
    tent.reset()
    assert _changed(initial_state, model.state_dict()) == set()
    assert torch.equal(tent.predict(batch), first)
    assert tent.optimizer.state_dict()["state"] == {}  # Adam moments are gone too
    tent.update(batch)  # and the first step after a reset is the first step of a fresh adapter
    fresh = ADAPTERS.create("tent", copy.deepcopy(build_network("unet", 1, 4)), lr=1e-2)
    fresh.model.load_state_dict(initial_state)
    fresh.update(batch)
    assert torch.equal(fresh.predict(batch), tent.predict(batch))


def test_bn_stats_normalizes_with_test_batch_statistics(model: nn.Module, batch: torch.Tensor) -> None:
    reference = copy.deepcopy(model).train()  # train-mode BatchNorm = batch statistics
    with torch.no_grad():
        expected = reference(batch)
    before = copy.deepcopy(model.state_dict())
    adapter = ADAPTERS.create("bn-stats", model)
    assert torch.allclose(adapter(batch), expected, atol=1e-4)
    assert _changed(before, model.state_dict()) == set()  # source statistics kept as they are


def test_bn_stats_source_weight_one_is_the_source_model(model: nn.Module, batch: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(batch)
    adapter = ADAPTERS.create("bn-stats", copy.deepcopy(model), source_weight=1.0)
    assert torch.allclose(adapter(batch), expected, atol=1e-4)
    halfway = ADAPTERS.create("bn-stats", copy.deepcopy(model), source_weight=0.5)(batch)
    assert not torch.allclose(halfway, expected, atol=1e-3)


def test_source_changes_nothing(model: nn.Module, batch: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(batch)
    before = copy.deepcopy(model.state_dict())
    adapter = ADAPTERS.create("source", model)
    assert torch.equal(adapter(batch), expected)
    assert adapter.params == [] and _changed(before, model.state_dict()) == set()


def test_unknown_hyper_parameter(model: nn.Module) -> None:
    with pytest.raises(RegistryError, match="Tent has no hyper-parameter lrr \\(known: lr\\)"):
        ADAPTERS.create("tent", model, lrr=0.1)


def test_continual_predicts_before_updating(model: nn.Module, batch: torch.Tensor) -> None:
    tent = ADAPTERS.create("tent", model, lr=1e-2)
    unadapted = tent.predict(batch)
    first = adapt_and_predict(tent, batch, "continual", steps=1, batch_size=len(batch))
    assert torch.equal(first, unadapted)  # predicted, then updated
    second = adapt_and_predict(tent, batch, "continual", steps=1, batch_size=len(batch))
    assert not torch.equal(second, unadapted)  # no reset between volumes


def test_episodic_updates_then_predicts_and_resets(model: nn.Module, batch: torch.Tensor) -> None:
    tent = ADAPTERS.create("tent", model, lr=1e-2)
    unadapted = torch.cat([tent.predict(b) for b in batch.split(3)])
    first = adapt_and_predict(tent, batch, "episodic", steps=2, batch_size=3)
    assert not torch.equal(first, unadapted)
    again = adapt_and_predict(tent, batch, "episodic", steps=2, batch_size=3)
    assert torch.equal(first, again)  # reset per volume: the same volume gives the same answer
    assert torch.equal(adapt_and_predict(tent, batch, "episodic", steps=0, batch_size=3), unadapted)
