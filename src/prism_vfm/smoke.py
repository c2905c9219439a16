"""A few Stage-1 steps of a tiny student against the three tiny teachers, on random images.

It checks an installation end to end on a CPU in seconds: routing by teacher context, the distillation
and decorrelation losses, load balancing, backward, the training loop and its checkpoints. It runs the
Stage-1 step (:func:`~prism_vfm.distill.trainer.distill_loss`) in the library's one training loop, on
images held in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from prism_vfm.distill.assignment import balanced_teacher_split
from prism_vfm.distill.trainer import distill_loss
from prism_vfm.losses.decorrelation import DecorrelationLoss
from prism_vfm.losses.distill import DistillLoss
from prism_vfm.models.prism_vit import PrismViT
from prism_vfm.teachers import TINY_TEACHERS, build_teacher
from prism_vfm.train.checkpoint import latest_checkpoint
from prism_vfm.train.distributed import DistEnv
from prism_vfm.train.logging import read_scalars
from prism_vfm.train.loop import Loop, fit
from prism_vfm.train.run import TrainingRun


@dataclass
class SmokeConfig:
    """The smoke run's settings (saved as the run folder's ``config.yaml``)."""

    steps: int = 30
    seed: int = 0
    batch: int = 6
    lr: float = 1e-3
    weight_decay: float = 0.01
    lb_weight: float = 0.1


def run_smoke(
    steps: int = 30,
    out_dir: Path | str = "runs/smoke",
    seed: int = 0,
    batch: int = 6,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train for ``steps`` into the run folder ``out_dir``; a summary (first/last loss, λ and expert use)."""
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got {steps} and {batch}")
    cfg = SmokeConfig(steps=steps, seed=seed, batch=batch)
    run = TrainingRun(out_dir, cfg, overwrite=overwrite)
    torch.manual_seed(seed)
    teachers = [build_teacher(spec, 32, weights="none") for spec in TINY_TEACHERS]
    model = PrismViT(
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=4,
        num_heads=3,
        moe_layers=(1, 3),
        teacher_dims=tuple(t.out_dim for t in teachers),
        num_experts=6,
        top_k=2,
    ).train()
    criterion = DistillLoss("cos+l1+decorrelation", decorrelation=DecorrelationLoss())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    images = torch.randn(4 * batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    batches = (images[(s % 4) * batch : (s % 4 + 1) * batch] for s in range(steps))

    def forward_step(x: Tensor, step: int, micro: int) -> tuple[Tensor, dict[str, Tensor]]:
        ctx = balanced_teacher_split(x.shape[0], len(teachers))
        loss, terms, _ = distill_loss(model, model, teachers, criterion, x, ctx, cfg.lb_weight)
        return loss, {**terms, "total": loss.detach()}

    config = cast("dict[str, Any]", model._hub_mixin_config)  # init kwargs: a dict
    loop = Loop(steps, forward_step, log_every=1, desc="smoke", model_config=config)
    fit(run, model, model, optimizer, scheduler, batches, loop, DistEnv(0, 1, 0, torch.device("cpu")))
    losses = [r["loss/total"] for r in read_scalars(run.path)]
    model.eval()
    with torch.no_grad():
        out = model(images[:batch], balanced_teacher_split(batch, len(teachers)), return_routing=True)
    stats = model.routing_stats(out)
    return {
        "steps": steps,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "lambda_mean_per_layer_and_teacher": [v.tolist() for v in stats["lambda_mean"]],
        "expert_share_per_layer_and_teacher": [
            (c / c.sum(1, keepdim=True).clamp_min(1)).round(decimals=3).tolist()
            for c in stats["expert_counts"]
        ],
        "saved_to": str(latest_checkpoint(run.path)),
    }
