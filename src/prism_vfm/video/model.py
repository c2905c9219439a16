"""The whole VidPrism network: CLIP frame encoder → temporal head, plus an optional CLIP text tower.

``VidPrism`` saves and loads as ``config.json`` + ``model.safetensors`` (``save_pretrained`` /
``from_pretrained``), reads and writes the released training-checkpoint layout (``model_state_dict`` with
the CLIP tower under ``visual.*``, ``fusion_model_state_dict`` with the head; VIDPRISM_SPEC §3.1) with
``torch.load(weights_only=True)``, and applies the release's test-time weight blend with the original CLIP.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from prism_vfm.models.hub import HubMixin
from prism_vfm.models.prism_vit import resample_pos_embed
from prism_vfm.utils.io import atomic_torch_save, read_torch_file
from prism_vfm.utils.state_dict import check_keys
from prism_vfm.video.backbone import (
    CLIP_TOWERS,
    FrameEncoder,
    FrameFeatureCache,
    TowerConfig,
    load_tower_weights,
    read_clip_state_dict,
    released_tower_state_dict,
    tower_config,
    tower_state_dict,
)
from prism_vfm.video.config import HeadConfig
from prism_vfm.video.head import HeadOutput, VidPrismHead
from prism_vfm.video.official import load_official_head, to_released_state_dict
from prism_vfm.video.prompts import ENSEMBLE_28
from prism_vfm.video.text import (
    TextEncoder,
    TextTowerConfig,
    class_text_embeddings,
    cosine_logits,
    load_text_weights,
    text_tower_config,
)

# The release's test-time blend: backbone ← α·fine-tuned + (1 − α)·original CLIP.
RELEASED_BLEND_ALPHA = 0.99
# OpenAI CLIP's trained logit scale, ln(100); released checkpoints carry it in ``model_state_dict`` unused.
CLIP_LOGIT_SCALE = math.log(100.0)


def blend(finetuned: Tensor, original: Tensor, alpha: float = RELEASED_BLEND_ALPHA) -> Tensor:
    """α·fine-tuned + (1 − α)·original, evaluated in the release's order (bit-identical to it)."""
    return alpha * finetuned + (1 - alpha) * original


def head_config(head: HeadConfig | Mapping[str, Any] | None, dim: int) -> HeadConfig:
    """A :class:`HeadConfig` from a config, its dict (as ``config.json`` stores it) or None (defaults)."""
    if head is None:
        return HeadConfig(dim=dim)
    if isinstance(head, HeadConfig):
        return head
    return HeadConfig(**head)


