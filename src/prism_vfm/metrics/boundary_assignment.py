"""The BSDS matcher's assignment, computed exactly and fast: its random outlier graph, drawn by the same
generator calls from the same seed, and the largest number of real matches that graph lets it keep.

``correspondPixels`` (BSDS ``match.cc``, pyEdgeEval's copy) numbers the pixels of each map that have a
partner within the tolerance (``n1`` predicted, ``n2`` ground-truth, column by column), and solves a
minimum-cost perfect matching between the predicted pixels and ``n2`` outlier nodes on one side, the
ground-truth pixels and ``n1`` outlier nodes on the other. Besides the real edges (cost: the distance),
each node draws random outlier edges, all of one cost (100 x the tolerance): predicted pixel ``i`` to 6
outlier nodes ``j != i`` of its side, ground-truth pixel ``j`` to 6 outlier nodes ``i != j``, and every
node of the larger outlier side to 6 of the smaller; an overlay of 100 x that cost joins each pixel to
its own outlier node, so that a perfect matching always exists. A pixel left unmatched takes one outlier
edge, and the outlier nodes not taken must pair up among themselves. Since one outlier costs more than
the distances of any realistic re-matching, the solver's matched count is the largest number of real
edges in a perfect matching of costs 0 (real), 1 (outlier) and 100 (overlay), which is computed here:
the maximum matching of the real edges first (Hopcroft-Karp), then a primal-dual (Hungarian) method whose
phases grow the matching by Hopcroft-Karp on the edges of zero reduced cost. The outlier graph depends
only on ``(n1, n2)`` and the seed: the generator is glibc's ``erand48`` (48-bit linear congruential),
reseeded before every match, and ``kOfN`` is BSDS's sampler of ``k`` of ``n`` values.

Compiled with Numba on first use (cached on disk where the package folder is writable).
"""

from __future__ import annotations

import math

import numba
import numpy as np

_LCG_A = np.uint64(0x5DEECE66D)
_LCG_C = np.uint64(0xB)
_LCG_MASK = np.uint64((1 << 48) - 1)
_TWO_TO_MINUS_48 = 2.0**-48
_OUTLIER_DEGREE = 6
_INF = np.int64(1) << 60

OUTLIER_COST = 1
"""Cost of an outlier edge here (a real edge costs 0): the BSDS solver's, relative to the outlier cost."""
OVERLAY_COST = 100
"""Cost of an overlay edge, a pixel to its own outlier node (100 x an outlier edge, as in ``match.cc``)."""


def generator_state(seed: int) -> np.ndarray:
    """The 48-bit state of BSDS's ``Random`` after ``reseed(seed)`` (seed > 0), as a one-element array."""
    if seed <= 0:
        raise ValueError(f"the matcher's seed must be positive (0 seeds from the clock), got {seed}")
    return np.array([seed & ((1 << 48) - 1)], dtype=np.uint64)


@numba.njit(cache=True)
def _uniform(state: np.ndarray) -> float:  # pragma: no cover - compiled
    """glibc's ``erand48``: advance the state, return it over 2^48."""
    x = (state[0] * _LCG_A + _LCG_C) & _LCG_MASK
    state[0] = x
    return float(x) * _TWO_TO_MINUS_48


