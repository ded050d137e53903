"""SAR: sharpness-aware and reliable entropy minimization (Niu et al., ICLR 2023; official code mr-eggplant/SAR)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from medtta.adapters.base import Adapter, use_batch_statistics
from medtta.models.base import norm_params


def pixel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) logits -> (N, H, W) entropy of the softmax."""
    log_p = logits.log_softmax(1)
    return -(log_p.exp() * log_p).sum(1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp_min(1)


class SAR(Adapter):
    """Entropy minimization on reliable pixels only (entropy below 0.4 ln C), with sharpness-aware minimization
    (rho 0.05) over SGD with momentum 0.9 on the norm affine parameters (BatchNorm, InstanceNorm or GroupNorm), and
    model recovery: when the moving average of the loss (0.9 / 0.1) falls below the threshold, the model and
    optimizer are reset.

    Per pixel, as the official code filters per image. It leaves out the deepest layers ('layer4' of a ResNet):
    here the UNet's bottom block, whose BatchNorm stays fixed. BatchNorm uses test-batch statistics.

    Official values kept or adapted (mr-eggplant/SAR, `main.py`, `sar.py`):
    - `lr` 2.5e-4: the official rate for its BatchNorm ResNet-50 at batch sizes of 32 and more (medtta's default
      batch is 32 slices); 1e-3 is its ViT value.
    - After a reset the moving average keeps its low value, as official (`self.ema = ema` after `reset()`), so the
      model resets again at every step until the loss average climbs back above the threshold.
    - The recovery threshold is a fraction of ln C, as the margin is: the official 0.2 nats among 1000 ImageNet
      classes is `reset_below` = 0.2 / ln 1000 of the maximum entropy (0.04 nats for 4 classes); an absolute 0.2
      would reset a 4-class segmenter, whose background pixels are nearly certain, at almost every step.
    - A step without reliable pixels leaves the moving average as it is (the official code skips its NaN loss).
    """

    other_architectures: ClassVar[tuple[str, ...]] = ("nnunet",)  # a trained nnU-Net (InstanceNorm)
    paradigm: ClassVar[str] = "output"
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)
    own_criterion: ClassVar[str] = "entropy"  # its loss: selecting by entropy selects by its own objective
    defaults: ClassVar[dict[str, Any]] = {"lr": 2.5e-4, "rho": 0.05, "margin": 0.4, "reset_below": 0.2 / math.log(1000)}
    default_steps: ClassVar[int] = 1

    def configure(self, model: nn.Module) -> None:
        super().configure(model)
        use_batch_statistics(model)
        self.register_buffer("loss_ema", torch.tensor(-1.0))  # -1: no loss seen yet

    def collect_params(self, model: nn.Module) -> list[nn.Parameter]:
        deepest = {id(p) for p in norm_params(model.encoder_blocks[-1])}
        return [p for p in norm_params(model) if id(p) not in deepest]

    def make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.hparams["lr"], momentum=0.9)

    def tracked_state(self) -> set[str]:
        return {"loss_ema"}

    def update(self, x: torch.Tensor) -> torch.Tensor:
        max_entropy = math.log(self.model.n_classes)
        margin = self.hparams["margin"] * max_entropy
        with torch.enable_grad():
            logits = self.model(x)
            entropy = pixel_entropy(logits)
            reliable = entropy.detach() < margin
            self.backward(_masked_mean(entropy, reliable))
            ascent = self._climb()
            entropy = pixel_entropy(self.model(x))
            reliable &= entropy.detach() < margin
            loss = _masked_mean(entropy, reliable)
            self.backward(loss)
        with torch.no_grad():
            for p, e in zip(self.params, ascent, strict=True):
                p.sub_(e)
        self.optimizer_step()
        if reliable.any():
            self._recover(float(loss.detach()), self.hparams["reset_below"] * max_entropy)
        return logits.detach()

    @torch.no_grad()
    def _climb(self) -> list[torch.Tensor]:
        """Move to the worst point within radius rho along the gradient (SAM's first step); return the moves."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        ascent = [g * (self.hparams["rho"] / (norm + 1e-12)) for g in grads]
        for p, e in zip(self.params, ascent, strict=True):
            p.add_(e)
        self.optimizer.zero_grad(set_to_none=True)
        return ascent

    def _recover(self, loss: float, threshold: float) -> None:
        ema = loss if self.loss_ema < 0 else 0.9 * float(self.loss_ema) + 0.1 * loss
        if ema < threshold:
            self.reset()  # collapsed towards trivial solutions: back to the source model
        self.loss_ema.fill_(ema)  # kept through a reset, as official
