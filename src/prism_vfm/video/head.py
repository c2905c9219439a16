"""The VidPrism head: RgSTA → DBI → temporal experts → Combination → classifier / projection.

Frame features (B, T, D) are merged into one stream per rate (RgSTA), the fast and slow streams exchange
information (DBI), expert i transforms stream i, and one learned query reads all expert tokens out
(Combination) into the fused vector f, whose attention mass per expert gives the gates. The classifier
and the projection act on f. The three released variants are configurations of this one module
(``HeadConfig.variant``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prism_vfm.video.config import HeadConfig
from prism_vfm.video.dbi import DBI, DBIOutput
from prism_vfm.video.experts import TemporalExpert
from prism_vfm.video.losses import DIVERSITY
from prism_vfm.video.readout import Combination
from prism_vfm.video.rgsta import RgSTA, RgSTAOutput


@dataclass
class HeadOutput:
    """Everything one forward pass of :class:`VidPrismHead` produces (batch-first)."""

    logits: Tensor  # (B, C): classifier logits, or cos(z, t_c) for the text variant
    gates: Tensor  # (B, N): attention mass of the read-out per expert; rows sum to 1
    embedding: Tensor | None  # z (B, D), the projection output; None for the VideoMAE variant
    fused: Tensor  # f (B, D), the read-out's output
    expert_summaries: Tensor  # E_bnd (B, N, D): time-mean of every expert's output
    streams: list[RgSTAOutput]  # per rate: tokens, kept frames, scores, rank loss
    dbi: DBIOutput | None  # None when DBI is off
    expert_outputs: list[Tensor]  # per expert (B, L_i, D)
    readout_attention: Tensor  # (B, ΣL_i) head-averaged attention of the query
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # "rank" (0 in eval), "diversity"


class VidPrismHead(nn.Module):
    """The temporal heterogeneous-MoE head on per-frame features (B, T, D).

    Non-finite features are an error; on an accelerator they are looked for only when
    :attr:`check_device_values` is set, since reading the answer back waits for the device."""

    check_device_values: bool = False

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.rgsta = nn.ModuleList(
            RgSTA(d, rate, tau=cfg.merge_tau, alpha=cfg.score_alpha, score_temp=cfg.score_temp)
            for rate in cfg.rates
        )
        self.dbi = DBI(
            d, cfg.rates, slow_rate=cfg.slow_rate, threshold=cfg.dbi_threshold, update=cfg.dbi_update
        )
        self.experts = nn.ModuleList(TemporalExpert(d, cfg.num_heads, cfg.ffn_ratio) for _ in cfg.rates)
        self.readout = Combination(d, cfg.num_heads)
        self.classifier = nn.Linear(d, cfg.num_classes)
        self.projection: nn.Sequential | None = None
        if cfg.variant != "videomae":
            layers: list[nn.Module] = [nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d)]
            if cfg.variant == "text":
                layers.append(nn.LayerNorm(d))
            self.projection = nn.Sequential(*layers)

    def _check(self, features: Tensor, class_text: Tensor | None) -> None:
        d = self.cfg.dim
        if features.dim() != 3 or features.shape[-1] != d or features.shape[0] == 0 or features.shape[1] == 0:
            raise ValueError(
                f"VidPrismHead expects frame features (B, T, {d}) with B, T >= 1; got {tuple(features.shape)}"
            )
        # Reading the check's answer back from an accelerator would stall every step: features there are
        # checked only when asked (``check_device_values``), as PrismViT does for its context ids.
        if (features.device.type == "cpu" or self.check_device_values) and not bool(
            torch.isfinite(features).all()
        ):
            bad = (~torch.isfinite(features)).nonzero()[0].tolist()
            raise ValueError(f"VidPrismHead: non-finite frame features (first at [b, t, d] = {bad})")
        if self.cfg.variant == "text":
            if class_text is None:
                raise ValueError(
                    "the text variant of VidPrismHead needs class_text, the class text embeddings (C, D)"
                )
            if class_text.dim() != 2 or class_text.shape[-1] != d:
                raise ValueError(f"VidPrismHead: class_text must be (C, {d}); got {tuple(class_text.shape)}")

    def forward(
        self, features: Tensor, class_text: Tensor | None = None, drop_experts: Sequence[int] = ()
    ) -> HeadOutput:
        """Classify clips from frame features (B, T, D).

        The text variant needs ``class_text`` (C, D) and returns cosine logits against it; the other
        variants ignore it (the text loss takes it separately, see :func:`released_loss`).
        ``drop_experts`` hides those experts from the read-out (a test-time ablation, see
        :class:`~prism_vfm.video.readout.Combination`)."""
        self._check(features, class_text)
        with torch.no_grad():
            frame_norm = features.norm(dim=-1)
        streams = [module(features, frame_norm) for module in self.rgsta]
        rank = torch.stack([s.rank_loss for s in streams]).mean()
        tokens = [s.tokens for s in streams]
        dbi = self.dbi(tokens) if self.cfg.dbi else None
        expert_in = dbi.streams if dbi is not None else tokens
        if self.cfg.shared_stream >= 0:
            expert_in = [expert_in[self.cfg.shared_stream]] * len(expert_in)
        expert_out = [expert(x) for expert, x in zip(self.experts, expert_in, strict=True)]
        fused, gates, attention = self.readout(expert_out, drop_experts)
        summaries = torch.stack([x.mean(dim=1) for x in expert_out], dim=1)
        diversity = DIVERSITY[self.cfg.diversity](summaries)
        z = self.projection(fused) if self.projection is not None else None
        if self.cfg.variant == "text":
            assert z is not None and class_text is not None
            logits = F.normalize(z, dim=-1) @ F.normalize(class_text, dim=-1).t()
        else:
            logits = self.classifier(fused)
        return HeadOutput(
            logits=logits,
            gates=gates,
            embedding=z,
            fused=fused,
            expert_summaries=summaries,
            streams=streams,
            dbi=dbi,
            expert_outputs=expert_out,
            readout_attention=attention,
            aux_losses={"rank": rank, "diversity": diversity},
        )
