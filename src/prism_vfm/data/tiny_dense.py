"""Tiny Stage-2 data sets written in exactly the PASCAL-Context and NYUD-v2 release layouts (SPEC §8).

The scenes are simple and self-consistent: a sky / wall / floor background, a few rectangles and
ellipses with classes, a person built from PASCAL-Part parts on two images in three (a cat on the third),
normals and depth that follow the surfaces. Everything is a function of the seed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image
from scipy import ndimage

from prism_vfm.data.pascal_context import HUMAN_PART_CLASSES

# A subset of each release's class table, enough for the synthetic scenes: sky, cat and "unknown" have no
# valid normals (sky and cat are no NYU classes, "unknown" is excluded), tvmonitor has them by exception.
CONTEXT_CLASSES = {
    "cat": 65,
    "chair": 72,
    "floor": 158,
    "person": 284,
    "sky": 360,
    "tvmonitor": 427,
    "unknown": 431,
    "wall": 440,
}
NYU_CLASSES = {"chair": 5, "floor": 11, "person": 331, "television": 172, "unknown": 20, "wall": 21}

# VOC category (PASCAL-Part class_ind and semseg class) of the objects the scenes hold.
_VOC = {"cat": 8, "chair": 9, "person": 15, "tvmonitor": 20}

_COLOURS = {
    "sky": (120, 170, 235),
    "wall": (200, 190, 170),
    "floor": (120, 90, 60),
    "unknown": (90, 90, 90),
    "tvmonitor": (30, 30, 40),
    "chair": (160, 60, 40),
    "person": (230, 180, 150),
    "cat": (250, 140, 30),
}

_PART_STRUCT = [("part_name", "O"), ("mask", "O")]
_OBJECT_STRUCT = [("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]


@dataclass(frozen=True)
class TinyDenseSet:
    """What a tiny writer produced: the release root, the ids per split and, for PASCAL-Context, the ids
    whose image holds a person with parts and those that also have a ``semseg/VOC12`` label."""

    root: Path
    splits: dict[str, list[str]]
    person_ids: frozenset[str] = field(default_factory=frozenset)
    voc12_ids: frozenset[str] = field(default_factory=frozenset)


def _box(size: tuple[int, int], top: float, bottom: float, left: float, right: float) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    mask[max(0, round(top)) : max(0, round(bottom)), max(0, round(left)) : max(0, round(right))] = True
    return mask


def _ellipse(size: tuple[int, int], cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.mgrid[: size[0], : size[1]]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def _dome_normals(mask: np.ndarray) -> np.ndarray:
    """Normals of an ellipsoid bulging towards the camera over the bounding box of ``mask``."""
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    ry, rx = max((ys.max() - ys.min()) / 2, 1.0), max((xs.max() - xs.min()) / 2, 1.0)
    y, x = np.mgrid[: mask.shape[0], : mask.shape[1]]
    dx, dy = np.clip((x - cx) / (rx + 1), -0.9, 0.9), np.clip((y - cy) / (ry + 1), -0.9, 0.9)
    n = np.stack([dx, dy, np.ones_like(dx)], axis=-1)
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def _encode_normals(normals: np.ndarray) -> np.ndarray:
    return np.clip(np.rint((normals + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _person_parts(size: tuple[int, int], rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """A standing figure in the left third: (part name, mask) in annotation order. ``hair`` follows
    ``head`` and overlaps it, as in PASCAL-Part."""
    height, width = size
    u = 0.75 * height / 16  # the figure is 16 units tall
    top = height - 16 * u - 1
    cx = width * rng.uniform(0.18, 0.3)
    parts = [
        ("head", _ellipse(size, top + 1.5 * u, cx, 1.5 * u, 1.3 * u)),
        (
            "hair",
            _ellipse(size, top + 1.5 * u, cx, 1.5 * u, 1.3 * u) & _box(size, 0, top + 1.0 * u, 0, width),
        ),
        ("neck", _box(size, top + 3 * u, top + 3.5 * u, cx - 0.5 * u, cx + 0.5 * u)),
        ("torso", _box(size, top + 3.5 * u, top + 8.5 * u, cx - 2 * u, cx + 2 * u)),
    ]
    for side, sign in (("l", -1), ("r", 1)):
        arm = (cx + 2 * u, cx + 3 * u) if sign > 0 else (cx - 3 * u, cx - 2 * u)
        leg = (cx, cx + 2 * u) if sign > 0 else (cx - 2 * u, cx)
        parts += [
            (f"{side}uarm", _box(size, top + 3.5 * u, top + 6 * u, *arm)),
            (f"{side}larm", _box(size, top + 6 * u, top + 8 * u, *arm)),
            (f"{side}hand", _box(size, top + 8 * u, top + 9 * u, *arm)),
            (f"{side}uleg", _box(size, top + 8.5 * u, top + 12.5 * u, *leg)),
            (f"{side}lleg", _box(size, top + 12.5 * u, top + 15 * u, *leg)),
            (f"{side}foot", _box(size, top + 15 * u, top + 16 * u, *leg)),
        ]
    return parts


def _struct_array(rows: list[tuple], dtype: list[tuple[str, str]]) -> np.ndarray:
    """A 1xN MATLAB struct array for ``scipy.io.savemat``."""
    array = np.zeros((1, len(rows)), dtype=dtype)
    for i, row in enumerate(rows):
        array[0, i] = row
    return array


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _write_mat(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, content)


@dataclass(frozen=True)
class PascalObject:
    """One object of a PASCAL-Part ``anno``: class name, VOC category, mask and its (part name, mask)
    parts in annotation order (empty for categories PASCAL-Part gives no parts)."""

    name: str
    category: int
    mask: np.ndarray
    parts: list[tuple[str, np.ndarray]] = field(default_factory=list)


def parts_cache_entry(objects: list[PascalObject]) -> list[int]:
    """An id's ``ImageSets/Parts`` entry: each object's category when it has parts, else -1."""
    return [o.category if o.parts else -1 for o in objects]


def write_pascal_record(
    root: Path,
    sample_id: str,
    image: np.ndarray,
    label_map: np.ndarray,
    semseg: np.ndarray,
    objects: list[PascalObject],
    saliency: np.ndarray,
    normals: np.ndarray,
    voc12: np.ndarray | None = None,
) -> None:
    """Write every per-id file of the PASCAL-Context release layout: the JPEG ``image`` (H, W, 3) uint8,
    ``LabelMap``, the 21-class ``semseg`` (and ``voc12`` when given), the PASCAL-Part ``anno``, the saliency
    PNG (uint8, > 127 is foreground) and the unit ``normals`` (H, W, 3) encoded as ``(n + 1) · 127.5``."""
    rows = [
        (
            o.name,
            float(o.category),
            o.mask.astype(np.uint8),
            _struct_array([(n, m.astype(np.uint8)) for n, m in o.parts], _PART_STRUCT),
        )
        for o in objects
    ]
    anno = _struct_array(
        [(sample_id, _struct_array(rows, _OBJECT_STRUCT))], [("imname", "O"), ("objects", "O")]
    )
    _write_mat(root / "human_parts" / f"{sample_id}.mat", {"anno": anno})
    _write_mat(root / "pascal-context" / "trainval" / f"{sample_id}.mat", {"LabelMap": label_map})
    _write_png(root / "semseg" / "pascal-context" / f"{sample_id}.png", semseg.astype(np.uint8))
    if voc12 is not None:
        _write_png(root / "semseg" / "VOC12" / f"{sample_id}.png", voc12.astype(np.uint8))
    _write_png(root / "sal_distill" / f"{sample_id}.png", saliency.astype(np.uint8))
    _write_png(root / "normals_distill" / f"{sample_id}.png", _encode_normals(normals))
    image_path = root / "JPEGImages" / f"{sample_id}.jpg"
    image_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(image_path, format="JPEG", quality=95)


def write_pascal_index(
    root: Path,
    caches: dict[str, dict[str, list[int]]],
    part_table: dict[str, dict[str, int]],
    context_classes: dict[str, int],
    nyu_classes: dict[str, int],
) -> None:
    """Write the split lists and parts caches (``caches[split][id]``) and the three ``json/`` tables."""
    for split, cache in caches.items():
        _write_text(root / "ImageSets" / "Context" / f"{split}.txt", "".join(f"{i}\n" for i in cache))
        _write_text(root / "ImageSets" / "Parts" / f"{split}.txt", json.dumps(cache))
    _write_text(root / "json" / "pascal_part.json", json.dumps(part_table))
    _write_text(root / "json" / "context_classes.json", json.dumps(context_classes))
    _write_text(root / "json" / "nyu_classes.json", json.dumps(nyu_classes))


def write_nyud_record(
    root: Path,
    sample_id: str,
    image: np.ndarray,
    segmentation: np.ndarray,
    normals: np.ndarray,
    depth: np.ndarray,
) -> None:
    """Write every per-id file of the NYUD-v2 release layout: the PNG ``image``, ``segmentation`` (NYU-40
    class + 1, 0 unlabelled), encoded ``normals``, ``depth`` in metres (0 = no reading), and the boundaries
    of the segmentation as the ``edge`` PNG and the ``edge_mat`` evaluation file."""
    edges = boundaries(segmentation)
    _write_png(root / "images" / f"{sample_id}.png", image)
    _write_png(root / "segmentation" / f"{sample_id}.png", segmentation.astype(np.uint8))
    _write_png(root / "normals" / f"{sample_id}.png", _encode_normals(normals))
    _write_png(root / "edge" / f"{sample_id}.png", (edges * 255).astype(np.uint8))
    (root / "depth").mkdir(parents=True, exist_ok=True)
    np.save(root / "depth" / f"{sample_id}.npy", depth.astype(np.float32))
    ground_truth = np.empty((1, 1), dtype=object)  # a 1x1 cell holding the BSDS-style struct
    ground_truth[0, 0] = {"Segmentation": segmentation.astype(np.uint16), "Boundaries": edges}
    _write_mat(root / "edge_mat" / f"{sample_id}.mat", {"groundTruth": ground_truth})


def write_nyud_index(root: Path, splits: dict[str, list[str]]) -> None:
    """Write the ``gt_sets/{split}.txt`` id lists."""
    for split, ids in splits.items():
        _write_text(root / "gt_sets" / f"{split}.txt", "".join(f"{i}\n" for i in ids))


def _photo(
    classes: np.ndarray, colours: dict[int, tuple[int, int, int]], rng: np.random.Generator
) -> np.ndarray:
    """An RGB picture with one colour per class plus noise."""
    image = np.zeros((*classes.shape, 3), dtype=np.float64)
    for value, colour in colours.items():
        image[classes == value] = colour
    image += rng.normal(0.0, 6.0, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _write_pascal_sample(
    root: Path, sample_id: str, index: int, size: tuple[int, int], rng: np.random.Generator
) -> list[int]:
    """Write every file of one PASCAL-Context id; returns its parts-cache entry."""
    height, width = size
    ctx = CONTEXT_CLASSES
    label_map = np.full(size, ctx["wall"], dtype=np.uint16)
    label_map[: height // 3] = ctx["sky"]
    label_map[2 * height // 3 :] = ctx["floor"]
    label_map[_box(size, height / 3, height / 3 + 3, width * 0.85, width * 0.95)] = ctx["unknown"]
    tv_left = width * rng.uniform(0.5, 0.6)
    label_map[_box(size, height * 0.4, height * 0.6, tv_left, tv_left + width * 0.2)] = ctx["tvmonitor"]
    label_map[_box(size, height * 0.7, height * 0.95, width * 0.72, width * 0.9)] = ctx["chair"]
    normals = np.zeros((*size, 3))
    normals[..., 2] = 1.0  # walls, sky and screens face the camera
    normals[label_map == ctx["floor"]] = (0.0, -0.8, 0.6)
    normals[label_map == ctx["chair"]] = (0.6, 0.0, 0.8)

    with_person = index % 3 != 2
    if with_person:
        parts = _person_parts(size, rng)
        subject = np.logical_or.reduce([mask for _, mask in parts])
        subject_name = "person"
    else:
        subject = _ellipse(size, height * 0.72, width * rng.uniform(0.2, 0.3), height * 0.15, width * 0.12)
        parts = [("head", subject & _box(size, 0, height * 0.65, 0, width)), ("torso", subject)]
        subject_name = "cat"
    label_map[subject] = ctx[subject_name]
    normals[subject] = _dome_normals(subject)[subject]

    masks = {name: label_map == ctx[name] for name in ("tvmonitor", "chair", subject_name)}
    objects = [
        PascalObject("tvmonitor", _VOC["tvmonitor"], masks["tvmonitor"], [("screen", masks["tvmonitor"])]),
        PascalObject("chair", _VOC["chair"], masks["chair"]),  # PASCAL-Part has no parts for chairs
        PascalObject(subject_name, _VOC[subject_name], masks[subject_name], parts),
    ]
    semseg = np.zeros(size, dtype=np.uint8)
    for name, mask in masks.items():
        semseg[mask] = _VOC[name]
    voc12 = None
    if index % 2 == 0:
        # VOC12 labels mark a band around each object as void; the reader must prefer them.
        objects_mask = semseg > 0
        band = ndimage.binary_dilation(objects_mask) & ~objects_mask
        voc12 = np.where(band, 255, semseg).astype(np.uint8)

    saliency = np.zeros(size, dtype=np.uint8)
    saliency[ndimage.binary_dilation(subject)] = 100  # a soft rim that binarises to background
    saliency[subject] = 255
    saliency[masks["tvmonitor"]] = 200
    colours = {ctx[name]: colour for name, colour in _COLOURS.items()}
    image = _photo(label_map, colours, rng)
    write_pascal_record(root, sample_id, image, label_map, semseg, objects, saliency, normals, voc12)
    return parts_cache_entry(objects)


def write_tiny_pascal(
    root: str | os.PathLike[str],
    n_train: int = 4,
    n_val: int = 3,
    size: tuple[int, int] = (48, 64),
    seed: int = 0,
) -> TinyDenseSet:
    """Write a PASCAL-Context release folder ``root`` (``JPEGImages``, ``ImageSets/{Context,Parts}``,
    ``semseg/{VOC12,pascal-context}``, ``pascal-context/trainval``, ``human_parts``, ``sal_distill``,
    ``normals_distill``, ``json``) with ``n_train`` + ``n_val`` images of ``size`` ``(H, W)``.

    Image i (counted over train then val) shows a person with parts unless ``i % 3 == 2`` (a cat instead);
    even i also get a ``semseg/VOC12`` label, with a 255 band around the objects.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    splits = {
        "train": [f"2008_{i:06d}" for i in range(n_train)],
        "val": [f"2008_{i:06d}" for i in range(n_train, n_train + n_val)],
    }
    person_ids, voc12_ids = set(), set()
    caches: dict[str, dict[str, list[int]]] = {}
    index = 0
    for split, ids in splits.items():
        caches[split] = {}
        for sample_id in ids:
            caches[split][sample_id] = _write_pascal_sample(root, sample_id, index, size, rng)
            if index % 3 != 2:
                person_ids.add(sample_id)
            if index % 2 == 0:
                voc12_ids.add(sample_id)
            index += 1
    part_table = {
        str(_VOC["cat"]): {"head": 1, "torso": 7},
        str(_VOC["person"]): {name: i + 1 for i, name in enumerate(HUMAN_PART_CLASSES)},
        str(_VOC["tvmonitor"]): {"screen": 1},
    }
    write_pascal_index(root, caches, part_table, CONTEXT_CLASSES, NYU_CLASSES)
    return TinyDenseSet(root, splits, frozenset(person_ids), frozenset(voc12_ids))


