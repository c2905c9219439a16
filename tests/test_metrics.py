"""Pixel evaluation meters, head-output conversion and Δm, pinned to the official values (SPEC §9)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from prism_vfm.data.labels import add_ignore_regions
from prism_vfm.data.registry import get_dataset
from prism_vfm.metrics.dense import (
    DepthMeter,
    EdgeLossMeter,
    NormalsMeter,
    SaliencyMeter,
    SegmentationMeter,
)
from prism_vfm.metrics.multitask import (
    MultiTaskMeter,
    delta_m,
    prediction_for_metric,
)

DATASETS = ("pascalcontext", "nyud")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SCORE_TOL = 1e-4


@pytest.fixture(scope="module")
def official(fixture_dir):
    folder = fixture_dir("task_losses_and_metrics")
    return load_file(folder / "inputs.safetensors"), json.loads((folder / "reference.json").read_text())


def run_official_protocol(tensors, reference, dataset, device="cpu", label_kind="label"):
    """Feed the fixture to a MultiTaskMeter in the fixture's update slices, labels as ``label_kind``."""
    spec = reference[dataset]["metrics"]
    tasks = list(spec["scores"])
    meter = MultiTaskMeter(dataset, tasks)
    for start, stop in spec["update_calls"]:
        meter.update(
            {t: tensors[f"{dataset}.pred.{t}"][start:stop].to(device) for t in tasks},
            {t: tensors[f"{dataset}.{label_kind}.{t}"][start:stop].to(device) for t in tasks},
        )
    return meter


def assert_sum_close(actual: torch.Tensor, expected: float, count: float) -> None:
    """Float sums: the official meter adds float32 per-batch sums, ours adds in float64. Allowing the
    score tolerance per pixel (sum / count within 1e-4) is what the score comparison implies."""
    assert abs(actual.item() - expected) <= SCORE_TOL * count, (actual.item(), expected)


# --- official values ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dataset", DATASETS)
def test_scores_match_official(official, dataset, device):
    tensors, reference = official
    scores = run_official_protocol(tensors, reference, dataset, device).compute()
    expected = reference[dataset]["metrics"]["scores"]
    assert set(scores) == set(expected)
    for task, task_scores in expected.items():
        assert set(scores[task]) == set(task_scores), task
        for name, value in task_scores.items():
            assert abs(scores[task][name] - value) <= SCORE_TOL, (task, name, scores[task][name], value)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dataset", DATASETS)
def test_accumulators_match_official(official, dataset, device):
    tensors, reference = official
    meters = run_official_protocol(tensors, reference, dataset, device).meters
    expected = reference[dataset]["metrics"]["accumulators"]
    semseg = meters["semseg"]
    assert [semseg.tp.tolist(), semseg.fp.tolist(), semseg.fn.tolist()] == expected["semseg"]
    normals = meters["normals"]
    assert normals.count.item() == expected["normals"][1]
    assert_sum_close(normals.sum_degrees, expected["normals"][0], expected["normals"][1])
    edge = meters["edge"]
    assert edge.count.item() == expected["edge"][1]
    assert_sum_close(edge.loss_sum, expected["edge"][0], expected["edge"][1])
    if dataset == "pascalcontext":
        parts = meters["human_parts"]
        assert parts.tp.tolist() == expected["human_parts"]["tp"]
        assert parts.fp.tolist() == expected["human_parts"]["fp"]
        assert parts.fn.tolist() == expected["human_parts"]["fn"]
        sal = meters["sal"]
        tp, pp, ap = expected["sal"]
        assert sal.true_positives.tolist() == tp
        assert sal.predicted_positives.tolist() == pp
        assert [sal.actual_positives.item()] * len(tp) == ap
    else:
        depth = meters["depth"]
        assert depth.count.item() == expected["depth"][1]
        assert_sum_close(depth.sum_squared_error, expected["depth"][0], expected["depth"][1])


