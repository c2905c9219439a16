"""The Stage-2 multi-task model: batched task passes equal separate passes; heads; saving."""

from __future__ import annotations

import pytest
import torch

from prism_vfm import PrismMultiTask
from prism_vfm.data.registry import dataset_tasks
from prism_vfm.layers.router import load_balancing_loss
from tests.tiny import TINY

ARGS = {k: v for k, v in TINY.items()}


def tiny_multitask(**over) -> PrismMultiTask:
    torch.manual_seed(0)
    model = PrismMultiTask({**ARGS, **over}, dataset_tasks("pascalcontext"))
    with torch.no_grad():  # task contexts must matter for the test to mean anything
        for block in model.student.dual_stream_blocks:
            block.moe.router.film.weight.normal_(0, 1.0)
    return model.eval()


def test_batched_task_passes_equal_separate_passes():
    model = tiny_multitask()
    x = torch.randn(2, 3, 32, 32)
    out = model(x).predictions
    assert {t: o.shape for t, o in out.items()} == {
        "semseg": (2, 21, 32, 32),
        "human_parts": (2, 7, 32, 32),
        "normals": (2, 3, 32, 32),
        "edge": (2, 1, 32, 32),
        "sal": (2, 2, 32, 32),
    }
    for i, task in enumerate(model.task_names):
        taps = model.student(x, i, kind="task").taps
        torch.testing.assert_close(out[task], model.decode(task, taps, (32, 32)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model.trace(x)["taps"]["semseg"][-1], model.trace(x)["taps"]["sal"][-1])


def test_taps_before_the_first_dual_stream_block_are_shared():
    model = tiny_multitask(tap_layers=(0, 1, 3))
    x = torch.randn(2, 3, 32, 32)
    per_task = model(x, return_taps=True).taps
    torch.testing.assert_close(per_task["semseg"][0], per_task["edge"][0])
    separate = model.student(x, 3, kind="task").taps[2]
    torch.testing.assert_close(per_task["edge"][2], separate, rtol=1e-5, atol=1e-5)


def test_grouped_load_balancing_is_the_mean_of_per_pass_losses():
    torch.manual_seed(0)
    logits = torch.randn(6, 5, 4)
    values, indices = logits.topk(2, dim=-1)
    weights = values.softmax(-1)
    grouped = load_balancing_loss(logits, indices, weights, groups=3)
    separate = torch.stack(
        [load_balancing_loss(logits[i : i + 2], indices[i : i + 2], weights[i : i + 2]) for i in (0, 2, 4)]
    ).mean()
    torch.testing.assert_close(grouped, separate)


def test_save_and_load_pretrained(tmp_path):
    model = tiny_multitask()
    model.save_pretrained(tmp_path / "mt")
    again = PrismMultiTask.from_pretrained(tmp_path / "mt")
    x = torch.randn(1, 3, 32, 32)
    normals = again(x).predictions["normals"]
    torch.testing.assert_close(normals, model(x).predictions["normals"], rtol=0, atol=0)


def test_batched_load_balancing_is_the_mean_over_task_passes():
    # Without expert dropout and router noise, training-mode routing is deterministic and comparable.
    model = tiny_multitask(expert_dropout=0.0, noisy_gating=False).train()
    x = torch.randn(2, 3, 32, 32)
    aux = model(x).aux_loss
    separate = torch.stack([model.student(x, i, kind="task").aux_loss for i in range(5)]).mean()
    torch.testing.assert_close(aux, separate, rtol=1e-5, atol=1e-7)
    assert aux > 0


def test_task_and_teacher_passes_share_work_and_equal_separate_passes():
    model = tiny_multitask(expert_dropout=0.0, noisy_gating=False, teacher_dims=(16, 24, 8), projectors=True)
    model.train()
    student = model.student
    with torch.no_grad():
        for block in student.dual_stream_blocks:
            block.moe.router.film.weight.normal_(0, 1.0)
    x = torch.randn(3, 3, 32, 32)
    teacher_ids = torch.tensor([2, 0, 1])
    passes = [("task", 0), ("task", 4), ("teacher", teacher_ids)]
    out = student.forward_passes(x, passes, return_routing=True)
    taps, aux = out.taps, out.aux_loss
    assert aux.shape == (3,) and out.kind is None
    assert out.context.tolist() == [0, 0, 0, 4, 4, 4, 2, 0, 1]
    # routing statistics need one kind of context; a mixed pass says so instead of mixing tables
    with pytest.raises(ValueError, match="mixed teacher and task"):
        student.routing_stats(out)
    for i, (kind, ctx) in enumerate(passes):
        ref = student(x, ctx, kind=kind, return_routing=True)
        ref_taps, ref_aux = ref.taps, ref.aux_loss
        for layer, routing in ref.routing.items():
            assert torch.equal(out.routing[layer].indices[3 * i : 3 * i + 3], routing.indices)
            torch.testing.assert_close(out.routing[layer].lam[3 * i : 3 * i + 3], routing.lam)
        for tap, ref in zip(taps, ref_taps, strict=True):
            torch.testing.assert_close(tap[3 * i : 3 * i + 3], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(aux[i], ref_aux, rtol=1e-5, atol=1e-7)
    # the teacher pass differs from the task passes: the contexts really are applied per pass
    assert not torch.allclose(taps[-1][6:], taps[-1][:3])


def test_training_step_shares_the_teacher_pass_with_the_task_passes():
    from prism_vfm.finetune.trainer import MultiTaskStep

    model = tiny_multitask(expert_dropout=0.0, noisy_gating=False, teacher_dims=(16, 24, 8), projectors=True)
    model.train()
    x, ids = torch.randn(3, 3, 32, 32), torch.tensor([1, 1, 0])
    student = model.student
    embedded = []  # the patch embedding (and the blocks before the first dual-stream block) run once
    hook = student.patch_embed.register_forward_hook(lambda _m, _i, out: embedded.append(out.shape[0]))
    outputs, projections, aux_tasks, aux_teacher = MultiTaskStep(model)(x, ids)
    hook.remove()
    assert embedded == [3]
    ref = student(x, ids, kind="teacher")
    taps, ref_aux_teacher = ref.taps, ref.aux_loss
    ref_proj = student.project_by_teacher(taps, ids, student.grid_size(x))
    assert projections.keys() == ref_proj.keys() == {0, 1}
    for t in ref_proj:
        for a, b in zip(projections[t], ref_proj[t], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux_teacher, ref_aux_teacher, rtol=1e-5, atol=1e-7)
    ref_tasks = torch.stack([student(x, i, kind="task").aux_loss for i in range(5)]).mean()
    torch.testing.assert_close(aux_tasks, ref_tasks, rtol=1e-5, atol=1e-7)
    ref_edge = model.decode("edge", student(x, model.task_id("edge"), kind="task").taps, (32, 32))
    torch.testing.assert_close(outputs["edge"], ref_edge, rtol=1e-5, atol=1e-5)


def test_save_pretrained_keeps_the_task_order(tmp_path):
    # task ids index the task table: a reload must not reorder them (config.json is written with sorted keys)
    tasks = {"semseg": 21, "normals": 3, "edge": 1}
    model = PrismMultiTask(dict(ARGS), tasks)
    model.save_pretrained(tmp_path / "mt")
    again = PrismMultiTask.from_pretrained(tmp_path / "mt")
    assert again.task_names == ["semseg", "normals", "edge"]
    x = torch.randn(1, 3, 32, 32)
    for task in tasks:
        torch.testing.assert_close(
            again.eval()(x).predictions[task], model.eval()(x).predictions[task], rtol=0, atol=0
        )
    with pytest.raises(ValueError, match="unique"):
        PrismMultiTask(dict(ARGS), [("edge", 1), ("edge", 1)])


def test_a_subpixel_head_places_its_output_on_any_pixel_of_a_cell():
    from prism_vfm.models.dense_head import DenseHead

    torch.manual_seed(0)
    maps = [torch.randn(1, 16, 4, 4) for _ in range(2)]
    subpixel = DenseHead(16, 1, num_levels=2, output="subpixel")
    with torch.no_grad():  # only the sub-position (row 1, column 2) of every 4 x 4 cell responds
        subpixel.last_conv.weight.zero_()
        subpixel.last_conv.bias.fill_(-1.0)
        subpixel.last_conv.bias[1 * 4 + 2] = 1.0
    out = subpixel.eval()(maps, (16, 16))[0, 0]
    expected = torch.full((16, 16), -1.0)
    expected[1::4, 2::4] = 1.0
    torch.testing.assert_close(out, expected)
    # The released head upsamples one value per cell bilinearly: nothing peaks off the cell centres.
    bilinear = DenseHead(16, 1, num_levels=2).eval()
    assert bilinear.last_conv.out_channels == 1 and subpixel.last_conv.out_channels == 16
    with pytest.raises(ValueError, match="divisible by 4"):
        subpixel(maps, (18, 16))
    with pytest.raises(ValueError, match="unknown head output"):
        DenseHead(16, 1, output="nearest")


def test_subpixel_heads_are_kept_by_saving_and_loading(tmp_path):
    from prism_vfm.models.load import load

    torch.manual_seed(0)
    model = PrismMultiTask(dict(ARGS), {"semseg": 21, "edge": 1}, subpixel_heads=["edge"]).eval()
    assert model.heads["edge"].output == "subpixel" and model.heads["semseg"].output == "bilinear"
    model.save_pretrained(tmp_path / "mt")
    x = torch.randn(1, 3, 32, 32)
    for again in (PrismMultiTask.from_pretrained(tmp_path / "mt"), load(tmp_path / "mt")[0]):
        assert again.subpixel_heads == ("edge",)
        torch.testing.assert_close(again(x).predictions["edge"], model(x).predictions["edge"], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"subpixel_heads names tasks this model lacks: \['sal'\]"):
        PrismMultiTask(dict(ARGS), {"semseg": 21}, subpixel_heads=["sal"])
