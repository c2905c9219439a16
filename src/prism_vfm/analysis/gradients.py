"""Gradient conflict: each teacher's distillation gradient on every FFN module, on the same images.

For every batch and every teacher t the whole batch is run under teacher context t, projected for t and
compared with teacher t's features (the Stage-1 loss without decorrelation or load balancing, SPEC §5);
the gradient of that loss is taken with respect to each routed expert, the shared expert, the anchor and
the dense FFN of every block. Per (batch, module) this gives T gradient vectors, summarised by their
norms and pairwise cosines. A routed expert that only one teacher routes to gets gradient from that
teacher alone; the dense paths (anchor, shared expert, dense FFNs) collect all teachers' gradients, and
that is where they can conflict.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prism_vfm.analysis.common import check_contexts, eval_mode, student_of
from prism_vfm.analysis.plotting import new_figure, save
from prism_vfm.layers.dual_stream import DualStreamBlock
from prism_vfm.losses.distill import DistillLoss
from prism_vfm.models.prism_vit import PrismViT

KINDS = ("routed", "shared", "anchor", "dense")
_KIND_COLOURS = {"routed": "tab:blue", "shared": "tab:orange", "anchor": "tab:green", "dense": "tab:red"}


@dataclass
class _Module:
    name: str
    kind: str
    layer: int
    params: list[nn.Parameter]
    expert: int | None = None  # row of the stacked expert tensors


@dataclass
class GradientConflict:
    """Per (batch, module) sample: the T per-teacher gradient norms and their pairwise cosines.

    ``norms`` is (S, T) and ``cosines`` (S, T, T) (NaN where either gradient is zero); ``module``,
    ``kind`` (one of ``routed``, ``shared``, ``anchor``, ``dense``), ``layer`` and ``batch`` label the rows.
    """

    teacher_names: list[str]
    norms: np.ndarray
    cosines: np.ndarray
    module: list[str]
    kind: list[str]
    layer: list[int]
    batch: list[int]
    info: dict[str, Any] = field(default_factory=dict)

    def normalized_norms(self) -> np.ndarray:
        """Norms divided by each row's largest: the dominant teacher of a module-batch gets 1."""
        top = self.norms.max(1, keepdims=True)
        return np.divide(self.norms, top, out=np.zeros_like(self.norms), where=top > 0)

    def participation(self) -> np.ndarray:
        """Effective number of teachers per row, ``(Σ_t n_t)² / Σ_t n_t²`` of the norms: 1 when a single
        teacher sends gradient, T when all send equal amounts; NaN for a module no teacher reaches."""
        s1, s2 = self.norms.sum(1), (self.norms**2).sum(1)
        return np.divide(s1**2, s2, out=np.full_like(s1, np.nan), where=s2 > 0)

    def interaction_by_layer(self) -> dict[int, dict[str, float]]:
        """Mean effective number of teachers per layer and module kind (modules reached by some teacher)."""
        part = self.participation()
        kinds, layers = np.array(self.kind), np.array(self.layer)
        out: dict[int, dict[str, float]] = {}
        for layer in sorted(set(self.layer)):
            for kind in KINDS:
                sel = (layers == layer) & (kinds == kind) & ~np.isnan(part)
                if sel.any():
                    out.setdefault(layer, {})[kind] = float(part[sel].mean())
        return out

    def pair_cosines(self, a: int, b: int, kind: str | None = None) -> np.ndarray:
        """Cosines between teachers ``a`` and ``b`` over rows where both gradients are non-zero."""
        c = self.cosines[:, a, b]
        keep = ~np.isnan(c)
        if kind is not None:
            keep &= np.array(self.kind) == kind
        return c[keep]

    def to_dict(self) -> dict[str, Any]:
        """JSON summary: per kind the mean normalised norms and cosine statistics, interaction per layer."""
        norm = self.normalized_norms()
        kinds = np.array(self.kind)
        reached = self.norms.max(1) > 0
        by_kind: dict[str, Any] = {}
        for kind in KINDS:
            sel = (kinds == kind) & reached
            if not sel.any():
                continue
            entry: dict[str, Any] = {
                "samples": int(sel.sum()),
                "unreached": int(((kinds == kind) & ~reached).sum()),
                "mean_normalized_norm": dict(
                    zip(self.teacher_names, norm[sel].mean(0).tolist(), strict=True)
                ),
                "cosine": {},
            }
            for a, b in itertools.combinations(range(len(self.teacher_names)), 2):
                c = self.pair_cosines(a, b, kind)
                entry["cosine"][f"{self.teacher_names[a]}–{self.teacher_names[b]}"] = (
                    {
                        "mean": float(c.mean()),
                        "median": float(np.median(c)),
                        "negative": float((c < 0).mean()),
                    }
                    if c.size
                    else None
                )
            by_kind[kind] = entry
        return {
            "teachers": self.teacher_names,
            "by_kind": by_kind,
            "effective_teachers_per_layer": {str(k): v for k, v in self.interaction_by_layer().items()},
            **self.info,
        }


