"""Routing affinity: how often each context selects each expert, per MoE layer, and how separable it is."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from prism_vfm.analysis.common import check_contexts, context_passes, resolve_names, student_of
from prism_vfm.layers.dual_stream import BlockRouting
from prism_vfm.models.prism_vit import ContextKind


@dataclass
class Affinity:
    """P(expert selected | context) per MoE layer.

    ``probs[block]`` is (num_contexts, num_experts): the fraction of a context's tokens (CLS included)
    whose top-k holds the expert with a positive weight. A token selects ``top_k`` experts, so **each row
    sums to top_k**; :meth:`shares` gives the rows normalised to 1. ``separation[block]`` is the
    normalised mutual information between context and selected expert (:func:`normalized_mutual_information`):
    0 when every context routes alike, 1 when the selected expert names the context.
    """

    probs: dict[int, np.ndarray]
    separation: dict[int, float]
    contexts: list[int]
    context_names: list[str]
    kind: str = "teacher"
    top_k: int = 1
    tokens: dict[int, int] = field(default_factory=dict)  # tokens counted per context, per layer

    @property
    def layers(self) -> list[int]:
        return sorted(self.probs)

    @property
    def num_experts(self) -> int:
        return next(iter(self.probs.values())).shape[1]

    def shares(self, block: int) -> np.ndarray:
        """Rows of ``probs[block]`` normalised to sum 1: each context's share of its expert selections."""
        p = self.probs[block]
        return p / np.clip(p.sum(1, keepdims=True), 1e-12, None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per layer the matrix (rows = contexts) and the separation score."""
        return {
            "kind": self.kind,
            "contexts": self.contexts,
            "context_names": self.context_names,
            "top_k": self.top_k,
            "layers": {
                str(b): {
                    "probs": self.probs[b].round(6).tolist(),
                    "separation": self.separation[b],
                    "tokens_per_context": self.tokens.get(b),
                }
                for b in self.layers
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Affinity:
        """Inverse of :meth:`to_dict`."""
        layers = {int(b): v for b, v in d["layers"].items()}
        return cls(
            probs={b: np.asarray(v["probs"], dtype=np.float64) for b, v in layers.items()},
            separation={b: float(v["separation"]) for b, v in layers.items()},
            contexts=list(d["contexts"]),
            context_names=list(d["context_names"]),
            kind=d.get("kind", "teacher"),
            top_k=int(d.get("top_k", 1)),
            tokens={b: v["tokens_per_context"] for b, v in layers.items() if v.get("tokens_per_context")},
        )


def normalized_mutual_information(counts: np.ndarray) -> float:
    """I(C; E) / min(H(C), H(E)) of the joint distribution of context C and selected expert E.

    ``counts`` is (contexts, experts): how often each context selected each expert. The joint is the
    normalised count table, so a context weighs by how many selections it made. In [0, 1]; 0 when a
    context or expert is certain (nothing to separate).
    """
    joint = np.asarray(counts, dtype=np.float64)
    total = joint.sum()
    if total <= 0:
        return 0.0
    joint = joint / total
    pc, pe = joint.sum(1), joint.sum(0)

    def entropy(p: np.ndarray) -> float:
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    hc, he = entropy(pc), entropy(pe)
    if min(hc, he) <= 0:
        return 0.0
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pc, pe)[nz])).sum())
    return float(np.clip(mi / min(hc, he), 0.0, 1.0))


@torch.no_grad()
def routing_affinity(
    model: nn.Module,
    batches: Iterable[Tensor],
    contexts: Sequence[int],
    kind: ContextKind = "teacher",
    device: str = "cpu",
    context_names: Sequence[str] | None = None,
) -> Affinity:
    """P(expert selected | context) per MoE layer over ``batches``, every image seen under every context.

    Args:
        model: a :class:`~prism_vfm.PrismViT` or :class:`~prism_vfm.PrismMultiTask` (its student is used);
            it is moved to ``device`` and run in eval mode (clean routing), its mode restored afterwards.
        batches: iterable of normalised image tensors (B, 3, H, W) at the model's input size.
        contexts: context ids (teacher ids for ``kind="teacher"``, task ids for ``kind="task"``).
        context_names: labels for the plots (default: task names of a multi-task model, else ids).
    """
    student = student_of(model).to(device)
    ids = check_contexts(student, contexts, kind)
    names = resolve_names(model, ids, kind, context_names)
    k = student.moe_config.top_k
    rows = torch.tensor(ids)
    counts: dict[int, Tensor] = {}
    tokens: dict[int, int] = {}
    for b, out in context_passes(student, batches, ids, kind, device):
        stats = student.routing_stats(out)
        routing = cast("dict[int, BlockRouting]", out.routing)
        for i, hist in zip(stats["layers"], stats["expert_counts"], strict=True):
            counts[i] = counts.get(i, 0) + hist.cpu().double()[rows]
            tokens[i] = tokens.get(i, 0) + b * routing[i].indices.shape[1]
    if not counts:
        raise ValueError("no batches: routing affinity needs at least one batch of images")
    probs = {i: (c / tokens[i]).numpy() for i, c in counts.items()}
    return Affinity(
        probs=probs,
        separation={i: normalized_mutual_information(c.numpy()) for i, c in counts.items()},
        contexts=ids,
        context_names=names,
        kind=kind,
        top_k=k,
        tokens=tokens,
    )


def plot_affinity(
    affinity: Affinity, path: str | os.PathLike, context_names: Sequence[str] | None = None
) -> Path:
    """One PNG: a heatmap per MoE layer (rows contexts, columns experts), titled with its separation."""
    from prism_vfm.analysis.plotting import heatmap_grid

    names = list(context_names) if context_names is not None else affinity.context_names
    panels = [
        (
            affinity.probs[b],
            f"block {b}  (NMI {affinity.separation[b]:.2f})",
        )
        for b in affinity.layers
    ]
    return heatmap_grid(
        panels,
        path,
        row_labels=names,
        xlabel="expert",
        colorbar_label=f"P(expert selected | {affinity.kind})",
        vmax=1.0,
        suptitle=f"Routing affinity ({affinity.kind} contexts, top-{affinity.top_k})",
    )
