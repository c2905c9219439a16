"""Context-conditioned top-k router of the PRISM dual-stream block (SPEC §4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Routing:
    """What the router decided for a (B, N) grid of tokens.

    ``logits`` are the values top-k was taken of (clean in eval mode; after expert dropout and noise
    in training mode), ``indices`` are in ``torch.topk`` order and ``weights`` are the softmax over the
    k selected logits (0 for a selected expert whose logit was dropped to -inf).
    """

    logits: Tensor  # (B, N, E)
    indices: Tensor  # (B, N, k) int64
    weights: Tensor  # (B, N, k)


torch.export.register_dataclass(Routing)


CONDITIONING = ("film", "concat", "none")


class ConditionedRouter(nn.Module):
    """Context-conditioned top-k router with expert dropout and noisy gating.

    ``conditioning`` says how the context embedding ``c`` (B, D) of each sample enters the router input
    ``h`` for tokens ``u`` (B, N, D); the logits are ``z = W_g h + b_g``:

    * ``"film"`` (PRISM): ``[γ, β] = W_f c + b_f``; ``f = (1 + γ)·u + β``; ``s = σ(W_s u + b_s)``;
      ``h = u + s·(f − u)``. γ and β depend only on the sample, so they are computed once per sample
      rather than once per token (the released code does the latter; the result is the same).
    * ``"concat"`` (the "w/o FiLM" ablation): ``h = [u; c]``, so ``W_g`` and the noise layer take 2D
      inputs.
    * ``"none"`` (vanilla sparse MoE): ``h = u``; the context is ignored.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        expert_dropout: float = 0.1,
        noisy_gating: bool = True,
        conditioning: str = "film",
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if conditioning not in CONDITIONING:
            raise ValueError(f"conditioning must be one of {CONDITIONING}, got {conditioning!r}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.expert_dropout = expert_dropout
        self.conditioning = conditioning
        self.film = nn.Linear(dim, 2 * dim) if conditioning == "film" else None
        self.input_gate = nn.Linear(dim, dim) if conditioning == "film" else None
        width = 2 * dim if conditioning == "concat" else dim
        self.gate = nn.Linear(width, num_experts)
        self.noise = nn.Linear(width, num_experts) if noisy_gating else None
        if self.film is not None:
            # FiLM starts as the identity so that a pretrained router input is unchanged at initialisation.
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def fused_input(self, u: Tensor, cond: Tensor, gate: Tensor | None = None) -> Tensor:
        """The conditioned router input ``h`` (B, N, D or 2D) for tokens (B, N, D) and contexts (B, D).

        ``gate`` is ``σ(W_s u + b_s)`` when already computed: it does not depend on the context, so
        several context passes over the same tokens can share it.
        """
        if self.conditioning == "concat":
            return torch.cat([u, cond.unsqueeze(1).expand_as(u)], dim=-1)
        if self.film is None:
            return u
        gamma, beta = self.film(cond).unsqueeze(1).chunk(2, dim=-1)
        s = self.input_gate_of(u) if gate is None else gate
        assert s is not None  # FiLM comes with its input gate
        # u + s·(f − u) with f − u = γ·u + β.
        return torch.addcmul(u, s, torch.addcmul(beta, gamma, u))

    def input_gate_of(self, u: Tensor) -> Tensor | None:
        """The context-free fusion gate ``σ(W_s u + b_s)`` (``None`` without FiLM)."""
        return torch.sigmoid(self.input_gate(u)) if self.input_gate is not None else None

    def forward(self, u: Tensor, cond: Tensor, gate: Tensor | None = None) -> Routing:
        h = self.fused_input(u, cond, gate)
        z = self.gate(h)
        if self.training:
            if self.expert_dropout > 0:
                drop = torch.rand_like(z) < self.expert_dropout
                z = z.masked_fill(drop, float("-inf"))
            if self.noise is not None:
                z = z + torch.randn_like(z) * F.softplus(self.noise(h))
        values, indices = torch.topk(z, self.top_k, dim=-1)
        return Routing(logits=z, indices=indices, weights=topk_softmax(values))


def topk_softmax(values: Tensor) -> Tensor:
    """Softmax over the selected logits; selected logits at -inf get weight 0.

    A token whose every selected logit was dropped (possible only when expert dropout removes all but
    fewer than k experts) gets all-zero weights instead of NaN, so it passes through the shared expert
    and the anchor only.
    """
    dead = torch.isinf(values[..., :1]) & (values[..., :1] < 0)
    weights = torch.softmax(values.masked_fill(dead, 0.0), dim=-1)
    return weights.masked_fill(torch.isneginf(values), 0.0)


def load_balancing_loss(
    logits: Tensor, indices: Tensor, weights: Tensor, groups: int = 1, per_group: bool = False
) -> Tensor:
    """Switch-style balance term ``E · Σ_e f_e · P̄_e`` (without the 0.01 coefficient), mean over groups.

    ``f_e`` is the fraction of tokens whose top-k holds expert ``e`` with a positive weight and ``P̄_e``
    the mean full softmax over the E logits (-inf gives probability 0). ``groups`` splits the batch
    into equal consecutive parts that are balanced separately, as if each had been its own forward pass;
    ``per_group`` returns the (groups,) terms instead of their mean.
    """
    num_experts = logits.shape[-1]
    batch = logits.shape[0]
    if batch % groups:
        raise ValueError(f"batch of {batch} cannot be split into {groups} equal load-balancing groups")
    z = logits.reshape(groups, -1, num_experts)
    dead = torch.isneginf(z).all(dim=-1, keepdim=True)
    probs = torch.softmax(z.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    tokens = z.shape[1]
    idx = indices.reshape(groups, -1)
    used = (weights.reshape(groups, -1) > 0).to(probs.dtype)
    counts = probs.new_zeros(groups, num_experts).scatter_add_(1, idx, used)
    frac = counts / tokens
    terms = num_experts * (frac * probs.mean(dim=1)).sum(dim=-1)
    return terms if per_group else terms.mean()
