"""Stage-2 per-task losses, their weights, and the label ignore-region step (SPEC §7, §8).

All labels are channel-first tensors ``(B, C, H, W)`` (float, or integer class maps) in which
``IGNORE_INDEX`` (255) marks pixels that take no part in a loss or a metric; predictions are the raw head
outputs ``(B, C_task, H, W)``. Every loss is a sum over valid pixels divided by the number of valid pixels
(at least 1, so a batch without a single valid pixel gives 0 rather than NaN):

* ``semseg``, ``human_parts``: cross-entropy.
* ``sal``: 2-class cross-entropy with per-batch class weights ``[1 - p, p]``, ``p`` the fraction of valid
  pixels that are negative (the rarer class weighs more).
* ``normals``: L1 between the L2-normalised prediction and the label, summed over the 3 channels; a pixel
  is valid when none of its channels is 255.
* ``edge``: binary cross-entropy with logits, positives weighted 0.95 and negatives 0.05.
* ``depth``: L1 in metres.

``MultiTaskLoss`` weights them with ``TASK_LOSS_WEIGHTS`` and sums them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = 255

TASK_OUTPUT_CHANNELS: dict[str, dict[str, int]] = {
    "pascalcontext": {"semseg": 21, "human_parts": 7, "normals": 3, "edge": 1, "sal": 2},
    "nyud": {"semseg": 40, "normals": 3, "edge": 1, "depth": 1},
}
"""Channels of each task's head output, per dataset (segmentation: number of classes)."""

TASK_LOSS_WEIGHTS: dict[str, dict[str, float]] = {
    "pascalcontext": {"semseg": 1.0, "human_parts": 2.0, "normals": 10.0, "sal": 5.0, "edge": 50.0},
    "nyud": {"semseg": 1.0, "normals": 10.0, "edge": 50.0, "depth": 1.0},
}
"""Weight of each task's loss in the Stage-2 objective, per dataset (SPEC §7)."""

EDGE_POS_WEIGHT = 0.95

# Labels of unit normals may overshoot 1 by float rounding after renormalisation or resampling.
_NORMALS_RANGE_SLACK = 1e-4


def dataset_tasks(dataset: str) -> dict[str, int]:
    """The tasks of ``dataset`` with their output channels; ValueError naming an unknown dataset."""
    if dataset not in TASK_OUTPUT_CHANNELS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(TASK_OUTPUT_CHANNELS)}")
    return TASK_OUTPUT_CHANNELS[dataset]


def check_label_values(task: str, label: Tensor, num_classes: int | None = None) -> None:
    """Raise ValueError naming ``task`` and the first label value that is neither valid nor 255.

    Valid values: class indices ``0 .. num_classes - 1`` for ``semseg``, ``human_parts`` and ``sal``
    (always 2 for ``sal``); ``[-1, 1]`` for ``normals``; ``[0, 1]`` for ``edge``;
    finite non-negative metres for ``depth``.
    """
    ignored = label == IGNORE_INDEX
    if task in ("semseg", "human_parts", "sal"):
        classes = 2 if task == "sal" else num_classes
        if classes is None:
            raise ValueError(f"{task}: num_classes is required to check its labels")
        ok = (label >= 0) & (label < classes) & (label == label.round())
        expected = f"an integer class in [0, {classes})"
    elif task == "normals":
        ok = label.abs() <= 1.0 + _NORMALS_RANGE_SLACK
        expected = "a normal component in [-1, 1]"
    elif task == "edge":
        ok = (label >= 0) & (label <= 1)
        expected = "an edge label in [0, 1]"
    elif task == "depth":
        ok = (label >= 0) & torch.isfinite(label)
        expected = "a finite depth >= 0"
    else:
        raise ValueError(f"unknown task {task!r}")
    bad = ~(ok | ignored)
    if bool(bad.any()):
        value = label[bad].flatten()[0].item()
        raise ValueError(f"{task}: label value {value} is not {expected} or {IGNORE_INDEX} (ignore)")


