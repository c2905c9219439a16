"""The temporal experts: one post-LN Transformer layer per stream, no positional encoding."""

from __future__ import annotations

from torch import Tensor, nn


class TemporalExpert(nn.Module):
    """x ← LN₁(x + MHA(x)); x ← LN₂(x + FFN(x)), FFN = Linear(D→2D) → QuickGELU → Linear(2D→D)."""

    def __init__(self, dim: int, num_heads: int = 4, ffn_ratio: int = 2) -> None:
        super().__init__()
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Transform a stream (B, L, D)."""
        raise NotImplementedError
