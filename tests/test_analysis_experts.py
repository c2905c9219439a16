"""Co-activation of experts across contexts and checkpoints, and seed stability by Hungarian alignment."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from prism_vfm.analysis import (
    Affinity,
    affinity_agreement,
    align_affinities,
    coactivation,
    coactivation_series,
    match_experts,
    plot_coactivation,
    plot_coactivation_series,
    plot_seed_alignment,
    routing_affinity,
)
from tests.analysis_models import analysis_student, image_batches, route_by_context

DISJOINT = [[0, 1], [2, 3], [4, 5]]
SAME = [[0, 1], [0, 1], [0, 1]]
CHAIN = [[0, 1], [1, 2], [2, 3]]


def affinity_of(patterns: dict, contexts=(0, 1, 2)) -> Affinity:
    model = route_by_context(analysis_student(), patterns)
    return routing_affinity(
        model, image_batches(1, batch=2), list(contexts), context_names=["D", "C", "S"][: len(contexts)]
    )


def matrix_affinity(rows: list[list[float]], top_k: int = 1) -> Affinity:
    p = np.asarray(rows, dtype=float)
    return Affinity(
        {0: p}, {0: 0.0}, list(range(len(rows))), [f"c{i}" for i in range(len(rows))], top_k=top_k
    )


def test_coactivation_lists_the_experts_each_pair_of_contexts_shares():
    co = coactivation(affinity_of({1: CHAIN, 3: DISJOINT}))
    assert co.threshold == pytest.approx(2 / 6)  # uniform rate top_k / E
    assert co.active[1] == CHAIN
    assert co.shared[1] == {(0, 1): [1], (0, 2): [], (1, 2): [2]}
    assert co.shared[3] == {(0, 1): [], (0, 2): [], (1, 2): []}
    np.testing.assert_array_equal(co.counts(1), [[2, 1, 0], [1, 2, 1], [0, 1, 2]])
    assert co.to_dict()["layers"]["1"]["shared"]["C–S"] == [2]


def test_coactivation_threshold_is_a_selection_frequency():
    aff = matrix_affinity([[0.5, 0.3, 0.2], [0.45, 0.1, 0.45]])
    assert coactivation(aff, threshold=0.4).shared[0] == {(0, 1): [0]}
    assert coactivation(aff, threshold=0.25).shared[0] == {(0, 1): [0]}
    assert coactivation(aff, threshold=0.15).shared[0] == {(0, 1): [0, 2]}
    assert coactivation(aff).active[0] == [[0], [0, 2]]  # default 1/3
    with pytest.raises(ValueError, match="threshold must be in"):
        coactivation(aff, threshold=1.5)


def test_coactivation_series_tracks_the_overlap_over_checkpoints(tmp_path):
    series = [
        coactivation(affinity_of({1: p, 3: q})) for p, q in ((SAME, SAME), (CHAIN, SAME), (DISJOINT, CHAIN))
    ]
    traj = coactivation_series(series, ["1k", "2k", "3k"])
    assert traj["layers"]["1"] == {"D–C": [2, 1, 0], "D–S": [2, 0, 0], "C–S": [2, 1, 0]}
    assert traj["layers"]["3"]["C–S"] == [2, 2, 1]
    for path in (
        plot_coactivation(series[1], tmp_path / "co.png"),
        plot_coactivation_series(traj, tmp_path / "s.png"),
    ):
        with Image.open(path) as im:
            assert im.format == "PNG"
    with pytest.raises(ValueError, match="2 labels for 3 checkpoints"):
        coactivation_series(series, ["a", "b"])


def test_a_run_that_permutes_the_experts_aligns_perfectly_and_the_permutation_is_recovered(tmp_path):
    perm = [3, 5, 0, 4, 1, 2]  # expert e of the reference is expert perm[e] of the other run

    def relabel(pattern):
        return [[perm[e] for e in experts] for experts in pattern]

    ref = affinity_of({1: DISJOINT, 3: CHAIN})
    other = affinity_of({1: relabel(DISJOINT), 3: relabel(CHAIN)})
    same = affinity_of({1: DISJOINT, 3: CHAIN})
    result = align_affinities(ref, [other, same], labels=["seed 0", "seed 1", "seed 2"])
    assert result.agreement[1] == pytest.approx([1.0, 1.0]) and result.agreement[3] == pytest.approx(
        [1.0, 1.0]
    )
    assert result.unaligned[1][0] == pytest.approx(0.0)  # no context keeps an expert number
    assert result.permutation[3][0][:4].tolist() == perm[:4]  # the four experts the chain uses
    assert result.permutation[1][0].tolist() == perm
    np.testing.assert_array_equal(result.aligned[1][0], ref.probs[1])
    assert result.mean_agreement() == {1: pytest.approx(1.0), 3: pytest.approx(1.0)}
    assert result.to_dict()["runs"] == ["seed 1", "seed 2"]
    with Image.open(plot_seed_alignment(result, tmp_path / "seeds.png")) as im:
        assert im.format == "PNG" and im.size[1] > im.size[0] / 2  # three rows of two layers


def test_agreement_after_alignment_is_one_minus_the_mean_total_variation():
    ref = np.array([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]], dtype=float)
    # the third context now routes like the second: it keeps no expert of its own
    other = np.array([[0, 0, 0, 0, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=float)
    perm = match_experts(ref, other)
    assert affinity_agreement(ref, other[:, perm]) == pytest.approx(2 / 3)
    assert affinity_agreement(ref, ref) == 1.0
    assert affinity_agreement(ref, np.roll(ref, 1, axis=0)) == pytest.approx(0.0)  # contexts swapped


def test_seed_alignment_rejects_runs_on_other_contexts():
    ref = affinity_of({1: DISJOINT, 3: CHAIN})
    other = affinity_of({1: DISJOINT, 3: CHAIN}, contexts=(0, 1))
    with pytest.raises(ValueError, match="same contexts"):
        align_affinities(ref, [other])
    with pytest.raises(ValueError, match="at least one run"):
        align_affinities(ref, [])
