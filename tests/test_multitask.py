"""The Stage-2 multi-task model: batched task passes equal separate passes; heads; saving."""

from __future__ import annotations

import torch

from prism_vfm import PrismMultiTask
from prism_vfm.layers.router import load_balancing_loss
from prism_vfm.losses.tasks import TASK_OUTPUT_CHANNELS
from tests.tiny import TINY

ARGS = {k: v for k, v in TINY.items()}


def tiny_multitask(**over) -> PrismMultiTask:
    torch.manual_seed(0)
    model = PrismMultiTask({**ARGS, **over}, TASK_OUTPUT_CHANNELS["pascalcontext"])
    with torch.no_grad():  # task contexts must matter for the test to mean anything
        for block in model.student.dual_stream_blocks:
            block.moe.router.film.weight.normal_(0, 1.0)
    return model.eval()


def test_batched_task_passes_equal_separate_passes():
    model = tiny_multitask()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert {t: o.shape for t, o in out.items()} == {
        "semseg": (2, 21, 32, 32),
        "human_parts": (2, 7, 32, 32),
        "normals": (2, 3, 32, 32),
        "edge": (2, 1, 32, 32),
        "sal": (2, 2, 32, 32),
    }
    for i, task in enumerate(model.task_names):
        taps = model.student(x, i, kind="task")
        torch.testing.assert_close(out[task], model.decode(task, taps, (32, 32)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model.trace(x)["taps"]["semseg"][-1], model.trace(x)["taps"]["sal"][-1])


def test_taps_before_the_first_dual_stream_block_are_shared():
    model = tiny_multitask(tap_layers=(0, 1, 3))
    x = torch.randn(2, 3, 32, 32)
    per_task, _ = model.forward_task_taps(x)
    torch.testing.assert_close(per_task["semseg"][0], per_task["edge"][0])
    torch.testing.assert_close(per_task["edge"][2], model.student(x, 3, kind="task")[2], rtol=1e-5, atol=1e-5)


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
    torch.testing.assert_close(again(x)["normals"], model(x)["normals"], rtol=0, atol=0)


def test_batched_load_balancing_is_the_mean_over_task_passes():
    # Without expert dropout and router noise, training-mode routing is deterministic and comparable.
    model = tiny_multitask(expert_dropout=0.0, noisy_gating=False).train()
    x = torch.randn(2, 3, 32, 32)
    _, aux = model.forward_task_taps(x)
    separate = torch.stack([model.student(x, i, kind="task", return_aux=True)[1] for i in range(5)]).mean()
    torch.testing.assert_close(aux, separate, rtol=1e-5, atol=1e-7)
    assert aux > 0
