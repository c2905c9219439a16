"""Combination: one learned query cross-attends over every expert token; attention mass = gates.

There is no residual connection (f = LN(attention output)). The gating weight of expert i is the
head-averaged attention of the query summed over expert i's tokens, so each row sums to 1; the gates
feed the balance loss and analysis only, they scale nothing in the forward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Combination(nn.Module):
    """Fuse the expert outputs into one vector and report the attention mass per expert."""

    def __init__(self, dim: int, num_heads: int = 4) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, expert_outputs: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Return fused f (B, D), gates (B, N) and the head-averaged attention of the query (B, ΣL)."""
        tokens = torch.cat(expert_outputs, dim=1)
        query = self.query.expand(tokens.shape[0], 1, tokens.shape[2])
        pooled, weights = self.attn(query, tokens, tokens, need_weights=True, average_attn_weights=True)
        attention = weights.squeeze(1)
        lengths = [x.shape[1] for x in expert_outputs]
        gates = torch.stack([part.sum(dim=-1) for part in attention.split(lengths, dim=-1)], dim=-1)
        return self.norm(pooled.squeeze(1)), gates, attention
