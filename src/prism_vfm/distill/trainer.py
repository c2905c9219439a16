"""Stage 1: distil the frozen teachers into the student, top to bottom in one function.

run folder (checked, resumed) → data → teachers → student → optimiser and schedule → the step function,
handed to the training loop (:func:`prism_vfm.train.loop.fit`) with when to log and save.
Every batch, teacher assignment and random draw of the student is a function of (seed, step, shard), so a
run gives the same weights whatever its number of processes (same global batch) and however often it is
interrupted and resumed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from prism_vfm.data.image_folder import UnlabelledImageFolder, stage1_train_transform
from prism_vfm.data.sampling import SeededAugmentation, ShardedBatchSampler, mix_seed
from prism_vfm.distill.assignment import balanced_teacher_split, single_teacher
from prism_vfm.distill.config import Stage1Config, validate_stage1
from prism_vfm.distill.student import build_student
from prism_vfm.losses.distill import DistillLoss, distillation_criterion
from prism_vfm.models.prism_vit import PrismViT
from prism_vfm.teachers import build_teacher
from prism_vfm.train.distributed import all_reduce_sum, wrap_model
from prism_vfm.train.loop import Loop, fit
from prism_vfm.train.optim import decay_split, scale_lr
from prism_vfm.train.run import start_run
from prism_vfm.train.schedule import warmup_cosine

logger = logging.getLogger(__name__)


def param_groups(model: PrismViT, lr: float, pretrained_scale: float, weight_decay: float) -> list[dict]:
    """AdamW groups: new vs pretrained learning rate × weight decay on weights, none on biases and norms
    (SPEC §6; :mod:`prism_vfm.train.optim`)."""
    groups = []
    for origin, params in model.parameter_groups().items():
        scale = 1.0 if origin == "new" else pretrained_scale
        split = decay_split(model, params)
        for decay in (True, False):
            chosen = split[decay]
            if chosen:
                groups.append(
                    {
                        "params": chosen,
                        "lr": lr * scale,
                        "weight_decay": weight_decay if decay else 0.0,
                        "name": f"{origin}{'' if decay else '_no_decay'}",
                    }
                )
    return groups


def _assign(cfg: Stage1Config, batch: int, n_teachers: int, step: int, shard: int) -> tuple[Tensor, Tensor]:
    """The teacher of each sample, and the ids its router is given (the same unless shuffled)."""
    g = torch.Generator().manual_seed(mix_seed(cfg.seed, step, shard, 0))
    if cfg.teachers.assignment == "single":
        ctx = single_teacher(batch, n_teachers, g)
    else:
        ctx = balanced_teacher_split(batch, n_teachers, g)
    if cfg.teachers.router_contexts == "assigned":
        return ctx, ctx
    shuffled = torch.Generator().manual_seed(mix_seed(cfg.seed, step, shard, 2))
    return ctx, torch.randint(n_teachers, (batch,), generator=shuffled)


def build_criterion(cfg: Stage1Config) -> DistillLoss:
    """The distillation loss of ``cfg.loss`` (cosine + smooth-L1, plus decorrelation unless off)."""
    return distillation_criterion(
        cfg.loss.decorrelation,
        decorrelation_taps=cfg.loss.decorrelation_taps,
        decorrelation_weight=cfg.loss.decorrelation_weight,
        cos_weight=cfg.loss.cos_weight,
        l1_weight=cfg.loss.l1_weight,
    )


def distill_loss(
    net: nn.Module,
    model: PrismViT,
    teachers: Sequence[nn.Module],
    criterion: DistillLoss,
    x: Tensor,
    ctx: Tensor,
    lb_weight: float,
    router_ctx: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor], dict[str, Any]]:
    """One Stage-1 forward: the student (``net``, ``model`` or its DDP/FSDP wrapper) on teacher contexts
    ``ctx`` (on the host, where they are checked), its projections, the frozen teachers on their own
    samples, and the loss. ``router_ctx`` (default ``ctx``) are the ids the router is given instead.

    Returns the loss, its terms (detached, ``"aux"`` included) and the student's routing statistics
    (:meth:`PrismViT.routing_stats`, on the device).
    """
    out = net(x, ctx if router_ctx is None else router_ctx, return_routing=True)
    aux = out.aux_loss
    student = model.project_by_teacher(out.taps, ctx, model.grid_size(x))
    with torch.no_grad():
        targets = {
            t: teachers[t](x.index_select(0, (ctx == t).nonzero().squeeze(1).to(x.device))) for t in student
        }
    terms = criterion(student, targets)
    loss = terms["total"] + lb_weight * aux
    # Heads of teachers absent from this batch ("single" assignment) join the graph with zero weight, so
    # DDP needs no find_unused_parameters (FSDP2 needs no such help).
    if isinstance(net, DDP):
        loss = loss + model.absent_heads_term(student)
    routing = model.routing_stats(out)
    return loss, {**{k: v.detach() for k, v in terms.items()}, "aux": aux.detach()}, routing


def train_stage1(
    cfg: Stage1Config, resume: bool = False, overwrite: bool = False, allow_config_change: bool = False
) -> Path:
    """Run Stage 1 as configured; returns the run directory. Launch under torchrun for several processes.

    ``resume``, ``overwrite`` and ``allow_config_change`` are those of
    :class:`~prism_vfm.train.run.TrainingRun`.
    """
    validate_stage1(cfg)
    env, run = start_run(
        cfg, resume=resume, overwrite=overwrite, allow_config_change=allow_config_change, sharded=cfg.fsdp
    )
    sharded = cfg.fsdp and env.world_size > 1
    torch.manual_seed(cfg.seed)

    # data
    images = UnlabelledImageFolder(cfg.data, max_workers=max(cfg.workers, 1))
    global_batch = cfg.batch_size * env.world_size * cfg.accum
    steps_per_epoch = len(images) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"{cfg.data} has {len(images)} images, fewer than one global batch of {global_batch}"
        )
    total_steps = max(1, int(cfg.epochs * steps_per_epoch))
    end_step = min(total_steps, cfg.max_steps) if cfg.max_steps > 0 else total_steps

    # teachers and student
    img_size = cfg.student.img_size
    teachers = [
        build_teacher(name, img_size, cfg.teachers.weights).to(env.device) for name in cfg.teachers.names
    ]
    model = build_student(cfg.student, teacher_dims=[t.out_dim for t in teachers]).to(env.device).train()
    run.restore_weights(model)
    units = [
        *model.blocks,
        *(head for heads in (model.projectors or []) for head in cast(nn.ModuleList, heads)),
    ]
    net = wrap_model(model, env, cfg.fsdp, units)

    # optimiser and per-iteration schedule (built after sharding: FSDP replaces the parameters)
    lr = min(cfg.optim.lr * global_batch / cfg.optim.lr_reference_batch, cfg.optim.max_lr)
    groups = param_groups(model, lr, cfg.optim.pretrained_lr_scale, cfg.optim.weight_decay)
    if cfg.optim.router_lr_scale != 1.0:
        groups = scale_lr(groups, model.routing_parameters(), cfg.optim.router_lr_scale, lr)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=cfg.optim.betas)
    warmup = int(cfg.optim.warmup_epochs * steps_per_epoch)
    o = cfg.optim

    def factor(step: int) -> float:
        return warmup_cosine(step, total_steps, warmup, lr, o.warmup_start_lr, o.min_lr) / lr

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    sampler = ShardedBatchSampler(
        len(images), cfg.batch_size, end_step, cfg.seed, env.rank, env.world_size, cfg.accum, run.start_step
    )
    loader = DataLoader(
        SeededAugmentation(images, stage1_train_transform(img_size), cfg.seed),
        batch_sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=env.device.type == "cuda",
        persistent_workers=cfg.workers > 0,
    )
    criterion = build_criterion(cfg)

    routing: dict[str, Any] = {}  # the routing statistics of the last micro-batch, for the log

    def forward_step(batch: Tensor, step: int, micro: int) -> tuple[Tensor, dict[str, Tensor]]:
        x = batch.to(env.device, non_blocking=True)
        shard = sampler.shard(micro)
        ctx, router_ctx = _assign(cfg, x.shape[0], len(teachers), step, shard)
        # The student's own randomness (expert dropout, router noise) is tied to (step, shard) too.
        torch.manual_seed(mix_seed(cfg.seed, step, shard, 1))
        loss, terms, stats = distill_loss(
            net, model, teachers, criterion, x, ctx, cfg.loss.lb_weight, router_ctx
        )
        routing.update(stats)
        return loss, terms

    def scalars(done: int) -> dict[str, float]:
        skipped = {"data/skipped_images": float(all_reduce_sum(torch.tensor(images.skipped)))}
        experts = model.moe_config.num_experts
        return {**skipped, **_routing_scalars(routing, experts, list(cfg.teachers.names))}

    loop = Loop(
        end_step,
        forward_step,
        accum=cfg.accum,
        amp=cfg.amp,
        sharded=sharded,
        clip_grad=cfg.optim.clip_grad,
        log_every=cfg.log_every,
        ckpt_every=cfg.ckpt_every,
        keep_last=cfg.keep_last,
        samples_per_step=global_batch,
        desc="stage 1",
        scalars=scalars,
        checkpoint_at=lambda done: done % steps_per_epoch == 0,  # every epoch end
        extra_state=lambda done: {"epoch": done / steps_per_epoch},
        model_config=cast("dict[str, Any] | None", model._hub_mixin_config),  # init kwargs: a dict
    )
    fit(run, model, net, optimizer, scheduler, iter(loader), loop, env)
    if env.is_main and images.skipped:
        logger.warning("%d unreadable images were replaced by their next readable neighbour", images.skipped)
    return run.path


def _routing_scalars(stats: dict[str, Any], e: int, names: list[str]) -> dict[str, float]:
    """Per MoE layer of ``stats`` (:meth:`PrismViT.routing_stats` of the last micro-batch): each
    context's expert-load imbalance (max share × ``e``, the number of experts) and mean λ."""
    out: dict[str, float] = {}
    for layer, (counts, lam) in enumerate(zip(stats["expert_counts"], stats["lambda_mean"], strict=True)):
        share = counts / counts.sum(1, keepdim=True).clamp_min(1)
        for c, name in enumerate(names):
            if counts[c].sum() > 0:
                out[f"routing/layer{layer}/{name}/max_load"] = float(share[c].max() * e)
                out[f"routing/layer{layer}/{name}/lambda"] = float(lam[c])
    return {k: v for k, v in out.items() if math.isfinite(v)}
