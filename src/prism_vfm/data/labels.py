"""Label conventions of the dense data sets: the ignore value, its regions, and the value checks (SPEC §8).

Labels are channel-first tensors ``(B, C, H, W)`` or one sample ``(C, H, W)``, float or integer class
maps, in which ``IGNORE_INDEX`` (255) marks pixels that take no part in a loss or a metric. The readers
make them on the host; the losses and meters consume them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from skimage.morphology import thin
from torch import Tensor
from tqdm import tqdm

IGNORE_INDEX = 255

# Labels of unit normals may overshoot 1 by float rounding after renormalisation or resampling.
_NORMALS_RANGE_SLACK = 1e-4


def check_label_values(
    task: str, label: Tensor, num_classes: int | None = None, check: bool | None = None
) -> None:
    """Raise ValueError naming ``task`` and the first label value that is neither valid nor 255.

    Valid values: class indices ``0 .. num_classes - 1`` for ``semseg``, ``human_parts`` and ``sal``
    (always 2 for ``sal``); ``[-1, 1]`` for ``normals``; ``[0, 1]`` for ``edge``;
    finite non-negative metres for ``depth``.

    ``check``: True checks wherever the label is, False never; None (the default) checks a label in host
    memory only. On an accelerator the answer is a host read that waits for the device, every call; the
    readers check every label on the host as they load it, so a label that reached a GPU was checked.
    """
    if check is False or (check is None and label.device.type != "cpu"):
        return
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


def class_pixel_counts(
    samples: Iterable[Mapping[str, Any]],
    classes: Mapping[str, int],
    total: int | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Pixels of each class in the class maps of ``samples`` (reader samples: task → ``(1, H, W)``
    labels), per task of ``classes`` (task → number of classes); ignored pixels are not counted. ``total``:
    the number of samples, for the progress bar. What class-balanced losses are weighted by
    (``losses.tasks.class_balance_weights``)."""
    counts = {task: torch.zeros(n, dtype=torch.long) for task, n in classes.items()}
    items = tqdm(samples, "class pixel counts", total, unit="image", disable=not progress, leave=False)
    for sample in items:
        for task, n in classes.items():
            label = torch.as_tensor(sample[task]).long().flatten()
            label = label[label != IGNORE_INDEX]
            if label.numel() and (int(label.min()) < 0 or int(label.max()) >= n):
                raise ValueError(
                    f"{task}: a class-map value outside [0, {n}) or {IGNORE_INDEX} while counting"
                )
            counts[task] += torch.bincount(label, minlength=n)
    return counts


def seg2bmap(labels: np.ndarray) -> np.ndarray:
    """Boundary map of a label map ``(H, W)``: pixels whose label differs from the east, south or
    south-east neighbour (the last row compares east only, the last column south only).

    SEISM first relabels PASCAL-Context label maps into 4-connected regions; that cannot change this map
    (two same-class pixels in different regions touch diagonally only, and then the pixel's east
    neighbour already differs), so the relabelling is left out.
    """
    boundary = np.zeros(labels.shape, dtype=bool)
    boundary[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    boundary[:-1, :] |= labels[:-1, :] != labels[1:, :]
    boundary[:-1, :-1] |= labels[:-1, :-1] != labels[1:, 1:]
    return boundary


def label_boundaries(labels: np.ndarray) -> np.ndarray:
    """``seg2bmap`` of a label map thinned to one pixel: the boundaries the evaluation matches against."""
    return thin(seg2bmap(labels))
