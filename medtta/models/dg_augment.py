"""Domain-generalization augmentation of the source images: GIN and GIN + IPA of Ouyang, Chen, Li, Li, Qin, Bai &
Rueckert, "Causality-inspired single-source domain generalization for medical image segmentation" (IEEE TMI 2022),
as DG-TTA (Weihsbach et al., arXiv 2312.06275) pre-trains its source model with GIN.

Read: the official code, github.com/cheng-01037/Causality-Medical-Image-Domain-Generalization at commit d4d5056d
(`models/imagefilter.py`, `models/exp_trainer.py`, `configs_exp.py`, `biasfield_interpolate_cchen/adv_bias.py`,
`adv_transformation_base.py`, `utils.py`), and DG-TTA's copy of GIN, the installed `dg_tta/gin.py` (dg-tta 1.0.18).

GIN (global intensity non-linear augmentation) passes each image through a freshly drawn random shallow conv
network and mixes the result with the image, so that the segmenter sees the same shapes under ever new intensity
mappings. IPA (interventional pseudo-correlation augmentation) blends two GIN views of the image with a random smooth
mask, so that the intensity mapping also changes smoothly across the image, as bias fields and local contrast do.

Inputs: the official code feeds z-scored images (`dataloaders/abd_dataset_utils.py:49-61`, MR per volume, CT with
global statistics; `dataloaders/ProstateDataset.py:49`), DG-TTA nnU-Net-normalized ones; medtta's intensity-
normalized images are the same kind. GIN assumes no range: its output has each sample's Frobenius norm of the input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from medtta.errors import RegistryError

Augmentation = Callable[[torch.Tensor], torch.Tensor]

SOURCE_AUGMENTATIONS = ("none", "gin", "gin-ipa")
KERNEL_SIZES = (1, 3)  # imagefilter.py:48 `scale_pool = [1, 3]`; dg_tta/gin.py:131; one drawn per layer (:29-30)
LAYERS = 4  # configs_exp.py:88 `gin_nlayer = 4`; exp_scripts/*_gin_ipa_*.sh `NL_GIN=4`; dg_tta/gin.py:236
CHANNELS = 2  # intermediate channels: configs_exp.py:87 `gin_n_interm_ch = 2`; dg_tta/gin.py:237
NORM_EPS = 1e-5  # imagefilter.py:92, dg_tta/gin.py:228: output * |x|_F / (|output|_F + 1e-5)
GRID = 4  # IPA control-point spacings per axis: 192 px / (2 x 24), configs_exp.py:92 and exp_trainer.py:46-48


def _generator_device(generator: torch.Generator | None) -> torch.device:
    """Where random numbers are drawn: the generator's device, else the CPU, as the official code draws its kernels
    on the CPU and moves them (imagefilter.py:34-35). A seed then gives the same draws whatever x's device is."""
    return generator.device if generator is not None else torch.device("cpu")


