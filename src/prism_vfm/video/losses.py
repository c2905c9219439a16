"""The released VidPrism training loss, every term by name.

``L = CE + 0.01 gate + 0.01 text + 0.005 diversity + 0.1 rank`` (SPEC §2). The VideoMAE recipe has no
text term. The diversity and rank terms are computed by the head (``HeadOutput.aux_losses``); the
diversity form is the head's ``HeadConfig.diversity``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from prism_vfm.video.head import HeadOutput

COS_EPS = 1e-8  # the eps of torch.nn.functional.cosine_similarity
RELEASED_WEIGHTS = {"ce": 1.0, "gate": 0.01, "text": 0.01, "diversity": 0.005, "rank": 0.1}


@dataclass
class LossOutput:
    """``total`` to call ``backward()`` on; ``terms``: each unweighted term by name; ``weights`` used."""

    total: Tensor
    terms: dict[str, Tensor]
    weights: dict[str, float]


def gate_loss(gates: Tensor) -> Tensor:
    """N · Σ_i ḡ_i² with ḡ the batch-mean gate: 1 for equal attention mass, larger otherwise.

    Written as the release does (its "importance" and "load" are the same batch mean)."""
    batch, n = gates.shape
    return n * (gates.mean(0) * (gates.sum(0) / batch)).sum()


def text_loss(embedding: Tensor, class_text: Tensor, labels: Tensor, scale: float = 1.0) -> Tensor:
    """Cross-entropy of ``scale`` · cos(z, t_c) against the labels (released: scale 1, no temperature)."""
    logits = F.normalize(embedding, dim=1) @ F.normalize(class_text, dim=1).t()
    return F.cross_entropy(logits * scale, labels)


def diversity_released(summaries: Tensor) -> Tensor:
    """Released form: mean over pairs of batch samples a < b of 1 − mean_i cos(E[a,i], E[b,i]).

    It compares samples, not experts, and minimising it makes samples alike; kept as the default so that
    results stay comparable with the release. 0 for a batch of one."""
    batch = summaries.shape[0]
    if batch < 2:
        return summaries.new_zeros(())
    # cos[a, b, i] for every pair of samples at once: a (B, B, N) product, not a (B, B, N, D) broadcast
    unit = summaries / summaries.norm(dim=-1, keepdim=True).clamp_min(COS_EPS)
    cos = torch.einsum("aid,bid->abi", unit, unit)
    a, b = torch.triu_indices(batch, batch, offset=1, device=summaries.device)
    return (1.0 - cos[a, b].mean(-1)).mean()


def diversity_inter_expert(summaries: Tensor) -> Tensor:
    """Inter-expert form: mean squared cosine between different experts' summaries of one sample."""
    batch, n, _ = summaries.shape
    if n < 2:
        return summaries.new_zeros(())
    unit = F.normalize(summaries, dim=-1)
    sim = unit @ unit.transpose(1, 2)
    off = 1 - torch.eye(n, device=summaries.device, dtype=summaries.dtype)
    return ((sim * off) ** 2).sum() / (batch * n * (n - 1))


DIVERSITY = {"released": diversity_released, "inter_expert": diversity_inter_expert}


def released_loss(
    output: HeadOutput,
    labels: Tensor,
    class_text: Tensor | None = None,
    *,
    text_scale: float = 1.0,
    weights: dict[str, float] | None = None,
) -> LossOutput:
    """The released loss with its coefficients; without the text term when ``class_text`` is None.

    ``class_text`` (C, D) are the class text embeddings t_c; the text term needs the projection z, so the
    VideoMAE variant (no projection) is called without them. ``text_scale`` multiplies the cosine logits
    of the text term (released: 1). ``weights`` overrides coefficients by term name."""
    coef = dict(RELEASED_WEIGHTS)
    if weights:
        unknown = sorted(set(weights) - set(coef))
        if unknown:
            raise ValueError(
                f"released_loss weights: unknown terms {unknown}; expected some of {sorted(coef)}"
            )
        coef.update(weights)
    terms = {"ce": F.cross_entropy(output.logits, labels), "gate": gate_loss(output.gates)}
    if class_text is not None:
        if output.embedding is None:
            raise ValueError(
                "released_loss: class_text was given but the head has no projection (VideoMAE variant); "
                "call it without class_text"
            )
        terms["text"] = text_loss(output.embedding, class_text, labels, text_scale)
    terms["diversity"] = output.aux_losses["diversity"]
    terms["rank"] = output.aux_losses["rank"]
    total = sum((coef[name] * value for name, value in terms.items()), output.logits.new_zeros(()))
    return LossOutput(total, terms, {name: coef[name] for name in terms})
