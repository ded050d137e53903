"""The adapter interface: a segmentation model that adapts to unlabeled target images as it predicts.

Shaped after `classification/methods/base.py` of mariodoebler/test-time-adaptation and TTAB's
`BaseAdaptation`. Subclasses override only what differs: `configure` (how the model runs at
test time), `collect_params` (what is trained), `loss` (the unsupervised objective).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import Any, ClassVar

import torch
from torch import nn

from medtta.errors import MedttaError
from medtta.models.base import SourceStatistics, SourceVolume
from medtta.models.volumetric import random_patches, window_count
from medtta.precision import grad_scaler
from medtta.registry import check_keys

NORM_LAYERS = {"batch": "BatchNorm", "instance": "InstanceNorm", "group": "GroupNorm"}  # what `-a norm` builds

PARADIGMS = ("input", "feature", "output", "prior", "none")
"""What an adapter changes, after the MedSeg-TTA benchmark (arXiv 2512.02497): the input, the features, the output
(or the parameters through an output loss), a prior over the output; `none` for the unadapted baseline."""


class Adapter(nn.Module):
    """A model wrapped for test-time adaptation; `forward` predicts, then updates (the online setting).

    Class attributes declare what the engine needs: the source `architecture` to train or load (and
    `other_architectures` the method also adapts, chosen with `RunConfig.architecture`), the `paradigm`,
    the hyper-parameter `defaults` (with the paper's values) and `default_steps`, the update iterations per
    volume in the episodic setting. `logits_in_objective` says whether `objective` computes the batch's
    segmentation logits (then a continual prediction costs no extra forward pass).

    A method that needs tensors computed (not trained) from the source model on source data, such as EATA's Fisher
    information, names them in `statistics` and computes them in `source_statistics`: source training calls it
    once on the source validation slices and caches the result beside the checkpoint, and the engine hands the
    tensors to `__init__` as `source_stats`, so that adaptation never reads source data.
    """

    architecture: ClassVar[str] = "unet"
    other_architectures: ClassVar[tuple[str, ...]] = ()  # e.g. the SAM sizes of a method whose default is sam-tiny
    paradigm: ClassVar[str] = "none"
    defaults: ClassVar[dict[str, Any]] = {}
    default_steps: ClassVar[int] = 0
    logits_in_objective: ClassVar[bool] = True
    statistics: ClassVar[str] = ""  # the name of the source statistics the method needs ("" for none)
    #: what `medtta bench --sweep METHOD` tries: values per hyper-parameter, each holding the paper default; None:
    #: the learning rate and a decade either side (a method without one has nothing to sweep)
    search_space: ClassVar[dict[str, tuple[Any, ...]] | None] = None
    #: the label-free selection criterion that is also the method's own loss (`medtta report --select` flags it)
    own_criterion: ClassVar[str] = ""
    #: the networks the method adapts: 2D (slices) and/or 3D (volumes; `medtta.models.volumetric`)
    spatial_dims: ClassVar[tuple[int, ...]] = (2,)
    #: 3D: updates per adaptation pass (a `--steps` step) over a volume; None: as many patches as the volume's sliding
    #: windows, `patches_per_update` an update (a pass over the volume, as over its slices in 2D)
    updates_per_pass_3d: ClassVar[int | None] = None
    #: the normalization layers (`-a norm`) of the networks the method adapts: a method that adapts normalization
    #: parameters adapts the affine parameters of whichever the network has; one that needs batch statistics
    #: declares ("batch",) and another norm is refused
    norms: ClassVar[tuple[str, ...]] = ("batch", "instance", "group")

    @classmethod
    def sweep_space(cls) -> dict[str, tuple[Any, ...]]:
        """The declared `search_space`, or the learning rate ×0.1, ×1, ×10 and the steps 1, ×1, ×3 (TTAB finds steps
        matter as much as the learning rate)."""
        if cls.search_space is not None:
            return cls.search_space
        lr, steps = cls.defaults.get("lr"), cls.default_steps
        if not lr:
            return {}
        return {"lr": tuple(float(f"{lr * f:.6g}") for f in (0.1, 1, 10)),  # 7.5e-05, not 7.500000000000001e-05
                **({"steps": tuple(sorted({1, steps, 3 * steps}))} if steps else {})}

    @classmethod
    def config_tag(cls, hparams: dict[str, Any], steps: Any) -> str:
        """`medtta.config`: the hyper-parameters and steps that differ from the defaults, as `k=v,...` sorted
        (`default` when none do). Values compare as text, so that logged params (strings) give the same tag."""
        changed = {k: v for k, v in hparams.items() if str(v) != str(cls.defaults.get(k))}
        if str(steps) != str(cls.default_steps):
            changed["steps"] = steps
        return ",".join(f"{k}={v}" for k, v in sorted(changed.items())) or "default"

    def __init__(self, model: nn.Module, *, source_stats: dict[str, torch.Tensor] | None = None,
                 **hparams: Any) -> None:
        super().__init__()
        self.check_hparams(hparams)
        self.hparams: dict[str, Any] = {**self.defaults, **hparams}
        if self.statistics and source_stats is None:
            raise MedttaError(f"{type(self).__name__} needs the source statistics '{self.statistics}': pass "
                              f"source_stats=, computed by {type(self).__name__}.source_statistics on source data "
                              "(source_model caches them beside the checkpoint)")
        self.source_stats: dict[str, torch.Tensor] = source_stats or {}  # read by `configure`
        self.model = model
        self.configure(model)
        self.params = self.collect_params(model)
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = self.make_optimizer(self.params) if self.params else None
        self.patches_per_update = 2  # 3D: random patches of the volume per update (the engine's batch size)
        self.updates_per_pass = self.updates_per_pass_3d  # 3D: updates per pass (`--patch-updates` sets it)
        self.use_precision("fp32", torch.device("cpu"))
        self._initial_state = self.snapshot()

    @classmethod
    def norm_refusal(cls, norm: str) -> str:
        """Why the method cannot adapt a network of normalization `norm` (`-a norm`), or "" when it can."""
        if norm in cls.norms or norm not in NORM_LAYERS:  # an unknown norm: the architecture names the known ones
            return ""
        return (f"adapts {' and '.join(NORM_LAYERS[n] for n in cls.norms)} networks: -a norm={norm} builds "
                f"{NORM_LAYERS[norm]} ones")

    @classmethod
    def architectures(cls) -> tuple[str, ...]:
        """Every source architecture the method adapts, its default first."""
        return (cls.architecture, *cls.other_architectures)

    @classmethod
    def check_hparams(cls, hparams: dict[str, Any]) -> None:
        """Fail, naming the known ones, when a hyper-parameter is not this method's."""
        check_keys(cls, hparams, "hyper-parameter")

    @classmethod
    def statistics_to_compute(cls) -> dict[str, SourceStatistics]:
        """The source statistics the method needs, as `source_model` takes them: {name: how to compute them}."""
        return {cls.statistics: cls.source_statistics} if cls.statistics else {}

    @classmethod
    def source_statistics(cls, model: nn.Module, volumes: Iterable[SourceVolume]) -> dict[str, torch.Tensor]:
        """The tensors named `statistics`, computed from the trained source `model` (left as it is) on the source
        validation volumes (slices, labels), on the model's device; called only when `statistics` is set."""
        return {}

    def configure(self, model: nn.Module) -> None:
        """Put the model in its test-time mode (default: frozen, inference mode) and add what the method adds."""
        model.eval().requires_grad_(False)

    def collect_params(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters updated at test time (default: none); the base class makes them trainable."""
        return []

    def tracked_state(self) -> set[str]:
        """Names in `state_dict()` that an update changes besides the collected parameters (a teacher's moving
        average, a memory bank); everything else stays as it was."""
        return set()

    def make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.hparams["lr"], betas=(0.9, 0.999))

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """The unsupervised objective on a batch's logits."""
        raise NotImplementedError(f"{type(self).__name__} collects parameters but defines no loss")

    def objective(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The loss minimized on batch `x`, and the logits computed on the way (None if it computes none)."""
        logits = self.model(x)
        return self.loss(logits), logits

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the current model, without adapting."""
        return self.model(x)

    def use_precision(self, precision: str, device: torch.device) -> None:
        """Adapt in `precision` (the forward passes run under the engine's autocast): fp16 scales the losses."""
        self._precision = precision, device
        self.scaler = grad_scaler(precision, device)

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()`, the loss scaled in fp16 so that small gradients do not underflow."""
        self.scaler.scale(loss).backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """A step of `optimizer` (default: the adapter's) on the gradients `backward` left, which it then zeroes;
        in fp16 the gradients are unscaled first, and a step with an overflow is skipped."""
        optimizer = optimizer or self.optimizer
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def update(self, x: torch.Tensor) -> torch.Tensor | None:
        """One adaptation step on `x`; returns the logits the objective computed before the step, if any."""
        if self.optimizer is None:
            return None
        with torch.enable_grad():
            loss, logits = self.objective(x)
            self.backward(loss)
        self.optimizer_step()
        return None if logits is None else logits.detach()

    def adapt(self, x: torch.Tensor, steps: int, batch_size: int) -> None:
        """Episodic adaptation to one volume's slices `x`: `steps` passes of one update per batch; a 3D volume
        (1, 1, D, H, W): `steps` passes of `patch_updates` updates on random patches."""
        for _ in range(steps):
            if x.dim() == 5:
                self.patch_pass(x)
                continue
            for b in torch.split(x, batch_size):
                self.update(b)

    def patches(self, x: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """`n` (default `patches_per_update`) random patches of the 3D volume `x`, of the model's window."""
        return random_patches(x, self.model.window, n or self.patches_per_update)[0]

    def patch_updates(self, x: torch.Tensor) -> int:
        """Updates in one pass over the 3D volume `x`: `updates_per_pass` when set (the method's
        `updates_per_pass_3d` or `--patch-updates`), else as many patches as the sliding windows that predict it,
        `patches_per_update` at a time (a pass sees the volume once, as a pass over a volume's slices does in 2D)."""
        if self.updates_per_pass is not None:
            return self.updates_per_pass
        return math.ceil(window_count(tuple(x.shape[2:]), self.model.window) / self.patches_per_update)

    def window_statistics(self, x: torch.Tensor) -> ExitStack:
        """Inside, every windowed 3D network of the adapter (the model, a teacher, an anchor) normalizes its
        test-batch-statistics layers with the statistics of the sliding windows of the volume `x`, so that the
        patch updates see the statistics the volume's prediction uses; they are constants in backpropagation."""
        stack = ExitStack()
        for network in self.modules():
            if getattr(network, "window", None) is not None:
                stack.enter_context(network.window_statistics(x))
        return stack

    def accumulate(self, x: torch.Tensor, batch_size: int,
                   batch_loss: Callable[[int, torch.Tensor], torch.Tensor]) -> float:
        """Backpropagate `batch_loss(i, batch)` over the batches of one volume's slices `x`, each weighted by its
        share of the slices, so that the next optimizer step is one update per pass; returns the pass's loss."""
        total = 0.0
        with torch.enable_grad():
            for i, b in enumerate(torch.split(x, batch_size)):
                weighted = batch_loss(i, b) * len(b) / len(x)
                self.backward(weighted)
                total += float(weighted.detach())
        return total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict, then update (as online TENT does): the prediction never saw its own batch's gradient. A 3D
        volume is predicted whole (sliding windows), then the model takes one pass of updates on its patches."""
        if x.dim() == 5:
            logits = self.predict(x)
            self.patch_pass(x)
            return logits
        if self.optimizer is None or not self.logits_in_objective:
            logits = self.predict(x)
            self.update(x)
            return logits
        return self.update(x)

    def patch_pass(self, x: torch.Tensor) -> None:
        """One pass over the 3D volume `x`: `patch_updates` updates, each on fresh random patches, normalized with the
        volume's window statistics as they stand before the pass."""
        if self.optimizer is None:
            return
        with self.window_statistics(x):
            for _ in range(self.patch_updates(x)):
                self.update(self.patches(x))

    def snapshot(self) -> dict[str, Any]:
        """What `reset()` restores: a copy of the whole state (the model and anything the adapter adds)."""
        return copy.deepcopy(self.state_dict())

    def restore(self, snapshot: dict[str, Any]) -> None:
        self.load_state_dict(snapshot)

    def reset(self) -> None:
        """Restore the exact state the adapter started from: weights, buffers and optimizer state."""
        self.restore(self._initial_state)
        if self.optimizer is not None:
            self.optimizer = self.make_optimizer(self.params)
        self.use_precision(*self._precision)  # a fresh loss scale


def use_batch_statistics(model: nn.Module, source_weight: float = 0.0,
                         layer: type[MixedBatchNorm] | None = None) -> list[MixedBatchNorm]:
    """Make every BatchNorm layer normalize with test-batch statistics, mixed with the source statistics
    by `source_weight` (0: batch statistics only, 1: source only), as a `layer` (default `MixedBatchNorm`).
    Returns the layers changed."""
    layers = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            mixed = (layer or MixedBatchNorm)(module, source_weight)
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], mixed)
            layers.append(mixed)
    return layers


class MixedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm normalizing with `w * source + (1 - w) * batch` statistics (Schneider et al., NeurIPS 2020).
    The source running statistics are kept as they are. Subclasses may set `batch_gradient` to False to treat
    the batch statistics as constants in backpropagation (VPTTA), and extend `statistics`."""

    batch_gradient: ClassVar[bool] = True

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, source_weight: float) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         device=bn.weight.device if bn.affine else None)
        self.load_state_dict(bn.state_dict())
        self.source_weight = source_weight
        #: the whole volume's (mean, variance), used instead of the batch's while set (sliding-window inference)
        self.volume_statistics: tuple[torch.Tensor, torch.Tensor] | None = None

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel mean and variance `x` is normalized with; the batch's part is a constant for
        backpropagation unless `batch_gradient`."""
        dims = [0, *range(2, x.dim())]
        mean, var = self.volume_statistics or (x.mean(dims), x.var(dims, unbiased=False))
        if not self.batch_gradient:
            mean, var = mean.detach(), var.detach()
        w = self.source_weight
        return w * self.running_mean + (1 - w) * mean, w * self.running_var + (1 - w) * var

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.source_weight == 0 and self.batch_gradient and self.volume_statistics is None:  # batch alone: fused
            return nn.functional.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        mean, var = self.statistics(x)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out
