"""Segment Anything as a source architecture: `sam-vit-b`, `sam-vit-l`, `sam-vit-h` (an official SAM or MedSAM
checkpoint the user supplies) and `sam-tiny` (the same classes, small, trained from scratch for CPU and CI).

Built from `segment_anything`'s modeling classes (Kirillov et al., "Segment Anything", ICCV 2023;
facebookresearch/segment-anything) with the official hyper-parameters. Segmentation is automatic, SAMed-style
(Zhang & Liu, "Customized Segment Anything Model for Medical Image Segmentation", 2023; hitachinsk/SAMed): no
prompt, the no-mask embedding, and the mask decoder predicts one mask per label (`num_multimask_outputs` = the
number of labels, background included), read as per-class logits. Checkpoints are read with
`torch.load(weights_only=True)` or safetensors, never through `segment_anything`'s builder (which unpickles).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from monai.metrics import compute_iou
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import set_adapter
from safetensors import safe_open
from safetensors.torch import load_file
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from medtta.data.layout import sha256
from medtta.errors import MedttaError
from medtta.models.base import Architecture, segmentation_loss

SOURCE_LORA = "source"  # the peft adapter name of the LoRA trained on the source site (big configurations)
INTENSITIES = ("auto", "unit", "minmax")


@dataclass(frozen=True)
class SamSpec:
    """The shape of a SAM: the image encoder (ViT), and the prompt encoder and mask decoder it feeds."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    patch_size: int = 16
    window_size: int = 14
    prompt_dim: int = 256  # the image embedding's channels, the prompt and decoder width
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_hidden_dim: int = 256
    mask_in_chans: int = 16


SPECS = {  # segment_anything.build_sam's official values
    "vit-b": SamSpec(768, 12, 12, (2, 5, 8, 11)),
    "vit-l": SamSpec(1024, 24, 16, (5, 11, 17, 23)),
    "vit-h": SamSpec(1280, 32, 16, (7, 15, 23, 31)),
    # 4 narrow blocks (2 windowed, 2 global) on 8-pixel patches: 16 x 16 tokens at 128, like the vit's 64 x 64 at 1024
    # in shape but not in cost; masks come out at 64 x 64
    "tiny": SamSpec(96, 4, 3, (1, 3), patch_size=8, window_size=8, prompt_dim=64, decoder_mlp_dim=256,
                    decoder_heads=4, iou_hidden_dim=64, mask_in_chans=8),
}


def build_sam(spec: SamSpec, image_size: int, n_classes: int) -> Sam:
    """SAM's modules with `spec`'s shape at `image_size`, the mask decoder predicting `n_classes` masks."""
    tokens = image_size // spec.patch_size
    encoder = ImageEncoderViT(
        img_size=image_size, patch_size=spec.patch_size, embed_dim=spec.embed_dim, depth=spec.depth,
        num_heads=spec.num_heads, mlp_ratio=4, out_chans=spec.prompt_dim, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=spec.window_size,
        global_attn_indexes=spec.global_attn_indexes)
    prompt = PromptEncoder(embed_dim=spec.prompt_dim, image_embedding_size=(tokens, tokens),
                           input_image_size=(image_size, image_size), mask_in_chans=spec.mask_in_chans)
    decoder = MaskDecoder(
        num_multimask_outputs=n_classes,
        transformer=TwoWayTransformer(depth=2, embedding_dim=spec.prompt_dim, mlp_dim=spec.decoder_mlp_dim,
                                      num_heads=spec.decoder_heads),
        transformer_dim=spec.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=spec.iou_hidden_dim)
    return Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder)


# Checkpoints in SAM's own key format

