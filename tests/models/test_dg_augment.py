"""GIN and GIN + IPA source augmentation: shapes and dtypes in 2D and 3D, seeded draws, the per-sample Frobenius norm,
the smooth blending mask, the name registry, and checks against the official code (DG-TTA's copy of GIN; the IPA
mask pipeline of Ouyang et al., written out from their `adv_bias.py`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medtta.errors import RegistryError
from medtta.models.dg_augment import (
    SOURCE_AUGMENTATIONS,
    blend,
    frobenius,
    gin,
    ipa,
    smooth_mask,
    source_augmentation,
)

SHAPES = [(2, 1, 16, 20), (3, 2, 12, 12), (2, 1, 8, 10, 12)]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def total_variation(x: torch.Tensor) -> float:
    """Mean absolute difference of neighbouring voxels, over the spatial axes."""
    return float(sum(x.diff(dim=d).abs().mean() for d in range(2, x.dim())) / (x.dim() - 2))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gin_and_ipa_keep_shape_and_dtype_and_gin_each_samples_norm(shape: tuple[int, ...],
                                                                     dtype: torch.dtype) -> None:
    x = torch.randn(shape, generator=seeded(0), dtype=dtype) * 3 + 1
    out = gin(x, seeded(1))
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(frobenius(out), frobenius(x), rtol=1e-5, atol=0)
    assert not torch.allclose(out, x)
    mixed = ipa(x, seeded(1))
    assert mixed.shape == x.shape and mixed.dtype == dtype and torch.isfinite(mixed).all()


def test_half_precision_inputs_come_back_in_their_dtype() -> None:
    x = torch.randn(2, 1, 8, 8, 8, generator=seeded(0)).half()
    assert gin(x, seeded(0)).dtype == torch.float16 and ipa(x, seeded(0)).dtype == torch.float16


def test_layers_and_channels_are_honoured_and_bad_inputs_refused() -> None:
    x = torch.randn(2, 3, 10, 10, generator=seeded(0))
    assert gin(x, seeded(0), layers=2, channels=5).shape == x.shape
    assert gin(x, seeded(0), layers=6, channels=8).shape == x.shape
    with pytest.raises(ValueError, match="at least 2 layers"):
        gin(x, layers=1)
    with pytest.raises(ValueError, match="shape"):
        gin(torch.randn(2, 1, 10))


@pytest.mark.parametrize("augment", [gin, ipa])
def test_a_seed_fixes_the_draws_and_another_seed_changes_them(augment) -> None:
    for shape in SHAPES:
        x = torch.randn(shape, generator=seeded(0))
        assert torch.equal(augment(x, seeded(5)), augment(x, seeded(5)))
        assert not torch.allclose(augment(x, seeded(5)), augment(x, seeded(6)))
        torch.manual_seed(9)  # without a generator: torch's global RNG
        first = augment(x)
        torch.manual_seed(9)
        assert torch.equal(first, augment(x))


def test_each_sample_gets_its_own_network() -> None:
    x = torch.randn(1, 1, 16, 16, generator=seeded(0)).repeat(4, 1, 1, 1)
    out = gin(x, seeded(2))
    assert all(not torch.allclose(out[0], out[i]) for i in range(1, 4))


@pytest.mark.parametrize("spatial", [(20, 24), (14, 12, 16)])
def test_a_constant_image_stays_constant_away_from_the_border_and_zero_stays_zero(spatial: tuple[int, ...]) -> None:
    """Convolutions map a constant to a constant; only the zero padding of the (at most 4) 3-wide kernels changes
    the outer 4 voxels. The rescaling keeps the norm, so an all-zero sample stays zero."""
    x = torch.full((3, 1, *spatial), 2.5)
    inner = (slice(None), slice(None), *[slice(4, -4)] * len(spatial))
    def spread(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1).amax(dim=1) - t.flatten(1).amin(dim=1)

    for seed in range(5):
        out = gin(x, seeded(seed))
        assert (spread(out[inner]) <= 1e-5 * out.flatten(1).abs().amax(dim=1).clamp_min(1)).all()
        assert (spread(out) > 1e-3).any()  # the border does change where a 3-wide kernel was drawn
    zero = gin(torch.zeros(2, 1, *spatial), seeded(0))
    assert torch.equal(zero, torch.zeros_like(zero))


@pytest.mark.parametrize("shape", [(3, 2, 64, 64), (2, 1, 16, 24, 20)])
def test_the_mask_is_smooth_and_spans_0_to_1_in_each_sample(shape: tuple[int, ...]) -> None:
    mask = smooth_mask(shape, seeded(0))
    assert mask.shape == (shape[0], 1, *shape[2:]) and mask.dtype == torch.float32
    assert (mask >= 0).all() and (mask <= 1).all()
    torch.testing.assert_close(mask.flatten(1).amin(dim=1), torch.zeros(shape[0]))
    torch.testing.assert_close(mask.flatten(1).amax(dim=1), torch.ones(shape[0]))
    noise = torch.rand(mask.shape, generator=seeded(1))
    assert total_variation(mask) < 0.15 * total_variation(noise)
    assert torch.equal(mask, smooth_mask(shape, seeded(0)))
    assert not torch.allclose(mask, smooth_mask(shape, seeded(1)))
    assert total_variation(smooth_mask(shape, seeded(0), grid=2)) < total_variation(mask)  # fewer points: smoother


def test_blend_takes_a_where_the_mask_is_1_and_b_where_it_is_0() -> None:
    a, b = torch.randn(2, 1, 8, 8, generator=seeded(0)), torch.randn(2, 1, 8, 8, generator=seeded(1))
    assert torch.equal(blend(a, b, torch.ones(2, 1, 8, 8)), a)
    assert torch.equal(blend(a, b, torch.zeros(2, 1, 8, 8)), b)
    mixed = blend(a, b, torch.full((2, 1, 8, 8), 0.25))
    torch.testing.assert_close(mixed, 0.25 * a + 0.75 * b)


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 2, 10, 12, 14)])
def test_ipa_is_two_gin_views_blended_by_the_mask(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=seeded(0))
    generator = seeded(3)
    first, second = gin(x, generator), gin(x, generator)
    mask = smooth_mask(shape, generator)
    out = ipa(x, seeded(3))
    torch.testing.assert_close(out, blend(first, second, mask))
    tolerance = 1e-6
    assert (out >= torch.minimum(first, second) - tolerance).all()
    assert (out <= torch.maximum(first, second) + tolerance).all()
    assert not torch.allclose(out, first) and not torch.allclose(out, second)


def test_source_augmentation_names_and_an_unknown_one() -> None:
    assert SOURCE_AUGMENTATIONS == ("none", "gin", "gin-ipa")
    assert source_augmentation("none") is None
    assert source_augmentation("gin") is gin
    assert source_augmentation("gin-ipa") is ipa
    with pytest.raises(RegistryError, match="none, gin, gin-ipa") as raised:
        source_augmentation("randconv")
    assert "randconv" in str(raised.value) and isinstance(raised.value, KeyError)


@pytest.mark.parametrize("channels,shape", [(1, (3, 1, 32, 40)), (3, (2, 3, 24, 24)), (1, (2, 1, 12, 10, 14))])
def test_gin_draws_the_same_network_as_the_official_code(channels: int, shape: tuple[int, ...]) -> None:
    """DG-TTA's `GINGroupConv` (the official GIN, 2D and 3D) seeded through torch.manual_seed: the same draws in the
    same order (alphas, then per layer: kernel size, weights, bias), so the same output."""
    official = pytest.importorskip("dg_tta.gin")
    x = torch.randn(shape, generator=seeded(0))
    for seed in range(4):
        torch.manual_seed(seed)
        reference = official.GINGroupConv(dict(IN_CHANNELS=channels, N_LAYER=4, INTERM_CHANNELS=2))(x)
        torch.manual_seed(seed)
        torch.testing.assert_close(gin(x), reference, rtol=1e-5, atol=1e-5)


def official_mask(control: torch.Tensor) -> torch.Tensor:
    """The IPA mask of a (N, 1, 6, 6) control grid as the official code makes it for 192 x 192 slices (adv_bias.py
    with control_point_spacing 24, downscale 2, interpolation_order 2; utils.rescale_intensity)."""
    box = torch.ones(1, 1, 24, 24)
    kernel = box
    for i in (1, 2):  # bspline_kernel_2d: a box convolved twice with itself
        kernel = F.conv2d(kernel, box, padding=24 * i) / 24**2
    control = control / control.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # unit_normalize 'l2'
    field = F.conv_transpose2d(control, kernel, padding=60, stride=24)[:, :, 12:-13, 12:-13]  # 97 x 97 at half size
    field = F.interpolate(field, size=(192, 192), mode="bilinear", align_corners=True).exp()
    flat = field.flatten(1)
    low, high = flat.amin(dim=1).view(-1, 1, 1, 1), flat.amax(dim=1).view(-1, 1, 1, 1)
    return (field - low) / (high - low)


def test_the_mask_follows_the_official_pipeline_from_the_same_control_points() -> None:
    """Same control points (the first draw of the generator): the masks agree up to the official mask's one-pixel
    shift and upsampling (documented in `smooth_mask`); an unrelated mask is far off."""
    mask = smooth_mask((4, 1, 192, 192), seeded(5))
    reference = official_mask(torch.randn(4, 1, 6, 6, generator=seeded(5)))
    difference = (mask - reference).abs()
    assert float(difference.max()) < 0.1 and float(difference.mean()) < 0.015
    assert float((smooth_mask((4, 1, 192, 192), seeded(6)) - reference).abs().mean()) > 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_a_seed_gives_the_same_augmentation_as_on_the_cpu() -> None:
    """Draws come from the generator's device (the CPU for the global RNG) and move to x's device."""
    x = torch.randn(2, 1, 12, 16, 16, generator=seeded(0))
    for augment in (gin, ipa):
        on_gpu = augment(x.cuda(), seeded(4))
        assert on_gpu.device.type == "cuda"
        torch.testing.assert_close(on_gpu.cpu(), augment(x, seeded(4)), rtol=1e-4, atol=1e-4)
    on_gpu = gin(x.cuda(), torch.Generator("cuda").manual_seed(4))
    assert on_gpu.device.type == "cuda" and torch.isfinite(on_gpu).all()