def check_shapes(
    task: str, pred: Tensor, label: Tensor, pred_channels: int | None, label_channels: int
) -> None:
    """Raise ValueError naming ``task`` unless pred is ``(B, pred_channels, H, W)`` and label
    ``(B, label_channels, H, W)`` with the same B, H, W (``pred_channels=None``: any channel count)."""
    if (
        pred.ndim != 4
        or label.ndim != 4
        or (pred_channels is not None and pred.shape[1] != pred_channels)
        or label.shape[1] != label_channels
        or pred.shape[0] != label.shape[0]
        or pred.shape[2:] != label.shape[2:]
    ):
        raise ValueError(
            f"{task}: prediction shape {tuple(pred.shape)} does not fit label shape {tuple(label.shape)}; "
            f"expected (B, {pred_channels or 'C'}, H, W) and (B, {label_channels}, H, W)"
        )


def _valid_count(mask: Tensor) -> Tensor:
    return mask.sum().clamp_min(1)


def cross_entropy_loss(task: str, pred: Tensor, label: Tensor) -> Tensor:
    """Cross-entropy summed over valid pixels, divided by their number (``semseg``, ``human_parts``)."""
    check_shapes(task, pred, label, None, 1)
    check_label_values(task, label, pred.shape[1])
    target = label[:, 0].long()
    loss = F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / _valid_count(target != IGNORE_INDEX)