@numba.njit(cache=True)
def _k_of_n(
    k: int, n: int, out: np.ndarray, state: np.ndarray, stack: np.ndarray
) -> None:  # pragma: no cover
    """BSDS's ``kOfN``: ``k`` distinct values of ``[0, n)`` in increasing order into ``out[:k]``, by the
    same draws in the same order (the recursive small-k sampler, or the sequential one)."""
    if k == 0:
        return
    if k * math.log(k) / math.log(2.0) < n // 2:
        # Pre-order traversal of the halving recursion: (k, n, position in out, value offset).
        top = 0
        stack[0, 0], stack[0, 1], stack[0, 2], stack[0, 3] = k, n, 0, 0
        while top >= 0:
            kk, nn, pos, base = stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3]
            top -= 1
            if kk == 1:
                out[pos] = int(math.floor(_uniform(state) * nn)) + base
                continue
            left_n = nn // 2
            left_k = 0
            for i in range(kk):
                x = int(math.floor(_uniform(state) * (nn - i)))
                if x < left_n - left_k:
                    left_k += 1
            right_k = kk - left_k
            if right_k > 0:
                top += 1
                stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = (
                    right_k,
                    nn - left_n,
                    pos + left_k,
                    base + left_n,
                )
            if left_k > 0:
                top += 1
                stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = left_k, left_n, pos, base
    else:
        j = 0
        for i in range(n):
            if _uniform(state) < (k - j) / (n - i):
                out[j] = i
                j += 1


@numba.njit(cache=True)
def _k_of_n_rows(k: int, n: int, rows: int, state: np.ndarray) -> np.ndarray:  # pragma: no cover
    """``rows`` successive ``kOfN(k, n)`` draws, int64 ``(rows, k)``."""
    out = np.zeros((rows, k), dtype=np.int64)
    stack = np.zeros((64, 4), dtype=np.int64)
    for r in range(rows):
        _k_of_n(k, n, out[r], state, stack)
    return out


def k_of_n_rows(k: int, n: int, rows: int, state: np.ndarray) -> np.ndarray:
    """``rows`` successive calls of BSDS's ``kOfN(k, n)`` from generator ``state`` (advanced in place):
    int64 ``(rows, k)``, each row increasing."""
    if not 0 <= k <= n:
        raise ValueError(f"kOfN needs 0 <= k <= n, got k={k}, n={n}")
    return _k_of_n_rows(k, n, rows, state)