class VidPrism(
    nn.Module,
    HubMixin,
    library_name="prism-vfm",
    tags=["vidprism", "video-classification", "clip", "mixture-of-experts"],
    license="mit",
):
    """CLIP vision tower on every frame, then the VidPrism head; optionally a CLIP text tower.

    Args:
        tower: the frame encoder, ``"ViT-B/16"`` (D = 512), ``"ViT-L/14"`` (D = 768) or a
            :class:`~prism_vfm.video.backbone.TowerConfig`.
        head: the head's :class:`~prism_vfm.video.config.HeadConfig`; its ``dim`` must equal the tower's D.
            Defaults to the released head (K400: 400 classes).
        text_tower: ``"ViT-B/16"`` / ``"ViT-L/14"`` / a ``TextTowerConfig`` to hold CLIP's text tower (for
            class text embeddings and zero-shot), or None. It is never trained.
        img_size: frame side (default the tower's, 224).
        grad_checkpointing: recompute each tower block in the backward pass (the release does).
        frozen_backbone: the tower takes no gradient and always runs in eval mode (head-only training;
            pair with :meth:`feature_cache` so frame features are computed once).
        pretrained: load OpenAI's weights of both towers from the Hugging Face Hub.

    ``model(frames)`` maps (B, T, 3, H, W) clips to the head's :class:`HeadOutput`.
    """

    def __init__(
        self,
        tower: str | TowerConfig | Mapping[str, Any] = "ViT-B/16",
        head: HeadConfig | Mapping[str, Any] | None = None,
        text_tower: str | TextTowerConfig | Mapping[str, Any] | None = None,
        img_size: int | None = None,
        grad_checkpointing: bool = False,
        frozen_backbone: bool = False,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = FrameEncoder(
            tower_config(tower),
            img_size=img_size,
            pretrained=pretrained,
            grad_checkpointing=grad_checkpointing,
        )
        cfg = head_config(head, self.backbone.output_dim)
        if cfg.dim != self.backbone.output_dim:
            raise ValueError(
                f"head dim {cfg.dim} does not match the frame encoder's output dim {self.backbone.output_dim}"
            )
        self.head = VidPrismHead(cfg)
        self.text: TextEncoder | None = None
        if text_tower is not None:
            self.text = TextEncoder(text_tower_config(text_tower))
            if pretrained:
                load_text_weights(self.text, "hub")
            self.text.requires_grad_(False).eval()
        self.frozen_backbone = frozen_backbone
        if frozen_backbone:
            self.backbone.freeze()
        self.released_logit_scale = CLIP_LOGIT_SCALE
        config = getattr(self, "_hub_mixin_config", None)
        if isinstance(config, dict):
            # config.json names the resolved architecture; the weights come with it, so a saved model
            # never downloads the hub's again.
            config.update(tower=asdict(self.backbone.config), head=asdict(cfg), img_size=None)
            config.update(text_tower=None if self.text is None else asdict(self.text.config))
            config.pop("pretrained", None)

    # ------------------------------------------------------------------------------------- forward
    def train(self, mode: bool = True) -> VidPrism:
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()
        if self.text is not None:
            self.text.eval()
        return self

    def encode_frames(self, frames: Tensor) -> Tensor:
        """(B, T, 3, H, W) clips → (B, T, D) frame features (without autograd when the tower is frozen)."""
        if self.frozen_backbone:
            with torch.no_grad():
                return self.backbone(frames)
        return self.backbone(frames)

    def forward(self, frames: Tensor, class_text: Tensor | None = None) -> HeadOutput:
        """The head's output for (B, T, 3, H, W) clips; ``class_text`` (C, D) for the text variant."""
        return self.head(self.encode_frames(frames), class_text)

    def feature_cache(self, root: str | os.PathLike) -> FrameFeatureCache:
        """A disk cache of this frozen tower's frame features (see ``FrameFeatureCache``)."""
        if not self.frozen_backbone:
            raise ValueError("frame features are cached only for a frozen backbone (frozen_backbone=True)")
        return FrameFeatureCache(root, self.backbone)

    # ---------------------------------------------------------------------------------- conveniences
    def class_text_embeddings(
        self,
        class_names: Sequence[str],
        templates: Sequence[str] = ENSEMBLE_28,
        cache_dir: str | os.PathLike | None = None,
    ) -> Tensor:
        """(C, D) prompt-ensemble embeddings of ``class_names`` from this model's text tower."""
        if self.text is None:
            raise ValueError("this model has no text tower; build it with text_tower='ViT-B/16' (or L/14)")
        return class_text_embeddings(self.text, class_names, templates, cache_dir=cache_dir)

    @torch.no_grad()
    def classify(self, clips: Tensor, class_text: Tensor | None = None) -> Tensor:
        """Class probabilities (B, C) of (B, T, 3, H, W) clips or (B, V, T, 3, H, W) views of each clip.

        As the release evaluates: logits averaged over the views, then softmax.
        """
        views = clips if clips.ndim == 6 else clips.unsqueeze(1)
        b, v = views.shape[:2]
        logits = self(views.flatten(0, 1), class_text).logits
        return logits.view(b, v, -1).mean(dim=1).softmax(dim=-1)

    @torch.no_grad()
    def zero_shot(
        self,
        clips: Tensor,
        class_names: Sequence[str] | None = None,
        *,
        class_text: Tensor | None = None,
        templates: Sequence[str] = ENSEMBLE_28,
        cache_dir: str | os.PathLike | None = None,
    ) -> Tensor:
        """Probabilities (B, C) over ``class_names`` (or given ``class_text``), by text similarity.

        Scores are cos(z, t_c) with no temperature, averaged over views and softmaxed (the release's
        zero-shot protocol). Clips are (B, T, 3, H, W) or (B, V, T, 3, H, W).
        """
        if class_text is None:
            if class_names is None:
                raise ValueError("zero_shot needs class_names or class_text")
            class_text = self.class_text_embeddings(class_names, templates, cache_dir)
        views = clips if clips.ndim == 6 else clips.unsqueeze(1)
        b, v = views.shape[:2]
        out = self(views.flatten(0, 1), class_text.to(views.device))
        if self.head.cfg.variant == "text":
            scores = out.logits
        elif out.embedding is not None:
            scores = cosine_logits(out.embedding, class_text.to(out.embedding))
        else:
            raise ValueError("the VideoMAE-feature head has no projection to compare with text embeddings")
        return scores.view(b, v, -1).mean(dim=1).softmax(dim=-1)

    def param_groups(self, lr: float, backbone_ratio: float) -> list[dict[str, Any]]:
        """AdamW groups as released: the tower at ``lr × backbone_ratio``, the head at ``lr``."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        groups = [{"params": list(self.head.parameters()), "lr": lr}]
        if backbone:
            groups.insert(0, {"params": backbone, "lr": lr * backbone_ratio})
        return groups

    # -------------------------------------------------------------------------- the test-time blend
    @torch.no_grad()
    def blend_backbone(
        self,
        original: FrameEncoder | Mapping[str, Tensor] | str | os.PathLike,
        alpha: float = RELEASED_BLEND_ALPHA,
        *,
        allow_torchscript: bool = False,
    ) -> VidPrism:
        """Set the tower to α·fine-tuned + (1 − α)·original CLIP (the release's test-time patch; α = 0.99).

        ``original`` is a frame encoder, a CLIP state dict (any layout ``load_tower_weights`` reads) or a
        file. The head is left as it is.
        """
        if isinstance(original, FrameEncoder):
            state = original.state_dict()
        else:
            raw = (
                read_clip_state_dict(original, allow_torchscript=allow_torchscript)
                if isinstance(original, (str, os.PathLike))
                else dict(original)
            )
            state = tower_state_dict(raw, self.backbone)
        own = self.backbone.state_dict()
        check_keys(own, state, "the original CLIP weights")
        for key, value in own.items():
            value.copy_(blend(value, state[key].to(value), alpha))
        return self

    # ------------------------------------------------------------------- released checkpoint layout
    @classmethod
    def from_released_checkpoint(
        cls,
        source: str | os.PathLike | Mapping[str, Any],
        *,
        text_tower: str | TextTowerConfig | None = None,
        text_weights: str | os.PathLike | Mapping[str, Tensor] = "hub",
        allow_torchscript: bool = False,
        grad_checkpointing: bool = False,
        **head_options: Any,
    ) -> VidPrism:
        """The model a released training checkpoint describes (tower geometry and head read from its keys).

        ``source`` is a ``.pt``/``.pth`` file (read with ``weights_only=True``) or its loaded dict holding
        ``model_state_dict`` and ``fusion_model_state_dict``. A checkpoint holds no text tower: with
        ``text_tower`` set, its weights come from ``text_weights`` (``"hub"``, a CLIP file or a state dict;
        ``allow_torchscript`` for OpenAI's ``.pt``). ``head_options`` are further ``HeadConfig`` fields
        (named options such as ``dbi_update="sum"``). Returned in eval mode.
        """
        vision, fusion = read_released_checkpoint(source)
        head = load_official_head(fusion, **head_options)
        model = cls(
            infer_tower_config(vision),
            head=head.cfg,
            text_tower=text_tower,
            grad_checkpointing=grad_checkpointing,
        )
        load_tower_weights(model.backbone, vision)
        model.head.load_state_dict(head.state_dict())
        if model.text is not None:
            load_text_weights(model.text, text_weights, allow_torchscript=allow_torchscript)
        if "logit_scale" in vision:
            model.released_logit_scale = float(vision["logit_scale"])
        return model.eval()

    def released_checkpoint(self) -> dict[str, dict[str, Tensor]]:
        """``{"model_state_dict": ..., "fusion_model_state_dict": ...}`` in the release's key names."""
        vision = released_tower_state_dict(self.backbone)
        vision["logit_scale"] = torch.tensor(self.released_logit_scale, dtype=torch.float32)
        return {
            "model_state_dict": vision,
            "fusion_model_state_dict": to_released_state_dict(self.head),
        }

    def save_released_checkpoint(self, path: str | os.PathLike) -> Path:
        """Write :meth:`released_checkpoint` with ``torch.save`` (atomically)."""
        return atomic_torch_save(self.released_checkpoint(), path)

    # --------------------------------------------------------------------------------- hub loading
    def load_state_dict_resampled(
        self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False
    ) -> Any:
        """``load_state_dict`` that resamples the tower's positional table to this model's frame size."""
        state_dict = dict(state_dict)
        self.resample_state_dict(state_dict)
        return self.load_state_dict(state_dict, strict=strict, assign=assign)

    def resample_state_dict(self, state_dict: dict[str, Tensor]) -> list[str]:
        """Resample, in place, a saved positional table of another frame size to this model's; the keys
        resampled."""
        key = "backbone.tower.pos_embed"
        own = cast(Tensor, self.backbone.tower.pos_embed)
        if key not in state_dict or state_dict[key].shape == own.shape:
            return []
        state_dict[key] = resample_pos_embed(state_dict[key], self.backbone.tower.patch_embed.grid_size)
        return [key]


def read_released_checkpoint(
    source: str | os.PathLike | Mapping[str, Any],
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(``model_state_dict``, ``fusion_model_state_dict``) of a released checkpoint, DDP prefixes removed."""
    where = "the given checkpoint"
    if isinstance(source, Mapping):
        ckpt: Any = source
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"VidPrism checkpoint {path.name!r} not found in {path.parent.resolve()}")
        ckpt = read_torch_file(path)
    if not isinstance(ckpt, Mapping) or not {"model_state_dict", "fusion_model_state_dict"} <= ckpt.keys():
        found = sorted(ckpt.keys()) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise ValueError(
            f"{where} is not a released VidPrism checkpoint: expected the entries 'model_state_dict' and "
            f"'fusion_model_state_dict', found {found}"
        )
    parts = []
    for name in ("model_state_dict", "fusion_model_state_dict"):
        state = dict(ckpt[name])
        if state and all(k.startswith("module.") for k in state):
            state = {k[len("module.") :]: v for k, v in state.items()}
        parts.append(state)
    return parts[0], parts[1]


def infer_tower_config(vision: Mapping[str, Tensor]) -> TowerConfig:
    """The CLIP tower geometry of a ``visual.*`` state dict (heads = width / 64, as OpenAI's builder)."""
    try:
        conv = vision["visual.conv1.weight"]
        pos = vision["visual.positional_embedding"]
        proj = vision["visual.proj"]
    except KeyError as exc:
        raise ValueError(
            f"model_state_dict has no CLIP vision tower entry {exc.args[0]!r} "
            f"(first keys: {sorted(vision)[:5]})"
        ) from None
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    depth = len({k.split(".")[3] for k in vision if k.startswith("visual.transformer.resblocks.")})
    grid = round((pos.shape[0] - 1) ** 0.5)
    found = TowerConfig(patch, width, depth, width // 64, int(proj.shape[1]), img_size=grid * patch)
    for preset in CLIP_TOWERS.values():
        if asdict(preset) == {**asdict(found), "timm_name": preset.timm_name}:
            return preset
    return found
