"""Combination: one learned query cross-attends over every expert token; attention mass = gates."""

from __future__ import annotations

from torch import Tensor, nn


class Combination(nn.Module):
    """Fuse the expert outputs into one vector and report the attention mass per expert."""

    def __init__(self, dim: int, num_heads: int = 4) -> None:
        super().__init__()
        raise NotImplementedError

    def forward(self, expert_outputs: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Return fused f (B, D), gates (B, N) and the head-averaged attention (B, ΣL)."""
        raise NotImplementedError