def _normal(shape: Sequence[int], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """N(0, 1) numbers of `shape`, drawn from `generator` (or torch's global RNG), on `like`'s device and dtype."""
    return torch.randn(tuple(shape), generator=generator, device=_generator_device(generator)).to(like)


def _uniform(shape: Sequence[int], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """U(0, 1) numbers of `shape`, drawn like `_normal`."""
    return torch.rand(tuple(shape), generator=generator, device=_generator_device(generator)).to(like)


def _working(x: torch.Tensor) -> torch.Tensor:
    """x in a precision safe for norms of whole volumes: float64 stays, anything else computes in float32."""
    if x.dim() not in (4, 5):
        raise ValueError(f"expected a (N, C, H, W) or (N, C, D, H, W) tensor, got shape {tuple(x.shape)}")
    return x if x.dtype == torch.float64 else x.float()


def _per_sample(values: torch.Tensor, dims: int) -> torch.Tensor:
    """(N,) values shaped to broadcast over (N, C, *spatial) with `dims` spatial axes."""
    return values.view(-1, 1, *[1] * dims)


def frobenius(x: torch.Tensor) -> torch.Tensor:
    """Each sample's Frobenius norm over its channels and voxels, shaped (N, 1, 1, ...) to broadcast over x."""
    return _per_sample(torch.linalg.vector_norm(x.flatten(1), dim=1), x.dim() - 2)


def random_conv(x: torch.Tensor, out_channels: int, activate: bool, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """One GIN layer (official `GradlessGCReplayNonlinBlock`, imagefilter.py:23-44): a conv with a kernel size
    drawn from `KERNEL_SIZES` for the whole batch, N(0, 1) weights and bias drawn for each sample (a grouped conv,
    one group a sample), zero padding that keeps the size, then leaky ReLU (slope 0.01, torch's default, :41).
    Drawn in the official order: kernel size, weights (N * out, C, k, ...), bias (N * out)."""
    n, c, *spatial = x.shape
    k = KERNEL_SIZES[int(torch.randint(len(KERNEL_SIZES), (1,), generator=generator,
                                       device=_generator_device(generator)))]
    weight = _normal((n * out_channels, c, *[k] * len(spatial)), generator, x)
    bias = _normal((n * out_channels,), generator, x)
    conv = F.conv2d if len(spatial) == 2 else F.conv3d
    y = conv(x.reshape(1, n * c, *spatial), weight, bias, padding=k // 2, groups=n)
    return (F.leaky_relu(y) if activate else y).reshape(n, out_channels, *spatial)


def gin(x: torch.Tensor, generator: torch.Generator | None = None, layers: int = LAYERS, channels: int = CHANNELS
        ) -> torch.Tensor:
    """GIN (Ouyang et al., official `GINGroupConv.forward`, imagefilter.py:73-94): a random network of `layers`
    random convs (C -> `channels` -> ... -> C, leaky ReLU after all but the last) drawn for each sample, its output
    mixed with the input by a per-sample alpha ~ U(0, 1) (drawn first, :79), then rescaled to the input's per-sample
    Frobenius norm (:88-92). Official defaults: 4 layers, 2 intermediate channels (configs_exp.py:87-88).

    Same shape and dtype as x (2D or 3D); an all-zero sample stays zero. The official code maps 3 tiled copies of
    a slice to 3 channels (`gin_out_nc = 3`), DG-TTA 1 channel to 1; here C channels to C."""
    if layers < 2:
        raise ValueError(f"GIN needs at least 2 layers (a first and a last conv), got {layers}")
    work = _working(x)
    n, c = work.shape[:2]
    dims = work.dim() - 2
    alpha = _per_sample(_uniform((n,), generator, work), dims)
    h = work
    widths = [channels] * (layers - 1) + [c]
    for i, width in enumerate(widths):
        h = random_conv(h, width, activate=i < layers - 1, generator=generator)
    mixed = alpha * h + (1 - alpha) * work
    out = mixed * frobenius(work) / (frobenius(mixed) + NORM_EPS)
    return out.to(x.dtype) if x.is_floating_point() else out


def _quadratic_bspline(t: torch.Tensor) -> torch.Tensor:
    """The quadratic B-spline, support |t| < 1.5: the official `interpolation_order: 2` kernel (exp_trainer.py:49,
    adv_bias.py:11-33, a box of one spacing convolved twice with itself, sampled)."""
    t = t.abs()
    return torch.where(t <= 0.5, 0.75 - t**2, torch.where(t < 1.5, 0.5 * (1.5 - t) ** 2, torch.zeros_like(t)))


def _spline_basis(size: int, grid: int, like: torch.Tensor) -> torch.Tensor:
    """(size, grid + 2) weights of the control points for each of `size` voxels along one axis. The voxels span
    `grid` spacings from the first to the last voxel centre; the control points sit half a spacing outside, as the
    official grid of `grid + 2` points whose cropped interpolation covers the image (adv_bias.py:186-198, 281-291)."""
    positions = torch.linspace(0, grid, size, dtype=like.dtype, device=like.device)
    centres = torch.arange(grid + 2, dtype=like.dtype, device=like.device) - 0.5
    return _quadratic_bspline(positions[:, None] - centres[None, :])


def smooth_mask(shape: Sequence[int], generator: torch.Generator | None = None,
                device: torch.device | str | None = None, grid: int = GRID) -> torch.Tensor:
    """IPA's random blending mask for a batch of `shape` (N, C, *spatial): (N, 1, *spatial), smooth, in [0, 1]
    with 0 and 1 reached in each sample.

    As the official `AdvBias` with the experiments' config (exp_trainer.py:43-55, 179-180): control points N(0, 1)
    (adv_bias.py:202) scaled to unit L2 norm per sample (`unit_normalize`, adv_bias.py:217 and
    adv_transformation_base.py:119-126), interpolated by a quadratic B-spline over `grid + 2` points per axis, exp
    (adv_bias.py:295), then min-max rescaled to [0, 1] per sample (utils.py:10-28; the bias field's intermediate
    rescaling to [1 - 0.3, 1 + 0.3] is affine and cancels).

    Deviations, both for 3D and other sizes than the official 192 x 192 slices: the official spacing is fixed in
    pixels (24 at half resolution, i.e. 48 px = 4 spacings per side of 192); here it is `grid` (4) spacings per
    axis at any size. The official spline is evaluated at half resolution and bilinearly upsampled, and its
    sampled kernel (70 samples, even) sits half a half-resolution pixel off centre; here the spline is evaluated,
    centred, at every voxel. From the same control points the two masks differ by at most about 0.05 (mean about
    0.008) on 192 x 192, mostly that one-pixel shift of the official mask."""
    n, _, *spatial = shape
    like = torch.empty(0, device=device)
    control = _normal((n, 1, *[grid + 2] * len(spatial)), generator, like)
    field = control / frobenius(control)
    for axis, size in enumerate(spatial):
        basis = _spline_basis(size, grid, like)
        field = torch.movedim(torch.movedim(field, 2 + axis, -1) @ basis.T, -1, 2 + axis)
    field = field.exp()
    low = field.flatten(1).amin(dim=1)
    high = field.flatten(1).amax(dim=1)
    dims = len(spatial)
    return (field - _per_sample(low, dims)) / _per_sample((high - low).clamp_min(1e-20), dims)


def blend(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """a where the mask is 1, b where it is 0, linear in between (official exp_trainer.py:183)."""
    return a * mask + b * (1 - mask)


def ipa(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """GIN + IPA as Ouyang et al. train with it (exp_trainer.py:159-192): two GIN views of x, blended by a
    `smooth_mask` per sample. Drawn in the official order: both GIN networks, then the mask.

    The official step makes three GIN views per batch and replaces the first two by their blends with the mask
    and with 1 - mask (the third stays plain GIN); each output here is one such blend, its counterpart is another
    call's. Same shape and dtype as x; the blend is not renormalized (neither is the official one)."""
    first, second = gin(x, generator), gin(x, generator)
    mask = smooth_mask(x.shape, generator, x.device)
    return blend(first, second, mask.to(first.dtype))


def source_augmentation(name: str) -> Augmentation | None:
    """The source augmentation `name` of `SOURCE_AUGMENTATIONS`: none, GIN alone, or GIN + IPA (official
    `exp_type` 'gin' and 'ginipa', exp_trainer.py:39-59)."""
    known: dict[str, Augmentation | None] = {"none": None, "gin": gin, "gin-ipa": ipa}
    if name not in known:
        raise RegistryError(f"unknown source augmentation {name!r} (known: {', '.join(SOURCE_AUGMENTATIONS)})")
    return known[name]
