"""Baseline temporal heads on per-frame features (B, T, D), to measure VidPrism's head against.

- :class:`MeanPoolHead`: the image model's view of a clip — the mean frame feature, one projection, a
  classifier. Blind to order and to motion that leaves the mean frame unchanged.
- :class:`TemporalTransformerHead`: learned position embeddings and post-LN Transformer layers (the
  experts' block) over all frames, then the mean token, a LayerNorm and a classifier.

Both return the head's :class:`~prism_vfm.video.head.HeadOutput`, so the VidPrism trainer, loss and
evaluation take them unchanged: one "expert" (the whole head) with gate 1, no rank or diversity term.
The homogeneous-expert control is a VidPrism head with ``HeadConfig.shared_stream`` set.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prism_vfm.video.config import HeadConfig
from prism_vfm.video.experts import TemporalExpert
from prism_vfm.video.head import HeadOutput


def _output(tokens: Tensor, fused: Tensor, logits: Tensor) -> HeadOutput:
    batch, length = tokens.shape[:2]
    zero = fused.new_zeros(())
    return HeadOutput(
        logits=logits,
        gates=fused.new_ones(batch, 1),
        embedding=fused,
        fused=fused,
        expert_summaries=fused[:, None],
        streams=[],
        dbi=None,
        expert_outputs=[tokens],
        readout_attention=fused.new_full((batch, length), 1.0 / length),
        aux_losses={"rank": zero, "diversity": zero},
    )


class MeanPoolHead(nn.Module):
    """f = LN(W · mean_t x + b); logits = classifier(f). Uses ``dim`` and ``num_classes`` of the config."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.projection = nn.Linear(cfg.dim, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim)
        self.classifier = nn.Linear(cfg.dim, cfg.num_classes)

    def forward(self, features: Tensor, class_text: Tensor | None = None) -> HeadOutput:
        """Classify clips from frame features (B, T, D); ``class_text`` is ignored."""
        fused = self.norm(self.projection(features.mean(dim=1)))
        return _output(features, fused, self.classifier(fused))


class TemporalTransformerHead(nn.Module):
    """x + position embedding → ``depth`` post-LN Transformer layers → mean over time → LN → classifier.

    Position embeddings are learned for up to ``max_frames`` frames; ``num_heads`` and ``ffn_ratio`` are
    the config's, as in VidPrism's experts."""

    def __init__(self, cfg: HeadConfig, max_frames: int = 32, depth: int = 1) -> None:
        super().__init__()
        if max_frames < 1 or depth < 1:
            raise ValueError(
                f"TemporalTransformerHead: max_frames={max_frames}, depth={depth}; expected >= 1"
            )
        self.cfg = cfg
        self.pos_embed = nn.Parameter(torch.randn(1, max_frames, cfg.dim) * 0.02)
        self.blocks = nn.Sequential(
            *(TemporalExpert(cfg.dim, cfg.num_heads, cfg.ffn_ratio) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.classifier = nn.Linear(cfg.dim, cfg.num_classes)

    def forward(self, features: Tensor, class_text: Tensor | None = None) -> HeadOutput:
        """Classify clips from frame features (B, T, D), T <= ``max_frames``; ``class_text`` is ignored."""
        length = features.shape[1]
        if length > self.pos_embed.shape[1]:
            raise ValueError(
                f"TemporalTransformerHead has position embeddings for {self.pos_embed.shape[1]} frames; "
                f"got clips of {length}"
            )
        tokens = self.blocks(features + self.pos_embed[:, :length])
        fused = self.norm(tokens.mean(dim=1))
        return _output(tokens, fused, self.classifier(fused))
