"""Class subsets of the zero-shot and base-to-novel protocols, each a function of recorded seeds.

- **Half classes** (VIDPRISM_SPEC §4): an earlier release script scored 10 random halves of a class set,
  numpy seeds 0–9, without recording how a half was drawn. The draw here is ours:
  ``np.random.RandomState(seed).permutation(C)[:C // 2]``, sorted. Base-to-novel takes the same half as
  its base classes and the rest as novel.
- **Kinetics-600 novel classes** ("K160"): the 220 Kinetics-600 classes absent from Kinetics-400, three
  splits of 160 of them. The released split files cannot be redistributed here, so they are drawn from the
  user's own label CSVs (:func:`write_k600_novel`) with recorded seeds, and written as label CSVs and a
  protocol file the user can read and edit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from prism_vfm.video.data.lists import VideoSample, read_label_csv, write_label_csv

K600_NOVEL_CLASSES = 220
"""Kinetics-600 classes whose normalised name is not a Kinetics-400 class."""
K600_SPLIT_CLASSES = 160
"""Classes in each K600 novel split ("K160")."""
K600_SPLIT_SEEDS = (0, 1, 2)
"""numpy seeds of the three K600 novel splits (ours: the release's draw is not recorded)."""
PROTOCOL_FILE = "k600_novel_3splits.yaml"


def draw_classes(num_classes: int, size: int, seed: int) -> list[int]:
    """Sorted ids of ``size`` of ``num_classes`` classes: ``np.random.RandomState(seed).permutation(C)``'s
    first ``size``."""
    if not 1 <= size <= num_classes:
        raise ValueError(f"cannot draw {size} of {num_classes} classes")
    return sorted(int(i) for i in np.random.RandomState(seed).permutation(num_classes)[:size])


def half_classes(num_classes: int, seed: int) -> list[int]:
    """Sorted ids of ``num_classes // 2`` classes drawn with numpy seed ``seed`` (the half-class protocol's
    subsets and base-to-novel's base classes; the draw is ours, see the module docstring)."""
    if num_classes < 2:
        raise ValueError(f"a half of {num_classes} classes is empty")
    return draw_classes(num_classes, num_classes // 2, seed)


def restrict(samples: Sequence[VideoSample], classes: Sequence[int]) -> list[VideoSample]:
    """The samples of ``classes`` (ids, in their new order), relabelled ``0..len(classes) − 1``."""
    position = {c: i for i, c in enumerate(classes)}
    return [VideoSample(s.path, position[s.label], s.num_frames) for s in samples if s.label in position]


def class_ids(names: Sequence[str], wanted: Sequence[str], where: str, labels: str) -> list[int]:
    """Ids in ``names`` (a label CSV's, ``labels``) of the class names ``wanted`` (from ``where``); an
    unknown name is an error naming it and both files."""
    by_name = {n: i for i, n in enumerate(names)}
    ids = []
    for i, name in enumerate(wanted):
        if name not in by_name:
            raise ValueError(f"{where}, class {i} {name!r}: not a class of the label CSV {labels}")
        ids.append(by_name[name])
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: a class is named twice")
    return ids


def normalise_class_name(name: str) -> str:
    """A class name as Kinetics' releases are compared: lower case, ``_`` as space, quotes and repeated
    spaces removed (the 400 and 600 CSVs spell some shared classes differently in these ways)."""
    name = name.strip().strip("\"'").replace("_", " ").lower()
    return re.sub(r"\s+", " ", name).strip()


def novel_classes(k400: Sequence[str], k600: Sequence[str]) -> list[str]:
    """Kinetics-600 class names (their own spelling, in their order) whose normalised name is not a
    Kinetics-400 class's."""
    seen = {normalise_class_name(n) for n in k400}
    return [n for n in k600 if normalise_class_name(n) not in seen]


def write_k600_novel(
    k400_labels: str | os.PathLike[str],
    k600_labels: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    seeds: Sequence[int] = K600_SPLIT_SEEDS,
    per_split: int = K600_SPLIT_CLASSES,
    expect_novel: int | None = K600_NOVEL_CLASSES,
    overwrite: bool = False,
) -> Path:
    """Draw the Kinetics-600 novel-class splits from the user's label CSVs and write them to ``out``.

    Writes ``novel_classes.csv`` (every novel class), ``split<N>.csv`` (``per_split`` novel classes drawn
    by :func:`draw_classes` with ``seeds[N-1]``, as label CSVs in Kinetics-600 spelling) and
    ``k600_novel_3splits.yaml``, a zero-shot protocol over the Kinetics-600 validation list (paths of the
    data relative to the data root given to ``prism video zeroshot --root``). Returns the protocol's path.
    ``expect_novel`` (None: any) guards against label CSVs of other releases; existing files are kept
    unless ``overwrite``.
    """
    k400_names, k600_names = read_label_csv(k400_labels), read_label_csv(k600_labels)
    novel = novel_classes(k400_names, k600_names)
    if expect_novel is not None and len(novel) != expect_novel:
        raise ValueError(
            f"{k600_labels} has {len(novel)} classes absent from {k400_labels}, expected {expect_novel} "
            "(Kinetics-600 adds 220 to Kinetics-400; check that both CSVs are the published class lists, or "
            "allow another count)"
        )
    if not 1 <= per_split <= len(novel):
        raise ValueError(f"per_split: expected 1..{len(novel)} novel classes, got {per_split}")
    out = Path(out)
    split_files = [f"split{i + 1}.csv" for i in range(len(seeds))]
    existing = [n for n in ("novel_classes.csv", *split_files, PROTOCOL_FILE) if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds {', '.join(existing)}; choose another folder or overwrite them"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_label_csv(out / "novel_classes.csv", novel)
    splits = []
    for name, seed in zip(split_files, seeds, strict=True):
        write_label_csv(out / name, [novel[j] for j in draw_classes(len(novel), per_split, seed)])
        splits.append({"list": "val.txt", "labels": "labels.csv", "classes": str((out / name).resolve())})
    protocol = {
        "name": "k600_novel_3splits",
        "videos": "videos",
        "splits": splits,
        "templates": "ensemble_28",
        "frames": 32,
        "size": 224,
        "clips": 3,
        "crops": 1,
        "average": "logits",
        "dataset": "k600",
    }
    header = (
        f"# Kinetics-600 novel classes: {len(novel)} classes of {Path(k600_labels).name} absent from "
        f"{Path(k400_labels).name}\n# (names compared lower-cased, '_' as space); {len(seeds)} splits of "
        f"{per_split}, drawn with np.random.RandomState(seed).permutation({len(novel)})[:{per_split}],\n"
        f"# seeds {list(seeds)}. Data paths are relative to the Kinetics-600 root given to --root.\n"
    )
    path = out / PROTOCOL_FILE
    path.write_text(header + yaml.safe_dump(protocol, sort_keys=False))
    return path
