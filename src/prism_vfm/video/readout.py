"""Combination: one learned query cross-attends over every expert token; attention mass = gates.

There is no residual connection (f = LN(attention output)). The gating weight of expert i is the
head-averaged attention of the query summed over expert i's tokens, so each row sums to 1; the gates
feed the balance loss and analysis only, they scale nothing in the forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Combination(nn.Module):
    """Fuse the expert outputs into one vector and report the attention mass per expert."""

    def __init__(self, dim: int, num_heads: int = 4) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)  # holds the weights
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, expert_outputs: list[Tensor], drop: Sequence[int] = ()
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Return fused f (B, D), gates (B, N) and the head-averaged attention of the query (B, ΣL).

        ``drop`` lists experts whose tokens the query does not see (a test-time ablation): the attention
        is renormalised over the remaining experts' tokens and the dropped experts' gates are 0."""
        tokens = torch.cat(expert_outputs, dim=1)
        batch, length, dim = tokens.shape
        heads = self.attn.num_heads
        w_q, w_kv = self.attn.in_proj_weight.split([dim, 2 * dim])
        b_q, b_kv = self.attn.in_proj_bias.split([dim, 2 * dim])
        # the query is the same for every clip: project it once; scale as nn.MultiheadAttention does
        q = F.linear(self.query.view(1, dim), w_q, b_q).view(heads, dim // heads) * (dim // heads) ** -0.5
        k, v = F.linear(tokens, w_kv, b_kv).view(batch, length, 2, heads, dim // heads).unbind(2)
        scores = torch.einsum("hc,blhc->bhl", q, k)
        lengths = [x.shape[1] for x in expert_outputs]
        if drop:
            if not set(drop) < set(range(len(expert_outputs))):
                raise ValueError(
                    f"Combination: drop={list(drop)} must name some but not all of the "
                    f"{len(expert_outputs)} experts"
                )
            hidden = torch.cat(
                [torch.full((n,), i in drop, dtype=torch.bool) for i, n in enumerate(lengths)]
            ).to(scores.device)
            scores = scores.masked_fill(hidden, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        pooled = F.linear(
            torch.einsum("bhl,blhc->bhc", weights, v).reshape(batch, dim),
            self.attn.out_proj.weight,
            self.attn.out_proj.bias,
        )
        attention = weights.mean(dim=1)
        gates = torch.stack([part.sum(dim=-1) for part in attention.split(lengths, dim=-1)], dim=-1)
        return self.norm(pooled), gates, attention
