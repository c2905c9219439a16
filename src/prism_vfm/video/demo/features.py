"""The video demo's frozen features: every clip of the written data set decoded by the library's video
reader (validation sampling: all 32 frames of a 32-frame video) and encoded frame by frame by the demo's
image-text model, and the class names embedded by its text tower."""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

from prism_vfm.video.data.dataset import VideoDataset
from prism_vfm.video.demo.clips import FRAME_SIZE, NUM_FRAMES, DemoDataset
from prism_vfm.video.demo.imagetext import (
    ImageTextConfig,
    class_embeddings,
    clip_features,
    imagetext_config,
    load_imagetext,
    prepare_imagetext,
)


def prepare_image_text(cache_dir: str | os.PathLike | None, quick: bool = False, seed: int = 0) -> Path:
    """The demo image-text model's weight file: trained once, then read from the cache. ``quick`` trains
    a third of the image-text model's own quick setting: it only has to run, not to be good."""
    cfg = imagetext_config(quick, seed)
    if quick:
        cfg = ImageTextConfig(
            clips=cfg.clips // 2, frames_per_clip=cfg.frames_per_clip, steps=cfg.steps // 3, seed=seed
        )
    return prepare_imagetext(cfg, cache_dir)


def encode_demo_dataset(
    weights: Path, dataset: DemoDataset, splits: tuple[str, ...]
) -> tuple[dict[str, tuple[Tensor, Tensor]], Tensor]:
    """``({split: (features (N, T, D), labels (N,))}, class text embeddings (C, D))`` of a written demo
    data set, clips in the order of its list files."""
    image, text = load_imagetext(weights)
    result = {}
    for split in splits:
        data = VideoDataset(
            dataset.video_root, dataset.samples[split], "val", NUM_FRAMES, FRAME_SIZE, FRAME_SIZE
        )
        result[split] = clip_features(image, data)
    return result, class_embeddings(text, dataset.class_names)
