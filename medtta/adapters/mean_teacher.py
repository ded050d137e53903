"""Mean-teacher adaptation (Tarvainen & Valpola, NeurIPS 2017) and its continual segmentation variant CoTTA
(Wang, Fink, Van Gool, Dai, CVPR 2022; official code qinenergy/cotta)."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medtta.adapters.base import Adapter, use_batch_statistics
from medtta.adapters.views import View, all_flips, mean_probabilities, perturb_intensity
from medtta.models.base import weights_under_batch_statistics


class MeanTeacher(Adapter):
    """Every student weight is trained towards the predictions of a teacher, the exponential moving average of the
    student (rate `ema`), which makes the predictions on the plain slices.

    As official Mean Teacher (CuriousAI/mean-teacher: `TransformTwice`, `softmax_mse_loss`), student and teacher
    see independently augmented copies of the batch and the loss is the squared difference of their softmax
    outputs (summed over classes, averaged over pixels). The augmentation is intensity-only (`perturb_intensity`:
    contrast in 1 ± `contrast` and Gaussian noise of `noise` times each slice's std), so both predictions stay on
    the slice's grid; official adds translations and flips, which a segmenter would have to invert. Without
    independent augmentation the two networks start identical on identical inputs and the gradient is zero.
    No consistency ramp-up (the teacher starts as the trained source model). BatchNorm normalizes with test-batch
    statistics in both; Adam at `lr`; the teacher is updated after each step.
    """

    other_architectures: ClassVar[tuple[str, ...]] = ("nnunet",)  # a trained nnU-Net (InstanceNorm)
    paradigm: ClassVar[str] = "output"
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)
    defaults: ClassVar[dict[str, Any]] = {"lr": 1e-4, "ema": 0.999, "contrast": 0.1, "noise": 0.1}
    default_steps: ClassVar[int] = 1
    logits_in_objective: ClassVar[bool] = False  # the objective sees augmented copies; the teacher predicts

    def configure(self, model: nn.Module) -> None:
        super().configure(model)
        use_batch_statistics(model)
        self.teacher = copy.deepcopy(model)

    def collect_params(self, model: nn.Module) -> list[nn.Parameter]:
        return weights_under_batch_statistics(model)

    def tracked_state(self) -> set[str]:
        return {f"teacher.{name}" for name, _ in self.teacher.named_parameters()}  # moves with the student

    def _augmented(self, x: torch.Tensor) -> torch.Tensor:
        return perturb_intensity(x, self.hparams["contrast"], self.hparams["noise"])

    def objective(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        with torch.no_grad():
            teacher = self.teacher(self._augmented(x)).softmax(1)
        student = self.model(self._augmented(x)).softmax(1)
        return ((student - teacher) ** 2).sum(1).mean(), None

    def update(self, x: torch.Tensor) -> torch.Tensor | None:
        logits = super().update(x)
        self.after_step()
        return logits

    def paired(self, copy_of_model: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(parameter of a copy of the model, the model's own) for every collected parameter."""
        collected = {id(p) for p in self.params}
        return [(theirs, ours) for theirs, ours in zip(copy_of_model.parameters(), self.model.parameters(), strict=True)
                if id(ours) in collected]

    @torch.no_grad()
    def after_step(self) -> None:
        rate = self.hparams["ema"]
        for teacher, student in self.paired(self.teacher):
            teacher.mul_(rate).add_(student, alpha=1 - rate)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x)


class CoTTA(MeanTeacher):
    """Continual TTA: a mean teacher (EMA 0.999) whose pseudo-labels, averaged over augmented views where a frozen
    source anchor is unsure, train every weight by cross-entropy; each weight element returns to its source value
    with probability `restore` after every step.

    As the official segmentation code (qinenergy/cotta, `acdc-submission/mmseg/apis/test.py`): per pixel, the
    pseudo-label is the teacher's plain prediction where the anchor's confidence exceeds `confidence` (0.69), else
    the argmax of the teacher's softmax averaged over the views, each view's logits resized back before the
    softmax; and the pseudo-label is also the output (the prediction), not the teacher's plain view. Views: scales
    0.5, 0.75 and 1 with and without a horizontal flip (official also scales up to 2: left out to bound the cost on
    a CPU; 6 views); on 3D volumes the 8 flips of the three axes (as the 3D ports of CoTTA for medical volumes
    average). Adam at the official segmentation rate, 7.5e-6 (6e-5 / 8). Built for the continual setting; runs in
    both.
    """

    defaults: ClassVar[dict[str, Any]] = {"lr": 7.5e-6, "ema": 0.999, "confidence": 0.69, "restore": 0.01}
    #: per spatial dimensions; the plain view is the teacher's own output
    views: ClassVar[dict[int, list[View]]] = {
        2: [View(flips=flips, scale=scale) for scale in (0.5, 0.75, 1.0) for flips in ((), (-1,))
            if (scale, flips) != (1.0, ())],
        3: [View(flips=flips) for flips in all_flips(3)[1:]]}
    logits_in_objective: ClassVar[bool] = True  # the pseudo-label the objective computes is the prediction

    def configure(self, model: nn.Module) -> None:
        super().configure(model)
        self.anchor = copy.deepcopy(model)

    def pseudo_label(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) probabilities whose argmax is CoTTA's pseudo-label: the teacher's plain softmax where the
        anchor is confident, the view-averaged one elsewhere."""
        plain = self.teacher(x).softmax(1)
        views = self.views[x.dim() - 2]
        averaged = (plain + len(views) * mean_probabilities(self.teacher, x, views)) / (len(views) + 1)
        sure = self.anchor(x).softmax(1).amax(1, keepdim=True) > self.hparams["confidence"]
        return torch.where(sure, plain, averaged)

    def objective(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            target = self.pseudo_label(x)
        return F.cross_entropy(self.model(x), target.argmax(1)), target.clamp_min(1e-8).log()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.pseudo_label(x).clamp_min(1e-8).log()

    @torch.no_grad()
    def after_step(self) -> None:
        super().after_step()
        for source, weight in self.paired(self.anchor):
            weight.copy_(torch.where(torch.rand_like(weight) < self.hparams["restore"], source, weight))
