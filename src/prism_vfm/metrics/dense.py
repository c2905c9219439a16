"""Streaming pixel meters for the Stage-2 tasks (SPEC §9): everything but boundary odsF.

Every meter pools its counts over all valid pixels of every ``update`` (never a mean of per-image scores)
and reports them with ``compute()``. ``update(pred, label)`` takes channel-first tensors ``(B, C, H, W)``:
``pred`` as ``prediction_for_metric`` (``prism_vfm.metrics.multitask``) makes it from a head output,
``label`` as the data pipeline makes it, 255 marking ignored pixels. The accumulators are public tensor
attributes (int64 counts, float64 sums) that live on the device of the last update, so evaluation on a
GPU never synchronises per batch for them and they can be all-reduced across processes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from prism_vfm.data.labels import IGNORE_INDEX, check_label_values
from prism_vfm.losses.tasks import balanced_bce_loss, check_shapes

SALIENCY_BETA_SQUARED = 0.3
DEPTH_MAX_METRES = 80.0
_EPS = 1e-8


def _zeros(*shape: int, dtype: torch.dtype) -> Tensor:
    return torch.zeros(shape, dtype=dtype)


class _Accumulators:
    """The sum-reducible state of a meter: every tensor attribute ``reset`` creates."""

    def state(self) -> dict[str, Tensor]:
        """The accumulators by name; the state of several meters fed disjoint data adds up element-wise
        to the state of one meter fed it all (what sharded evaluation all-reduces)."""
        return {k: v for k, v in vars(self).items() if isinstance(v, Tensor) and k != "thresholds"}

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Replace the accumulators by ``state`` (e.g. the sum of every process's :meth:`state`)."""
        if state.keys() != self.state().keys():
            expected = sorted(self.state())
            raise ValueError(f"{type(self).__name__}: state keys {sorted(state)}, expected {expected}")
        for key, value in state.items():
            setattr(self, key, value)


class SegmentationMeter(_Accumulators):
    """mIoU x 100 over **all** ``num_classes`` classes (a class never seen nor predicted scores 0).

    Accumulates a ``(num_classes, num_classes)`` confusion matrix (rows: label, columns: prediction) over
    valid pixels; ``tp``, ``fp`` and ``fn`` are read off it. ``pred`` holds class indices ``(B, 1, H, W)``.
    """

    def __init__(self, num_classes: int, task: str = "semseg") -> None:
        self.num_classes = num_classes
        self.task = task
        self.reset()

    def reset(self) -> None:
        """Forget all updates."""
        self.confusion = _zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: Tensor, label: Tensor) -> None:
        """Add the pixels of one batch."""
        check_shapes(self.task, pred, label, 1, 1)
        check_label_values(self.task, label, self.num_classes)
        pred = pred.long()
        if bool(((pred < 0) | (pred >= self.num_classes)).any()):
            raise ValueError(f"{self.task}: predicted class outside [0, {self.num_classes})")
        valid = label != IGNORE_INDEX
        pair = label[valid].long() * self.num_classes + pred[valid]
        counts = torch.bincount(pair, minlength=self.num_classes**2).view(self.num_classes, -1)
        self.confusion = self.confusion.to(counts.device) + counts

    @property
    def tp(self) -> Tensor:
        """True positives per class."""
        return self.confusion.diagonal()

    @property
    def fp(self) -> Tensor:
        """False positives per class (predicted as the class, labelled otherwise)."""
        return self.confusion.sum(dim=0) - self.tp

    @property
    def fn(self) -> Tensor:
        """False negatives per class (labelled as the class, predicted otherwise)."""
        return self.confusion.sum(dim=1) - self.tp

    def compute(self) -> dict[str, float]:
        """``{"mIoU": ...}`` in percent."""
        tp = self.tp.double()
        iou = tp / (tp + self.fp + self.fn).clamp_min(_EPS)
        return {"mIoU": iou.mean().item() * 100.0}


class SaliencyMeter(_Accumulators):
    """Saliency maxF (beta^2 = 0.3) and the best IoU, x 100, over 19 foreground thresholds.

    ``pred`` is the foreground probability x 255 ``(B, 1, H, W)``; a pixel is predicted positive at
    threshold t when ``pred / 255 >= t``. The thresholds are ``arange(0.05, 1, 0.05)`` in float32, the
    exact values the official meter compares against.
    """

    def __init__(self) -> None:
        self.thresholds = torch.arange(0.05, 1.0, 0.05, dtype=torch.float32)
        self.reset()

    def reset(self) -> None:
        """Forget all updates."""
        n = len(self.thresholds)
        self.true_positives = _zeros(n, dtype=torch.int64)
        self.predicted_positives = _zeros(n, dtype=torch.int64)
        self.actual_positives = _zeros(dtype=torch.int64)

    def _at_or_above(self, prob: Tensor) -> Tensor:
        # bucketize(right=True) counts the thresholds <= p; a reversed cumulative histogram of those
        # counts gives, per threshold, how many probabilities reach it, without a pixels x thresholds mask.
        thresholds = self.thresholds.to(prob.device)
        reached = torch.bucketize(prob, thresholds, right=True)
        hist = torch.bincount(reached, minlength=len(thresholds) + 1)
        return hist.flip(0).cumsum(0).flip(0)[1:]

    @torch.no_grad()
    def update(self, pred: Tensor, label: Tensor) -> None:
        """Add the pixels of one batch."""
        check_shapes("sal", pred, label, 1, 1)
        check_label_values("sal", label)
        valid = label != IGNORE_INDEX
        prob = pred.float() / 255.0
        positive = label == 1
        device = pred.device
        self.true_positives = self.true_positives.to(device) + self._at_or_above(prob[valid & positive])
        self.predicted_positives = self.predicted_positives.to(device) + self._at_or_above(prob[valid])
        self.actual_positives = self.actual_positives.to(device) + positive.sum()

    def compute(self) -> dict[str, float]:
        """``{"maxF": ..., "mIoU": ...}`` in percent, each the best over the thresholds."""
        tp = self.true_positives.double()
        pp = self.predicted_positives.double()
        ap = self.actual_positives.double()
        precision = tp / pp.clamp_min(_EPS)
        recall = tp / ap.clamp_min(_EPS)
        b2 = SALIENCY_BETA_SQUARED
        f = (1.0 + b2) * precision * recall / (b2 * precision + recall + _EPS)
        iou = tp / (pp + ap - tp + _EPS)
        return {"maxF": f.max().item() * 100.0, "mIoU": iou.max().item() * 100.0}


