"""Zero-shot evaluation of a VidPrism model by text similarity, per a protocol file
(:mod:`prism_vfm.video.protocols`: its format, and the shipped protocols).

Class scores are cos(z, t_c) of the clip embedding and the prompt-ensemble class text embeddings, with no
temperature, as released (VIDPRISM_SPEC §4), times the protocol's ``logit_scale``; views' scores are
averaged then softmaxed (or the reverse, ``average: softmax``). With ``half_classes`` seeds every split is
scored once per seed on its half of the classes, from the same video scores. The report records the whole
protocol, each split's (and seed's) classes and scores, and the mean ± std.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from prism_vfm.train.distributed import all_reduce_sum, all_reduce_sums, is_main_process, shard_indices
from prism_vfm.video.backbone import CLIP_TOWERS
from prism_vfm.video.data.classes import half_classes
from prism_vfm.video.data.dataset import DataIssues, VideoDataset
from prism_vfm.video.evaluate import apply_blend, load_vidprism, write_report
from prism_vfm.video.metrics import ClassificationMeter, average_views
from prism_vfm.video.model import RELEASED_BLEND_ALPHA, VidPrism
from prism_vfm.video.protocols import TEMPLATE_SETS, Protocol, read_protocol, split_classes
from prism_vfm.video.text import (
    CLIP_TEXT_TOWERS,
    TextEncoder,
    class_text_embeddings,
    cosine_logits,
    load_text_weights,
)
from prism_vfm.video.train_config import TOWERS


def text_encoder_for(model: VidPrism, weights: str) -> TextEncoder:
    """CLIP's text tower matching ``model``'s vision tower, with weights ``"hub"``, a file, or ``"none"``
    (random: tests only)."""
    config = model.backbone.config
    names = [n for n, (tower, _) in TOWERS.items() if tower == config]
    names += [n for n, tower in CLIP_TOWERS.items() if tower == config]
    if not names:
        raise ValueError(f"no CLIP text tower is known for the vision tower {config}")
    text = TOWERS[names[0]][1] if names[0] in TOWERS else CLIP_TEXT_TOWERS[names[0]]
    encoder = TextEncoder(text)
    if weights != "none":
        load_text_weights(encoder, weights)
    return encoder.requires_grad_(False).eval()


@torch.no_grad()
def zero_shot(
    checkpoint: str | os.PathLike,
    protocol_file: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    out: str | os.PathLike | None = None,
    text_weights: str = "hub",
    blend: str = "hub",
    batch_size: int = 4,
    workers: int = 4,
    device: str = "cpu",
) -> dict[str, Any]:
    """Top-1 / top-5 of every split of the protocol (a file or a shipped name, its data under ``root``)
    and their mean ± std; the report goes to ``out``. ``overrides`` change top-level protocol keys
    (``"frames=8"``; recorded in the report).

    ``text_weights``: CLIP's text tower weights (``"hub"``, a file, ``"none"``: random, tests only);
    ``blend``: the release's test-time tower blend (see :func:`~prism_vfm.video.evaluate.apply_blend`).
    With ``half_classes`` seeds, each split is scored once per seed, on its half of the classes.
    """
    protocol = read_protocol(protocol_file, root, overrides)
    prepared = [split_classes(protocol, i) for i in range(len(protocol.splits))]  # bad input first
    model = load_vidprism(checkpoint)
    apply_blend(model, blend)
    model.to(device)
    encoder = text_encoder_for(model, text_weights)
    templates = (
        TEMPLATE_SETS[protocol.templates]
        if isinstance(protocol.templates, str)
        else tuple(protocol.templates)
    )
    results = []
    for i, (samples, names) in enumerate(prepared):
        class_text = class_text_embeddings(encoder, names, templates).to(device)
        data = VideoDataset(
            protocol.videos,
            samples,
            "test",
            protocol.frames,
            protocol.size,
            protocol.size,
            protocol.clips,
            protocol.crops,
            dataset=protocol.dataset,
        )
        issues = DataIssues()
        loader = DataLoader(
            Subset(data, shard_indices(len(data))), batch_size=batch_size, num_workers=workers
        )
        views, labels = [], []  # every view's scores of every class, subsets are scored from them
        for batch in tqdm(loader, desc=f"split {i + 1}", unit="batch", disable=not is_main_process()):
            clips = batch["video"].to(device)
            b, v = clips.shape[:2]
            out_ = model(clips.flatten(0, 1), class_text)
            if model.head.cfg.variant == "text":
                scores = out_.logits
            elif out_.embedding is not None:
                scores = cosine_logits(out_.embedding, class_text)
            else:
                raise ValueError(
                    f"{checkpoint}: the VideoMAE-feature head has no projection to compare with text"
                )
            views.append(scores.view(b, v, -1).float().cpu())
            labels.append(batch["label"].cpu())
            issues.update(batch)
        counts = all_reduce_sum(torch.tensor([issues.bad_videos, issues.bad_frames])).cpu().tolist()
        all_views = torch.cat(views) if views else torch.zeros(0, 1, len(names))
        all_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
        subsets: list[tuple[int | None, list[int]]] = (
            [(seed, half_classes(len(names), seed)) for seed in protocol.half_classes]
            if protocol.half_classes
            else [(None, list(range(len(names))))]
        )
        for seed, ids in subsets:
            keep = torch.isin(all_labels, torch.tensor(ids))
            position = torch.full((len(names),), -1, dtype=torch.long)
            position[ids] = torch.arange(len(ids))
            meter = ClassificationMeter(len(ids))
            if keep.any():
                scores = protocol.logit_scale * all_views[keep][:, :, ids]
                meter.update(average_views(scores, protocol.average), position[all_labels[keep]])
            meter.load_state(all_reduce_sums(meter.state()))
            chosen = [names[j] for j in ids]
            result = {
                "checkpoint": str(checkpoint),
                "list": protocol.splits[i].list or protocol.splits[i].split_files,
                "labels": protocol.splits[i].labels,
                "split": i + 1,
                "seed": seed,
                "classes": chosen,
                "scores": meter.scores(),
                "views": {
                    "clips": protocol.clips,
                    "crops": protocol.crops,
                    "frames": protocol.frames,
                    "size": protocol.size,
                },
                "average": protocol.average,
                "logit_scale": protocol.logit_scale,
                "blend": blend if blend == "none" else {"original": blend, "alpha": RELEASED_BLEND_ALPHA},
                "data_issues": {"bad_videos": int(counts[0]), "bad_frames": int(counts[1])},
                "per_class": dict(zip(chosen, meter.per_class(), strict=True)),
            }
            if out is not None and is_main_process():
                folder = f"split{i + 1}" + ("" if seed is None else f"_seed{seed}")
                write_report(result, meter.confusion.numpy(), chosen, Path(out) / folder)
            results.append(result)
    summary = {**_summary(protocol, results), "overrides": list(overrides)}
    if out is not None and is_main_process():
        _write_summary(summary, Path(out))
    return summary


def _summary(protocol: Protocol, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    templates = TEMPLATE_SETS.get(protocol.templates) if isinstance(protocol.templates, str) else None
    out: dict[str, Any] = {
        "protocol": asdict(protocol),
        "template_strings": list(templates or protocol.templates),
        "blend": results[0]["blend"],
        "splits": [
            {"split": r["split"], "seed": r["seed"], **r["scores"], "classes": r["classes"]} for r in results
        ],
        "data_issues": {k: sum(r["data_issues"][k] for r in results) for k in ("bad_videos", "bad_frames")},
    }
    if protocol.half_classes:  # every seed's evaluation reads the same videos: count them once
        out["data_issues"] = {k: v // len(protocol.half_classes) for k, v in out["data_issues"].items()}
    for metric in ("top1", "top5"):
        values = [r["scores"][metric] for r in results]
        out[metric] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        }
    return out


def _write_summary(summary: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    p = summary["protocol"]
    over = "seeds" if p["half_classes"] else "splits"
    lines = [
        f"# zero-shot: {p['name']}",
        "",
        f"Protocol file: {p['file']}"
        + (f" with {', '.join(summary['overrides'])}" if summary.get("overrides") else "")
        + ". Templates: "
        f"{p['templates'] if isinstance(p['templates'], str) else len(p['templates'])}; "
        f"{p['frames']} frames at {p['size']}²; views {p['clips']} clips × {p['crops']} crops; "
        f"scores {p['logit_scale']:g} · cos; average: {p['average']}; blend: {summary['blend']}. "
        + (
            f"Each split scored on half of its classes per numpy seed {p['half_classes']} "
            "(classes of each in metrics.json). "
            if p["half_classes"]
            else ""
        )
        + f"Std over {over}: sample (n − 1).",
        "",
        "| split | seed | classes | videos | top-1 | top-5 |",
        "|---|---|---|---|---|---|",
        *(
            f"| {s['split']} | {'—' if s['seed'] is None else s['seed']} | {len(s['classes'])} | "
            f"{int(s['videos'])} | {s['top1']:.2f} | {s['top5']:.2f} |"
            for s in summary["splits"]
        ),
        f"| mean ± std | | | | {summary['top1']['mean']:.2f} ± {summary['top1']['std']:.2f} | "
        f"{summary['top5']['mean']:.2f} ± {summary['top5']['std']:.2f} |",
    ]
    (out / "metrics.md").write_text("\n".join(lines) + "\n")
