"""Every fact the library knows about a data set, in one place: PRISM's and VidPrism's.

Multi-task dense data sets (SPEC §7–§9): one frozen :class:`DatasetInfo` per data set — PASCAL-Context and
NYUD-v2 — holds its tasks and their output channels, the Stage-2 loss weights, the headline metric of each
task and its direction, the single-task baselines of Δm per backbone, the network input size, the
boundary-matching tolerance, the names it is known by and its reader (:func:`get_dataset`).

Video classification data sets (VIDPRISM_SPEC §5): one frozen :class:`VideoDatasetInfo` per data set —
Kinetics-400, Kinetics-600, UCF101, HMDB51, Something-Something v2 — holds its class count, the published
splits and the folder of their files, how its files are named and laid out and the names it is known by
(:func:`get_video_dataset`).

Every other module reads them from here.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

HEADLINE_METRICS: Mapping[str, str] = MappingProxyType(
    {
        "semseg": "mIoU",
        "human_parts": "mIoU",
        "sal": "maxF",
        "normals": "mErr",
        "depth": "RMSE",
        "edge": "odsF",
    }
)
"""The score of each task that enters Δm and the results tables (the same in every data set)."""

LOWER_IS_BETTER: frozenset[str] = frozenset({"normals", "depth"})
"""Tasks whose headline metric is an error (mean angular error, RMSE): lower is better."""

BACKBONES: Mapping[tuple[int, int], str] = MappingProxyType(
    {(384, 12): "vit_s", (768, 12): "vit_b", (1024, 24): "vit_l"}
)
"""Backbone names of the baselines, by (width, depth) of the student ViT."""


def backbone_name(width: int, depth: int) -> str:
    """The baseline key of a ViT of this width and depth (``vit_b``…), or a description of an unknown one."""
    return BACKBONES.get((width, depth), f"a ViT of width {width} and depth {depth}")


@dataclass(frozen=True)
class DatasetInfo:
    """The facts of one multi-task data set."""

    name: str
    """Canonical name, used in configurations and results (``pascalcontext``, ``nyud``)."""
    title: str
    """How papers write it."""
    aliases: tuple[str, ...]
    """Other names accepted for it (the command line's ``--dataset pascal``, the boundary protocol's)."""
    tasks: Mapping[str, int]
    """Tasks in the official order, with the channels of their head output (segmentation: classes)."""
    loss_weights: Mapping[str, float]
    """Weight of each task's loss in the Stage-2 objective (SPEC §7)."""
    baselines: Mapping[str, Mapping[str, float]]
    """Single-task scores of the headline metrics for Δm, per backbone (``vit_b``, ``vit_l``; SPEC §9)."""
    input_size: tuple[int, int]
    """Network input ``(H, W)``: training crops are cut to it, every sample is padded to it."""
    boundary_max_dist_ratio: float
    """Boundary matching tolerance as a fraction of the image diagonal (SEISM protocol)."""
    edge_loss_meter_pos_weight: float
    """Positive weight of the official edge loss meter (differs from the training loss's on NYUD)."""
    reader: str
    """The reader class, as ``module:Class`` (imported on use: the readers themselves read this registry)."""

    @property
    def headline_metrics(self) -> dict[str, str]:
        """The headline metric of each task of this data set."""
        return {t: HEADLINE_METRICS[t] for t in self.tasks}

    @property
    def lower_is_better(self) -> frozenset[str]:
        """The tasks of this data set whose headline metric is lower-is-better."""
        return LOWER_IS_BETTER & frozenset(self.tasks)

    def baselines_for(self, backbone: str) -> dict[str, float]:
        """The single-task baselines of ``backbone``; ValueError naming a backbone without any."""
        if backbone not in self.baselines:
            raise ValueError(
                f"{self.title} has no single-task baselines for {backbone} (only for "
                f"{sorted(self.baselines)}); give your backbone's ({{task: single-task score}}) to compute Δm"
            )
        return dict(self.baselines[backbone])

    def reader_class(self) -> Any:
        """The class that reads this data set's release folder."""
        module, _, cls = self.reader.partition(":")
        return getattr(importlib.import_module(module), cls)


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType({k: _frozen(v) if isinstance(v, Mapping) else v for k, v in mapping.items()})


PASCAL_CONTEXT = DatasetInfo(
    name="pascalcontext",
    title="PASCAL-Context",
    aliases=("pascal", "pascal_context", "pascal-context"),
    tasks=_frozen({"semseg": 21, "human_parts": 7, "normals": 3, "edge": 1, "sal": 2}),
    loss_weights=_frozen({"semseg": 1.0, "human_parts": 2.0, "normals": 10.0, "sal": 5.0, "edge": 50.0}),
    baselines=_frozen(
        {
            "vit_b": {"semseg": 80.25, "human_parts": 70.54, "sal": 84.54, "normals": 13.57, "edge": 74.22},
            "vit_l": {"semseg": 81.61, "human_parts": 72.77, "sal": 83.80, "normals": 13.87, "edge": 75.24},
        }
    ),
    input_size=(512, 512),
    boundary_max_dist_ratio=0.0075,
    edge_loss_meter_pos_weight=0.95,
    reader="prism_vfm.data.pascal_context:PascalContext",
)

