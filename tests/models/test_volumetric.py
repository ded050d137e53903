"""3D networks: sliding-window inference, BatchNorm statistics of the sliding windows, and the adapter contract on
volumes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from medtta.adapters.base import MixedBatchNorm
from medtta.engine import adapt_and_predict
from medtta.models import build_network
from medtta.models.volumetric import WINDOWS_PER_BATCH, random_patches, sliding_window_logits, window_count
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


def _batch_statistics_layers(net: nn.Module) -> list[MixedBatchNorm]:
    return [m for m in ADAPTERS.create("bn-stats", net).model.modules() if isinstance(m, MixedBatchNorm)]


def _statistics_used(net: nn.Module, layers: list[MixedBatchNorm], x: torch.Tensor) -> dict[nn.Module, list]:
    """(mean, variance) each layer normalized with, per call, in a forward pass of `net` over `x`."""
    used: dict[nn.Module, list] = {m: [] for m in layers}

    def record(layer, inputs, output):
        used[layer].append(tuple(s.detach() for s in layer.statistics(inputs[0])))

    hooks = [m.register_forward_hook(record) for m in layers]
    with torch.no_grad():
        net(x)
    for hook in hooks:
        hook.remove()
    return used


def test_a_volume_no_larger_than_the_window_gets_exactly_the_window_statistics() -> None:
    net = _source_like_3d()
    layers = _batch_statistics_layers(net)
    x = torch.randn(1, 1, 8, 16, 12, generator=torch.Generator().manual_seed(3)) * 2 - 1  # W 12 < 16: one window
    windowed = _statistics_used(net, layers, x)
    own = _statistics_used(net, layers, nn.functional.pad(x, (2, 2)))  # the window MONAI pads it to, on its own
    for layer in layers:
        mean, var = own[layer][0]
        assert all(torch.allclose(m, mean, atol=1e-5) and torch.allclose(v, var, rtol=1e-4, atol=1e-6)
                   for m, v in windowed[layer])
        assert layer.volume_statistics is None  # cleared after the volume


def test_every_window_is_normalized_with_the_statistics_of_all_the_windows(volume: torch.Tensor) -> None:
    """The first layer's input does not depend on any normalization: its statistics must be exactly those of the
    voxels of every window MONAI places (overlaps counted as often as windows cover them), for every window."""
    net = _source_like_3d()
    layers = _batch_statistics_layers(net)
    used = _statistics_used(net, layers, volume)
    first = layers[0]
    inputs = []
    hook = first.register_forward_pre_hook(lambda layer, args: inputs.append(args[0].detach()))
    with torch.no_grad():
        sliding_window_inference(volume, WINDOW, 1, net.logits, overlap=0.5)  # one window a batch
    hook.remove()
    assert len(inputs) == window_count(tuple(volume.shape[2:]), WINDOW) == 2 * 3 * 2
    pooled = torch.cat(inputs)
    expected = pooled.mean((0, 2, 3, 4)), pooled.var((0, 2, 3, 4), unbiased=False)
    batches = math.ceil(len(inputs) / WINDOWS_PER_BATCH)
    assert len(used[first]) == 2 * batches  # the statistics pass, then the prediction
    for mean, var in used[first][batches:]:
        assert torch.allclose(mean, expected[0], atol=1e-5) and torch.allclose(var, expected[1], rtol=1e-4)
    per_window = torch.stack([w.mean((1, 2, 3)) for w in inputs])
    assert not torch.allclose(per_window[0], per_window[-1], atol=1e-3)  # windows' own statistics do differ


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


def test_a_volume_pass_takes_as_many_patches_as_the_windows_that_predict_it(volume: torch.Tensor) -> None:
    adapter = _adapter_3d("tent")
    assert window_count((12, 28, 20), WINDOW) == 2 * 3 * 2  # 1 + ceil((n - w) / (w / 2)) along each axis
    assert adapter.patch_updates(volume) == 6  # 12 windows, 2 patches an update
    assert adapter.patch_updates(torch.zeros(1, 1, 32, 64, 64)) == math.ceil(7 * 7 * 7 / 2)
    adapter.updates_per_pass = 3  # --patch-updates
    assert adapter.patch_updates(volume) == 3
    assert _adapter_3d("ttt-rot").patch_updates(volume) == 1  # TTT's steps are updates on one batch


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_norm_option_builds_the_layers_asked_for(norm: str) -> None:
    net = build_network("unet", 1, 4, spatial_dims=3, norm=norm)
    def has(kind: type) -> bool:
        return any(isinstance(m, kind) for m in net.modules())

    assert has(nn.InstanceNorm3d) == (norm == "instance") and has(nn.GroupNorm) == (norm == "group")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert net.parts()["norm"]  # affine: what a norm-updating method trains
