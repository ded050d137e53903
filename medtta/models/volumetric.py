"""3D networks on whole volumes: random training patches, and sliding-window inference (MONAI, overlap 0.5, Gaussian
blending) whose test-time BatchNorm statistics are those of the windows themselves.

A layer normalizing with test-batch statistics (an adapter's `MixedBatchNorm`, source weight below 1) would see each
batch of windows' own statistics, which differ from batch to batch and make seams. A first pass over the windows
(MONAI's positions, a batch at a time, so that no whole-volume activation is held) accumulates every such layer's
input sums; every window is then normalized with the statistics of all of them. The network was trained on patches
of the window's size, so these are the statistics of what it was trained to see: a single pass over the whole
volume shows every layer another field of view and other borders, and lands 2-4x farther from the source statistics
on source-site volumes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import nn

Window = tuple[int, int, int]  # (depth, H, W)
OVERLAP = 0.5
WINDOWS_PER_BATCH = 4


def padded_to(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`x` zero-padded at the end of each spatial axis up to `shape` (axes already as long are left)."""
    pad = [p for n, s in zip(reversed(x.shape[2:]), reversed(shape), strict=True) for p in (0, max(0, s - n))]
    return F.pad(x, pad) if any(pad) else x


def window_count(shape: tuple[int, ...], window: Window) -> int:
    """How many windows MONAI's sliding window (overlap `OVERLAP`) places on a volume of spatial `shape`."""
    def along(n: int, w: int) -> int:
        step = max(1, int(w * (1 - OVERLAP)))
        return 1 if n <= w else math.ceil((n - w) / step) + 1

    return math.prod(along(n, w) for n, w in zip(shape, window, strict=True))


def random_patches(x: torch.Tensor, window: Window, n: int, labels: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`n` patches of `window` at uniformly random places of the (1, C, D, H, W) volume `x` (zero-padded where it is
    smaller), and the same patches of its (1, D, H, W) `labels` when given."""
    x = padded_to(x, window)
    if labels is not None:
        labels = padded_to(labels.unsqueeze(1), window)[:, 0]
    corners = [[int(torch.randint(0, s - w + 1, (1,), generator=generator)) for s, w in
                zip(x.shape[2:], window, strict=True)] for _ in range(n)]

    def crop(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([window_at(t, corner, window) for corner in corners])

    return crop(x), None if labels is None else crop(labels)


def window_at(t: torch.Tensor, corner: Iterable[int], window: Window) -> torch.Tensor:
    """The `window` of the (..., D, H, W) tensor `t` whose first voxel is at `corner`."""
    return t[(..., *(slice(c, c + n) for c, n in zip(corner, window, strict=True)))]


def _batch_statistic_layers(module: nn.Module) -> list[nn.Module]:
    """The layers that would normalize a window with its own statistics (they have `volume_statistics`)."""
    return [m for m in module.modules() if hasattr(m, "volume_statistics") and m.source_weight < 1]


@contextmanager
def window_statistics(module: nn.Module, network: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                      window: Window) -> Iterator[None]:
    """Inside, every layer of `module` that normalizes with test-batch statistics uses those of all the sliding
    windows of the (1, C, D, H, W) volume `x`, at MONAI's positions: one pass of `network` over the windows, each
    batch normalized by its own statistics, sums the inputs of every layer. A volume no larger than the window is one
    window: its statistics exactly. Statistics already set (an enclosing call) are put back on exit."""
    layers = _batch_statistic_layers(module)
    if not layers:
        yield
        return
    previous = [layer.volume_statistics for layer in layers]
    sums: dict[nn.Module, list[torch.Tensor]] = {}

    def record(layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        v = inputs[0].detach().double()
        dims = [0, *range(2, v.dim())]
        count = torch.tensor(v.numel() / v.shape[1], dtype=torch.float64, device=v.device)
        totals = (v.sum(dims), v.square().sum(dims), count)
        sums[layer] = [a + b for a, b in zip(sums[layer], totals, strict=True)] if layer in sums else list(totals)

    for layer in layers:
        layer.volume_statistics = None
    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        with torch.no_grad():
            sliding_window_inference(x, window, WINDOWS_PER_BATCH, network, overlap=OVERLAP, mode="constant")
    finally:
        for hook in hooks:
            hook.remove()
    for layer in layers:
        total, squares, count = sums[layer]
        mean = total / count
        layer.volume_statistics = (mean.float(), (squares / count - mean.square()).clamp_min(0).float())
    try:
        yield
    finally:
        for layer, statistics in zip(layers, previous, strict=True):
            layer.volume_statistics = statistics


def sliding_window_logits(module: nn.Module, network: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                          window: Window) -> torch.Tensor:
    """Logits of the (1, C, D, H, W) volume `x` by windows of `network` (part of `module`), Gaussian-blended, the
    batch-statistics layers normalizing with the statistics of all the windows (`window_statistics`)."""
    with window_statistics(module, network, x, window):
        return sliding_window_inference(x, window, WINDOWS_PER_BATCH, network, overlap=OVERLAP, mode="gaussian")
