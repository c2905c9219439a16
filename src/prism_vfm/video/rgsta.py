"""RgSTA: content-aware multi-rate sampling (score-guided frame selection and merging per window)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class RgSTAOutput:
    """One rate's stream and what chose it (all batch-first)."""

    tokens: Tensor  # (B, ceil(T / r), D)
    kept_index: Tensor  # (B, ceil(T / r)) position of the kept frame inside its window
    s_pred: Tensor  # (B, T) learned score per frame
    s_mix: Tensor  # (B, T) mixed score per frame
    rank_loss: Tensor  # scalar; exactly 0 in eval mode


class RgSTA(nn.Module):
    """Keep one frame per window of ``rate`` frames and merge the rest into it."""

    def __init__(
        self,
        dim: int,
        rate: int,
        keep_k: int = 1,
        tau: float = 0.1,
        alpha: float = 0.7,
        score_temp: float = 0.2,
    ) -> None:
        super().__init__()
        self.rate, self.keep_k, self.tau, self.alpha, self.score_temp = rate, keep_k, tau, alpha, score_temp
        self.metric_proj = nn.Linear(dim, dim)
        self.score_norm = nn.LayerNorm(dim)
        self.score = nn.Linear(dim, 1, bias=False)

    def forward(self, x: Tensor) -> RgSTAOutput:
        """Merge frame features ``x`` (B, T, D) into ``ceil(T / rate)`` tokens."""
        raise NotImplementedError
