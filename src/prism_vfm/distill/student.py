"""Build and initialise the Stage-1 student from its configuration."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

import timm
import torch
from torch import Tensor

from prism_vfm.distill.config import StudentConfig
from prism_vfm.models.prism_vit import PrismViT
from prism_vfm.models.registry import checkpoint_filter_fn


def build_student(cfg: StudentConfig, teacher_dims: Sequence[int]) -> PrismViT:
    """The student with one projector per (teacher, tap), initialised as ``cfg.init`` says.

    ``init``: ``"timm"`` (AugReg ViT weights from the Hub), ``"none"`` (random), or a path to one of our
    ``save_pretrained`` folders, an official PRISM ``.pth``, or a timm ViT state dict
    (``.pth`` or ``.safetensors``).
    Projector heads whose teacher width differs from the checkpoint's keep their fresh initialisation.
    """
    kwargs = dict(cfg.overrides, img_size=cfg.img_size, teacher_dims=tuple(teacher_dims))
    if cfg.init in ("timm", "none"):
        return cast(PrismViT, timm.create_model(cfg.model, pretrained=cfg.init == "timm", **kwargs))
    # cfg.model names one of the registered PrismViT students.
    model = cast(PrismViT, timm.create_model(cfg.model, pretrained=False, **kwargs))
    path = Path(cfg.init)
    if path.is_dir():
        from safetensors.torch import load_file

        state = load_file(path / "model.safetensors")
    elif path.is_file():
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(
            f"student init {path} does not exist (expected 'timm', 'none', a folder or a file)"
        )
    # A training checkpoint holds the state dict under "model".
    state = cast("dict[str, Tensor]", state.get("model", state))
    if not any(k in state for k in ("pos_embed", "backbone.pos_embed", "backbone.backbone.pos_embed")):
        raise ValueError(f"student init {path} is not a ViT / PRISM state dict (no pos_embed entry)")
    converted = checkpoint_filter_fn(state, model)
    own = model.state_dict()
    kept = {k: v for k, v in converted.items() if k in own and v.shape == own[k].shape}
    if "pos_embed" in converted and converted["pos_embed"].shape != own["pos_embed"].shape:
        kept["pos_embed"] = converted["pos_embed"]
    model.load_state_dict_resampled(kept, strict=False)
    return model
