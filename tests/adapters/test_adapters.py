"""Adapters: exactly which parameters change, exact reset, batch statistics, and the two settings."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medtta.adapters.base import PARADIGMS
from medtta.adapters.views import View
from medtta.data.preprocess import to_native
from medtta.engine import adapt_and_predict, create_adapter
from medtta.errors import MedttaError, RegistryError
from medtta.metrics import volume_dice
from medtta.models import build_network
from medtta.models.base import weights_under_batch_statistics
from medtta.precision import autocast
from medtta.registry import ADAPTERS, ARCHITECTURES

METHODS = ADAPTERS.list()
SMALL = {"sam-tiny": {"image_size": 32}}  # the contract holds at any input size: 4 x 4 tokens keep it fast


def norms_of(method: str) -> tuple[str, ...]:
    """The normalizations the method declares, where its architecture is built with one (`-a norm`)."""
    cls = ADAPTERS.get(method)
    return cls.norms if "norm" in ARCHITECTURES.get(cls.architecture).defaults else ("batch",)


#: (method, norm) for every norm each method declares: the contract holds on each
CONTRACT = [pytest.param(m, n, id=f"{m}-{n}") for m in METHODS for n in norms_of(m)]


def _source_like(architecture: str, norm: str = "batch") -> nn.Module:
    """A fresh network with non-trivial BatchNorm statistics, as a trained source model has."""
    torch.manual_seed(0)
    config = {**SMALL.get(architecture, {}), **({"norm": norm} if norm != "batch" else {})}
    net = build_network(architecture, 1, 4, **config)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(4, 1, 32, 32) * 2 + 1)
    return net.eval()


@pytest.fixture
def model() -> nn.Module:
    return _source_like("unet")


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(6, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 3 - 2


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def _snapshot(adapter: nn.Module) -> dict[str, torch.Tensor]:
    return copy.deepcopy(adapter.state_dict())


def _source_stats(cls: type, model: nn.Module) -> dict[str, torch.Tensor]:
    """The method's source statistics, computed by its hook on two random source volumes."""
    g = torch.Generator().manual_seed(2)
    volumes = [(torch.randn(5, 1, 32, 32, generator=g) * 2 + 1, torch.randint(0, 4, (5, 32, 32), generator=g))
               for _ in range(2)]
    return cls.source_statistics(model, volumes)


def _adapter(method: str, norm: str = "batch", **hparams) -> nn.Module:
    cls = ADAPTERS.get(method)
    model = _source_like(cls.architecture, norm)
    if cls.statistics:  # as the engine does, from the cache source training fills
        hparams["source_stats"] = _source_stats(cls, model)
    return ADAPTERS.create(method, model, **hparams)


# The contract every registered adapter passes (a new method gets these tests by registering).

@pytest.mark.parametrize(("method", "norm"), CONTRACT)
def test_update_changes_exactly_the_collected_parameters(method: str, norm: str, batch: torch.Tensor) -> None:
    adapter = _adapter(method, norm)
    collected = {name for name, p in adapter.named_parameters() if any(p is q for q in adapter.params)}
    before = _snapshot(adapter)
    for _ in range(2):  # an adaptor starting at exact identity moves all its weights from the second step
        adapter.update(batch)
    changed = _changed(before, adapter.state_dict())  # every tensor of the state dict compared
    assert collected <= changed and changed - collected <= adapter.tracked_state()  # a teacher's EMA may round away
    assert set(adapter.hparams) == set(type(adapter).defaults)
    assert type(adapter).paradigm in PARADIGMS


@pytest.mark.parametrize(("method", "norm"), CONTRACT)
def test_reset_restores_the_exact_state(method: str, norm: str, batch: torch.Tensor) -> None:
    adapter = _adapter(method, norm)
    initial = _snapshot(adapter)
    torch.manual_seed(0)
    first = adapter(batch)
    adapter.adapt(batch, steps=2, batch_size=4)
    adapter.reset()
    assert _changed(initial, adapter.state_dict()) == set()
    assert adapter.optimizer is None or adapter.optimizer.state_dict()["state"] == {}  # no leftover moments
    torch.manual_seed(0)
    assert torch.equal(adapter(batch), first)