def test_human_parts_miou_without_ignore_regions_matches_official_contrast(official):
    tensors, reference = official
    spec = reference["pascalcontext"]["metrics"]
    for label_kind, expected in (
        (
            "label_raw",
            reference["pascalcontext"]["contrast_human_parts_mIoU_without_AddIgnoreRegions"]["mIoU"],
        ),
        ("label", spec["scores"]["human_parts"]["mIoU"]),
    ):
        meter = SegmentationMeter(7, task="human_parts")
        for start, stop in spec["update_calls"]:
            raw = tensors["pascalcontext.pred.human_parts"][start:stop]
            meter.update(
                prediction_for_metric("human_parts", raw),
                tensors[f"pascalcontext.{label_kind}.human_parts"][start:stop],
            )
        assert abs(meter.compute()["mIoU"] - expected) <= SCORE_TOL, label_kind


@pytest.mark.parametrize("dataset", DATASETS)
def test_meters_on_labels_from_add_ignore_regions_match_official(official, dataset):
    tensors, reference = official
    piped = {
        f"{dataset}.piped.{task}": add_ignore_regions(task, tensors[f"{dataset}.label_raw.{task}"])
        for task in reference[dataset]["metrics"]["scores"]
    }
    scores = run_official_protocol({**tensors, **piped}, reference, dataset, label_kind="piped").compute()
    for task, task_scores in reference[dataset]["metrics"]["scores"].items():
        for name, value in task_scores.items():
            assert abs(scores[task][name] - value) <= SCORE_TOL, (task, name)


# --- constructed cases with known answers -----------------------------------------------------------------


def one_hot_logits(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(label[:, 0].long(), num_classes).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("device", DEVICES)
def test_perfect_predictions_score_perfectly(device):
    meter = MultiTaskMeter("nyud")
    semseg = torch.arange(40.0).view(1, 1, 5, 8).to(device)
    normals = torch.nn.functional.normalize(torch.randn(1, 3, 5, 8), dim=1).to(device)
    depth = torch.linspace(0.5, 9.0, 40).view(1, 1, 5, 8).to(device)
    edge = (torch.arange(40).view(1, 1, 5, 8) % 3 == 0).float().to(device)
    meter.update(
        {"semseg": one_hot_logits(semseg, 40), "normals": 7.0 * normals, "depth": depth, "edge": edge},
        {"semseg": semseg, "normals": normals, "depth": depth, "edge": edge},
    )
    scores = meter.compute()
    assert scores["semseg"]["mIoU"] == pytest.approx(100.0)
    assert scores["normals"]["mErr"] == pytest.approx(0.0, abs=0.05)
    assert scores["depth"]["RMSE"] == 0.0


def test_perfect_saliency_scores_100():
    label = torch.tensor([[[[0.0, 1.0, 1.0, 255.0]]]])
    meter = SaliencyMeter()
    meter.update(label.clamp_max(1) * 255.0, label)
    scores = meter.compute()
    assert scores["maxF"] == pytest.approx(100.0, abs=1e-6)
    assert scores["mIoU"] == pytest.approx(100.0, abs=1e-6)


def test_miou_averages_over_all_classes_including_absent_ones():
    meter = SegmentationMeter(4)
    label = torch.tensor([[[[0.0, 1.0, 255.0]]]])
    meter.update(torch.tensor([[[[0, 1, 3]]]]), label)
    assert meter.compute()["mIoU"] == pytest.approx(50.0)  # classes 2 and 3 count as IoU 0


def test_counts_are_pooled_over_updates_not_averaged_per_image():
    # image 1: class 0 right on 3 pixels; image 2: class 0 wrong on 1 pixel (predicted 1).
    label_a, pred_a = torch.zeros(1, 1, 1, 3), torch.zeros(1, 1, 1, 3, dtype=torch.long)
    label_b, pred_b = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1, dtype=torch.long)
    split, joint = SegmentationMeter(2), SegmentationMeter(2)
    split.update(pred_a, label_a)
    split.update(pred_b, label_b)
    joint.update(torch.cat((pred_a.flatten(), pred_b.flatten())).view(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))
    assert torch.equal(split.confusion, joint.confusion)
    assert split.compute()["mIoU"] == pytest.approx(100 * (3 / 4 + 0 / 1) / 2)


def test_saliency_threshold_is_inclusive_and_counts_only_valid_pixels():
    meter = SaliencyMeter()
    prob = torch.tensor([[[[0.05, 0.5, 0.951, 0.99]]]])
    label = torch.tensor([[[[1.0, 0.0, 1.0, 255.0]]]])
    meter.update(prob * 255.0, label)
    assert meter.predicted_positives[0].item() == 3  # 0.05 >= 0.05
    assert meter.predicted_positives[-1].item() == 1  # only 0.951 reaches 0.95; 0.99 is ignored
    assert meter.true_positives[-1].item() == 1
    assert meter.actual_positives.item() == 2


