"""Procedural scenes (``scenes.py``) written as data sets: the PASCAL-Context and NYUD-v2 release layouts of
SPEC §8, read by the ordinary readers, and an unlabelled image folder for Stage 1.

Each writer draws its own stream of scenes, so the three sets never share an image; all are deterministic
per seed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from prism_vfm.data.pascal_context import PERSON_CATEGORY
from prism_vfm.data.scenes import CLASS_INDEX, FIGURE_PARTS, SCENE_CLASSES, Scene, render_scene
from prism_vfm.data.tiny_dense import (
    PascalObject,
    TinyDenseSet,
    parts_cache_entry,
    write_nyud_index,
    write_nyud_record,
    write_pascal_index,
    write_pascal_record,
)

STREAMS = {"images": 0, "pascalcontext": 1, "nyud": 2}
"""The scene stream of each written set."""

_VOC = np.array([c.voc for c in SCENE_CLASSES])
_CONTEXT = np.array([c.context for c in SCENE_CLASSES])
_NYU = np.array([c.nyu for c in SCENE_CLASSES])


def _check(n_train: int, n_val: int, size: tuple[int, int]) -> None:
    if n_train < 1 or n_val < 1:
        raise ValueError(f"a scene set needs at least one train and one val image, got {n_train} and {n_val}")
    if len(size) != 2 or min(size) < 8:
        raise ValueError(f"scene size must be (H, W) with both sides >= 8, got {size}")


def pascal_objects(scene: Scene) -> list[PascalObject]:
    """The PASCAL-Part objects of a scene: every visible object with its VOC category; the figure as a
    person with its visible parts."""
    objects = []
    for instance in np.unique(scene.instance[scene.instance > 0]):
        mask = scene.instance == instance
        label = int(np.bincount(scene.labels[mask]).argmax())
        parts = []
        if label == CLASS_INDEX["person"]:
            parts = [
                (n, scene.parts == k + 1) for k, n in enumerate(FIGURE_PARTS) if (scene.parts == k + 1).any()
            ]
        objects.append(PascalObject(SCENE_CLASSES[label].name, int(_VOC[label]), mask, parts))
    return objects


def write_scene_pascal(
    root: str | os.PathLike[str],
    n_train: int = 64,
    n_val: int = 16,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    zoom: float = 1.0,
) -> TinyDenseSet:
    """Write a PASCAL-Context release folder of rendered scenes (all five tasks: semseg, human parts from
    the figure, normals, boundaries of the ``LabelMap``, saliency = objects and figure).
    ``zoom`` frames the scenes (:func:`render_scene`)."""
    _check(n_train, n_val, size)
    root = Path(root)
    splits = {
        "train": [f"2008_{i:06d}" for i in range(n_train)],
        "val": [f"2008_{i:06d}" for i in range(n_train, n_train + n_val)],
    }
    caches: dict[str, dict[str, list[int]]] = {}
    person_ids = set()
    index = 0
    for split, ids in splits.items():
        caches[split] = {}
        for sample_id in ids:
            scene = render_scene(seed, index, size, STREAMS["pascalcontext"], zoom)
            objects = pascal_objects(scene)
            write_pascal_record(
                root,
                sample_id,
                scene.image,
                _CONTEXT[scene.labels].astype(np.uint16),
                _VOC[scene.labels].astype(np.uint8),
                objects,
                (scene.foreground * 255).astype(np.uint8),
                scene.normals,
            )
            caches[split][sample_id] = parts_cache_entry(objects)
            if PERSON_CATEGORY in caches[split][sample_id]:
                person_ids.add(sample_id)
            index += 1
    part_table = {str(PERSON_CATEGORY): {name: k + 1 for k, name in enumerate(FIGURE_PARTS)}}
    context = {c.name: c.context for c in SCENE_CLASSES}
    # Distilled normals are kept on classes that NYU names too (tvmonitor by the readers' own exception).
    nyu = {c.name: c.nyu for c in SCENE_CLASSES if c.name != "tvmonitor"}
    write_pascal_index(root, caches, part_table, context, nyu)
    return TinyDenseSet(root, splits, frozenset(person_ids))


def write_scene_nyud(
    root: str | os.PathLike[str],
    n_train: int = 64,
    n_val: int = 16,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    zoom: float = 1.0,
) -> TinyDenseSet:
    """Write an NYUD-v2 release folder of rendered scenes (semseg in NYU-40 classes, normals, boundaries of
    the segmentation, depth in metres; every pixel valid).
    ``zoom`` frames the scenes (:func:`render_scene`)."""
    _check(n_train, n_val, size)
    root = Path(root)
    splits = {
        "train": [f"{i:04d}" for i in range(n_train)],
        "val": [f"{i:04d}" for i in range(n_train, n_train + n_val)],
    }
    for index, sample_id in enumerate(splits["train"] + splits["val"]):
        scene = render_scene(seed, index, size, STREAMS["nyud"], zoom)
        segmentation = _NYU[scene.labels].astype(np.uint8)
        write_nyud_record(root, sample_id, scene.image, segmentation, scene.normals, scene.depth)
    write_nyud_index(root, splits)
    return TinyDenseSet(root, splits)


def write_scene_images(
    root: str | os.PathLike[str],
    n: int = 512,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    progress: bool = False,
    zoom: float = 1.0,
) -> Path:
    """Write ``n`` unlabelled scene photos ``<root>/<index>.png`` (a flat Stage-1 image folder); returns
    ``root``. ``progress`` shows a progress bar; ``zoom`` frames the scenes (:func:`render_scene`)."""
    if n < 1:
        raise ValueError(f"an image folder needs at least one image, got n={n}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for index in tqdm(range(n), desc="render images", unit="img", disable=not progress, leave=False):
        scene = render_scene(seed, index, size, STREAMS["images"], zoom)
        Image.fromarray(scene.image).save(root / f"{index:06d}.png")
    return root
