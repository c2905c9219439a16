"""The dual-stream block: attention, then a dense anchor MLP and a conditioned MoE mixed per token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from prism_vfm.layers.moe import ConditionedMoE, MoEConfig
from prism_vfm.layers.router import Routing


@dataclass
class BlockRouting(Routing):
    """A dual-stream block's routing decisions and its per-token λ (B, N, 1) (zero without an anchor).

    Part of the autograd graph like the rest of the forward's outputs: detach what is kept past the step.
    """

    lam: Tensor

    def rows(self, index: slice) -> BlockRouting:
        """The routing of some of the rows (samples) of the batch."""
        return BlockRouting(self.logits[index], self.indices[index], self.weights[index], self.lam[index])


# A pytree node, so that DDP, FSDP and torch.compile see the tensors inside the outputs that carry it.
torch.export.register_dataclass(BlockRouting)


class DualStreamBlock(nn.Module):
    """``y = x_a + λ·Anchor(u) + (1 − λ)·MoE(u, c)`` with ``u = LN2(x_a)``, ``x_a = x + Attn(LN1(x))``.

    λ is one scalar per token, ``lo + (hi − lo)·σ(w·u + b)``, not conditioned on the context. With
    ``anchor=False`` (the "w/o anchor" and vanilla-MoE ablations) the block has neither anchor nor λ gate:
    ``y = x_a + MoE(u, c)``, i.e. λ ≡ 0.
    """

    def __init__(
        self,
        block: Block,
        moe: MoEConfig,
        lambda_range: tuple[float, float] = (0.5, 1.0),
        lambda_bias_init: float = 2.0,
        anchor: bool = True,
    ) -> None:
        super().__init__()
        for name in ("ls1", "ls2", "drop_path1", "drop_path2"):
            if not isinstance(getattr(block, name, nn.Identity()), nn.Identity):
                raise ValueError(f"dual-stream blocks take no LayerScale or drop-path; the block has {name}")
        # timm types a Block's layers as nn.Module: a ViT block has a LayerNorm and an Mlp.
        dim = cast(nn.LayerNorm, block.norm1).normalized_shape[0]
        self.norm1 = block.norm1
        self.attn = block.attn
        self.norm2 = block.norm2
        mlp = cast(Mlp, block.mlp)
        self.anchor: Mlp | None = mlp if anchor else None
        self.moe = ConditionedMoE(dim, moe)
        if moe.expert_init == "copy":
            self.moe.init_from_mlp(mlp)
        self.lambda_gate = nn.Linear(dim, 1) if anchor else None
        if self.lambda_gate is not None:
            nn.init.constant_(self.lambda_gate.bias, lambda_bias_init)
        self.lambda_range = tuple(lambda_range)

    def mixing_weight(self, u: Tensor) -> Tensor:
        """Per-token λ (B, N, 1) in [lo, hi] (zero without an anchor)."""
        if self.lambda_gate is None:
            return u.new_zeros(*u.shape[:-1], 1)
        lo, hi = self.lambda_range
        return lo + (hi - lo) * torch.sigmoid(self.lambda_gate(u))

    def forward(
        self, x: Tensor, cond: Tensor, lb_groups: int = 1, per_group: bool = False
    ) -> tuple[Tensor, Tensor, BlockRouting]:
        """Returns the block output, this layer's load-balancing loss (per group if ``per_group``) and its
        routing with λ."""
        x = x + self.attn(self.norm1(x))
        u = self.norm2(x)
        lam = self.mixing_weight(u)
        moe_out, routing, aux = self.moe(u, cond, lb_groups, per_group)
        return x + self._mix(moe_out, u, lam), aux, BlockRouting(*_fields(routing), lam)

    def _mix(self, moe_out: Tensor, u: Tensor, lam: Tensor) -> Tensor:
        return moe_out if self.anchor is None else torch.lerp(moe_out, self.anchor(u), lam)

    def forward_contexts(
        self, x: Tensor, cond: Tensor, passes: int, per_group: bool = False
    ) -> tuple[Tensor, Tensor, BlockRouting]:
        """``passes`` context passes over the same tokens ``x`` (B, N, D); ``cond`` is (passes·B, D),
        context-major. Returns (passes·B, N, D), the load-balancing loss averaged over the passes (or one
        per pass, (passes,), with ``per_group``) and the routing with λ of all passes, context-major.

        Everything that does not depend on the context — attention, λ, the anchor, the shared expert and
        the router's input gate — is computed once; only the routing and the routed experts run per pass.
        """
        x = x + self.attn(self.norm1(x))
        u = self.norm2(x)
        lam = self.mixing_weight(u)
        anchor = self.anchor(u) if self.anchor is not None else None
        moe = self.moe
        shared = moe.shared(u) if moe.shared is not None else None

        def rep(t: Tensor) -> Tensor:
            return t.repeat(passes, 1, 1)

        u_all = rep(u)
        gate = moe.router.input_gate_of(u)
        routing = moe.router(u_all, cond, gate=None if gate is None else rep(gate))
        moe_out = moe.routed(u_all, routing.indices, routing.weights, None if shared is None else rep(shared))
        aux = moe.balance_loss(routing, passes, per_group)
        lam_all = rep(lam)
        if anchor is not None:
            moe_out = torch.lerp(moe_out, rep(anchor), lam_all)
        return rep(x) + moe_out, aux, BlockRouting(*_fields(routing), lam_all)


def _fields(routing: Routing) -> tuple[Tensor, Tensor, Tensor]:
    return routing.logits, routing.indices, routing.weights
