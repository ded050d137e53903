"""Test-time adaptation of Segment Anything: `sam-lora` (LoRA on the image encoder, after SAM-TTA) and `sam-tent`
(TENT on SAM's LayerNorm affine parameters, the baseline without LoRA on the same model)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from medtta.adapters.base import Adapter
from medtta.adapters.sar import pixel_entropy
from medtta.adapters.tent import Tent
from medtta.errors import MedttaError
from medtta.models.sam import SamModel, SamOutput, inject_lora, lora_layers, lora_parameters, use_lora

STUDENT, TEACHER = "tta", "teacher"  # the peft adapter names of the test-time LoRA and its EMA teacher


class SamAdapter(Adapter):
    """An adapter of any SAM architecture (sam-tiny by default). `reset()` restores what an update may change
    (the collected parameters and `tracked_state()`), not a copy of the whole model: a ViT-H is 2.5 GB."""

    architecture: ClassVar[str] = "sam-tiny"
    other_architectures: ClassVar[tuple[str, ...]] = ("sam-vit-b", "sam-vit-l", "sam-vit-h")
    spatial_dims: ClassVar[tuple[int, ...]] = (2,)  # SAM's image encoder is 2D

    def snapshot(self) -> dict[str, Any]:
        collected = {id(p) for p in self.params}
        names = {n for n, p in self.named_parameters() if id(p) in collected} | self.tracked_state()
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k in names}

    def restore(self, snapshot: dict[str, Any]) -> None:
        self.load_state_dict(snapshot, strict=False)


class SamTent(SamAdapter, Tent):
    """TENT on SAM: entropy minimization of the per-pixel predictions, updating only the LayerNorm affine
    parameters of the image encoder and mask decoder (Wang et al., ICLR 2021).

    SAM has no BatchNorm, so there are no test-batch statistics to use: LayerNorm normalizes each token with its own.
    Adam at lr 1e-3, one step per batch, as `tent`.
    """

    def collect_params(self, model: nn.Module) -> list[nn.Parameter]:
        return model.parts()["norm"]


class BezierCurves(nn.Module):
    """Three cubic Bézier intensity curves, one per RGB channel, mapping a [0, 1] grey slice to 3 channels:
    y_c(t) = sum_k C(3, k) t^k (1 - t)^(3 - k) P_ck, clamped to [0, 1] (SAM-TTA's `LearnableBezierTransform`).

    The control points are the parameters themselves, starting at (0, 1/3, 2/3, 1): equally spaced Bernstein
    coefficients reproduce the line, so every curve starts as y = t, i.e. the plain grey copy. (SAM-TTA passes its
    points through a sigmoid and starts from (0, .33, .66, 1), (0, .2, .8, 1), (0, .25, .75, 1): curves between
    0.5 and 0.73, not the identity.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.points = nn.Parameter(torch.linspace(0, 1, 4).repeat(3, 1))  # (channel, control point)

    def forward(self, grey: torch.Tensor) -> torch.Tensor:
        t = grey  # (N, 1, H, W)
        basis = (1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t**2 * (1 - t), t**3
        rgb = sum(b * self.points[:, k].view(1, 3, 1, 1) for k, b in enumerate(basis))
        return rgb.clamp(0, 1)


_DICE = DiceLoss(softmax=True, reduction="none", smooth_nr=1.0, smooth_dr=1.0)  # SAM-TTA's DiceLoss smooths by 1


def soft_dice(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """(N, C) Dice loss of the softmax of `logits` against the teacher's binarized masks (its argmax, one-hot), per
    slice and label."""
    target = F.one_hot(teacher_logits.argmax(1), logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
    return _DICE(logits, target).flatten(1)


def spatial_kl(teacher: torch.Tensor, student: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each embedding channel's softmax over positions at a per-slice `temperature`,
    summed over positions, averaged over channels and slices (SAM-TTA's `kl_spatial_per_channel`)."""
    t = teacher.flatten(2) / temperature.view(-1, 1, 1)
    s = student.flatten(2) / temperature.view(-1, 1, 1)
    log_t = t.log_softmax(-1)
    return (log_t.exp() * (log_t - s.log_softmax(-1))).sum(-1).mean()


def block_indices(blocks: Any, depth: int) -> list[int]:
    """`all`, one index, a list or a comma-separated string of block indices -> sorted indices < depth."""
    if blocks == "all":
        return list(range(depth))
    items = str(blocks).split(",") if isinstance(blocks, str) else blocks if isinstance(blocks, list) else [blocks]
    try:
        chosen = sorted({int(b) for b in items})
    except (TypeError, ValueError):
        raise MedttaError(f"sam-lora blocks={blocks!r}: expected 'all' or block indices such as [0, 1]") from None
    if not chosen or chosen[0] < 0 or chosen[-1] >= depth:
        raise MedttaError(f"sam-lora blocks={blocks!r}: the image encoder has blocks 0 to {depth - 1}")
    return chosen


def _choice(hparams: dict[str, Any], key: str, choices: tuple[str, ...]) -> str:
    if hparams[key] not in choices:
        raise MedttaError(f"sam-lora {key}={hparams[key]!r}: expected one of {', '.join(choices)}")
    return hparams[key]


class SamLora(SamAdapter):
    """LoRA on SAM's image encoder trained at test time, by entropy or SAM-TTA's teacher consistency, with an
    optional learned Bézier grey-to-RGB transform (Wu et al., "SAM-aware Test-time Adaptation for Universal Medical
    Image Segmentation", arXiv 2506.05221; JianghaoWu/SAM-TTA).

    - LoRA by peft on the fused `qkv` projection of the chosen `blocks` (rank 4, alpha 4: SAM-TTA's unscaled
      update), B = 0 at start. SAM-TTA and SAMed put separate rank-4 updates on q and v only; peft on the whole qkv
      shares one down-projection among q, k and v: the same 4·r·d weights per block, k adapted too, and no custom
      layer. Only these weights (and the curves) train; every other weight is frozen.
    - `objective=consistency` (SAM-TTA's DUMT): a teacher, the EMA of the LoRA (momentum 0.95; a second peft adapter
      on the same frozen encoder, not a copy of the model), predicts on the same input. Loss = Dice of the student's
      softmax to the teacher's binarized masks at two scales (the decoder's low-resolution masks and the logits at
      slice size, averaged), each (slice, label) weighted by -log(1 - predicted IoU) over its running maximum; plus
      the KL of the per-channel spatial softmax of the image embeddings (teacher to student) at the predicted IoU as
      temperature (floored at 0.1: SAM-TTA's 1e-12 floor lets a low IoU blow it up); plus 1 - predicted IoU
      (`iou_weight`, in SAM-TTA's code). Multi-class: SAM-TTA is binary with one prompt per object; here every label
      is one mask and the Dice is per label, as SAMed's loss. Adam at 1e-4 (SAM-TTA: weight decay 1e-4 and a
      0.999-per-step decay, left out). SAM-TTA predicts with the student after its update, and so does this.
    - `objective=entropy`: mean per-pixel entropy of the student's softmax, as TENT.
    - `input_transform=bezier`: SAM-TTA's three per-channel cubic Bézier curves (4 control points) in place of the
      grey copy, starting at the identity, with their own learning rate (`curve_lr`, SAM-TTA's 0.1).
    - Prompts: none (automatic multi-class masks). SAM-TTA's box prompts come from the ground truth, which leaks
      labels into adaptation; no ground truth is used here.
    """

    paradigm: ClassVar[str] = "output"
    defaults: ClassVar[dict[str, Any]] = {
        "lr": 1e-4, "rank": 4, "alpha": 4, "blocks": "all", "objective": "consistency", "ema": 0.95,
        "kl_weight": 1.0, "iou_weight": 1.0, "input_transform": "none", "curve_lr": 0.1,
    }
    default_steps: ClassVar[int] = 1

    def configure(self, model: SamModel) -> None:
        super().configure(model)
        h = self.hparams
        self.consistency = _choice(h, "objective", ("consistency", "entropy")) == "consistency"
        bezier = _choice(h, "input_transform", ("none", "bezier")) == "bezier"
        encoder = model.sam.image_encoder
        layers = lora_layers(encoder)
        self.base_lora = list(layers[0].active_adapters) if layers else []  # the source LoRA of the big SAMs
        blocks = block_indices(h["blocks"], len(encoder.blocks))
        for name in (STUDENT, TEACHER) if self.consistency else (STUDENT,):
            inject_lora(encoder, name, int(h["rank"]), h["alpha"], blocks)
        self.student_lora = lora_parameters(encoder, STUDENT)
        self.teacher_lora = lora_parameters(encoder, TEACHER)
        with torch.no_grad():  # the teacher starts as the student
            for name, p in self.teacher_lora.items():
                p.copy_(self.student_lora[name.replace(f".{TEACHER}.", f".{STUDENT}.")])
        use_lora(encoder, [*self.base_lora, STUDENT])
        self.curves = BezierCurves().to(encoder.pos_embed.device) if bezier else None
        self.register_buffer("w_max", torch.zeros((), device=encoder.pos_embed.device))  # the IoU weights' maximum

    def collect_params(self, model: nn.Module) -> list[nn.Parameter]:
        return [*self.student_lora.values(), *(self.curves.parameters() if self.curves is not None else [])]

    def tracked_state(self) -> set[str]:
        if not self.consistency:
            return set()
        return {f"model.sam.image_encoder.{name}" for name in self.teacher_lora} | {"w_max"}

    def make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """Adam on the LoRA at `lr`; the curves in their own group at `curve_lr` (Adam's state is per parameter, so
        this is SAM-TTA's second optimizer)."""
        curves = {id(p) for p in self.curves.parameters()} if self.curves is not None else set()
        groups = [{"params": [p for p in params if id(p) not in curves], "lr": self.hparams["lr"]}]
        if curves:
            groups.append({"params": [p for p in params if id(p) in curves], "lr": self.hparams["curve_lr"]})
        return torch.optim.Adam(groups, lr=self.hparams["lr"], betas=(0.9, 0.999))

    @contextmanager
    def teacher_active(self) -> Iterator[None]:
        encoder = self.model.sam.image_encoder
        use_lora(encoder, [*self.base_lora, TEACHER])
        try:
            yield
        finally:
            use_lora(encoder, [*self.base_lora, STUDENT])

    def objective(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.consistency:
            logits = self.model(x, self.curves)
            return pixel_entropy(logits).mean(), logits
        with torch.no_grad(), self.teacher_active():
            teacher = self.model.outputs(x, self.curves)
        student = self.model.outputs(x, self.curves)
        return self.consistency_loss(student, teacher), student.logits

    def consistency_loss(self, student: SamOutput, teacher: SamOutput) -> torch.Tensor:
        iou = student.iou.clamp(0, 1)
        with torch.no_grad():
            w = -torch.log((1 - iou).clamp_min(1e-6))
            self.w_max.copy_(torch.maximum(self.w_max, w.max()))
            weights = w / self.w_max.clamp_min(1e-6)
            temperature = iou.mean(1).clamp_min(0.1)
        dice = (soft_dice(student.masks, teacher.masks) + soft_dice(student.logits, teacher.logits)) / 2
        kl = spatial_kl(teacher.embeddings, student.embeddings, temperature)
        h = self.hparams
        return (weights * dice).mean() + h["kl_weight"] * kl + h["iou_weight"] * (1 - iou).mean()

    def update(self, x: torch.Tensor) -> torch.Tensor | None:
        logits = super().update(x)
        if self.consistency:
            self.ema_teacher()
        return logits

    @torch.no_grad()
    def ema_teacher(self) -> None:
        rate = self.hparams["ema"]
        for name, teacher in self.teacher_lora.items():
            teacher.mul_(rate).add_(self.student_lora[name.replace(f".{TEACHER}.", f".{STUDENT}.")], alpha=1 - rate)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.curves)
