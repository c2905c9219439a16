"""Mixed precision: bf16 autocast on GPUs, fp32 on CPUs unless asked."""

from __future__ import annotations

import contextlib

import torch


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``amp``: ``"auto"`` (bf16 on CUDA, fp32 elsewhere), ``"bf16"`` or ``"fp32"``."""
    if amp not in ("auto", "bf16", "fp32"):
        raise ValueError(f"amp must be 'auto', 'bf16' or 'fp32', got {amp!r}")
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
