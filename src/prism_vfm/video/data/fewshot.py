"""Few-shot training lists: K videos per class, drawn from a seed, written in the released list form.

The release's first commit shipped 2/4/8/16-shot lists (K random videos per class) without the code
that drew them; here a list is a function of (the full list, K, seed), so a protocol can name it and
anyone can redraw it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from prism_vfm.video.data.lists import VideoSample


def k_shot(samples: Sequence[VideoSample], shots: int, seed: int) -> list[VideoSample]:
    """``shots`` videos of every class of ``samples``, drawn without replacement (``numpy`` generator of
    ``seed``), in the order of the full list. A class with fewer videos is an error naming it."""
    if shots < 1:
        raise ValueError(f"shots: expected an integer >= 1, got {shots}")
    by_class: dict[int, list[int]] = {}
    for i, sample in enumerate(samples):
        by_class.setdefault(sample.label, []).append(i)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for label in sorted(by_class):
        indices = by_class[label]
        if len(indices) < shots:
            raise ValueError(f"class {label} has {len(indices)} videos, fewer than {shots} shots")
        chosen += [indices[j] for j in rng.choice(len(indices), size=shots, replace=False)]
    return [samples[i] for i in sorted(chosen)]


def harmonic_mean(base: float, novel: float) -> float:
    """The base-to-novel protocol's summary of the two accuracies (0 when either is 0)."""
    return 0.0 if base <= 0 or novel <= 0 else 2 * base * novel / (base + novel)
