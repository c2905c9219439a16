"""timm registrations of the PRISM students and the Stage-1 presets of SPEC §6.

Importing :mod:`prism_vfm` registers ``prism_vit_{tiny,small,base,large}_patch16_384`` with timm::

    import prism_vfm, timm
    model = timm.create_model("prism_vit_base_patch16_384", pretrained=False, img_size=224)

``pretrained=True`` starts from the ImageNet-21k AugReg ViT weights the official runs start from: the
pretrained MLP of every dual-stream block becomes its anchor, its shared expert and each routed expert.
"""

from __future__ import annotations

import re
from typing import Any, cast

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor

from prism_vfm.layers.net2net import resize_mlp_param
from prism_vfm.models.prism_vit import PrismViT, resample_pos_embed

# Student architecture and teacher widths of the published Stage-1 presets (SPEC §6).
STUDENT_PRESETS: dict[str, dict[str, Any]] = {
    "BB": {"model": "prism_vit_base_patch16_384", "teacher_dims": (768, 768, 768)},
    "BS": {"model": "prism_vit_small_patch16_384", "teacher_dims": (768, 768, 768)},
    "LB": {"model": "prism_vit_base_patch16_384", "teacher_dims": (1024, 1024, 1024)},
    "LL": {"model": "prism_vit_large_patch16_384", "teacher_dims": (1024, 1024, 1024)},
}

_ARCHS: dict[str, dict[str, Any]] = {
    "prism_vit_tiny_patch16_384": dict(embed_dim=192, depth=12, num_heads=3, moe_layers=(2, 5, 8, 11)),
    "prism_vit_small_patch16_384": dict(embed_dim=384, depth=12, num_heads=6, moe_layers=(2, 5, 8, 11)),
    "prism_vit_base_patch16_384": dict(embed_dim=768, depth=12, num_heads=12, moe_layers=(2, 5, 8, 11)),
    "prism_vit_large_patch16_384": dict(embed_dim=1024, depth=24, num_heads=16, moe_layers=(5, 11, 17, 23)),
}

_AUGREG = {
    "prism_vit_tiny_patch16_384": "timm/vit_tiny_patch16_224.augreg_in21k",
    "prism_vit_small_patch16_384": "timm/vit_small_patch16_224.augreg_in21k",
    "prism_vit_base_patch16_384": "timm/vit_base_patch16_224.augreg_in21k",
    "prism_vit_large_patch16_384": "timm/vit_large_patch16_224.augreg_in21k",
}


def student_architecture(name: str) -> dict[str, Any]:
    """The :class:`PrismViT` arguments a registered ``prism_vit_*`` name fixes (width, depth, blocks)."""
    if name not in _ARCHS:
        raise ValueError(f"unknown student model {name!r}; expected one of {sorted(_ARCHS)}")
    return dict(_ARCHS[name])


def _cfg(hf_hub_id: str) -> dict[str, Any]:
    return dict(
        hf_hub_id=hf_hub_id,
        num_classes=0,
        input_size=(3, 384, 384),
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        interpolation="bicubic",
        license="apache-2.0",
    )


