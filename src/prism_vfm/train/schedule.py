"""Learning-rate schedules stepped per iteration."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int, peak: float, start: float, floor: float) -> float:
    """Linear warm-up from ``start`` to ``peak`` over ``warmup`` steps, then cosine down to ``floor``."""
    if step < warmup:
        return start + (peak - start) * step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def poly(step: int, total: int, peak: float, power: float = 0.9) -> float:
    """Polynomial decay ``peak·(1 − step/total)^power``, held at 0 past ``total`` (never negative)."""
    return peak * max(0.0, 1.0 - step / max(1, total)) ** power


def warmup_cosine_epochs(epoch: float, warmup: float, epochs: float) -> float:
    """Factor of the base learning rate at (fractional) ``epoch``: linear from 0 over ``warmup`` epochs,
    then cosine to 0 at ``epochs``, 0 afterwards (VidPrism's released schedule, in its order of
    operations, so ``base · factor`` equals its values exactly)."""
    if epoch < warmup:
        return epoch / warmup
    if epoch >= epochs:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * ((epoch - warmup) / (epochs - warmup))))
