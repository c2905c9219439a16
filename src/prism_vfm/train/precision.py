"""Mixed precision chosen from what the device supports, and the loss scaling fp16 needs.

``amp="auto"`` picks, on a CUDA device: bf16 where the GPU computes in bf16 natively (compute capability
8.0 and later: A100, H100, RTX 30xx…); fp16 with loss scaling on GPUs with fp16 tensor cores but no bf16
(capability 7.x: V100, T4, RTX 20xx); fp32 on older GPUs, where half precision brings no speed-up, only
overflow. On a CPU ``auto`` is fp32: CPU autocast is slower than fp32 on most CPUs and changes results,
so bf16 or fp16 run there only when asked for. Sharded (FSDP) runs never choose fp16 by themselves (no
loss scaling for sharded gradients here): ``auto`` falls back to fp32 on a GPU without bf16.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any, Literal, cast

import torch

from prism_vfm.train.distributed import clip_grad_norm

AMP_CHOICES = ("auto", "bf16", "fp16", "fp32")
Precision = Literal["bf16", "fp16", "fp32"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def choose_precision(amp: str, device: torch.device, sharded: bool = False) -> Precision:
    """The precision a run with setting ``amp`` (one of :data:`AMP_CHOICES`) trains in on ``device``.

    Raises ``ValueError`` for a precision the device cannot run (bf16 on a GPU without native bf16) or that
    this library does not scale for (fp16 with ``sharded`` parameters).
    """
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, _ = torch.cuda.get_device_capability(index)
        # Native support only: with emulation, pre-Ampere GPUs "support" bf16 at a fraction of fp32's speed.
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if amp == "auto":
            if bf16:
                return "bf16"
            return "fp16" if major >= 7 and not sharded else "fp32"
        if amp == "bf16" and not bf16:
            name = torch.cuda.get_device_name(index)
            raise ValueError(
                f"amp='bf16': {name} has no native bf16 (compute capability {major}.x < 8); "
                "use amp=auto (fp16 with loss scaling) or fp32"
            )
    elif amp == "auto":
        return "fp32"
    if amp == "fp16" and sharded:
        raise ValueError(
            "amp='fp16' is not supported with fsdp (no loss scaling for sharded gradients); use bf16 or fp32"
        )
    return cast(Precision, amp)


class MixedPrecision:
    """Autocast, backward and optimiser step of a run in one precision (:func:`choose_precision`).

    In fp16 the loss is scaled before backward (``torch.amp.GradScaler``) and the gradients are unscaled
    before they are clipped, so clipping and the reported gradient norm see their true values; a step
    whose gradients overflowed is skipped and the scale lowered. In bf16 and fp32 nothing is scaled.
    """

    def __init__(self, amp: str, device: torch.device, sharded: bool = False) -> None:
        self.precision: Precision = choose_precision(amp, device, sharded)
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of the forward (none in fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, of the scaled loss in fp16."""
        self.scaler.scale(loss).backward()

    def step(
        self, optimizer: torch.optim.Optimizer, parameters: Iterable[torch.nn.Parameter], max_norm: float
    ) -> torch.Tensor:
        """Unscale (fp16), clip the gradient norm to ``max_norm``, step; returns the norm before clipping."""
        self.scaler.unscale_(optimizer)
        norm = clip_grad_norm(parameters, max_norm)
        self.scaler.step(optimizer)
        self.scaler.update()
        return norm

    def state_dict(self) -> dict[str, Any]:
        """The loss scaler's state (empty unless fp16), for checkpoints."""
        return cast("dict[str, Any]", self.scaler.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (an empty state leaves the scaler as it is)."""
        if state:
            self.scaler.load_state_dict(state)


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of ``amp`` on ``device`` (evaluation: no loss scaling needed)."""
    return MixedPrecision(amp, device).autocast()
