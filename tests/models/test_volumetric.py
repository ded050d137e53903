"""3D networks: sliding-window inference, whole-volume BatchNorm statistics, and the adapter contract on volumes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medtta.adapters.base import MixedBatchNorm
from medtta.engine import adapt_and_predict
from medtta.models import build_network
from medtta.models.volumetric import random_patches, sliding_window_logits
from medtta.registry import ADAPTERS

WINDOW = (8, 16, 16)
METHODS_3D = [m for m in ADAPTERS.list() if 3 in ADAPTERS.get(m).spatial_dims]


def _source_like_3d(architecture: str = "unet", **config) -> nn.Module:
    """A fresh 3D network with non-trivial BatchNorm statistics and its window set, as source training leaves it."""
    torch.manual_seed(0)
    net = build_network(architecture, 1, 4, spatial_dims=3, **config)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(2, 1, *WINDOW) * 2 + 1)
    net.use_window(WINDOW)
    return net.eval()


@pytest.fixture
def volume() -> torch.Tensor:
    """A volume larger than the window along every axis, of sides that are not multiples of 8."""
    return torch.randn(1, 1, 12, 28, 20, generator=torch.Generator().manual_seed(1)) * 3 - 2


def test_sliding_windows_equal_the_whole_volume_where_the_window_covers_it() -> None:
    net = _source_like_3d()
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        whole = net.logits(x)
        windowed = sliding_window_logits(net, net.logits, x, (16, 32, 32))
        assert torch.allclose(windowed, whole, atol=1e-5)
        assert net(x).shape == (1, 4, 16, 32, 32)  # a volume unlike the window: slid over, same shape out


def test_batch_statistics_come_from_the_whole_volume_not_each_window(volume: torch.Tensor) -> None:
    """Every window is normalized with the statistics a whole-volume pass gives each BatchNorm layer (one extra
    pass), not its own: otherwise the windows disagree along their seams."""
    net = _source_like_3d()
    layers = [m for m in ADAPTERS.create("bn-stats", net).model.modules() if isinstance(m, MixedBatchNorm)]
    used: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in layers}
    whole: dict[nn.Module, torch.Tensor] = {}

    def record_used(layer, inputs, output):
        used[layer].append(layer.statistics(inputs[0])[0].detach())

    hooks = [m.register_forward_hook(record_used) for m in layers]
    with torch.no_grad():
        net(volume)
    for hook in hooks:
        hook.remove()
    padded = nn.functional.pad(volume, (0, 4, 0, 4, 0, 4))  # to multiples of 8, as the statistics pass pads

    def record_whole(layer, inputs, output):
        whole[layer] = inputs[0].mean((0, 2, 3, 4))

    hooks = [m.register_forward_hook(record_whole) for m in layers]
    with torch.no_grad():
        net.logits(padded)
    for hook in hooks:
        hook.remove()
    windows = len(used[layers[0]]) - 1  # the first call is the statistics pass itself
    assert windows >= 2
    for layer in layers:
        assert all(torch.allclose(u, whole[layer], atol=1e-5) for u in used[layer])
        assert layer.volume_statistics is None  # cleared after the volume
    own = [torch.stack([w.mean((0, 2, 3, 4)) for w in (volume[..., :8, :16, :16], volume[..., 4:, 12:, 4:])])]
    assert not torch.allclose(own[0][0], own[0][1], atol=1e-3)  # windows' own statistics do differ


def test_random_patches_crop_image_and_labels_alike() -> None:
    x = torch.arange(6 * 20 * 20, dtype=torch.float32).view(1, 1, 6, 20, 20)
    labels = x[:, 0].long()
    patches, patch_labels = random_patches(x, WINDOW, 3, labels, torch.Generator().manual_seed(0))
    assert patches.shape == (3, 1, *WINDOW) and patch_labels.shape == (3, *WINDOW)
    assert torch.equal(patches[:, 0].long(), patch_labels)
    assert (patches[:, :, 6:] == 0).all()  # depth 6 < 8: zero-padded


def _adapter_3d(method: str) -> nn.Module:
    cls = ADAPTERS.get(method)
    model = _source_like_3d(cls.architecture)
    kwargs = {}
    if cls.statistics:
        g = torch.Generator().manual_seed(2)
        volumes = [(torch.randn(1, 1, 10, 20, 20, generator=g), torch.randint(0, 4, (1, 10, 20, 20), generator=g))]
        kwargs["source_stats"] = cls.source_statistics(model, volumes)
    adapter = ADAPTERS.create(method, model, **kwargs)
    adapter.patches_per_update = 2
    return adapter


@pytest.mark.parametrize("method", METHODS_3D)
def test_3d_adapters_update_exactly_their_parameters_reset_exactly_and_run_in_both_settings(
        method: str, volume: torch.Tensor) -> None:
    adapter = _adapter_3d(method)
    collected = {name for name, p in adapter.named_parameters() if any(p is q for q in adapter.params)}
    initial = copy.deepcopy(adapter.state_dict())
    torch.manual_seed(0)
    first = adapter(volume)  # online: the volume predicted whole, then updates on its patches
    assert first.shape == (1, 4, *volume.shape[2:]) and torch.isfinite(first).all()
    changed = {k for k in initial if not torch.equal(initial[k], adapter.state_dict()[k])}
    assert changed - collected <= adapter.tracked_state() and bool(changed & collected) == bool(collected)
    adapter.reset()
    assert all(torch.equal(v, adapter.state_dict()[k]) for k, v in initial.items())
    torch.manual_seed(0)
    assert torch.equal(adapter(volume), first)
    outputs = []
    for _ in range(2):
        torch.manual_seed(0)
        outputs.append(adapt_and_predict(adapter, volume, "episodic", steps=1, batch_size=2))
    assert torch.equal(outputs[0], outputs[1]) and outputs[0].shape == first.shape


def test_a_volume_pass_takes_as_many_patch_updates_as_hold_its_voxels(volume: torch.Tensor) -> None:
    adapter = _adapter_3d("tent")
    assert adapter.patch_updates(volume) == max(1, round(12 * 28 * 20 / (8 * 16 * 16 * 2)))
    assert adapter.patch_updates(torch.zeros(1, 1, 32, 64, 64)) == 32  # 16 windows of voxels, 2 a step


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_norm_option_builds_the_layers_asked_for(norm: str) -> None:
    net = build_network("unet", 1, 4, spatial_dims=3, norm=norm)
    def has(kind: type) -> bool:
        return any(isinstance(m, kind) for m in net.modules())

    assert has(nn.InstanceNorm3d) == (norm == "instance") and has(nn.GroupNorm) == (norm == "group")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert net.parts()["norm"]  # affine: what a norm-updating method trains
