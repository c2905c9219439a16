"""Build and initialise the Stage-1 student from its configuration."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import cast

import timm

from prism_vfm.distill.config import StudentConfig
from prism_vfm.models.load import load_into
from prism_vfm.models.prism_vit import PrismViT

logger = logging.getLogger(__name__)


def build_student(cfg: StudentConfig, teacher_dims: Sequence[int]) -> PrismViT:
    """The student with one projector per (teacher, tap), initialised as ``cfg.init`` says.

    ``init``: ``"timm"`` (AugReg ViT weights from the Hub), ``"none"`` (random), or any source
    :func:`prism_vfm.models.load.load_into` reads: a run or checkpoint folder, a ``save_pretrained`` folder,
    an official PRISM ``.pth``, or a timm ViT state dict (``.pth`` or ``.safetensors``). An entry the source
    does not fill (e.g. projector heads for teachers of another width) is an error unless
    ``cfg.init_fresh`` names it (e.g. ``("projectors.*",)``).
    """
    kwargs = dict(cfg.overrides, img_size=cfg.img_size, teacher_dims=tuple(teacher_dims))
    if cfg.init in ("timm", "none"):
        return cast(PrismViT, timm.create_model(cfg.model, pretrained=cfg.init == "timm", **kwargs))
    # cfg.model names one of the registered PrismViT students.
    model = cast(PrismViT, timm.create_model(cfg.model, pretrained=False, **kwargs))
    report = load_into(model, cfg.init, allow_fresh=cfg.init_fresh)
    logger.info("student.init: %s", report.summary())
    return model
