"""Zero-shot evaluation of a VidPrism model by text similarity, with each protocol a data file.

Peers disagree on prompts, views and even which videos make up a split, so a protocol is a YAML file that
the report records, not a code path::

    name: ucf101_3splits            # shows in the report
    videos: videos                  # folder the lists' paths are relative to
    splits:                         # one evaluation each; the report gives each and mean ± std
      - {list: testlist01.txt, labels: labels.csv}
      - {list: testlist02.txt, labels: labels.csv}
    templates: ensemble_28          # ensemble_28 | ssv2_20 | single, or a list of "... {} ..." strings
    frames: 32
    size: 224
    clips: 3                        # views per video: clips × crops
    crops: 1
    average: logits                 # views' scores averaged then softmaxed (released); or softmax
    dataset: ucf101                 # optional registry name

Paths are relative to the protocol file. A split's classes are its label CSV's (the data set's full
class list; a subset protocol such as K600's novel classes is a label CSV of those classes and a list
labelled in it). Class scores are cos(z, t_c) of the clip embedding and the prompt-ensemble class text
embeddings, with no temperature, as released (VIDPRISM_SPEC §4).
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from prism_vfm.config import ConfigError, from_dict
from prism_vfm.train.distributed import all_reduce_sum, all_reduce_sums, is_main_process, shard_indices
from prism_vfm.video.backbone import CLIP_TOWERS
from prism_vfm.video.data.dataset import DataIssues, VideoDataset
from prism_vfm.video.data.lists import read_label_csv, read_video_list
from prism_vfm.video.evaluate import apply_blend, load_vidprism, write_report
from prism_vfm.video.metrics import ClassificationMeter, average_views
from prism_vfm.video.model import RELEASED_BLEND_ALPHA, VidPrism
from prism_vfm.video.prompts import ENSEMBLE_28, SINGLE, SSV2_20
from prism_vfm.video.text import (
    CLIP_TEXT_TOWERS,
    TextEncoder,
    class_text_embeddings,
    cosine_logits,
    load_text_weights,
)
from prism_vfm.video.train_config import TOWERS

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"ensemble_28": ENSEMBLE_28, "ssv2_20": SSV2_20, "single": SINGLE}


@dataclass
class SplitSpec:
    list: str
    labels: str


@dataclass
class Protocol:
    name: str = ""
    videos: str = ""
    splits: list[SplitSpec] = field(default_factory=list)
    templates: Any = "ensemble_28"  # a TEMPLATE_SETS name or a list of templates
    frames: int = 32
    size: int = 224
    clips: int = 1
    crops: int = 1
    average: Literal["logits", "softmax"] = "logits"
    dataset: str | None = None


def read_protocol(path: str | os.PathLike) -> Protocol:
    """A protocol file, checked: unknown keys, missing files and bad values are errors naming them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"protocol file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of protocol keys")
    try:
        splits = [
            from_dict(SplitSpec, s, prefix=f"splits[{i}].") for i, s in enumerate(data.get("splits", []))
        ]
        protocol = from_dict(Protocol, {**data, "splits": []})
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    base = path.parent
    protocol.splits = [SplitSpec(str(base / s.list), str(base / s.labels)) for s in splits]
    protocol.videos = str(base / protocol.videos)
    protocol.name = protocol.name or path.stem
    if not protocol.splits:
        raise ConfigError(f"{path}: splits: expected at least one {{list, labels}} entry")
    if isinstance(protocol.templates, str):
        if protocol.templates not in TEMPLATE_SETS:
            raise ConfigError(
                f"{path}: templates: expected one of {sorted(TEMPLATE_SETS)} or a list, got "
                f"{protocol.templates!r}"
            )
    elif not (isinstance(protocol.templates, list) and all("{}" in str(t) for t in protocol.templates)):
        raise ConfigError(f"{path}: templates: expected a list of strings holding '{{}}'")
    if protocol.crops not in (1, 3, 5, 10) or protocol.clips < 1 or protocol.frames < 1:
        raise ConfigError(f"{path}: expected clips >= 1, crops in 1/3/5/10, frames >= 1")
    return protocol


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
    out: str | os.PathLike | None = None,
    text_weights: str = "hub",
    blend: str = "hub",
    batch_size: int = 4,
    workers: int = 4,
    device: str = "cpu",
) -> dict[str, Any]:
    """Top-1 / top-5 of every split of the protocol and their mean ± std; the report goes to ``out``.

    ``text_weights``: CLIP's text tower weights (``"hub"``, a file, ``"none"``: random, tests only);
    ``blend``: the release's test-time tower blend (see :func:`~prism_vfm.video.evaluate.apply_blend`).
    """
    protocol = read_protocol(protocol_file)
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
    for i, split in enumerate(protocol.splits):
        names = read_label_csv(split.labels)
        samples = read_video_list(split.list, len(names), root=protocol.videos)
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
        meter = ClassificationMeter(len(names))
        issues = DataIssues()
        loader = DataLoader(
            Subset(data, shard_indices(len(data))), batch_size=batch_size, num_workers=workers
        )
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
            meter.update(average_views(scores.view(b, v, -1), protocol.average), batch["label"])
            issues.update(batch)
        meter.load_state(all_reduce_sums(meter.state()))
        counts = all_reduce_sum(torch.tensor([issues.bad_videos, issues.bad_frames])).cpu().tolist()
        result = {
            "checkpoint": str(checkpoint),
            "list": split.list,
            "labels": split.labels,
            "scores": meter.scores(),
            "views": {
                "clips": protocol.clips,
                "crops": protocol.crops,
                "frames": protocol.frames,
                "size": protocol.size,
            },
            "average": protocol.average,
            "blend": blend if blend == "none" else {"original": blend, "alpha": RELEASED_BLEND_ALPHA},
            "data_issues": {"bad_videos": int(counts[0]), "bad_frames": int(counts[1])},
            "per_class": dict(zip(names, meter.per_class(), strict=True)),
        }
        if out is not None and is_main_process():
            write_report(result, meter.confusion.numpy(), names, Path(out) / f"split{i + 1}")
        results.append(result)
    summary = _summary(protocol, results)
    if out is not None and is_main_process():
        _write_summary(summary, Path(out))
    return summary


def _summary(protocol: Protocol, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "protocol": asdict(protocol),
        "blend": results[0]["blend"],
        "splits": [r["scores"] for r in results],
        "data_issues": {k: sum(r["data_issues"][k] for r in results) for k in ("bad_videos", "bad_frames")},
    }
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
    lines = [
        f"# zero-shot: {p['name']}",
        "",
        f"Templates: {p['templates'] if isinstance(p['templates'], str) else len(p['templates'])}; "
        f"{p['frames']} frames at {p['size']}²; views {p['clips']} clips × {p['crops']} crops; "
        f"average: {p['average']}; blend: {summary['blend']}. Std over splits: sample (n − 1).",
        "",
        "| split | top-1 | top-5 |",
        "|---|---|---|",
        *(f"| {i + 1} | {s['top1']:.2f} | {s['top5']:.2f} |" for i, s in enumerate(summary["splits"])),
        f"| mean ± std | {summary['top1']['mean']:.2f} ± {summary['top1']['std']:.2f} | "
        f"{summary['top5']['mean']:.2f} ± {summary['top5']['std']:.2f} |",
    ]
    (out / "metrics.md").write_text("\n".join(lines) + "\n")
