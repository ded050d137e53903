"""Test-time adaptable networks (Karani, Erdil, Chaitanya, Konukoglu, MedIA 2021; official TensorFlow code:
neerakara/test-time-adaptable-neural-networks-for-domain-generalization, `update_i2i_mapper.py`)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from monai.losses import DiceLoss
from torch import nn

from medtta.adapters.base import Adapter


class NormNet(Adapter):
    """Karani et al. 2021: adapt the normalization sub-network until the prediction agrees with its DAE-denoised self.

    The denoising autoencoder (DAE) is a shape prior learnt from source label volumes.

    Per volume: Adam (lr 1e-3) on the Dice between S(N(x)) and the DAE's output, gradients accumulated over the
    volume's batches (one update is one pass); the DAE target is refreshed every `refresh` updates, and the
    normalizer with the best Dice(prediction, DAE) at those points (the unadapted one included) is kept.
    Continual: one update per batch against that batch's DAE target, no reset. The Dice is taken at the slices'
    resolution (Karani: on the DAE's downsampled grid), over the foreground classes, pooled over the slices.

    Hyper-parameters:
        lr: Adam learning rate (Karani: 1e-3).
        refresh: updates between DAE target refreshes and best-state checks (Karani: 25 epochs of ~500).
    """

    architecture: ClassVar[str] = "unet-normalizer"
    paradigm: ClassVar[str] = "input"
    defaults: ClassVar[dict[str, Any]] = {"lr": 1e-3, "refresh": 10}
    default_steps: ClassVar[int] = 50

    def configure(self, model: nn.Module) -> None:
        super().configure(model)
        self.dice = DiceLoss(include_background=False, batch=True)

    def collect_params(self, model: nn.Module) -> list[nn.Parameter]:
        return model.parts()["normalizer"]

    @torch.no_grad()
    def _target(self, probabilities: torch.Tensor) -> torch.Tensor:
        return self.model.denoise(probabilities)

    def objective(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        probabilities = logits.softmax(1)
        return self.dice(probabilities, self._target(probabilities.detach())), logits

    def adapt(self, x: torch.Tensor, steps: int, batch_size: int) -> None:
        batches = torch.split(x, batch_size)
        best: dict[str, Any] = {"score": -float("inf")}
        for step in range(steps):
            if step % self.hparams["refresh"] == 0:
                targets = self._refresh(batches, best)
            self.accumulate(x, batch_size, lambda i, b, t=targets: self.dice(self.model(b).softmax(1), t[i]))
            self.optimizer_step()
        self._refresh(batches, best)  # scores the last state too
        self.model.normalizer.load_state_dict(best["state"])

    def _refresh(self, batches: tuple[torch.Tensor, ...], best: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """The DAE targets of the current prediction, per batch; keeps the normalizer in `best` if it scores
        the best Dice(prediction, DAE) so far."""
        probabilities = torch.cat([self.predict(b) for b in batches]).softmax(1)
        target = self._target(probabilities)
        score = 1 - float(self.dice(probabilities, target))
        if score > best["score"]:
            best.update(score=score, state={k: v.clone() for k, v in self.model.normalizer.state_dict().items()})
        return torch.split(target, len(batches[0]))
