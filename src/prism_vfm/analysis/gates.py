"""The dual-stream mixing weight λ per MoE layer and context: mean, distribution, trajectory."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from prism_vfm.analysis.common import check_contexts, context_passes, resolve_names, student_of
from prism_vfm.analysis.plotting import checkpoint_curves, new_figure, save
from prism_vfm.layers.dual_stream import BlockRouting, DualStreamBlock
from prism_vfm.models.prism_vit import ContextKind


@dataclass
class Gates:
    """λ (the anchor's weight; 1 − λ goes to the MoE) per MoE layer and context.

    ``mean[block]`` is (num_contexts,) over all tokens; ``std[block]`` likewise; ``samples[block][c]`` holds
    up to ``max_samples`` per-token values of context ``c`` (a uniform random subset when there are more)
    for distributions.
    """

    mean: dict[int, np.ndarray]
    std: dict[int, np.ndarray]
    samples: dict[int, list[np.ndarray]]
    contexts: list[int]
    context_names: list[str]
    kind: str = "teacher"
    lambda_range: tuple[float, float] = (0.5, 1.0)

    @property
    def layers(self) -> list[int]:
        return sorted(self.mean)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (means, standard deviations and quartiles; no raw samples)."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "contexts": self.contexts,
            "context_names": self.context_names,
            "lambda_range": list(self.lambda_range),
            "layers": {},
        }
        for b in self.layers:
            out["layers"][str(b)] = {
                name: {
                    "mean": float(self.mean[b][c]),
                    "std": float(self.std[b][c]),
                    "quartiles": np.quantile(self.samples[b][c], [0.25, 0.5, 0.75]).round(6).tolist(),
                }
                for c, name in enumerate(self.context_names)
            }
        return out


@torch.no_grad()
def gate_statistics(
    model: nn.Module,
    batches: Iterable[Tensor],
    contexts: Sequence[int],
    kind: ContextKind = "teacher",
    device: str = "cpu",
    context_names: Sequence[str] | None = None,
    max_samples: int = 20000,
    seed: int = 0,
) -> Gates:
    """Per MoE layer and context, the mean, standard deviation and a sample of the per-token λ.

    Every image of ``batches`` is seen under every context, in eval mode (see
    :func:`~prism_vfm.analysis.routing_affinity` for the arguments). λ is not conditioned on the context,
    but its input is: from the second MoE layer on, earlier routing makes it differ between contexts.
    """
    student = student_of(model).to(device)
    ids = check_contexts(student, contexts, kind)
    names = resolve_names(model, ids, kind, context_names)
    total: dict[int, Tensor] = {}
    total_sq: dict[int, Tensor] = {}
    count: dict[int, int] = {}
    # A uniform sample of bounded size: every value draws a random key and the smallest keys are kept.
    kept: dict[int, tuple[Tensor, Tensor]] = {}
    gen = torch.Generator().manual_seed(seed)
    for _, out in context_passes(student, batches, ids, kind, device):
        for i, routing in cast("dict[int, BlockRouting]", out.routing).items():
            lam = routing.lam.reshape(len(ids), -1).to(torch.float64).cpu()
            total[i] = total.get(i, 0) + lam.sum(1)
            total_sq[i] = total_sq.get(i, 0) + (lam * lam).sum(1)
            count[i] = count.get(i, 0) + lam.shape[1]
            keys = torch.rand(lam.shape, generator=gen, dtype=torch.float64)
            if i in kept:
                lam, keys = torch.cat([kept[i][0], lam], 1), torch.cat([kept[i][1], keys], 1)
            if lam.shape[1] > max_samples:
                keep = torch.topk(keys, max_samples, dim=1, largest=False).indices
                lam, keys = lam.gather(1, keep), keys.gather(1, keep)
            kept[i] = (lam, keys)
    if not count:
        raise ValueError("no batches: gate statistics need at least one batch of images")
    mean, std, samples = {}, {}, {}
    for i in count:
        m = total[i] / count[i]
        mean[i] = m.numpy()
        std[i] = (total_sq[i] / count[i] - m * m).clamp_min(0).sqrt().numpy()
        samples[i] = [row.numpy() for row in kept[i][0]]
    lo_hi = cast(DualStreamBlock, student.blocks[next(iter(count))]).lambda_range
    return Gates(mean, std, samples, ids, names, kind, (float(lo_hi[0]), float(lo_hi[1])))


def plot_gates(gates: Gates, path: str | os.PathLike) -> Path:
    """One PNG: per MoE layer, the λ distribution of every context (violins, means marked)."""
    fig, axes = new_figure(len(gates.layers), (max(3.0, 1.0 + 0.9 * len(gates.contexts)), 3.0))
    # λ ≡ 0 in blocks without an anchor: widen the axis to whatever was measured.
    lo = min(gates.lambda_range[0], *(float(m.min()) for m in gates.mean.values()))
    hi = max(gates.lambda_range[1], *(float(m.max()) for m in gates.mean.values()))
    for ax, b in zip(axes, gates.layers, strict=True):
        data = [s if s.size else np.array([np.nan]) for s in gates.samples[b]]
        pos = np.arange(1, len(data) + 1)
        parts = ax.violinplot(data, positions=pos, showextrema=False)
        for body in parts["bodies"]:
            body.set_alpha(0.6)
        ax.scatter(pos, gates.mean[b], color="black", marker="_", s=200, zorder=3, label="mean")
        ax.set_xticks(pos, gates.context_names, rotation=30, ha="right")
        ax.set_ylim(lo - 0.02 * (hi - lo), hi + 0.02 * (hi - lo))
        ax.set_ylabel("λ (anchor weight)")
        ax.set_title(f"block {b}", fontsize=10)
    fig.suptitle(f"Dual-stream mixing weight λ per {gates.kind} context")
    return save(fig, path)


def gate_trajectory(series: Sequence[Gates], labels: Sequence[str]) -> dict[str, Any]:
    """Mean λ per layer and context along a series of checkpoints (``labels`` name them, e.g. steps).

    Returns ``{"labels": [...], "layers": {block: {context name: [mean per checkpoint]}}}``.
    """
    if len(series) != len(labels):
        raise ValueError(f"{len(labels)} labels for {len(series)} checkpoints")
    if not series:
        raise ValueError("a λ trajectory needs at least one checkpoint")
    layers = series[0].layers
    for g, label in zip(series, labels, strict=True):
        if g.layers != layers or g.context_names != series[0].context_names:
            raise ValueError(
                f"checkpoint {label!r} has layers {g.layers} / contexts {g.context_names}, expected "
                f"{layers} / {series[0].context_names} as in {labels[0]!r}"
            )
    return {
        "labels": list(labels),
        "layers": {
            str(b): {
                name: [float(g.mean[b][c]) for g in series] for c, name in enumerate(series[0].context_names)
            }
            for b in layers
        },
    }


def plot_gate_trajectory(trajectory: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """One PNG: mean λ per context against checkpoint, a panel per layer."""
    return checkpoint_curves(
        trajectory["layers"], trajectory["labels"], path, "mean λ", "Mean λ over training"
    )
