"""VPTTA: a visual prompt per test image (Chen et al., "Each Test Image Deserves A Specific Prompt: Continual
Test-Time Adaptation for 2D Medical Image Segmentation", CVPR 2024; official code: Chen-Ziyang/VPTTA,
`OPTIC/vptta.py`, `OPTIC/utils/prompt.py`, `OPTIC/utils/memory.py`, `OPTIC/utils/convert.py`)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medtta.adapters.base import Adapter, MixedBatchNorm, use_batch_statistics
from medtta.errors import MedttaError


def mask_side(size: int, alpha: float, minimum: int = 1) -> int:
    """Pixels the prompt spans along an axis of `size` pixels: int(alpha * size), as the official `Prompt` computes
    it (alpha 0.01: 5 at 512, 1 at 128, 2 at 256; not made odd, as there), at least `minimum` (and at most `size`)."""
    return min(size, max(minimum, int(alpha * size + 1e-9)))  # the epsilon keeps 0.29 * 100 from rounding down


def _window(shape: tuple[int, ...], side: tuple[int, ...]) -> tuple[slice, slice]:
    """Rows and columns of a `side` window centred on the zero frequency of a centred (fftshift) spectrum."""
    return tuple(slice(n // 2 - s // 2, n // 2 - s // 2 + s) for n, s in zip(shape[-2:], side[-2:], strict=True))


def low_frequency_amplitude(x: torch.Tensor, side: tuple[int, int]) -> torch.Tensor:
    """The `side` window of each image's centred amplitude spectrum: (..., side[0], side[1])."""
    rows, cols = _window(x.shape, side)
    return torch.fft.fftshift(torch.fft.fft2(x).abs(), dim=(-2, -1))[..., rows, cols]


