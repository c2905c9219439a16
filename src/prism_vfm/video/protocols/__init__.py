"""Zero-shot protocols: each a data file, read and checked here; the shipped ones sit beside this module.

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

The shipped protocols, the YAML files of this folder (:func:`shipped_protocols`), are given by name.
Paths are relative to the data root given as ``root`` (``--root``), or else to the protocol file's folder.
A published split (``{dataset, split}``) is read from the registry's folder of split files under the root
(``split_files`` names another); its class names are the split files' unless ``labels`` gives a label CSV
of the same classes in the same order. A split's ``classes`` keeps only the videos of those classes and
scores them among those classes only (Kinetics-600's novel classes: :mod:`prism_vfm.video.data.classes`).
Scores are cos(z, t_c) with no temperature, as released (VIDPRISM_SPEC §4); the half-class protocol
scores ``100 · cos`` as its release did, on the halves drawn by
:func:`~prism_vfm.video.data.classes.half_classes`. :func:`prism_vfm.video.zeroshot.zero_shot` runs them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from prism_vfm.config import ConfigError, from_dict, parse_override
from prism_vfm.data.registry import get_video_dataset
from prism_vfm.video.data.classes import class_ids, restrict
from prism_vfm.video.data.lists import VideoSample, published_split, read_label_csv, read_video_list
from prism_vfm.video.prompts import ENSEMBLE_28, SINGLE, SSV2_20

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"ensemble_28": ENSEMBLE_28, "ssv2_20": SSV2_20, "single": SINGLE}
PROTOCOLS_DIR = Path(__file__).parent
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
        raise FileNotFoundError(f"protocol file {path} does not exist")
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
        raise ConfigError(f"{path}: splits: expected at least one {{list, labels}} or {{dataset, split}}")
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
