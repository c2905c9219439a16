"""The temporal experts: one post-LN Transformer layer per stream, no positional encoding.

The experts are architecturally identical; their heterogeneity comes from their inputs (16 tokens of
adjacent frame pairs for the fastest stream, 2 heavily merged tokens for the slowest at T = 32). Every
expert is always active: expert i consumes stream i, there is no router.
"""

from __future__ import annotations

import torch.nn.functional as F
from timm.layers import QuickGELU
from torch import Tensor, nn


def self_attention(attn: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """``attn(x, x, x)`` for batch-first x (B, L, D), through ``scaled_dot_product_attention`` on views of
    the packed q/k/v projection (no re-layout copies, no attention weights)."""
    batch, length, dim = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(batch, length, 3, heads, dim // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, dim)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


class TemporalExpert(nn.Module):
    """x ← LN₁(x + MHA(x)); x ← LN₂(x + FFN(x)), FFN = Linear(D→2D) → QuickGELU → Linear(2D→D)."""

    def __init__(self, dim: int, num_heads: int = 4, ffn_ratio: int = 2) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)  # holds the weights
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_ratio * dim), QuickGELU(), nn.Linear(ffn_ratio * dim, dim)
        )
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        """Transform a stream (B, L, D)."""
        x = self.norm1(x + self_attention(self.attn, x))
        return self.norm2(x + self.ffn(x))
