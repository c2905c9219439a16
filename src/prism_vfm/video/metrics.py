"""Closed-set video classification scores: views averaged, top-k counted, summable over processes.

One meter serves training-time validation and ``prism video evaluate``. As released (VIDPRISM_SPEC §3.5),
the logits of a video's views (clips × crops) are averaged, then softmaxed; ``average="softmax"``
averages the views' softmax scores instead (MoTE's way). The ranking, hence top-1/top-5, is that of the
averaged scores either way.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Average = Literal["logits", "softmax"]


def average_views(logits: Tensor, average: Average = "logits") -> Tensor:
    """(B, V, C) per-view scores → (B, C) class probabilities of each video."""
    if average == "logits":
        return logits.float().mean(dim=1).softmax(dim=-1)
    if average == "softmax":
        return logits.float().softmax(dim=-1).mean(dim=1)
    raise ValueError(f"average must be 'logits' or 'softmax', got {average!r}")


class ClassificationMeter:
    """Top-1 / top-5 counts and a confusion matrix; ``load_state(all_reduce_sums(state()))`` sums them
    over processes."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
        self.top5 = torch.zeros((), dtype=torch.long)

    def update(self, probs: Tensor, labels: Tensor) -> None:
        """Add a batch: (B, C) scores and (B,) labels."""
        probs, labels = probs.detach().float().cpu(), labels.detach().cpu().long()
        pred = probs.argmax(dim=-1)
        k = min(5, probs.shape[-1])
        self.top5 += (probs.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1).sum()
        self.confusion += torch.bincount(
            labels * self.num_classes + pred, minlength=self.num_classes**2
        ).view(self.num_classes, self.num_classes)

    def state(self) -> dict[str, Tensor]:
        """The counts, to be summed over processes."""
        return {"confusion": self.confusion, "top5": self.top5}

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Take counts from :meth:`state` (e.g. summed over processes)."""
        self.confusion, self.top5 = state["confusion"].long().cpu(), state["top5"].long().cpu()

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    def scores(self) -> dict[str, float]:
        """``top1`` and ``top5`` accuracy (%), ``mean_class`` accuracy (%), and ``videos``."""
        n = max(1, self.count)
        per_class = self.per_class()
        seen = [v for v in per_class if v == v]  # classes without videos are NaN
        return {
            "top1": 100.0 * float(self.confusion.diagonal().sum()) / n,
            "top5": 100.0 * float(self.top5) / n,
            "mean_class": sum(seen) / len(seen) if seen else 0.0,
            "videos": float(self.count),
        }

    def per_class(self) -> list[float]:
        """Accuracy (%) of each class (NaN for a class without videos)."""
        totals = self.confusion.sum(dim=1)
        hits = self.confusion.diagonal()
        return [
            100.0 * float(h) / float(t) if t > 0 else float("nan") for h, t in zip(hits, totals, strict=True)
        ]
