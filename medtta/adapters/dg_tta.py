"""DG-TTA: the test-time adaptation step of Weihsbach, Kruse, Bigalke & Heinrich, "DG-TTA: Out-of-domain medical
image segmentation through Domain Generalization and Test-Time Adaptation" (arXiv 2312.06275, 2023).

Written after the official code, github.com/multimodallearning/DG-TTA (the `dg_tta` package, 1.0.18, read as
installed): `dg_tta/tta/tta.py` (`tta_main`: the epoch loop, the loss lines and the ensemble; `calc_branch`: one
branch), `dg_tta/tta/torch_utils.py` (`soft_dice_loss`), `dg_tta/tta/augmentation_utils.py` (`get_rand_affine`),
`dg_tta/tta/config_log_utils.py` (`TEMPLATE_PLAN`, the defaults) and, for the ensemble's prediction,
`dg_tta/tta/nnunet_utils.py` (`run_inference`) with nnunetv2's `nnUNetPredictor.predict_logits_from_preprocessed_data`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medtta.adapters.base import Adapter, use_batch_statistics
from medtta.adapters.views import AffineView
from medtta.errors import RegistryError
from medtta.models.base import weights_under_batch_statistics

NORMALIZATIONS = ("batch", "source")
#: 3D: random patches whose gradients make one update (TEMPLATE_PLAN `patches_to_be_accumulated` 16)
ACCUMULATED_PATCHES = 16
FOREGROUND = 1  # tta_main's START_CLASS: the background channel is left out of the consistency loss


def soft_dice(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, C): the official `soft_dice_loss` (torch_utils.py) per sample and class, 4 sum(ab) / sum((a + b)²), computed
    as it does (means of 2ab and of (a + b)² / 2, no eps), for any number of spatial axes. Its guard: where the
    denominator of its batch (one patch) is 0 the Dice is 1; here the guard is per sample and class, which is the
    same on one patch whose every class is empty and gives 1 (two empty maps agree) where the official gives 0/0."""
    n, c = a.shape[:2]
    nominator = (2.0 * a * b).reshape(n, c, -1).mean(2)
    denominator = 1 / 2 * ((a + b) ** 2).reshape(n, c, -1).mean(2)
    empty = denominator == 0.0
    if not empty.any():
        return nominator / denominator
    return torch.where(empty, nominator * 0.0 + 1.0, nominator / torch.where(empty, 1.0, denominator))


