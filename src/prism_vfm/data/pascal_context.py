"""PASCAL-Context multi-task labels read from the standard ATRC / InvPT release layout (SPEC §8).

The first half of the file holds what both Stage-2 readers share (``DenseReleaseDataset`` and the
file helpers that turn a missing or malformed release file into an error naming it); ``nyud.py`` builds on
them. Samples are dicts of tensors before any transform:

* ``image``: ``(3, H, W)`` float32 RGB on the 0..255 scale;
* one entry per task, ``(C, H, W)`` float32 (class maps hold class indices and 255 for ignore);
* ``meta``: ``{"id": str, "size": (H, W)}``, the original image size.

Labels are returned as the release defines them; the ignore regions of SPEC §8 (zero normals, part maps
without a part pixel, zero depth) are the transforms' last step, because a training crop can create them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import torch
from PIL import Image
from scipy import ndimage
from skimage.morphology import thin
from torch import Tensor
from torch.utils.data import Dataset

from prism_vfm.data.dense_transforms import Sample
from prism_vfm.data.image_folder import load_rgb
from prism_vfm.data.labels import IGNORE_INDEX, label_boundaries
from prism_vfm.data.registry import dataset_tasks, get_dataset

# --- shared by the Stage-2 release readers -----------------------------------------------------------------


def layout_error(path: Path, pattern: str, release: str, reason: str | None = None) -> Exception:
    """The error for a release file: FileNotFoundError when ``reason`` is None (the file is missing),
    else ValueError saying why the file is unusable."""
    expected = f"expected {pattern} in the {release} release layout (SPEC §8)"
    if reason is None:
        return FileNotFoundError(f"{path} is missing; {expected}")
    return ValueError(f"{path} {reason}; {expected}")


def read_split(path: Path, release: str, pattern: str) -> list[str]:
    """The ids of a split file, one per line, blank lines skipped; an error names a missing or empty file."""
    if not path.is_file():
        raise layout_error(path, pattern, release)
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise layout_error(path, pattern, release, "lists no ids")
    return ids


def read_json(path: Path, release: str, pattern: str) -> Any:
    """A JSON file of the release; an error names a missing file or one that is not valid JSON."""
    if not path.is_file():
        raise layout_error(path, pattern, release)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise layout_error(path, pattern, release, f"is not valid JSON ({err})") from err


def read_image(path: Path, release: str, pattern: str) -> Tensor:
    """An image file as a ``(3, H, W)`` float32 RGB tensor on the 0..255 scale."""
    if not path.is_file():
        raise layout_error(path, pattern, release)
    try:
        rgb = np.asarray(load_rgb(path))
    except Exception as err:  # whatever the decoder raises, the message must name the file
        raise layout_error(path, pattern, release, f"cannot be decoded ({err})") from err
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float()


def read_png(path: Path, release: str, pattern: str, channels: int, mode: str | None = None) -> np.ndarray:
    """A label PNG as an ``(H, W)`` (``channels == 1``) or ``(H, W, channels)`` array of its stored values.

    ``mode`` converts the image first (e.g. ``"L"``); otherwise the stored values are kept as they are, so a
    palette PNG yields its indices and a 16-bit PNG its 16-bit values.
    """
    if not path.is_file():
        raise layout_error(path, pattern, release)
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert(mode) if mode else img)
    except Exception as err:  # whatever the decoder raises, the message must name the file
        raise layout_error(path, pattern, release, f"cannot be decoded ({err})") from err
    expected_ndim = 2 if channels == 1 else 3
    if array.ndim != expected_ndim or (channels > 1 and array.shape[2] != channels):
        raise layout_error(path, pattern, release, f"has shape {array.shape}, not a {channels}-channel image")
    return array


def read_mat(path: Path, release: str, pattern: str, variable: str) -> Any:
    """Variable ``variable`` of a MATLAB file, loaded with structs as attribute objects and 1-sized
    dimensions squeezed (``anno.objects[i].parts[j].mask``); an error names the file and the variable."""
    if not path.is_file():
        raise layout_error(path, pattern, release)
    try:
        content = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except Exception as err:  # scipy raises several unrelated types for a broken file
        raise layout_error(path, pattern, release, f"cannot be read as a MATLAB file ({err})") from err
    if variable not in content:
        raise layout_error(path, pattern, release, f"has no variable {variable!r}")
    return content[variable]


def check_values(path: Path, values: np.ndarray, valid: np.ndarray, expected: str) -> None:
    """Raise ValueError naming ``path`` and the first value where ``valid`` is False."""
    if not valid.all():
        bad = values[~valid].flat[0]
        raise ValueError(f"{path}: label value {bad} is not {expected}")


def check_size(path: Path, array: np.ndarray, size: tuple[int, int]) -> None:
    """Raise ValueError unless the first two dimensions of ``array`` are the image size ``(H, W)``."""
    if tuple(array.shape[:2]) != tuple(size):
        raise ValueError(f"{path}: label size {tuple(array.shape[:2])} differs from the image size {size}")


def check_class_map(path: Path, array: np.ndarray, num_classes: int) -> None:
    """Raise ValueError naming ``path`` and a value that is neither a class in [0, num_classes) nor 255."""
    valid = ((array >= 0) & (array < num_classes)) | (array == IGNORE_INDEX)
    check_values(path, array, valid, f"a class in [0, {num_classes}) or {IGNORE_INDEX} (ignore)")


def label_tensor(array: np.ndarray) -> Tensor:
    """An ``(H, W)`` or ``(H, W, C)`` label array as a ``(C, H, W)`` float32 tensor."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


