"""The one training loop: steps, gradient accumulation, logging, checkpoints and the final barrier.

A stage builds its data, model, optimiser and schedule, opens its :class:`~prism_vfm.train.run.TrainingRun`
and hands :func:`fit` a :class:`Loop`: the step function and how often to log, evaluate and save. ::

    run = TrainingRun(cfg.out, cfg, resume=resume)           # checks the folder before anything is built
    model = build(...); run.restore_weights(model); net = wrap_model(model, env, fsdp)
    optimizer, scheduler = ...
    fit(run, model, net, optimizer, scheduler, batches, Loop(end_step, step=step_fn, accum=2), env)

The step function gets one micro-batch, the step and the micro-step index, and returns the loss and its
terms (detached scalars, logged as ``loss/<name>``). The loop runs it under autocast and the gradient-sync
context, backpropagates ``loss / accum`` (scaled in fp16), unscales and clips the gradients, steps the
optimiser and the per-iteration schedule. With ``best_metric``, every evaluation that improves on the
best score so far is saved as a checkpoint that ``checkpoints/best`` names (kept through pruning); the
best score travels in every checkpoint, so a resumed run goes on comparing against it.

It sets no random seed: a stage that wants the same weights whatever its number of processes seeds its own
draws from (seed, step, shard) inside the step function.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn
from tqdm import tqdm

from prism_vfm.train.checkpoint import save_checkpoint
from prism_vfm.train.distributed import (
    DistEnv,
    all_reduce_sum,
    barrier,
    full_state,
    gradient_sync,
    load_optimizer_state,
    to_local_scalar,
)
from prism_vfm.train.logging import RunLogger
from prism_vfm.train.precision import MixedPrecision
from prism_vfm.train.run import TrainingRun

StepFn = Callable[[Any, int, int], tuple[Tensor, dict[str, Tensor]]]
"""``(batch, step, micro) → (loss, terms)``: one micro-batch's forward."""


@dataclass
class Loop:
    """What the loop runs and when it logs, evaluates and saves.

    Attributes:
        end_step: the step after the last one run (a run may stop before its schedule ends).
        step: the step function (see :data:`StepFn`).
        accum: micro-batches per optimiser step.
        amp: ``"auto"``, ``"bf16"``, ``"fp16"`` or ``"fp32"`` (see :mod:`prism_vfm.train.precision`).
        sharded: the parameters are sharded (FSDP), for which fp16 loss scaling is not offered.
        clip_grad: global gradient-norm clip (``None``: not clipped, the norm is still logged).
        log_every: steps between log records (and the last step).
        ckpt_every: steps between checkpoints; 0: none but the last (and ``checkpoint_at``'s).
        keep_last: checkpoints kept (0: all).
        samples_per_step: samples in one optimiser step over every process (the logged rate).
        sample_name: what a sample is, naming the logged rate (``<name>_per_s``) and the progress bar's.
        desc: the progress bar's label.
        scalars: extra scalars at each log step, given the step (called on every process).
        evaluate: scalars of an evaluation, given the step, logged every ``eval_every`` steps (0: at the end).
        best_metric: the key of ``evaluate``'s scalars whose best value names ``checkpoints/best`` ('': none).
        best_mode: ``"max"`` (higher is better, e.g. top-1) or ``"min"`` (e.g. a loss).
        checkpoint_at: extra checkpoint steps (e.g. epoch ends).
        extra_state: entries added to each checkpoint's training state, given the step.
        restore_state: called with the saved training state on resume.
        before_save: called on every process before a checkpoint (e.g. to average buffers).
        model_config: the model's init arguments, saved as the checkpoint's ``config.json``.
    """

    end_step: int
    step: StepFn
    accum: int = 1
    amp: str = "fp32"
    sharded: bool = False
    clip_grad: float | None = None
    log_every: int = 20
    ckpt_every: int = 0
    keep_last: int = 3
    samples_per_step: int = 1
    sample_name: str = "images"
    desc: str = "train"
    scalars: Callable[[int], dict[str, float]] | None = None
    evaluate: Callable[[int], dict[str, float]] | None = None
    eval_every: int = 0
    best_metric: str = ""
    best_mode: Literal["max", "min"] = "max"
    checkpoint_at: Callable[[int], bool] | None = None
    extra_state: Callable[[int], dict[str, Any]] | None = None
    restore_state: Callable[[dict[str, Any]], None] | None = None
    before_save: Callable[[], None] | None = None
    model_config: dict[str, Any] | None = None


def _restore(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
) -> None:
    """Load the saved optimiser and schedule, keeping the hyperparameters they were built with now.

    The moments and the step count come from the checkpoint; learning rates, betas and weight decay are the
    configured ones (identical to the saved ones unless a resume changed them), the learning rate taken at
    the resumed step of the configured schedule.
    """
    configured = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups]
    load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for group, values in zip(optimizer.param_groups, configured, strict=True):
        group.update(values)
    if all("initial_lr" in g for g in configured):
        scheduler.base_lrs = [g["initial_lr"] for g in configured]
        with warnings.catch_warnings():  # get_lr outside step() warns; here it is the schedule's value
            warnings.simplefilter("ignore", UserWarning)
            lrs = scheduler.get_lr()
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr


def _improves(value: float, best: dict[str, Any] | None, mode: str) -> bool:
    """Whether ``value`` beats the best record so far (a NaN never does)."""
    if value != value:
        return False
    if best is None:
        return True
    return value > best["value"] if mode == "max" else value < best["value"]


def _due(done: int, every: int, end: int) -> bool:
    return done == end or (every > 0 and done % every == 0)


def fit(
    run: TrainingRun,
    model: nn.Module,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterator[Any],
    loop: Loop,
    env: DistEnv,
) -> dict[str, Any] | None:
    """Train from ``run.start_step`` to ``loop.end_step``; returns the best record (``{"metric", "value",
    "step", "checkpoint"}``, the checkpoint relative to the run folder) or None without ``best_metric``.

    ``model`` is the bare model (its state is saved, its gradients clipped), ``net`` what the step function
    calls (the model or its DDP/FSDP wrapper: its gradient sync is skipped on accumulation micro-steps).
    Every process must call it; only the main one writes. It returns after every process has reached the
    end, so the last checkpoint is on disk when any of them goes on.
    """
    precision = MixedPrecision(loop.amp, env.device, sharded=loop.sharded)
    if loop.best_mode not in ("max", "min"):
        raise ValueError(f"best_mode must be 'max' or 'min', got {loop.best_mode!r}")
    best: dict[str, Any] | None = None
    if run.resume_state is not None:
        saved_best = run.resume_state.get("best")
        if saved_best is not None and saved_best.get("metric") == loop.best_metric:
            best = dict(saved_best)
        _restore(model, optimizer, scheduler, run.resume_state)
        precision.load_state_dict(run.resume_state.get("scaler", {}))
        if loop.restore_state is not None:
            loop.restore_state(run.resume_state)
    log = RunLogger(run.path, enabled=env.is_main)
    bar = tqdm(
        total=loop.end_step,
        initial=run.start_step,
        desc=loop.desc,
        unit="step",
        disable=not env.is_main,
        dynamic_ncols=True,
    )
    tic, seen = time.perf_counter(), 0
    for step in range(run.start_step, loop.end_step):
        sums: dict[str, Tensor] = {}
        for micro in range(loop.accum):
            batch = next(batches)
            with gradient_sync(net, micro == loop.accum - 1):
                with precision.autocast():
                    loss, terms = loop.step(batch, step, micro)
                precision.backward(loss / loop.accum)
            for k, v in terms.items():
                sums[k] = sums[k] + v.detach() / loop.accum if k in sums else v.detach() / loop.accum
        max_norm = loop.clip_grad if loop.clip_grad is not None else float("inf")
        grad_norm = precision.step(optimizer, model.parameters(), max_norm)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seen += loop.samples_per_step
        done = step + 1
        bar.update(1)

        if _due(done, loop.log_every, loop.end_step):
            rate = seen / (time.perf_counter() - tic)
            scalars = {f"loss/{k}": float(all_reduce_sum(v) / env.world_size) for k, v in sums.items()}
            scalars.update(
                {
                    "lr": cast(float, scheduler.get_last_lr()[0]),  # lr given as a float
                    f"{loop.sample_name}_per_s": rate,
                    "grad_norm": to_local_scalar(grad_norm),
                }
            )
            if loop.scalars is not None:
                scalars.update(loop.scalars(done))
            log.scalars(done, scalars)
            shown = {"loss": f"{scalars['loss/total']:.4f}"} if "loss/total" in scalars else {}
            rate_label = "img_s" if loop.sample_name == "images" else f"{loop.sample_name}_s"
            bar.set_postfix(**shown, lr=f"{scalars['lr']:.2e}", **{rate_label: f"{rate:.1f}"})
            tic, seen = time.perf_counter(), 0
        improved = False
        if loop.evaluate is not None and _due(done, loop.eval_every, loop.end_step):
            scores = loop.evaluate(done)
            log.scalars(done, scores)
            if loop.best_metric:
                if loop.best_metric not in scores:
                    raise KeyError(
                        f"best_metric {loop.best_metric!r} is not among the evaluation's scores "
                        f"({', '.join(sorted(scores))})"
                    )
                value = float(scores[loop.best_metric])
                improved = _improves(value, best, loop.best_mode)
                if improved:
                    name = f"checkpoints/step_{done:08d}"
                    best = {"metric": loop.best_metric, "value": value, "step": done, "checkpoint": name}
        extra = loop.checkpoint_at is not None and loop.checkpoint_at(done)
        if improved or extra or _due(done, loop.ckpt_every, loop.end_step):
            if loop.before_save is not None:
                loop.before_save()
            weights, optim_state = full_state(model, optimizer)  # collective under FSDP
            if env.is_main:
                state = {
                    "optimizer": optim_state,
                    "scheduler": scheduler.state_dict(),
                    "step": done,
                    "scaler": precision.state_dict(),  # the fp16 loss scale (empty otherwise)
                    "best": best,
                }
                if loop.extra_state is not None:
                    state.update(loop.extra_state(done))
                save_checkpoint(
                    run.path, done, weights, state, loop.keep_last, loop.model_config, best=improved
                )
    bar.close()
    log.close()
    barrier()  # the last checkpoint is on disk before any rank returns
    return best