def balanced_cross_entropy_loss(pred: Tensor, label: Tensor) -> Tensor:
    """Saliency loss: 2-class CE with class weights ``[1 - p, p]``, ``p`` = negative share of valid pixels.

    The weighted sum is divided by the plain number of valid pixels, not by the sum of the weights.
    """
    check_shapes("sal", pred, label, 2, 1)
    check_label_values("sal", label)
    target = label[:, 0].long()
    valid = target != IGNORE_INDEX
    num_valid = _valid_count(valid)
    negative_share = ((target == 0) & valid).sum() / num_valid
    class_weight = torch.stack((1.0 - negative_share, negative_share)).to(pred.dtype)
    loss = F.cross_entropy(pred, target, weight=class_weight, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / num_valid


def normals_l1_loss(pred: Tensor, label: Tensor) -> Tensor:
    """L1 between the L2-normalised prediction and the label, summed over channels, mean over valid pixels."""
    check_shapes("normals", pred, label, 3, 3)
    check_label_values("normals", label)
    valid = (label != IGNORE_INDEX).all(dim=1, keepdim=True)
    diff = (F.normalize(pred, p=2, dim=1) - label).abs()
    return torch.where(valid, diff, 0.0).sum() / _valid_count(valid)


def balanced_bce_loss(pred: Tensor, label: Tensor, pos_weight: float = EDGE_POS_WEIGHT) -> Tensor:
    """Edge loss: mean over valid pixels of ``w y (-log s(z)) + (1 - w)(1 - y)(-log(1 - s(z)))``.

    Computed as BCE-with-logits with positive weight ``w / (1 - w)`` then divided by ``1 / (1 - w)``,
    the form whose rounding the official values carry.
    """
    check_shapes("edge", pred, label, 1, 1)
    check_label_values("edge", label)
    valid = label != IGNORE_INDEX
    factor = 1.0 / (1.0 - pos_weight)
    loss = F.binary_cross_entropy_with_logits(
        pred[valid],
        label[valid],
        pos_weight=torch.tensor(pos_weight * factor, dtype=pred.dtype, device=pred.device),
        reduction="sum",
    )
    return loss / _valid_count(valid) / factor


def depth_l1_loss(pred: Tensor, label: Tensor) -> Tensor:
    """L1 in metres over pixels whose label is not 255 (depths beyond the evaluation cap still count)."""
    check_shapes("depth", pred, label, 1, 1)
    check_label_values("depth", label)
    valid = label != IGNORE_INDEX
    return torch.where(valid, (pred - label).abs(), 0.0).sum() / _valid_count(valid)


def task_loss(task: str, pred: Tensor, label: Tensor) -> Tensor:
    """The unweighted loss of ``task`` for raw head output ``pred`` and label ``label``."""
    if task in ("semseg", "human_parts"):
        return cross_entropy_loss(task, pred, label)
    if task == "sal":
        return balanced_cross_entropy_loss(pred, label)
    if task == "normals":
        return normals_l1_loss(pred, label)
    if task == "edge":
        return balanced_bce_loss(pred, label)
    if task == "depth":
        return depth_l1_loss(pred, label)
    raise ValueError(f"unknown task {task!r}")


@dataclass
class MultiTaskLossOutput:
    """Result of ``MultiTaskLoss``: the objective and its per-task parts (0-dim tensors)."""

    total: Tensor
    weighted: dict[str, Tensor]
    unweighted: dict[str, Tensor]


class MultiTaskLoss(nn.Module):
    """Weighted sum of the task losses of one dataset: ``total = sum_t w_t L_t``.

    Args:
        dataset: ``"pascalcontext"`` or ``"nyud"``; fixes the default weights.
        tasks: the tasks to train, a subset of the dataset's tasks (default: all of them).
        weights: per-task weights overriding ``TASK_LOSS_WEIGHTS[dataset]``.
    """

    def __init__(
        self,
        dataset: str,
        tasks: Sequence[str] | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        known = dataset_tasks(dataset)
        self.tasks = list(known if tasks is None else tasks)
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            raise ValueError(f"tasks {unknown} are not tasks of {dataset!r} ({sorted(known)})")
        self.channels = {t: known[t] for t in self.tasks}
        self.weights = {t: float(TASK_LOSS_WEIGHTS[dataset][t]) for t in self.tasks}
        for t, w in (weights or {}).items():
            if t not in self.weights:
                raise ValueError(f"loss weight given for {t!r}, which is not among the tasks {self.tasks}")
            self.weights[t] = float(w)

    def forward(self, preds: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> MultiTaskLossOutput:
        """Losses of every configured task; ``preds`` and ``labels`` map task names to tensors."""
        for t in self.tasks:
            if t not in preds or t not in labels:
                raise ValueError(f"{t}: missing from the {'predictions' if t not in preds else 'labels'}")
            if preds[t].ndim != 4 or preds[t].shape[1] != self.channels[t]:
                raise ValueError(
                    f"{t}: prediction shape {tuple(preds[t].shape)}, expected (B, {self.channels[t]}, H, W)"
                )
        unweighted = {t: task_loss(t, preds[t], labels[t]) for t in self.tasks}
        weighted = {t: self.weights[t] * unweighted[t] for t in self.tasks}
        total = torch.stack(list(weighted.values())).sum()
        return MultiTaskLossOutput(total=total, weighted=weighted, unweighted=unweighted)

    def extra_repr(self) -> str:
        return f"weights={self.weights}"


def add_ignore_regions(task: str, label: Tensor) -> Tensor:
    """Mark the pixels a label cannot supervise with 255 (the last step of the label pipeline, SPEC §8).

    ``label`` is one sample ``(C, H, W)`` or a batch ``(B, C, H, W)``; rules apply per sample:

    * ``human_parts``: a map holding only 0 and 255 (no part pixel, e.g. an image without people, or a
      crop that missed them) becomes entirely 255, so the image does not teach "background everywhere".
    * ``normals``: a zero-length vector (no normal annotated) becomes 255 in all three channels.
    * ``depth``: 0 (no sensor reading) becomes 255.

    Other tasks are returned unchanged. The input is never modified in place.
    """
    if label.ndim not in (3, 4):
        raise ValueError(f"{task}: expected a (C, H, W) or (B, C, H, W) label, got {tuple(label.shape)}")
    if task == "human_parts":
        no_parts = ((label == 0) | (label == IGNORE_INDEX)).flatten(-3).all(dim=-1)
        return label.masked_fill(no_parts[..., None, None, None], IGNORE_INDEX)
    if task == "normals":
        zero_length = (label == 0).all(dim=-3, keepdim=True)
        return label.masked_fill(zero_length, IGNORE_INDEX)
    if task == "depth":
        return label.masked_fill(label == 0, IGNORE_INDEX)
    return label