def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a SAM checkpoint file (.pth/.pt read with weights_only=True, or .safetensors); a state dict
    wrapped as {"model": ...} or {"state_dict": ...} is unwrapped."""
    if not path.is_file():
        raise MedttaError(f"SAM checkpoint {path}: no such file (give the path of an official SAM or MedSAM "
                          "checkpoint; nothing is downloaded)")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        try:  # memory-mapped: a vit-h file is 2.5 GB
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files of torch's legacy format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses pickled code; a truncated file fails to unzip
        raise MedttaError(f"SAM checkpoint {path} cannot be read as a weights-only state dict: {err}") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MedttaError(f"SAM checkpoint {path} is not a state dict of tensors")
    return state


def checkpoint_architecture(path: str | Path) -> str:
    """The `sam-vit-*` architecture whose shape a SAM checkpoint has (from its patch embedding's width)."""
    path = Path(path)
    key = "image_encoder.patch_embed.proj.weight"
    if path.suffix == ".safetensors" and path.is_file():
        with safe_open(str(path), "pt") as fh:
            width = fh.get_slice(key).get_shape()[0] if key in fh.keys() else None
    else:
        tensor = read_checkpoint(path).get(key)
        width = None if tensor is None else tensor.shape[0]
    for name, spec in SPECS.items():
        if name != "tiny" and spec.embed_dim == width:
            return f"sam-{name}"
    raise MedttaError(f"SAM checkpoint {path}: image encoder width {width} is none of vit-b, vit-l, vit-h")


_HEAD = re.compile(r"mask_decoder\.output_hypernetworks_mlps\.(\d+)\.(.+)")


def _source_key(key: str, their_tokens: int) -> str:
    """The checkpoint key a model key is loaded from: mask token i's hypernetwork from token i mod k of the k the
    checkpoint has (SAM has 4: one single-mask and 3 multimask tokens)."""
    match = _HEAD.fullmatch(key)
    return f"mask_decoder.output_hypernetworks_mlps.{int(match[1]) % their_tokens}.{match[2]}" if match else key


def _resized(key: str, tensor: torch.Tensor, shape: torch.Size, their_tokens: int, source: str) -> torch.Tensor:
    """`tensor` brought to the model's `shape`: the absolute position embedding resampled to another token grid
    (bicubic), the relative-position tables of the global-attention blocks to another length (linear, as SAM
    itself does at run time), the per-mask rows of the class heads repeated cyclically over the labels."""
    if tensor.shape == shape:
        return tensor
    if key.endswith("pos_embed") and tensor.dim() == 4 and tensor.shape[-1] == shape[-1]:
        grid = F.interpolate(tensor.permute(0, 3, 1, 2).float(), size=tuple(shape[1:3]), mode="bicubic",
                             align_corners=False, antialias=shape[1] < tensor.shape[1])
        return grid.permute(0, 2, 3, 1).to(tensor.dtype)
    if re.search(r"\.rel_pos_[hw]$", key) and tensor.dim() == 2 and tensor.shape[1] == shape[1]:
        table = F.interpolate(tensor.t()[None].float(), size=shape[0], mode="linear", align_corners=False)
        return table[0].t().to(tensor.dtype)
    per_mask = key == "mask_decoder.mask_tokens.weight" or key.startswith("mask_decoder.iou_prediction_head.")
    if per_mask and tensor.shape[0] == their_tokens and tensor.shape[1:] == shape[1:]:
        return tensor[torch.arange(shape[0]) % their_tokens]
    raise MedttaError(f"SAM checkpoint {source}: '{key}' has shape {tuple(tensor.shape)}, the model expects "
                      f"{tuple(shape)} (a checkpoint of another SAM size?)")


def _name_keys(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def fit_checkpoint(sam: Sam, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A checkpoint in SAM's key format as the state dict of `sam` (another input size or number of labels):
    every key of the model must come from the checkpoint and every checkpoint key must be used (the hypernetworks of
    mask tokens beyond the model's excepted); a missing or unexpected key fails naming it."""
    own = sam.state_dict()
    tokens = state.get("mask_decoder.mask_tokens.weight")
    their_tokens = len(tokens) if tokens is not None else 1
    sources = {key: _source_key(key, their_tokens) for key in own}
    missing = [key for key, src in sources.items() if src not in state]
    our_tokens = len(own["mask_decoder.mask_tokens.weight"])
    unused_heads = tuple(f"mask_decoder.output_hypernetworks_mlps.{i}." for i in range(our_tokens, their_tokens))
    used = set(sources.values())
    unexpected = [key for key in state if key not in used and not key.startswith(unused_heads)]
    if missing:
        raise MedttaError(f"SAM checkpoint {source} lacks {len(missing)} key(s) the model needs: "
                          f"{_name_keys(missing)}")
    if unexpected:
        raise MedttaError(f"SAM checkpoint {source} has {len(unexpected)} unexpected key(s): {_name_keys(unexpected)}"
                          " (not a SAM state dict in segment_anything's key format?)")
    return {key: _resized(key, state[src], own[key].shape, their_tokens, source) for key, src in sources.items()}


# LoRA adapters (peft) on the image encoder's attention projections

def lora_layers(encoder: nn.Module) -> list[LoraLayer]:
    return [m for m in encoder.modules() if isinstance(m, LoraLayer)]


def inject_lora(encoder: ImageEncoderViT, name: str, rank: int, alpha: float, blocks: list[int]) -> None:
    """A peft LoRA adapter `name` of rank `rank` on the fused qkv projection of the given blocks, B = 0 (the
    identity at start). Adapters already there stay active; requires_grad is left as it was."""
    layers = lora_layers(encoder)
    active = list(layers[0].active_adapters) if layers else []
    target = [f"blocks.{i}.attn.qkv" for i in blocks]
    with frozen_flags(encoder), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*peft_config.*")  # several adapters in one model is the point
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target),
                                encoder, adapter_name=name)
    use_lora(encoder, [*active, name])


@contextmanager
def frozen_flags(module: nn.Module) -> Iterator[None]:
    """Restore every parameter's requires_grad afterwards (peft switches them when it injects or activates)."""
    flags = {p: p.requires_grad for p in module.parameters()}
    try:
        yield
    finally:
        for p in module.parameters():
            p.requires_grad_(flags.get(p, False))  # a new adapter's weights start frozen


def use_lora(encoder: nn.Module, names: list[str]) -> None:
    """Make `names` the active LoRA adapters of `encoder` (a layer lacking one skips it), requires_grad unchanged."""
    if lora_layers(encoder):
        with frozen_flags(encoder):
            set_adapter(encoder, names, inference_mode=True)


def lora_parameters(encoder: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The weights of LoRA adapter `name`, by their name in `encoder`."""
    return {n: p for n, p in encoder.named_parameters() if f".lora_A.{name}." in n or f".lora_B.{name}." in n}


# Input and output mapping

def to_unit(x: torch.Tensor, intensity: str) -> torch.Tensor:
    """Normalized slices -> [0, 1]. `unit`: slices already in [0, 1] (the ct and oct schemes: HU or percentile
    window), clamped; `minmax`: each slice min-max scaled (MedSAM's mapping; the mr scheme's z-scores have no fixed
    range); `auto`: `unit` for slices within [0, 1], `minmax` for the others."""
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    high = x.amax(dim=(1, 2, 3), keepdim=True)
    scaled = (x - low) / (high - low).clamp_min(1e-8)
    if intensity == "minmax":
        return scaled
    if intensity == "unit":
        return x.clamp(0, 1)
    within = (low >= -1e-4) & (high <= 1 + 1e-4)
    return torch.where(within, x.clamp(0, 1), scaled)


def grey_to_rgb(grey: torch.Tensor) -> torch.Tensor:
    return grey.expand(-1, 3, -1, -1)


@dataclass
class SamOutput:
    embeddings: torch.Tensor  # (N, D, h, w) image embeddings
    masks: torch.Tensor  # (N, C, 4h, 4w) the mask decoder's low-resolution logits
    iou: torch.Tensor  # (N, C) predicted IoU of each label's mask
    logits: torch.Tensor  # (N, C, H, W) at the slices' size


class SamModel(Architecture):
    """Segment Anything (image encoder ViT, prompt encoder, mask decoder), automatic multi-class segmentation.

    Slices are mapped to [0, 1] (`intensity`), resized to `image_size`, copied to 3 channels, scaled to 0-255 and
    normalized with SAM's pixel mean and std; the mask decoder's low-resolution masks are resized back to the slices'
    size. A `checkpoint` in SAM's key format is loaded at any `image_size` (position embeddings interpolated).
    Source training: the mask decoder and prompt encoder plus a LoRA of the image encoder (`lora_rank`,
    `lora_alpha`), the rest frozen; SAM's own IoU-prediction loss trains the IoU head.
    """

    spec: ClassVar[SamSpec] = SPECS["vit-b"]
    name: ClassVar[str] = "sam-vit-b"
    trains_all: ClassVar[bool] = False  # True: every weight is trained on the source site; False: decoder + LoRA
    defaults: ClassVar[dict[str, Any]] = {"checkpoint": None, "image_size": 1024, "intensity": "auto",
                                          "lora_rank": 4, "lora_alpha": 4}

    def __init__(self, in_channels: int, n_classes: int, **config: Any) -> None:
        super().__init__(in_channels, n_classes, **config)
        c = self.config
        if in_channels != 1:
            raise MedttaError(f"{self.name} takes grey slices (1 channel), got {in_channels}")
        if c["intensity"] not in INTENSITIES:
            raise MedttaError(f"{self.name} config intensity '{c['intensity']}': expected {', '.join(INTENSITIES)}")
        self.image_size = int(c["image_size"])
        if self.image_size % self.spec.patch_size or self.image_size < self.spec.patch_size:
            raise MedttaError(f"{self.name} config image_size {self.image_size}: must be a multiple of the patch "
                              f"size {self.spec.patch_size}")
        self.sam = build_sam(self.spec, self.image_size, n_classes)
        self.checkpoint_sha256 = self._load_checkpoint(c["checkpoint"])
        if not self.trains_all:
            self.sam.image_encoder.requires_grad_(False)
            inject_lora(self.sam.image_encoder, SOURCE_LORA, int(c["lora_rank"]), c["lora_alpha"],
                        list(range(self.spec.depth)))
            for p in lora_parameters(self.sam.image_encoder, SOURCE_LORA).values():
                p.requires_grad_(True)

    def _load_checkpoint(self, checkpoint: str | None) -> str | None:
        if not checkpoint:
            if not self.trains_all:
                raise MedttaError(f"{self.name} needs a SAM or MedSAM checkpoint: -a checkpoint=PATH (nothing is "
                                  "downloaded)")
            return None
        path = Path(checkpoint).expanduser()
        self.sam.load_state_dict(fit_checkpoint(self.sam, read_checkpoint(path), str(path)))
        return sha256(path)

    def network_config(self) -> dict[str, Any]:
        """The checkpoint by content (its sha256), not by path: a moved file reuses the model, an edited one not."""
        config = super().network_config()
        return {**config, "checkpoint": self.checkpoint_sha256} if config.get("checkpoint") else config

    # the forward pass, in parts (Sam.forward runs under no_grad)

    def unit_slices(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) normalized slices -> (N, 1, S, S) in [0, 1] at the encoder's input size S."""
        size = (self.image_size, self.image_size)
        return F.interpolate(to_unit(x, self.config["intensity"]), size=size, mode="bilinear", align_corners=False,
                             antialias=min(x.shape[-2:]) > self.image_size)

    def embed(self, rgb: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [0, 1] -> image embeddings, after SAM's pixel normalization (of 0-255 RGB)."""
        return self.sam.image_encoder((rgb * 255 - self.sam.pixel_mean) / self.sam.pixel_std)

    def decode(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution mask logits (N, C, 4h, 4w) and predicted IoUs (N, C), without prompts.

        The no-prompt embeddings have batch size 1, so the decoder broadcasts them over the batch of images
        instead of repeating every image once per prompt."""
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=None, masks=None)
        return self.sam.mask_decoder(image_embeddings=embeddings, image_pe=self.sam.prompt_encoder.get_dense_pe(),
                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                     multimask_output=True)

    def outputs(self, x: torch.Tensor, to_rgb: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SamOutput:
        """Everything a pass computes; `to_rgb` maps the [0, 1] grey slices to 3 channels (default: copies)."""
        embeddings = self.embed((to_rgb or grey_to_rgb)(self.unit_slices(x)))
        masks, iou = self.decode(embeddings)
        logits = F.interpolate(masks, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return SamOutput(embeddings, masks, iou, logits)

    def forward(self, x: torch.Tensor, to_rgb: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> torch.Tensor:
        return self.outputs(x, to_rgb).logits

    def source_losses(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dice + cross-entropy of the masks, and SAM's IoU-head loss: the mean squared error of each label's
        predicted IoU against the IoU of its predicted mask (SAMed trains no IoU head; SAM-TTA's weights need it)."""
        out = self.outputs(x)
        return {"segmentation": segmentation_loss(out.logits, labels),
                "iou": F.mse_loss(out.iou, mask_iou(out.logits.detach(), labels))}

    # what is trained, and what adapters may update

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """`norm`: LayerNorm affine parameters of the image encoder and mask decoder (the prompt encoder's are only
        used on mask prompts); `lora`: the source LoRA (empty when every weight is trained); `encoder`: the image
        encoder without LoRA; `decoder`: mask decoder and prompt encoder."""
        encoder = self.sam.image_encoder
        lora = list(lora_parameters(encoder, SOURCE_LORA).values())
        in_lora = {id(p) for p in lora}
        return {"norm": layernorm_params(encoder) + layernorm_params(self.sam.mask_decoder),
                "lora": lora,
                "encoder": [p for p in encoder.parameters() if id(p) not in in_lora],
                "decoder": [*self.sam.mask_decoder.parameters(), *self.sam.prompt_encoder.parameters()]}

    def network_parameters(self) -> list[nn.Parameter]:
        if self.trains_all:
            return super().network_parameters()
        parts = self.parts()
        return parts["lora"] + parts["decoder"]

    def network_state(self) -> dict[str, torch.Tensor]:
        """Without the frozen image encoder when it comes from the checkpoint (loaded again when the model is
        built): the cached file holds what source training changed."""
        state = super().network_state()
        if self.trains_all:
            return state
        return {k: v for k, v in state.items() if not k.startswith("sam.image_encoder.") or ".lora_" in k}


def layernorm_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for m in module.modules() if isinstance(m, (nn.LayerNorm, LayerNorm2d)) for p in (m.weight, m.bias)]


@torch.no_grad()
def mask_iou(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, C) IoU of each label's predicted mask (argmax) with its reference; 1 where both are empty."""
    n_classes = logits.shape[1]
    pred = F.one_hot(logits.argmax(1), n_classes).permute(0, 3, 1, 2).float()
    ref = F.one_hot(labels, n_classes).permute(0, 3, 1, 2).float()
    return compute_iou(pred, ref, include_background=True, ignore_empty=False)


class SamVitB(SamModel):
    """Segment Anything ViT-B (or MedSAM) from a user-supplied checkpoint; trains the mask decoder + LoRA."""

    spec = SPECS["vit-b"]
    name = "sam-vit-b"


class SamVitL(SamModel):
    """Segment Anything ViT-L from a user-supplied checkpoint; trains the mask decoder + LoRA."""

    spec = SPECS["vit-l"]
    name = "sam-vit-l"


class SamVitH(SamModel):
    """Segment Anything ViT-H from a user-supplied checkpoint; trains the mask decoder + LoRA."""

    spec = SPECS["vit-h"]
    name = "sam-vit-h"


class SamTiny(SamModel):
    """A small Segment Anything (4 blocks, width 96, 128 x 128 input) trained from scratch, for CPU and CI.

    Every weight is trained on the source site (from `checkpoint` when one is given, in SAM's key format)."""

    spec = SPECS["tiny"]
    name = "sam-tiny"
    trains_all = True
    defaults: ClassVar[dict[str, Any]] = {"checkpoint": None, "image_size": 128, "intensity": "auto"}
