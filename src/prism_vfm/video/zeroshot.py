"""Zero-shot evaluation of a VidPrism model by text similarity, with each protocol a data file.

Peers disagree on prompts, views and even which videos make up a split, so a protocol is a YAML file that
the report records, not a code path::

    name: ucf101_3splits            # shows in the report
    videos: videos                  # folder the lists' paths are relative to
    splits:                         # one evaluation each; the report gives each and mean ± std
      - {dataset: ucf101, split: 1} # a published split, read from the data set's split files
      - {list: testlist02.txt, labels: labels.csv}             # or a video list and its label CSV
      - {list: val.txt, labels: labels.csv, classes: novel.csv} # only these classes (label CSV or names)
    templates: ensemble_28          # ensemble_28 | ssv2_20 | single, or a list of "... {} ..." strings
    frames: 32
    size: 224
    clips: 3                        # views per video: clips × crops
    crops: 1
    average: logits                 # views' scores averaged then softmaxed (released); or softmax
    logit_scale: 1.0                # scores are logit_scale · cos (released zero-shot: 1)
    half_classes: []                # numpy seeds: score each split on C/2 of its classes per seed instead
    dataset: ucf101                 # optional registry name

Shipped protocols (``protocols/*.yaml``, :func:`shipped_protocols`) are named instead of given as a path.
Paths are relative to the data root given as ``root`` (``--root``), or else to the protocol file's folder.
A published split (``{dataset, split}``) is read from the registry's folder of split files under the root
(``split_files`` names another); its class names are the split files' unless ``labels`` gives a label CSV
of the same classes in the same order. A split's ``classes`` keeps only the videos of those classes and
scores them among those classes only (Kinetics-600's novel classes: :mod:`prism_vfm.video.data.classes`).
Class scores are cos(z, t_c) of the clip embedding and the prompt-ensemble class text embeddings, with no
temperature, as released (VIDPRISM_SPEC §4); the half-class protocol scores ``100 · cos`` as its release
did, on the halves drawn by :func:`~prism_vfm.video.data.classes.half_classes`.
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

from prism_vfm.config import ConfigError, from_dict, parse_override
from prism_vfm.data.registry import get_video_dataset
from prism_vfm.train.distributed import all_reduce_sum, all_reduce_sums, is_main_process, shard_indices
from prism_vfm.video.backbone import CLIP_TOWERS
from prism_vfm.video.data.classes import class_ids, half_classes, restrict
from prism_vfm.video.data.dataset import DataIssues, VideoDataset
from prism_vfm.video.data.lists import VideoSample, published_split, read_label_csv, read_video_list
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
PROTOCOLS_DIR = Path(__file__).parent / "protocols"
"""The shipped protocol files (package data)."""


@dataclass
class SplitSpec:
    list: str = ""
    labels: str = ""
    dataset: str = ""  # a registry name with published split files (ucf101, hmdb51), with split
    split: int = 0
    split_files: str = ""  # their folder (default: the registry's folder name under the root)
    classes: Any = None  # a label CSV or a list of class names: only these classes


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
    logit_scale: float = 1.0
    half_classes: list[int] = field(default_factory=list)
    dataset: str | None = None
    file: str = ""  # where it was read from (filled in; recorded in the report)


def shipped_protocols() -> list[str]:
    """Names of the protocols shipped with the package."""
    return sorted(p.stem for p in PROTOCOLS_DIR.glob("*.yaml"))


def protocol_path(protocol: str | os.PathLike) -> Path:
    """The file of ``protocol``: a path to a YAML file, or the name of a shipped protocol."""
    path = Path(protocol)
    if path.is_file():
        return path
    if path.suffix in (".yaml", ".yml") or os.sep in str(protocol):
        if not path.is_file():
            raise FileNotFoundError(f"protocol file {path} does not exist")
        return path
    shipped = PROTOCOLS_DIR / f"{protocol}.yaml"
    if not shipped.is_file():
        raise ValueError(
            f"unknown protocol {str(protocol)!r}: not a .yaml file, and the shipped protocols are "
            f"{', '.join(shipped_protocols())}"
        )
    return shipped


def _resolve(base: Path, value: str) -> str:
    return str(base / value) if value else ""


def read_protocol(
    source: str | os.PathLike, root: str | os.PathLike | None = None, overrides: Sequence[str] = ()
) -> Protocol:
    """A protocol (file or shipped name; its data under ``root``, else beside the file) with ``overrides``
    (``"frames=8"``: a top-level key, the value read as YAML) applied, checked: unknown keys, missing
    files and bad values are errors naming them."""
    path = protocol_path(source)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of protocol keys")
    data = {**data, **dict(parse_override(o) for o in overrides)}
    if root is None and path.parent == PROTOCOLS_DIR:
        raise ConfigError(f"the shipped protocol {path.stem} reads its data under a data root: give root")
    try:
        splits = [
            from_dict(SplitSpec, s, prefix=f"splits[{i}].") for i, s in enumerate(data.get("splits", []))
        ]
        protocol = from_dict(Protocol, {**data, "splits": []})
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    base = Path(root) if root is not None else path.parent
    if root is not None and not base.is_dir():
        raise FileNotFoundError(f"data root {base} is not a folder")
    for i, s in enumerate(splits):
        key = f"{path}: splits[{i}]"
        if s.dataset:
            try:
                info = get_video_dataset(s.dataset)
            except ValueError as exc:
                raise ConfigError(f"{key}.dataset: {exc}") from None
            if not (s.split_files or info.split_files):
                raise ConfigError(
                    f"{key}.dataset: {info.title} has no published split files; give list and labels"
                )
            if s.split not in info.splits:
                raise ConfigError(f"{key}.split: expected one of {list(info.splits)}, got {s.split}")
            if s.list:
                raise ConfigError(f"{key}: give a published split (dataset, split) or a list, not both")
            s.split_files = _resolve(base, s.split_files or info.split_files)
        elif not (s.list and s.labels):
            raise ConfigError(f"{key}: expected {{list, labels}} or {{dataset, split}}")
        s.list, s.labels = _resolve(base, s.list), _resolve(base, s.labels)
        if isinstance(s.classes, str):
            s.classes = _resolve(base, s.classes)
        elif s.classes is not None and not (
            isinstance(s.classes, list) and s.classes and all(isinstance(c, str) for c in s.classes)
        ):
            raise ConfigError(f"{key}.classes: expected a label CSV or a list of class names")
    protocol.splits = splits
    protocol.videos = str(base / protocol.videos)
    protocol.name = protocol.name or path.stem
    protocol.file = str(path)
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
    if protocol.logit_scale <= 0:
        raise ConfigError(f"{path}: logit_scale: expected a number > 0, got {protocol.logit_scale}")
    if any(seed < 0 for seed in protocol.half_classes):
        raise ConfigError(f"{path}: half_classes: expected numpy seeds >= 0, got {protocol.half_classes}")
    return protocol


def split_classes(protocol: Protocol, index: int) -> tuple[list[VideoSample], list[str]]:
    """The videos and class names of split ``index`` (0-based) of ``protocol``, its ``classes`` applied."""
    spec = protocol.splits[index]
    where = f"{protocol.file}: splits[{index}]"
    if spec.dataset:
        samples, names = published_split(spec.dataset, spec.split_files, spec.split, "test")
        missing = [s.path for s in samples if not (Path(protocol.videos) / s.path).exists()]
        if missing:
            raise FileNotFoundError(
                f"{where}: {len(missing)} videos of {spec.dataset} split {spec.split} ({spec.split_files}) "
                f"are not under {protocol.videos}, e.g. {missing[0]}"
            )
        if spec.labels:
            own = read_label_csv(spec.labels)
            if len(own) != len(names):
                raise ValueError(
                    f"{spec.labels}: {len(own)} classes, but the split files {spec.split_files} have "
                    f"{len(names)}"
                )
            names = own
        source = spec.labels or spec.split_files
    else:
        names = read_label_csv(spec.labels)
        samples = read_video_list(spec.list, len(names), root=protocol.videos)
        source = spec.labels
    if spec.classes is not None:
        wanted = read_label_csv(spec.classes) if isinstance(spec.classes, str) else spec.classes
        ids = class_ids(names, wanted, spec.classes if isinstance(spec.classes, str) else where, source)
        samples, names = restrict(samples, ids), [names[i] for i in ids]
        if not samples:
            raise ValueError(f"{where}: no video of {spec.list or spec.split_files} is of its classes")
    return samples, names


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
