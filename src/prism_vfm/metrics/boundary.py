"""Boundary detection scores (odsF, OIS, AP) by the SEISM protocol of SPEC §9, in Python.

The authors score edges in MATLAB: an NMS pass writes every prediction back as an 8-bit PNG, then SEISM
binarises it at 99 thresholds, thins it to one pixel and matches it to the ground-truth boundaries with the
BSDS correspondence (CSA) matcher, whose tolerance is a fraction of the image diagonal. Here pyEdgeEval
supplies the two compiled pieces, Dollár's edge NMS and the BSDS matcher ``correspondPixels``;
scikit-image supplies the thinning, identical to MATLAB's ``bwmorph(b, 'thin', Inf)``. pyEdgeEval's Python
pre-processing is not used: its package imports OpenCV, which nothing else here needs, and its
``binary_thin`` stops as soon as one sub-iteration changes nothing, leaving some maps thicker than MATLAB's.

Three matchers (``MATCHERS``) give the counts. ``"bsds"`` runs pyEdgeEval's ``correspondPixels`` at every
threshold, as SEISM does: the reference. ``"fast"``, the default, gives the same counts in 3-5 % of its
CPU time: it thins the maps of all thresholds together and computes, per threshold, what the BSDS
assignment keeps — the most pixel pairs within the tolerance that the matcher's random outlier graph,
drawn here by the same generator calls from the same seed, can complete to a perfect matching
(``boundary_assignment``); on 200 realistic maps its counts equal the reference's on every (image,
threshold) pair compared (benchmarks/README.md). ``"maximum"`` counts a maximum bipartite matching
instead (``boundary_matching``): what any assignment without the random graph's shortfalls would keep,
one to a few pixels per image above the BSDS counts (about +0.1 point of odsF / OIS / AP).

Counts, per image and threshold (``COUNT_FIELDS``): ground-truth boundary pixels matched and in total,
predicted boundary pixels matched and in total. Recall and precision pool them over all images; empty sets
follow SEISM (no ground truth: recall 1, precision 0; no prediction: recall 0, precision 1). The BSDS
matcher costs 35-60 CPU-seconds per 512 x 512 image, the fast one 1-2 (after its kernels' one-time
compilation, cached on disk); all spread the images over a process pool.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from skimage.morphology import thin
from torch import Tensor
from tqdm import tqdm

from prism_vfm.data.labels import label_boundaries
from prism_vfm.data.labels import seg2bmap as seg2bmap  # still offered here
from prism_vfm.data.registry import get_dataset
from prism_vfm.errors import MissingExtraError
from prism_vfm.metrics.boundary_matching import (
    assignment_module,
    bsds_assignment_counts,
    maximum_matching_counts,
    thin_stack,
)

THRESHOLDS: np.ndarray = np.arange(1, 100) / 100.0
"""The 99 binarisation thresholds 0.01 ... 0.99, each the double nearest to k / 100 as MATLAB parses it."""

COUNT_FIELDS = ("matched_gt", "total_gt", "matched_pred", "total_pred")
"""The rows of a counts array ``(..., 4, len(THRESHOLDS))``."""

MATCHERS = ("fast", "maximum", "bsds")
"""Boundary matchers: the BSDS assignment computed fast (the default), maximum bipartite matching, and the
BSDS correspondence matcher itself (the reference)."""

DEFAULT_MATCHER = "fast"

NMS_SMOOTHING_RADIUS = 1
NMS_ORIENTATION_RADIUS = 4

MATCHER_SEED = 1
"""Seed of the BSDS matcher's random outlier connections, set again before every match (``"bsds"``, and
the same draws in ``"fast"``)."""


def pyedgeeval() -> Any:
    """The pyEdgeEval module (the ``eval`` extra); MissingExtraError naming the extra when it is absent."""
    try:
        import pyEdgeEval
    except ImportError as error:
        raise MissingExtraError("the boundary (edge) evaluation", "pyEdgeEval", "eval") from error
    return pyEdgeEval


def _matcher_seeder() -> Callable[[int], None]:
    """A function that reseeds the random generator of pyEdgeEval's matcher with the seed it is given.

    The BSDS matcher joins unmatched pixels through randomly drawn outlier edges, and pyEdgeEval (like
    MATLAB's ``correspondPixels``) seeds that generator from the clock, so one image's matched counts can
    change by a pixel or two from run to run and between processes. pyEdgeEval does not expose the seed;
    the extension exports its C++ generator, which is reseeded here. Where those symbols are missing
    (another compiler's name mangling) the counts keep that jitter, and a warning says so.
    """
    try:
        library = ctypes.CDLL(sys.modules[pyedgeeval().correspond_pixels.__module__].__file__)
        generator = ctypes.addressof(ctypes.c_char.in_dll(library, "_ZN6Random4randE"))
        reseed = library._ZN6Random6reseedEm
    except (OSError, AttributeError, ValueError):
        warnings.warn(
            "cannot seed pyEdgeEval's matcher: boundary counts may vary slightly between runs",
            RuntimeWarning,
            stacklevel=2,
        )
        return lambda seed: None
    reseed.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
    reseed.restype = None
    return lambda seed: reseed(generator, seed)


_seeders: list[Callable[[int], None]] = []


def _reseed_matcher(seed: int | None = None) -> None:
    """Reseed the matcher with ``seed`` (default ``MATCHER_SEED``); the seeder is looked up once per
    process, on first use."""
    if not _seeders:
        _seeders.append(_matcher_seeder())
    _seeders[0](MATCHER_SEED if seed is None else seed)


def _conv_tri(image: np.ndarray, radius: int) -> np.ndarray:
    """Dollár's ``convTri``: a separable triangle filter of the given radius, symmetric borders."""
    ramp = np.arange(1, radius + 2, dtype=image.dtype)
    kernel = np.concatenate([ramp, ramp[-2::-1]]) / (radius + 1) ** 2
    # scipy's "reflect" repeats the edge pixel, which is MATLAB's "symmetric" padding.
    rows = ndimage.correlate1d(image, kernel, axis=0, mode="reflect")
    return ndimage.correlate1d(rows, kernel, axis=1, mode="reflect")


def _edge_orientation(edge: np.ndarray) -> np.ndarray:
    """Boundary normal angle in ``[0, pi)`` from the second derivatives of a triangle-smoothed map."""
    oy, ox = np.gradient(_conv_tri(edge, NMS_ORIENTATION_RADIUS))
    oxx = np.gradient(ox, axis=1)
    oyy, oxy = np.gradient(oy)
    return np.mod(np.arctan(oyy * np.sign(-oxy) / (oxx + 1e-5)), np.pi)


def edge_nms(edge: np.ndarray, radius: int = 4, border: int = 5, multiplier: float = 1.01) -> np.ndarray:
    """Non-maximum suppression of an 8-bit edge map ``(H, W)``, returned as 8-bit again.

    The map is scaled to ``[0, 1]`` and smoothed with a radius-1 triangle filter; a pixel survives when,
    times ``multiplier``, it is at least every value interpolated up to ``radius`` pixels away along its
    normal; values fade linearly to 0 over the ``border`` pixels next to the image border. Like MATLAB
    (``single``), everything before the compiled NMS is float32. The result is rounded to 8 bits because
    the MATLAB pipeline stores it as a PNG before thresholding.
    """
    if edge.dtype != np.uint8 or edge.ndim != 2:
        raise ValueError(f"edge_nms needs a 2-D uint8 map, got {edge.dtype} of shape {edge.shape}")
    smoothed = _conv_tri(edge.astype(np.float32) / 255, NMS_SMOOTHING_RADIUS)
    suppressed = pyedgeeval().nms(smoothed, _edge_orientation(smoothed), r=radius, s=border, m=multiplier)
    # MATLAB's uint8() rounds half away from zero (np.round would round half to even).
    return np.clip(np.floor(suppressed * 255 + 0.5), 0, 255).astype(np.uint8)


def boundary_ground_truth(ground_truth: np.ndarray) -> np.ndarray:
    """The boundaries to match against, thinned to one pixel, as a bool ``(H, W)`` map.

    A bool array is taken as a boundary map already (NYUD's ``groundTruth{1}.Boundaries``); any other
    dtype is a label map (PASCAL-Context's ``LabelMap``) and goes through ``seg2bmap`` first. Thinning is
    idempotent, so a map that went through here once can be passed again.
    """
    if ground_truth.ndim != 2:
        raise ValueError(f"ground truth must be 2-D, got shape {ground_truth.shape}")
    return thin(ground_truth) if ground_truth.dtype == bool else label_boundaries(ground_truth)


def image_counts(
    edge: np.ndarray, ground_truth: np.ndarray, max_dist_ratio: float, matcher: str = DEFAULT_MATCHER
) -> np.ndarray:
    """Match counts of one image at every threshold, int64 ``(4, len(THRESHOLDS))`` (``COUNT_FIELDS``).

    ``edge`` is the 8-bit prediction before NMS, ``ground_truth`` a label or boundary map of the same size
    (see ``boundary_ground_truth``); pixels match within ``max_dist_ratio`` x the image diagonal, by
    ``matcher`` (``MATCHERS``).
    """
    check_matcher(matcher)
    if edge.shape != ground_truth.shape:
        raise ValueError(f"prediction {edge.shape} and ground truth {ground_truth.shape} differ in size")
    gt = boundary_ground_truth(ground_truth)
    levels = edge_nms(edge)
    if matcher != "bsds":
        return _fast_counts(levels, gt, max_dist_ratio, matcher)
    levels = levels.astype(np.float64) / 255
    counts = np.zeros((len(COUNT_FIELDS), len(THRESHOLDS)), dtype=np.int64)
    total_gt = int(gt.sum())
    previous_total = -1
    for k, threshold in enumerate(THRESHOLDS):
        above = levels >= threshold
        total = int(above.sum())
        # The binarised maps are nested, so an equal pixel count means the same map as the last one.
        if total == previous_total:
            counts[:, k] = counts[:, k - 1]
            continue
        previous_total = total
        pred = thin(above)
        _reseed_matcher()
        matched_pred, matched_gt, _, _ = pyedgeeval().correspond_pixels(pred, gt, max_dist=max_dist_ratio)
        counts[:, k] = (matched_gt > 0).sum(), total_gt, (matched_pred > 0).sum(), pred.sum()
    return counts


# The smallest 8-bit NMS level kept by each threshold, by the same double comparison as ``levels >= t``.
_THRESHOLD_LEVELS = np.argmax(np.arange(256)[None, :] / 255 >= THRESHOLDS[:, None], axis=1)


def _fast_counts(
    levels: np.ndarray, gt: np.ndarray, max_dist_ratio: float, matcher: str, seed: int = MATCHER_SEED
) -> np.ndarray:
    """``image_counts`` of an 8-bit NMS map by the ``"fast"`` (BSDS matcher reseeded with ``seed``) or
    ``"maximum"`` matcher: every distinct binarised map is thinned in one stack and matched
    (``boundary_matching``)."""
    # Pixels at or above each 8-bit level; thresholds keeping as many pixels keep the same (nested) map.
    at_or_above = np.cumsum(np.bincount(levels.ravel(), minlength=256)[::-1])[::-1]
    totals = at_or_above[_THRESHOLD_LEVELS]
    _, first, which = np.unique(totals, return_index=True, return_inverse=True)
    maps = thin_stack(levels[None] >= _THRESHOLD_LEVELS[first][:, None, None])
    if matcher == "fast":
        matched = bsds_assignment_counts(maps, gt, max_dist_ratio, seed)[which]
    else:
        matched = maximum_matching_counts(maps, gt, max_dist_ratio)[which]
    total_pred = maps.sum(axis=(1, 2))[which]
    total_gt = np.full(len(THRESHOLDS), int(gt.sum()))
    return np.stack([matched, total_gt, matched, total_pred]).astype(np.int64)


def check_matcher(matcher: str) -> str:
    """``matcher`` if it is one of ``MATCHERS``; ValueError naming it otherwise."""
    if matcher not in MATCHERS:
        raise ValueError(f"unknown boundary matcher {matcher!r}; expected one of {list(MATCHERS)}")
    return matcher


def dataset_max_dist_ratio(dataset: str) -> float:
    """The matching tolerance of ``dataset`` (any of its names); ValueError naming an unknown one."""
    return get_dataset(dataset).boundary_max_dist_ratio


def _available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def count_boundaries(
    edges: Sequence[np.ndarray],
    ground_truths: Sequence[np.ndarray],
    max_dist_ratio: float,
    workers: int | None = None,
    progress: bool = True,
    matcher: str = DEFAULT_MATCHER,
) -> np.ndarray:
    """``image_counts`` of every image by ``matcher``, int64 ``(N, 4, len(THRESHOLDS))``, in input order.

    ``workers`` processes (default: every available CPU; 0 or 1 evaluates in this process) share the
    images. They start the default multiprocessing way and run only NumPy, SciPy, scikit-image and
    pyEdgeEval code, so forking a process that holds a CUDA context is safe, as for DataLoader workers.
    """
    check_matcher(matcher)
    if len(edges) != len(ground_truths):
        raise ValueError(f"{len(edges)} predictions but {len(ground_truths)} ground truths")
    counts = np.zeros((len(edges), len(COUNT_FIELDS), len(THRESHOLDS)), dtype=np.int64)
    workers = min(_available_cpus() if workers is None else workers, len(edges))
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    bar = tqdm(total=len(edges), desc="boundaries", unit="img", disable=not progress)
    with bar, pool or nullcontext():
        results = (pool.map if pool else map)(
            image_counts, edges, ground_truths, repeat(max_dist_ratio), repeat(matcher)
        )
        for i, image in enumerate(results):
            counts[i] = image
            bar.update()
    return counts


def _recall_precision_f(
    matched_gt: np.ndarray, total_gt: np.ndarray, matched_pred: np.ndarray, total_pred: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Recall, precision and F of counts (any matching shapes), with SEISM's values for empty sets."""
    recall = np.where(total_gt > 0, matched_gt / np.maximum(total_gt, 1), 1.0)
    precision = np.where(total_pred > 0, matched_pred / np.maximum(total_pred, 1), 1.0)
    precision = np.where(total_gt > 0, precision, 0.0)
    denominator = precision + recall
    f = np.where(denominator > 0, 2 * precision * recall / np.where(denominator > 0, denominator, 1), 0.0)
    return recall, precision, f


def _average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """SEISM's AP: precision interpolated linearly at recall 0, 0.01, ..., 1 inside the measured recall
    range, summed and divided by 100; of repeated recalls the lowest threshold's point is kept. The 101
    points over 100 let a near-perfect curve exceed 1, as in SEISM."""
    unique_recall, first = np.unique(recall, return_index=True)
    if len(unique_recall) < 2:
        return 0.0
    grid = np.linspace(0.0, 1.0, 101)
    grid = grid[(grid >= unique_recall[0]) & (grid <= unique_recall[-1])]
    return float(np.interp(grid, unique_recall, precision[first]).sum() / 100)


def boundary_scores(counts: np.ndarray, thresholds: np.ndarray = THRESHOLDS) -> dict[str, float | np.ndarray]:
    """odsF, oisF and AP (x 100) from per-image counts ``(N, 4, len(thresholds))``.

    odsF: the best F over the thresholds of the counts pooled over all images (no interpolation between
    thresholds); ``odsThreshold`` is where it is reached. oisF: F of the counts pooled at each image's own
    best threshold (the first on ties). AP: ``_average_precision`` of the pooled precision-recall points.
    Also returned: ``thresholds`` and the pooled counts per threshold under the ``COUNT_FIELDS`` names.
    ``thresholds`` are SEISM's 99 unless counts of fewer (ascending) are scored.
    """
    if counts.ndim != 3 or counts.shape[1:] != (len(COUNT_FIELDS), len(thresholds)):
        raise ValueError(f"counts must be (N, {len(COUNT_FIELDS)}, {len(thresholds)}), got {counts.shape}")
    pooled = counts.sum(axis=0)
    recall, precision, f = _recall_precision_f(*pooled)
    best = int(np.argmax(f))
    _, _, image_f = _recall_precision_f(*counts.transpose(1, 0, 2))
    own_best = np.argmax(image_f, axis=1) if len(counts) else np.zeros(0, dtype=np.int64)
    at_own_best = counts[np.arange(len(counts)), :, own_best].sum(axis=0)
    _, _, ois_f = _recall_precision_f(*at_own_best)
    return {
        "odsF": float(f[best]) * 100.0,
        "oisF": float(ois_f) * 100.0,
        "AP": _average_precision(recall, precision) * 100.0,
        "odsThreshold": float(thresholds[best]),
        "thresholds": np.array(thresholds, dtype=np.float64),
        **{name: pooled[i] for i, name in enumerate(COUNT_FIELDS)},
    }


def evaluate_boundaries(
    edges: Sequence[np.ndarray],
    ground_truths: Sequence[np.ndarray],
    max_dist_ratio: float,
    workers: int | None = None,
    progress: bool = True,
    matcher: str = DEFAULT_MATCHER,
) -> dict[str, float | np.ndarray]:
    """``boundary_scores`` of 8-bit predictions (before NMS, at the original image size) against label or
    boundary maps (see ``boundary_ground_truth``); ``workers`` and ``matcher`` as in ``count_boundaries``."""
    counts = count_boundaries(edges, ground_truths, max_dist_ratio, workers, progress, matcher)
    return boundary_scores(counts)


@torch.no_grad()
def edge_logits_to_uint8(logits: Tensor, original_sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """``sigmoid(logit) x 255`` truncated to uint8, one ``(h, w)`` array per image of ``(B, 1, H, W)``
    logits, cropped to its original size ``(h, w)`` from the centred padding of the test pipeline
    (``pad_centred``: an odd margin has its extra row / column at the bottom / right)."""
    if logits.ndim != 4 or logits.shape[1] != 1:
        raise ValueError(f"edge logits must be (B, 1, H, W), got {tuple(logits.shape)}")
    if len(original_sizes) != len(logits):
        raise ValueError(f"{len(logits)} predictions but {len(original_sizes)} original sizes")
    edges = (torch.sigmoid(logits[:, 0].float()) * 255.0).to(torch.uint8).cpu().numpy()
    padded_h, padded_w = edges.shape[1:]
    crops = []
    for edge, (h, w) in zip(edges, original_sizes, strict=True):
        if h > padded_h or w > padded_w:
            raise ValueError(f"original size {(h, w)} exceeds the prediction size {(padded_h, padded_w)}")
        top, left = (padded_h - h) // 2, (padded_w - w) // 2
        crops.append(np.ascontiguousarray(edge[top : top + h, left : left + w]))
    return crops


class BoundaryMeter:
    """Streaming odsF / oisF / AP of the edge task (SPEC §9), for ``dataset`` ``"pascal"`` or ``"nyud"``,
    by ``matcher`` (``MATCHERS``).

    ``update`` converts each image at once (prediction to uint8 at its original size, ground truth to a
    thinned boundary map) and queues it in ``pending``; ``compute`` evaluates the queued images with
    ``workers`` processes, appends their counts to ``counts`` (int64 ``(N, 4, len(THRESHOLDS))``, the
    accumulator to gather across processes) and returns ``boundary_scores``. Images are evaluated once;
    until then each holds about two bytes per pixel (some 2 GB for the PASCAL-Context val split).
    """

    def __init__(
        self,
        dataset: str = "pascal",
        workers: int | None = None,
        progress: bool = True,
        matcher: str = DEFAULT_MATCHER,
    ) -> None:
        pyedgeeval()  # a missing extra is reported before any image is predicted
        self.dataset = dataset
        self.max_dist_ratio = dataset_max_dist_ratio(dataset)
        self.matcher = check_matcher(matcher)
        if matcher == "fast":
            assignment_module()
        self.workers = workers
        self.progress = progress
        self.reset()

    def reset(self) -> None:
        """Forget all updates."""
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.counts = np.zeros((0, len(COUNT_FIELDS), len(THRESHOLDS)), dtype=np.int64)

    def update(
        self,
        edge_logits: Tensor,
        ground_truths: Sequence[np.ndarray | Tensor],
        original_sizes: Sequence[tuple[int, int]],
    ) -> None:
        """Queue one batch: raw edge logits ``(B, 1, H, W)`` (padded), one label or boundary map per image
        at its original size, and those sizes ``(h, w)``."""
        edges = edge_logits_to_uint8(edge_logits, original_sizes)
        if len(ground_truths) != len(edges):
            raise ValueError(f"{len(edges)} predictions but {len(ground_truths)} ground truths")
        for edge, ground_truth in zip(edges, ground_truths, strict=True):
            if isinstance(ground_truth, Tensor):
                ground_truth = ground_truth.cpu().numpy()
            if ground_truth.shape != edge.shape:
                raise ValueError(f"ground truth {ground_truth.shape} is not the original size {edge.shape}")
            self.pending.append((edge, boundary_ground_truth(ground_truth)))

    def compute(self) -> dict[str, float | np.ndarray]:
        """Evaluate the queued images, then ``boundary_scores`` of every image seen since ``reset``."""
        if self.pending:
            edges, ground_truths = zip(*self.pending, strict=True)
            new = count_boundaries(
                edges, ground_truths, self.max_dist_ratio, self.workers, self.progress, self.matcher
            )
            self.counts = np.concatenate([self.counts, new])
            self.pending = []
        return boundary_scores(self.counts)


def evaluate_edge_folder(
    pred_dir: str | Path,
    ground_truth: Callable[[str], np.ndarray],
    dataset: str = "pascal",
    ids: Sequence[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
    matcher: str = DEFAULT_MATCHER,
) -> dict[str, float | np.ndarray]:
    """Score a folder of 8-bit edge PNGs ``<id>.png`` (what the official code saves for SEISM).

    ``ground_truth(id)`` returns the image's label or boundary map, e.g. ``PascalContext(...).label_map``
    or ``NYUD(...).boundary_gt``; ``ids`` defaults to every PNG in the folder. Ground truths are reduced
    to boundary maps while reading, so a split of label maps is never held in memory at once.
    """
    ratio = dataset_max_dist_ratio(dataset)
    pred_dir = Path(pred_dir)
    if ids is None:
        ids = sorted(path.stem for path in pred_dir.glob("*.png"))
    if not ids:
        raise ValueError(f"no edge predictions (*.png) in {pred_dir}")
    edges, ground_truths = [], []
    for image_id in ids:
        path = pred_dir / f"{image_id}.png"
        with Image.open(path) as image:
            if image.mode != "L":
                raise ValueError(f"{path}: expected an 8-bit grey PNG, got mode {image.mode}")
            edges.append(np.asarray(image))
        ground_truths.append(boundary_ground_truth(np.asarray(ground_truth(image_id))))
    return evaluate_boundaries(edges, ground_truths, ratio, workers, progress, matcher)