@pytest.mark.parametrize(("method", "norm"), CONTRACT)
@pytest.mark.parametrize("setting", ["episodic", "continual"])
def test_runs_in_both_settings(method: str, norm: str, setting: str, batch: torch.Tensor) -> None:
    adapter = _adapter(method, norm)
    outputs = []
    for _ in range(2):
        torch.manual_seed(0)
        outputs.append(adapt_and_predict(adapter, batch, setting, steps=2, batch_size=4))
    assert outputs[0].shape == (6, 4, 32, 32) and torch.isfinite(outputs[0]).all()
    if setting == "episodic":  # reset per volume: the same volume gives the same answer
        assert torch.equal(outputs[0], outputs[1])
    elif adapter.params:  # no reset: the second pass sees the adapted model
        assert not torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("method", METHODS)
def test_adapts_under_bf16_autocast(method: str, batch: torch.Tensor) -> None:
    """`--precision bf16` (how close it stays to fp32 on trained models: benchmarks/precision.py): updates move
    the collected parameters and nothing else, the prediction is finite, a reset is exact."""
    adapter, cpu = _adapter(method), torch.device("cpu")
    adapter.use_precision("bf16", cpu)
    collected = {name for name, p in adapter.named_parameters() if any(p is q for q in adapter.params)}
    before = _snapshot(adapter)
    with autocast("bf16", cpu):
        for _ in range(2):
            adapter.update(batch)
        changed = _changed(before, adapter.state_dict())
        assert changed - collected <= adapter.tracked_state() and bool(changed & collected) == bool(collected)
        adapter.reset()
        assert _changed(before, adapter.state_dict()) == set()
        logits = adapt_and_predict(adapter, batch, "episodic", steps=2, batch_size=4)
    assert logits.shape == (6, 4, 32, 32) and torch.isfinite(logits).all()


