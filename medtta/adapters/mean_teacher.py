"""Mean-teacher adaptation (Tarvainen & Valpola, NeurIPS 2017) and its continual segmentation variant CoTTA
(Wang, Fink, Van Gool, Dai, CVPR 2022; official code qinenergy/cotta)."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medtta.adapters.base import Adapter, use_batch_statistics
from medtta.adapters.views import View, mean_probabilities
from medtta.models.base import weights_under_batch_statistics


class MeanTeacher(Adapter):
    """Every student weight is trained towards the soft predictions of a teacher, the exponential moving average
    of the student (rate `ema`), which makes the predictions.

    BatchNorm normalizes with test-batch statistics in both; Adam at `lr`; the teacher is updated after each step.
    """

    paradigm: ClassVar[str] = "output"
    defaults: ClassVar[dict[str, Any]] = {"lr": 1e-4, "ema": 0.999}
    default_steps: ClassVar[int] = 1

    def configure(self, model: nn.Module) -> None:
        super().configure(model)
        use_batch_statistics(model)
        self.teacher = copy.deepcopy(model)

    def collect_params(self, model: nn.Module) -> list[nn.Parameter]:
        return weights_under_batch_statistics(model)

    def tracked_state(self) -> set[str]:
        return {f"teacher.{name}" for name, _ in self.teacher.named_parameters()}  # moves with the student

    def targets(self, x: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """What the student learns from: the teacher's class probabilities."""
        return teacher_logits.softmax(1)

    def objective(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            teacher_logits = self.teacher(x)
            targets = self.targets(x, teacher_logits)
        student = self.model(x).log_softmax(1)
        loss = -(targets * student).sum(1).mean() if targets.dim() == 4 else F.nll_loss(student, targets)
        return loss, teacher_logits

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
    """Continual TTA: a mean teacher (EMA 0.999) whose hard pseudo-labels, averaged over augmented views where a
    frozen source anchor is unsure, train every weight; each weight element returns to its source value with
    probability `restore` after every step.

    Per pixel, the pseudo-label is the teacher's plain prediction where the anchor's confidence exceeds
    `confidence` (0.69, CoTTA's segmentation value), else the argmax of the teacher's softmax averaged over
    scales 0.5, 0.75, 1 with and without a flip (the official code also scales up to 2: left out to bound the
    cost on CPU; 6 views). Cross-entropy, Adam at `lr`. Built for the continual setting; runs in both.
    """

    defaults: ClassVar[dict[str, Any]] = {"lr": 1e-4, "ema": 0.999, "confidence": 0.69, "restore": 0.01}
    views: ClassVar[list[View]] = [View(flip=flip, scale=scale) for scale in (0.5, 0.75, 1.0) for flip in (False, True)
                                   if (scale, flip) != (1.0, False)]  # the plain view is the teacher's own output

    def configure(self, model: nn.Module) -> None:
        super().configure(model)
        self.anchor = copy.deepcopy(model)

    def targets(self, x: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        plain = teacher_logits.softmax(1)
        n = len(self.views)
        averaged = (plain + n * mean_probabilities(self.teacher, x, self.views)) / (n + 1)
        sure = self.anchor(x).softmax(1).amax(1) > self.hparams["confidence"]
        return torch.where(sure, plain.argmax(1), averaged.argmax(1))

    @torch.no_grad()
    def after_step(self) -> None:
        super().after_step()
        for source, weight in self.paired(self.anchor):
            weight.copy_(torch.where(torch.rand_like(weight) < self.hparams["restore"], source, weight))
