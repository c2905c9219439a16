"""Stage-2 task losses and the label ignore-region step, pinned to the official values (SPEC §7, §8)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from prism_vfm.data.labels import add_ignore_regions, class_pixel_counts
from prism_vfm.data.registry import get_dataset
from prism_vfm.losses.tasks import (
    MultiTaskLoss,
    balanced_bce_loss,
    balanced_cross_entropy_loss,
    class_balance_weights,
    cross_entropy_loss,
    depth_l1_loss,
    normals_l1_loss,
    task_loss,
)

DATASETS = ("pascalcontext", "nyud")


@pytest.fixture(scope="module")
def official(fixture_dir):
    folder = fixture_dir("task_losses_and_metrics")
    return load_file(folder / "inputs.safetensors"), json.loads((folder / "reference.json").read_text())


def _batch(tensors, dataset, kind, tasks):
    return {t: tensors[f"{dataset}.{kind}.{t}"] for t in tasks}


def assert_loss_close(actual: float, expected: float) -> None:
    """The fixture tolerance for scalar losses: 1e-6 absolute or 1e-5 relative, whichever is larger."""
    assert abs(actual - expected) <= max(1e-6, 1e-5 * abs(expected)), (actual, expected)


# --- ignore regions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", DATASETS)
def test_add_ignore_regions_reproduces_the_official_pipeline_labels(official, dataset):
    tensors, reference = official
    for task in reference[dataset]["losses"]["unweighted"]:
        raw = tensors[f"{dataset}.label_raw.{task}"]
        expected = tensors[f"{dataset}.label.{task}"]
        assert torch.equal(add_ignore_regions(task, raw), expected), task
        for i in range(raw.shape[0]):
            assert torch.equal(add_ignore_regions(task, raw[i]), expected[i]), (task, i)


def test_fixture_exercises_every_ignore_rule(official):
    tensors, _ = official
    for name in ("pascalcontext.label.human_parts", "nyud.label.normals", "nyud.label.depth"):
        raw = tensors[name.replace(".label.", ".label_raw.")]
        assert not torch.equal(raw, tensors[name]), name


def test_parts_map_without_part_pixels_is_ignored_entirely_and_others_kept():
    no_parts = torch.tensor([[[0.0, 255.0], [0.0, 0.0]]])
    with_parts = torch.tensor([[[0.0, 3.0], [255.0, 0.0]]])
    out = add_ignore_regions("human_parts", torch.stack((no_parts, with_parts)))
    assert torch.all(out[0] == 255)
    assert torch.equal(out[1], with_parts)


def test_zero_normals_become_255_in_all_channels_and_depth_zero_becomes_255():
    normals = torch.zeros(3, 1, 2)
    normals[:, 0, 1] = torch.tensor([0.0, 0.0, 1.0])
    out = add_ignore_regions("normals", normals)
    assert torch.all(out[:, 0, 0] == 255)
    assert torch.equal(out[:, 0, 1], torch.tensor([0.0, 0.0, 1.0]))
    depth = torch.tensor([[[0.0, 2.5]]])
    assert torch.equal(add_ignore_regions("depth", depth), torch.tensor([[[255.0, 2.5]]]))


def test_add_ignore_regions_leaves_its_input_and_other_tasks_untouched():
    depth = torch.tensor([[[0.0, 1.0]]])
    add_ignore_regions("depth", depth)
    assert torch.equal(depth, torch.tensor([[[0.0, 1.0]]]))
    semseg = torch.zeros(1, 2, 2)
    assert torch.equal(add_ignore_regions("semseg", semseg), semseg)


def test_add_ignore_regions_rejects_a_label_without_channel_axis():
    with pytest.raises(ValueError, match="depth"):
        add_ignore_regions("depth", torch.zeros(4, 4))


# --- official values ------------------------------------------------------------------------------------


def test_loss_weights_are_the_official_ones(official):
    _, reference = official
    for dataset in DATASETS:
        assert dict(get_dataset(dataset).loss_weights) == reference[dataset]["losses"]["loss_weights"]


@pytest.mark.parametrize("dataset", DATASETS)
def test_unweighted_task_losses_match_official(official, dataset):
    tensors, reference = official
    expected = reference[dataset]["losses"]["unweighted"]
    for task, value in expected.items():
        pred = tensors[f"{dataset}.pred.{task}"]
        label = tensors[f"{dataset}.label.{task}"]
        assert_loss_close(task_loss(task, pred, label).item(), value)


@pytest.mark.parametrize("dataset", DATASETS)
def test_multitask_loss_weighted_terms_and_total_match_official(official, dataset):
    tensors, reference = official
    expected = reference[dataset]["losses"]
    tasks = list(expected["unweighted"])
    out = MultiTaskLoss(dataset)(
        _batch(tensors, dataset, "pred", tasks), _batch(tensors, dataset, "label", tasks)
    )
    assert list(out.weighted) == tasks
    for task in tasks:
        assert_loss_close(out.unweighted[task].item(), expected["unweighted"][task])
        assert_loss_close(out.weighted[task].item(), expected["multitask_loss_weighted"][task])
    assert_loss_close(out.total.item(), expected["multitask_loss_weighted"]["total"])


# --- constructed cases ----------------------------------------------------------------------------------


def test_image_without_parts_contributes_nothing_to_the_parts_loss(official):
    tensors, _ = official
    pred = tensors["pascalcontext.pred.human_parts"]
    label = tensors["pascalcontext.label.human_parts"]
    assert torch.all(label[1] == 255)
    both = cross_entropy_loss("human_parts", pred[:2], label[:2])
    alone = cross_entropy_loss("human_parts", pred[:1], label[:1])
    torch.testing.assert_close(both, alone)


def test_losses_are_zero_not_nan_when_every_pixel_is_ignored():
    ignored = torch.full((1, 1, 2, 2), 255.0)
    assert cross_entropy_loss("semseg", torch.randn(1, 21, 2, 2), ignored).item() == 0.0
    assert balanced_cross_entropy_loss(torch.randn(1, 2, 2, 2), ignored).item() == 0.0
    assert normals_l1_loss(torch.randn(1, 3, 2, 2), ignored.expand(1, 3, 2, 2)).item() == 0.0
    assert balanced_bce_loss(torch.randn(1, 1, 2, 2), ignored).item() == 0.0
    assert depth_l1_loss(torch.randn(1, 1, 2, 2), ignored).item() == 0.0


def test_cross_entropy_is_normalised_by_valid_pixels():
    pred = torch.randn(1, 3, 1, 4)
    label = torch.tensor([[[[0.0, 2.0, 255.0, 1.0]]]])
    per_pixel = -F.log_softmax(pred, dim=1)[0, [0, 2, 1], 0, [0, 1, 3]]
    torch.testing.assert_close(cross_entropy_loss("semseg", pred, label), per_pixel.mean())


def test_saliency_loss_weights_classes_by_the_other_class_share():
    # 3 valid pixels, 1 negative: p_neg = 1/3, so negatives weigh 2/3 and positives 1/3.
    pred = torch.randn(1, 2, 1, 4)
    label = torch.tensor([[[[0.0, 1.0, 1.0, 255.0]]]])
    nll = -F.log_softmax(pred, dim=1)[0, [0, 1, 1], 0, [0, 1, 2]]
    expected = (2 / 3 * nll[0] + 1 / 3 * nll[1] + 1 / 3 * nll[2]) / 3
    torch.testing.assert_close(balanced_cross_entropy_loss(pred, label), expected)


def test_normals_loss_normalises_the_prediction_and_counts_pixels_not_channels():
    label = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1).repeat(1, 1, 1, 2)
    label[:, 2, 0, 1] = 255.0  # one ignored channel is enough to drop the pixel
    pred = torch.zeros(1, 3, 1, 2)
    pred[0, :, 0, 0] = torch.tensor([3.0, 0.0, 4.0])  # normalised: (0.6, 0, 0.8)
    pred[0, :, 0, 1] = torch.tensor([9.0, 9.0, 9.0])
    torch.testing.assert_close(normals_l1_loss(pred, label), torch.tensor(0.6 + 0.2))


def test_edge_loss_weights_positives_095_and_negatives_005():
    z = torch.tensor([[[[0.3, -1.2, 2.0, 0.7]]]])
    y = torch.tensor([[[[1.0, 0.0, 255.0, 1.0]]]])
    s = torch.sigmoid(z[0, 0, 0, [0, 1, 3]])
    terms = torch.stack((-0.95 * torch.log(s[0]), -0.05 * torch.log(1 - s[1]), -0.95 * torch.log(s[2])))
    torch.testing.assert_close(balanced_bce_loss(z, y), terms.mean())


def test_depth_loss_counts_far_depths_and_skips_255():
    pred = torch.tensor([[[[1.0, 80.0, 3.0]]]])
    label = torch.tensor([[[[2.0, 85.0, 255.0]]]])
    torch.testing.assert_close(depth_l1_loss(pred, label), torch.tensor((1.0 + 5.0) / 2))


def test_ignored_pixels_receive_no_gradient():
    pred = torch.randn(1, 21, 2, 2, requires_grad=True)
    label = torch.tensor([[[[3.0, 255.0], [255.0, 7.0]]]])
    cross_entropy_loss("semseg", pred, label).backward()
    assert torch.all(pred.grad[0, :, 0, 1] == 0) and torch.all(pred.grad[0, :, 1, 0] == 0)
    assert pred.grad[0, :, 0, 0].abs().sum() > 0


def test_multitask_loss_weight_override_and_task_subset():
    pred = {"depth": torch.tensor([[[[1.0]]]]), "semseg": torch.randn(1, 40, 1, 1)}
    label = {"depth": torch.tensor([[[[3.0]]]]), "semseg": torch.zeros(1, 1, 1, 1)}
    out = MultiTaskLoss("nyud", tasks=["depth"], weights={"depth": 0.5})(pred, label)
    assert list(out.weighted) == ["depth"]
    assert math.isclose(out.total.item(), 1.0)


# --- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "pred_shape", "bad_value"),
    [
        ("semseg", (1, 21, 2, 2), 21.0),
        ("semseg", (1, 21, 2, 2), -1.0),
        ("semseg", (1, 21, 2, 2), 2.5),
        ("human_parts", (1, 7, 2, 2), 7.0),
        ("sal", (1, 2, 2, 2), 2.0),
        ("edge", (1, 1, 2, 2), 1.5),
        ("depth", (1, 1, 2, 2), -0.5),
    ],
)
def test_label_value_out_of_range_raises_naming_task_and_value(task, pred_shape, bad_value):
    label = torch.zeros(1, 1, 2, 2)
    label[0, 0, 1, 1] = bad_value
    with pytest.raises(ValueError, match=rf"{task}: label value {bad_value}"):
        task_loss(task, torch.randn(pred_shape), label)


def test_normals_label_out_of_range_raises():
    label = torch.zeros(1, 3, 2, 2)
    label[0, 2, 0, 0] = 3.0
    with pytest.raises(ValueError, match=r"normals: label value 3\.0"):
        normals_l1_loss(torch.randn(1, 3, 2, 2), label)


@pytest.mark.parametrize(
    ("task", "pred_shape", "label_shape"),
    [
        ("semseg", (1, 21, 4, 4), (1, 1, 4, 5)),
        ("semseg", (2, 21, 4, 4), (1, 1, 4, 4)),
        ("normals", (1, 3, 4, 4), (1, 1, 4, 4)),
        ("sal", (1, 1, 4, 4), (1, 1, 4, 4)),
        ("edge", (1, 1, 4, 4), (1, 4, 4)),
        ("depth", (1, 2, 4, 4), (1, 1, 4, 4)),
    ],
)
def test_shape_mismatch_raises_naming_task(task, pred_shape, label_shape):
    with pytest.raises(ValueError, match=rf"{task}: prediction shape"):
        task_loss(task, torch.randn(pred_shape), torch.zeros(label_shape))


def test_multitask_loss_rejects_unknown_names_and_wrong_channel_counts():
    with pytest.raises(ValueError, match="cityscapes"):
        MultiTaskLoss("cityscapes")
    with pytest.raises(ValueError, match="depth"):
        MultiTaskLoss("pascalcontext", tasks=["semseg", "depth"])
    with pytest.raises(ValueError, match="sal"):
        MultiTaskLoss("nyud", weights={"sal": 1.0})
    loss = MultiTaskLoss("pascalcontext", tasks=["semseg"])
    with pytest.raises(ValueError, match=r"semseg: prediction shape \(1, 40, 2, 2\)"):
        loss({"semseg": torch.randn(1, 40, 2, 2)}, {"semseg": torch.zeros(1, 1, 2, 2)})
    with pytest.raises(ValueError, match="semseg: missing"):
        loss({}, {"semseg": torch.zeros(1, 1, 2, 2)})


def test_label_check_never_reads_a_device_label_back_unless_asked(monkeypatch):
    """Labels in host memory are checked; on an accelerator the check (a host read that waits for the
    device) runs only with ``check_labels=True``: the readers have checked every label on the host."""
    import prism_vfm.data.labels as labels

    pred, bad = torch.zeros(1, 21, 2, 2), torch.full((1, 1, 2, 2), 30.0)
    with pytest.raises(ValueError, match="semseg: label value 30"):
        MultiTaskLoss("pascalcontext", ["semseg"])({"semseg": pred}, {"semseg": bad})
    MultiTaskLoss("pascalcontext", ["semseg"], check_labels=False)(
        {"semseg": pred}, {"semseg": bad.clamp(0, 20)}
    )

    # A tensor that claims to live on an accelerator: the check must not look at its values.
    class OnDevice(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 0)

    device_label = bad.as_subclass(OnDevice)
    reads = []
    monkeypatch.setattr(labels.torch, "isfinite", lambda t: reads.append(t) or torch.ones_like(t, dtype=bool))
    labels.check_label_values("semseg", device_label, 21)  # default: skipped, nothing read
    labels.check_label_values("depth", device_label)
    assert reads == []
    with pytest.raises(ValueError, match="semseg: label value 30"):
        labels.check_label_values("semseg", device_label, 21, check=True)


def test_class_balance_weights_follow_the_frequency_power_with_pixel_mean_one():
    counts = torch.tensor([0, 10, 30])  # shares 0, 1/4, 3/4; class 0 absent
    inverse = class_balance_weights(counts, 1.0)  # ∝ 4, 4/3; pixel mean 1/4·4 + 3/4·4/3 = 2
    torch.testing.assert_close(inverse, torch.tensor([1.0, 2.0, 2.0 / 3.0]))
    root = class_balance_weights(counts, 0.5)  # ∝ 2, (4/3)^0.5
    assert root[1] / root[2] == pytest.approx(3**0.5) and float(root[1:] @ torch.tensor([0.25, 0.75])) == 1
    torch.testing.assert_close(class_balance_weights(counts, 0.0), torch.ones(3))
    with pytest.raises(ValueError, match="exponent must be >= 0"):
        class_balance_weights(counts, -1.0)
    with pytest.raises(ValueError, match="not all 0"):
        class_balance_weights(torch.zeros(3), 1.0)


def test_class_weighted_cross_entropy_weights_each_pixel_by_its_true_class():
    torch.manual_seed(0)
    pred = torch.randn(2, 3, 4, 5)
    label = torch.randint(0, 3, (2, 1, 4, 5)).float()
    label[0, 0, 0, :2] = 255
    target = label[:, 0].long()
    weight = torch.tensor([0.5, 2.0, 1.0])
    per_pixel = F.cross_entropy(pred, target, ignore_index=255, reduction="none")
    expected = (per_pixel * weight[target.clamp(max=2)]).sum() / (target != 255).sum()
    torch.testing.assert_close(cross_entropy_loss("semseg", pred, label, class_weight=weight), expected)
    released = cross_entropy_loss("semseg", pred, label)
    assert torch.equal(cross_entropy_loss("semseg", pred, label, class_weight=torch.ones(3)), released)
    with pytest.raises(ValueError, match=r"semseg: class weights of shape \(2,\), expected \(3,\)"):
        cross_entropy_loss("semseg", pred, label, class_weight=torch.ones(2))
    with pytest.raises(ValueError, match="class weights apply to"):
        task_loss("sal", pred[:, :2], label.clamp(max=1), class_weight=torch.ones(2))


def test_multitask_loss_applies_class_weights_to_class_map_tasks_only():
    torch.manual_seed(0)
    preds = {"semseg": torch.randn(2, 21, 4, 4), "sal": torch.randn(2, 2, 4, 4)}
    labels = {
        "semseg": torch.randint(0, 21, (2, 1, 4, 4)).float(),
        "sal": torch.randint(0, 2, (2, 1, 4, 4)).float(),
    }
    weight = torch.linspace(0.1, 3.0, 21)
    loss = MultiTaskLoss("pascalcontext", ["semseg", "sal"], class_weights={"semseg": weight})
    out = loss(preds, labels)
    expected = cross_entropy_loss("semseg", preds["semseg"], labels["semseg"], class_weight=weight)
    torch.testing.assert_close(out.unweighted["semseg"], expected)
    assert not torch.allclose(
        out.unweighted["semseg"], cross_entropy_loss("semseg", preds["semseg"], labels["semseg"])
    )
    torch.testing.assert_close(out.unweighted["sal"], task_loss("sal", preds["sal"], labels["sal"]))
    with pytest.raises(ValueError, match="class weights given for 'sal'"):
        MultiTaskLoss("pascalcontext", ["semseg", "sal"], class_weights={"sal": torch.ones(2)})
    with pytest.raises(ValueError, match=r"semseg: class weights of shape \(3,\), expected \(21,\)"):
        MultiTaskLoss("pascalcontext", ["semseg"], class_weights={"semseg": torch.ones(3)})


def test_class_pixel_counts_count_each_class_and_skip_ignored_pixels():
    samples = [
        {"semseg": torch.tensor([[[0.0, 2.0], [255.0, 2.0]]])},
        {"semseg": torch.tensor([[[1.0, 255.0], [255.0, 255.0]]])},
    ]
    counts = class_pixel_counts(samples, {"semseg": 4})
    assert counts["semseg"].tolist() == [1, 1, 2, 0]
    with pytest.raises(ValueError, match=r"semseg: a class-map value outside \[0, 2\)"):
        class_pixel_counts(samples, {"semseg": 2})
