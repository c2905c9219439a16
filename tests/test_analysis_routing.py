"""Routing affinity, its separation score and the λ statistics on students with hand-set routers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from prism_vfm import PrismMultiTask
from prism_vfm.analysis import (
    Affinity,
    gate_statistics,
    gate_trajectory,
    normalized_mutual_information,
    plot_affinity,
    plot_gate_trajectory,
    plot_gates,
    routing_affinity,
)
from tests.analysis_models import ANALYSIS_TINY, analysis_student, image_batches, route_by_context, set_lambda
from tests.tiny import TINY

DISJOINT = [[0, 1], [2, 3], [4, 5]]
SAME = [[0, 1], [0, 1], [0, 1]]
CHAIN = [[0, 1], [1, 2], [2, 3]]


def one_hot_rows(pattern, n_experts=6):
    out = np.zeros((len(pattern), n_experts))
    for c, experts in enumerate(pattern):
        out[c, experts] = 1.0
    return out


def test_affinity_is_the_selection_frequency_and_separation_the_normalised_mi():
    model = route_by_context(analysis_student(), {1: DISJOINT, 3: CHAIN})
    aff = routing_affinity(model, image_batches(), [0, 1, 2])
    assert aff.layers == [1, 3] and aff.top_k == 2
    np.testing.assert_array_equal(aff.probs[1], one_hot_rows(DISJOINT))
    np.testing.assert_array_equal(aff.probs[3], one_hot_rows(CHAIN))
    np.testing.assert_allclose(aff.probs[3].sum(1), 2.0)  # rows sum to top_k
    np.testing.assert_allclose(aff.shares(3).sum(1), 1.0)
    assert aff.separation[1] == pytest.approx(1.0)
    # I(C;E) = ln3/3 + (2/3)·ln(3/2) for the chain, H(C) = ln 3 < H(E).
    assert aff.separation[3] == pytest.approx(1 / 3 + (2 / 3) * math.log(1.5) / math.log(3), abs=1e-9)
    assert aff.tokens[1] == 2 * 3 * (1 + 16)  # two batches of three images, CLS + 4x4 patches
    assert aff.context_names == ["teacher 0", "teacher 1", "teacher 2"]


def test_contexts_that_route_alike_have_zero_separation_and_a_subset_of_contexts_works():
    model = route_by_context(analysis_student(), {1: SAME, 3: DISJOINT})
    aff = routing_affinity(model, image_batches(1), [2, 0], context_names=["SAM", "DINOv2"])
    assert aff.separation[1] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_array_equal(aff.probs[3], one_hot_rows([DISJOINT[2], DISJOINT[0]]))
    assert aff.contexts == [2, 0] and aff.context_names == ["SAM", "DINOv2"]


def test_normalised_mutual_information_edge_cases():
    assert normalized_mutual_information(np.eye(4)) == pytest.approx(1.0)
    assert normalized_mutual_information(np.ones((3, 5))) == pytest.approx(0.0)
    assert normalized_mutual_information(np.zeros((2, 3))) == 0.0
    assert normalized_mutual_information(np.array([[5.0, 0, 0]])) == 0.0  # a single context


def test_task_contexts_of_a_multitask_model_use_its_student_and_task_names():
    tasks = {"semseg": 3, "normals": 3}
    model = PrismMultiTask({**TINY, **ANALYSIS_TINY}, tasks).eval()
    route_by_context(model.student, {1: [[4, 5], [0, 2]], 3: [[1, 3], [1, 3]]}, kind="task")
    aff = routing_affinity(model, image_batches(1), [0, 1], kind="task")
    assert aff.context_names == ["semseg", "normals"] and aff.kind == "task"
    np.testing.assert_array_equal(aff.probs[1], one_hot_rows([[4, 5], [0, 2]]))
    assert aff.separation[1] == pytest.approx(1.0) and aff.separation[3] == pytest.approx(0.0, abs=1e-12)


def test_affinity_restores_training_mode_and_round_trips_through_json():
    model = route_by_context(analysis_student(), {1: DISJOINT, 3: CHAIN}).train()
    aff = routing_affinity(model, image_batches(1), [0, 1, 2])
    assert model.training  # evaluated in eval mode (clean routing), then put back
    np.testing.assert_array_equal(aff.probs[1], one_hot_rows(DISJOINT))  # no dropout/noise in the counts
    back = Affinity.from_dict(aff.to_dict())
    np.testing.assert_allclose(back.probs[3], aff.probs[3])
    assert back.separation == aff.separation and back.context_names == aff.context_names


def test_bad_inputs_name_the_value_and_what_was_expected():
    model = analysis_student()
    with pytest.raises(ValueError, match=r"unknown teacher context id\(s\) \[3\].*0\.\.2"):
        routing_affinity(model, image_batches(1), [0, 3])
    with pytest.raises(ValueError, match="no task contexts"):
        routing_affinity(model, image_batches(1), [0], kind="task")
    with pytest.raises(ValueError, match="no dual-stream"):
        routing_affinity(analysis_student(moe_layers=(), tap_layers=(3,)), image_batches(1), [0])
    with pytest.raises(ValueError, match="none up to its last feature tap"):  # block 3 never runs
        routing_affinity(analysis_student(moe_layers=(3,), tap_layers=(1,)), image_batches(1), [0])
    with pytest.raises(ValueError, match="no batches"):
        routing_affinity(model, [], [0])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        routing_affinity(model, [np.zeros((3, 32, 32))], [0])
    with pytest.raises(ValueError, match="2 context names"):
        routing_affinity(model, image_batches(1), [0, 1, 2], context_names=["a", "b"])


def test_gate_statistics_recover_a_hand_set_lambda_per_layer():
    model = set_lambda(analysis_student(), {1: 0.75, 3: 0.875})
    gates = gate_statistics(model, image_batches(), [0, 1, 2])
    np.testing.assert_allclose(gates.mean[1], [0.75] * 3, atol=1e-6)
    np.testing.assert_allclose(gates.mean[3], [0.875] * 3, atol=1e-6)
    np.testing.assert_allclose(gates.std[3], 0.0, atol=1e-6)
    assert all(s.size == 2 * 3 * 17 for s in gates.samples[1])
    summary = gates.to_dict()["layers"]["3"]["teacher 1"]
    assert summary["mean"] == pytest.approx(0.875, abs=1e-6)
    assert summary["quartiles"] == pytest.approx([0.875] * 3, abs=1e-6)


def test_gate_samples_are_capped_and_the_trajectory_follows_the_checkpoints():
    early = set_lambda(analysis_student(), {1: 0.9, 3: 0.95})
    late = set_lambda(analysis_student(), {1: 0.6, 3: 0.7})
    series = [gate_statistics(m, image_batches(1), [0, 2], max_samples=10) for m in (early, late)]
    assert all(s.size == 10 for s in series[0].samples[1])
    traj = gate_trajectory(series, ["step 10", "step 20"])
    assert traj["labels"] == ["step 10", "step 20"]
    assert traj["layers"]["1"]["teacher 2"] == pytest.approx([0.9, 0.6], abs=1e-6)
    assert traj["layers"]["3"]["teacher 0"] == pytest.approx([0.95, 0.7], abs=1e-6)
    with pytest.raises(ValueError, match="1 labels for 2 checkpoints"):
        gate_trajectory(series, ["only"])


def test_plots_are_png_figures_with_one_panel_per_layer(tmp_path):
    model = set_lambda(route_by_context(analysis_student(), {1: DISJOINT, 3: CHAIN}), {1: 0.8, 3: 0.6})
    aff = routing_affinity(model, image_batches(1), [0, 1, 2])
    gates = gate_statistics(model, image_batches(1), [0, 1, 2])
    paths = [
        plot_affinity(aff, tmp_path / "affinity.png", context_names=["DINOv2", "CLIP", "SAM"]),
        plot_gates(gates, tmp_path / "gates.png"),
        plot_gate_trajectory(gate_trajectory([gates, gates], ["a", "b"]), tmp_path / "sub" / "traj.png"),
    ]
    for path in paths:
        with Image.open(path) as im:
            assert im.format == "PNG"
            width, height = im.size
            assert width > 2 * height  # two layer panels side by side


def test_blocks_without_anchor_report_lambda_zero_and_still_route(tmp_path):
    model = analysis_student(anchor=False, conditioning="none")
    gates = gate_statistics(model, image_batches(1), [0, 1])
    np.testing.assert_array_equal(gates.mean[1], [0.0, 0.0])
    plot_gates(gates, tmp_path / "gates.png")
    aff = routing_affinity(model, image_batches(1), [0, 1])
    assert aff.separation[1] == pytest.approx(0.0, abs=1e-12)  # a router that ignores the context
    np.testing.assert_allclose(aff.probs[3].sum(1), 2.0)