def test_fp16_scales_the_loss_and_steps_as_fp32(model: nn.Module, batch: torch.Tensor) -> None:
    """fp16 gradients go through a GradScaler: `backward` scales the loss, `optimizer_step` unscales before Adam."""
    steps = {}
    for precision in ("fp32", "fp16"):
        adapter = ADAPTERS.create("tent", copy.deepcopy(model))
        adapter.use_precision(precision, torch.device("cpu"))
        loss, _ = adapter.objective(batch)
        adapter.backward(loss)
        grad = adapter.params[0].grad.clone()
        before = adapter.params[0].detach().clone()
        adapter.optimizer_step()
        steps[precision] = (grad, adapter.params[0].detach() - before)
    scale = 2.0 ** 16  # GradScaler's initial scale
    assert torch.allclose(steps["fp16"][0], steps["fp32"][0] * scale, rtol=1e-4)
    assert torch.allclose(steps["fp16"][1], steps["fp32"][1], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_hyper_parameters_reach_the_method(method: str) -> None:
    cls = ADAPTERS.get(method)
    for key, value in cls.defaults.items():
        changed = value * 2 if isinstance(value, (int, float)) else value
        adapter = _adapter(method, **{key: changed})
        assert adapter.hparams[key] == changed
        if key == "lr":
            assert {g["lr"] for g in adapter.optimizer.param_groups} == {changed}
    known = ", ".join(cls.defaults) or "none"
    with pytest.raises(RegistryError, match=rf"{cls.__name__} has no hyper-parameter bogus \(known: {known}\)"):
        _adapter(method, bogus=1)


@pytest.mark.parametrize("method", [m for m in METHODS if ADAPTERS.get(m).statistics])
def test_source_statistics_leave_the_model_as_it_is_and_are_required(method: str) -> None:
    cls = ADAPTERS.get(method)
    model = _source_like(cls.architecture)
    before, trainable, training = _snapshot(model), [p.requires_grad for p in model.parameters()], model.training
    stats = _source_stats(cls, model)
    assert stats and all(torch.isfinite(v).all() for v in stats.values())
    assert _changed(before, model.state_dict()) == set() and model.training == training
    assert [p.requires_grad for p in model.parameters()] == trainable
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(MedttaError, match=f"needs the source statistics '{cls.statistics}'"):
        ADAPTERS.create(method, model)


#: how much Dice adapting where there is no shift may cost (the source site's own test volumes)
HARM_TOLERANCE = 0.02


#: (method, setting) pairs known to break the invariant on the test suite's small model, with what was measured
#: (strict: a pair that starts passing must leave this list)
KNOWN_HARM = {("ae-tta", "episodic"): "He et al.'s objective itself lowers source-site Dice on this 64 px model: "
              "0.811 -> 0.680 with autoencoders trained one volume per step (still failing with 2-slice steps); "
              "with 40-epoch autoencoders the logits loss alone gives 0.774, the feature "
              "losses alone 0.579, the image adaptor alone 0.778; lr 1e-4, ortho weight 10 or one pass still lose "
              ">= 0.03; -0.017 on a 128 px model; still failing with the output autoencoder in its own stage"}

#: pairs whose measured cost on this small model exceeds `HARM_TOLERANCE` but stays bounded, with the bound they
#: must keep. norm-net episodic: Karani's DAE, learnt from 6 label volumes, pulls the better-segmented volume towards
#: its coarser shape (0.907 -> 0.855) while it lifts the other; mean cost -0.003 to -0.028 over training seeds 0-3
#: on one CPU, -0.048 on another; Karani's loss on the DAE's grid and over every label costs more (-0.009 to -0.071)
WIDER_TOLERANCE = {("norm-net", "episodic"): 0.06}


@pytest.mark.parametrize(("method", "setting"), [
    pytest.param(m, s, marks=pytest.mark.xfail(reason=KNOWN_HARM[m, s], strict=True))
    if (m, s) in KNOWN_HARM
    else (m, s) for m in METHODS for s in ("episodic", "continual")])
def test_adapting_at_the_source_site_does_no_harm(method: str, setting: str, trained_sources) -> None:
    """Applied where there is no shift, a method must leave a trained source model about where it was: the mean
    Dice on the source site's test volumes after adaptation (the method's defaults) is at least the unadapted Dice
    minus `HARM_TOLERANCE` (or the pair's `WIDER_TOLERANCE`)."""
    before, after = _source_site_dice(method, setting, trained_sources(ADAPTERS.get(method).architecture), 32)
    tolerance = WIDER_TOLERANCE.get((method, setting), HARM_TOLERANCE)
    assert after >= before - tolerance, f"{method} ({setting}) lowers source-site Dice {before:.3f} -> {after:.3f}"


def _source_site_dice(method: str, setting: str, source, batch_size: int) -> tuple[float, float]:
    """Mean Dice of the source site's test volumes, unadapted and adapted by `method` (its defaults) in `setting`."""
    cls, p = ADAPTERS.get(method), source.protocol
    adapter = create_adapter(method, copy.deepcopy(source.model), source.record)
    adapter.patches_per_update = 2

    def dice(logits: torch.Tensor, volume) -> float:
        return volume_dice(to_native(logits, volume.volume, p.preprocessing), torch.as_tensor(volume.volume.label),
                           p.scored_labels)["dice"]

    unadapted, adapted = [], []
    torch.manual_seed(0)
    for volume in source.source_tests():
        with torch.no_grad():
            unadapted.append(dice(source.model(volume.x), volume))
        adapted.append(dice(adapt_and_predict(adapter, volume.x, setting, cls.default_steps, batch_size), volume))
    before = sum(unadapted) / len(unadapted)
    assert before > 0.6, f"the source model is not trained enough for the check: Dice {before:.3f}"
    return before, sum(adapted) / len(adapted)


#: a method that claims to adapt must change its softmax output on a shifted site by more than this (mean absolute
#: change; fp32 rounding is about 1e-7): below, it changes nothing a user could see (inert), however far its
#: parameters moved (a LoRA B moved from zero by the learning rate changes the effective weights by B·A only)
INERT_BELOW = 1e-4
#: measured on this 64 px model, site B, episodic with the method's defaults (the README says where they adapt)
KNOWN_INERT = {
    "sam-lora": "softmax 1.1e-05, labels on 2.4e-05 of pixels: one update from B = 0 per volume (SAM-TTA's one step "
                "per image, which it accumulates over a continual stream, never reset)",
    "ttt-rot": "softmax 9.5e-06, labels on 2.4e-05 of pixels: its 10 SGD steps on the rotation loss barely move the "
               "shared encoder here",
}


@pytest.mark.parametrize("method", [
    pytest.param(m, marks=pytest.mark.xfail(reason=KNOWN_INERT[m], strict=True)) if m in KNOWN_INERT else m
    for m in METHODS if ADAPTERS.get(m).paradigm != "none"])
def test_a_method_that_adapts_changes_its_prediction_on_a_shifted_site(method: str, trained_sources) -> None:
    """On site B's volume (another scanner than the source site A; episodic, the method's defaults): a method whose
    update rounds away is inert, and its "no harm" at the source site would be trivially true."""
    cls = ADAPTERS.get(method)
    source = trained_sources(cls.architecture)
    [case] = source.dataset.cases_of("B")
    x = source.volumes.get(case).x
    adapter = create_adapter(method, copy.deepcopy(source.model), source.record)
    torch.manual_seed(0)
    with torch.no_grad():
        unadapted = source.model(x).softmax(1)
    adapted = adapt_and_predict(adapter, x, "episodic", cls.default_steps, 32).softmax(1)
    change = float((adapted - unadapted).abs().mean())
    labels = float((adapted.argmax(1) != unadapted.argmax(1)).float().mean())
    assert change > INERT_BELOW, (f"{method} is inert on a shifted site: softmax changed by {change:.1e} (mean "
                                  f"absolute), labels on {labels:.1e} of the pixels")


#: every 3D method on BatchNorm; on InstanceNorm (nnU-Net's; GroupNorm is its kind) those adapting the `unet` itself:
#: an architecture of its own (ttt-rot) would train one more 3D source model
METHODS_3D = [pytest.param(m, n, id=f"{m}-{n}") for m in METHODS if 3 in ADAPTERS.get(m).spatial_dims
              for n in norms_of(m) if n == "batch" or (n == "instance" and ADAPTERS.get(m).architecture == "unet")]


@pytest.mark.parametrize(("method", "norm"), METHODS_3D)
@pytest.mark.parametrize("setting", ["episodic", "continual"])
def test_adapting_at_the_source_site_does_no_harm_in_3d(method: str, norm: str, setting: str,
                                                        trained_sources_3d) -> None:
    """The same on volumes: a 3D network, sliding-window predictions, patch updates (`HARM_TOLERANCE`)."""
    source = trained_sources_3d(norm, ADAPTERS.get(method).architecture)
    before, after = _source_site_dice(method, setting, source, 2)
    assert after >= before - HARM_TOLERANCE, (f"{method} ({setting}, {norm} norm) lowers source-site Dice "
                                              f"{before:.3f} -> {after:.3f}")


def test_window_statistics_of_source_volumes_stay_close_to_the_source_statistics(trained_sources_3d) -> None:
    """On the source site's own volumes, the statistics of the sliding windows are what BatchNorm learnt: every
    layer's mean within 0.25 source standard deviations of its running mean (averaged over channels)."""
    source = trained_sources_3d("batch")
    adapter = ADAPTERS.create("bn-stats", copy.deepcopy(source.model))
    layers = [m for m in adapter.model.modules() if hasattr(m, "volume_statistics")]
    for volume in source.source_tests():
        with adapter.window_statistics(volume.x):
            shifts = [float(((m.volume_statistics[0] - m.running_mean) / m.running_var.sqrt()).abs().mean())
                      for m in layers]
        assert max(shifts) < 0.25, [f"{s:.2f}" for s in shifts]


@pytest.mark.parametrize(("norm", "layer"), [("batch", nn.BatchNorm2d), ("instance", nn.InstanceNorm2d),
                                             ("group", nn.GroupNorm)])
def test_tent_updates_exactly_the_affine_parameters_of_the_network_norm(norm: str, layer: type,
                                                                        batch: torch.Tensor) -> None:
    model = _source_like("unet", norm)
    layers = [name for name, m in model.named_modules() if isinstance(m, layer)]
    expected = {f"model.{name}.{p}" for name in layers for p in ("weight", "bias")}
    tent = ADAPTERS.create("tent", model)
    before = _snapshot(tent)
    tent.update(batch)
    assert layers and _changed(before, tent.state_dict()) == expected  # statistics and conv weights untouched


@pytest.mark.parametrize("method", [m for m in METHODS if norms_of(m) == ("batch",) and
                                    "norm" in ARCHITECTURES.get(ADAPTERS.get(m).architecture).defaults])
@pytest.mark.parametrize("norm", ["instance", "group"])
def test_methods_that_need_batch_statistics_refuse_other_norms_naming_the_option(method: str, norm: str) -> None:
    refusal = ADAPTERS.get(method).norm_refusal(norm)
    assert "adapts BatchNorm networks" in refusal and f"-a norm={norm}" in refusal


def test_tta_aug_views_change_what_an_instance_norm_network_sees(batch: torch.Tensor) -> None:
    """InstanceNorm mostly undoes a linear contrast change (only the zero-padded borders see it); tta-aug gives an
    InstanceNorm network gamma views instead, which change its logits several times more, and keeps the contrast
    views for a BatchNorm network."""
    model = _source_like("unet", "instance")
    with torch.no_grad():
        plain = model(batch)

        def change(view: View) -> float:
            return float((model(view.apply(batch)) - plain).abs().mean())

        assert min(change(View(gamma=g)) for g in (0.75, 1.25)) > 4 * max(change(View(contrast=c)) for c in (0.9, 1.1))
    adapter = ADAPTERS.create("tta-aug", model)
    assert [(v.contrast, v.gamma) for v in adapter.views[2]] == [(1.0, 1.0), (1.0, 0.75), (1.0, 1.25)]
    assert [v.contrast for v in ADAPTERS.create("tta-aug", _source_like("unet")).views[2]] == [1.0, 0.9, 1.1]


def test_first_step_after_reset_is_the_first_step_of_a_fresh_adapter(model: nn.Module, batch: torch.Tensor) -> None:
    initial_state = copy.deepcopy(model.state_dict())
    tent = ADAPTERS.create("tent", model, lr=1e-2)
    for _ in range(3):
        tent.update(batch)
    tent.reset()
    tent.update(batch)
    fresh = ADAPTERS.create("tent", copy.deepcopy(build_network("unet", 1, 4)), lr=1e-2)
    fresh.model.load_state_dict(initial_state)
    fresh.update(batch)
    assert torch.equal(fresh.predict(batch), tent.predict(batch))


@pytest.mark.parametrize(("method", "part"), [("norm-net", "normalizer"), ("ttt-rot", "encoder"),
                                               ("ttt-mae", "encoder")])
def test_methods_update_the_part_their_paper_names(method: str, part: str) -> None:
    adapter = _adapter(method)
    inert = {id(p) for p in adapter.model.parameters()} - {id(p) for p in weights_under_batch_statistics(adapter.model)}
    expected = {id(p) for p in adapter.model.parts()[part]} - (inert if part == "encoder" else set())
    assert {id(p) for p in adapter.params} == expected  # TTT: less the conv biases BatchNorm cancels (batch stats)


def test_ae_tta_adapts_only_its_adaptors(batch: torch.Tensor) -> None:
    adapter = _adapter("ae-tta")  # tests/adapters/test_ae_tta.py tests the method itself
    assert all(not n.startswith("model.") for n, p in adapter.named_parameters() if any(p is q for q in adapter.params))


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


@pytest.mark.parametrize("method", METHODS)
def test_search_space_holds_the_paper_default(method: str) -> None:
    """`medtta bench --sweep METHOD` tries the method's own values first among others, never an unknown key."""
    cls = ADAPTERS.get(method)
    for key, values in cls.sweep_space().items():
        default = cls.default_steps if key == "steps" else cls.defaults[key]
        assert default in values and len(set(values)) == len(values) > 1
    assert cls.config_tag(dict(cls.defaults), cls.default_steps) == "default"
