"""Co-activation: which experts two contexts both use, per MoE layer, and how that evolves in training."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prism_vfm.analysis.plotting import checkpoint_curves, heatmap_grid
from prism_vfm.analysis.routing import Affinity


@dataclass
class Coactivation:
    """Experts each context uses (selected by at least ``threshold`` of its tokens) and their overlaps.

    ``active[block][c]`` lists the experts context position ``c`` uses; ``shared[block][(a, b)]`` the
    experts both context positions ``a < b`` use; :meth:`counts` the (C, C) matrix of overlap sizes whose
    diagonal is the number of experts each context uses.
    """

    threshold: float
    context_names: list[str]
    active: dict[int, list[list[int]]]
    shared: dict[int, dict[tuple[int, int], list[int]]]

    @property
    def layers(self) -> list[int]:
        return sorted(self.active)

    def counts(self, block: int) -> np.ndarray:
        n = len(self.context_names)
        out = np.zeros((n, n), dtype=np.int64)
        for a in range(n):
            out[a, a] = len(self.active[block][a])
        for (a, b), experts in self.shared[block].items():
            out[a, b] = out[b, a] = len(experts)
        return out

    def pair_name(self, a: int, b: int) -> str:
        return f"{self.context_names[a]}–{self.context_names[b]}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "context_names": self.context_names,
            "layers": {
                str(blk): {
                    "active": dict(zip(self.context_names, self.active[blk], strict=True)),
                    "shared": {self.pair_name(a, b): e for (a, b), e in self.shared[blk].items()},
                }
                for blk in self.layers
            },
        }


def coactivation(affinity: Affinity, threshold: float | None = None) -> Coactivation:
    """Experts used by each context and shared by each pair of contexts, per MoE layer.

    An expert is used by a context when ``P(expert selected | context) >= threshold``; the default is the
    uniform rate ``top_k / num_experts``, i.e. used at least as often as under perfectly balanced routing.
    """
    thr = affinity.top_k / affinity.num_experts if threshold is None else float(threshold)
    if not 0.0 < thr <= 1.0:
        raise ValueError(f"co-activation threshold must be in (0, 1] (a selection frequency), got {thr}")
    active: dict[int, list[list[int]]] = {}
    shared: dict[int, dict[tuple[int, int], list[int]]] = {}
    for blk in affinity.layers:
        used = affinity.probs[blk] >= thr
        active[blk] = [np.flatnonzero(row).tolist() for row in used]
        shared[blk] = {
            (a, b): np.flatnonzero(used[a] & used[b]).tolist()
            for a, b in itertools.combinations(range(used.shape[0]), 2)
        }
    return Coactivation(thr, list(affinity.context_names), active, shared)


def coactivation_series(series: Sequence[Coactivation], labels: Sequence[str]) -> dict[str, Any]:
    """Number of shared experts per layer and context pair along checkpoints (``labels`` name them).

    Returns ``{"labels", "threshold", "layers": {block: {"A–B": [count per checkpoint]}}}``.
    """
    if len(series) != len(labels):
        raise ValueError(f"{len(labels)} labels for {len(series)} checkpoints")
    if not series:
        raise ValueError("a co-activation series needs at least one checkpoint")
    first = series[0]
    for co, label in zip(series, labels, strict=True):
        if co.layers != first.layers or co.context_names != first.context_names:
            raise ValueError(
                f"checkpoint {label!r} has layers {co.layers} / contexts {co.context_names}, expected "
                f"{first.layers} / {first.context_names} as in {labels[0]!r}"
            )
    return {
        "labels": list(labels),
        "threshold": first.threshold,
        "layers": {
            str(blk): {
                first.pair_name(a, b): [len(co.shared[blk][(a, b)]) for co in series]
                for a, b in first.shared[blk]
            }
            for blk in first.layers
        },
    }


def plot_coactivation(coact: Coactivation, path: str | os.PathLike) -> Path:
    """One PNG: per layer, the (context × context) number of shared experts; the diagonal is usage."""
    panels = [(coact.counts(b).astype(float), f"block {b}") for b in coact.layers]
    return heatmap_grid(
        panels,
        path,
        row_labels=coact.context_names,
        col_labels=coact.context_names,
        xlabel="context",
        colorbar_label="experts used by both",
        suptitle=f"Co-activated experts (selection frequency ≥ {coact.threshold:.3f})",
    )


def plot_coactivation_series(series: dict[str, Any], path: str | os.PathLike) -> Path:
    """One PNG: shared-expert count per context pair against checkpoint, a panel per layer."""
    return checkpoint_curves(
        series["layers"],
        series["labels"],
        path,
        "shared experts",
        f"Co-activation over training (frequency ≥ {series['threshold']:.3f})",
        integer=True,
    )