def test_saliency_maxf_uses_beta_squared_03():
    meter = SaliencyMeter()
    # At every threshold: 1 true positive, 2 predicted positives, 1 actual positive -> P 0.5, R 1.
    meter.update(torch.tensor([[[[255.0, 255.0]]]]), torch.tensor([[[[1.0, 0.0]]]]))
    precision, recall = 0.5, 1.0
    expected = 1.3 * precision * recall / (0.3 * precision + recall) * 100
    assert meter.compute()["maxF"] == pytest.approx(expected, abs=1e-5)
    assert meter.compute()["mIoU"] == pytest.approx(50.0, abs=1e-5)


def test_normals_angle_is_exact_at_right_and_straight_angles():
    label = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).repeat(1, 1, 1, 3)
    raw = torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    label[0, :, 0, 2] = 255.0
    meter = NormalsMeter()
    meter.update(prediction_for_metric("normals", raw), label)
    assert meter.count.item() == 2
    assert meter.compute()["mErr"] == pytest.approx((90.0 + 180.0) / 2, abs=1e-3)


def test_normals_meter_renormalises_and_drops_pixels_with_any_ignored_channel():
    label = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).repeat(1, 1, 1, 2)
    label[0, 1, 0, 1] = 255.0
    half_length = torch.tensor([0.5, 0.0, 0.0]).view(1, 3, 1, 1).repeat(1, 1, 1, 2)
    meter = NormalsMeter()
    meter.update((half_length + 1.0) * 255.0 / 2.0, label)
    assert meter.count.item() == 1
    assert meter.compute()["mErr"] == pytest.approx(0.0, abs=1e-3)


def test_depth_rmse_caps_at_80m_and_floors_negative_predictions():
    meter = DepthMeter()
    label = torch.tensor([[[[2.0, 85.0, 255.0, 1.0]]]])
    raw = torch.tensor([[[[5.0, 0.0, 0.0, -3.0]]]])
    meter.update(prediction_for_metric("depth", raw), label)
    assert meter.count.item() == 2
    assert meter.compute()["RMSE"] == pytest.approx(math.sqrt((3.0**2 + 1.0**2) / 2), rel=1e-7)


def test_edge_loss_meter_feeds_sigmoid_times_255_as_logits():
    logits = torch.tensor([[[[-2.0, 1.0]]]])
    label = torch.tensor([[[[0.0, 1.0]]]])
    z = torch.sigmoid(logits).flatten() * 255.0
    # softplus(z) = -log(1 - sigmoid(z)) and softplus(-z) = -log(sigmoid(z)), without overflow
    softplus = torch.nn.functional.softplus
    expected = (0.2 * softplus(z[0]) + 0.8 * softplus(-z[1])) / 2
    meter = EdgeLossMeter(pos_weight=0.8)
    meter.update(prediction_for_metric("edge", logits), label)
    assert meter.compute()["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert MultiTaskMeter("nyud").meters["edge"].pos_weight == 0.8
    assert MultiTaskMeter("pascalcontext").meters["edge"].pos_weight == 0.95


def test_prediction_for_metric_shapes_and_ranges():
    raw = torch.randn(2, 3, 4, 5)
    assert prediction_for_metric("semseg", raw).shape == (2, 1, 4, 5)
    normals = prediction_for_metric("normals", raw)
    assert normals.shape == (2, 3, 4, 5) and normals.min() >= 0 and normals.max() <= 255
    sal = prediction_for_metric("sal", torch.zeros(1, 2, 1, 1))
    assert sal.item() == 127.5
    assert prediction_for_metric("edge", torch.zeros(1, 1, 1, 1)).item() == 127.5
    assert prediction_for_metric("depth", torch.tensor([[[[-1.0]]]])).item() == 0.0


def test_reset_forgets_updates(official):
    tensors, reference = official
    meter = run_official_protocol(tensors, reference, "nyud")
    meter.reset()
    assert meter.meters["semseg"].confusion.sum().item() == 0
    assert meter.meters["depth"].count.item() == 0
    assert meter.meters["normals"].sum_degrees.item() == 0.0


# --- Δm ---------------------------------------------------------------------------------------------------


def test_delta_m_of_published_prism_and_sak_rows():
    pascal = get_dataset("pascalcontext").baselines_for("vit_b")
    prism = {"semseg": 82.20, "human_parts": 75.34, "sal": 84.81, "normals": 13.47, "edge": 75.92}
    sak = {"semseg": 81.88, "human_parts": 74.30, "sal": 84.79, "normals": 14.02, "edge": 74.09}
    assert delta_m(prism, pascal) == pytest.approx(2.52, abs=0.005)
    assert delta_m(sak, pascal) == pytest.approx(0.83, abs=0.005)
    nyud_prism = {"semseg": 60.22, "depth": 0.4883, "normals": 17.81, "edge": 76.59}
    assert delta_m(nyud_prism, get_dataset("nyud").baselines_for("vit_b")) == pytest.approx(10.59, abs=0.005)
    pascal_l = {"semseg": 84.34, "human_parts": 77.83, "sal": 84.67, "normals": 13.43, "edge": 76.23}
    assert delta_m(pascal_l, get_dataset("pascalcontext").baselines_for("vit_l")) == pytest.approx(
        3.16, abs=0.005
    )


def test_delta_m_rewards_lower_error_and_reads_headline_scores():
    baselines = {"normals": 20.0, "semseg": 50.0}
    assert delta_m({"normals": 18.0}, baselines) == pytest.approx(10.0)
    assert delta_m({"normals": {"mErr": 18.0}, "semseg": {"mIoU": 45.0}}, baselines) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="edge"):
        delta_m({"edge": {"loss": 2.0}}, {"edge": 70.0})
    with pytest.raises(ValueError, match="depth"):
        delta_m({"depth": 0.5}, baselines)


