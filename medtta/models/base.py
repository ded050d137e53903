"""The architecture interface: a source segmentation network that knows how it is trained on the source site.

An architecture names four things: how it is built (`__init__` with in channels, classes and config), its
source-training objective (`source_losses`), the models trained after it on source data (`post_training`,
e.g. a denoising autoencoder of label maps) and the named parts adapters may update (`parts`). One training
loop (`medtta.models.training`) serves them all. Architectures are plugins, registered through the
`medtta.architectures` entry-point group like the adapters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from monai.losses import DiceCELoss
from torch import nn

from medtta.data.layout import Dataset
from medtta.data.pipeline import Pipeline
from medtta.protocol import Preprocessing, Protocol
from medtta.registry import check_keys

_SEGMENTATION_LOSS = DiceCELoss(to_onehot_y=True, softmax=True)

#: one source volume: (slices, 1, H, W) images and (slices, H, W) labels; 3D: (1, 1, D, H, W) and (1, D, H, W)
SourceVolume = tuple[torch.Tensor, torch.Tensor]
SourceStatistics = Callable[[nn.Module, Iterable[SourceVolume]], dict[str, torch.Tensor]]
"""Tensors computed (not trained) from a trained source model on source volumes, e.g. `Adapter.source_statistics`."""


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Dice + cross-entropy (MONAI) of (N, C, H, W) logits against (N, H, W) integer labels."""
    return _SEGMENTATION_LOSS(logits, labels.unsqueeze(1))


@dataclass(frozen=True)
class Stage:
    """A model trained after the segmentation network on the source site, with the network frozen.

    `module` is the attribute of the architecture that holds it (and its checkpoint suffix); `loss` maps a
    batch of source volumes (or of what `prepare` made of them) to the stage's training loss, lower is better on the
    validation volumes too; `config_keys` are the architecture config keys only this stage depends on (changing them
    retrains the stage, not the network).

    `setup`, when given, is called once with the train volumes before training, to fit what the stage depends on to
    the source data (a DAE's grid); what it fits must live in the module's state, which the stage checkpoint keeps,
    and what it returns goes into the stage record. `prepare`, when given, maps each train and val volume once, on
    the device, to what `loss` takes (what does not change across epochs, e.g. the DAE's clean label grids).

    A step takes `volumes_per_batch` whole volumes, or, when `slices_per_batch` is given, that many random slices of
    one volume (a 2D stage; with `prepare`, slices of each tensor it made of the volume): every slice once per epoch,
    so a small site still gives many steps.
    """

    module: str
    loss: Callable[[list[Any]], torch.Tensor]
    epochs: int
    lr: float
    config_keys: tuple[str, ...] = ()
    volumes_per_batch: int = 4
    slices_per_batch: int | None = None
    setup: Callable[[list[SourceVolume]], dict[str, Any]] | None = None
    prepare: Callable[[SourceVolume], Any] | None = None


