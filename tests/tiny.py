"""Tiny student configurations that run in milliseconds on a CPU."""

from __future__ import annotations

from prism_vfm import PrismViT

TINY = dict(
    img_size=32,
    patch_size=8,
    embed_dim=32,
    depth=4,
    num_heads=2,
    moe_layers=(1, 3),
    teacher_dims=(16, 24, 16),
    num_experts=5,
    top_k=2,
)


def tiny_student(**overrides) -> PrismViT:
    return PrismViT(**{**TINY, **overrides})