class NormalsMeter(_Accumulators):
    """Mean angular error (degrees) of surface normals over valid pixels.

    ``pred`` is the normalised prediction mapped to ``[0, 255]`` ``(B, 3, H, W)``; it is mapped back and
    re-normalised, as is the label. The angle ``2 atan2(|p - g|, |p + g|)`` stays accurate near 0 and 180
    degrees, where ``acos`` of a dot product does not. A pixel is valid when no label channel is 255.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget all updates."""
        self.sum_degrees = _zeros(dtype=torch.float64)
        self.count = _zeros(dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: Tensor, label: Tensor) -> None:
        """Add the pixels of one batch."""
        check_shapes("normals", pred, label, 3, 3)
        check_label_values("normals", label)
        valid = (label != IGNORE_INDEX).all(dim=1)
        p = F.normalize(2.0 * pred / 255.0 - 1.0, dim=1)
        g = F.normalize(label, dim=1)
        angle = torch.rad2deg(2.0 * torch.atan2((p - g).norm(dim=1), (p + g).norm(dim=1)))
        self.sum_degrees = self.sum_degrees.to(pred.device) + angle[valid].double().sum()
        self.count = self.count.to(pred.device) + valid.sum()

    def compute(self) -> dict[str, float]:
        """``{"mErr": ...}`` in degrees."""
        return {"mErr": (self.sum_degrees / self.count.clamp_min(1)).item()}


class DepthMeter(_Accumulators):
    """Depth RMSE in metres, pooled over the pixels with ``0 < label < 80`` of all updates.

    ``pred`` ``(B, 1, H, W)`` is the prediction clamped at 0; values that are still not positive become
    1e-9, the floor the official meter applies so that log-depth errors stay finite (the effect on RMSE is
    nil). The 80 m cap also excludes the ignore value 255.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget all updates."""
        self.sum_squared_error = _zeros(dtype=torch.float64)
        self.count = _zeros(dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: Tensor, label: Tensor) -> None:
        """Add the pixels of one batch."""
        check_shapes("depth", pred, label, 1, 1)
        check_label_values("depth", label)
        valid = (label > 0) & (label < DEPTH_MAX_METRES)
        pred = torch.where(pred > 0, pred, 1e-9)
        squared_error = (pred[valid] - label[valid]).double().square()
        self.sum_squared_error = self.sum_squared_error.to(pred.device) + squared_error.sum()
        self.count = self.count.to(pred.device) + valid.sum()

    def compute(self) -> dict[str, float]:
        """``{"RMSE": ...}`` in metres."""
        return {"RMSE": math.sqrt((self.sum_squared_error / self.count.clamp_min(1)).item())}


class EdgeLossMeter(_Accumulators):
    """The official edge "loss meter", kept for compatibility: not a boundary metric.

    The official evaluation reports, for the edge task, the balanced BCE (positive weight 0.95 on PASCAL,
    0.8 on NYUD) of ``sigmoid(logit) x 255`` taken **as logits** against the labels, averaged over valid
    pixels weighted by their count. Only useful to compare with official validation logs; boundary quality
    is measured by odsF (SPEC §9).
    """

    def __init__(self, pos_weight: float = 0.95) -> None:
        self.pos_weight = pos_weight
        self.reset()

    def reset(self) -> None:
        """Forget all updates."""
        self.loss_sum = _zeros(dtype=torch.float64)
        self.count = _zeros(dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: Tensor, label: Tensor) -> None:
        """Add the pixels of one batch; ``pred`` is ``sigmoid(logit) x 255`` ``(B, 1, H, W)``."""
        num_valid = (label != IGNORE_INDEX).sum()
        loss = balanced_bce_loss(pred, label, self.pos_weight)
        self.loss_sum = self.loss_sum.to(pred.device) + loss.double() * num_valid
        self.count = self.count.to(pred.device) + num_valid

    def compute(self) -> dict[str, float]:
        """``{"loss": ...}``, the pixel-weighted mean of the per-batch losses."""
        return {"loss": (self.loss_sum / self.count.clamp_min(1)).item()}
