"""Stage-2 fine-tuning on a tiny generated PASCAL-Context, from a tiny Stage-1 student."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from prism_vfm import PrismMultiTask
from prism_vfm.config import apply_overrides
from prism_vfm.data.tiny_dense import write_tiny_pascal
from prism_vfm.finetune.config import preset
from prism_vfm.finetune.trainer import build_multitask, train_stage2
from prism_vfm.train.checkpoint import latest_checkpoint
from prism_vfm.train.distributed import shutdown_distributed
from prism_vfm.train.logging import read_scalars
from tests.tiny import tiny_student


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    write_tiny_pascal(root / "PASCALContext", n_train=6, n_val=2, size=(40, 48), seed=0)
    tiny_student(teacher_dims=(32, 24, 16)).save_pretrained(root / "stage1")
    return root


def cfg_for(setup, out, *overrides):
    base = [("data", str(setup / "PASCALContext")), ("init", str(setup / "stage1")), ("out", str(out))]
    return apply_overrides(preset("tiny"), base + list(overrides))


def spy_on(monkeypatch, module, name):
    """Wrap ``module.name`` so that every object it returns is also appended to the returned list."""
    made = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(module, name, spy)
    return made


def test_tiny_finetune_trains_validates_and_checkpoints(setup, tmp_path):
    run = train_stage2(cfg_for(setup, tmp_path / "run"))
    records = read_scalars(run)
    losses = [r["loss/total"] for r in records if "loss/total" in r]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    last = [r for r in records if "loss/total" in r][-1]
    for key in [
        "loss/task/semseg",
        "loss/task/human_parts",
        "loss/task/normals",
        "loss/task/edge",
        "loss/task/sal",
        "loss/distill",
        "loss/aux_tasks",
        "lr",
    ]:
        assert key in last, key
    val = [r for r in records if any(k.startswith("val/") for k in r)]
    assert len(val) == 2 and "val/semseg/mIoU" in val[-1]
    model = PrismMultiTask.from_pretrained(latest_checkpoint(run))
    assert model.task_names == ["semseg", "human_parts", "normals", "edge", "sal"]


def test_resume_continues_exactly(setup, tmp_path):
    train_stage2(cfg_for(setup, tmp_path / "whole"))
    train_stage2(cfg_for(setup, tmp_path / "cut", ("max_steps", 3)))
    train_stage2(cfg_for(setup, tmp_path / "cut"), resume=True)
    a = load_file(latest_checkpoint(tmp_path / "whole") / "model.safetensors")
    b = load_file(latest_checkpoint(tmp_path / "cut") / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_init_keeps_the_backbone_and_starts_a_fresh_task_table(setup):
    cfg = cfg_for(setup, "unused")
    from prism_vfm.finetune.config import resolved

    model = build_multitask(resolved(cfg), (32, 24, 16))
    source = tiny_student(teacher_dims=(32, 24, 16))
    source.load_state_dict(load_file(setup / "stage1" / "model.safetensors"))
    torch.testing.assert_close(model.student.blocks[1].moe.experts.w1, source.blocks[1].moe.experts.w1)
    torch.testing.assert_close(model.student.teacher_embed.weight, source.teacher_embed.weight)
    assert model.student.task_embed.weight.shape == (5, 32)
    copied = build_multitask(
        resolved(apply_overrides(cfg, [("task_table_init", "copy_dinov2")])), (32, 24, 16)
    )
    torch.testing.assert_close(copied.student.task_embed.weight[3], source.teacher_embed.weight[0])


@pytest.mark.parametrize("alignment, grid", [("crop", (6, 8)), ("official", (8, 8))])
def test_sam_teacher_alignment_on_non_square_inputs(setup, tmp_path, monkeypatch, alignment, grid):
    # A SAM-geometry teacher pads the 48x64 input to 64x64: "crop" keeps the 6x8 cells over the image (aligned
    # with the student), "official" the whole padded 8x8 grid.
    from prism_vfm.finetune import trainer as stage2
    from prism_vfm.teachers import register_teacher
    from tests.test_teachers import TINY_SAM

    register_teacher(TINY_SAM, overwrite=True)
    built = spy_on(monkeypatch, stage2, "build_teacher")
    overrides = [("distill.teachers", ["tiny_a", "tiny_b", "tiny_sam"]), ("distill.sam_alignment", alignment)]
    # tiny_sam is wider than the Stage-1 third teacher: its projector heads start fresh, by request.
    overrides.append(("init_fresh", ["projectors.2.*"]))
    run = train_stage2(cfg_for(setup, tmp_path / alignment, ("max_steps", 2), *overrides))
    sam = built[-1]
    assert sam.spec.name == "tiny_sam" and sam.grid_size() == grid
    assert [tuple(m.shape[-2:]) for m in sam(torch.randn(1, 3, 48, 64))] == [grid] * 2
    distill = [r["loss/distill"] for r in read_scalars(run) if "loss/distill" in r]
    assert len(distill) == 2 and all(torch.isfinite(torch.tensor(distill)))


def _ddp_worker(rank: int, port: int, root: str, out: str) -> None:
    import os

    from prism_vfm.finetune import trainer as stage2
    from prism_vfm.train import loop

    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    real = loop.full_state

    def keep_rank_state(model, optimizer):  # every rank's own weights and BN statistics, at each checkpoint
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{out}/rank{rank}.pt")
        return real(model, optimizer)

    loop.full_state = keep_rank_state
    from pathlib import Path

    Path(out).mkdir(parents=True, exist_ok=True)
    setup = Path(root)
    stage2.train_stage2(cfg_for(setup, Path(out) / "run", ("max_steps", 3), ("workers", 0)))
    shutdown_distributed()


def test_two_process_ddp_keeps_ranks_in_sync(setup, tmp_path):
    # Each rank sees different images: identical weights need DDP's all-reduce (without
    # find_unused_parameters), identical BatchNorm running statistics need them synchronised (SyncBatchNorm
    # on CUDA; on CPU processes, where PyTorch has no SyncBatchNorm, averaged at every checkpoint).
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(setup), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    bn = [k for k in ranks[0] if k.endswith("running_mean")]
    assert bn, "the heads have BatchNorm layers"
    for key in ranks[0]:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=1e-6, msg=key)
    initial = PrismMultiTask.from_pretrained(tmp_path / "run" / "checkpoints" / "step_00000003")
    assert any(float(initial.state_dict()[k].abs().sum()) > 0 for k in bn)  # statistics were updated
    assert latest_checkpoint(tmp_path / "run").name == "step_00000003"


def test_a_bf16_autocast_step_runs_on_the_cpu_and_trains(setup, tmp_path):
    run = train_stage2(cfg_for(setup, tmp_path / "bf16", ("amp", "bf16"), ("max_steps", 2), ("holdout", 0.0)))
    losses = [r["loss/total"] for r in read_scalars(run) if "loss/total" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    initial = load_file(setup / "stage1" / "model.safetensors")
    trained = load_file(latest_checkpoint(run) / "model.safetensors")
    for key in ("blocks.1.moe.experts.w1", "blocks.0.attn.qkv.weight"):
        assert trained[f"student.{key}"].dtype == torch.float32
        assert not torch.equal(trained[f"student.{key}"], initial[key]), key
    assert any(k.startswith("heads.") for k in trained)


def test_shuffled_task_contexts_route_each_task_pass_under_random_task_ids(setup, tmp_path, monkeypatch):
    from prism_vfm.models.prism_vit import PrismViT

    calls: list[list] = []
    forward_passes = PrismViT.forward_passes

    def spy(self, x, passes, **kwargs):
        calls.append([c for kind, c in passes if kind == "task"])
        return forward_passes(self, x, passes, **kwargs)

    monkeypatch.setattr(PrismViT, "forward_passes", spy)
    train_stage2(cfg_for(setup, tmp_path / "own", ("max_steps", 2)))
    assert calls and all(task_ids == [0, 1, 2, 3, 4] for task_ids in calls)  # each pass its own task
    calls.clear()
    train_stage2(cfg_for(setup, tmp_path / "shuffled", ("max_steps", 2), ("task_contexts", "shuffled")))
    training = [c for c in calls if isinstance(c[0], list)]  # validation routes by the tasks' own ids
    ids = torch.tensor(training)  # (steps, tasks, batch): one random id per sample and pass
    assert ids.shape == (2, 5, 2) and set(ids.flatten().tolist()) <= set(range(5))
    assert not torch.equal(ids, torch.arange(5)[None, :, None].expand_as(ids))


def test_augmentation_settings_reach_the_training_transform(setup, tmp_path, monkeypatch):
    from prism_vfm.finetune import trainer

    seen = spy_on(monkeypatch, trainer, "DenseTrainTransform")
    cfg = cfg_for(setup, tmp_path / "run", ("scale_range", [0.9, 1.1]), ("photometric", False), ("iters", 1))
    train_stage2(cfg)
    assert [(t.scale_range, t.photometric) for t in seen] == [((0.9, 1.1), False)]
    released = preset("tiny")
    assert (released.scale_range, released.photometric) == ((0.5, 2.0), True)


def test_loss_weights_override_the_released_ones_for_the_named_tasks(setup, tmp_path, monkeypatch):
    from prism_vfm.finetune import trainer

    seen = spy_on(monkeypatch, trainer, "MultiTaskLoss")
    train_stage2(cfg_for(setup, tmp_path / "run", ("loss_weights", {"semseg": 3.0}), ("iters", 1)))
    (loss,) = seen
    assert loss.weights == {"semseg": 3.0, "human_parts": 2.0, "normals": 10.0, "sal": 5.0, "edge": 50.0}
    train_stage2(cfg_for(setup, tmp_path / "released", ("iters", 1)))
    assert seen[1].weights["semseg"] == 1.0


def test_class_balance_weights_the_losses_by_the_training_images_class_counts(setup, tmp_path, monkeypatch):
    from prism_vfm.data.labels import class_pixel_counts
    from prism_vfm.data.pascal_context import PascalContext
    from prism_vfm.finetune import trainer
    from prism_vfm.losses.tasks import class_balance_weights

    seen = spy_on(monkeypatch, trainer, "MultiTaskLoss")
    balance = {"semseg": 0.5, "human_parts": 1.0}
    cfg = cfg_for(setup, tmp_path / "run", ("class_balance", balance), ("holdout", 0.5), ("iters", 1))
    train_stage2(cfg)
    reader = PascalContext(setup / "PASCALContext", "train", ("semseg", "human_parts"), None)
    trained, held_out = trainer._split(len(reader), cfg.holdout, cfg.seed)
    assert trained and held_out
    classes = {"semseg": 21, "human_parts": 7}
    counts = class_pixel_counts((reader[i] for i in trained), classes)
    every = class_pixel_counts((reader[i] for i in range(len(reader))), classes)
    assert counts["human_parts"][1:].sum() > 0  # the tiny data set has parts to balance
    for task, exponent in balance.items():
        torch.testing.assert_close(seen[0].class_weights[task], class_balance_weights(counts[task], exponent))
        # the held-out images are not counted: with them the weights differ
        assert not torch.allclose(seen[0].class_weights[task], class_balance_weights(every[task], exponent))
    train_stage2(cfg_for(setup, tmp_path / "released", ("iters", 1)))
    assert seen[1].class_weights == {}


def test_subpixel_heads_and_the_edge_label_reach_the_model_and_the_reader(setup, tmp_path, monkeypatch):
    from prism_vfm.data import pascal_context
    from prism_vfm.models.load import load

    kinds = []
    real = pascal_context.edge_from_label_map

    def spy(label_map, kind="released"):
        kinds.append(kind)
        return real(label_map, kind)

    monkeypatch.setattr(pascal_context, "edge_from_label_map", spy)
    cfg = cfg_for(
        setup, tmp_path / "run", ("subpixel_heads", ["edge"]), ("edge_label", "evaluation"), ("iters", 1)
    )
    model = load(train_stage2(cfg))[0]
    assert model.subpixel_heads == ("edge",)
    assert [t for t, head in model.heads.items() if head.output == "subpixel"] == ["edge"]
    assert kinds and set(kinds) == {"evaluation"}
    kinds.clear()
    released = load(train_stage2(cfg_for(setup, tmp_path / "released", ("iters", 1))))[0]
    assert released.subpixel_heads == () and set(kinds) == {"released"}
