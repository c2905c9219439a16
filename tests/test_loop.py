"""The training loop knows nothing of PRISM: any model, a step function, accumulation, extra state, resume."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from prism_vfm.train.checkpoint import latest_checkpoint, load_checkpoint
from prism_vfm.train.distributed import DistEnv
from prism_vfm.train.logging import read_scalars
from prism_vfm.train.loop import Loop, fit
from prism_vfm.train.run import TrainingRun

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
X = torch.randn(8, 8, 4, generator=torch.Generator().manual_seed(0))  # 8 steps of 8 samples
Y = torch.randn(8, 8, 2, generator=torch.Generator().manual_seed(1))


@dataclass
class ToyConfig:
    max_steps: int = 6
    accum: int = 1


def train_toy(out: Path, cfg: ToyConfig, resume: bool = False, seen: list | None = None) -> TrainingRun:
    run = TrainingRun(out, cfg, resume=resume)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    run.restore_weights(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / 10)
    micro = 8 // cfg.accum
    batches = (
        (X[s, m * micro : (m + 1) * micro], Y[s, m * micro : (m + 1) * micro])
        for s in range(run.start_step, cfg.max_steps)
        for m in range(cfg.accum)
    )

    def step(batch, step: int, micro_step: int):
        x, y = batch
        loss = (model(x) - y).square().mean()
        return loss, {"total": loss.detach()}

    loop = Loop(
        cfg.max_steps,
        step,
        accum=cfg.accum,
        log_every=1,
        ckpt_every=2,
        keep_last=0,
        samples_per_step=8,
        extra_state=lambda done: {"seen": done * 8},
        restore_state=(seen.append if seen is not None else None),
    )
    fit(run, model, model, optimizer, scheduler, batches, loop, CPU)
    return run


def test_accumulated_micro_batches_train_like_one_batch(tmp_path):
    whole = train_toy(tmp_path / "whole", ToyConfig(accum=1))
    split = train_toy(tmp_path / "split", ToyConfig(accum=4))
    a = load_file(latest_checkpoint(whole.path) / "model.safetensors")
    b = load_file(latest_checkpoint(split.path) / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert [r["step"] for r in read_scalars(split.path)] == [1, 2, 3, 4, 5, 6]


def test_extra_state_is_saved_and_a_resumed_run_ends_bit_identical(tmp_path):
    whole = train_toy(tmp_path / "whole", ToyConfig(max_steps=6))
    train_toy(tmp_path / "cut", ToyConfig(max_steps=4))
    seen: list = []
    cut = train_toy(tmp_path / "cut", ToyConfig(max_steps=6), resume=True, seen=seen)
    assert seen and seen[0]["seen"] == 32 and seen[0]["step"] == 4
    _, state = load_checkpoint(latest_checkpoint(cut.path))
    assert state["step"] == 6 and state["seen"] == 48
    a = load_file(latest_checkpoint(whole.path) / "model.safetensors")
    b = load_file(latest_checkpoint(cut.path) / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
