"""EATA: efficient anti-forgetting test-time adaptation (Niu et al., "Efficient Test-Time Model Adaptation without
Forgetting", ICML 2022; official code mr-eggplant/EATA, eata.py and main.py)."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medtta.adapters.base import Adapter, use_batch_statistics
from medtta.adapters.sar import pixel_entropy
from medtta.errors import DataError, MedttaError
from medtta.models.base import SourceVolume, norm_params

FISHER_SLICES = 2000  # the official 2000 source samples, here slices
FISHER_BATCH = 32  # slices per batch, the engine's default test batch


def redundancy_threshold(d_margin: float, n_classes: int) -> float:
    """The cosine similarity from which a prediction is redundant among `n_classes`: `d_margin` at 1000 classes,
    C^(ln d_margin / ln 1000) for C classes (0.55 for 4, 0.74 for 2)."""
    return d_margin ** (math.log(n_classes) / math.log(1000))


def pixel_weights(logits: torch.Tensor, average: torch.Tensor, e_margin: float, d_threshold: float) -> torch.Tensor:
    """(N, H, W) (3D: (N, D, H, W)) weight of each pixel's entropy: 1 / exp(entropy - `e_margin`) where the pixel
    is reliable (entropy below `e_margin`) and not redundant (|cosine| of its softmax to the moving `average` below
    `d_threshold`), 0 elsewhere. An all-zero `average` (none yet) finds nothing redundant."""
    entropy = pixel_entropy(logits.detach())
    keep = entropy < e_margin
    if average.any():
        cosine = F.cosine_similarity(logits.detach().softmax(1), average.view(1, -1, *[1] * (logits.dim() - 2)), dim=1)
        keep &= cosine.abs() < d_threshold
    return torch.where(keep, torch.exp(e_margin - entropy), torch.zeros_like(entropy))


def _slice_batches(volumes: Iterable[SourceVolume], size: int, limit: int) -> Iterator[torch.Tensor]:
    """Batches of at most `size` slices of one volume each, `limit` slices in all; later volumes are not read."""
    left = limit
    for x, _ in volumes:
        yield from torch.split(x[:left], size)
        left -= len(x[:left])
        if left == 0:
            return


class EATA(Adapter):
    """Entropy minimization on reliable, non-redundant pixels, with a Fisher regularizer against forgetting.

    Per pixel, as the official code does per image: a pixel counts if its entropy is below E0 = `margin` ln C
    (0.4 ln C) and its softmax is not redundant, weighted by 1 / exp(entropy - E0); the loss is the mean over the
    pixels that count, plus `fisher_alpha` (2000) sum_i F_i (theta_i - theta_i^source)^2 over the updated norm
    affine parameters (BatchNorm's, or InstanceNorm's or GroupNorm's on such a network). A batch in which no pixel
    counts makes no step (as the official code). BatchNorm normalizes with test-batch statistics, as TENT.
    `-p fisher_alpha=0` is the paper's ETA (no regularizer).

    Redundancy: per pixel, not per slice: a slice's mean softmax is mostly background, so every slice would be
    redundant. A pixel is redundant when |cos(softmax, m)| >= eps (the official rule keeps |cos| < `d_margin`), m
    the moving average (0.9 / 0.1) of the mean softmax of the pixels that counted, set by the first batch with
    reliable pixels (where nothing is redundant yet). The official 0.05 is meant for 1000 classes, where a one-hot
    prediction is at cosine 1/sqrt(1000) = 0.03 from a uniform average; eps = `d_margin`^(ln C / ln 1000) keeps
    0.05 at 1000 classes, gives 0.37 for 10 (the official CIFAR-10 value is 0.4) and 0.55 for our 4 classes, so
    that pixels of the classes over-represented in m (background first) are the redundant ones. m is part of the
    state `reset()` restores (the official reset keeps it).

    Fisher information (`source_statistics`, computed once per source model on its validation split and cached
    beside the checkpoint): the squared gradient of the cross-entropy to the model's own argmax, over the BatchNorm
    affine parameters with test-batch statistics, averaged over batches of 32 slices of one volume, on the first
    2000 validation slices (the official 2000 samples, 64 per batch).

    Optimizer: Adam at lr 1e-3, as TENT here, instead of the official SGD (momentum 0.9, lr 2.5e-4 for batches of
    64 ImageNet images): SGD at 1e-3 moves the BatchNorm affine parameters by about 1e-6 per step on per-pixel
    mean entropies, and SAR, which steps that way, measured exactly bn-stats' Dice recovery on synth-mri; so
    EATA differs from TENT only by what the method adds (the filters and the Fisher regularizer).
    """

    other_architectures: ClassVar[tuple[str, ...]] = ("nnunet",)  # a trained nnU-Net (InstanceNorm)
    paradigm: ClassVar[str] = "output"
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)
    own_criterion: ClassVar[str] = "entropy"  # its loss: selecting by entropy selects by its own objective
    defaults: ClassVar[dict[str, Any]] = {"lr": 1e-3, "margin": 0.4, "d_margin": 0.05, "fisher_alpha": 2000.0}
    default_steps: ClassVar[int] = 1
    statistics: ClassVar[str] = "eata-fisher"

    @classmethod
    def source_statistics(cls, model: nn.Module, volumes: Iterable[SourceVolume]) -> dict[str, torch.Tensor]:
        """Fisher information of each BatchNorm affine parameter (by its name in `model`)."""
        net = copy.deepcopy(model).eval().requires_grad_(False)
        use_batch_statistics(net)
        params = [p.requires_grad_(True) for p in norm_params(net)]
        fisher = [torch.zeros_like(p) for p in params]
        batches = 0
        for x in _slice_batches(volumes, FISHER_BATCH, FISHER_SLICES):
            with torch.enable_grad():
                logits = net(x)
                grads = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(1)), params)
            for f, g in zip(fisher, grads, strict=True):
                f.add_(g.square())
            batches += 1
        if batches == 0:
            raise DataError(f"{cls.__name__}: no source slices to compute the Fisher information on")
        names = {id(p): name for name, p in net.named_parameters()}
        return {names[id(p)]: f / batches for p, f in zip(params, fisher, strict=True)}

    def configure(self, model: nn.Module) -> None:
        super().configure(model)
        use_batch_statistics(model)
        params = self.collect_params(model)
        name_of = {id(p): name for name, p in model.named_parameters()}
        names = [name_of[id(p)] for p in params]
        stale = [n for n, p in zip(names, params, strict=True)
                 if n not in self.source_stats or self.source_stats[n].shape != p.shape]
        if stale:
            raise MedttaError(f"{type(self).__name__}: the Fisher information does not match the model (missing or "
                              f"misshapen: {', '.join(stale[:3])}); recompute it with source_statistics")
        anchor = torch.cat([p.detach().flatten() for p in params])
        self.register_buffer("anchor", anchor.clone())  # the source weights
        self.register_buffer("fisher", torch.cat([self.source_stats[n].flatten() for n in names]).to(anchor))
        self.register_buffer("average", torch.zeros(model.n_classes, device=anchor.device))  # zeros: none yet

    def collect_params(self, model: nn.Module) -> list[nn.Parameter]:
        return norm_params(model)

    def tracked_state(self) -> set[str]:
        return {"average"}

    def fisher_penalty(self) -> torch.Tensor:
        """`fisher_alpha` sum_i F_i (theta_i - theta_i^source)^2."""
        theta = torch.cat([p.flatten() for p in self.params])
        return self.hparams["fisher_alpha"] * (self.fisher * (theta - self.anchor).square()).sum()

    def update(self, x: torch.Tensor) -> torch.Tensor:
        n_classes = self.model.n_classes
        e_margin = self.hparams["margin"] * math.log(n_classes)
        d_threshold = redundancy_threshold(self.hparams["d_margin"], n_classes)
        with torch.enable_grad():
            logits = self.model(x)
            weights = pixel_weights(logits, self.average, e_margin, d_threshold)
            counted = weights > 0
            if counted.any():
                loss = (weights * pixel_entropy(logits)).sum() / counted.sum() + self.fisher_penalty()
                self.backward(loss)
                self.optimizer_step()
        self._update_average(logits.detach(), counted)
        return logits.detach()

    @torch.no_grad()
    def _update_average(self, logits: torch.Tensor, counted: torch.Tensor) -> None:
        """Move the average towards the mean softmax of the pixels that counted (the first such batch sets it)."""
        if not counted.any():
            return
        probs = logits.softmax(1).movedim(1, -1)[counted].mean(0)
        self.average.copy_(0.9 * self.average + 0.1 * probs if self.average.any() else probs)
