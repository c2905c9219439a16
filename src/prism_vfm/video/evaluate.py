"""Closed-set evaluation of a VidPrism model as released (VIDPRISM_SPEC §3.5).

Every video is read as ``clips × crops`` views of ``num_frames`` frames; the views' logits are averaged
and softmaxed (``average="softmax"`` averages the views' softmax scores, MoTE's way); top-1 / top-5 are
counted. By default the tower is first set to 0.99 · fine-tuned + 0.01 · original CLIP, the release's
test-time weight blend (``blend="none"`` evaluates the weights as trained).

The report: ``metrics.json`` and ``metrics.md`` (scores, views, settings, broken input met),
``per_class.csv`` (accuracy of every class) and ``confusion.png`` (row-normalised confusion matrix; needs
matplotlib, the ``analysis`` extra). Launched under torchrun every process scores its part of the list and
the counts are summed; only rank 0 writes.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import prism_vfm.video.load  # noqa: F401  (registers VidPrism's checkpoints with the loader)
from prism_vfm.models.load import load
from prism_vfm.train.distributed import all_reduce_sum, all_reduce_sums, is_main_process, shard_indices
from prism_vfm.video.backbone import FrameEncoder
from prism_vfm.video.data.dataset import DataIssues, VideoDataset
from prism_vfm.video.data.lists import read_label_csv, read_video_list
from prism_vfm.video.metrics import Average, ClassificationMeter, average_views
from prism_vfm.video.model import RELEASED_BLEND_ALPHA, VidPrism

logger = logging.getLogger(__name__)


def load_vidprism(source: str | os.PathLike) -> VidPrism:
    """A trained VidPrism through the project's one loader (:func:`prism_vfm.models.load.load`): a training
    run (its latest checkpoint), a checkpoint or ``save_pretrained`` folder, or a released training
    checkpoint (``.pt``/``.pth``, read without executing code). Anything else is an error naming it."""
    model, report = load(source)
    if not isinstance(model, VidPrism):
        raise ValueError(f"{source} holds a {type(model).__name__} ({report.kind}), not a VidPrism model")
    logger.info("%s", report.summary())
    return model.eval()


def apply_blend(model: VidPrism, blend: str, alpha: float = RELEASED_BLEND_ALPHA) -> None:
    """The release's test-time blend with the original CLIP tower: ``"hub"`` (OpenAI's weights from the
    Hub), a CLIP weight file, or ``"none"``."""
    if blend == "none":
        return
    if blend == "hub":
        original = FrameEncoder(model.backbone.config, pretrained=True)
        model.blend_backbone(original, alpha)
    else:
        model.blend_backbone(blend, alpha)


@torch.no_grad()
def evaluate_video(
    checkpoint: str | os.PathLike,
    video_list: str | os.PathLike,
    labels: str | os.PathLike,
    videos: str | os.PathLike,
    *,
    dataset: str | None = None,
    out: str | os.PathLike | None = None,
    num_frames: int = 32,
    size: int = 224,
    test_clips: int = 1,
    test_crops: int = 1,
    average: Average = "logits",
    blend: str = "hub",
    batch_size: int = 4,
    workers: int = 4,
    decoder: str = "pyav",
    device: str = "cpu",
) -> dict[str, Any]:
    """Top-1 / top-5 (and per-class accuracy) of ``checkpoint`` on the videos of ``video_list``.

    ``test_clips`` × ``test_crops`` (1, 3, 5 or 10) views per video; ``average`` is ``"logits"`` (released)
    or ``"softmax"``; ``blend`` see :func:`apply_blend`. The report goes to ``out`` (rank 0).
    """
    class_names = read_label_csv(labels)
    samples = read_video_list(video_list, len(class_names), root=videos)
    model = load_vidprism(checkpoint)
    if model.head.cfg.num_classes != len(class_names):
        raise ValueError(
            f"{checkpoint} classifies {model.head.cfg.num_classes} classes, {labels} lists {len(class_names)}"
        )
    apply_blend(model, blend)
    model.to(device)
    data = VideoDataset(
        videos,
        samples,
        "test",
        num_frames,
        size,
        size,
        test_clips,
        test_crops,
        decoder=decoder,
        dataset=dataset,
    )
    meter = ClassificationMeter(len(class_names))
    issues = DataIssues()
    loader = DataLoader(Subset(data, shard_indices(len(data))), batch_size=batch_size, num_workers=workers)
    for batch in tqdm(loader, desc="evaluate", unit="batch", disable=not is_main_process()):
        clips = batch["video"].to(device)  # (B, views, T, 3, S, S)
        b, v = clips.shape[:2]
        logits = model(clips.flatten(0, 1)).logits.view(b, v, -1)
        meter.update(average_views(logits, average), batch["label"])
        issues.update(batch)
    meter.load_state(all_reduce_sums(meter.state()))
    counts = all_reduce_sum(torch.tensor([issues.bad_videos, issues.bad_frames])).cpu().tolist()
    per_class = meter.per_class()
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "list": str(video_list),
        "scores": meter.scores(),
        "views": {"clips": test_clips, "crops": test_crops, "frames": num_frames, "size": size},
        "average": average,
        "blend": blend if blend == "none" else {"original": blend, "alpha": RELEASED_BLEND_ALPHA},
        "data_issues": {"bad_videos": int(counts[0]), "bad_frames": int(counts[1])},
        "per_class": dict(zip(class_names, per_class, strict=True)),
    }
    if out is not None and is_main_process():
        write_report(result, meter.confusion.numpy(), class_names, Path(out))
    return result


def write_report(result: dict[str, Any], confusion: np.ndarray, class_names: list[str], out: Path) -> None:
    """``metrics.json``, ``metrics.md``, ``per_class.csv`` and ``confusion.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    s, views = result["scores"], result["views"]
    lines = [
        f"# {result['checkpoint']} on {result['list']}",
        "",
        "| top-1 | top-5 | mean class | videos | views (clips × crops) | average | blend |",
        "|---|---|---|---|---|---|---|",
        f"| {s['top1']:.2f} | {s['top5']:.2f} | {s['mean_class']:.2f} | {int(s['videos'])} | "
        f"{views['clips']} × {views['crops']} | {result['average']} | "
        f"{'none' if result['blend'] == 'none' else result['blend']['alpha']} |",
        "",
        f"Broken input: {result['data_issues']['bad_videos']} videos replaced, "
        f"{result['data_issues']['bad_frames']} frames replaced.",
    ]
    (out / "metrics.md").write_text("\n".join(lines) + "\n")
    with open(out / "per_class.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "name", "videos", "accuracy"])
        for i, name in enumerate(class_names):
            writer.writerow([i, name, int(confusion[i].sum()), result["per_class"][name]])
    try:
        from prism_vfm.analysis.plotting import heatmap_grid

        rows = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
        labels = class_names if len(class_names) <= 60 else [str(i) for i in range(len(class_names))]
        heatmap_grid(
            [(rows, "confusion (rows: true class)")],
            out / "confusion.png",
            labels,
            "predicted class",
            "fraction of the class's videos",
            vmax=1.0,
            col_labels=labels,
        )
    except ImportError as exc:
        logger.warning("no confusion figure: %s", exc)
