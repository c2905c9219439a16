"""Stage-2 per-task losses and their weighted sum (SPEC §7).

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

``MultiTaskLoss`` weights them with the data set's loss weights (``prism_vfm.data.registry``) and sums them.
Label values are checked (``check_label_values``) where that costs no device synchronisation: labels in
host memory; ``check_labels=True`` checks them on an accelerator too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prism_vfm.data.labels import IGNORE_INDEX, check_label_values
from prism_vfm.data.registry import get_dataset

EDGE_POS_WEIGHT = 0.95


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


def cross_entropy_loss(
    task: str, pred: Tensor, label: Tensor, check: bool | None = None, class_weight: Tensor | None = None
) -> Tensor:
    """Cross-entropy summed over valid pixels, divided by their number (``semseg``, ``human_parts``).

    ``class_weight`` (not released; ``class_balance_weights``) scales each pixel's term by the weight of
    its true class; the sum is still divided by the plain number of valid pixels.
    """
    check_shapes(task, pred, label, None, 1)
    check_label_values(task, label, pred.shape[1], check)
    target = label[:, 0].long()
    if class_weight is not None:
        if class_weight.shape != (pred.shape[1],):
            raise ValueError(
                f"{task}: class weights of shape {tuple(class_weight.shape)}, expected ({pred.shape[1]},)"
            )
        class_weight = class_weight.to(device=pred.device, dtype=pred.dtype)
    loss = F.cross_entropy(pred, target, weight=class_weight, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / _valid_count(target != IGNORE_INDEX)


CLASS_MAP_TASKS = ("semseg", "human_parts")
"""The tasks whose loss is a cross-entropy over class maps: what ``class_balance`` applies to."""


def class_balance_weights(counts: Tensor, exponent: float) -> Tensor:
    """Class weights from the classes' pixel counts in the training labels: ``w_c ∝ f_c ** -exponent``
    (``f_c`` the class's share of the labelled pixels; 0.5 the inverse square root, 1 the inverse
    frequency), scaled so that their pixel-weighted mean is 1 and the loss keeps its scale. A class absent
    from the counts gets weight 1 (no pixel of it is ever weighted)."""
    counts = counts.double()
    if counts.ndim != 1 or bool((counts < 0).any()) or not counts.sum() > 0:
        raise ValueError(f"class pixel counts must be a 1-D tensor of counts >= 0, not all 0; got {counts}")
    if exponent < 0:
        raise ValueError(f"class balance exponent must be >= 0, got {exponent}")
    share = counts / counts.sum()
    present = counts > 0
    weight = torch.ones_like(share)
    weight[present] = share[present] ** -exponent
    weight[present] /= (weight[present] * share[present]).sum()
    return weight.float()


def balanced_cross_entropy_loss(pred: Tensor, label: Tensor, check: bool | None = None) -> Tensor:
    """Saliency loss: 2-class CE with class weights ``[1 - p, p]``, ``p`` = negative share of valid pixels.

    The weighted sum is divided by the plain number of valid pixels, not by the sum of the weights.
    """
    check_shapes("sal", pred, label, 2, 1)
    check_label_values("sal", label, check=check)
    target = label[:, 0].long()
    valid = target != IGNORE_INDEX
    num_valid = _valid_count(valid)
    negative_share = ((target == 0) & valid).sum() / num_valid
    class_weight = torch.stack((1.0 - negative_share, negative_share)).to(pred.dtype)
    loss = F.cross_entropy(pred, target, weight=class_weight, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / num_valid


def normals_l1_loss(pred: Tensor, label: Tensor, check: bool | None = None) -> Tensor:
    """L1 between the L2-normalised prediction and the label, summed over channels, mean over valid pixels."""
    check_shapes("normals", pred, label, 3, 3)
    check_label_values("normals", label, check=check)
    valid = (label != IGNORE_INDEX).all(dim=1, keepdim=True)
    diff = (F.normalize(pred, p=2, dim=1) - label).abs()
    return torch.where(valid, diff, 0.0).sum() / _valid_count(valid)


def balanced_bce_loss(
    pred: Tensor, label: Tensor, pos_weight: float = EDGE_POS_WEIGHT, check: bool | None = None
) -> Tensor:
    """Edge loss: mean over valid pixels of ``w y (-log s(z)) + (1 - w)(1 - y)(-log(1 - s(z)))``.

    Computed as BCE-with-logits with positive weight ``w / (1 - w)`` then divided by ``1 / (1 - w)``,
    the form whose rounding the official values carry.
    """
    check_shapes("edge", pred, label, 1, 1)
    check_label_values("edge", label, check=check)
    valid = label != IGNORE_INDEX
    factor = 1.0 / (1.0 - pos_weight)
    loss = F.binary_cross_entropy_with_logits(
        pred[valid],
        label[valid],
        pos_weight=torch.tensor(pos_weight * factor, dtype=pred.dtype, device=pred.device),
        reduction="sum",
    )
    return loss / _valid_count(valid) / factor


def depth_l1_loss(pred: Tensor, label: Tensor, check: bool | None = None) -> Tensor:
    """L1 in metres over pixels whose label is not 255 (depths beyond the evaluation cap still count)."""
    check_shapes("depth", pred, label, 1, 1)
    check_label_values("depth", label, check=check)
    valid = label != IGNORE_INDEX
    return torch.where(valid, (pred - label).abs(), 0.0).sum() / _valid_count(valid)


def task_loss(
    task: str, pred: Tensor, label: Tensor, check: bool | None = None, class_weight: Tensor | None = None
) -> Tensor:
    """The unweighted loss of ``task`` for raw head output ``pred`` and label ``label``.

    ``check`` decides whether the label values are checked (``check_label_values``): by default only a
    label in host memory is, so a step on a GPU never waits for a host read. ``class_weight``: per-class
    weights of a class-map task (``CLASS_MAP_TASKS``; ``cross_entropy_loss``).
    """
    if class_weight is not None and task not in CLASS_MAP_TASKS:
        raise ValueError(f"class weights apply to {CLASS_MAP_TASKS} only, not {task!r}")
    if task in CLASS_MAP_TASKS:
        return cross_entropy_loss(task, pred, label, check, class_weight)
    if task == "sal":
        return balanced_cross_entropy_loss(pred, label, check)
    if task == "normals":
        return normals_l1_loss(pred, label, check)
    if task == "edge":
        return balanced_bce_loss(pred, label, check=check)
    if task == "depth":
        return depth_l1_loss(pred, label, check)
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
        weights: per-task weights overriding the data set's (``get_dataset(dataset).loss_weights``).
        class_weights: per-class weights of class-map tasks (``class_balance_weights``); not released.
        check_labels: check the label values in every step: None (default) only labels in host memory
            (on a GPU that check is a host read per task and step; the readers check on the host),
            True everywhere, False never.
    """

    def __init__(
        self,
        dataset: str,
        tasks: Sequence[str] | None = None,
        weights: Mapping[str, float] | None = None,
        check_labels: bool | None = None,
        class_weights: Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        info = get_dataset(dataset)
        known = info.tasks
        self.tasks = list(known if tasks is None else tasks)
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            raise ValueError(f"tasks {unknown} are not tasks of {dataset!r} ({sorted(known)})")
        self.channels = {t: known[t] for t in self.tasks}
        self.weights = {t: float(info.loss_weights[t]) for t in self.tasks}
        self.check_labels = check_labels
        for t, w in (weights or {}).items():
            if t not in self.weights:
                raise ValueError(f"loss weight given for {t!r}, which is not among the tasks {self.tasks}")
            self.weights[t] = float(w)
        self.class_weights = dict(class_weights or {})
        for t, cw in self.class_weights.items():
            if t not in self.tasks or t not in CLASS_MAP_TASKS:
                raise ValueError(
                    f"class weights given for {t!r}; they apply to the class-map tasks among {self.tasks}"
                )
            if cw.shape != (self.channels[t],):
                raise ValueError(
                    f"{t}: class weights of shape {tuple(cw.shape)}, expected ({self.channels[t]},)"
                )

    def forward(self, preds: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> MultiTaskLossOutput:
        """Losses of every configured task; ``preds`` and ``labels`` map task names to tensors."""
        for t in self.tasks:
            if t not in preds or t not in labels:
                raise ValueError(f"{t}: missing from the {'predictions' if t not in preds else 'labels'}")
            if preds[t].ndim != 4 or preds[t].shape[1] != self.channels[t]:
                raise ValueError(
                    f"{t}: prediction shape {tuple(preds[t].shape)}, expected (B, {self.channels[t]}, H, W)"
                )
        unweighted = {
            t: task_loss(t, preds[t], labels[t], self.check_labels, self.class_weights.get(t))
            for t in self.tasks
        }
        weighted = {t: self.weights[t] * unweighted[t] for t in self.tasks}
        total = torch.stack(list(weighted.values())).sum()
        return MultiTaskLossOutput(total=total, weighted=weighted, unweighted=unweighted)

    def extra_repr(self) -> str:
        balanced = f", class_weights for {sorted(self.class_weights)}" if self.class_weights else ""
        return f"weights={self.weights}{balanced}"
