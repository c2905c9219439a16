"""Seed stability: context–expert affinities of several runs aligned to a reference by Hungarian matching.

Expert numbering is arbitrary (every expert starts as the same copy of the pretrained MLP), so two runs
are compared after permuting the experts of one to best match the other. The agreement of two affinity
matrices is ``1 − mean over contexts of the total-variation distance between their expert shares``:
1 when the runs route identically up to the permutation, 0 when no context shares any expert. The
matching minimises exactly that distance (the sum over matched expert columns of their L1 distance).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from prism_vfm.analysis.plotting import heatmap_grid
from prism_vfm.analysis.routing import Affinity


@dataclass
class SeedAlignment:
    """Per layer and per other run: the expert permutation, the aligned matrix and the agreement.

    ``permutation[block][r][i]`` is the expert of run ``r`` matched to reference expert ``i`` (so the
    aligned matrix is ``probs[:, permutation]``); ``agreement`` is after alignment and ``unaligned``
    before, for comparison.
    """

    reference: Affinity
    labels: list[str]
    permutation: dict[int, list[np.ndarray]]
    aligned: dict[int, list[np.ndarray]]
    agreement: dict[int, list[float]]
    unaligned: dict[int, list[float]]

    @property
    def layers(self) -> list[int]:
        return sorted(self.permutation)

    def mean_agreement(self) -> dict[int, float]:
        """Aligned agreement per layer, averaged over the runs."""
        return {b: float(np.mean(v)) for b, v in self.agreement.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.labels[0],
            "runs": self.labels[1:],
            "layers": {
                str(b): {
                    "agreement": self.agreement[b],
                    "mean_agreement": float(np.mean(self.agreement[b])),
                    "unaligned_agreement": self.unaligned[b],
                    "permutation": [p.tolist() for p in self.permutation[b]],
                }
                for b in self.layers
            },
        }


def _shares(p: np.ndarray) -> np.ndarray:
    return p / np.clip(p.sum(1, keepdims=True), 1e-12, None)


def affinity_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """``1 − mean_c TV(a_c, b_c)`` of two (contexts, experts) affinity matrices (rows normalised first)."""
    if a.shape != b.shape:
        raise ValueError(f"affinity matrices of shapes {a.shape} and {b.shape} cannot be compared")
    return float(1.0 - 0.5 * np.abs(_shares(a) - _shares(b)).sum(1).mean())


def match_experts(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """The permutation ``perm`` minimising the distance between ``reference`` and ``other[:, perm]``."""
    ref, oth = _shares(reference), _shares(other)
    cost = np.abs(ref[:, :, None] - oth[:, None, :]).sum(0)  # (E_ref, E_other) L1 between columns
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty_like(cols)
    perm[rows] = cols
    return perm


def align_affinities(
    reference: Affinity, others: Sequence[Affinity], labels: Sequence[str] | None = None
) -> SeedAlignment:
    """Align each run of ``others`` to ``reference`` layer by layer (``labels``: reference first)."""
    if not others:
        raise ValueError("seed stability needs at least one run besides the reference")
    labels = (
        list(labels)
        if labels is not None
        else ["reference", *(f"run {i}" for i in range(1, len(others) + 1))]
    )
    if len(labels) != len(others) + 1:
        raise ValueError(f"{len(labels)} labels for {len(others) + 1} runs (the reference and the others)")
    perms: dict[int, list[np.ndarray]] = {b: [] for b in reference.layers}
    aligned: dict[int, list[np.ndarray]] = {b: [] for b in reference.layers}
    agree: dict[int, list[float]] = {b: [] for b in reference.layers}
    plain: dict[int, list[float]] = {b: [] for b in reference.layers}
    for other, label in zip(others, labels[1:], strict=True):
        if other.layers != reference.layers or other.contexts != reference.contexts:
            raise ValueError(
                f"run {label!r} has layers {other.layers} and contexts {other.contexts}; the reference has "
                f"{reference.layers} and {reference.contexts}: analyse all runs on the same contexts"
            )
        for b in reference.layers:
            ref, oth = reference.probs[b], other.probs[b]
            if ref.shape != oth.shape:
                raise ValueError(
                    f"block {b}: run {label!r} has {oth.shape[1]} experts, the reference {ref.shape[1]}"
                )
            perm = match_experts(ref, oth)
            perms[b].append(perm)
            aligned[b].append(oth[:, perm])
            agree[b].append(affinity_agreement(ref, oth[:, perm]))
            plain[b].append(affinity_agreement(ref, oth))
    return SeedAlignment(reference, labels, perms, aligned, agree, plain)


def plot_seed_alignment(alignment: SeedAlignment, path: str | os.PathLike) -> Path:
    """One PNG: a row per run (reference first, then each aligned run), a column per MoE layer."""
    ref = alignment.reference
    panels = [(ref.probs[b], f"{alignment.labels[0]} · block {b}") for b in alignment.layers]
    for r, label in enumerate(alignment.labels[1:]):
        panels += [
            (alignment.aligned[b][r], f"{label} aligned · block {b} (agree {alignment.agreement[b][r]:.2f})")
            for b in alignment.layers
        ]
    return heatmap_grid(
        panels,
        path,
        row_labels=ref.context_names,
        xlabel="expert (reference numbering)",
        colorbar_label=f"P(expert selected | {ref.kind})",
        vmax=1.0,
        suptitle="Seed stability: affinities aligned to the reference by Hungarian matching",
        max_cols=len(alignment.layers),
    )
