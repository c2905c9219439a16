"""``prism analyze``: run one analysis on checkpoints and images, write PNG figures, JSON and Markdown.

Each ``run_<analysis>`` loads what it needs (:mod:`prism_vfm.analysis.loading`), calls the analysis
functions, and writes ``<out>/<analysis>.json``, ``<out>/<analysis>.md`` and its figures; it returns the
JSON summary with the written files under ``"files"``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from prism_vfm.analysis.coactivation import (
    coactivation,
    coactivation_series,
    plot_coactivation,
    plot_coactivation_series,
)
from prism_vfm.analysis.efficiency import efficiency, efficiency_table
from prism_vfm.analysis.gates import gate_statistics, gate_trajectory, plot_gate_trajectory, plot_gates
from prism_vfm.analysis.gradients import gradient_conflict, plot_gradient_conflict
from prism_vfm.analysis.loading import LoadedModel, expand_checkpoints, image_batches, load_for_analysis
from prism_vfm.analysis.plotting import new_figure, save
from prism_vfm.analysis.routing import Affinity, plot_affinity, routing_affinity
from prism_vfm.analysis.seeds import align_affinities, plot_seed_alignment
from prism_vfm.models.prism_vit import ContextKind
from prism_vfm.utils.io import atomic_write

ANALYSES = ("routing", "coactivation", "gradients", "seeds", "gates", "efficiency")


@dataclass(frozen=True)
class Probe:
    """What an analysis runs a model on: the first ``images`` images of the folder ``data`` in batches of
    ``batch_size``, under the context ids ``contexts`` of ``kind`` (default: the model's own kind and every
    id of its table), on ``device``, at ``img_size`` (default: the model's input size)."""

    data: str | os.PathLike | None = None
    kind: str | None = None
    contexts: Sequence[int] | None = None
    images: int = 64
    batch_size: int = 8
    device: str = "cpu"
    img_size: Sequence[int] | None = None

    def folder(self, analysis: str) -> Path:
        """The image folder; an error naming the analysis when none was given."""
        if self.data is None:
            raise ValueError(f"analysis {analysis!r} needs images: give --data (a folder of images)")
        return Path(self.data)

    def load(self, path: str | os.PathLike) -> LoadedModel:
        return load_for_analysis(path, self.img_size, self.device)

    def contexts_of(self, loaded: LoadedModel) -> tuple[ContextKind, list[int]]:
        """The context kind and ids to run ``loaded`` under."""
        kind = cast(ContextKind, self.kind or loaded.default_kind)  # context_table rejects any other kind
        table = loaded.student.context_table(kind)  # raises for task contexts of a Stage-1 model
        ids = list(range(table.num_embeddings)) if self.contexts is None else [int(c) for c in self.contexts]
        return kind, ids

    def batches(self, folder: Path, loaded: LoadedModel) -> list[Tensor]:
        return image_batches(folder, loaded.student.patch_embed.img_size, self.images, self.batch_size)


# Gradient conflict keeps every teacher's FFN gradients for a batch: fewer, smaller batches by default.
DEFAULT_PROBES = {"gradients": Probe(images=16, batch_size=4)}


def analyze(
    analysis: str, checkpoints: Sequence[str | os.PathLike], out: str | os.PathLike, **options: Any
) -> dict:
    """Run ``analysis`` (one of :data:`ANALYSES`). ``options``: the fields of :class:`Probe` (``data``,
    ``kind``, ``contexts``, ``images``, ``batch_size``, ``device``, ``img_size``) and the runner's own
    keyword arguments; for ``efficiency``, the keyword arguments of :func:`run_efficiency`."""
    runners: dict[str, Callable[..., dict]] = {
        "routing": run_routing,
        "coactivation": run_coactivation,
        "gradients": run_gradients,
        "seeds": run_seeds,
        "gates": run_gates,
    }
    if analysis not in ANALYSES:
        raise ValueError(f"unknown analysis {analysis!r}; expected one of {list(ANALYSES)}")
    if not checkpoints:
        raise ValueError(f"analysis {analysis!r} needs at least one checkpoint")
    if analysis == "efficiency":
        return run_efficiency(checkpoints, Path(out), **options)
    names = {f.name for f in fields(Probe)}
    probe = replace(DEFAULT_PROBES.get(analysis, Probe()), **{k: v for k, v in options.items() if k in names})
    extra = {k: v for k, v in options.items() if k not in names}
    return runners[analysis](checkpoints, Path(out), probe, **extra)


# ---------------------------------------------------------------------------------------------- helpers
def _write(out: Path, name: str, summary: dict[str, Any], markdown: str, figures: list[Path]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    files = [str(p) for p in figures]
    files += [str(out / f"{name}.json"), str(out / f"{name}.md")]
    summary = {**summary, "files": files}
    atomic_write(out / f"{name}.json", lambda p: _write_text(p, json.dumps(summary, indent=2)))
    atomic_write(out / f"{name}.md", lambda p: _write_text(p, markdown))
    return summary


def _write_text(path: str, text: str) -> None:
    Path(path).write_text(text)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _affinities(sources: Sequence[Path], probe: Probe, analysis: str) -> list[tuple[str, Affinity]]:
    folder = probe.folder(analysis)
    out = []
    for path in sources:
        loaded = probe.load(path)
        k, ids = probe.contexts_of(loaded)
        batches = probe.batches(folder, loaded)
        aff = routing_affinity(loaded.model, batches, ids, k, probe.device, loaded.context_names(k, ids))
        out.append((loaded.label, aff))
    return out


def _unique_labels(labels: list[str]) -> list[str]:
    return labels if len(set(labels)) == len(labels) else [f"{i}:{x}" for i, x in enumerate(labels)]


def _affinity_markdown(label: str, aff: Affinity) -> str:
    text = f"## {label}\n\n{aff.kind} contexts, top-{aff.top_k}; rows sum to top_k.\n\n"
    text += _table(["block", "separation (NMI)"], [[b, aff.separation[b]] for b in aff.layers]) + "\n"
    for b in aff.layers:
        header = ["context", *(f"e{e}" for e in range(aff.num_experts))]
        rows = [[name, *aff.probs[b][c].round(3).tolist()] for c, name in enumerate(aff.context_names)]
        text += f"### block {b}\n\n" + _table(header, rows) + "\n"
    return text


# ---------------------------------------------------------------------------------------------- runners
def run_routing(
    checkpoints: Sequence[str | os.PathLike],
    out: Path,
    probe: Probe = Probe(),
) -> dict:
    """Routing affinity of each checkpoint (a run folder: its latest): heatmaps, matrices, separation."""
    sources = expand_checkpoints(checkpoints, series=False)
    results = _affinities(sources, probe, "routing")
    labels = _unique_labels([label for label, _ in results])
    figures = [
        plot_affinity(aff, out / ("routing.png" if len(results) == 1 else f"routing_{label}.png"))
        for label, (_, aff) in zip(labels, results, strict=True)
    ]
    summary = {
        "analysis": "routing",
        "checkpoints": {lb: a.to_dict() for lb, (_, a) in zip(labels, results, strict=True)},
    }
    md = "# Routing affinity: P(expert selected | context)\n\n"
    md += "".join(_affinity_markdown(lb, a) for lb, (_, a) in zip(labels, results, strict=True))
    return _write(out, "routing", summary, md, figures)


def run_coactivation(
    checkpoints: Sequence[str | os.PathLike],
    out: Path,
    probe: Probe = Probe(),
    threshold: float | None = None,
) -> dict:
    """Shared experts per layer and context pair along checkpoints (a run folder: all its checkpoints)."""
    sources = expand_checkpoints(checkpoints, series=True)
    results = _affinities(sources, probe, "coactivation")
    labels = _unique_labels([label for label, _ in results])
    series = [coactivation(aff, threshold) for _, aff in results]
    traj = coactivation_series(series, labels)
    figures = [
        plot_coactivation(series[-1], out / "coactivation.png"),
        plot_coactivation_series(traj, out / "coactivation_series.png"),
    ]
    summary = {
        "analysis": "coactivation",
        "series": traj,
        "checkpoints": {lb: co.to_dict() for lb, co in zip(labels, series, strict=True)},
    }
    md = f"# Co-activation (selection frequency ≥ {traj['threshold']:.3f})\n\n"
    md += "Number of experts both contexts of a pair use.\n\n"
    for b, pairs in traj["layers"].items():
        md += f"## block {b}\n\n" + _table(["pair", *labels], [[p, *c] for p, c in pairs.items()]) + "\n"
    return _write(out, "coactivation", summary, md, figures)


def run_seeds(
    checkpoints: Sequence[str | os.PathLike],
    out: Path,
    probe: Probe = Probe(),
) -> dict:
    """Affinities of several runs (the first is the reference) aligned by Hungarian matching."""
    sources = expand_checkpoints(checkpoints, series=False)
    if len(sources) < 2:
        raise ValueError(
            f"seed stability needs two or more runs (the first is the reference), got {len(sources)}"
        )
    results = _affinities(sources, probe, "seeds")
    labels = _unique_labels([Path(c).name or str(c) for c in checkpoints])  # run names, not "step_…"
    alignment = align_affinities(results[0][1], [a for _, a in results[1:]], labels)
    figures = [plot_seed_alignment(alignment, out / "seeds.png")]
    summary = {"analysis": "seeds", **alignment.to_dict()}
    rows = [
        [b, float(np.mean(alignment.agreement[b])), float(np.mean(alignment.unaligned[b]))]
        for b in alignment.layers
    ]
    md = f"# Seed stability (reference: {labels[0]})\n\n"
    md += "Agreement = 1 − mean total-variation distance between the contexts' expert shares.\n\n"
    md += _table(["block", "aligned agreement", "unaligned agreement"], rows)
    return _write(out, "seeds", summary, md, figures)


def run_gates(
    checkpoints: Sequence[str | os.PathLike],
    out: Path,
    probe: Probe = Probe(),
) -> dict:
    """λ per layer and context: the distribution at the last checkpoint and the mean along all of them."""
    sources = expand_checkpoints(checkpoints, series=True)
    folder = probe.folder("gates")
    labels, series = [], []
    for path in sources:
        loaded = probe.load(path)
        k, ids = probe.contexts_of(loaded)
        batches = probe.batches(folder, loaded)
        series.append(
            gate_statistics(loaded.model, batches, ids, k, probe.device, loaded.context_names(k, ids))
        )
        labels.append(loaded.label)
    labels = _unique_labels(labels)
    traj = gate_trajectory(series, labels)
    figures = [
        plot_gates(series[-1], out / "gates.png"),
        plot_gate_trajectory(traj, out / "gates_trajectory.png"),
    ]
    summary = {
        "analysis": "gates",
        "trajectory": traj,
        "checkpoints": {lb: g.to_dict() for lb, g in zip(labels, series, strict=True)},
    }
    last = series[-1]
    rows = [
        [b, name, float(last.mean[b][c]), float(last.std[b][c])]
        for b in last.layers
        for c, name in enumerate(last.context_names)
    ]
    md = f"# λ (anchor weight) at {labels[-1]}\n\n" + _table(["block", "context", "mean", "std"], rows)
    if len(series) > 1:
        md += "\n## mean λ along the checkpoints\n\n"
        md += _table(
            ["block", "context", *labels],
            [[b, name, *v] for b, per in traj["layers"].items() for name, v in per.items()],
        )
    return _write(out, "gates", summary, md, figures)


def run_gradients(
    checkpoints: Sequence[str | os.PathLike],
    out: Path,
    probe: Probe = DEFAULT_PROBES["gradients"],
    teachers: Sequence[str] | None = None,
    teachers_dir: str | None = None,
) -> dict:
    """Per-teacher distillation gradients of every FFN module of one checkpoint (a run folder: its latest).

    Teachers: ``teachers`` (registry names, e.g. ``dinov2_l clip_l sam_l``) or the ones the run recorded;
    weights from ``teachers_dir``, else where the run took them, else the Hub.
    """
    from prism_vfm.teachers import build_teacher

    if probe.kind not in (None, "teacher"):
        raise ValueError(f"gradient conflict is between teachers: kind must be 'teacher', got {probe.kind!r}")
    sources = expand_checkpoints(checkpoints, series=False)
    if len(sources) != 1:
        raise ValueError(f"gradient conflict analyses one checkpoint, got {len(sources)}")
    loaded = probe.load(sources[0])
    names = list(teachers) if teachers else loaded.teachers
    if not names:
        raise ValueError(
            f"{sources[0]} does not record its teachers: give them with --teachers (registry names in "
            "teacher-id order, e.g. dinov2_l clip_l sam_l)"
        )
    ids = list(range(len(names))) if probe.contexts is None else [int(c) for c in probe.contexts]
    if len(ids) != len(names):
        raise ValueError(f"{len(names)} teachers {names} for {len(ids)} teacher ids {ids}")
    size = tuple(loaded.student.patch_embed.img_size)
    weights = teachers_dir or loaded.teacher_weights or "hub"
    built = []
    for name, t in zip(names, ids, strict=True):
        teacher = build_teacher(name, size, weights).to(probe.device)
        if t < len(loaded.student.teacher_dims) and teacher.out_dim != loaded.student.teacher_dims[t]:
            raise ValueError(
                f"teacher {name!r} gives {teacher.out_dim} channels but the student's projector heads of "
                f"teacher id {t} give {loaded.student.teacher_dims[t]}: give the teachers the model was "
                "distilled from, in teacher-id order"
            )
        built.append(teacher)
    batches = probe.batches(probe.folder("gradients"), loaded)
    conflict = gradient_conflict(loaded.model, batches, built, ids, names, probe.device)
    figures = [plot_gradient_conflict(conflict, out / "gradients.png")]
    summary = {"analysis": "gradients", "checkpoint": loaded.label, **conflict.to_dict()}
    md = f"# Gradient conflict ({loaded.label}, {conflict.info['batches']} batches)\n\n"
    md += "Effective number of teachers per module (1 = a single teacher sends gradient):\n\n"
    inter = conflict.interaction_by_layer()
    kinds = sorted({k for v in inter.values() for k in v})
    md += _table(["block", *kinds], [[b, *(v.get(k, "–") for k in kinds)] for b, v in inter.items()]) + "\n"
    rows = []
    for kind_name, entry in summary["by_kind"].items():
        for pair, stats in entry["cosine"].items():
            if stats is not None:
                rows.append([kind_name, pair, stats["mean"], stats["negative"]])
    md += _table(["module", "teacher pair", "mean cosine", "share negative"], rows)
    return _write(out, "gradients", summary, md, figures)


def run_efficiency(
    checkpoints: Sequence[str | os.PathLike],
    out: Path,
    img_size: Sequence[int] | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    latency: bool = True,
    **_: Any,
) -> dict:
    """Parameters, analytic GFLOPs and latency of each model: checkpoints or registered model names."""
    rows: dict[str, dict] = {}
    for source in checkpoints:
        model, label = _efficiency_model(str(source), img_size, device, latency)
        rows[label] = efficiency(model, latency=latency, batch=batch_size, device=device)
    figures = [_plot_efficiency(rows, out / "efficiency.png")]
    md = "# Efficiency (GFLOPs: multiply-accumulates per image, analytic; backbone only)\n\n"
    return _write(
        out, "efficiency", {"analysis": "efficiency", "models": rows}, md + efficiency_table(rows), figures
    )


def _efficiency_model(
    source: str, img_size: Sequence[int] | None, device: str, latency: bool
) -> tuple[torch.nn.Module, str]:
    import timm

    if not Path(source).exists() and source in timm.list_models("prism_vit_*"):
        kwargs: dict[str, Any] = {"img_size": tuple(img_size)} if img_size else {}
        # Counting needs shapes only; timing needs (random) weights.
        with torch.device(device if latency else "meta"):
            return timm.create_model(source, pretrained=False, **kwargs).eval(), source
    loaded = load_for_analysis(source, img_size, device)
    return loaded.model, loaded.label


def _plot_efficiency(rows: dict[str, dict], path: Path) -> Path:
    fig, axes = new_figure(2, (max(3.5, 1.2 * len(rows) + 1.5), 3.2))
    names = list(rows)
    x = np.arange(len(names))
    axes[0].bar(x - 0.2, [r["params_backbone"] / 1e6 for r in rows.values()], 0.4, label="total (backbone)")
    axes[0].bar(x + 0.2, [r["params_active"] / 1e6 for r in rows.values()], 0.4, label="active per token")
    axes[0].set_ylabel("parameters (M)")
    axes[0].legend(fontsize=8)
    axes[1].bar(x, [r["gflops"] for r in rows.values()], 0.5, color="tab:purple")
    axes[1].set_ylabel("GFLOPs per image")
    for ax in axes:
        ax.set_xticks(x, names, rotation=20, ha="right")
    fig.suptitle("Efficiency")
    return save(fig, path)
