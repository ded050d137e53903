"""Test-time training: update the shared encoder of a Y-shaped network on its self-supervised loss alone.

- `ttt-rot`: Sun et al., "Test-Time Training with Self-Supervision for Generalization under Distribution
  Shifts", ICML 2020 (yueatsprograms/ttt_cifar_release): rotation prediction, 10 steps of SGD at lr 1e-3.
- `ttt-mae`: Gandelsman et al., "Test-Time Training with Masked Autoencoders", NeurIPS 2022
  (yossigandelsman/test_time_training_mae): masked reconstruction, 20 steps of SGD with momentum 0.9.

Episodic is standard TTT (reset per volume, several steps); continual is online TTT (one step per batch, no
reset). Every step draws fresh augmented copies (horizontal flips, and rotations or masks) of the batch's slices.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from medtta.adapters.base import Adapter
from medtta.models.base import batch_statistics, weights_under_batch_statistics


class TestTimeTraining(Adapter):
    """Update only the shared encoder on the architecture's auxiliary loss; decoder and head stay frozen.

    The auxiliary pass normalizes with the batch statistics of the rotated or masked copies, as the head was trained
    in source training (on source running statistics its loss on source slices is several times its training
    loss, so the steps would fit a mismatch, not the shift); the running statistics stay the source ones, and the
    prediction uses them (eval mode), so only the encoder's weights move.
    """

    __test__ = False  # not a pytest class, despite the name
    #: both papers' steps are updates on one batch of the test input: in 3D one update (of `patches_per_update`
    #: patches) a step, not a pass over the volume's windows (ttt-rot's 10 steps x 20 windows' worth of updates
    #: took synth-ct3d's source site from 0.835 to 0.048)
    updates_per_pass_3d: ClassVar[int | None] = 1
    paradigm: ClassVar[str] = "feature"
    logits_in_objective: ClassVar[bool] = False
    momentum: ClassVar[float] = 0.0

    def collect_params(self, model: nn.Module) -> list[nn.Parameter]:
        """The encoder's weights but the conv biases its BatchNorm cancels on batch statistics (zero gradient)."""
        active = {id(p) for p in weights_under_batch_statistics(model)}
        return [p for p in model.parts()["encoder"] if id(p) in active]

    def make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.hparams["lr"], momentum=self.momentum)

    def objective(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        with batch_statistics(self.model):
            return self.model.auxiliary_loss(x), None


class RotationTTT(TestTimeTraining):
    """TTT (Sun et al. 2020): adapt the encoder by predicting the rotation of the test slices; 10 SGD steps."""

    architecture: ClassVar[str] = "unet-rotation"
    defaults: ClassVar[dict[str, Any]] = {"lr": 1e-3}
    default_steps: ClassVar[int] = 10
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)  # 3D: in-plane rotations of the patches


class MaskedTTT(TestTimeTraining):
    """TTT-MAE (Gandelsman et al. 2022): adapt the encoder by reconstructing masked patches; 20 SGD steps.

    The lr (1e-3) is ours: the paper tunes its own for a ViT-L encoder on ImageNet-C; on synth-mri 5e-3 lost
    0.16 Dice on site B (episodic), 1e-3 lost 0.03 (benchmarks/methods.py).
    """

    architecture: ClassVar[str] = "unet-mae"
    defaults: ClassVar[dict[str, Any]] = {"lr": 1e-3}
    default_steps: ClassVar[int] = 20
    momentum: ClassVar[float] = 0.9
