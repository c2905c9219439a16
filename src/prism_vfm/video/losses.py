"""The released VidPrism training loss, every term by name."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from prism_vfm.video.head import HeadOutput

# Released coefficients of L = CE + 0.01 gate + 0.01 text + 0.005 diversity + 0.1 rank.
RELEASED_WEIGHTS = {"ce": 1.0, "gate": 0.01, "text": 0.01, "diversity": 0.005, "rank": 0.1}


@dataclass
class LossOutput:
    """``total`` to call ``backward()`` on and each unweighted term by name."""

    total: Tensor
    terms: dict[str, Tensor]


def released_loss(output: HeadOutput, labels: Tensor, class_text: Tensor | None = None) -> LossOutput:
    """The released loss; without the text term when ``class_text`` is None (VideoMAE recipe)."""
    raise NotImplementedError
