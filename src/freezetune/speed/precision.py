"""Mixed precision: which autocast dtype a device can train in, and fp16 gradient scaling."""

from __future__ import annotations

import contextlib

import torch

from freezetune.errors import DeviceError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    """Refuses precision/device combinations that cannot train correctly, saying why.

    Raises:
        DeviceError: fp16 without CUDA (no gradient scaling for CPU autocast here), or bf16 on a
            GPU without bf16 support.
    """
    if precision == "fp16" and device.type != "cuda":
        raise DeviceError(
            "train.precision: fp16 needs CUDA (fp16 training needs gradient scaling, which freezetune "
            "only does on CUDA); use bf16 on the CPU"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"train.precision: bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16")


def autocast(precision: str, device: torch.device):
    """The autocast context for a training or evaluation forward (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 on CUDA (small fp16 gradients would underflow to zero without it)."""
    if precision == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None
