"""Configuration of the VidPrism temporal head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Variant = Literal["closed", "text", "videomae"]
DbiUpdate = Literal["last", "sum"]
Diversity = Literal["released", "inter_expert"]


@dataclass
class HeadConfig:
    """Every setting of :class:`~prism_vfm.video.head.VidPrismHead`; the defaults are the released ones.

    ``variant`` picks the head's face: ``"closed"`` (classifier + projection MLP, ``videomoe.py``),
    ``"text"`` (projection with a trailing LayerNorm, cosine logits against class text embeddings,
    ``videomoe_text.py``) or ``"videomae"`` (classifier only, ``videomoe_mae.py``).
    """

    dim: int = 512
    num_classes: int = 400
    rates: tuple[int, ...] = (2, 4, 8, 16)
    num_experts: int = 4
    num_heads: int = 4
    ffn_ratio: int = 2
    variant: Variant = "closed"
    # RgSTA (content-aware multi-rate sampling)
    keep_k: int = 1
    merge_tau: float = 0.1
    score_alpha: float = 0.7
    score_temp: float = 0.2
    # DBI (dynamic bidirectional interaction)
    dbi: bool = True
    dbi_threshold: float = 0.3
    slow_rate: int = 8
    # Released: every update reads the pre-DBI streams and the last passing source per target wins;
    # "sum" adds every passing source's contribution (the evident intent).
    dbi_update: DbiUpdate = "last"
    # Released: 1 - cosine between batch samples' per-expert summaries (SPEC §2); "inter_expert":
    # mean squared cosine between different experts of one sample (the unused release helper).
    diversity: Diversity = "released"
