"""3D networks on whole volumes: random training patches, and sliding-window inference (MONAI, overlap 0.5, Gaussian
blending) whose BatchNorm test statistics come from the whole volume.

A layer normalizing with test-batch statistics (an adapter's `MixedBatchNorm`, source weight below 1) would see each
window's own statistics, which differ from window to window and make seams. One extra pass over the whole volume
records each such layer's input statistics; the windows are then normalized with those.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import nn

from medtta.protocol import DIVISOR

Window = tuple[int, int, int]  # (depth, H, W)
OVERLAP = 0.5
WINDOWS_PER_BATCH = 4


def padded_to(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`x` zero-padded at the end of each spatial axis up to `shape` (axes already as long are left)."""
    pad = [p for n, s in zip(reversed(x.shape[2:]), reversed(shape), strict=True) for p in (0, max(0, s - n))]
    return F.pad(x, pad) if any(pad) else x


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
        return torch.cat([t[..., d:d + window[0], h:h + window[1], w:w + window[2]] for d, h, w in corners])

    return crop(x), None if labels is None else crop(labels)


def _batch_statistic_layers(module: nn.Module) -> list[nn.Module]:
    """The layers that would normalize a window with its own statistics (they have `volume_statistics`)."""
    return [m for m in module.modules() if hasattr(m, "volume_statistics") and m.source_weight < 1]


@contextmanager
def whole_volume_statistics(module: nn.Module, network: Callable[[torch.Tensor], torch.Tensor],
                            x: torch.Tensor) -> Iterator[None]:
    """Inside, every layer of `module` that normalizes with test-batch statistics uses those of the whole volume `x`,
    recorded by one pass of `network` over it (zero-padded to a multiple of the UNet's divisor)."""
    layers = _batch_statistic_layers(module)
    if not layers:
        yield
        return
    recorded: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        dims = [0, *range(2, inputs[0].dim())]
        recorded[layer] = (inputs[0].mean(dims).float(), inputs[0].var(dims, unbiased=False).float())

    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        with torch.no_grad():
            network(padded_to(x, tuple(-(-n // DIVISOR) * DIVISOR for n in x.shape[2:])))
    finally:
        for hook in hooks:
            hook.remove()
    for layer in layers:
        layer.volume_statistics = recorded[layer]
    try:
        yield
    finally:
        for layer in layers:
            layer.volume_statistics = None


def sliding_window_logits(module: nn.Module, network: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                          window: Window) -> torch.Tensor:
    """Logits of the (1, C, D, H, W) volume `x` by windows of `network` (part of `module`), Gaussian-blended, the
    batch-statistics layers normalizing with the whole volume's statistics."""
    with whole_volume_statistics(module, network, x):
        return sliding_window_inference(x, window, WINDOWS_PER_BATCH, network, overlap=OVERLAP, mode="gaussian")
