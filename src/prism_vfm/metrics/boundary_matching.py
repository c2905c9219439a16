"""The fast boundary matchers: thinning of every threshold at once, the candidate pixel pairs found once
per image, then per threshold either the BSDS matcher's assignment (``bsds_assignment_counts``, matcher
``"fast"``) or a maximum bipartite matching (``maximum_matching_counts``, matcher ``"maximum"``).

The BSDS matcher (``correspondPixels``) solves a minimum-cost assignment in which a predicted or
ground-truth pixel left unmatched costs 100 x the tolerance, far more than any match within it. Its counts
would be those of a maximum matching in the bipartite graph of predicted and ground-truth boundary pixels
at most the tolerance apart, which ``maximum_matching_counts`` computes exactly, as a maximum flow (SciPy's
Dinic), but for two things, which keep the BSDS counts at or below it: (a) its unmatched pixels must pair
up through a sparse random graph of outlier edges (6 per node), which often has no perfect matching on
what a maximum matching leaves over, so that one to a few more pixels stay unmatched (on most (image,
threshold) pairs of realistic maps; it moves with the matcher's random seed) — ``boundary_assignment``
draws the same graph and finds exactly that count; (b) in principle, an augmenting path that re-matches a
long chain of pixels, each a little farther apart, can cost more distance than one outlier saves (over
~100 re-matched pixels for one more match) — not what happens in practice: on the map checked, a 100x
outlier cost changed nothing, and the assignment counts equal the BSDS matcher's on every pair compared.

SciPy's ``maximum_bipartite_matching`` is not used: its depth-first search may revisit vertices within a
phase, which takes minutes on the dense layered graphs of noisy boundary maps; its Dinic flow advances a
current-arc pointer per vertex and stays near linear here.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import maximum_flow

from prism_vfm.errors import MissingExtraError

# Neighbour order of the thinning code, bit 0 first: E, NE, N, NW, W, SW, S, SE (scikit-image's weights).
_NEIGHBOURS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))


def _thinning_tables() -> tuple[np.ndarray, np.ndarray]:
    """Deletion tables of Guo and Hall's two sub-iterations (Comm. ACM 32(3), 1989, algorithm A1), indexed
    by the 8-neighbour code; the algorithm of MATLAB's ``bwmorph(b, 'thin', Inf)`` and scikit-image's
    ``thin``."""
    tables = np.zeros((2, 256), dtype=bool)
    for code in range(256):
        x = [(code >> i) & 1 for i in range(8)] * 2  # x[0] = x1 (E) ... x[7] = x8 (SE), wrapped
        crossings = sum(1 for i in (0, 2, 4, 6) if not x[i] and (x[i + 1] or x[i + 2]))
        n1 = sum(1 for i in (0, 2, 4, 6) if x[i] or x[i + 1])
        n2 = sum(1 for i in (1, 3, 5, 7) if x[i] or x[i + 1])
        if crossings != 1 or not 2 <= min(n1, n2) <= 3:
            continue
        tables[0, code] = not ((x[1] or x[2] or not x[7]) and x[0])
        tables[1, code] = not ((x[5] or x[6] or not x[3]) and x[4])
    return tables[0], tables[1]


_THIN_TABLES = _thinning_tables()


def thin_stack(maps: np.ndarray) -> np.ndarray:
    """``skimage.morphology.thin`` of every map of a bool stack ``(K, H, W)``, in one pass over the stack.

    The same parallel sub-iterations, but after the first two only the pixels next to one deleted in the
    last two sub-iterations are looked at again: the others' neighbourhoods, hence their fate, are
    unchanged. It stops when two sub-iterations in a row delete nothing, where scikit-image's loop stops or
    would change nothing more.
    """
    if maps.ndim != 3:
        raise ValueError(f"thin_stack needs a (K, H, W) stack, got shape {maps.shape}")
    k, h, w = maps.shape
    padded = np.zeros((k, h + 2, w + 2), dtype=np.uint8)
    padded[:, 1:-1, 1:-1] = maps
    flat = padded.reshape(-1)
    offsets = np.array([dy * (w + 2) + dx for dy, dx in _NEIGHBOURS])
    foreground = np.flatnonzero(flat)
    touched: list[np.ndarray] = []
    deleted_last = [1, 1]
    step = 0
    while step < 2 or any(deleted_last):
        if step < 2:
            candidates = foreground[flat[foreground] == 1]
        else:
            candidates = np.sort(np.concatenate(touched[-2:]))
            first = np.concatenate([[True], candidates[1:] != candidates[:-1]])
            candidates = candidates[first & (flat[candidates] == 1)]
        code = np.zeros(len(candidates), dtype=np.uint8)
        for bit, offset in enumerate(offsets):
            code |= flat[candidates + offset] << bit
        deleted = candidates[_THIN_TABLES[step % 2][code]]
        flat[deleted] = 0
        touched.append((deleted[:, None] + offsets).ravel())
        deleted_last = [deleted_last[1], len(deleted)]
        step += 1
    return padded[:, 1:-1, 1:-1].astype(bool)


def tolerance_offsets(shape: tuple[int, int], max_dist_ratio: float) -> np.ndarray:
    """Pixel offsets ``(n, 2)`` (dy, dx) within the matching tolerance of an image of ``shape``.

    As in the BSDS matcher: the tolerance is ``max_dist_ratio`` x the diagonal in pixels, and an offset
    counts when ``dy² + dx²`` is not above the tolerance squared, so a pixel exactly at the tolerance
    matches (same double arithmetic as the compiled code).
    """
    h, w = shape
    max_dist = max_dist_ratio * math.sqrt(h * h + w * w)
    radius = math.ceil(max_dist)
    dy, dx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    within = dy * dy + dx * dx <= max_dist * max_dist
    return np.stack([dy[within], dx[within]], axis=1)


def _matching_size(rows: np.ndarray, cols: np.ndarray, n_rows: int, n_cols: int) -> int:
    """Size of a maximum matching of the bipartite graph with edges ``(rows[i], cols[i])``, rows sorted."""
    if len(rows) == 0:
        return 0
    # Vertices: 0 source, 1 sink, 2 ... ground truth, then predictions; unit capacities.
    n = 2 + n_rows + n_cols
    heads = np.concatenate([2 + np.arange(n_rows), 2 + n_rows + cols, np.ones(n_cols, dtype=np.int64)])
    degree = np.zeros(n, dtype=np.int64)
    degree[0] = n_rows
    degree[2 : 2 + n_rows] = np.bincount(rows, minlength=n_rows)
    degree[2 + n_rows :] = 1
    indptr = np.concatenate([[0], np.cumsum(degree)])
    graph = sparse.csr_array(
        (np.ones(len(heads), dtype=np.int32), heads.astype(np.int32), indptr.astype(np.int32)), shape=(n, n)
    )
    return int(maximum_flow(graph, 0, 1, method="dinic").flow_value)


def _candidate_pairs(
    predictions: np.ndarray, ground_truth: np.ndarray, max_dist_ratio: float
) -> tuple[np.ndarray, np.ndarray, int, int, np.ndarray]:
    """The pairs within the tolerance of a stack of predictions ``(K, H, W)`` and one ground truth.

    Found once, from the union of the predictions, with the grid offsets around every ground-truth pixel.
    Returns the pairs' ground-truth and predicted pixel ids (sorted by ground-truth id), how many of each
    have a partner at some threshold, and which of those predicted pixels each map holds ``(K, n_pred)``.
    Pixels are numbered column by column (x, then y), as the BSDS matcher numbers its nodes.
    """
    _, h, w = predictions.shape
    gt_x, gt_y = np.nonzero(ground_truth.T)
    union = predictions.any(axis=0)
    index = np.full((h, w), -1, dtype=np.int64)
    pred_x, pred_y = np.nonzero(union.T)
    index[pred_y, pred_x] = np.arange(len(pred_y))
    offsets = tolerance_offsets((h, w), max_dist_ratio)
    y = gt_y[:, None] + offsets[:, 0]
    x = gt_x[:, None] + offsets[:, 1]
    inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
    gt_of = np.broadcast_to(np.arange(len(gt_y))[:, None], y.shape)[inside]
    pred_of = index[y[inside], x[inside]]
    paired = pred_of >= 0
    gt_of, pred_of = gt_of[paired], pred_of[paired]  # sorted by ground-truth pixel
    # Keep only the pixels that have a partner at some threshold, numbered densely in the same order.
    gt_of, n_gt = _renumber(gt_of, len(gt_y))
    pred_ids = np.flatnonzero(np.bincount(pred_of, minlength=len(pred_y)))
    pred_of, n_pred = _renumber(pred_of, len(pred_y))
    present = predictions[:, pred_y[pred_ids], pred_x[pred_ids]]
    return gt_of, pred_of, n_gt, n_pred, present


def maximum_matching_counts(
    predictions: np.ndarray, ground_truth: np.ndarray, max_dist_ratio: float
) -> np.ndarray:
    """Matched counts of a stack of thinned predictions ``(K, H, W)`` against one thinned ground truth
    ``(H, W)``: int64 ``(K,)``, the size of a maximum matching between predicted and ground-truth pixels
    within the tolerance (``tolerance_offsets``), i.e. both the matched ground-truth and the matched
    predicted pixels.

    Each map's graph is the part of the candidate pairs (``_candidate_pairs``) whose predicted pixel it
    holds; only pixels with a partner within the tolerance enter it.
    """
    gt_of, pred_of, n_gt, n_pred, present = _candidate_pairs(predictions, ground_truth, max_dist_ratio)
    counts = np.zeros(len(predictions), dtype=np.int64)
    for i in range(len(predictions)):
        edges = present[i, pred_of]
        counts[i] = _matching_size(gt_of[edges], pred_of[edges], n_gt, n_pred)
    return counts


def assignment_module() -> Any:
    """``boundary_assignment`` (compiled with Numba, of the ``eval`` extra); MissingExtraError naming the
    extra when Numba is absent."""
    try:
        return importlib.import_module("prism_vfm.metrics.boundary_assignment")
    except ImportError as error:
        raise MissingExtraError("the fast boundary matcher", "numba", "eval") from error


def bsds_assignment_counts(
    predictions: np.ndarray, ground_truth: np.ndarray, max_dist_ratio: float, seed: int
) -> np.ndarray:
    """Matched counts of a stack of thinned predictions ``(K, H, W)`` against one thinned ground truth
    ``(H, W)`` as the BSDS matcher (``correspondPixels``) reseeded with ``seed`` finds them: int64
    ``(K,)``, the most pixel pairs within the tolerance that its random outlier graph lets it keep
    (``boundary_assignment``); never more than ``maximum_matching_counts``."""
    matched_count = assignment_module().bsds_matched_count
    gt_of, pred_of, n_gt, n_pred, present = _candidate_pairs(predictions, ground_truth, max_dist_ratio)
    counts = np.zeros(len(predictions), dtype=np.int64)
    for i in range(len(predictions)):
        edges = present[i, pred_of]
        # The map's nodes: its pixels with a partner within the tolerance, in the same (column) order.
        pred, n1 = _renumber(pred_of[edges], n_pred)
        gt, n2 = _renumber(gt_of[edges], n_gt)
        counts[i] = matched_count(pred, gt, n1, n2, seed)
    return counts


def _renumber(ids: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """``ids`` (values below ``size``) renumbered 0, 1, ... in their order, and how many distinct."""
    used = np.zeros(size, dtype=bool)
    used[ids] = True
    new = np.cumsum(used) - 1
    return new[ids], int(used.sum())