def _ffn_modules(student: PrismViT) -> list[_Module]:
    """The FFN modules of every block the forward runs: routed experts, shared expert, anchor, dense MLP."""
    out: list[_Module] = []
    for i, block in enumerate(student.blocks[: student.tap_layers[-1] + 1]):
        if isinstance(block, DualStreamBlock):
            experts = block.moe.experts
            stacked = [experts.w1, experts.b1, experts.w2, experts.b2]
            out += [
                _Module(f"block {i} expert {e}", "routed", i, stacked, e) for e in range(experts.num_experts)
            ]
            if block.moe.shared is not None:
                out.append(_Module(f"block {i} shared", "shared", i, list(block.moe.shared.parameters())))
            anchor = getattr(block, "anchor", None)
            if isinstance(anchor, nn.Module) and any(True for _ in anchor.parameters()):
                out.append(_Module(f"block {i} anchor", "anchor", i, list(anchor.parameters())))
        elif isinstance(mlp := getattr(block, "mlp", None), nn.Module):
            out.append(_Module(f"block {i} dense FFN", "dense", i, list(mlp.parameters())))
    return out


def gradient_conflict(
    model: nn.Module,
    batches: Iterable[Tensor],
    teachers: Sequence[Callable[[Tensor], Sequence[Tensor]]],
    contexts: Sequence[int] | None = None,
    teacher_names: Sequence[str] | None = None,
    device: str = "cpu",
    cos_weight: float = 0.9,
    l1_weight: float = 0.1,
) -> GradientConflict:
    """Per-teacher distillation gradients of every FFN module, batch by batch (see the module notes).

    Args:
        model: a student with projector heads (Stage 1), or a multi-task model whose student kept them.
        batches: normalised images (B, 3, H, W) at the model's input size.
        teachers: one callable per teacher mapping the images to its per-tap feature maps (B, C, h, w),
            e.g. :func:`prism_vfm.teachers.build_teacher` modules; ``teachers[i]`` is teacher id
            ``contexts[i]`` (default ``0..T-1``), whose context and projector heads the student uses.
        teacher_names: labels (default ``teacher <id>``).

    The student runs in eval mode (clean routing); its parameters' ``requires_grad`` and ``.grad`` are left
    as they were.
    """
    student = student_of(model).to(device)
    if student.projectors is None:
        raise ValueError(
            "gradient conflict needs a student with projector heads (built with projectors=True)"
        )
    if len(teachers) < 2:
        raise ValueError(f"gradient conflict compares teachers: give at least two, got {len(teachers)}")
    ids = check_contexts(student, range(len(teachers)) if contexts is None else contexts, "teacher")
    if len(ids) != len(teachers):
        raise ValueError(f"{len(ids)} teacher context ids {ids} for {len(teachers)} teachers")
    names = [f"teacher {t}" for t in ids] if teacher_names is None else [str(n) for n in teacher_names]
    if len(names) != len(ids):
        raise ValueError(f"{len(names)} teacher names {names} for {len(ids)} teachers")
    modules = _ffn_modules(student)
    params = list({id(p): p for m in modules for p in m.params}.values())
    index = {id(p): j for j, p in enumerate(params)}
    criterion = DistillLoss("cos+l1", cos_weight=cos_weight, l1_weight=l1_weight)
    flags = [p.requires_grad for p in params]
    norms, cosines, batch_ids = [], [], []
    try:
        for p in params:
            p.requires_grad_(True)
        with eval_mode(student), torch.enable_grad():
            for b, x in enumerate(batches):
                x = x.to(device)
                grid = student.grid_size(x)
                per_teacher: list[list[Tensor]] = []
                for t, teacher in zip(ids, teachers, strict=True):
                    with torch.no_grad():
                        target = [f.float() for f in teacher(x)]
                    proj = student.project(student(x, t, "teacher").taps, t, grid)
                    loss = criterion({t: proj}, {t: target})["total"]
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    per_teacher.append(
                        [_module_grad(m, grads, index) for m in modules]  # one flat vector per module
                    )
                for j in range(len(modules)):
                    g = torch.stack([per_teacher[t][j] for t in range(len(ids))]).double()
                    gram = g @ g.T
                    n = gram.diagonal().clamp_min(0).sqrt()
                    denom = torch.outer(n, n)
                    cos = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.nan)
                    norms.append(n.cpu().numpy())
                    cosines.append(cos.clamp(-1, 1).cpu().numpy())
                    batch_ids.append(b)
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    if not norms:
        raise ValueError("no batches: gradient conflict needs at least one batch of images")
    n_batches = batch_ids[-1] + 1
    return GradientConflict(
        teacher_names=names,
        norms=np.stack(norms),
        cosines=np.stack(cosines),
        module=[m.name for m in modules] * n_batches,
        kind=[m.kind for m in modules] * n_batches,
        layer=[m.layer for m in modules] * n_batches,
        batch=batch_ids,
        info={"batches": n_batches, "contexts": ids},
    )


