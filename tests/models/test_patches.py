"""3D training patches: the last third of a batch centred on foreground (nnU-Net's oversampling), deterministic for a
seed, inside the zero-padded volume."""

from __future__ import annotations

import torch

from medtta.models.patches import foreground_patch, training_patches

WINDOW = (8, 8, 8)


def volume(corner: tuple[int, int, int] | None, shape: tuple[int, int, int] = (24, 32, 32), label: int = 2
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """A (1, 1, D, H, W) image and (1, D, H, W) labels with a 3-voxel foreground cube at `corner` (none if None);
    the image holds each voxel's flat index, so a patch shows where it was cut."""
    labels = torch.zeros(1, *shape, dtype=torch.long)
    if corner is not None:
        d, h, w = corner
        labels[0, d:d + 3, h:h + 3, w:w + 3] = label
    return torch.arange(labels.numel(), dtype=torch.float32).reshape(1, 1, *shape), labels


def test_a_foreground_patch_holds_foreground_even_at_the_border() -> None:
    generator = torch.Generator().manual_seed(0)
    for corner in [(0, 0, 0), (21, 29, 29), (10, 14, 3)]:
        x, y = volume(corner)
        for _ in range(5):
            px, py = foreground_patch(x, y, WINDOW, generator)
            assert px.shape == (1, 1, *WINDOW) and py.shape == (1, *WINDOW)
            assert (py == 2).any()
            d, rest = divmod(int(px[0, 0, 0, 0, 0]), 32 * 32)  # the patch's first voxel: its corner
            h, w = divmod(rest, 32)
            assert torch.equal(px[0, 0], x[0, 0, d:d + 8, h:h + 8, w:w + 8])  # a block of the volume, inside it


def test_a_volume_smaller_than_the_window_is_padded_and_no_foreground_gives_a_random_patch() -> None:
    x, y = volume((1, 1, 1), shape=(5, 6, 7), label=1)
    px, py = foreground_patch(x, y, WINDOW, torch.Generator().manual_seed(0))
    assert px.shape == (1, 1, 8, 8, 8) and int(py.sum()) == 27
    x, y = volume(None)
    px, py = foreground_patch(x, y, WINDOW, torch.Generator().manual_seed(0))
    assert px.shape == (1, 1, *WINDOW) and not py.any()


def test_the_last_third_of_a_batch_is_centred_on_foreground_deterministically() -> None:
    volumes = [volume((20, 28, 28)) for _ in range(6)]  # a small corner of each volume: uniform patches miss it
    x, y = training_patches(volumes, WINDOW, torch.Generator().manual_seed(3))
    assert x.shape == (6, 1, *WINDOW) and y.shape == (6, *WINDOW)
    assert all((y[i] == 2).any() for i in (4, 5))  # round(6 * 0.67) = 4 uniform, then 2 on foreground
    again = training_patches(volumes, WINDOW, torch.Generator().manual_seed(3))
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    other = training_patches(volumes, WINDOW, torch.Generator().manual_seed(4))
    assert not torch.equal(x, other[0])
    _, pair = training_patches(volumes[:2], WINDOW, torch.Generator().manual_seed(0))
    assert (pair[1] == 2).any()  # nnU-Net's rounding: one of a batch of 2
