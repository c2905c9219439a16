"""The facts of the video data sets VidPrism is trained and evaluated on (SPEC §5), in one place.

One frozen :class:`VideoDatasetInfo` per data set — class count, the published splits, how its files are
named and laid out, the names it is known by — read by the list readers and the loader
(:func:`get_video_dataset`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class VideoDatasetInfo:
    """The facts of one video classification data set."""

    name: str
    """Canonical name (``k400``, ``ucf101``, ``hmdb51``, ``ssv2``)."""
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


K400 = VideoDatasetInfo(
    name="k400",
    title="Kinetics-400",
    aliases=("kinetics400", "kinetics-400", "kinetics"),
    num_classes=400,
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
)
HMDB51 = VideoDatasetInfo(
    name="hmdb51",
    title="HMDB51",
    aliases=("hmdb", "hmdb-51"),
    num_classes=51,
    splits=(1, 2, 3),
    layout="class_folders",
    video_ext=".avi",
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
    {d.name: d for d in (K400, UCF101, HMDB51, SSV2)}
)
"""Every video data set, by canonical name."""

_BY_NAME = {n: d for d in VIDEO_DATASETS.values() for n in (d.name, *d.aliases)}


def get_video_dataset(name: str) -> VideoDatasetInfo:
    """The video data set called ``name`` (canonical or alias); ValueError naming the known ones otherwise."""
    if name.lower() not in _BY_NAME:
        raise ValueError(
            f"unknown video dataset {name!r}; expected one of {sorted(VIDEO_DATASETS)} "
            f"(or {sorted(a for d in VIDEO_DATASETS.values() for a in d.aliases)})"
        )
    return _BY_NAME[name.lower()]
