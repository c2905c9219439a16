"""The conditioned Mixture-of-Experts FFN: router, routed experts, shared expert, load balancing (SPEC §4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from timm.layers import Mlp
from torch import Tensor, nn

from prism_vfm.layers.experts import GroupedExperts, sort_by_expert
from prism_vfm.layers.net2net import resize_mlp_param
from prism_vfm.layers.router import ConditionedRouter, Routing, load_balancing_loss


@dataclass(frozen=True)
class MoEConfig:
    """Arguments of one conditioned MoE layer; the defaults are the released PRISM models'."""

    num_experts: int = 15
    top_k: int = 3
    expert_mlp_ratio: float = 4.0
    shared_expert: bool = True
    # How the context enters the router: "film" (PRISM), "concat" (w/o FiLM), "none" (vanilla MoE).
    conditioning: str = "film"
    expert_dropout: float = 0.1
    noisy_gating: bool = True
    # Official: each selected expert sees its input scaled by its routing weight as well as having its
    # output scaled ("double weighting"); the released checkpoints were trained that way.
    double_weighting: bool = True
    lb_coef: float = 0.01
    backend: str = "auto"
    # "copy": every expert starts as the block's dense MLP (the released models, which start from pretrained
    # weights); "random": independently initialised experts, so that from a random student the routing has
    # a difference between experts to learn from.
    expert_init: str = "copy"


EXPERT_INITS = ("copy", "random")


class ConditionedMoE(nn.Module):
    """``M(u, c) = Shared(u) + Σ_j w_j · E_{i_j}(w_j · u)`` with a context-conditioned top-k router."""

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        if cfg.expert_init not in EXPERT_INITS:
            raise ValueError(f"expert_init must be one of {EXPERT_INITS}, got {cfg.expert_init!r}")
        self.cfg = cfg
        hidden = int(dim * cfg.expert_mlp_ratio)
        self.router = ConditionedRouter(
            dim,
            cfg.num_experts,
            cfg.top_k,
            expert_dropout=cfg.expert_dropout,
            noisy_gating=cfg.noisy_gating,
            conditioning=cfg.conditioning,
        )
        self.experts = GroupedExperts(cfg.num_experts, dim, hidden, backend=cfg.backend)
        self.shared = Mlp(dim, hidden) if cfg.shared_expert else None

    def forward(
        self, u: Tensor, cond: Tensor, lb_groups: int = 1, per_group: bool = False
    ) -> tuple[Tensor, Routing, Tensor]:
        """Mix tokens ``u`` (B, N, D) under per-sample contexts ``cond`` (B, D).

        Returns the output (B, N, D), the routing decisions, and the load-balancing loss (already
        multiplied by ``lb_coef``; zero in eval mode), per load-balancing group if ``per_group``.
        """
        routing = self.router(u, cond)
        shared = self.shared(u) if self.shared is not None else None
        out = self.routed(u, routing.indices, routing.weights, shared)
        return out, routing, self.balance_loss(routing, lb_groups, per_group)

    def balance_loss(self, routing: Routing, groups: int = 1, per_group: bool = False) -> Tensor:
        """``lb_coef`` × the load-balancing loss of ``routing`` (zero in eval mode or with ``lb_coef=0``),
        balanced over ``groups`` equal parts of the batch: their mean, or one term each with ``per_group``."""
        if not (self.training and self.cfg.lb_coef):
            return routing.logits.new_zeros((groups,) if per_group else (), dtype=torch.float32)
        return self.cfg.lb_coef * load_balancing_loss(
            routing.logits, routing.indices, routing.weights, groups=groups, per_group=per_group
        )

    def routed(self, u: Tensor, indices: Tensor, weights: Tensor, shared: Tensor | None = None) -> Tensor:
        """Weighted sum of the selected experts for every token (dropless, sorted by expert).

        ``shared`` (the shared expert's output, shaped like ``u``) is added to it when given, inside the
        same batched product.
        """
        shape = u.shape
        k = indices.shape[-1]
        tokens = u.reshape(-1, shape[-1])
        order, expert_ids, counts = sort_by_expert(indices, self.cfg.num_experts)
        x = _GatherSlots.apply(tokens, order, k)
        if self.cfg.double_weighting:
            x = x * weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(x.dtype)
        y = self.experts(x, expert_ids, counts)
        # Back to (token, slot) order with a permutation (deterministic, no atomics); the weighted sum over
        # the k slots is then one small matrix product per token, cheaper than scaling and summing apart.
        y = y.new_empty(y.shape).index_copy_(0, order, y).view(-1, k, shape[-1])
        w = weights.reshape(-1, 1, k).to(y.dtype)
        if shared is None:
            return torch.bmm(w, y).view(shape)
        return torch.baddbmm(shared.reshape(-1, 1, shape[-1]).to(y.dtype), w, y).view(shape)

    @torch.no_grad()
    def init_from_mlp(self, mlp: Mlp) -> None:
        """Start the shared and every routed expert as copies of a pretrained dense MLP (exact when the
        widths agree; see :func:`resize_mlp_param` otherwise)."""
        # timm types the layers as Conv2d | Linear; a token MLP (use_conv=False) has nn.Linear ones.
        self.experts.copy_from_mlp(cast(nn.Linear, mlp.fc1), cast(nn.Linear, mlp.fc2))
        if self.shared is not None:
            hidden = cast(nn.Linear, self.shared.fc1).out_features
            resized = {k: resize_mlp_param(k, v, hidden) for k, v in mlp.state_dict().items()}
            self.shared.load_state_dict(resized)


class _GatherSlots(torch.autograd.Function):
    """``tokens[order // k]``: every token gathered once per slot, in the expert-sorted ``order``.

    ``order`` is a permutation of the (token, slot) pairs, so the backward is a gather by the inverse
    permutation and a sum over each token's k slots, instead of autograd's scatter-add (serial on the
    CPU, atomic and non-deterministic on the GPU).
    """

    @staticmethod
    def forward(ctx: Any, tokens: Tensor, order: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(order)
        ctx.k = k
        return tokens.index_select(0, torch.div(order, k, rounding_mode="floor"))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        (order,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        grad = grad.index_select(0, inverse).view(-1, ctx.k, grad.shape[-1]).sum(dim=1)
        return grad, None, None
