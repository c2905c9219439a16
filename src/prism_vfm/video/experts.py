"""The temporal experts: one post-LN Transformer layer per stream, no positional encoding.

The experts are architecturally identical; their heterogeneity comes from their inputs (16 tokens of
adjacent frame pairs for the fastest stream, 2 heavily merged tokens for the slowest at T = 32). Every
expert is always active: expert i consumes stream i, there is no router.
"""

from __future__ import annotations

from timm.layers import QuickGELU
from torch import Tensor, nn


class TemporalExpert(nn.Module):
    """x ← LN₁(x + MHA(x)); x ← LN₂(x + FFN(x)), FFN = Linear(D→2D) → QuickGELU → Linear(2D→D)."""

    def __init__(self, dim: int, num_heads: int = 4, ffn_ratio: int = 2) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_ratio * dim), QuickGELU(), nn.Linear(ffn_ratio * dim, dim)
        )
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        """Transform a stream (B, L, D)."""
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.ffn(x))
