"""Boundary odsF / oisF / AP (SPEC §9): ground-truth boundaries, NMS, matching, pooling and the meter.

The protocol's tests run with every matcher (``MATCHERS``); the fast matchers' own tests are at the end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

pytest.importorskip("pyEdgeEval", reason="boundary evaluation needs the eval extra (pyEdgeEval)")

from prism_vfm.metrics import boundary  # noqa: E402
from prism_vfm.metrics.boundary import (  # noqa: E402
    MATCHERS,
    THRESHOLDS,
    BoundaryMeter,
    boundary_ground_truth,
    boundary_scores,
    count_boundaries,
    edge_logits_to_uint8,
    edge_nms,
    evaluate_boundaries,
    evaluate_edge_folder,
    image_counts,
    seg2bmap,
)
from prism_vfm.metrics.boundary_assignment import (  # noqa: E402
    OUTLIER_COST,
    OVERLAY_COST,
    _min_cost_perfect_matching,
    generator_state,
    k_of_n_rows,
    outlier_edges,
)
from prism_vfm.metrics.boundary_matching import (  # noqa: E402
    bsds_assignment_counts,
    maximum_matching_counts,
    thin_stack,
    tolerance_offsets,
)

PASCAL, NYUD = 0.0075, 0.011  # on 64 x 80 images: 0.77 px (exact position only) and 1.13 px
SIZE = (64, 80)
# The BSDS matcher routes unmatched pixels through a sparse random graph of outlier edges, which at times
# leaves a correct pixel or two unmatched (even between identical maps, in MATLAB as here): scores of exact
# predictions are checked to within this many points.
MATCHER_SLACK = 2.0


def rectangles() -> np.ndarray:
    """A label map with two nested rectangles, boundaries well inside the image."""
    labels = np.zeros(SIZE, dtype=np.int64)
    labels[12:52, 15:65] = 1
    labels[24:40, 30:50] = 2
    return labels


def as_edge(boundaries: np.ndarray) -> np.ndarray:
    return boundaries.astype(np.uint8) * 255


def scalars(scores: dict) -> dict:
    return {k: v for k, v in scores.items() if np.ndim(v) == 0}


def relabel_connected(labels: np.ndarray) -> np.ndarray:
    """SEISM's relabelling: every 4-connected region of every class gets its own id."""
    out = np.zeros(labels.shape, dtype=np.int64)
    next_id = 0
    for value in np.unique(labels):
        regions, count = ndimage.label(labels == value)
        out[regions > 0] = regions[regions > 0] + next_id
        next_id += count
    return out


def test_thresholds_are_the_99_hundredths_as_matlab_parses_them():
    assert THRESHOLDS.shape == (99,)
    np.testing.assert_array_equal(THRESHOLDS, [float(f"0.{k:02d}") for k in range(1, 100)])


def test_seg2bmap_marks_a_pixel_differing_from_its_east_south_or_south_east_neighbour():
    # Only the south-east neighbour differs at (0, 0); the last column compares south, the last row east.
    np.testing.assert_array_equal(seg2bmap(np.array([[1, 1], [1, 2]])), [[1, 1], [1, 0]])
    labels = np.array(
        [
            [1, 1, 2, 2],
            [1, 1, 2, 2],
            [3, 3, 3, 3],
        ]
    )
    expected = np.array(
        [
            [0, 1, 0, 0],
            [1, 1, 1, 1],
            [0, 0, 0, 0],
        ]
    )
    np.testing.assert_array_equal(seg2bmap(labels), expected)


def test_disconnected_regions_of_one_class_are_separated_only_where_another_label_lies_between():
    # Two class-1 regions that touch only diagonally at (1, 1)-(2, 2), likewise two class-2 regions.
    labels = np.array(
        [
            [1, 1, 2, 2],
            [1, 1, 2, 2],
            [2, 2, 1, 1],
            [2, 2, 1, 1],
        ]
    )
    expected = np.array(
        [
            [0, 1, 0, 0],
            [1, 1, 1, 1],
            [0, 1, 0, 0],
            [0, 1, 0, 0],
        ]
    )
    relabelled = relabel_connected(labels)
    assert len(np.unique(relabelled)) == 4
    np.testing.assert_array_equal(seg2bmap(relabelled), expected)
    np.testing.assert_array_equal(seg2bmap(labels), expected)


