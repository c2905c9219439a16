"""Tiny student configurations that run in milliseconds on a CPU."""

from __future__ import annotations

import timm
from timm.models.vision_transformer import VisionTransformer

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


def tiny_dense_vit(**overrides) -> VisionTransformer:
    """A plain timm ViT of :data:`TINY`'s geometry: the dense model a student initialises from."""
    geometry = {k: TINY[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**geometry, **overrides})
