"""The VidPrism head: RgSTA → DBI → temporal experts → Combination → classifier / projection."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from prism_vfm.video.config import HeadConfig
from prism_vfm.video.dbi import DBIOutput
from prism_vfm.video.rgsta import RgSTAOutput


@dataclass
class HeadOutput:
    """Everything one forward pass of :class:`VidPrismHead` produces (batch-first)."""

    logits: Tensor  # (B, C): classifier logits, or cosine similarities for the text variant
    gates: Tensor  # (B, N): attention mass per expert, rows sum to 1
    embedding: Tensor | None  # z (B, D); None for the VideoMAE variant
    fused: Tensor  # f (B, D)
    expert_summaries: Tensor  # E_bnd (B, N, D): time-mean of every expert output
    streams: list[RgSTAOutput]  # per rate
    dbi: DBIOutput | None  # None when DBI is off
    expert_outputs: list[Tensor]  # per expert (B, L_i, D)
    readout_attention: Tensor  # (B, ΣL_i)
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # "rank", "diversity"


class VidPrismHead(nn.Module):
    """The temporal heterogeneous-MoE head on per-frame features (B, T, D)."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        raise NotImplementedError

    def forward(self, features: Tensor, class_text: Tensor | None = None) -> HeadOutput:
        """Classify clips from frame features (B, T, D); the text variant needs ``class_text`` (C, D)."""
        raise NotImplementedError
