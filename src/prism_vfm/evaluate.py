"""Evaluate a multi-task model on a split exactly as the paper does (SPEC §9), without MATLAB.

Pixel metrics are pooled over the whole split; boundaries go through the SEISM protocol (NMS, thinning,
the BSDS matcher) in worker processes; Δm is taken against the published single-task baselines or the
user's. Results are written as JSON and as a Markdown table.

Launched under torchrun, every process scores its own part of the split and the counts are summed (pixel
meters, on the device) or gathered (per-image boundary counts), so the scores are those of one process;
only rank 0 writes the results (each process writes its own images' edge maps).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from prism_vfm.data.dense_transforms import DenseTestTransform
from prism_vfm.data.nyud import NYUDv2
from prism_vfm.data.pascal_context import PascalContext
from prism_vfm.data.registry import HEADLINE_METRICS, backbone_name, get_dataset
from prism_vfm.metrics.boundary import DEFAULT_MATCHER, BoundaryMeter, boundary_scores, edge_logits_to_uint8
from prism_vfm.metrics.multitask import MultiTaskMeter, delta_m
from prism_vfm.models.load import load
from prism_vfm.models.multitask import PrismMultiTask
from prism_vfm.train.distributed import (
    all_gather_objects,
    all_reduce_sums,
    is_main_process,
    shard_indices,
)


@torch.no_grad()
def evaluate(
    checkpoint: str | Path,
    dataset: str,
    data: str | Path,
    split: str = "val",
    out: str | Path | None = None,
    batch_size: int = 2,
    workers: int | None = None,
    baselines: Mapping[str, float] | None = None,
    save_edges: bool = False,
    device: str = "cpu",
    img_size: tuple[int, int] | None = None,
    matcher: str = DEFAULT_MATCHER,
) -> dict[str, Any]:
    """Scores of every task (edge: odsF, oisF, AP), Δm, written to ``out`` as JSON and Markdown.

    ``matcher`` matches the boundaries (``prism_vfm.metrics.boundary.MATCHERS``): ``"fast"`` (the
    default: the BSDS matcher's assignment, same counts, 20-40× faster), ``"bsds"`` (the BSDS matcher
    of SEISM itself, the reference) or ``"maximum"`` (maximum matching, about 0.1 point higher).

    Images are padded (never resized) to ``img_size`` (default: the data set's evaluation size) and the
    metrics are taken on the padded prediction with the padding ignored, as in the paper.

    Δm is taken against ``baselines`` ({task: single-task score}); None: the data set's published
    baselines of the model's backbone (ValueError, before any work, for a backbone without any);
    an empty mapping: no Δm (``delta_m`` None).
    """
    info = get_dataset(dataset)
    dataset = info.name
    size = cast("tuple[int, int]", tuple(img_size)) if img_size else info.input_size
    loaded, report = load(checkpoint, img_size=size, multitask=True)
    model = cast(PrismMultiTask, loaded).to(device)
    if baselines is None:
        student = model.student
        baselines = info.baselines_for(backbone_name(student.embed_dim, len(student.blocks)))
    tasks = model.task_names
    reader = info.reader_class()(data, split, tasks, DenseTestTransform(size))
    meter = MultiTaskMeter(dataset, [t for t in tasks if t != "edge"])
    if workers is None and "LOCAL_WORLD_SIZE" in os.environ:  # torchrun: the node's CPUs shared by its ranks
        workers = max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"]))
    boundaries = BoundaryMeter(dataset, workers=workers, matcher=matcher) if "edge" in tasks else None
    out_dir = Path(out) if out is not None else None
    if save_edges and out_dir is not None:
        (out_dir / "edge").mkdir(parents=True, exist_ok=True)
    part = Subset(reader, shard_indices(len(reader)))
    loader = DataLoader(part, batch_size=batch_size, num_workers=0, collate_fn=_collate)
    main = is_main_process()
    for batch in tqdm(loader, desc=f"evaluate {split}", unit="batch", disable=not main):
        outputs = model(batch["image"].to(device)).predictions
        meter.update(
            {t: o.float() for t, o in outputs.items() if t != "edge"},
            {t: batch[t].to(device) for t in tasks if t != "edge"},
        )
        if boundaries is not None:
            ids = [m["id"] for m in batch["meta"]]
            sizes = [tuple(m["size"]) for m in batch["meta"]]
            truth = [
                cast(PascalContext, reader).label_map(i)
                if dataset == "pascalcontext"
                else cast(NYUDv2, reader).boundary_gt(i)
                for i in ids
            ]
            boundaries.update(outputs["edge"].float(), truth, sizes)
            if save_edges and out_dir is not None:
                for i, edge in zip(ids, edge_logits_to_uint8(outputs["edge"].float(), sizes), strict=True):
                    Image.fromarray(edge).save(out_dir / "edge" / f"{i}.png")
    meter.load_state(all_reduce_sums(meter.state()))
    scores: dict[str, Any] = {t: dict(s) for t, s in meter.compute().items()}
    if boundaries is not None:
        if boundaries.pending:
            boundaries.compute()  # this process's images
        # Per-image counts: the image-level best thresholds (oisF) need them, not just their sum.
        b = boundary_scores(np.concatenate(all_gather_objects(boundaries.counts)))
        scores["edge"] = {k: float(v) for k, v in b.items() if np.ndim(v) == 0}
    base = dict(baselines)
    result = {
        "dataset": dataset,
        "split": split,
        "checkpoint": str(checkpoint),
        "loaded": report.summary(),
        "images": len(reader),
        "scores": scores,
        "delta_m": delta_m(scores, base) if base else None,
        "baselines": base,
    }
    if out_dir is not None and main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
        (out_dir / "metrics.md").write_text(markdown_table(result))
    return result


def markdown_table(result: Mapping[str, Any]) -> str:
    """One row of headline metrics and Δm, the way the paper's tables read."""
    scores = result["scores"]
    names = list(scores)
    header = "| " + " | ".join(f"{t} ({HEADLINE_METRICS[t]})" for t in names) + " | Δm |"
    rule = "|" + "---|" * (len(names) + 1)
    row = "| " + " | ".join(f"{scores[t][HEADLINE_METRICS[t]]:.2f}" for t in names)
    row += f" | {result['delta_m']:.2f} |" if result["delta_m"] is not None else " | — |"
    return f"{result['dataset']} {result['split']} ({result['images']} images)\n\n{header}\n{rule}\n{row}\n"


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "meta"}
    out["meta"] = [s["meta"] for s in samples]
    return out
