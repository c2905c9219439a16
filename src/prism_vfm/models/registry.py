"""timm registrations of the PRISM students and the Stage-1 presets of SPEC §6.

Importing :mod:`prism_vfm` registers ``prism_vit_{tiny,small,base,large}_patch16_384`` with timm::

    import prism_vfm, timm
    model = timm.create_model("prism_vit_base_patch16_384", pretrained=False, img_size=224)
    backbone = timm.create_model("prism_vit_base_patch16_384", features_only=True, feature_cfg={"context": 0})

``pretrained=True`` starts from the ImageNet-21k AugReg ViT weights the official runs start from: the
pretrained MLP of every dual-stream block becomes its anchor, its shared expert and each routed expert.
The authors' released checkpoints are further tags (``prism_vit_base_patch16_384.prism_stage1``, …; see
``prism_vfm.models.load.RELEASED``): their student, architecture read from the file, loaded strictly::

    model = timm.create_model("prism_vit_base_patch16_384.prism_stage1", pretrained=True)
    model = timm.create_model("prism_vit_base_patch16_384.prism_stage1", pretrained=True,
                              pretrained_cfg_overlay=dict(file="prism_stage1_vit_b.pth"))  # a local copy
"""

from __future__ import annotations

from typing import Any, cast

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg

from prism_vfm.compat.official import infer_config, read_official
from prism_vfm.models.features import PrismFeatures
from prism_vfm.models.load import RELEASE_REPO, RELEASED, checkpoint_filter_fn, release_file
from prism_vfm.models.prism_vit import PrismViT
from prism_vfm.utils.io import read_torch_file

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


def _cfg(hf_hub_id: str, size: tuple[int, int] = (384, 384), **extra: Any) -> dict[str, Any]:
    cfg = dict(
        hf_hub_id=hf_hub_id,
        num_classes=0,
        input_size=(3, *size),
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        interpolation="bicubic",
        license="apache-2.0",
    )
    return {**cfg, **extra}


# AugReg tags: the initialisation of Stage 1 (a plain ViT; the dual-stream modules start fresh). Release
# tags: the authors' PRISM checkpoints (student only; Stage-2 decoder heads are left out), MIT licensed.
default_cfgs = generate_default_cfgs(
    {
        **{f"{name}.augreg_in21k": _cfg(hub) for name, hub in _AUGREG.items()},
        **{
            f"{name}.{tag}": _cfg(
                RELEASE_REPO, size, hf_hub_filename=file, license="mit", description=f"PRISM {what}"
            )
            for name, tags in RELEASED.items()
            for tag, (file, size, what) in tags.items()
        },
    }
)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> PrismViT:
    args = {**_ARCHS[variant], **kwargs}
    if pretrained:
        cfg = resolve_pretrained_cfg(
            variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay")
        )
        if cfg.tag in RELEASED.get(variant, {}):
            return _create_released(variant, cfg, args)
    return build_model_with_cfg(
        PrismViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=_feature_cfg(args),
        **args,
    )


def _feature_cfg(args: dict[str, Any]) -> dict[str, Any]:
    """What ``features_only=True`` builds (``args``' own ``feature_cfg`` taken out and merged in): the
    feature taps by default, through ``forward_intermediates``, which takes the context."""
    taps = args.get("tap_layers") or args["moe_layers"]
    return {"feature_cls": PrismFeatures, "out_indices": tuple(taps), **(args.pop("feature_cfg", None) or {})}


def _create_released(variant: str, cfg: Any, args: dict[str, Any]) -> PrismViT:
    """A released checkpoint's student: architecture read from the file, weights loaded strictly
    (``checkpoint_filter_fn`` raises a ``LoadError`` listing any entry the file does not fill)."""
    state = read_torch_file(release_file(cfg, args.get("cache_dir")))
    arch = infer_config(read_official(state).student)
    for key in ("embed_dim", "depth"):
        if arch[key] != _ARCHS[variant][key]:
            raise ValueError(
                f"{cfg.file or cfg.hf_hub_filename} holds a student with {key}={arch[key]}, not the "
                f"{_ARCHS[variant][key]} of {variant}"
            )
    arch["img_size"] = tuple(cfg.input_size[-2:])
    args = {**arch, **{k: v for k, v in args.items() if k not in _ARCHS[variant]}}
    if args.get("features_only"):
        # timm wraps the model after loading it: hand it the weights through the configuration.
        args["pretrained_cfg_overlay"] = dict(args.get("pretrained_cfg_overlay") or {}, state_dict=state)
        model = build_model_with_cfg(
            PrismViT,
            variant,
            True,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=_feature_cfg(args),
            **args,
        )
        cast(dict, model.pretrained_cfg).pop("state_dict", None)  # keep no second copy of the weights
        return model
    with torch.device("meta"):  # every value comes from the file: no random initialisation to waste
        model = build_model_with_cfg(PrismViT, variant, False, feature_cfg=_feature_cfg(args), **args)
    model.load_state_dict(checkpoint_filter_fn(state, model), strict=True, assign=True)
    return model


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