class DenseReleaseDataset(Dataset):
    """One split of a Stage-2 release: ``self[i]`` is the sample dict of id ``self.ids[i]``, passed
    through ``transform`` when one is given. Subclasses read the image and the labels of one id."""

    release: str = ""
    dataset: str = ""

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        tasks: Sequence[str] | None,
        transform: Callable[[Sample], Any] | None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"{self.release} root {self.root} does not exist or is not a directory (SPEC §8 layout)"
            )
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        known = dataset_tasks(self.dataset)
        self.tasks = tuple(known if tasks is None else tasks)
        unknown = [t for t in self.tasks if t not in known]
        if unknown or not self.tasks:
            raise ValueError(f"tasks {list(self.tasks)} must be a non-empty subset of {list(known)}")
        self.split = split
        self.transform = transform
        self.ids: list[str] = []

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Any:
        sample_id = self.ids[index]
        image = self.read_image(sample_id)
        size = (int(image.shape[1]), int(image.shape[2]))
        sample: Sample = {"image": image}
        for task, label in self.read_labels(sample_id, size).items():
            sample[task] = label_tensor(label)
        sample["meta"] = {"id": sample_id, "size": size}
        return sample if self.transform is None else self.transform(sample)

    def index_of(self, sample_id: str) -> int:
        """The index of ``sample_id`` in this split; KeyError when it is not part of it."""
        try:
            return self.ids.index(sample_id)
        except ValueError:
            raise KeyError(f"{sample_id!r} is not in the {self.release} {self.split} split") from None

    def read_image(self, sample_id: str) -> Tensor:
        """The ``(3, H, W)`` float32 RGB image of ``sample_id`` on the 0..255 scale."""
        raise NotImplementedError

    def read_labels(self, sample_id: str, size: tuple[int, int]) -> dict[str, np.ndarray]:
        """The label arrays of the configured tasks for ``sample_id``, each ``(H, W)`` or ``(H, W, C)``."""
        raise NotImplementedError


# --- PASCAL-Context --------------------------------------------------------------------------------------

PERSON_CATEGORY = 15