@numba.njit(cache=True)
def _outlier_edges(n1: int, n2: int, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    """Left and right ends of the outlier edges of ``match.cc``, in its drawing order.

    Left nodes: predicted pixels ``0 .. n1-1``, outlier nodes ``n1 .. n1+n2-1``; right nodes: ground-truth
    pixels ``0 .. n2-1``, outlier nodes ``n2 .. n2+n1-1``.
    """
    degree = _OUTLIER_DEGREE
    d1 = max(0, min(degree, n1 - 1))
    d2 = max(0, min(degree, n2 - 1))
    nmin, nmax = min(n1, n2), max(n1, n2)
    d3 = min(degree, nmin)
    total = d1 * n1 + d2 * n2 + d3 * nmax
    left = np.empty(total, dtype=np.int64)
    right = np.empty(total, dtype=np.int64)
    out = np.zeros(degree, dtype=np.int64)
    stack = np.zeros((64, 4), dtype=np.int64)
    count = 0
    for i in range(n1):
        _k_of_n(d1, n1 - 1, out, state, stack)
        for a in range(d1):
            j = out[a] + 1 if out[a] >= i else out[a]
            left[count], right[count] = i, n2 + j
            count += 1
    for j in range(n2):
        _k_of_n(d2, n2 - 1, out, state, stack)
        for a in range(d2):
            i = out[a] + 1 if out[a] >= j else out[a]
            left[count], right[count] = n1 + i, j
            count += 1
    for i in range(nmax):
        _k_of_n(d3, nmin, out, state, stack)
        for a in range(d3):
            if n1 < n2:
                left[count], right[count] = n1 + i, n2 + out[a]
            else:
                left[count], right[count] = n1 + out[a], n2 + i
            count += 1
    return left, right


def outlier_edges(n1: int, n2: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The outlier edges the BSDS matcher draws for ``n1`` predicted and ``n2`` ground-truth nodes after
    ``reseed(seed)``, in its drawing order: their left ends (predicted pixels ``0 .. n1-1``, outlier nodes
    ``n1 .. n1+n2-1``) and right ends (ground-truth pixels ``0 .. n2-1``, outlier nodes ``n2 .. n2+n1-1``).
    """
    return _outlier_edges(n1, n2, generator_state(seed))


@numba.njit(cache=True)
def _hopcroft_karp(
    indptr: np.ndarray,
    heads: np.ndarray,
    cost: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    match_l: np.ndarray,
    match_r: np.ndarray,
) -> int:  # pragma: no cover - compiled
    """Grow ``match_l`` / ``match_r`` to a maximum matching of the edges of zero reduced cost
    ``cost - u[left] - v[right]``, by shortest augmenting paths in phases (after a greedy pass); returns
    the number of phases."""
    n = len(match_l)
    dist = np.empty(n, dtype=np.int64)
    queue = np.empty(n, dtype=np.int64)
    cursor = np.empty(n, dtype=np.int64)
    stack = np.empty(n + 1, dtype=np.int64)
    via = np.empty(n + 1, dtype=np.int64)
    # A greedy pass first: most free vertices have a free partner at once.
    for l in range(n):
        if match_l[l] >= 0:
            continue
        for e in range(indptr[l], indptr[l + 1]):
            r = heads[e]
            if match_r[r] < 0 and cost[e] - u[l] - v[r] == 0:
                match_l[l] = r
                match_r[r] = l
                break
    phases = 0
    while True:
        phases += 1
        head = tail = 0
        for l in range(n):
            if match_l[l] < 0:
                dist[l] = 0
                queue[tail] = l
                tail += 1
            else:
                dist[l] = _INF
        found = _INF
        while head < tail:
            l = queue[head]
            head += 1
            if dist[l] >= found:
                continue
            for e in range(indptr[l], indptr[l + 1]):
                r = heads[e]
                if cost[e] - u[l] - v[r] != 0:
                    continue
                partner = match_r[r]
                if partner < 0:
                    if found == _INF:
                        found = dist[l] + 1
                elif dist[partner] == _INF:
                    dist[partner] = dist[l] + 1
                    queue[tail] = partner
                    tail += 1
        if found == _INF:
            return phases
        for l in range(n):
            cursor[l] = indptr[l]
        for root in range(n):
            if match_l[root] >= 0 or dist[root] != 0:
                continue
            top = 0
            stack[0] = root
            while top >= 0:
                l = stack[top]
                pushed = False
                while cursor[l] < indptr[l + 1]:
                    e = cursor[l]
                    cursor[l] += 1
                    r = heads[e]
                    if cost[e] - u[l] - v[r] != 0:
                        continue
                    partner = match_r[r]
                    if partner < 0:
                        if dist[l] + 1 != found:
                            continue
                        via[top] = r
                        for t in range(top + 1):
                            match_l[stack[t]] = via[t]
                            match_r[via[t]] = stack[t]
                        top = -1
                        pushed = True
                        break
                    if dist[partner] == dist[l] + 1:
                        via[top] = r
                        top += 1
                        stack[top] = partner
                        pushed = True
                        break
                if not pushed:
                    dist[l] = _INF
                    top -= 1


@numba.njit(cache=True)
def _min_cost_perfect_matching(
    indptr: np.ndarray, heads: np.ndarray, cost: np.ndarray, n: int
) -> np.ndarray:  # pragma: no cover - compiled
    """``match_l`` of a minimum-cost perfect matching of the bipartite graph (left CSR ``indptr``,
    ``heads``, integer ``cost`` >= 0), all -1 if none exists. Primal-dual: dual potentials ``u``, ``v``
    keep every reduced cost >= 0 and the matched ones 0; the matching is grown by Hopcroft-Karp on the
    zero-reduced-cost edges, then the potentials of the vertices reachable from the free left vertices
    by such alternating paths are moved by the smallest reduced cost leaving them."""
    u = np.zeros(n, dtype=np.int64)
    v = np.zeros(n, dtype=np.int64)
    match_l = -np.ones(n, dtype=np.int64)
    match_r = -np.ones(n, dtype=np.int64)
    seen_l = np.zeros(n, dtype=np.bool_)
    seen_r = np.zeros(n, dtype=np.bool_)
    queue = np.empty(n, dtype=np.int64)
    while True:
        _hopcroft_karp(indptr, heads, cost, u, v, match_l, match_r)
        head = tail = 0
        seen_l[:] = False
        seen_r[:] = False
        for l in range(n):
            if match_l[l] < 0:
                seen_l[l] = True
                queue[tail] = l
                tail += 1
        if tail == 0:
            return match_l
        while head < tail:
            l = queue[head]
            head += 1
            for e in range(indptr[l], indptr[l + 1]):
                r = heads[e]
                if seen_r[r] or cost[e] - u[l] - v[r] != 0:
                    continue
                seen_r[r] = True
                partner = match_r[r]  # matched: no augmenting path is left
                if not seen_l[partner]:
                    seen_l[partner] = True
                    queue[tail] = partner
                    tail += 1
        delta = _INF
        for t in range(tail):
            l = queue[t]
            for e in range(indptr[l], indptr[l + 1]):
                r = heads[e]
                if not seen_r[r]:
                    delta = min(delta, cost[e] - u[l] - v[r])
        if delta == _INF:
            return -np.ones(n, dtype=np.int64)
        for t in range(tail):
            u[queue[t]] += delta
        for r in range(n):
            if seen_r[r]:
                v[r] -= delta


@numba.njit(cache=True)
def _bsds_matched_count(
    pred: np.ndarray, gt: np.ndarray, n1: int, n2: int, state: np.ndarray
) -> int:  # pragma: no cover - compiled
    if n1 == 0 or n2 == 0:
        return 0
    out_left, out_right = _outlier_edges(n1, n2, state)
    n = n1 + n2
    m_real, m_out = len(pred), len(out_left)
    degree = np.zeros(n + 1, dtype=np.int64)
    for e in range(m_real):
        degree[pred[e] + 1] += 1
    for e in range(m_out):
        degree[out_left[e] + 1] += 1
    for l in range(n):
        degree[l + 1] += 1  # the overlay edge
    indptr = np.cumsum(degree)
    fill = indptr[:-1].copy()
    heads = np.empty(indptr[-1], dtype=np.int64)
    cost = np.empty(indptr[-1], dtype=np.int64)
    # Real edges first, so that the first phase looks at them before any outlier edge of a pixel.
    for e in range(m_real):
        l = pred[e]
        heads[fill[l]], cost[fill[l]] = gt[e], 0
        fill[l] += 1
    for e in range(m_out):
        l = out_left[e]
        heads[fill[l]], cost[fill[l]] = out_right[e], OUTLIER_COST
        fill[l] += 1
    for i in range(n1):
        heads[fill[i]], cost[fill[i]] = n2 + i, OVERLAY_COST
        fill[i] += 1
    for i in range(n2):
        heads[fill[n1 + i]], cost[fill[n1 + i]] = i, OVERLAY_COST
        fill[n1 + i] += 1
    match_l = _min_cost_perfect_matching(indptr, heads, cost, n)
    matched = 0
    for i in range(n1):
        if 0 <= match_l[i] < n2:
            matched += 1
    return matched


def bsds_matched_count(pred: np.ndarray, gt: np.ndarray, n1: int, n2: int, seed: int) -> int:
    """Pixels the BSDS matcher matches (each side alike), given the real edges ``(pred[e], gt[e])``
    between the ``n1`` predicted and ``n2`` ground-truth pixels that have a partner within the tolerance,
    each side numbered as ``match.cc`` does (column-major pixel order), and the matcher's seed."""
    pred = np.ascontiguousarray(pred, dtype=np.int64)
    gt = np.ascontiguousarray(gt, dtype=np.int64)
    return int(_bsds_matched_count(pred, gt, n1, n2, generator_state(seed)))
