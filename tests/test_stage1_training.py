"""Stage-1 training on tiny teachers and a tiny generated image folder."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from prism_vfm.config import apply_overrides
from prism_vfm.data.synthetic import write_tiny_image_folder
from prism_vfm.distill.config import preset
from prism_vfm.distill.trainer import train_stage1
from prism_vfm.train.checkpoint import latest_checkpoint
from prism_vfm.train.distributed import shutdown_distributed
from prism_vfm.train.logging import read_scalars


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_tiny_image_folder(root, n_classes=3, per_class=8, size=(40, 48), seed=0, odd_formats=True)
    return root


def tiny_cfg(images: Path, out: Path, *overrides):
    return apply_overrides(preset("tiny"), [("data", str(images)), ("out", str(out)), *overrides])


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(run) / "model.safetensors")


def test_short_run_learns_logs_every_term_and_keeps_last_checkpoints(images, tmp_path):
    run = train_stage1(tiny_cfg(images, tmp_path / "run", ("keep_last", 2)))
    records = read_scalars(run)
    assert len(records) == 10 and records[-1]["step"] == 10
    assert records[-1]["loss/total"] < 0.7 * records[0]["loss/total"]
    last = records[-1]
    for key in [
        "loss/0_level1",
        "loss/1_level2",
        "loss/2_level1",
        "loss/decorrelation_loss",
        "loss/aux",
        "lr",
        "images_per_s",
        "grad_norm",
        "data/skipped_images",
        "routing/layer0/tiny_a/lambda",
        "routing/layer1/tiny_c/max_load",
    ]:
        assert key in last, key
    assert last["data/skipped_images"] > 0  # the folder holds a truncated file and a non-image
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert kept == ["step_00000008", "step_00000010"]
    assert (run / "config.yaml").is_file() and any((run / "tensorboard").iterdir())


def _ddp_worker(rank: int, port: int, images: str, out: str, fsdp: bool) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    common = (("batch_size", 3), ("fsdp", fsdp), ("ckpt_every", 2))
    if fsdp:  # the sharded run also stops halfway and resumes (sharded optimiser state round trip)
        train_stage1(tiny_cfg(Path(images), Path(out), *common, ("max_steps", 2)))
    train_stage1(tiny_cfg(Path(images), Path(out), *common, ("max_steps", 4)), resume=fsdp)
    shutdown_distributed()


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_process_run_matches_one_process_with_the_same_global_batch(images, tmp_path, engine):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(
        _ddp_worker, args=(port, str(images), str(tmp_path / "ddp"), engine == "fsdp"), nprocs=2, join=True
    )
    torch.set_num_threads(1)
    train_stage1(tiny_cfg(images, tmp_path / "single", ("batch_size", 3), ("accum", 2), ("max_steps", 4)))
    for run in ("ddp", "single"):
        assert latest_checkpoint(tmp_path / run).name == "step_00000004"
    ddp, single = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "single")
    assert ddp.keys() == single.keys()
    worst = max(float((ddp[k] - single[k]).abs().max()) for k in ddp)
    assert worst < 1e-5, worst


def _cli(images: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "prism_vfm.cli",
        "distill",
        "--preset",
        "tiny",
        "--data",
        str(images),
        "--out",
        str(out),
        "--set",
        "epochs=4",
        *extra,
    ]


def test_sigkill_then_resume_ends_with_identical_weights(images, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli(images, tmp_path / "whole"), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(
        _cli(images, tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    pointer = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and not (
        pointer.exists() and pointer.read_text().strip() >= "step_00000008"
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = latest_checkpoint(tmp_path / "killed").name
    assert stopped_at < "step_00000020", "the run finished before it could be killed"
    subprocess.run(_cli(images, tmp_path / "killed", "--resume"), check=True, env=env, capture_output=True)
    whole, resumed = final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed")
    assert (
        latest_checkpoint(tmp_path / "killed").name
        == latest_checkpoint(tmp_path / "whole").name
        == "step_00000020"
    )
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


def test_resume_without_checkpoint_is_a_clear_error(images, tmp_path):
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        train_stage1(tiny_cfg(images, tmp_path / "fresh"), resume=True)


def test_cli_rejects_unknown_keys(images, tmp_path):
    result = subprocess.run(
        _cli(images, tmp_path / "x", "--set", "optim.lrr=1"), capture_output=True, text=True
    )
    assert result.returncode != 0 and "unknown configuration key optim.lrr" in result.stderr


def test_a_bf16_autocast_step_runs_on_the_cpu_and_trains(images, tmp_path, monkeypatch):
    from prism_vfm.distill import trainer

    initial: dict[str, torch.Tensor] = {}
    real = trainer.build_student

    def keep_initial(*args, **kwargs):
        model = real(*args, **kwargs)
        initial.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(trainer, "build_student", keep_initial)
    run = train_stage1(tiny_cfg(images, tmp_path / "bf16", ("amp", "bf16"), ("max_steps", 2)))
    losses = [r["loss/total"] for r in read_scalars(run)]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    trained = final_weights(run)
    for key in ("blocks.1.moe.experts.w1", "blocks.1.moe.router.gate.weight", "blocks.0.attn.qkv.weight"):
        assert trained[key].dtype == torch.float32  # the weights stay fp32 under autocast
        assert not torch.equal(trained[key], initial[key]), key


def test_shuffled_router_contexts_hide_the_teacher_from_the_router_only(images, tmp_path, monkeypatch):
    from prism_vfm.models.prism_vit import PrismViT

    seen: dict[str, list[torch.Tensor]] = {"router": [], "teacher": []}
    forward, project = PrismViT.forward, PrismViT.project_by_teacher

    def spy_forward(self, x, context=None, *args, **kwargs):
        seen["router"].append(torch.as_tensor(context).clone())
        return forward(self, x, context, *args, **kwargs)

    def spy_project(self, taps, ctx, grid):
        seen["teacher"].append(torch.as_tensor(ctx).clone())
        return project(self, taps, ctx, grid)

    monkeypatch.setattr(PrismViT, "forward", spy_forward)
    monkeypatch.setattr(PrismViT, "project_by_teacher", spy_project)
    runs = {}
    for mode in ("assigned", "shuffled"):
        seen["router"], seen["teacher"] = [], []
        train_stage1(tiny_cfg(images, tmp_path / mode, ("max_steps", 3), ("teachers.router_contexts", mode)))
        runs[mode] = (torch.cat(seen["router"]), torch.cat(seen["teacher"]))
    router, teacher = runs["assigned"]
    assert torch.equal(router, teacher)  # the default: the router sees the distilling teacher's id
    shuffled_router, shuffled_teacher = runs["shuffled"]
    assert torch.equal(shuffled_teacher, teacher)  # the same samples go to the same teachers
    assert not torch.equal(shuffled_router, teacher)  # but the router is told something else
    assert set(shuffled_router.tolist()) <= {0, 1, 2}