# --- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("meter", "task", "pred", "label_shape"),
    [
        (SegmentationMeter(21), "semseg", torch.zeros(1, 1, 4, 4, dtype=torch.long), (1, 1, 4, 5)),
        (SaliencyMeter(), "sal", torch.zeros(2, 1, 4, 4), (1, 1, 4, 4)),
        (NormalsMeter(), "normals", torch.zeros(1, 3, 4, 4), (1, 1, 4, 4)),
        (DepthMeter(), "depth", torch.zeros(1, 1, 4, 4), (1, 1, 3, 4)),
        (EdgeLossMeter(), "edge", torch.zeros(1, 1, 4, 4), (1, 4, 4)),
    ],
)
def test_shape_mismatch_raises_naming_task(meter, task, pred, label_shape):
    with pytest.raises(ValueError, match=rf"{task}: prediction shape"):
        meter.update(pred, torch.zeros(label_shape))


@pytest.mark.parametrize(
    ("meter", "task", "pred", "bad_value"),
    [
        (
            SegmentationMeter(7, task="human_parts"),
            "human_parts",
            torch.zeros(1, 1, 2, 2, dtype=torch.long),
            7.0,
        ),
        (SaliencyMeter(), "sal", torch.zeros(1, 1, 2, 2), 3.0),
        (DepthMeter(), "depth", torch.zeros(1, 1, 2, 2), -1.0),
        (EdgeLossMeter(), "edge", torch.zeros(1, 1, 2, 2), 254.0),
    ],
)
def test_label_value_out_of_range_raises_naming_task_and_value(meter, task, pred, bad_value):
    label = torch.zeros(1, 1, 2, 2)
    label[0, 0, 0, 1] = bad_value
    with pytest.raises(ValueError, match=rf"{task}: label value {bad_value}"):
        meter.update(pred, label)


def test_predicted_class_out_of_range_raises():
    with pytest.raises(ValueError, match="semseg: predicted class"):
        SegmentationMeter(21).update(torch.full((1, 1, 1, 1), 21), torch.zeros(1, 1, 1, 1))


def test_multitask_meter_rejects_unknown_dataset_task_and_missing_outputs():
    with pytest.raises(ValueError, match="cityscapes"):
        MultiTaskMeter("cityscapes")
    with pytest.raises(ValueError, match="human_parts"):
        MultiTaskMeter("nyud", tasks=["human_parts"])
    with pytest.raises(ValueError, match="depth: missing"):
        MultiTaskMeter("nyud", tasks=["depth"]).update({}, {"depth": torch.zeros(1, 1, 1, 1)})
