"""The demo's analysis step and report: routing affinity and λ per layer (``prism_vfm.analysis``), a grid of
predictions next to the ground truth, the metrics table, and a Markdown page that says what they show and
what they cannot."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from prism_vfm.analysis import gate_statistics, plot_affinity, plot_gates, routing_affinity
from prism_vfm.analysis.common import student_of
from prism_vfm.data.dense_transforms import DenseTestTransform
from prism_vfm.data.pascal_context import PascalContext
from prism_vfm.data.registry import HEADLINE_METRICS, LOWER_IS_BETTER, dataset_tasks, get_dataset
from prism_vfm.demo.pipeline import CONTROL, DATASET, run_checkpoint
from prism_vfm.demo.teachers import DEMO_TEACHERS, ROLES
from prism_vfm.errors import MissingExtraError
from prism_vfm.metrics.dense import SegmentationMeter
from prism_vfm.metrics.multitask import prediction_for_metric
from prism_vfm.models.dense_head import HEAD_DOWN_RATIO
from prism_vfm.models.multitask import PrismMultiTask
from prism_vfm.models.prism_vit import ContextKind, PrismViT

TEACHER_LABELS = [f"{n.removeprefix('demo_')} ({ROLES[n]})" for n in DEMO_TEACHERS]


TARGETS: dict[tuple[str, str], float] = {
    ("semseg", "mIoU (present classes)"): 60.0,
    ("human_parts", "mIoU (present classes)"): 40.0,
    ("sal", "maxF"): 85.0,
    ("normals", "mErr"): 15.0,
    ("edge", "odsF"): 45.0,
}
"""What the demo aims for on the scenes (metric names of ``eval/metrics.json``, plus mIoU over the classes
present in the val ground truth); lower is better for ``mErr``."""


def _val_batches(reader: PascalContext) -> list[torch.Tensor]:
    return [
        torch.stack([reader[i]["image"] for i in range(j, min(j + 8, len(reader)))])
        for j in range(0, len(reader), 8)
    ]


def analyse(
    out: Path,
    stage1: Path,
    stage2: Path,
    data: Path,
    img_size: int,
    specialisation: Mapping[str, dict[str, Any]],
    scores: Mapping[str, Mapping[str, float]],
) -> tuple[dict[str, Path], dict[str, Any]]:
    """Routing affinity and λ statistics of the Stage-1 student (teacher contexts) and the Stage-2 model
    (task contexts) on the val images, the scores on the classes present, a prediction grid and their
    figures under ``out/figures``; ``specialisation`` (``specialisation_of`` by kind of context) joins
    the analysis."""
    from prism_vfm.models.load import load

    figures_dir = out / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    size = (img_size, img_size)
    student = PrismViT.from_pretrained(stage1).eval()
    multi = cast(PrismMultiTask, load(stage2, img_size=size, multitask=True)[0])
    tasks = multi.task_names
    reader = PascalContext(data, "val", tasks, DenseTestTransform(size))
    batches = _val_batches(reader)

    teachers = list(range(len(DEMO_TEACHERS)))
    task_ids = list(range(len(tasks)))
    aff_teacher = routing_affinity(student, batches, teachers, "teacher", context_names=TEACHER_LABELS)
    aff_task = routing_affinity(multi, batches, task_ids, "task", context_names=tasks)
    gates_teacher = gate_statistics(student, batches, teachers, "teacher", context_names=TEACHER_LABELS)
    gates_task = gate_statistics(multi, batches, task_ids, "task", context_names=tasks)
    figures = {
        "routing_teachers": plot_affinity(aff_teacher, figures_dir / "routing_teachers.png"),
        "routing_tasks": plot_affinity(aff_task, figures_dir / "routing_tasks.png"),
        "lambda_teachers": plot_gates(gates_teacher, figures_dir / "lambda_teachers.png"),
        "lambda_tasks": plot_gates(gates_task, figures_dir / "lambda_tasks.png"),
        "lambda_by_depth": _plot_lambda_by_depth(
            gates_teacher, gates_task, figures_dir / "lambda_by_depth.png"
        ),
        "predictions": _plot_predictions(multi, reader, figures_dir / "predictions.png"),
    }
    present = present_class_scores(multi, reader)
    analysis = {
        "routing_teachers": aff_teacher.to_dict(),
        "routing_tasks": aff_task.to_dict(),
        "lambda_teachers": gates_teacher.to_dict(),
        "lambda_tasks": gates_task.to_dict(),
        "layers": aff_teacher.layers,
        "separation_teachers": {b: aff_teacher.separation[b] for b in aff_teacher.layers},
        "separation_tasks": {b: aff_task.separation[b] for b in aff_task.layers},
        "lambda_mean_teachers": {b: float(gates_teacher.mean[b].mean()) for b in gates_teacher.layers},
        "lambda_mean_tasks": {b: float(gates_task.mean[b].mean()) for b in gates_task.layers},
        "present_classes": present,
        "specialisation": dict(specialisation),
        "targets": target_rows(scores, present),
    }
    (out / "analysis.json").write_text(json.dumps(analysis, indent=2, default=float))
    return figures, analysis


@torch.no_grad()
def present_class_scores(model: PrismMultiTask, reader: PascalContext) -> dict[str, dict[str, Any]]:
    """mIoU of semseg and human parts over the classes present in the val ground truth (the scenes hold a
    few of PASCAL's classes; the headline mIoU averages over all of them), with each class's IoU."""
    tasks = [t for t in ("semseg", "human_parts") if t in model.task_names]
    channels = dataset_tasks(DATASET)
    meters = {t: SegmentationMeter(channels[t], t) for t in tasks}
    model.eval()
    for j in range(0, len(reader), 8):
        samples = [reader[i] for i in range(j, min(j + 8, len(reader)))]
        outputs = model(torch.stack([s["image"] for s in samples])).predictions
        for t, meter in meters.items():
            meter.update(prediction_for_metric(t, outputs[t]), torch.stack([s[t] for s in samples]))
    result: dict[str, dict[str, Any]] = {}
    for t, meter in meters.items():
        tp = meter.tp.double()
        iou = tp / (tp + meter.fp + meter.fn).clamp_min(1)
        present = (meter.confusion.sum(1) > 0).nonzero().flatten().tolist()
        result[t] = {
            "mIoU": float(iou[present].mean() * 100) if present else float("nan"),
            "classes": present,
            "IoU": [float(iou[c] * 100) for c in present],
            "predicted_classes": (meter.confusion.sum(0) > 0).nonzero().flatten().tolist(),
        }
    return result


def target_rows(
    scores: Mapping[str, Mapping[str, float]], present: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Each target of :data:`TARGETS` with the value found and whether it is met."""
    rows = []
    for (task, metric), target in TARGETS.items():
        if task not in scores:
            continue
        value = present[task]["mIoU"] if metric.endswith("(present classes)") else scores[task][metric]
        met = value <= target if task in LOWER_IS_BETTER else value >= target
        rows.append(
            {"task": task, "metric": metric, "target": target, "value": float(value), "met": bool(met)}
        )
    return rows


def _edge_ceiling_text(targets: list[dict[str, Any]], cfg: Any) -> list[str]:
    """Why a missed boundary target is missed at this size: the matching tolerance in pixels and the
    head's output grid (measured in ``benchmarks/demo_edge_ceiling.py``)."""
    if all(r["met"] for r in targets if r["task"] == "edge"):
        return []
    tolerance = get_dataset(DATASET).boundary_max_dist_ratio * cfg.img_size * np.sqrt(2)
    grid = cfg.img_size // HEAD_DOWN_RATIO
    return [
        "",
        f"Boundaries are matched within {tolerance:.2f} px at {cfg.img_size} pixels"
        + (" (below a pixel only exact hits count)" if tolerance < 1 else "")
        + (
            ", and the edge head predicts every pixel of its output cells"
            if "edge" in cfg.stage2_subpixel_heads
            else f", and the decoder head draws them from a {grid}×{grid} grid upsampled bilinearly, whose "
            "maxima sit at the cell centres"
        )
        + ": `benchmarks/demo_edge_ceiling.py` measures how high odsF can go at a size, for a perfect "
        "prediction, for a perfect copy of the released training label and for that label on the "
        'released head\'s grid (benchmarks/README.md, "`prism demo`").',
    ]


def specialisation_of(
    kind: ContextKind, runs: Mapping[tuple[str, int], Path], data: Path, img_size: tuple[int, int]
) -> dict[str, Any]:
    """``specialisation_runs`` of the latest checkpoints of the run folders ``runs`` (by ``(contexts,
    seed)``; Stage 1 for ``kind="teacher"``, Stage 2 for ``"task"``) on the val images of ``data``."""
    from prism_vfm.models.load import load

    reader = PascalContext(data, "val", tuple(dataset_tasks(DATASET)), DenseTestTransform(img_size))
    models: dict[tuple[str, int], Any]
    if kind == "teacher":
        models = {k: PrismViT.from_pretrained(run_checkpoint(v)).eval() for k, v in runs.items()}
    else:
        models = {k: load(run_checkpoint(v), img_size=img_size, multitask=True)[0] for k, v in runs.items()}
    return specialisation_runs(models, _val_batches(reader), kind)


def specialisation_runs(
    models: Mapping[tuple[str, int], Any], batches: list[torch.Tensor], kind: ContextKind
) -> dict[str, Any]:
    """Routing separation (NMI between context and selected expert, per MoE layer and its mean over the
    layers) of every run, keyed by ``(contexts, seed)``; per kind of context (own or shuffled) the mean and
    standard deviation of the layer means over the seeds."""
    runs: dict[str, Any] = {}
    for (contexts, seed), model in models.items():
        contexts_ids = list(range(student_of(model).context_table(kind).num_embeddings))
        affinity = routing_affinity(model, batches, contexts_ids, kind)
        per_layer = {b: affinity.separation[b] for b in affinity.layers}
        runs.setdefault(contexts, {})[seed] = {
            "per_layer": per_layer,
            "mean": float(np.mean(list(per_layer.values()))),
        }
    summary = {
        contexts: {
            "seeds": sorted(by_seed),
            "mean": float(np.mean([r["mean"] for r in by_seed.values()])),
            "std": float(np.std([r["mean"] for r in by_seed.values()])),
            "min": float(min(r["mean"] for r in by_seed.values())),
            "max": float(max(r["mean"] for r in by_seed.values())),
        }
        for contexts, by_seed in runs.items()
    }
    return {"kind": kind, "runs": runs, "summary": summary}


def _new_axes(rows: int, cols: int, cell: tuple[float, float]) -> tuple[Any, np.ndarray]:
    try:
        import matplotlib
    except ImportError as exc:  # the optional "analysis" extra
        raise MissingExtraError("the demo report's figures", "matplotlib", "analysis") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(cell[0] * cols, cell[1] * rows), squeeze=False)
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_lambda_by_depth(gates_teacher: Any, gates_task: Any, path: Path) -> Path:
    fig, axes = _new_axes(1, 1, (5.0, 3.2))
    ax = axes[0, 0]
    for gates, style in ((gates_teacher, "-o"), (gates_task, "--s")):
        for c, name in enumerate(gates.context_names):
            ax.plot(gates.layers, [gates.mean[b][c] for b in gates.layers], style, label=name, alpha=0.8)
    ax.set_xlabel("block (dual-stream)")
    ax.set_ylabel("mean λ (anchor weight)")
    ax.set_xticks(gates_teacher.layers)
    ax.set_title("λ per layer: teacher contexts (solid), task contexts (dashed)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def _show(task: str, value: torch.Tensor, truth: bool) -> np.ndarray:
    """An (H, W) or (H, W, 3) picture of a label (``truth``) or a raw head output."""
    if task in ("semseg", "human_parts"):
        labels = value[0] if truth else value.argmax(0)
        return np.where(labels.numpy() == 255, np.nan, labels.numpy())
    if task == "normals":
        n = value if truth else F.normalize(value, dim=0)
        return ((n.permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1)
    if task == "sal":
        p = value[0] if truth else value.softmax(0)[1]
        return np.where(p.numpy() == 255, np.nan, p.numpy())
    p = value[0] if truth else torch.sigmoid(value[0])
    return np.where(p.numpy() == 255, np.nan, p.numpy())


@torch.no_grad()
def _plot_predictions(model: Any, reader: PascalContext, path: Path, n: int = 4) -> Path:
    from prism_vfm.data.image_folder import IMAGENET_MEAN, IMAGENET_STD

    tasks = model.task_names
    samples = [reader[i] for i in range(min(n, len(reader)))]
    outputs = model(torch.stack([s["image"] for s in samples])).predictions
    fig, axes = _new_axes(len(samples), 1 + 2 * len(tasks), (1.3, 1.4))
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    for r, sample in enumerate(samples):
        axes[r, 0].imshow((sample["image"] * std + mean).permute(1, 2, 0).clamp(0, 1).numpy())
        for t, task in enumerate(tasks):
            cmap = {"semseg": "tab10", "human_parts": "tab10"}.get(task, "gray")
            limits = (
                {"vmin": 0, "vmax": 20 if task == "semseg" else 6}
                if task in ("semseg", "human_parts")
                else {}
            )
            for k, (picture, label) in enumerate(
                ((_show(task, sample[task], True), "truth"), (_show(task, outputs[task][r], False), "pred"))
            ):
                ax = axes[r, 1 + 2 * t + k]
                ax.imshow(
                    picture, cmap=cmap, interpolation="nearest", **({} if picture.ndim == 3 else limits)
                )
                if r == 0:
                    ax.set_title(f"{task}\n{label}", fontsize=7)
    axes[0, 0].set_title("image", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    return _save(fig, path)


def plot_metrics(scores: dict[str, Any], baselines: dict[str, float], path: Path) -> Path:
    """Bar chart of the multi-task model's headline metric per task next to its single-task baseline."""
    tasks = list(scores)
    fig, axes = _new_axes(1, len(tasks), (1.8, 2.6))
    for ax, task in zip(axes[0], tasks, strict=True):
        metric = HEADLINE_METRICS[task]
        values = [scores[task][metric], baselines.get(task, np.nan)]
        ax.bar(["multi", "single"], values, color=["tab:blue", "tab:gray"])
        arrow = "↓" if task in LOWER_IS_BETTER else "↑"
        ax.set_title(f"{task}\n{metric} {arrow}", fontsize=8)
        ax.tick_params(labelsize=7)
    return _save(fig, path)


def _trend(values: dict[int, float]) -> str:
    """How a per-layer quantity changes with depth, with every value."""
    layers = sorted(values)
    steps = [values[b] - values[a] for a, b in itertools.pairwise(layers)]
    if all(abs(d) < 0.005 for d in steps):
        word = "is flat"
    elif all(d < 0 for d in steps):
        word = "decreases with depth"
    elif all(d > 0 for d in steps):
        word = "increases with depth"
    else:
        word = "is not monotonic in depth"
    return f"{word} ({', '.join(f'block {b}: {values[b]:.3f}' for b in layers)})"


def _separation_text(sep: dict[int, float], kind: str) -> str:
    best = max(sep, key=sep.__getitem__)
    rows = ", ".join(f"block {b}: {_small(v)}" for b, v in sorted(sep.items()))
    return (
        f"Routing separation by {kind} of this run (normalised mutual information between {kind} and "
        f"selected expert; 0 = every {kind} uses the experts alike, 1 = the expert names the {kind}): {rows} "
        f"(highest in block {best})."
    )


def _small(value: float) -> str:
    """A separation with its digits: three decimals, or two significant ones below 0.01."""
    return f"{value:.3f}" if value >= 0.01 or value == 0 else f"{value:.1e}"


# The demo settings that have a released value, and how the report names them.
RELEASED: tuple[tuple[str, Any, str], ...] = (
    ("expert_init", "copy", "expert initialisation"),
    ("expert_dropout", 0.1, "expert dropout"),
    ("noisy_gating", True, "noisy gating"),
    ("lambda_bias_init", 2.0, "λ gate bias at start"),
    ("context_init_std", 0.02, "initial std of the teacher and task tables"),
    ("router_lr_scale", 1.0, "Stage-1 router learning-rate multiplier"),
    ("routing_router_lr_scale", 1.0, "router learning-rate multiplier of the short Stage-2 runs"),
    ("routing_distill", True, "distillation regulariser in the short Stage-2 runs"),
    ("stage2_distill", True, "distillation regulariser in the multi-task Stage 2"),
    ("stage2_scale_range", (0.5, 2.0), "Stage-2 random rescale range"),
    ("stage2_photometric", True, "Stage-2 photometric distortion"),
    ("stage2_loss_weights", {}, "loss-weight overrides of the multi-task run and the baselines"),
    ("stage2_class_balance", {}, "class-balance exponents of their cross-entropy"),
    ("stage2_subpixel_heads", (), "sub-pixel decoder heads of those runs"),
    ("stage2_edge_label", "released", "their edge training label"),
)
_EDGE_LABEL_SHOWN = {
    "released": "the class map's Laplacian",
    "evaluation": "the boundaries the evaluation matches",
}


def departures_text(cfg: Any) -> str:
    """One sentence listing where ``cfg`` departs from the released recipe ("" when it does not)."""

    def shown(key: str, value: Any) -> str:
        if isinstance(value, bool):
            return "on" if value else "off"
        if key == "stage2_edge_label":
            return _EDGE_LABEL_SHOWN[value]
        if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
            return ", ".join(value) or "none"
        if isinstance(value, tuple):
            return "–".join(f"{v:g}" for v in value)
        if isinstance(value, dict):
            return ", ".join(f"{k} {v:g}" for k, v in value.items()) or "none"
        return f"{value:g}" if isinstance(value, float) else str(value)

    changed = []
    for key, released, label in RELEASED:
        value = getattr(cfg, key)
        if (tuple(value) if isinstance(released, tuple) else value) != released:
            changed.append(f"{label} {shown(key, value)} (released: {shown(key, released)})")
    if not changed:
        return ""
    return (
        "- Where this run departs from the released recipe, so that minutes of training from random weights "
        "can show what the method does (what each setting changes is measured in `benchmarks/README.md`, "
        "section `prism demo`): " + "; ".join(changed) + "."
    )


def specialisation_text(spec: Mapping[str, Any], kind: str, runs_text: str) -> list[str]:
    """The table of every run's separation and a verdict against the shuffled-context control, both from
    the numbers of :func:`specialisation_runs`."""
    own = next(c for c in spec["summary"] if c != CONTROL)
    mine, control = spec["summary"][own], spec["summary"][CONTROL]
    layers = sorted(next(iter(spec["runs"][own].values()))["per_layer"], key=int)
    lines = [
        f"{runs_text} Separation as above, averaged over the dual-stream blocks; the control is the same run "
        f"with the router given random {kind} ids (`{CONTROL}`), so what it shows is the separation that "
        "random contexts give.",
        "",
        "| run | seed | " + " | ".join(f"block {b}" for b in layers) + " | mean |",
        "|---|---|" + "---|" * (len(layers) + 1),
    ]
    for contexts in (own, CONTROL):
        for seed, run in sorted(spec["runs"][contexts].items()):
            cells = " | ".join(_small(run["per_layer"][b]) for b in layers)
            label = f"{kind} contexts" if contexts == own else "shuffled (control)"
            lines.append(f"| {label} | {seed} | {cells} | {_small(run['mean'])} |")
    n = len(mine["seeds"])
    above = mine["min"] > control["max"]
    ratio = mine["mean"] / control["mean"] if control["mean"] > 0 else float("inf")
    if above and ratio >= 2:
        verdict = f"the experts clearly specialise by {kind}: every seed lies above every control run"
    elif above:
        verdict = (
            f"every seed lies above every control run, but by less than a factor of two: a weak "
            f"specialisation by {kind}"
        )
    else:
        verdict = (
            f"the seeds and the control runs overlap: no specialisation by {kind} beyond what random "
            "contexts give appears at this scale"
        )
    lines += [
        "",
        f"Mean over {n} seeds: **{_small(mine['mean'])} ± {_small(mine['std'])}** with {kind} contexts "
        f"(range {_small(mine['min'])}–{_small(mine['max'])}) against **{_small(control['mean'])} ± "
        f"{_small(control['std'])}** with shuffled contexts (range {_small(control['min'])}–"
        f"{_small(control['max'])}), a ratio of {ratio:.1f}: "
        f"{verdict}.",
    ]
    return lines


def write_markdown(
    out: Path,
    cfg: Any,
    metrics: dict[str, Any],
    baselines: dict[str, float],
    analysis: dict[str, Any],
    figures: dict[str, Path],
    probe: dict[str, dict[str, float]],
    timings: dict[str, float],
    seed: int,
    cpu: Mapping[str, float] | None = None,
) -> Path:
    """Write ``out/report.md`` (``cpu``: CPU seconds per stage, beside the wall-clock ``timings``)."""
    cpu = cpu or {}
    scores = metrics["scores"]
    present = analysis["present_classes"]
    seeds = cfg.seeds(seed)
    single = (
        f"{cfg.single_task_steps} steps of batch {cfg.single_task_batch} each, "
        + ("with" if cfg.single_task_distill else "without")
        + " the distillation regulariser"
    )
    lines = [
        "# PRISM demo report",
        "",
        f"Seed {seed}. Rendered {cfg.img_size}×{cfg.img_size} scenes; student ViT of width {cfg.width}, "
        f"patch {cfg.patch_size}, {cfg.depth} blocks, dual-stream blocks {list(cfg.moe_layers)} with "
        f"{cfg.num_experts} experts (top-{cfg.top_k}); three tiny teachers of width {cfg.teachers.width}. "
        f"Stage 1: {cfg.stage1_steps} steps of batch {cfg.stage1_batch} on {cfg.stage1_images} unlabelled "
        f"images, for seeds {seeds}, each also with shuffled teacher contexts; Stage 2: {cfg.stage2_steps} "
        f"steps of batch {cfg.stage2_batch} on {cfg.train_images} PASCAL-Context-layout images from the "
        f"seed-{seed} student, plus runs of {cfg.routing_steps} steps of batch {cfg.routing_batch} for seeds "
        f"{seeds} with task and with "
        f"shuffled contexts; evaluation on {metrics['images']} val images. The NYUD-v2 layout is written too "
        "(`data/NYUDv2`, for `prism finetune --dataset nyud`).",
        "",
        "## Metrics",
        "",
        f"Multi-task PRISM model against one single-task model per task from the same Stage-1 student "
        f"({single}; the multi-task model: {cfg.stage2_steps} steps of batch {cfg.stage2_batch} "
        + ("with" if cfg.stage2_distill else "without")
        + " it). Δm is computed against those "
        "single-task models (SPEC §9).",
        "",
        "| task | metric | multi-task | single-task | relative gain |",
        "|---|---|---|---|---|",
    ]
    for task, values in scores.items():
        metric = HEADLINE_METRICS[task]
        multi, base = values[metric], baselines[task]
        sign = -1 if task in LOWER_IS_BETTER else 1
        gain = sign * (multi - base) / base * 100 if base else float("nan")
        arrow = "↓" if task in LOWER_IS_BETTER else "↑"
        lines.append(f"| {task} | {metric} {arrow} | {multi:.2f} | {base:.2f} | {gain:+.1f}% |")
    lines += [
        "",
        f"**Δm = {metrics['delta_m']:+.2f}%** (positive: the multi-task model beats the single-task ones).",
        "",
        "All scores of every task (boundary odsF, oisF and AP included) are in `eval/metrics.json`. The "
        "headline mIoU averages over all PASCAL classes (SPEC §9); the scenes hold only a few, so here is "
        "the multi-task model's mIoU over the classes present in the val ground truth:",
        "",
        "| task | classes present | IoU per class | mIoU (present classes) | classes predicted |",
        "|---|---|---|---|---|",
    ]
    for task, row in present.items():
        ious = ", ".join(f"{c}: {v:.1f}" for c, v in zip(row["classes"], row["IoU"], strict=True))
        lines.append(
            f"| {task} | {row['classes']} | {ious} | {row['mIoU']:.2f} | {row['predicted_classes']} |"
        )
    met = [r for r in analysis["targets"] if r["met"]]
    lines += [
        "",
        f"Targets of the demo, met {len(met)} of {len(analysis['targets'])}:",
        "",
        "| task | metric | target | found | met |",
        "|---|---|---|---|---|",
        *[
            f"| {r['task']} | {r['metric']} | {'≤' if r['task'] in LOWER_IS_BETTER else '≥'} {r['target']:g} "
            f"| {r['value']:.2f} | {'yes' if r['met'] else 'no'} |"
            for r in analysis["targets"]
        ],
        *_edge_ceiling_text(analysis["targets"], cfg),
        "",
        "![metrics](figures/metrics.png)",
        "",
        "## What each teacher knows",
        "",
        "Linear probes on each teacher's last tap (fitted on half of 64 held-out scenes, scored on the "
        "other half; per patch; class and texture on patches of objects, where texture says nothing "
        "about class):",
        "",
        "| teacher | " + " | ".join(next(iter(probe.values()))) + " |",
        "|---|" + "---|" * len(next(iter(probe.values()))),
    ]
    for name, row in probe.items():
        lines.append(f"| {name} ({ROLES[name]}) | " + " | ".join(f"{v:.2f}" for v in row.values()) + " |")
    spec = analysis["specialisation"]
    lines += [
        "",
        "## Stage 1: do experts specialise by teacher?",
        "",
        *specialisation_text(
            spec["teacher"], "teacher", f"Stage-1 runs of {cfg.stage1_steps} steps for seeds {seeds}."
        ),
        "",
        _separation_text(analysis["separation_teachers"], "teacher") + f" (seed {seed})",
        "",
        "![routing by teacher](figures/routing_teachers.png)",
        "",
        "## Stage 2: are experts recombined per task?",
        "",
        *specialisation_text(
            spec["task"],
            "task",
            f"Stage-2 runs of {cfg.routing_steps} steps of batch {cfg.routing_batch} from the seed-{seed} "
            f"student for seeds {seeds}.",
        ),
        "",
        _separation_text(analysis["separation_tasks"], "task") + f" (the {cfg.stage2_steps}-step model)",
        "",
        "![routing by task](figures/routing_tasks.png)",
        "",
        "## λ per layer (the anchor's weight; 1 − λ goes to the experts)",
        "",
        f"Mean λ over teacher contexts {_trend(analysis['lambda_mean_teachers'])}; over task contexts "
        f"{_trend(analysis['lambda_mean_tasks'])}. The paper reports λ high in shallow blocks and lower in "
        "deep ones.",
        "",
        "![λ by depth](figures/lambda_by_depth.png)",
        "",
        "![λ per teacher](figures/lambda_teachers.png) ![λ per task](figures/lambda_tasks.png)",
        "",
        "## Predictions next to the ground truth (val images)",
        "",
        "![predictions](figures/predictions.png)",
        "",
        "## What this demo shows, and what it cannot",
        "",
        "- It shows the whole pipeline working end to end with the library's own code: data in the release "
        "layouts read by the real readers, Stage-1 distillation with teacher contexts, Stage-2 multi-task "
        "fine-tuning with task contexts, the paper's metrics (odsF without MATLAB) and Δm, and the routing "
        "and λ analyses.",
        "- The teachers are tiny ViTs pretrained for seconds on rendered scenes, not vision foundation "
        "models; they stand in for DINOv2, CLIP and SAM only in that each knows something different "
        "(texture, category, geometry). What the student learns from them says nothing about distilling the "
        "real ones: at the default settings, Stage 2 from a student given one Stage-1 step instead of the "
        "full run scored higher on every task (`benchmarks/README.md`, section `prism demo`), so these "
        "teachers do not make the distilled student a better start; the demo's Stage 1 shows the routing "
        "by teacher.",
        f"- The student is random-initialised and trained for minutes on {cfg.img_size}-pixel images; the "
        "scores are not comparable with the paper's. The single-task baselines are trained as stated above, "
        "so Δm measures against them only. Δm varies from seed to seed; run with a few `--seed` values "
        "before reading anything into one difference.",
        "- Whether expert specialisation and the λ profile appear at this scale is what the numbers above "
        "report, not a claim about the full-size model.",
        *([departures_text(cfg)] if departures_text(cfg) else []),
        "",
        "## Time per stage (the analysis and this report come after, see `summary.json`)",
        "",
        "Wall-clock seconds depend on what else the machine runs; CPU seconds (this process and the "
        "worker processes of the trainings, all their threads) do not. The trainings run side by side; "
        "their CPU seconds per stage are listed below them.",
        "",
        "| stage | wall s | CPU s |",
        "|---|---|---|",
        *[f"| {k} | {v:.1f} | {cpu.get(k, float('nan')):.1f} |" for k, v in timings.items()],
        *[f"| – {k} | | {v:.1f} |" for k, v in cpu.items() if k not in timings],
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_report(
    out: Path,
    cfg: Any,
    stage1: Path,
    stage2: Path,
    data: Path,
    metrics: dict[str, Any],
    baselines: dict[str, float],
    timings: dict[str, float],
    specialisation: Mapping[str, dict[str, Any]],
    probe: dict[str, dict[str, float]],
    seed: int,
    cpu: Mapping[str, float] | None = None,
) -> tuple[dict[str, Path], dict[str, Any]]:
    """Analysis, figures and ``report.md``; returns the figure paths by name and the analysis.

    ``stage1`` is the checkpoint of the demo seed's Stage-1 student, which ``stage2`` (the multi-task
    model) started from; ``specialisation`` holds ``specialisation_of`` of the seed and control runs by
    kind of context (``"teacher"``, ``"task"``), ``probe`` the teachers' ``teacher_probe``.
    """
    figures, analysis = analyse(out, stage1, stage2, data, cfg.img_size, specialisation, metrics["scores"])
    figures["metrics"] = plot_metrics(metrics["scores"], baselines, out / "figures" / "metrics.png")
    write_markdown(out, cfg, metrics, baselines, analysis, figures, probe, timings, seed, cpu)
    return figures, analysis
