"""Configuration of the VidPrism temporal head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Variant = Literal["closed", "text", "videomae"]
DbiUpdate = Literal["last", "sum"]
Diversity = Literal["released", "inter_expert"]

VARIANTS = ("closed", "text", "videomae")
DBI_UPDATES = ("last", "sum")
DIVERSITIES = ("released", "inter_expert")


@dataclass
class HeadConfig:
    """Every setting of :class:`~prism_vfm.video.head.VidPrismHead`; the defaults are the released ones.

    ``variant`` picks the head's face: ``"closed"`` (classifier + projection MLP, ``videomoe.py``),
    ``"text"`` (projection with a trailing LayerNorm, logits = cosine against class text embeddings,
    ``videomoe_text.py``; its classifier exists but is unused) or ``"videomae"`` (classifier only, for
    VideoMAEv2 temporal tokens, ``videomoe_mae.py``).
    """

    dim: int = 512
    num_classes: int = 400
    rates: tuple[int, ...] = (2, 4, 8, 16)
    num_experts: int = 4  # one per rate
    num_heads: int = 4
    ffn_ratio: int = 2
    variant: Variant = "closed"
    # RgSTA (content-aware multi-rate sampling); one frame is kept per window, as released.
    merge_tau: float = 0.1
    score_alpha: float = 0.7
    score_temp: float = 0.2
    # DBI (dynamic bidirectional interaction); streams with rate >= slow_rate are "slow".
    dbi: bool = True
    dbi_threshold: float = 0.3
    slow_rate: int = 8
    # "last" (released): every update reads the pre-DBI streams and, per target, only the last passing
    # source counts; "sum": every passing source's contribution is added (the evident intent).
    dbi_update: DbiUpdate = "last"
    # "released": 1 - cosine between batch samples' per-expert summaries (what the release computes);
    # "inter_expert": mean squared cosine between different experts of a sample (the intended form).
    diversity: Diversity = "released"
    # -1 (released): expert i reads stream i. i >= 0: every expert reads stream i (after DBI), the
    # homogeneous-expert control that tells what the streams' different rates contribute.
    shared_stream: int = -1

    def __post_init__(self) -> None:
        self.rates = tuple(int(r) for r in self.rates)
        for name, value, allowed in (
            ("variant", self.variant, VARIANTS),
            ("dbi_update", self.dbi_update, DBI_UPDATES),
            ("diversity", self.diversity, DIVERSITIES),
        ):
            if value not in allowed:
                raise ValueError(f"HeadConfig.{name}={value!r}: expected one of {', '.join(allowed)}")
        for name in ("dim", "num_classes", "num_heads", "ffn_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"HeadConfig.{name}={getattr(self, name)}: expected a positive integer")
        if self.dim % self.num_heads or self.dim % 4:
            raise ValueError(
                f"HeadConfig.dim={self.dim}: expected a multiple of num_heads={self.num_heads} and of 4 "
                "(the DBI score MLPs are D -> D/4)"
            )
        if not self.rates or any(r < 1 for r in self.rates) or list(self.rates) != sorted(set(self.rates)):
            raise ValueError(f"HeadConfig.rates={self.rates}: expected distinct positive rates, ascending")
        if self.num_experts != len(self.rates):
            raise ValueError(
                f"HeadConfig.num_experts={self.num_experts}: expected one expert per rate, "
                f"{len(self.rates)} for rates={self.rates}"
            )
        if not -1 <= self.shared_stream < len(self.rates):
            raise ValueError(
                f"HeadConfig.shared_stream={self.shared_stream}: expected -1 (one stream per expert) or a "
                f"stream index in [0, {len(self.rates) - 1}]"
            )
        fast = [r for r in self.rates if r < self.slow_rate]
        slow = [r for r in self.rates if r >= self.slow_rate]
        bad = [(f, s) for f in fast for s in slow if s % f]
        if bad:
            raise ValueError(
                f"HeadConfig.rates={self.rates}: every slow rate must be a multiple of every fast rate "
                f"(the fast->slow convolutions stride by their ratio); not so for {bad}"
            )

    @property
    def slow(self) -> tuple[bool, ...]:
        """Which streams are slow (rate >= ``slow_rate``)."""
        return tuple(r >= self.slow_rate for r in self.rates)
