"""DG-TTA: the test-time adaptation step of Weihsbach, Kruse, Bigalke & Heinrich, "DG-TTA: Out-of-domain medical
image segmentation through Domain Generalization and Test-Time Adaptation" (arXiv 2312.06275, 2023; official code:
multimodallearning/DG-TTA, `dg_tta/tta/tta.py`, `torch_utils.py` and `augmentation_utils.py`)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from monai.losses import DiceLoss
from torch import nn

from medtta.adapters.base import Adapter, use_batch_statistics
from medtta.adapters.views import AffineView
from medtta.errors import RegistryError
from medtta.models.base import weights_under_batch_statistics

NORMALIZATIONS = ("batch", "source")
ACCUMULATED_PATCHES = 16  # 3D: random patches whose gradients make one update (official: 16 per epoch)


class DGTTA(Adapter):
    """Train every weight until two randomly warped views of the slices agree once warped back (1 - soft Dice).

    Each branch warps the slices by its own random affine map (identity plus N(0, `strength`²) on every entry of
    the 2x3 matrix, as the official `get_rand_affine` with strength 0.05; border padding), predicts, and its softmax
    is warped back with the exact inverse. The loss is 1 - soft Dice between the two, over the foreground classes,
    pooled over the batch's slices (the official code pools over one 3D patch) and over the pixels both views
    reached (the official code masks where the zero-padded, warped-back logits sum above 0). Only branch a carries
    a gradient (official `have_grad_in="branch_a"`), branch b is the target. No intensity augmentation at test time
    (official `do_intensity_aug_in="none"`; GIN belongs to the DG pre-training, which the `unet` source does not do).

    Soft Dice: MONAI's `DiceLoss(squared_pred=True)`, 2 sum(ab) / (sum(a²) + sum(b²)); the official one,
    4 sum(ab) / sum((a+b)²), is 2r / (1 + r) of it: both are 1 exactly when the two agree, and Adam makes the
    scale of the gradient irrelevant. The official code warps the logits back and then takes the softmax; here the
    softmax is warped, which keeps interpolated values probabilities (they agree inside the mask up to interpolation).

    Normalization (`norm`): the official network is nnU-Net with InstanceNorm, which normalizes every 3D patch by
    its own statistics at training and at test time. The nearest thing with our BatchNorm is `batch`: every
    BatchNorm normalizes with the statistics of the batch of the volume's slices, in training and in prediction;
    every weight except the conv biases a batch-statistics BatchNorm cancels is trained. `source` keeps the source
    running statistics (inference mode) and trains every weight, conv biases and BatchNorm affine included.

    Schedule: AdamW, lr 1e-5, weight decay 0.01 (official: `lr=1e-5`, PyTorch's default weight decay). The official
    code runs 12 epochs of 16 accumulated random patches, one update per epoch (its first epoch only evaluates: 11).
    Episodic here: `steps` (default 12) passes over the volume's slices, each one update with the gradients
    accumulated over the volume's batches, every batch with fresh warps. Continual: one update per batch, no reset.
    `ensemble` > 1 (official: 3) repeats the episodic adaptation from the reset state and predicts with the
    softmax averaged over the adapted models (the log of it is returned); it does not apply in the continual
    setting, which has one model. Cost per update: branch a forward and backward, branch b forward.

    3D volumes (the official setting): 3D affine warps (3x4 matrices); each episodic step accumulates the gradients
    of 16 random patches (official), `patches_per_update` per batch; continual: one pass of patch updates per volume.

    Hyper-parameters: `lr` (1e-5), `weight_decay` (0.01), `strength` (0.05), `ensemble` (1), `norm` (batch).
    On 3 volumes per site of synth-mri (episodic, 12 passes), `norm=batch` beat `norm=source` on every site, and
    lr 1e-4 did better than the official 1e-5 (1e-3 collapses); the default keeps the paper's value.
    """

    paradigm: ClassVar[str] = "output"
    defaults: ClassVar[dict[str, Any]] = {"lr": 1e-5, "weight_decay": 0.01, "strength": 0.05, "ensemble": 1,
                                          "norm": "batch"}
    default_steps: ClassVar[int] = 12
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)
    logits_in_objective: ClassVar[bool] = False  # the objective sees warped slices only

    def configure(self, model: nn.Module) -> None:
        if self.hparams["norm"] not in NORMALIZATIONS:
            raise RegistryError(f"{type(self).__name__} hyper-parameter norm must be one of "
                                f"{', '.join(NORMALIZATIONS)}, got {self.hparams['norm']!r}")
        super().configure(model)
        if self.hparams["norm"] == "batch":
            use_batch_statistics(model)
        self.dice = DiceLoss(include_background=False, squared_pred=True, batch=True)
        self.members: list[dict[str, torch.Tensor]] = []  # the ensemble's adapted states, for the episode

    def collect_params(self, model: nn.Module) -> list[nn.Parameter]:
        return weights_under_batch_statistics(model) if self.hparams["norm"] == "batch" else list(model.parameters())

    def make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])

    def _branch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The softmax of a randomly warped view of `x`, warped back, and where the view reached."""
        view = AffineView.random(len(x), self.hparams["strength"], x.device, x.dim() - 2)
        size = tuple(x.shape[2:])
        return view.invert(self.model(view.apply(x)).softmax(1), size), view.seen(size)

    def consistency(self, x: torch.Tensor) -> torch.Tensor:
        """1 - soft Dice between two warped views' predictions, back on `x`'s grid, where both views reached."""
        with torch.no_grad():
            target, seen_b = self._branch(x)
        prediction, seen_a = self._branch(x)
        both = seen_a & seen_b
        return self.dice(prediction * both, target * both)

    def objective(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.consistency(x), None

    def adapt(self, x: torch.Tensor, steps: int, batch_size: int) -> None:
        members = []
        for run in range(self.hparams["ensemble"]):
            if run:
                self.reset()  # each member adapts independently from the source model
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
        if not self.members:
            return self.model(x)
        probabilities = torch.stack([torch.func.functional_call(self.model, state, (x,)).softmax(1)
                                     for state in self.members]).mean(0)
        return probabilities.clamp_min(1e-8).log()

    def reset(self) -> None:
        super().reset()
        self.members = []
