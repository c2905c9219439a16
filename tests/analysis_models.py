"""Tiny students whose routing and λ are set by hand, so every analysis has a known answer."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from prism_vfm import PrismViT
from prism_vfm.models.prism_vit import ContextKind
from tests.tiny import tiny_student

# 3 teacher contexts, 6 experts, top-2, dual-stream blocks 1 and 3.
ANALYSIS_TINY = dict(num_experts=6, top_k=2, teacher_dims=(16, 16, 16))


def analysis_student(**overrides) -> PrismViT:
    return tiny_student(**{**ANALYSIS_TINY, **overrides}).eval()


@torch.no_grad()
def route_by_context(
    student: PrismViT, patterns: Mapping[int, Sequence[Sequence[int]]], kind: ContextKind = "teacher"
) -> PrismViT:
    """Make block ``b``'s router send every token of context ``c`` to experts ``patterns[b][c]``.

    Context ``c``'s embedding becomes the one-hot vector e_c; FiLM gives γ = −1 and β = c, the input gate
    is saturated open, so the router input is h = β = e_c whatever the token, and the gate's column c
    scores the chosen experts 10, 9, … and every other expert about 0.
    """
    dim = student.embed_dim
    table = student.context_table(kind)
    table.weight.zero_()
    for c in range(table.num_embeddings):
        table.weight[c, c] = 1.0
    for b, per_context in patterns.items():
        router = student.blocks[b].moe.router
        router.film.weight.zero_()
        router.film.bias.zero_()
        router.film.bias[:dim] = -1.0
        router.film.weight[dim:] = torch.eye(dim)
        router.input_gate.weight.zero_()
        router.input_gate.bias.fill_(100.0)
        router.gate.weight.zero_()
        router.gate.bias.copy_(-0.01 * torch.arange(router.num_experts, dtype=torch.float32))
        for c, experts in enumerate(per_context):
            for rank, e in enumerate(experts):
                router.gate.weight[e, c] = 10.0 - rank
    return student


@torch.no_grad()
def set_lambda(student: PrismViT, values: Mapping[int, float]) -> PrismViT:
    """Make block ``b``'s λ the constant ``values[b]`` (inside the block's λ range) for every token."""
    for b, value in values.items():
        block = student.blocks[b]
        lo, hi = block.lambda_range
        s = (value - lo) / (hi - lo)
        block.lambda_gate.weight.zero_()
        block.lambda_gate.bias.fill_(math.log(s / (1 - s)))
    return student


def image_batches(n_batches: int = 2, batch: int = 3, size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n_batches)]