class Architecture(nn.Module):
    """A source segmentation network: `forward(x)` maps (N, 1, H, W) slices to (N, C, H, W) logits.

    Subclasses declare their `defaults` (config with the paper's values) and override what differs.
    """

    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, in_channels: int, n_classes: int, **config: Any) -> None:
        super().__init__()
        self.check_config(config)
        self.in_channels = in_channels
        self.n_classes = n_classes
        self.config: dict[str, Any] = {**self.defaults, **config}

    @classmethod
    def check_config(cls, config: dict[str, Any]) -> None:
        """Fail, naming the known ones, when a config key is not this architecture's."""
        check_keys(cls, config, "config key")

    def source_losses(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted terms of the source-training objective on a batch of slices (their sum is minimized)."""
        return {"segmentation": segmentation_loss(self(x), labels)}

    @classmethod
    def own_source(cls, protocol: Protocol, dataset: Dataset, seed: int, results: Path, device: torch.device,
                   config: dict[str, Any], progress: bool = True) -> tuple[Architecture, dict[str, Any]] | None:
        """A source model this architecture loads or trains its own way (an nnU-Net: a given results folder, or
        nnunetv2's training), with its training record (`val_dice`, `seconds`, `checkpoint`, `model_id`, `cached`);
        None: medtta's training loop trains it (`medtta.models.training`)."""
        return None

    @classmethod
    def dims_of(cls, config: dict[str, Any]) -> int | None:
        """The dimensions `config` fixes (a given nnU-Net's configuration), or None: the protocol's or
        `-a spatial_dims`."""
        return None

    @classmethod
    def norm_of(cls, config: dict[str, Any]) -> str:
        """The normalization (`batch`, `instance`, `group`) of the network `config` builds (`-a norm`)."""
        return {**cls.defaults, **config}.get("norm", "batch")

    def pipeline(self, prep: Preprocessing) -> Pipeline:
        """How volumes become this network's input and its logits label maps: the protocol's preprocessing `prep`,
        unless the network comes with preprocessing of its own (an nnU-Net's plans)."""
        return Pipeline(prep)

    def export_files(self, out: Path) -> dict[str, Any]:
        """Write what the network needs besides its weights into the bundle folder `out` (an nnU-Net's plans);
        returns the config entries that point to them, relative to `out`."""
        return {}

    def post_training(self) -> list[Stage]:
        """Models trained after the network, in order, each cached with its own checkpoint."""
        return []

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """Named groups of parameters adapters may update (`norm`, `encoder`, `decoder`, `aux`, ...)."""
        raise NotImplementedError

    def _in_network(self, name: str) -> bool:
        return name.split(".", 1)[0] not in {stage.module for stage in self.post_training()}

    def network_parameters(self) -> list[nn.Parameter]:
        """The parameters trained in source training: all but the post-trained models'."""
        return [p for name, p in self.named_parameters() if self._in_network(name)]

    def network_state(self) -> dict[str, torch.Tensor]:
        """The state trained in source training, without the post-trained models (they have their own files)."""
        return {k: v for k, v in self.state_dict().items() if self._in_network(k)}

    def network_config(self) -> dict[str, Any]:
        """The config source training depends on: all of it but the keys only a post-training stage uses."""
        stage_keys = {k for stage in self.post_training() for k in stage.config_keys}
        return {k: v for k, v in self.config.items() if k not in stage_keys}


NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm)


def norm_params(module: nn.Module) -> list[nn.Parameter]:
    """Affine parameters of every normalization layer (BatchNorm, InstanceNorm, GroupNorm)."""
    return [p for m in module.modules() if isinstance(m, NORM_LAYERS) and m.affine for p in (m.weight, m.bias)]


@contextmanager
def running_statistics_kept(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers of `module` still normalize with the batch's statistics in training mode, but leave their
    running statistics (what evaluation uses) as they are: for passes on inputs unlike the real ones."""
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(layers, saved, strict=True):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


@contextmanager
def batch_statistics(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers of `module` normalize with the batch's own statistics (as in training) and leave their running
    statistics as they are; their mode is restored afterwards. For an auxiliary pass at test time that must see
    its inputs as source training did (TTT heads were trained on rotated or masked copies' batch statistics)."""
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in layers]
    for m in layers:
        m.train()
    try:
        with running_statistics_kept(module):
            yield
    finally:
        for m, mode in zip(layers, modes, strict=True):
            m.train(mode)


def weights_under_batch_statistics(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter but those the output does not depend on: the conv biases that the following norm cancels when
    it normalizes each channel with the statistics of its own input (a conv-then-norm block: MONAI's `Convolution`,
    nnU-Net's `ConvDropoutNormReLU`): BatchNorm on batch statistics, InstanceNorm always; and an nnU-Net's unused
    deep-supervision heads. Their gradient is zero (up to rounding), which Adam would blow up into steps of full
    size. GroupNorm subtracts a mean over several channels, which leaves a per-channel bias its effect."""
    per_channel = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)

    def norm_after_conv(block: nn.Module) -> nn.Module | None:
        return getattr(getattr(block, "adn", None), "N", None) or getattr(block, "norm", None)

    inert = {id(block.conv.bias) for block in model.modules()
             if isinstance(getattr(block, "conv", None), nn.modules.conv._ConvNd) and block.conv.bias is not None
             and isinstance(norm_after_conv(block), per_channel)}
    inert |= {id(p) for p in unused_heads(model)}
    return [p for p in model.parameters() if id(p) not in inert]


def unused_heads(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of an nnU-Net's deep-supervision heads, which its decoder keeps but does not run when deep
    supervision is off (at inference and test time): every segmentation layer but the last."""
    return [p for m in model.modules() if hasattr(m, "seg_layers") and getattr(m, "deep_supervision", True) is False
            for layer in m.seg_layers[:-1] for p in layer.parameters()]


def params_of(modules: list[nn.Module]) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters()]
