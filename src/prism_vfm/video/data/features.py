"""Cached frame features as a data set: one safetensors file per split holding ``features`` (N, T, D,
float) and ``labels`` (N, int64), for training and evaluating temporal heads on a frozen encoder.

A features folder holds ``train.safetensors``, optionally ``val.safetensors`` and ``test.safetensors``,
``labels.csv`` (``id,name``) and optionally ``class_text.safetensors`` (``class_text``: C × D text
embeddings of the class names, for the text loss).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from prism_vfm.utils.io import atomic_save_safetensors, read_safetensors_file


def write_feature_set(path: str | os.PathLike, features: Tensor, labels: Tensor) -> Path:
    """Write one split's ``features`` (N, T, D) and ``labels`` (N,) atomically."""
    if features.dim() != 3 or labels.shape != (features.shape[0],):
        raise ValueError(
            f"features must be (N, T, D) and labels (N,); got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}"
        )
    return atomic_save_safetensors({"features": features.float().cpu(), "labels": labels.long().cpu()}, path)


def read_feature_set(path: str | os.PathLike, num_classes: int) -> tuple[Tensor, Tensor]:
    """``(features, labels)`` of one split; a malformed file is an error naming it and what is wrong."""
    tensors = read_safetensors_file(path)
    missing = {"features", "labels"} - tensors.keys()
    if missing:
        raise ValueError(
            f"{path}: no {sorted(missing)} entries (expected 'features' (N, T, D), 'labels' (N,))"
        )
    features, labels = tensors["features"].float(), tensors["labels"].long()
    if features.dim() != 3 or labels.shape != (features.shape[0],) or not len(labels):
        raise ValueError(
            f"{path}: expected features (N, T, D) and labels (N,) with N >= 1; got "
            f"{tuple(features.shape)} and {tuple(labels.shape)}"
        )
    bad = ((labels < 0) | (labels >= num_classes)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{path}: label {int(labels[i])} of clip {i} is outside [0, {num_classes - 1}]")
    if not bool(torch.isfinite(features).all()):
        raise ValueError(f"{path}: non-finite features")
    return features, labels


class FeatureDataset(Dataset):
    """``self[i]`` or ``self[(i, epoch)]``: ``{"features": (T, D), "label": int, ...}`` (no augmentation,
    so the epoch changes nothing)."""

    def __init__(self, features: Tensor, labels: Tensor) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index = key[0] if isinstance(key, tuple) else key
        # no decoding, so nothing broken to count (the trainer counts the same entries for videos)
        return {
            "features": self.features[index],
            "label": self.labels[index],
            "bad_videos": 0,
            "bad_frames": 0,
        }
