"""A temporal head alone, on cached frame features of a frozen encoder: VidPrism's head or a baseline.

``FeatureClassifier(kind, head)`` maps frame features (B, T, D) to the head's
:class:`~prism_vfm.video.head.HeadOutput`. It saves and loads as ``config.json`` + ``model.safetensors``
like :class:`~prism_vfm.video.model.VidPrism` (``prism_vfm.load`` reads its folders and training runs), and
is what ``prism video train`` trains when ``data.features`` names cached features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from torch import Tensor, nn

from prism_vfm.models.hub import HubMixin
from prism_vfm.video.baselines import MeanPoolHead, TemporalTransformerHead
from prism_vfm.video.config import HeadConfig
from prism_vfm.video.head import HeadOutput, VidPrismHead

HEAD_KINDS = ("vidprism", "mean_pool", "temporal_transformer")
"""The heads a :class:`FeatureClassifier` holds."""


class FeatureClassifier(
    nn.Module,
    HubMixin,
    library_name="prism-vfm",
    tags=["vidprism", "video-classification"],
    license="mit",
):
    """One temporal head on frame features (B, T, D).

    Args:
        kind: ``"vidprism"`` (:class:`VidPrismHead`), ``"mean_pool"`` or ``"temporal_transformer"``
            (:mod:`prism_vfm.video.baselines`).
        head: the :class:`HeadConfig` (or its dict); baselines use its ``dim``, ``num_classes``,
            ``num_heads`` and ``ffn_ratio``.
        num_frames: frames per clip (the temporal transformer's position table).
    """

    def __init__(
        self, kind: str = "vidprism", head: HeadConfig | Mapping[str, Any] | None = None, num_frames: int = 32
    ) -> None:
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"FeatureClassifier kind={kind!r}: expected one of {', '.join(HEAD_KINDS)}")
        cfg = head if isinstance(head, HeadConfig) else HeadConfig(**(head or {}))
        self.kind = kind
        self.head: VidPrismHead | MeanPoolHead | TemporalTransformerHead
        if kind == "vidprism":
            self.head = VidPrismHead(cfg)
        elif kind == "mean_pool":
            self.head = MeanPoolHead(cfg)
        else:
            self.head = TemporalTransformerHead(cfg, max_frames=num_frames)
        config = getattr(self, "_hub_mixin_config", None)
        if isinstance(config, dict):
            config.update(kind=kind, head=asdict(cfg), num_frames=num_frames)

    @property
    def cfg(self) -> HeadConfig:
        """The head's configuration."""
        return self.head.cfg

    def forward(
        self, features: Tensor, class_text: Tensor | None = None, drop_experts: Sequence[int] = ()
    ) -> HeadOutput:
        """The head's output for frame features (B, T, D); ``drop_experts`` only for VidPrism's head."""
        if isinstance(self.head, VidPrismHead):
            return self.head(features, class_text, drop_experts)
        if drop_experts:
            raise ValueError(f"the {self.kind} head has no experts to drop")
        return self.head(features, class_text)
