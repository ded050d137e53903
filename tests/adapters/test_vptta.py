"""VPTTA: the frequency prompt, the mask size, the prompt memory, the mixed BatchNorm and what an update changes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medtta.adapters.vptta import VPTTA, AlignedBatchNorm, PromptMemory, _window, apply_prompt, mask_side
from medtta.errors import MedttaError
from medtta.models import build_network


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 + 1


def _vptta(**hparams) -> VPTTA:
    torch.manual_seed(0)
    net = build_network("unet", 1, 3)
    net.train()
    with torch.no_grad():  # source-like running statistics
        net(torch.randn(4, 1, 32, 32))
    return VPTTA(net.eval(), **hparams)


@pytest.mark.parametrize(("shape", "side"), [((32, 32), (3, 3)), ((31, 24), (1, 2)), ((16, 17), (4, 5))])
def test_an_all_ones_prompt_gives_back_the_image(shape: tuple[int, int], side: tuple[int, int]) -> None:
    x = torch.randn(2, 1, *shape, dtype=torch.float64)
    assert torch.allclose(apply_prompt(x, torch.ones(1, 1, *side, dtype=torch.float64)), x, atol=1e-12)


def test_a_prompt_on_the_zero_frequency_scales_the_mean_and_keeps_the_rest(batch: torch.Tensor) -> None:
    prompted = apply_prompt(batch, torch.full((1, 1, 1, 1), 2.0))  # the DC amplitude doubled, its phase kept
    assert torch.allclose(prompted, batch + batch.mean((-2, -1), keepdim=True), atol=1e-5)


def test_a_prompt_changes_only_the_low_frequencies(batch: torch.Tensor) -> None:
    prompted = apply_prompt(batch, torch.rand(1, 1, 3, 3) + 0.5)
    rows, cols = _window(batch.shape, (3, 3))  # an odd window centred on the zero frequency is its own mirror
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[rows, cols] = False
    spectrum = torch.fft.fftshift(torch.fft.fft2(prompted - batch), dim=(-2, -1))
    assert spectrum.abs()[..., outside].max() < 1e-4 and spectrum.abs().max() > 1e-2


def test_the_mask_covers_the_same_fraction_of_the_spectrum_at_every_size() -> None:
    assert mask_side(512, 0.01) == 5  # the official 5 x 5 prompt
    assert mask_side(352, 0.01) == 3  # the official polyp size
    assert [mask_side(n, 0.01) for n in (32, 96, 128, 256)] == [1, 1, 1, 2]  # alpha alone: the zero frequency, or 2
    assert [mask_side(n, 0.01, 3) for n in (2, 96, 128, 512)] == [2, 3, 3, 5]  # at least 3 bins, at most the size
    assert mask_side(100, 0.29) == 29  # no rounding down of 28.999...
    assert _window((512, 512), (5, 5)) == (slice(254, 259), slice(254, 259))  # centred on the DC bin, 256


def test_the_memory_is_first_in_first_out_at_its_size() -> None:
    memory = PromptMemory(40, (1, 1, 1, 2))
    for i in range(45):
        memory.push(torch.tensor([float(i), 1.0]), torch.full((1, 1, 1, 2), float(i)), 100 + i)
    keys, prompts = memory.entries()
    assert int(memory.count) == 40 and keys[:, 0].tolist() == list(range(5, 45))
    assert prompts[:, 0, 0, 0, 0].tolist() == list(range(5, 45))
    prompt, seen = memory.learned_prompt(torch.tensor([7.0, 1.0]))
    assert torch.equal(prompt, torch.full((1, 1, 1, 2), 7.0)) and seen == 107
    assert memory.learned_prompt(torch.tensor([2.0, 1.0])) is None  # dropped


def test_the_initial_prompt_weights_the_nearest_prompts_by_their_similarity() -> None:
    memory = PromptMemory(40, (1, 1, 1, 2))
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.2]])
    for i, key in enumerate(keys):
        memory.push(key, torch.full((1, 1, 1, 2), float(i)), i + 1)
    query = torch.tensor([1.0, 0.2])
    assert memory.initial_prompt(query, neighbours=5, temperature=0.2) is None  # fewer pairs than neighbours
    similarity = F.cosine_similarity(keys, query[None], dim=1)
    nearest = similarity.topk(3).indices  # 0, 2, 1: the opposite key is left out
    weights = (similarity[nearest] / 0.2).softmax(0)
    expected = (weights * nearest.float()).sum()
    assert torch.allclose(memory.initial_prompt(query, neighbours=3, temperature=0.2),
                          torch.full((1, 1, 1, 2), float(expected)), atol=1e-6)


def test_the_alignment_loss_is_zero_for_one_image_normalized_by_its_own_statistics() -> None:
    norm = AlignedBatchNorm(nn.BatchNorm2d(3), source_weight=0.0)
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    norm(x)
    assert norm.alignment.item() < 1e-6
    norm.source_weight = 1.0  # the source statistics (mean 0, variance 1) and a shifted image
    norm(x + 3)
    assert norm.alignment.item() > 2.5


def test_the_batch_statistics_weight_decays_with_the_updates(batch: torch.Tensor) -> None:
    adapter = _vptta(warm_n=5)
    adapter.images_seen.fill_(25)
    adapter._mix()
    assert {norm.source_weight for norm in adapter.norms} == {0.5}  # 1 / (sqrt(25) / 5 + 1)
    adapter.update(batch)
    assert int(adapter.images_seen) == 26


def test_updates_learn_the_prompt_only_and_reset_restores_everything(batch: torch.Tensor) -> None:
    adapter = _vptta()  # a 3 x 3 prompt on 32 x 32 slices (min_side)
    initial = copy.deepcopy(adapter.state_dict())
    unet = copy.deepcopy(adapter.model.state_dict())
    for b in (batch, batch.flip(-1), batch * 0.5):
        logits = adapter(b)
        assert torch.equal(logits, adapter.predict(b))  # predicted with the prompt learned on the batch
    assert adapter.prompt.shape == (1, 1, 3, 3) and not torch.equal(adapter.prompt, torch.ones(1, 1, 3, 3))
    assert all(torch.equal(v, adapter.model.state_dict()[k]) for k, v in unet.items())  # the UNet never changes
    assert all(p.grad is None for p in adapter.model.parameters())
    assert int(adapter.memory.count) == 3 and int(adapter.images_seen) == 3
    adapter.reset()
    state = adapter.state_dict()
    assert state.keys() == initial.keys() and all(torch.equal(initial[k], state[k]) for k in initial)
    assert adapter.prompt.shape == (1, 1, 1, 1) and adapter.optimizer.state_dict()["state"] == {}


def test_neighbours_beyond_the_memory_fail() -> None:
    with pytest.raises(MedttaError, match="neighbours"):
        _vptta(neighbours=41)


def test_the_default_prompt_keeps_enough_frequencies_for_the_bank_to_tell_batches_apart(batch: torch.Tensor) -> None:
    """At alpha 0.01 a 96-128 px slice gives a 1 x 1 window: every key is the mean amplitude, every cosine similarity
    is 1 and the nearest prompts are an arbitrary tie. With 3 x 3 keys, different batches have different keys."""
    adapter = _vptta()
    keys = [adapter._key(b) for b in (batch, batch.flip(-2) * 0.5 + 1, torch.randn_like(batch))]
    assert keys[0].shape == (3, 3)
    similarity = F.cosine_similarity(keys[0].flatten()[None], torch.stack([k.flatten() for k in keys[1:]]), dim=1)
    assert similarity.max() < 0.999


def test_episodic_prediction_mixes_each_batch_with_its_own_image_count() -> None:
    """Official VPTTA predicts each image right after its update, with the same image count: a volume of several
    batches is predicted batch by batch with the count each batch was learned at, not the final one."""
    volume = torch.randn(6, 1, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 + 1
    episodic = _vptta()
    episodic.reset()
    episodic.adapt(volume, steps=1, batch_size=2)
    online = _vptta()
    expected = torch.cat([online(b) for b in volume.split(2)])  # update, then predict, batch by batch
    assert torch.allclose(torch.cat([episodic.predict(b) for b in volume.split(2)]), expected, atol=1e-5)
