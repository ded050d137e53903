"""Numeric precision of source training, adaptation and inference (`--precision`): fp32, or torch autocast to
bf16 or fp16 (fp16 gradients through a GradScaler, bf16 has fp32's range and needs none). In fp32 on CUDA,
matmuls and convolutions use TF32 (Ampere and later), as cuDNN convolutions do by default."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch

from medtta.errors import MedttaError

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise MedttaError(f"--precision '{precision}': expected one of {', '.join(PRECISIONS)}")
    return precision


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The forward passes' context: torch autocast to the precision's dtype, nothing in fp32. Without autocast's
    cache of low-precision weight copies: a region spans optimizer steps (an epoch, a volume's adaptation), and a
    cached copy would keep the weights of the region's first forward (bf16 source training collapsed on it)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision], cache_enabled=False)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Scales fp16 losses so that small gradients do not underflow; a pass-through otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def use_tf32(precision: str, device: torch.device) -> None:
    if precision == "fp32" and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
