"""The adapter interface: a segmentation model that adapts to unlabeled target images as it predicts.

Shaped after `classification/methods/base.py` of mariodoebler/test-time-adaptation and TTAB's
`BaseAdaptation`. Subclasses override only what differs: `configure` (how the model runs at
test time), `collect_params` (what is trained), `loss` (the unsupervised objective).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from medtta.errors import RegistryError


class Adapter(nn.Module):
    """A model wrapped for test-time adaptation; `forward` predicts, then updates (the online setting).

    Class attributes declare what the engine needs: the source `architecture` to train or load,
    the hyper-parameter `defaults` (with the paper's values) and `default_steps`, the update
    iterations per volume in the episodic setting.
    """

    architecture: ClassVar[str] = "unet"
    defaults: ClassVar[dict[str, Any]] = {}
    default_steps: ClassVar[int] = 0

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__()
        self.check_hparams(hparams)
        self.hparams: dict[str, Any] = {**self.defaults, **hparams}
        self.model = model
        self.configure(model)
        self.params = self.collect_params(model)
        self.optimizer = self.make_optimizer(self.params) if self.params else None
        self._initial_state = copy.deepcopy(model.state_dict())

    @classmethod
    def check_hparams(cls, hparams: dict[str, Any]) -> None:
        """Fail, naming the known ones, when a hyper-parameter is not this method's."""
        unknown = sorted(set(hparams) - set(cls.defaults))
        if unknown:
            known = ", ".join(cls.defaults) or "none"
            raise RegistryError(f"{cls.__name__} has no hyper-parameter {', '.join(unknown)} (known: {known})")

    def configure(self, model: nn.Module) -> None:
        """Put the model in its test-time mode (default: frozen, inference mode)."""
        model.eval().requires_grad_(False)

    def collect_params(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters updated at test time (default: none), made trainable here."""
        return []

    def make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.hparams["lr"], betas=(0.9, 0.999))

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """The unsupervised objective on a batch's logits."""
        raise NotImplementedError(f"{type(self).__name__} collects parameters but defines no loss")

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the current model, without adapting."""
        return self.model(x)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """One adaptation step on `x`; returns the logits computed before the step."""
        if self.optimizer is None:
            return self.predict(x)
        with torch.enable_grad():
            logits = self.model(x)
            loss = self.loss(logits)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return logits.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict, then update (as online TENT does): the prediction never saw its own batch's gradient."""
        return self.update(x)

    def reset(self) -> None:
        """Restore the exact state the adapter started from: weights, buffers and optimizer state."""
        self.model.load_state_dict(self._initial_state)
        if self.optimizer is not None:
            self.optimizer = self.make_optimizer(self.params)


def use_batch_statistics(model: nn.Module, source_weight: float = 0.0) -> list[nn.Module]:
    """Make every BatchNorm layer normalize with test-batch statistics, mixed with the source statistics
    by `source_weight` (0: batch statistics only, 1: source only). Returns the layers changed."""
    layers = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            mixed = MixedBatchNorm(module, source_weight)
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], mixed)
            layers.append(mixed)
    return layers


class MixedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm normalizing with `w * source + (1 - w) * batch` statistics (Schneider et al., NeurIPS 2020).
    The source running statistics are kept as they are."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, source_weight: float) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         device=bn.weight.device if bn.affine else None)
        self.load_state_dict(bn.state_dict())
        self.source_weight = source_weight

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.source_weight == 0:  # batch statistics alone: the fused kernel, gradients through the statistics
            return nn.functional.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        dims = [0, *range(2, x.dim())]
        w = self.source_weight
        mean = w * self.running_mean + (1 - w) * x.mean(dims)
        var = w * self.running_var + (1 - w) * x.var(dims, unbiased=False)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out