def apply_prompt(x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """`x` with the centred low-frequency amplitude of each image multiplied by `prompt` (its last two axes the
    window's) and the phase kept, rebuilt by the inverse FFT (its real part, as official). A real mask times the
    spectrum is the amplitude times the mask with the phase unchanged, so the spectrum is multiplied directly."""
    h, w = x.shape[-2:]
    rows, cols = _window(x.shape, prompt.shape)
    mask = F.pad(prompt, (cols.start, w - cols.stop, rows.start, h - rows.stop), value=1.0)
    return torch.fft.ifft2(torch.fft.fft2(x) * torch.fft.ifftshift(mask, dim=(-2, -1))).real


class AlignedBatchNorm(MixedBatchNorm):
    """VPTTA's BatchNorm (official `AdaBN`): normalizes with mixed source and batch statistics, the batch's part a
    constant for backpropagation; every forward with gradients records `alignment`, the mean absolute distance of
    each image's per-channel feature mean and standard deviation to the mixed ones (official `bn_loss`)."""

    batch_gradient: ClassVar[bool] = False

    def statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, var = super().statistics(x)
        if torch.is_grad_enabled():
            dims = tuple(range(2, x.dim()))
            # eps inside the roots: a constant feature map (a blank slice) still gives a finite gradient
            std = (x.var(dims, unbiased=False) + self.eps).sqrt()
            self.alignment = (x.mean(dims) - mean).abs().mean() + (std - (var + self.eps).sqrt()).abs().mean()
        return mean, var


class PromptMemory(nn.Module):
    """A FIFO bank of (key, prompt) pairs: `size` rows, the `count` valid ones last, oldest first. Buffers, so
    that they are in the state dict and `reset()` restores them."""

    def __init__(self, size: int, prompt_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.clear(prompt_shape)

    def clear(self, prompt_shape: tuple[int, ...]) -> None:
        """Empty the bank, for prompts of `prompt_shape` (keys: the window of the same size, flattened)."""
        device = self.count.device
        self.register_buffer("keys", torch.zeros(self.size, math.prod(prompt_shape[-2:]), device=device))
        self.register_buffer("prompts", torch.ones(self.size, *prompt_shape, device=device))
        self.register_buffer("seen", torch.zeros(self.size, dtype=torch.long, device=device))
        self.count.zero_()

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = int(self.count)
        return self.keys[self.size - n:], self.prompts[self.size - n:]

    @torch.no_grad()
    def push(self, key: torch.Tensor, prompt: torch.Tensor, images_seen: int) -> None:
        """Append a pair, with the image count it was learned at, dropping the oldest when full."""
        for bank, row in ((self.keys, key.flatten()), (self.prompts, prompt), (self.seen, images_seen)):
            bank.copy_(bank.roll(-1, 0))
            bank[-1] = row
        self.count.clamp_(max=self.size - 1).add_(1)

    @torch.no_grad()
    def initial_prompt(self, key: torch.Tensor, neighbours: int, temperature: float) -> torch.Tensor | None:
        """The prompts of the `neighbours` keys most cosine-similar to `key`, weighted by softmax(similarity /
        temperature); None while the bank holds fewer pairs."""
        keys, prompts = self.entries()
        if len(keys) < neighbours:
            return None
        top = F.cosine_similarity(keys, key.flatten()[None], dim=1).topk(neighbours)
        weights = (top.values / temperature).softmax(0)
        return torch.tensordot(weights, prompts[top.indices], dims=1)

    @torch.no_grad()
    def learned_prompt(self, key: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        """The newest prompt stored under exactly `key` (learned on that very batch) and the image count it was
        learned at, else None."""
        keys, prompts = self.entries()
        same = (keys == key.flatten()[None]).all(1).nonzero()
        if not len(same):
            return None
        row = same[-1, 0]
        return prompts[row], int(self.seen[self.size - len(keys) + row])


class VPTTA(Adapter):
    """Chen et al. 2024: learn, per test image, a multiplicative mask on the low-frequency amplitude spectrum of
    the input that makes each BatchNorm layer's features match the source statistics; the UNet stays frozen.

    Per update (official: one per image): the prompt starts from the memory bank (the softmax(cos / 0.2)-weighted
    prompts of the 16 keys nearest the batch's low-frequency amplitude; all ones while the bank holds fewer than
    16 pairs), takes one Adam step (lr 0.05, betas 0.9 / 0.99) on the BatchNorm alignment loss, then (key, prompt)
    is pushed into the FIFO bank (40 pairs). Official loss: the mean over BatchNorm layers of |mu_i - mu| + |sigma_i
    - sigma| averaged over images i and channels, mu, sigma the mixed statistics below, mu_i, sigma_i the image's
    feature statistics (biased variance and eps inside the roots here, unbiased there; negligible).

    BatchNorm normalizes with m * batch + (1 - m) * source statistics, m = 1 / (sqrt(n) / warm_n + 1) decaying with
    n, the number of updates so far (official: images seen, warm_n 5; m = 0.83 at the first, 0.5 at the 25th); the
    batch statistics are constants for backpropagation, as official.

    Choices for 2D slices of volumes:
    - The prompt spans mask_side(H, alpha) x mask_side(W, alpha) pixels, computed from the slice size at run time,
      so it covers the same fraction alpha of the spectrum as official (5 x 5 of 512 x 512), but at least
      `min_side` (3) bins a side: at 96-256 px alpha alone gives 1 x 1 or 2 x 2, the zero frequency (the slice's
      mean) alone, whose amplitude keys all have cosine similarity 1, so the bank's 16 nearest would be an
      arbitrary tie. The window is centred on the zero frequency (official: its corner at (H - side) // 2, one bin
      off the centre for an odd side on an even size).
    - One prompt per batch (a batch is slices of one volume), shape (1, 1, side, side) shared by its slices, so
      the collected parameter keeps its shape over batches of any length and Adam's moments carry over from batch
      to batch as official's do from image to image. The bank key is the batch's mean low-frequency amplitude;
      an update, and the image count n, is per batch.
    - Update, then predict (official: the image is predicted with the prompt just learned on it): `forward` does
      one update, then predicts. `predict` uses the prompt the bank holds under the batch's exact key (the one
      learned on it, the newest if it was learned more than once), else the bank's initial prompt; so episodic
      prediction after `adapt` (one pass by default) uses each batch's own prompt, and mixes the BatchNorm
      statistics with the image count that batch was learned at (the bank keeps it), as official predicts each
      image right after its update.
    - The prompt's size follows the slices: a batch of another size empties the bank and restarts the prompt at
      ones of the new size (the adapter starts at 1 x 1); `predict` on a size no update has seen runs unprompted.
    - The bank and the image count persist across volumes in the continual setting (as official, over the whole
      target stream); `reset()` restores the exact initial state, so in the episodic setting each volume starts
      with an empty bank, n = 0 and fresh Adam moments.
    - Official bank quirks not kept: it drops the oldest pair only once it holds more than `memory_size` (41
      pairs); keys were bytes in a dict, so an identical key replaced its pair.
    - Grouped under `prior` as the MedSeg-TTA benchmark files it (prior_estimation/VPTTA).

    Hyper-parameters:
        lr: Adam learning rate (official: 0.05 on fundus, 0.01 on polyps).
        alpha: prompt side as a fraction of the slice side (official: 0.01).
        min_side: the fewest frequency bins a side of the prompt spans (ours: 3; official images are 512 px).
        memory_size: pairs the bank holds (official: 40).
        neighbours: nearest keys that give the initial prompt (official: 16).
        temperature: of the softmax over neighbour similarities (official: 0.2).
        warm_n: decay scale of the batch statistics' weight (official: 5).
    """

    paradigm: ClassVar[str] = "prior"
    norms: ClassVar[tuple[str, ...]] = ("batch",)  # it needs batch statistics
    defaults: ClassVar[dict[str, Any]] = {"lr": 0.05, "alpha": 0.01, "memory_size": 40, "neighbours": 16,
                                          "temperature": 0.2, "warm_n": 5, "min_side": 3}
    default_steps: ClassVar[int] = 1
    logits_in_objective: ClassVar[bool] = False  # the objective's logits come before the step; VPTTA predicts after

    def configure(self, model: nn.Module) -> None:
        super().configure(model)
        if self.hparams["neighbours"] > self.hparams["memory_size"]:
            raise MedttaError(f"VPTTA: neighbours ({self.hparams['neighbours']}) exceeds memory_size "
                              f"({self.hparams['memory_size']}): the bank would never give an initial prompt")
        self.norms = use_batch_statistics(model, layer=AlignedBatchNorm)
        model.requires_grad_(False)  # the new layers' affine parameters too: only the prompt learns
        self.prompt = nn.Parameter(torch.ones(1, 1, 1, 1))
        self.memory = PromptMemory(self.hparams["memory_size"], tuple(self.prompt.shape))
        self.register_buffer("images_seen", torch.zeros((), dtype=torch.long))

    def collect_params(self, model: nn.Module) -> list[nn.Parameter]:
        return [self.prompt]

    def tracked_state(self) -> set[str]:
        return {"memory.count", "memory.keys", "memory.prompts", "memory.seen", "images_seen"}

    def make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.hparams["lr"], betas=(0.9, 0.99))

    def _side(self, x: torch.Tensor) -> tuple[int, int]:
        return tuple(mask_side(n, self.hparams["alpha"], self.hparams["min_side"]) for n in x.shape[-2:])

    def _key(self, x: torch.Tensor) -> torch.Tensor:
        return low_frequency_amplitude(x, self._side(x)).mean((0, 1))

    def _resize(self, shape: tuple[int, ...]) -> None:
        """Restart the prompt at ones of `shape` and empty the bank: prompts of another size do not compare."""
        self.prompt.data = torch.ones(shape, device=self.prompt.device)
        self.memory.clear(shape)
        if self.optimizer is not None:
            self.optimizer.state.pop(self.prompt, None)

    def _mix(self, images_seen: int | None = None) -> None:
        """Set every BatchNorm layer's source weight from a number of updates (default: those so far)."""
        n = int(self.images_seen) if images_seen is None else images_seen
        batch_weight = 1 / (math.sqrt(n) / self.hparams["warm_n"] + 1)
        for norm in self.norms:
            norm.source_weight = 1 - batch_weight

    def objective(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        self._mix()
        self.model(apply_prompt(x, self.prompt))
        return torch.stack([norm.alignment for norm in self.norms]).mean(), None

    def update(self, x: torch.Tensor) -> None:
        if self.prompt.shape[-2:] != self._side(x):
            self._resize((1, 1, *self._side(x)))
        key = self._key(x)
        start = self.memory.initial_prompt(key, self.hparams["neighbours"], self.hparams["temperature"])
        with torch.no_grad():
            self.prompt.copy_(torch.ones_like(self.prompt) if start is None else start)
        self.images_seen += 1
        super().update(x)
        self.memory.push(key, self.prompt.detach(), int(self.images_seen))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self._mix()
        if self.prompt.shape[-2:] != self._side(x):
            return self.model(x)
        key = self._key(x)
        learned = self.memory.learned_prompt(key)
        if learned is None:
            prompt = self.memory.initial_prompt(key, self.hparams["neighbours"], self.hparams["temperature"])
        else:
            prompt, images_seen = learned
            self._mix(images_seen)  # the statistics this batch's prompt was learned with
        return self.model(x if prompt is None else apply_prompt(x, prompt))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Update, then predict with the prompt just learned (VPTTA's online order)."""
        self.update(x)
        return self.predict(x)

    def reset(self) -> None:
        self._resize(tuple(self._initial_state["prompt"].shape))  # back to the shapes the saved state has
        super().reset()