def test_connected_relabelling_never_changes_the_boundary_map():
    rng = np.random.default_rng(0)
    for _ in range(300):
        labels = rng.integers(0, rng.integers(2, 5), size=(9, 11))
        np.testing.assert_array_equal(seg2bmap(relabel_connected(labels)), seg2bmap(labels))


def test_ground_truth_is_thinned_and_a_bool_map_is_taken_as_boundaries():
    labels = rectangles()
    boundaries = boundary_ground_truth(labels)
    assert boundaries.dtype == bool
    # seg2bmap's corners are L-shaped; thinning cuts each to a diagonal step.
    assert boundaries.sum() < seg2bmap(labels).sum()
    np.testing.assert_array_equal(boundary_ground_truth(boundaries), boundaries)
    np.testing.assert_array_equal(boundary_ground_truth(seg2bmap(labels)), boundaries)


def test_nms_keeps_the_ridge_of_a_thick_edge_and_fades_the_image_border():
    edge = np.zeros(SIZE, dtype=np.uint8)
    edge[:, 38:43] = [100, 200, 255, 200, 100]
    suppressed = edge_nms(edge)
    assert suppressed.dtype == np.uint8
    assert np.flatnonzero(suppressed[SIZE[0] // 2]).tolist() == [40]
    assert not suppressed[0].any() and not suppressed[-1].any()
    assert 0 < suppressed[2, 40] < suppressed[SIZE[0] // 2, 40]


@pytest.mark.parametrize("matcher", MATCHERS)
def test_a_perfect_prediction_scores_100(matcher):
    labels = rectangles()
    boundaries = boundary_ground_truth(labels)
    scores = evaluate_boundaries([as_edge(boundaries)], [labels], PASCAL, workers=0, matcher=matcher)
    assert scores["odsF"] == pytest.approx(100.0, abs=MATCHER_SLACK)
    assert scores["oisF"] == pytest.approx(100.0, abs=MATCHER_SLACK)
    best = int(np.flatnonzero(THRESHOLDS == scores["odsThreshold"])[0])
    assert scores["total_pred"][best] == scores["total_gt"][best] == boundaries.sum()


@pytest.mark.parametrize("matcher", MATCHERS)
def test_a_one_pixel_shift_within_the_tolerance_still_scores_about_100(matcher):
    labels = rectangles()
    shifted = as_edge(np.roll(boundary_ground_truth(labels), 1, axis=1))
    nyud = evaluate_boundaries([shifted], [labels], NYUD, workers=0, matcher=matcher)
    assert nyud["odsF"] > 100.0 - 2 * MATCHER_SLACK
    # At PASCAL's tolerance (under a pixel here) the shifted vertical sides no longer match.
    assert evaluate_boundaries([shifted], [labels], PASCAL, workers=0, matcher=matcher)["odsF"] < 75.0


@pytest.mark.parametrize("matcher", MATCHERS)
def test_a_shift_far_beyond_the_tolerance_scores_0(matcher):
    ground_truth = np.zeros(SIZE, dtype=bool)
    ground_truth[10:54, 30] = True
    prediction = np.zeros(SIZE, dtype=np.uint8)
    prediction[10:54, 40] = 255
    scores = evaluate_boundaries([prediction], [ground_truth], NYUD, workers=0, matcher=matcher)
    assert scalars(scores) == pytest.approx({"odsF": 0.0, "oisF": 0.0, "AP": 0.0, "odsThreshold": 0.01})


@pytest.mark.parametrize("matcher", MATCHERS)
def test_an_empty_prediction_scores_0_without_nan(matcher):
    labels = rectangles()
    blank = np.zeros(SIZE, dtype=np.uint8)
    scores = evaluate_boundaries([blank], [labels], PASCAL, workers=0, matcher=matcher)
    assert scalars(scores) == pytest.approx({"odsF": 0.0, "oisF": 0.0, "AP": 0.0, "odsThreshold": 0.01})
    assert scores["matched_pred"].sum() == 0 and scores["total_pred"].sum() == 0
    assert (scores["total_gt"] == boundary_ground_truth(labels).sum()).all()


@pytest.mark.parametrize("matcher", MATCHERS)
def test_half_the_prediction_on_half_the_ground_truth_gives_precision_recall_and_f_of_one_half(matcher):
    # Two 44-pixel ground-truth segments; one predicted exactly, the other predicted 20 px away.
    ground_truth = np.zeros(SIZE, dtype=bool)
    ground_truth[10:54, 20] = ground_truth[10:54, 40] = True
    prediction = np.zeros(SIZE, dtype=np.uint8)
    prediction[10:54, 20] = prediction[10:54, 60] = 255
    counts = image_counts(prediction, ground_truth, PASCAL, matcher)
    at = int(np.flatnonzero(THRESHOLDS == 0.2)[0])
    matched_gt, total_gt, matched_pred, total_pred = counts[:, at]
    assert (total_gt, total_pred) == (88, 88) and matched_gt == matched_pred and 43 <= matched_gt <= 44
    # Below 0.13 the smoothed segment ends (32/255) survive NMS too: 4 more, unmatched, predicted pixels.
    assert counts[3, 0] == 92
    scores = boundary_scores(counts[None])
    assert scores["odsF"] == pytest.approx(50.0, abs=MATCHER_SLACK / 2)
    assert scores["oisF"] == pytest.approx(50.0, abs=MATCHER_SLACK / 2)


def test_an_image_without_ground_truth_counts_its_predictions_as_false_positives():
    labels = rectangles()
    perfect = as_edge(boundary_ground_truth(labels))
    blank = np.zeros(SIZE, dtype=np.int64)
    alone = evaluate_boundaries([perfect], [blank], PASCAL, workers=0)
    assert alone["odsF"] == 0.0 and alone["total_gt"].sum() == 0
    pooled = evaluate_boundaries([perfect, perfect], [labels, blank], PASCAL, workers=0)
    assert pooled["odsF"] == pytest.approx(100 * 2 * 0.5 / 1.5, abs=MATCHER_SLACK)  # precision 1/2, recall 1


def test_pooled_scores_differ_from_a_mean_of_per_image_scores():
    labels = rectangles()
    perfect = as_edge(boundary_ground_truth(labels))
    small = np.zeros(SIZE, dtype=np.int64)
    small[30:34, 30:34] = 1
    counts = count_boundaries([perfect, np.zeros(SIZE, np.uint8)], [labels, small], PASCAL, workers=0)
    pooled = boundary_scores(counts)["odsF"]
    mean = (boundary_scores(counts[:1])["odsF"] + boundary_scores(counts[1:])["odsF"]) / 2
    assert pooled > 90.0 and mean == pytest.approx(50.0, abs=MATCHER_SLACK)


def test_ods_ois_and_ap_follow_seism_on_hand_made_counts():
    # Image A is right below threshold 0.5 and predicts nothing above; image B over-predicts below.
    low = THRESHOLDS < 0.505
    a = np.where(low, [[10], [10], [10], [10]], [[0], [10], [0], [0]])
    b = np.where(low, [[10], [10], [10], [40]], [[10], [10], [10], [10]])
    scores = boundary_scores(np.stack([a, b]))
    # Pooled: below, recall 1 and precision 20/50 (F 4/7); above, recall 1/2 and precision 1 (F 2/3).
    assert scores["odsF"] == pytest.approx(100 * 2 / 3)
    assert scores["odsThreshold"] == 0.51
    # Each image at its own best threshold is perfect.
    assert scores["oisF"] == pytest.approx(100.0)
    # Precision interpolated between (recall 1/2, precision 1) and (1, 0.4) at recall 0.50, 0.51, ..., 1.00,
    # summed and divided by 100: sum_i (1 - 0.012 i) / 100 over i = 0..50.
    assert scores["AP"] == pytest.approx(35.7)
    np.testing.assert_array_equal(scores["total_pred"], np.where(low, 50, 10))


def noisy_images(count: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    edges, labels = [], []
    for _ in range(count):
        label = ndimage.zoom(rng.integers(0, 3, size=(4, 5)), 16, order=0)
        soft = ndimage.gaussian_filter(seg2bmap(label).astype(float), 1.0) * 3
        soft += 0.3 * ndimage.gaussian_filter(rng.random(SIZE), 2.0)
        edges.append((np.clip(soft, 0, 1) * 255).astype(np.uint8))
        labels.append(label)
    return edges, labels


@pytest.mark.parametrize("matcher", MATCHERS)
def test_parallel_and_single_process_counts_are_identical(matcher):
    edges, labels = noisy_images(4, seed=1)
    single = count_boundaries(edges, labels, NYUD, workers=0, progress=False, matcher=matcher)
    parallel = count_boundaries(edges, labels, NYUD, workers=2, progress=False, matcher=matcher)
    np.testing.assert_array_equal(single, parallel)
    assert single[:, 3].sum() > 0 and (single[:, 0] <= single[:, 1]).all()


def test_logits_become_truncated_uint8_cropped_from_the_centred_padding():
    # 4 x 6 content centred in 7 x 9: margins 1 / 2 rows and 1 / 2 columns (extra at bottom / right).
    logits = torch.full((1, 1, 7, 9), -20.0)
    logits[0, 0, 1:5, 1:7] = torch.logit(torch.tensor(127.9 / 255))
    (edge,) = edge_logits_to_uint8(logits, [(4, 6)])
    assert edge.dtype == np.uint8 and edge.shape == (4, 6)
    assert (edge == 127).all()


def test_meter_streams_updates_and_evaluates_each_image_once():
    labels = rectangles()
    boundaries = boundary_ground_truth(labels)
    logits = torch.full((2, 1, 70, 84), -20.0)  # padded: margins 3 rows and 2 columns
    logits[:, 0, 3:67, 2:82] = torch.from_numpy(np.where(boundaries, 20.0, -20.0))
    meter = BoundaryMeter("nyud", workers=0, progress=False)
    meter.update(logits[:1], [torch.from_numpy(labels)], [SIZE])
    assert len(meter.pending) == 1 and meter.pending[0][1].dtype == bool
    assert meter.compute()["odsF"] == pytest.approx(100.0, abs=MATCHER_SLACK)
    meter.update(logits[1:], [boundaries], [SIZE])
    assert meter.counts.shape == (1, 4, 99) and len(meter.pending) == 1
    scores = meter.compute()
    assert meter.counts.shape == (2, 4, 99) and not meter.pending
    assert scores["odsF"] == pytest.approx(100.0, abs=MATCHER_SLACK)
    np.testing.assert_array_equal(meter.counts[0], meter.counts[1])
    meter.reset()
    assert meter.counts.shape == (0, 4, 99) and meter.compute()["odsF"] == 0.0


def test_meter_rejects_a_ground_truth_of_another_size_and_an_unknown_dataset():
    meter = BoundaryMeter("pascal", workers=0, progress=False)
    with pytest.raises(ValueError, match="original size"):
        meter.update(torch.zeros(1, 1, 64, 80), [np.zeros((60, 80), dtype=np.int64)], [SIZE])
    with pytest.raises(ValueError, match="unknown dataset"):
        BoundaryMeter("cityscapes")


def test_a_folder_of_edge_pngs_scores_like_the_arrays(tmp_path):
    edges, labels = noisy_images(2, seed=2)
    for i, edge in enumerate(edges):
        Image.fromarray(edge).save(tmp_path / f"img{i}.png")
    by_id = {f"img{i}": label for i, label in enumerate(labels)}
    from_folder = evaluate_edge_folder(tmp_path, by_id.__getitem__, "nyud", workers=0, progress=False)
    from_arrays = evaluate_boundaries(edges, labels, NYUD, workers=0, progress=False)
    for key in ("matched_gt", "total_gt", "matched_pred", "total_pred"):
        np.testing.assert_array_equal(from_folder[key], from_arrays[key])
    assert from_folder["odsF"] == from_arrays["odsF"]


# The fast matchers (boundary_matching.py, boundary_assignment.py).


def test_thinning_a_stack_equals_scikit_image_thin_map_by_map():
    rng = np.random.default_rng(0)
    for trial in range(60):
        shape = (5, *rng.integers(3, 24, size=2))
        maps = rng.random(shape) < rng.uniform(0.1, 0.9)
        if trial % 2:  # thick blobs take several iterations to thin
            maps = ndimage.binary_dilation(maps, iterations=2) & (rng.random(shape) < 0.95)
        thinned = thin_stack(maps)
        for k in range(shape[0]):
            np.testing.assert_array_equal(thinned[k], boundary.thin(maps[k]))


def test_tolerance_offsets_include_pixels_exactly_at_the_tolerance():
    # 300 x 400: diagonal 500, so 0.01 of it is exactly 5 pixels.
    offsets = {tuple(o) for o in tolerance_offsets((300, 400), 0.01).tolist()}
    assert {(0, 5), (5, 0), (3, 4), (-4, -3), (0, 0)} <= offsets
    assert (4, 4) not in offsets and (1, 5) not in offsets  # 32 and 26 > 25
    assert len(offsets) == 81  # the lattice points of a disc of radius 5


def points(shape: tuple[int, int], *coordinates: tuple[int, int]) -> np.ndarray:
    image = np.zeros(shape, dtype=bool)
    for y, x in coordinates:
        image[y, x] = True
    return image


def bsds_matched(prediction: np.ndarray, ground_truth: np.ndarray, ratio: float, seed: int = 1) -> int:
    boundary._reseed_matcher(seed)
    _, matched_gt, _, _ = boundary.pyedgeeval().correspond_pixels(prediction, ground_truth, max_dist=ratio)
    return int((matched_gt > 0).sum())


HAND_MADE = {
    # name: (shape, ratio, predicted pixels, ground-truth pixels, size of a maximum matching)
    "empty prediction": (SIZE, NYUD, [], [(10, 10), (20, 20)], 0),
    "empty ground truth": (SIZE, NYUD, [(10, 10)], [], 0),
    "both empty": (SIZE, NYUD, [], [], 0),
    "two predictions tie for one pixel": (SIZE, NYUD, [(10, 9), (10, 11)], [(10, 10)], 1),
    "one prediction between two pixels": (SIZE, NYUD, [(10, 11)], [(10, 10), (10, 12)], 1),
    # The nearest choice for (10, 11) is either neighbour; only (10, 10) leaves (10, 12) to (10, 13).
    "an augmenting path": (SIZE, NYUD, [(10, 11), (10, 13)], [(10, 10), (10, 12)], 2),
    "three predictions, two pixels": (SIZE, NYUD, [(9, 10), (10, 10), (11, 10)], [(10, 10), (10, 11)], 2),
    "exactly at the tolerance": ((300, 400), 0.01, [(100, 100), (200, 205)], [(103, 104), (200, 200)], 2),
    "just beyond the tolerance": ((300, 400), 0.01, [(100, 100), (200, 206)], [(101, 105), (200, 200)], 0),
}


@pytest.mark.parametrize("case", list(HAND_MADE))
def test_fast_matchers_find_the_maximum_matching_of_hand_made_cases_as_the_bsds_matcher(case):
    shape, ratio, predicted, truth, expected = HAND_MADE[case]
    prediction, ground_truth = points(shape, *predicted), points(shape, *truth)
    assert maximum_matching_counts(prediction[None], ground_truth, ratio).tolist() == [expected]
    assert bsds_assignment_counts(prediction[None], ground_truth, ratio, seed=1).tolist() == [expected]
    assert bsds_matched(prediction, ground_truth, ratio) == expected


def kuhn_matching(prediction: np.ndarray, ground_truth: np.ndarray, ratio: float) -> int:
    """A maximum matching by plain augmenting paths over explicit distances: the test's own oracle."""
    h, w = prediction.shape
    limit = (ratio * np.sqrt(h * h + w * w)) ** 2
    gt = np.argwhere(ground_truth)
    pred = np.argwhere(prediction)
    near = [np.flatnonzero(((pred - g) ** 2).sum(axis=1) <= limit) for g in gt]
    owner = {}

    def augment(i: int, seen: set) -> bool:
        for j in near[i]:
            if j not in seen:
                seen.add(j)
                if j not in owner or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return sum(augment(i, set()) for i in range(len(gt)))


def test_fast_matcher_equals_a_plain_augmenting_path_matching_on_random_pixels():
    rng = np.random.default_rng(3)
    for _ in range(20):
        shape = (24, 30)
        predictions = rng.random((3, *shape)) < rng.uniform(0.02, 0.3)
        ground_truth = rng.random(shape) < rng.uniform(0.02, 0.3)
        ratio = rng.choice([PASCAL, NYUD, 0.05])
        counts = maximum_matching_counts(predictions, ground_truth, ratio)
        assert counts.tolist() == [kuhn_matching(p, ground_truth, ratio) for p in predictions]


@pytest.mark.parametrize("matcher", ["fast", "maximum"])
def test_fast_counts_are_each_thresholds_thinned_map_matched_on_its_own(matcher):
    edges, labels = noisy_images(2, seed=4)
    for edge, label in zip(edges, labels, strict=True):
        counts = image_counts(edge, label, NYUD, matcher)
        gt = boundary_ground_truth(label)
        levels = edge_nms(edge).astype(np.float64) / 255
        for k in range(0, len(THRESHOLDS), 7):
            pred = boundary.thin(levels >= THRESHOLDS[k])
            if matcher == "fast":
                matched = bsds_assignment_counts(pred[None], gt, NYUD, boundary.MATCHER_SEED)[0]
            else:
                matched = maximum_matching_counts(pred[None], gt, NYUD)[0]
            assert counts[:, k].tolist() == [matched, gt.sum(), matched, pred.sum()]


@pytest.mark.parametrize("ratio", [PASCAL, NYUD])
def test_fast_counts_equal_the_bsds_matchers_and_maximum_ones_exceed_them_by_a_pixel_or_two(ratio):
    edges, labels = noisy_images(4, seed=5)
    fast = count_boundaries(edges, labels, ratio, workers=0, progress=False, matcher="fast")
    maximum = count_boundaries(edges, labels, ratio, workers=0, progress=False, matcher="maximum")
    bsds = count_boundaries(edges, labels, ratio, workers=0, progress=False, matcher="bsds")
    np.testing.assert_array_equal(fast, bsds)
    # Same maps, same totals; a maximum matching is never smaller than the BSDS matcher's assignment, and
    # the BSDS matcher's random outlier graph leaves at most a pixel or two more unmatched (here, with a
    # few hundred pixels per map, on about a third of the thresholds).
    np.testing.assert_array_equal(maximum[:, [1, 3]], bsds[:, [1, 3]])
    np.testing.assert_array_equal(maximum[:, 0], maximum[:, 2])
    gap = maximum[:, [0, 2]] - bsds[:, [0, 2]]
    assert gap.min() >= 0 and gap.max() <= 2
    for key in ("odsF", "oisF"):
        assert boundary_scores(maximum)[key] == pytest.approx(boundary_scores(bsds)[key], abs=0.5)


def bsds_library() -> tuple:
    """pyEdgeEval's compiled generator and ``kOfN``, or a skip where their symbols are not exported."""
    import ctypes
    import sys

    library = ctypes.CDLL(sys.modules[boundary.pyedgeeval().correspond_pixels.__module__].__file__)
    try:
        generator = ctypes.addressof(ctypes.c_char.in_dll(library, "_ZN6Random4randE"))
        reseed, k_of_n = library._ZN6Random6reseedEm, library._Z4kOfNiiPi
    except (AttributeError, ValueError):
        pytest.skip("pyEdgeEval's extension does not export its generator under GCC's names")
    reseed.argtypes, reseed.restype = [ctypes.c_void_p, ctypes.c_uint64], None
    k_of_n.argtypes, k_of_n.restype = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p], None
    return generator, reseed, k_of_n


@pytest.mark.parametrize("seed", [1, 2, 12345])
def test_k_of_n_draws_what_the_bsds_matchers_compiled_sampler_draws(seed):
    generator, reseed, k_of_n = bsds_library()
    # Both samplers (the halving one for k log2 k < n // 2, the sequential one otherwise), at their edges.
    for k, n in [
        (6, 5000),
        (6, 32),
        (6, 31),
        (6, 6),
        (5, 24),
        (5, 23),
        (2, 6),
        (2, 5),
        (1, 1),
        (1, 7),
        (0, 4),
    ]:
        reseed(generator, seed)
        expected = np.zeros((53, max(k, 1)), dtype=np.int32)
        for row in expected:
            k_of_n(k, n, row.ctypes.data)
        state = generator_state(seed)
        np.testing.assert_array_equal(k_of_n_rows(k, n, 50, state), expected[:50, :k])
        # The state goes on from where those draws left it.
        np.testing.assert_array_equal(k_of_n_rows(k, n, 3, state), expected[50:, :k])


def test_outlier_graph_has_the_bsds_degrees_and_no_pixel_to_its_own_outlier_node():
    n1, n2 = 40, 25
    left, right = outlier_edges(n1, n2, seed=1)
    first, second, third = slice(0, 6 * n1), slice(6 * n1, 6 * (n1 + n2)), slice(6 * (n1 + n2), None)
    assert len(left) == 6 * n1 + 6 * n2 + 6 * max(n1, n2)
    # Predicted pixel i to 6 distinct outlier nodes n2 + j, j != i.
    assert (np.bincount(left[first], minlength=n1) == 6).all() and (right[first] - n2 != left[first]).all()
    assert len(set(zip(left[first].tolist(), right[first].tolist(), strict=True))) == 6 * n1
    # Ground-truth pixel j from 6 distinct outlier nodes n1 + i, i != j.
    assert (np.bincount(right[second], minlength=n2) == 6).all() and (
        left[second] - n1 != right[second]
    ).all()
    # Every outlier node of the larger side (here the predicted pixels', n2 + i) to 6 of the smaller.
    assert (np.bincount(right[third] - n2, minlength=n1) == 6).all()
    assert ((left[third] >= n1) & (left[third] < n1 + n2)).all()
    again = outlier_edges(n1, n2, seed=1)
    other = outlier_edges(n1, n2, seed=2)
    assert np.array_equal(left, again[0]) and np.array_equal(right, again[1])
    assert not np.array_equal(right, other[1])


def test_min_cost_perfect_matching_agrees_with_scipy_on_random_graphs():
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(11)
    for _ in range(40):
        n = int(rng.integers(1, 30))
        costs = rng.choice([0, OUTLIER_COST, OVERLAY_COST], size=(n, n), p=[0.15, 0.25, 0.6])
        present = rng.random((n, n)) < rng.uniform(0.1, 0.5)
        np.fill_diagonal(present, True)  # a perfect matching exists, as the overlay makes sure
        rows, cols = np.nonzero(present)
        indptr = np.concatenate([[0], np.cumsum(present.sum(axis=1))])
        match = _min_cost_perfect_matching(
            indptr, cols.astype(np.int64), costs[rows, cols].astype(np.int64), n
        )
        assert sorted(match.tolist()) == list(range(n))
        assert present[np.arange(n), match].all()
        dense = np.where(present, costs, 10**6)
        best = dense[linear_sum_assignment(dense)].sum()
        assert costs[np.arange(n), match].sum() == best


def random_boundaries(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A thinned map of random curves."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), rng.uniform(1.5, 4))
    return boundary.thin(seg2bmap(field > rng.uniform(-0.2, 0.2)))


def near_copies(rng: np.random.Generator, truth: np.ndarray, k: int) -> np.ndarray:
    """``k`` thinned predictions of ``truth``: shifted by a pixel, some pixels lost, specks added."""
    maps = np.zeros((k, *truth.shape), dtype=bool)
    for i in range(k):
        moved = np.roll(truth, tuple(rng.integers(-1, 2, size=2)), axis=(0, 1))
        noisy = (moved & (rng.random(truth.shape) > rng.uniform(0, 0.1))) | (rng.random(truth.shape) < 0.01)
        maps[i] = boundary.thin(noisy)
    return maps


@pytest.mark.parametrize("seed", [1, 2, 7])
def test_fast_counts_equal_the_bsds_matchers_with_the_same_seed_on_random_boundaries(seed):
    rng = np.random.default_rng(seed)
    deficits = 0
    for trial in range(6):
        shape = (int(rng.integers(60, 120)), int(rng.integers(60, 120)))
        ratio = [PASCAL, NYUD, 0.02][trial % 3]
        ground_truth = random_boundaries(rng, shape)
        predictions = near_copies(rng, ground_truth, 3)
        counts = bsds_assignment_counts(predictions, ground_truth, ratio, seed)
        expected = [bsds_matched(p, ground_truth, ratio, seed) for p in predictions]
        assert counts.tolist() == expected
        deficits += int((maximum_matching_counts(predictions, ground_truth, ratio) > counts).sum())
    assert deficits > 0  # cases where the random outlier graph keeps the BSDS matcher below the maximum


def test_fast_counts_are_deterministic():  # and the same for every order of the images
    edges, labels = noisy_images(2, seed=6)
    first = count_boundaries(edges, labels, PASCAL, workers=0, progress=False)
    again = count_boundaries(edges[::-1], labels[::-1], PASCAL, workers=0, progress=False)[::-1]
    np.testing.assert_array_equal(first, again)


def test_an_unknown_matcher_is_an_error_naming_it():
    edges, labels = noisy_images(1, seed=7)
    with pytest.raises(ValueError, match="'hungarian'"):
        image_counts(edges[0], labels[0], PASCAL, matcher="hungarian")
    with pytest.raises(ValueError, match="'csa'"):
        BoundaryMeter("pascal", matcher="csa")


def test_scores_of_a_coarser_threshold_grid():
    edges, labels = noisy_images(2, seed=8)
    counts = count_boundaries(edges, labels, NYUD, workers=0, progress=False)
    every_tenth = np.arange(9, 99, 10)
    coarse = boundary_scores(counts[:, :, every_tenth], THRESHOLDS[every_tenth])
    assert coarse["odsThreshold"] in THRESHOLDS[every_tenth]
    assert coarse["odsF"] <= boundary_scores(counts)["odsF"]
    with pytest.raises(ValueError, match="counts must be"):
        boundary_scores(counts[:, :, every_tenth])


def test_the_fast_matcher_without_numba_names_the_extra(monkeypatch):
    import sys

    from prism_vfm.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "prism_vfm.metrics.boundary_assignment", None)  # as if not importable
    prediction = points(SIZE, (10, 10))
    with pytest.raises(MissingExtraError, match=r"numba: pip install 'prism-vfm\[eval\]'"):
        bsds_assignment_counts(prediction[None], prediction, NYUD, seed=1)
    with pytest.raises(MissingExtraError, match="numba"):
        BoundaryMeter("nyud")
    BoundaryMeter("nyud", matcher="maximum")  # the other matchers do not need it
