"""Device and mixed-precision choices shared by training, validation and inference."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU fails with the fix."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is '{name}' but no CUDA GPU is visible; use 'auto' or 'cpu'")
    return device


def amp_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """bf16 on CUDA GPUs that support it, else fp16 on CUDA; None (fp32) on CPU or when disabled.

    Native bf16 only: torch reports bf16 "supported" on a T4 (compute 7.5) through slow emulation;
    there fp16 with a GradScaler is the right choice.
    """
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def amp_autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """The autocast context training uses; validation code may use it too (cast outputs to float)."""
    dtype = amp_dtype(device, enabled)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