NYUD_V2 = DatasetInfo(
    name="nyud",
    title="NYUD-v2",
    aliases=("nyudv2", "nyud-v2", "nyud_v2"),
    tasks=_frozen({"semseg": 40, "normals": 3, "edge": 1, "depth": 1}),
    loss_weights=_frozen({"semseg": 1.0, "normals": 10.0, "edge": 50.0, "depth": 1.0}),
    baselines=_frozen({"vit_b": {"semseg": 51.15, "depth": 0.5792, "normals": 19.77, "edge": 77.35}}),
    input_size=(448, 576),
    boundary_max_dist_ratio=0.011,
    edge_loss_meter_pos_weight=0.8,
    reader="prism_vfm.data.nyud:NYUDv2",
)

DATASETS: Mapping[str, DatasetInfo] = MappingProxyType({d.name: d for d in (PASCAL_CONTEXT, NYUD_V2)})
"""Every data set, by canonical name."""

_BY_NAME = {n: d for d in DATASETS.values() for n in (d.name, *d.aliases)}


def get_dataset(name: str) -> DatasetInfo:
    """The data set called ``name`` (canonical or alias); ValueError naming the known ones otherwise."""
    if name not in _BY_NAME:
        aliases = sorted(a for d in DATASETS.values() for a in d.aliases)
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)} (or {aliases})")
    return _BY_NAME[name]


def dataset_tasks(name: str) -> dict[str, int]:
    """The tasks of data set ``name`` with their output channels, in the official order."""
    return dict(get_dataset(name).tasks)


@dataclass(frozen=True)
class VideoDatasetInfo:
    """The facts of one video classification data set."""

    name: str
    """Canonical name (``k400``, ``k600``, ``ucf101``, ``hmdb51``, ``ssv2``)."""
    title: str
    """How papers write it."""
    aliases: tuple[str, ...]
    """Other names accepted for it."""
    num_classes: int
    splits: tuple[int, ...]
    """The published train/test splits (``(1, 2, 3)`` for UCF101 and HMDB51; ``(1,)`` when there is one)."""
    layout: str
    """How the videos sit under the data root: ``class_folders`` (``Class/video.avi``) or ``flat``."""
    video_ext: str
    """Extension of the released video files."""
    flip_label_pairs: tuple[tuple[int, int], ...] = ()
    """Classes that a horizontal flip turns into each other (SSv2's left/right pairs; SPEC §3.3)."""
    grayscale: bool = True
    """Whether training uses random grayscale (the release turns it off for SSv2)."""
    split_files: str = ""
    """Folder of the published train/test split files, as released, under the data root (UCF101's
    ``ucfTrainTestlist``, HMDB51's ``testTrainMulti_7030_splits``; empty when the splits come as lists)."""


K400 = VideoDatasetInfo(
    name="k400",
    title="Kinetics-400",
    aliases=("kinetics400", "kinetics-400", "kinetics"),
    num_classes=400,
    splits=(1,),
    layout="flat",
    video_ext=".mp4",
)
K600 = VideoDatasetInfo(
    name="k600",
    title="Kinetics-600",
    aliases=("kinetics600", "kinetics-600"),
    num_classes=600,
    splits=(1,),
    layout="flat",
    video_ext=".mp4",
)
UCF101 = VideoDatasetInfo(
    name="ucf101",
    title="UCF101",
    aliases=("ucf", "ucf-101"),
    num_classes=101,
    splits=(1, 2, 3),
    layout="class_folders",
    video_ext=".avi",
    split_files="ucfTrainTestlist",
)
HMDB51 = VideoDatasetInfo(
    name="hmdb51",
    title="HMDB51",
    aliases=("hmdb", "hmdb-51"),
    num_classes=51,
    splits=(1, 2, 3),
    layout="class_folders",
    video_ext=".avi",
    split_files="testTrainMulti_7030_splits",
)
SSV2 = VideoDatasetInfo(
    name="ssv2",
    title="Something-Something v2",
    aliases=("something-something-v2", "somethingv2", "sthv2", "something"),
    num_classes=174,
    splits=(1,),
    layout="flat",
    video_ext=".webm",
    flip_label_pairs=((86, 87), (93, 94), (166, 167)),
    grayscale=False,
)

VIDEO_DATASETS: Mapping[str, VideoDatasetInfo] = MappingProxyType(
    {d.name: d for d in (K400, K600, UCF101, HMDB51, SSV2)}
)
"""Every video data set, by canonical name."""

_VIDEO_BY_NAME = {n: d for d in VIDEO_DATASETS.values() for n in (d.name, *d.aliases)}


def get_video_dataset(name: str) -> VideoDatasetInfo:
    """The video data set called ``name`` (canonical or alias); ValueError naming the known ones otherwise."""
    if name.lower() not in _VIDEO_BY_NAME:
        raise ValueError(
            f"unknown video dataset {name!r}; expected one of {sorted(VIDEO_DATASETS)} "
            f"(or {sorted(a for d in VIDEO_DATASETS.values() for a in d.aliases)})"
        )
    return _VIDEO_BY_NAME[name.lower()]