def branch_grids(view: AffineView, size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling grids of `view` and of its inverse on a grid `size`, built with `calc_branch`'s arithmetic:
    (0 * identity + (affine_grid(R) - identity)) + identity, not affine_grid(R) itself. The two differ by rounding
    only, but Adam's first step, about lr * sign(g), turns rounding in near-zero gradients into steps of up to 2 lr
    (measured on an nnU-Net: 1.2e-5 apart after one update with affine_grid(R), 1.5e-8 with this arithmetic)."""
    theta = view.theta
    n, d = theta.shape[:2]
    shape = [n, 1, *size]
    identity = F.affine_grid(torch.eye(d + 1, device=theta.device).repeat(n, 1, 1)[:, :d], shape, align_corners=False)
    zero = 0.0 * identity
    grid = zero + (F.affine_grid(theta, shape, align_corners=False) - identity) + identity
    inverse = zero + (F.affine_grid(view.inverse(), shape, align_corners=False) - identity) + identity
    return grid, inverse


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """`calc_branch`'s warp of the input: bilinear, border padding."""
    return F.grid_sample(x, grid.to(x.dtype), padding_mode="border", align_corners=False)


def warp_back(logits: torch.Tensor, grid_inverse: torch.Tensor) -> torch.Tensor:
    """`calc_branch`'s warp of the view's logits back onto the input's grid: bilinear, zero padding (outside the view
    the logits are 0)."""
    return F.grid_sample(logits, grid_inverse.to(logits.dtype), align_corners=False)


class DGTTA(Adapter):
    """Train every weight until two randomly warped views of a patch agree once warped back (1 - soft Dice).

    One loss (official `calc_branch` twice, then the loss lines of `tta_main`): each branch warps the input by its
    own random affine map (identity plus N(0, `strength`²) on every entry of the 2x3 / 3x4 matrix, `get_rand_affine`,
    strength 0.05; border padding, as `calc_branch` warps the image), predicts, and warps its LOGITS back with the
    exact inverse (the inverse of the 4x4 / 3x3 matrix, as `get_rand_affine` computes it; zero padding), both
    sampling grids built with `calc_branch`'s arithmetic (`branch_grids`). Both branches carry a gradient:
    `calc_branch` takes its grad context from `have_grad_in` alone, and the default "branch_a" gives `nullcontext`
    to both (branch a's matrix is drawn first, then branch b's, as `tta_main` calls them). The mask is tta_main's
    `common_content_mask`: voxels where the warped-back logits of both branches sum above 0 (this drops what a view
    did not reach, and also any reached voxel whose logits sum to <= 0: a quirk kept on purpose). Each branch's
    softmax is multiplied by the mask, and the loss is 1 - the official soft Dice (`soft_dice`) averaged over the
    foreground classes (START_CLASS 1) and over the samples: the official batch is one patch (`batch_size` 1) and
    its per-patch losses are averaged over the 16 accumulated patches, so here every patch (3D) or slice (2D) has its
    own Dice, and the losses are averaged, never pooled over a batch. No intensity augmentation at test time
    (`do_intensity_aug_in="none"`; GIN belongs to the DG pre-training, `medtta.models.dg_augment`).

    Normalization (`norm`): the official network is nnU-Net with InstanceNorm, which normalizes every patch by its
    own statistics at training and at test time, and the official code trains every parameter
    (`params_with_grad="all"`). With BatchNorm networks, `batch`: every BatchNorm normalizes with the statistics of
    its batch (the 2D slices, or in 3D the volume's sliding windows), in training and in prediction, and every weight
    the output depends on is trained (`weights_under_batch_statistics` leaves out the conv biases a per-channel norm
    cancels, InstanceNorm included, and an nnU-Net's unused deep-supervision heads: their gradient is rounding, which
    Adam would blow up into full steps, and they have no effect on the outputs). `source` keeps the source running
    statistics (inference mode) and trains every parameter, conv biases included (the official `all`; for BatchNorm
    networks the official code also keeps the running statistics: `buffer_running_stats` / `apply_running_stats`
    undo the train-mode updates).

    Defaults, all from `config_log_utils.TEMPLATE_PLAN` unless said otherwise: AdamW (`tta_main`), lr 1e-5 (`lr`),
    weight decay 0.01 (PyTorch's AdamW default, which `tta_main` leaves as it is), strength 0.05 (the default of
    `get_rand_affine`, which `calc_branch` calls without it), `default_steps` 11 (`epochs` 12 with
    `start_tta_at_epoch` 1: the first epoch only evaluates, so 11 updates), 16 accumulated patches per update in 3D
    (`patches_to_be_accumulated`), `ensemble` 3 (`ensemble_count`). Episodic: each of `steps` updates accumulates
    the gradients of the per-sample losses averaged: in 3D over `ACCUMULATED_PATCHES` random patches (the engine's
    `patches_per_update` a batch), in 2D over the volume's slices (each batch with fresh warps). Continual: one
    update per batch (2D) or per batch of patches (3D), no reset. The ensemble repeats the episodic adaptation from
    the reset state and predicts with the members' LOGITS averaged (`run_inference` hands the members' parameters to
    nnUNetPredictor, which loads each with `load_state_dict`, sums the logits and divides by their number); it does
    not apply in the continual setting, which has one model; an episode costs `ensemble` adaptations (`-p ensemble=1`
    for one). Cost per update: both branches forward and backward.

    Remaining deviations, with their reasons:
    - patch sampling: the official `get_batch` resamples each patch with `grid_sample` at a continuous random offset
      (trilinear) and pads with the volume's minimum where the volume is smaller than the patch; medtta crops at
      integer corners (`random_patches`, zero padding at the end), as its other 3D methods do. The draws also come
      in another order (branch a's matrix, then branch b's, per batch of patches rather than per patch).
    - the Dice guard is per sample and class (see `soft_dice`): the same wherever the official value is a number.
    - 2D (slices, not in the official code): the same loss with 2x3 matrices, one Dice per slice.
    """

    other_architectures: ClassVar[tuple[str, ...]] = ("nnunet",)  # a trained nnU-Net (InstanceNorm)
    paradigm: ClassVar[str] = "output"
    defaults: ClassVar[dict[str, Any]] = {"lr": 1e-5, "weight_decay": 0.01, "strength": 0.05, "ensemble": 3,
                                          "norm": "batch"}
    default_steps: ClassVar[int] = 11
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)
    logits_in_objective: ClassVar[bool] = False  # the objective sees warped inputs only

    def configure(self, model: nn.Module) -> None:
        if self.hparams["norm"] not in NORMALIZATIONS:
            raise RegistryError(f"{type(self).__name__} hyper-parameter norm must be one of "
                                f"{', '.join(NORMALIZATIONS)}, got {self.hparams['norm']!r}")
        super().configure(model)
        if self.hparams["norm"] == "batch":
            use_batch_statistics(model)
        self.members: list[dict[str, torch.Tensor]] = []  # the ensemble's adapted states, for the episode

    def collect_params(self, model: nn.Module) -> list[nn.Parameter]:
        return weights_under_batch_statistics(model) if self.hparams["norm"] == "batch" else list(model.parameters())

    def make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """`calc_branch`: the logits of a randomly warped view of `x`, warped back onto `x`'s grid (with gradient)."""
        view = AffineView.random(len(x), self.hparams["strength"], x.device, x.dim() - 2)
        grid, grid_inverse = branch_grids(view, tuple(x.shape[2:]))
        return warp_back(self.model(warp(x, grid)), grid_inverse)

    def consistency(self, x: torch.Tensor) -> torch.Tensor:
        """tta_main's loss, per sample then averaged: 1 - soft Dice over the foreground between the two branches'
        softmax, both masked where both warped-back logit sums are above 0."""
        target_a = self.branch(x)
        target_b = self.branch(x)
        mask = (target_a.sum(1, keepdim=True) > 0.0).float() * (target_b.sum(1, keepdim=True) > 0.0).float()
        return 1 - soft_dice(target_a.softmax(1) * mask, target_b.softmax(1) * mask)[:, FOREGROUND:].mean()

    def objective(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.consistency(x), None

    def adapt(self, x: torch.Tensor, steps: int, batch_size: int) -> None:
        members = []
        for run in range(self.hparams["ensemble"]):
            if run:
                self.reset()  # each member adapts independently from the source model (official: a fresh model)
            for _ in range(steps):
                if x.dim() == 5:
                    with self.window_statistics(x):
                        self.accumulate(self.patches(x, ACCUMULATED_PATCHES), self.patches_per_update,
                                        lambda _, b: self.consistency(b))
                else:
                    self.accumulate(x, batch_size, lambda _, b: self.consistency(b))
                self.optimizer_step()
            if self.hparams["ensemble"] > 1:
                members.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        self.members = members

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits; after an ensemble's adaptation the members' logits averaged (nnUNetPredictor: each
        member's state loaded with `load_state_dict`, the logits summed, then divided), the model's own state put
        back after. `load_state_dict` works for any module, aliased parameters (nnU-Net's) included."""
        if not self.members:
            return self.model(x)
        adapted = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        prediction = None
        try:
            for state in self.members:
                self.model.load_state_dict(state)
                logits = self.model(x)
                prediction = logits if prediction is None else prediction + logits
        finally:
            self.model.load_state_dict(adapted)
        return prediction / len(self.members)

    def reset(self) -> None:
        super().reset()
        self.members = []