default_cfgs = generate_default_cfgs({f"{name}.augreg_in21k": _cfg(hub) for name, hub in _AUGREG.items()})


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: PrismViT) -> dict[str, Tensor]:
    """Turn a plain timm ViT state dict (or an official PRISM one) into ``model``'s keys.

    A dense ViT's MLP in a dual-stream block is copied into the anchor, the shared expert and every routed
    expert (resized by :func:`resize_mlp_param` where their width differs); in a widened block it is
    Net2Net-tiled. Modules a dense ViT lacks (router, λ gate, context tables, projectors) keep ``model``'s
    initialisation; the classifier head is dropped; ``pos_embed`` is resampled to the model's grid. A
    PRISM checkpoint's (ours or official) anchors initialise the MLPs of a student whose blocks there are
    dense or wide.
    """
    from prism_vfm.compat.official import official_to_ours, read_official

    # A training checkpoint holds the state dict under "model".
    state_dict = cast("dict[str, Tensor]", state_dict.get("model", state_dict))
    if any(k.startswith(("backbone.pos_embed", "backbone.backbone.")) for k in state_dict):
        converted = official_to_ours(read_official(state_dict).student)
        if all(i in model.moe_layers for i in _dual_stream_indices(converted)):
            return converted
        state_dict = converted
    state_dict = _anchors_as_mlps(state_dict, model)
    own = model.state_dict()
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        m = re.match(r"^blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$", key)
        if m and int(m.group(1)) in model.moe_layers:
            block, fc, kind = int(m.group(1)), m.group(2), m.group(3)
            if f"blocks.{block}.anchor.{fc}.{kind}" in own:
                out[f"blocks.{block}.anchor.{fc}.{kind}"] = value
            hidden = own[f"blocks.{block}.moe.experts.w1"].shape[-1]
            value = resize_mlp_param(f"{fc}.{kind}", value, hidden)
            if f"blocks.{block}.moe.shared.{fc}.{kind}" in own:
                out[f"blocks.{block}.moe.shared.{fc}.{kind}"] = value
            stacked = own[f"blocks.{block}.moe.experts.{'w' if kind == 'weight' else 'b'}{fc[-1]}"]
            value = value.t() if kind == "weight" else value
            out[f"blocks.{block}.moe.experts.{'w' if kind == 'weight' else 'b'}{fc[-1]}"] = (
                value.unsqueeze(0).expand_as(stacked).clone()
            )
        elif m and int(m.group(1)) in model.wide_layers:
            out[key] = resize_mlp_param(f"{m.group(2)}.{m.group(3)}", value, model.wide_hidden)
        elif key in own:
            out[key] = value
    if "pos_embed" in out and out["pos_embed"].shape != own["pos_embed"].shape:
        out["pos_embed"] = resample_pos_embed(
            out["pos_embed"], model.patch_embed.grid_size, model.num_prefix_tokens
        )
    for key, value in own.items():
        out.setdefault(key, value)
    return out


def _dual_stream_indices(state_dict: dict[str, Tensor]) -> set[int]:
    return {int(m.group(1)) for k in state_dict if (m := re.match(r"^blocks\.(\d+)\.anchor\.", k))}


def _anchors_as_mlps(state_dict: dict[str, Tensor], model: PrismViT) -> dict[str, Tensor]:
    """``blocks.{i}.anchor.*`` renamed ``blocks.{i}.mlp.*`` where ``model``'s block ``i`` is dense."""
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"^blocks\.(\d+)\.anchor\.(.*)$", key)
        if m is not None and int(m.group(1)) not in model.moe_layers:
            out[f"blocks.{m.group(1)}.mlp.{m.group(2)}"] = value
        else:
            out[key] = value
    return out


def _create(variant: str, pretrained: bool, **kwargs: Any) -> PrismViT:
    args = {**_ARCHS[variant], **kwargs}
    return build_model_with_cfg(
        PrismViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **args
    )


@register_model
def prism_vit_tiny_patch16_384(pretrained: bool = False, **kwargs: Any) -> PrismViT:
    """PRISM ViT-Ti/16 student (width 192), dual-stream blocks [2, 5, 8, 11]."""
    return _create("prism_vit_tiny_patch16_384", pretrained, **kwargs)


@register_model
def prism_vit_small_patch16_384(pretrained: bool = False, **kwargs: Any) -> PrismViT:
    """PRISM ViT-S/16 student (width 384), dual-stream blocks [2, 5, 8, 11] (preset BS)."""
    return _create("prism_vit_small_patch16_384", pretrained, **kwargs)


@register_model
def prism_vit_base_patch16_384(pretrained: bool = False, **kwargs: Any) -> PrismViT:
    """PRISM ViT-B/16 student (width 768), dual-stream blocks [2, 5, 8, 11] (presets BB, LB)."""
    return _create("prism_vit_base_patch16_384", pretrained, **kwargs)


@register_model
def prism_vit_large_patch16_384(pretrained: bool = False, **kwargs: Any) -> PrismViT:
    """PRISM ViT-L/16 student (width 1024), dual-stream blocks [5, 11, 17, 23] (preset LL)."""
    return _create("prism_vit_large_patch16_384", pretrained, **kwargs)


def create_student(preset: str, pretrained: bool = False, **kwargs: Any) -> PrismViT:
    """The student of a Stage-1 preset (``BB``, ``BS``, ``LB``, ``LL``); ``kwargs`` override its arguments."""
    import timm

    if preset not in STUDENT_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(STUDENT_PRESETS)}")
    spec = dict(STUDENT_PRESETS[preset])
    name = spec.pop("model")
    # Every preset names one of the PrismViT models registered above.
    return cast(PrismViT, timm.create_model(name, pretrained=pretrained, **{**spec, **kwargs}))