# NYU-40 classes of the synthetic rooms (stored PNG value = class + 1; 0 = unlabelled).
_NYU40 = {"wall": 1, "floor": 2, "table": 7, "otherprop": 40}
_NYU_COLOURS = {0: (0, 0, 0), 1: (200, 200, 190), 2: (110, 80, 50), 7: (150, 100, 60), 40: (40, 120, 200)}


def boundaries(segmentation: np.ndarray) -> np.ndarray:
    """Pixels whose label differs from their east or south neighbour."""
    edge = np.zeros(segmentation.shape, dtype=bool)
    edge[:, :-1] |= segmentation[:, :-1] != segmentation[:, 1:]
    edge[:-1, :] |= segmentation[:-1, :] != segmentation[1:, :]
    return edge


def _write_nyud_sample(root: Path, sample_id: str, size: tuple[int, int], rng: np.random.Generator) -> None:
    height, width = size
    horizon = int(height * rng.uniform(0.45, 0.6))
    segmentation = np.full(size, _NYU40["wall"], dtype=np.uint8)
    segmentation[horizon:] = _NYU40["floor"]
    rows = np.arange(height, dtype=np.float32)[:, None]
    # A floor plane seen from above: nearer towards the bottom of the image, meeting the wall at 3 m.
    depth = np.where(rows < horizon, 3.0, 3.0 - 2.0 * (rows - horizon) / max(height - horizon, 1))
    depth = np.broadcast_to(depth, size).astype(np.float32).copy()
    normals = np.zeros((*size, 3))
    normals[..., 2] = 1.0
    normals[horizon:] = (0.0, -1.0, 0.0)

    left = width * rng.uniform(0.3, 0.5)
    table = _box(size, horizon - height * 0.1, horizon + height * 0.2, left, left + width * 0.35)
    segmentation[table] = _NYU40["table"]
    depth[table] = 1.8
    normals[table] = (0.0, -0.6, 0.8)
    box = _box(size, horizon - height * 0.2, horizon - height * 0.1, left + 2, left + width * 0.15)
    segmentation[box] = _NYU40["otherprop"]
    depth[box] = 1.7
    normals[box] = (0.6, 0.0, 0.8)
    segmentation[_box(size, 0, height * 0.1, 0, width * 0.15)] = 0  # unlabelled corner
    hole_top, hole_left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    depth[hole_top : hole_top + 3, hole_left : hole_left + 4] = 0.0  # no sensor reading

    write_nyud_record(root, sample_id, _photo(segmentation, _NYU_COLOURS, rng), segmentation, normals, depth)


def write_tiny_nyud(
    root: str | os.PathLike[str],
    n_train: int = 4,
    n_val: int = 3,
    size: tuple[int, int] = (48, 64),
    seed: int = 0,
) -> TinyDenseSet:
    """Write an NYUD-v2 release folder ``root`` (``images``, ``gt_sets``, ``segmentation``, ``normals``,
    ``edge``, ``depth``, ``edge_mat``) with ``n_train`` + ``n_val`` rooms of ``size`` ``(H, W)``: wall,
    floor, a table with a box on it, an unlabelled corner and a patch without depth."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    splits = {
        "train": [f"{i:04d}" for i in range(n_train)],
        "val": [f"{i:04d}" for i in range(n_train, n_train + n_val)],
    }
    for sample_id in splits["train"] + splits["val"]:
        _write_nyud_sample(root, sample_id, size, rng)
    write_nyud_index(root, splits)
    return TinyDenseSet(root, splits)