HUMAN_PART_CLASSES: dict[str, int] = {
    **dict.fromkeys(("hair", "head", "lear", "rear", "lebrow", "rebrow", "leye", "reye", "mouth", "nose"), 1),
    **dict.fromkeys(("torso", "neck"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("llarm", "rlarm", "lhand", "rhand"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("llleg", "rlleg", "lfoot", "rfoot"), 6),
}
"""PASCAL-Part person part name -> human-parts class (0 is background; SPEC §8)."""

_RELEASE = "PASCALContext"
_PATTERNS = {
    "image": "JPEGImages/<id>.jpg",
    "split": "ImageSets/Context/{train,val}.txt",
    "semseg": "semseg/VOC12/<id>.png or semseg/pascal-context/<id>.png",
    "label_map": "pascal-context/trainval/<id>.mat with variable LabelMap",
    "human_parts": "human_parts/<id>.mat with the PASCAL-Part struct anno",
    "parts_cache": "ImageSets/Parts/{train,val}.txt, JSON {id: [category or -1, ...]}",
    "pascal_part": "json/pascal_part.json, JSON {category: {part name: index}}",
    "nyu_classes": "json/nyu_classes.json, the NYU class names",
    "context_classes": "json/context_classes.json, JSON {class name: LabelMap value}",
    "sal": "sal_distill/<id>.png",
    "normals": "normals_distill/<id>.png, 3 channels",
}

# OpenCV's default 3x3 Laplacian aperture; "mirror" is its default border (reflect-101), so the boundary
# of a class touching the image border is found on the border row as well.
_LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)


EDGE_LABELS = ("released", "evaluation")
"""The edge training labels ``edge_from_label_map`` draws: ``"released"``, the non-zero Laplacian of the
class map, thinned; ``"evaluation"`` (not released), the boundaries the evaluation matches predictions
against (``seg2bmap``: a pixel whose east, south or south-east neighbour has another class, thinned). The
released label marks both sides of a class change and thinning keeps either, so below a pixel of matching
tolerance (small images) a network that learns it perfectly is still scored off by one pixel."""


def edge_from_label_map(label_map: np.ndarray, kind: str = "released") -> np.ndarray:
    """The PASCAL-Context edge training label of ``kind`` (``EDGE_LABELS``); by default the released one:
    pixels where the 3x3 Laplacian of the class map is non-zero, thinned to one pixel
    (``skimage.morphology.thin``). Returns a bool ``(H, W)`` array."""
    if kind == "evaluation":
        return label_boundaries(label_map)
    if kind != "released":
        raise ValueError(f"unknown edge label {kind!r}; expected one of {EDGE_LABELS}")
    response = ndimage.convolve(label_map.astype(np.float64), _LAPLACIAN, mode="mirror")
    return thin(response != 0)


def _struct_list(value: Any) -> list[Any]:
    """A MATLAB struct array loaded with ``squeeze_me`` as a list: one element comes back bare, none empty."""
    if isinstance(value, np.ndarray):
        return list(value.flat)
    return [value]


class PascalContext(DenseReleaseDataset):
    """PASCAL-Context with the tasks ``semseg``, ``human_parts``, ``normals``, ``edge``, ``sal``.

    ``root`` is the ``PASCALContext/`` folder of the ATRC / InvPT release (SPEC §8). Label rules:

    * ``semseg``: ``semseg/VOC12/<id>.png`` when present, else ``semseg/pascal-context/<id>.png``;
      21 classes, 255 ignore.
    * ``human_parts``: ids whose entry in ``ImageSets/Parts/<split>.txt`` lists category 15 are painted from
      ``human_parts/<id>.mat``: every part of every person object, in the annotation's order (a later part
      overwrites an earlier one), with ``HUMAN_PART_CLASSES``; other pixels and other ids are 0.
    * ``normals``: ``2 v / 255 - 1`` of ``normals_distill/<id>.png``, kept on the LabelMap classes named in
      both ``json/nyu_classes.json`` and ``json/context_classes.json`` (except "unknown") and on
      tvmonitor; (0, 0, 0) elsewhere.
    * ``edge``: ``edge_from_label_map`` of the LabelMap, 0/1 (``edge_label``: which of ``EDGE_LABELS``;
      the released one by default).
    * ``sal``: ``sal_distill/<id>.png`` (as grayscale) ``/ 255 > 0.5``, 0/1.
    """

    release = _RELEASE
    dataset = "pascalcontext"

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        tasks: Sequence[str] | None = None,
        transform: Callable[[Sample], Any] | None = None,
        edge_label: str = "released",
    ) -> None:
        super().__init__(root, split, tasks, transform)
        if edge_label not in EDGE_LABELS:
            raise ValueError(f"unknown edge_label {edge_label!r}; expected one of {EDGE_LABELS}")
        self.edge_label = edge_label
        split_file = self.root / "ImageSets" / "Context" / f"{split}.txt"
        self.ids = read_split(split_file, _RELEASE, _PATTERNS["split"])
        self.num_semseg_classes = get_dataset("pascalcontext").tasks["semseg"]
        if "human_parts" in self.tasks:
            self._parts_cache = self._read_parts_cache()
            self._person_parts = self._read_person_parts()
        if "normals" in self.tasks:
            self._normals_classes = self._read_normals_classes()

    def _error(self, path: Path, kind: str, reason: str) -> Exception:
        return layout_error(path, _PATTERNS[kind], _RELEASE, reason)

    def _read_parts_cache(self) -> dict[str, list[int]]:
        path = self.root / "ImageSets" / "Parts" / f"{self.split}.txt"
        cache = read_json(path, _RELEASE, _PATTERNS["parts_cache"])
        if not isinstance(cache, dict):
            raise self._error(path, "parts_cache", "is not a JSON object")
        missing = [i for i in self.ids if i not in cache]
        if missing:
            raise self._error(
                path, "parts_cache", f"has no entry for {len(missing)} ids, e.g. {missing[0]!r}"
            )
        return cache

    def _read_person_parts(self) -> frozenset[str]:
        """The person part names the release declares; each must have a class in ``HUMAN_PART_CLASSES``."""
        path = self.root / "json" / "pascal_part.json"
        table = read_json(path, _RELEASE, _PATTERNS["pascal_part"])
        person = table.get(str(PERSON_CATEGORY)) if isinstance(table, dict) else None
        if not isinstance(person, dict) or not person:
            raise self._error(path, "pascal_part", f"has no part table for category {PERSON_CATEGORY}")
        unmapped = sorted(set(person) - set(HUMAN_PART_CLASSES))
        if unmapped:
            raise self._error(path, "pascal_part", f"names person parts without a class: {unmapped}")
        return frozenset(person)

    def _read_normals_classes(self) -> np.ndarray:
        """The LabelMap values on which the distilled normals are kept."""
        nyu_path = self.root / "json" / "nyu_classes.json"
        nyu = read_json(nyu_path, _RELEASE, _PATTERNS["nyu_classes"])
        context_path = self.root / "json" / "context_classes.json"
        context = read_json(context_path, _RELEASE, _PATTERNS["context_classes"])
        if not isinstance(nyu, (dict, list)):
            raise self._error(nyu_path, "nyu_classes", "is neither a JSON object nor a list")
        if not isinstance(context, dict):
            raise self._error(context_path, "context_classes", "is not a JSON object")
        if "tvmonitor" not in context:
            raise self._error(context_path, "context_classes", "has no 'tvmonitor' entry")
        names = [name for name in nyu if name in context and name != "unknown"]
        # NYU calls it "television" / "monitor", so the shared-name rule alone would drop PASCAL's TVs.
        names.append("tvmonitor")
        return np.array(sorted({int(context[name]) for name in names}), dtype=np.int64)

    def read_image(self, sample_id: str) -> Tensor:
        """The ``(3, H, W)`` float32 RGB image of ``sample_id`` on the 0..255 scale."""
        return read_image(self.root / "JPEGImages" / f"{sample_id}.jpg", _RELEASE, _PATTERNS["image"])

    def read_labels(self, sample_id: str, size: tuple[int, int]) -> dict[str, np.ndarray]:
        """The label arrays of the configured tasks for ``sample_id`` (see the class docstring)."""
        label_map = self.label_map(sample_id) if {"edge", "normals"} & set(self.tasks) else None
        if label_map is not None:
            check_size(self.root / "pascal-context" / "trainval" / f"{sample_id}.mat", label_map, size)
        labels: dict[str, np.ndarray] = {}
        for task in self.tasks:
            if task == "semseg":
                labels[task] = self._semseg(sample_id, size)
            elif task == "human_parts":
                labels[task] = self._human_parts(sample_id, size)
            elif task == "normals":
                assert label_map is not None  # read above whenever normals or edge are a task
                labels[task] = self._normals(sample_id, size, label_map)
            elif task == "edge":
                assert label_map is not None
                labels[task] = edge_from_label_map(label_map, self.edge_label).astype(np.float32)
            elif task == "sal":
                labels[task] = self._saliency(sample_id, size)
        return labels

    def label_map(self, sample_id: str) -> np.ndarray:
        """The full PASCAL-Context class map (``LabelMap``) of ``sample_id``, an integer ``(H, W)`` array;
        also the source of the boundary ground truth for evaluation."""
        path = self.root / "pascal-context" / "trainval" / f"{sample_id}.mat"
        label_map = np.asarray(read_mat(path, _RELEASE, _PATTERNS["label_map"], "LabelMap"))
        if label_map.ndim != 2 or not np.issubdtype(label_map.dtype, np.number):
            raise self._error(
                path, "label_map", f"holds a {label_map.dtype} array of shape {label_map.shape}"
            )
        # Some copies store the map as double rather than an integer type; the values are what matters.
        check_values(
            path, label_map, (label_map >= 0) & (label_map == np.round(label_map)), "a class id >= 0"
        )
        return label_map.astype(np.int64)

    def _semseg(self, sample_id: str, size: tuple[int, int]) -> np.ndarray:
        path = self.root / "semseg" / "VOC12" / f"{sample_id}.png"
        if not path.is_file():
            path = self.root / "semseg" / "pascal-context" / f"{sample_id}.png"
        semseg = read_png(path, _RELEASE, _PATTERNS["semseg"], channels=1)
        check_size(path, semseg, size)
        check_class_map(path, semseg, self.num_semseg_classes)
        return semseg

    def _human_parts(self, sample_id: str, size: tuple[int, int]) -> np.ndarray:
        parts_map = np.zeros(size, dtype=np.uint8)
        if PERSON_CATEGORY not in self._parts_cache[sample_id]:
            return parts_map
        path = self.root / "human_parts" / f"{sample_id}.mat"
        anno = read_mat(path, _RELEASE, _PATTERNS["human_parts"], "anno")
        try:
            persons = [o for o in _struct_list(anno.objects) if int(o.class_ind) == PERSON_CATEGORY]
            parts = [(str(p.part_name), np.asarray(p.mask)) for o in persons for p in _struct_list(o.parts)]
        except (AttributeError, TypeError, ValueError) as err:
            raise self._error(path, "human_parts", f"does not hold anno.objects(i).parts(j) ({err})") from err
        for name, mask in parts:
            if name not in self._person_parts:
                raise self._error(
                    path, "human_parts", f"names a person part {name!r} unknown to pascal_part.json"
                )
            check_size(path, mask, size)
            parts_map[mask > 0] = HUMAN_PART_CLASSES[name]
        return parts_map

    def _normals(self, sample_id: str, size: tuple[int, int], label_map: np.ndarray) -> np.ndarray:
        path = self.root / "normals_distill" / f"{sample_id}.png"
        stored = read_png(path, _RELEASE, _PATTERNS["normals"], channels=3)
        check_size(path, stored, size)
        check_values(path, stored, stored <= 255, "an 8-bit value in [0, 255]")
        normals = 2.0 * stored.astype(np.float32) / 255.0 - 1.0
        normals[~np.isin(label_map, self._normals_classes)] = 0.0
        return normals

    def _saliency(self, sample_id: str, size: tuple[int, int]) -> np.ndarray:
        path = self.root / "sal_distill" / f"{sample_id}.png"
        stored = read_png(path, _RELEASE, _PATTERNS["sal"], channels=1, mode="L")
        check_size(path, stored, size)
        return (stored.astype(np.float32) / 255.0 > 0.5).astype(np.float32)
