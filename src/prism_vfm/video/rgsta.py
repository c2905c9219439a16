"""RgSTA: content-aware multi-rate sampling (score-guided frame selection and merging per window).

For one rate r the T frames are cut into consecutive windows of r frames (the last may be shorter; a
window of one frame passes through). In every window the frame with the largest mixed score
``alpha * s_pred + (1 - alpha) * ||c||`` is kept (a hard top-1) and every other frame is added to it
with half weight: ``o = c_k + 1/2 * sum_{t != k} w_t c_t``, where ``w_t = A[t, k] / (A[t, k] + 1e-6)``
and A is the row softmax of the zero-diagonal cosine similarity of the projected frames at temperature
``tau``. The released merge normalises over the single kept token, so ``w_t`` is 1 to within about 1e-3
and the output grows with the rate; it is reproduced as released. The learned score s_pred is trained
only by a listwise rank loss (training mode), because the top-1 blocks its gradient.

All windows of all samples are computed at once: the full windows as one (B, T // r, r, D) view and a
shorter last window, if any, as one more group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RANK_CLAMP = 1e-9
MERGE_EPS = 1e-6
NORM_EPS = 1e-12  # of torch.nn.functional.normalize


@dataclass
class RgSTAOutput:
    """One rate's stream and what chose it (batch-first)."""

    tokens: Tensor  # (B, ceil(T / r), D)
    kept_index: Tensor  # (B, ceil(T / r)) int64, position of the kept frame inside its window
    s_pred: Tensor  # (B, T) learned score per frame
    s_mix: Tensor  # (B, T) mixed score per frame, whose per-window top-1 is kept
    rank_loss: Tensor  # () mean over the windows of more than one frame; exactly 0 in eval mode
    rate: int

    @property
    def kept_frame(self) -> Tensor:
        """The kept frames as absolute frame indices (B, ceil(T / r))."""
        starts = torch.arange(self.kept_index.shape[1], device=self.kept_index.device) * self.rate
        return self.kept_index + starts


class RgSTA(nn.Module):
    """Keep one frame per window of ``rate`` frames and merge the rest into it."""

    def __init__(
        self, dim: int, rate: int, tau: float = 0.1, alpha: float = 0.7, score_temp: float = 0.2
    ) -> None:
        super().__init__()
        self.rate, self.tau, self.alpha, self.score_temp = rate, tau, alpha, score_temp
        self.metric_proj = nn.Linear(dim, dim)
        self.score_norm = nn.LayerNorm(dim)  # on the unnormalised projection
        self.score = nn.Linear(dim, 1, bias=False)

    def forward(self, x: Tensor, frame_norm: Tensor | None = None) -> RgSTAOutput:
        """Merge frame features ``x`` (B, T, D) into ``ceil(T / rate)`` tokens.

        ``frame_norm`` (B, T) may pass in ‖x‖₂ per frame, shared by the rates; no gradient flows through
        it (it enters the hard selection and the detached rank target only)."""
        batch, frames, dim = x.shape
        if frame_norm is None:
            with torch.no_grad():
                frame_norm = x.norm(dim=-1)
        norm = frame_norm
        h = self.metric_proj(x)
        s_pred = self.score(self.score_norm(h)).squeeze(-1)
        with torch.no_grad():  # only its per-window argmax is used
            s_mix = self.alpha * s_pred + (1 - self.alpha) * norm

        full = frames // self.rate
        split = full * self.rate
        groups = []  # (window width, number of windows, frames): the full windows, then a short last one
        if full:
            groups.append((self.rate, full, slice(0, split)))
        if frames > split:
            groups.append((frames - split, 1, slice(split, frames)))
        tokens, kept, losses = [], [], []
        for width, windows, span in groups:
            if width == 1:  # a window of one frame passes through
                tokens.append(x[:, span])
                kept.append(torch.zeros(batch, 1, dtype=torch.long, device=x.device))
                continue

            def view(t: Tensor, span: slice = span, windows: int = windows, width: int = width) -> Tensor:
                return t[:, span].reshape(batch, windows, width, *t.shape[2:])

            out, idx, loss = self._merge(view(x), view(h), view(s_pred), view(s_mix), view(norm))
            tokens.append(out)
            kept.append(idx)
            if loss is not None:
                losses.append(loss)
        rank = torch.cat(losses).mean() if losses else x.new_zeros(())
        return RgSTAOutput(torch.cat(tokens, 1), torch.cat(kept, 1), s_pred, s_mix, rank, self.rate)

    def _merge(
        self, xw: Tensor, hw: Tensor, s_pred: Tensor, s_mix: Tensor, norm: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Windows (B, n, w, ...) → merged tokens (B, n, D), kept positions (B, n), rank loss per window."""
        batch, windows, width, dim = xw.shape
        # cosine similarity from the window's Gram matrix: (w, w) work per window instead of (w, D)
        gram = hw @ hw.transpose(-1, -2)
        length = gram.diagonal(dim1=-2, dim2=-1).clamp_min(NORM_EPS**2).sqrt()
        eye = torch.eye(width, dtype=torch.bool, device=xw.device)
        sim = (gram / (length.unsqueeze(-1) * length.unsqueeze(-2))).masked_fill(eye, 0.0)
        # topk, not argmax: they break exact ties (repeated frames) differently, and the release uses topk
        kept = s_mix.topk(1, dim=-1).indices.squeeze(-1)
        attn = torch.softmax(sim / self.tau, dim=-1)
        to_kept = attn.gather(-1, kept[..., None, None].expand(batch, windows, width, 1)).squeeze(-1)
        is_kept = F.one_hot(kept, width).to(xw.dtype)
        # o = c_k + 1/2 sum_{t != k} w_t c_t as one product: weight 1 on the kept frame, w_t / 2 elsewhere
        coef = (to_kept / (to_kept + MERGE_EPS)) / 2.0 * (1.0 - is_kept) + is_kept
        merged = (coef.unsqueeze(-2) @ xw).squeeze(-2)
        if not self.training:
            return merged, kept, None
        target = (norm + sim.mean(dim=-2)).detach()  # high norm + representative (column mean of S)
        p_pred = torch.softmax(s_pred / self.score_temp, dim=-1)
        p_tgt = torch.softmax(target / self.score_temp, dim=-1)
        kl = (p_tgt * (p_tgt.clamp_min(RANK_CLAMP).log() - p_pred.clamp_min(RANK_CLAMP).log())).sum(-1)
        return merged, kept, kl.mean(0)
