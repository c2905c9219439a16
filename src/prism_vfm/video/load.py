"""VidPrism's checkpoints as sources of ``prism_vfm.load``: ``save_pretrained`` folders (and training-run
checkpoints, which hold the same ``config.json``) and released training checkpoints.

Importing this module registers them (:func:`prism_vfm.models.load.register_source_kind`); ``prism_vfm``
imports it, so ``prism_vfm.load(source)`` reads PRISM and VidPrism checkpoints alike, with the same load
report and the same refusal to leave entries at their random initialisation unless ``allow_fresh`` names
them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from prism_vfm.models.load import LoadReport, SourceKind, fill_from_state, register_source_kind
from prism_vfm.utils.io import read_safetensors_file
from prism_vfm.video.backbone import tower_state_dict
from prism_vfm.video.feature_model import FeatureClassifier
from prism_vfm.video.model import VidPrism, infer_tower_config, read_released_checkpoint
from prism_vfm.video.official import load_official_head

# What VidPrism's config.json holds (and PRISM's never does): the frame tower and the head.
_CONFIG_KEYS = {"tower", "head"}
_RELEASED_KEYS = {"model_state_dict", "fusion_model_state_dict"}


def _frame_size(overrides: dict[str, Any], where: object) -> dict[str, Any]:
    """``load``'s ``img_size`` (H, W) as VidPrism's square frame side."""
    size = overrides.get("img_size")
    if size is None or isinstance(size, int):
        return overrides
    h, w = size
    if h != w:
        raise ValueError(f"{where}: VidPrism frames are square; img_size={tuple(size)} is not")
    return {**overrides, "img_size": int(h)}


def load_folder(
    folder: Path, config: dict[str, Any], kind: str, allow_fresh: Sequence[str], overrides: dict[str, Any]
) -> tuple[nn.Module, LoadReport]:
    """The :class:`VidPrism` a ``save_pretrained`` or run checkpoint folder holds, and its load report."""
    model = VidPrism(**{**config, **_frame_size(overrides, folder)})
    state = read_safetensors_file(folder / "model.safetensors")
    resampled = model.resample_state_dict(state)
    report = fill_from_state(model, state, str(folder), f"VidPrism {kind}", allow_fresh)
    report.resampled += resampled
    return model.eval(), report


def load_released(
    contents: Mapping[str, Any], where: str, allow_fresh: Sequence[str], overrides: dict[str, Any]
) -> tuple[nn.Module, LoadReport]:
    """The :class:`VidPrism` a released training checkpoint describes (as
    :meth:`VidPrism.from_released_checkpoint` builds it, without a text tower unless ``text_tower`` is
    given, whose entries must then be allowed fresh), and its load report."""
    vision, fusion = read_released_checkpoint(contents)
    head = load_official_head(fusion)
    model = VidPrism(infer_tower_config(vision), head=head.cfg, **_frame_size(overrides, where))
    state = {f"backbone.{k}": v for k, v in tower_state_dict(vision, model.backbone).items()}
    state.update({f"head.{k}": v for k, v in head.state_dict().items()})
    report = fill_from_state(model, state, where, "released VidPrism checkpoint", allow_fresh)
    # The CLIP text tower and anything else beside the vision tower: not part of the video model.
    report.ignored += sorted(k for k in vision if not k.startswith("visual.") and k != "logit_scale")
    if "logit_scale" in vision:
        model.released_logit_scale = float(vision["logit_scale"])
    return model.eval(), report


VIDPRISM = register_source_kind(
    SourceKind(
        name="VidPrism",
        describes_folder=lambda config: _CONFIG_KEYS <= config.keys(),
        load_folder=load_folder,
        describes_file=lambda contents: _RELEASED_KEYS <= contents.keys(),
        load_file=load_released,
    )
)


def load_head_folder(
    folder: Path, config: dict[str, Any], kind: str, allow_fresh: Sequence[str], overrides: dict[str, Any]
) -> tuple[nn.Module, LoadReport]:
    """The :class:`FeatureClassifier` (a temporal head on cached frame features) a folder holds."""
    if overrides:
        raise ValueError(f"{folder}: a head on frame features takes no load options, got {sorted(overrides)}")
    model = FeatureClassifier(**config)
    state = read_safetensors_file(folder / "model.safetensors")
    report = fill_from_state(model, state, str(folder), f"VidPrism head-only {kind}", allow_fresh)
    return model.eval(), report


HEAD_ONLY = register_source_kind(
    SourceKind(
        name="VidPrism head on frame features",
        describes_folder=lambda config: {"kind", "head"} <= config.keys() and "tower" not in config,
        load_folder=load_head_folder,
        describes_file=lambda contents: False,
        load_file=load_released,
    )
)