def _module_grad(module: _Module, grads: Sequence[Tensor | None], index: dict[int, int]) -> Tensor:
    parts = []
    for p in module.params:
        g = grads[index[id(p)]]
        g = torch.zeros_like(p) if g is None else g
        parts.append((g if module.expert is None else g[module.expert]).reshape(-1))
    return torch.cat(parts)


def plot_gradient_conflict(conflict: GradientConflict, path: str | os.PathLike) -> Path:
    """One PNG: per teacher pair the joint distribution of normalised gradient norms (one dot per module
    and batch, coloured by module kind), the cosine distributions by kind, and the effective number of
    teachers per layer and kind."""
    t = len(conflict.teacher_names)
    pairs = list(itertools.combinations(range(t), 2))
    fig, axes = new_figure(len(pairs) + 2, (3.6, 3.4), max_cols=min(len(pairs) + 2, 5))
    norm = conflict.normalized_norms()
    kinds = np.array(conflict.kind)
    reached = conflict.norms.max(1) > 0
    present = [k for k in KINDS if ((kinds == k) & reached).any()]
    for ax, (a, b) in zip(axes, pairs, strict=False):
        for kind in present:
            sel = (kinds == kind) & reached
            ax.scatter(norm[sel, a], norm[sel, b], s=10, alpha=0.6, color=_KIND_COLOURS[kind], label=kind)
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel(f"‖∇{conflict.teacher_names[a]}‖ (normalised)")
        ax.set_ylabel(f"‖∇{conflict.teacher_names[b]}‖ (normalised)")
        ax.set_title(f"{conflict.teacher_names[a]} vs {conflict.teacher_names[b]}", fontsize=10)
    axes[0].legend(fontsize=7, loc="lower left")
    ax = axes[len(pairs)]
    bins = np.linspace(-1, 1, 41)
    for kind in present:
        values = np.concatenate([conflict.pair_cosines(a, b, kind) for a, b in pairs])
        if values.size:
            ax.hist(values, bins=bins, alpha=0.5, density=True, color=_KIND_COLOURS[kind], label=kind)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("cosine between teachers' gradients")
    ax.set_ylabel("density")
    ax.set_title("gradient cosines (all teacher pairs)", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[len(pairs) + 1]
    inter = conflict.interaction_by_layer()
    layers = sorted(inter)
    width = 0.8 / max(len(present), 1)
    for j, kind in enumerate(present):
        heights = [inter[layer].get(kind, np.nan) for layer in layers]
        ax.bar(np.arange(len(layers)) + j * width, heights, width, color=_KIND_COLOURS[kind], label=kind)
    ax.set_xticks(np.arange(len(layers)) + width * (len(present) - 1) / 2, [str(x) for x in layers])
    ax.set_xlabel("block")
    ax.set_ylabel("effective number of teachers")
    ax.set_ylim(0, t + 0.2)
    ax.set_title("interaction per layer (1 = one teacher)", fontsize=10)
    fig.suptitle("Per-teacher distillation gradients of the FFN modules")
    return save(fig, path)
