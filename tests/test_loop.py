"""The training loop knows nothing of PRISM: any model, a step function, accumulation, extra state, resume."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from prism_vfm.train.checkpoint import best_checkpoint, latest_checkpoint, load_checkpoint
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
    keep_last: int = 0


def train_toy(
    out: Path,
    cfg: ToyConfig,
    resume: bool = False,
    seen: list | None = None,
    scores: dict[int, float] | None = None,
) -> TrainingRun:
    """``scores``: the validation score at each step (evaluated every step, ``checkpoints/best`` kept)."""
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
        keep_last=cfg.keep_last,
        samples_per_step=8,
        extra_state=lambda done: {"seen": done * 8},
        restore_state=(seen.append if seen is not None else None),
        evaluate=(lambda done: {"val/score": scores[done], "val/other": 0.0}) if scores else None,
        eval_every=1,
        best_metric="val/score" if scores else "",
    )
    run.best = fit(run, model, model, optimizer, scheduler, batches, loop, CPU)  # type: ignore[attr-defined]
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


SCORES = {1: 10.0, 2: 30.0, 3: 20.0, 4: 30.0, 5: 25.0, 6: 5.0}  # best: step 2 (a tie later is no better)


def test_best_names_the_checkpoint_of_the_highest_score_and_survives_pruning(tmp_path):
    run = train_toy(tmp_path / "run", ToyConfig(keep_last=1), scores=SCORES)
    assert run.best == {
        "metric": "val/score",
        "value": 30.0,
        "step": 2,
        "checkpoint": "checkpoints/step_00000002",
    }
    assert best_checkpoint(run.path) == run.path / "checkpoints" / "step_00000002"
    # keep_last=1 pruned everything else but the latest
    assert [p.name for p in sorted((run.path / "checkpoints").glob("step_*"))] == [
        "step_00000002",
        "step_00000006",
    ]
    _, state = load_checkpoint(best_checkpoint(run.path))
    assert state["step"] == 2 and state["best"]["value"] == 30.0
    _, state = load_checkpoint(latest_checkpoint(run.path))
    assert state["best"] == run.best  # every checkpoint carries the best so far, for a resume


def test_best_is_saved_at_its_step_even_between_periodic_checkpoints(tmp_path):
    run = train_toy(tmp_path / "run", ToyConfig(), scores={1: 5.0, 2: 1.0, 3: 9.0, 4: 2.0, 5: 3.0, 6: 4.0})
    assert best_checkpoint(run.path).name == "step_00000003"  # ckpt_every=2: saved because it was best
    weights, _ = load_checkpoint(best_checkpoint(run.path))
    assert weights.keys() == {"weight", "bias"}


def test_a_resumed_run_compares_against_the_best_before_the_interruption(tmp_path):
    train_toy(tmp_path / "cut", ToyConfig(max_steps=4, keep_last=1), scores=SCORES)
    # After the resume the scores are all below the stored best (30 at step 2): best stays at step 2.
    later = {5: 29.0, 6: 29.5}
    run = train_toy(tmp_path / "cut", ToyConfig(max_steps=6, keep_last=1), resume=True, scores=later)
    assert run.best is not None and (run.best["step"], run.best["value"]) == (2, 30.0)
    assert best_checkpoint(run.path).name == "step_00000002"
    run = train_toy(tmp_path / "more", ToyConfig(max_steps=4), scores=SCORES)
    run = train_toy(tmp_path / "more", ToyConfig(max_steps=6), resume=True, scores={5: 31.0, 6: 0.0})
    assert (
        run.best is not None and run.best["step"] == 5 and best_checkpoint(run.path).name == "step_00000005"
    )


def test_a_best_metric_the_evaluation_lacks_is_an_error_naming_it(tmp_path):
    run = TrainingRun(tmp_path / "run", ToyConfig())
    model = nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    def step(batch, step: int, micro: int):
        loss = model(X[0]).square().mean()
        return loss, {"total": loss.detach()}

    loop = Loop(2, step, evaluate=lambda done: {"val/top1": 1.0}, eval_every=1, best_metric="val/top5")
    with pytest.raises(KeyError, match="best_metric 'val/top5' is not among the evaluation's scores"):
        fit(run, model, model, optimizer, scheduler, iter(range(9)), loop, CPU)
