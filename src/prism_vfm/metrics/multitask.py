"""Multi-task evaluation: head outputs to meter inputs, per-task routing, and Δm (SPEC §9).

The same ``MultiTaskMeter`` serves training-time validation and standalone evaluation. Its edge entry is
the official edge loss meter (``EdgeLossMeter``); boundary odsF comes from the separate boundary
evaluation and is merged into the scores before ``delta_m``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from prism_vfm.data.registry import HEADLINE_METRICS, LOWER_IS_BETTER, get_dataset
from prism_vfm.metrics.dense import (
    DepthMeter,
    EdgeLossMeter,
    NormalsMeter,
    SaliencyMeter,
    SegmentationMeter,
)

Meter = SegmentationMeter | SaliencyMeter | NormalsMeter | DepthMeter | EdgeLossMeter


@torch.no_grad()
def prediction_for_metric(task: str, raw: Tensor) -> Tensor:
    """Turn a raw head output ``(B, C, H, W)`` into what the task's meter consumes, ``(B, C', H, W)``.

    semseg / human_parts: argmax class index (int64, one channel); normals: L2-normalised and mapped from
    ``[-1, 1]`` to ``[0, 255]``; sal: foreground softmax probability x 255; edge: sigmoid x 255;
    depth: clamped at 0.
    """
    if task in ("semseg", "human_parts"):
        return raw.argmax(dim=1, keepdim=True)
    if task == "normals":
        return (F.normalize(raw, p=2, dim=1) + 1.0) * 255.0 / 2.0
    if task == "sal":
        return F.softmax(raw, dim=1)[:, 1:2] * 255.0
    if task == "edge":
        return torch.sigmoid(raw) * 255.0
    if task == "depth":
        return raw.clamp_min(0.0)
    raise ValueError(f"unknown task {task!r}")


class MultiTaskMeter:
    """One meter per task of ``dataset``; ``update`` takes raw head outputs, ``compute`` all scores.

    Args:
        dataset: ``"pascalcontext"`` or ``"nyud"``.
        tasks: the tasks to evaluate (default: all tasks of the dataset).
    """

    def __init__(self, dataset: str, tasks: Sequence[str] | None = None) -> None:
        info = get_dataset(dataset)
        channels = info.tasks
        self.dataset = info.name
        self.tasks = list(channels if tasks is None else tasks)
        unknown = [t for t in self.tasks if t not in channels]
        if unknown:
            raise ValueError(f"tasks {unknown} are not tasks of {dataset!r} ({sorted(channels)})")
        self.meters: dict[str, Meter] = {}
        for t in self.tasks:
            if t in ("semseg", "human_parts"):
                self.meters[t] = SegmentationMeter(channels[t], task=t)
            elif t == "sal":
                self.meters[t] = SaliencyMeter()
            elif t == "normals":
                self.meters[t] = NormalsMeter()
            elif t == "depth":
                self.meters[t] = DepthMeter()
            else:
                self.meters[t] = EdgeLossMeter(info.edge_loss_meter_pos_weight)

    def reset(self) -> None:
        """Forget all updates of every meter."""
        for meter in self.meters.values():
            meter.reset()

    @torch.no_grad()
    def update(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> None:
        """Add one batch; ``outputs`` are raw head outputs and ``labels`` pipeline labels, keyed by task."""
        for t, meter in self.meters.items():
            if t not in outputs or t not in labels:
                raise ValueError(f"{t}: missing from the {'outputs' if t not in outputs else 'labels'}")
            meter.update(prediction_for_metric(t, outputs[t]), labels[t])

    def state(self) -> dict[str, Tensor]:
        """Every meter's accumulators as ``{"task/name": tensor}``; they add up over disjoint data."""
        return {f"{t}/{k}": v for t, meter in self.meters.items() for k, v in meter.state().items()}

    def load_state(self, state: Mapping[str, Tensor]) -> None:
        """Replace the accumulators by ``state`` (e.g. :meth:`state` summed over processes)."""
        for t, meter in self.meters.items():
            meter.load_state({k.split("/", 1)[1]: v for k, v in state.items() if k.split("/", 1)[0] == t})

    def compute(self) -> dict[str, dict[str, float]]:
        """``{task: {score name: value}}``, e.g. ``{"semseg": {"mIoU": 62.1}, "sal": {"maxF": ..., ...}}``."""
        return {t: meter.compute() for t, meter in self.meters.items()}


def delta_m(scores: Mapping[str, float | Mapping[str, float]], baselines: Mapping[str, float]) -> float:
    """Δm in percent: mean over the tasks of ``scores`` of the signed relative gain over ``baselines``.

    ``Δm = (1/T) sum_t (-1)^{l_t} (M_t - M_single,t) / M_single,t x 100`` with ``l_t = 1`` for normals mErr
    and depth RMSE. A score is a number or a task's score dict (``MultiTaskMeter.compute`` style), from
    which the headline metric (``HEADLINE_METRICS``; edge needs ``odsF``) is taken.
    """
    if not scores:
        raise ValueError("delta_m needs at least one task score")
    total = 0.0
    for task, score in scores.items():
        if task not in baselines:
            raise ValueError(f"{task}: no single-task baseline (baselines cover {sorted(baselines)})")
        if isinstance(score, Mapping):
            metric = HEADLINE_METRICS[task]
            if metric not in score:
                raise ValueError(f"{task}: score {metric!r} needed for delta_m, got {sorted(score)}")
            score = score[metric]
        sign = -1.0 if task in LOWER_IS_BETTER else 1.0
        total += sign * (score - baselines[task]) / baselines[task]
    return 100.0 * total / len(scores)
