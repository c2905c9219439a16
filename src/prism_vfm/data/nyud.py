"""NYUD-v2 multi-task labels read from the standard ATRC / InvPT release layout (SPEC §8).

Samples have the form described in ``pascal_context.py``: ``image``, one ``(C, H, W)`` float32 label per
task, ``meta``. Labels are returned as the release defines them; zero depth becomes 255 in the transforms'
ignore-region step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from prism_vfm.data.dense_transforms import Sample
from prism_vfm.data.labels import IGNORE_INDEX
from prism_vfm.data.pascal_context import (
    DenseReleaseDataset,
    check_size,
    check_values,
    layout_error,
    read_image,
    read_mat,
    read_png,
    read_split,
)
from prism_vfm.data.registry import get_dataset

_RELEASE = "NYUDv2"
_PATTERNS = {
    "image": "images/<id>.png",
    "split": "gt_sets/{train,val}.txt",
    "semseg": "segmentation/<id>.png, 0 unlabelled and 1..40 the classes",
    "normals": "normals/<id>.png, 3 channels",
    "edge": "edge/<id>.png",
    "depth": "depth/<id>.npy, an (H, W) float array in metres",
    "edge_mat": "edge_mat/<id>.mat with groundTruth{1}.Boundaries",
}


class NYUDv2(DenseReleaseDataset):
    """NYUD-v2 with the tasks ``semseg``, ``normals``, ``edge``, ``depth``.

    ``root`` is the ``NYUDv2/`` folder of the ATRC / InvPT release (SPEC §8). Label rules:

    * ``semseg``: ``segmentation/<id>.png`` value ``v`` becomes class ``v - 1`` (40 classes); 0 becomes 255.
    * ``normals``: ``2 v / 255 - 1`` of ``normals/<id>.png``.
    * ``edge``: ``v / 255`` of ``edge/<id>.png``.
    * ``depth``: ``depth/<id>.npy`` in metres, 0 where the sensor gave no reading.

    ``boundary_gt(id)`` reads the evaluation boundaries of ``edge_mat/<id>.mat``.
    """

    release = _RELEASE
    dataset = "nyud"

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        tasks: Sequence[str] | None = None,
        transform: Callable[[Sample], Any] | None = None,
    ) -> None:
        super().__init__(root, split, tasks, transform)
        self.ids = read_split(self.root / "gt_sets" / f"{split}.txt", _RELEASE, _PATTERNS["split"])
        self.num_semseg_classes = get_dataset("nyud").tasks["semseg"]

    def _path(self, kind: str, sample_id: str) -> Path:
        folder, suffix = {
            "image": ("images", ".png"),
            "semseg": ("segmentation", ".png"),
            "normals": ("normals", ".png"),
            "edge": ("edge", ".png"),
            "depth": ("depth", ".npy"),
            "edge_mat": ("edge_mat", ".mat"),
        }[kind]
        return self.root / folder / f"{sample_id}{suffix}"

    def read_image(self, sample_id: str) -> Tensor:
        """The ``(3, H, W)`` float32 RGB image of ``sample_id`` on the 0..255 scale."""
        return read_image(self._path("image", sample_id), _RELEASE, _PATTERNS["image"])

    def read_labels(self, sample_id: str, size: tuple[int, int]) -> dict[str, np.ndarray]:
        """The label arrays of the configured tasks for ``sample_id`` (see the class docstring)."""
        readers = {"semseg": self._semseg, "normals": self._normals, "edge": self._edge, "depth": self._depth}
        labels = {}
        for task in self.tasks:
            path = self._path(task, sample_id)
            labels[task] = readers[task](path)
            check_size(path, labels[task], size)
        return labels

    def boundary_gt(self, sample_id: str) -> np.ndarray:
        """The evaluation boundary map of ``sample_id``: ``groundTruth{1}.Boundaries`` of
        ``edge_mat/<id>.mat`` as a bool ``(H, W)`` array."""
        path = self._path("edge_mat", sample_id)
        ground_truth = read_mat(path, _RELEASE, _PATTERNS["edge_mat"], "groundTruth")
        # A 1x1 cell comes back as the struct itself, a longer one as an object array of structs.
        first = ground_truth.flat[0] if isinstance(ground_truth, np.ndarray) else ground_truth
        boundaries = getattr(first, "Boundaries", None)
        if boundaries is None or np.ndim(boundaries) != 2:
            raise layout_error(path, _PATTERNS["edge_mat"], _RELEASE, "has no 2-D groundTruth{1}.Boundaries")
        return np.asarray(boundaries) > 0

    def _semseg(self, path: Path) -> np.ndarray:
        stored = read_png(path, _RELEASE, _PATTERNS["semseg"], channels=1).astype(np.int64)
        valid = (stored >= 0) & (stored <= self.num_semseg_classes)
        check_values(path, stored, valid, f"in [0, {self.num_semseg_classes}] (0 unlabelled)")
        return np.where(stored == 0, IGNORE_INDEX, stored - 1)

    def _normals(self, path: Path) -> np.ndarray:
        stored = read_png(path, _RELEASE, _PATTERNS["normals"], channels=3)
        check_values(path, stored, stored <= 255, "an 8-bit value in [0, 255]")
        return 2.0 * stored.astype(np.float32) / 255.0 - 1.0

    def _edge(self, path: Path) -> np.ndarray:
        stored = read_png(path, _RELEASE, _PATTERNS["edge"], channels=1)
        check_values(path, stored, stored <= 255, "an 8-bit value in [0, 255]")
        return stored.astype(np.float32) / 255.0

    def _depth(self, path: Path) -> np.ndarray:
        if not path.is_file():
            raise layout_error(path, _PATTERNS["depth"], _RELEASE)
        try:
            depth = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise layout_error(path, _PATTERNS["depth"], _RELEASE, f"cannot be read ({err})") from err
        if depth.ndim == 3 and depth.shape[2] == 1:
            depth = depth[:, :, 0]
        if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.number):
            raise layout_error(
                path, _PATTERNS["depth"], _RELEASE, f"holds a {depth.dtype} array of shape {depth.shape}"
            )
        check_values(path, depth, np.isfinite(depth) & (depth >= 0), "a finite depth >= 0 in metres")
        return depth.astype(np.float32)
