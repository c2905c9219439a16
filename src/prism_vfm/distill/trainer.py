"""Stage 1: distil the frozen teachers into the student, top to bottom in one function.

environment → data → teachers → student → optimiser and schedule → (resume) → steps → checkpoints.
Every batch, teacher assignment and random draw of the student is a function of (seed, step, shard), so a
run gives the same weights whatever its number of processes (same global batch) and however often it is
interrupted and resumed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from prism_vfm.config import save_yaml
from prism_vfm.data.image_folder import UnlabelledImageFolder, stage1_train_transform
from prism_vfm.data.sampling import SeededAugmentation, ShardedBatchSampler, mix_seed
from prism_vfm.distill.assignment import balanced_teacher_split, single_teacher
from prism_vfm.distill.config import Stage1Config
from prism_vfm.distill.student import build_student
from prism_vfm.losses.distill import DistillLoss, distillation_criterion
from prism_vfm.models.prism_vit import PrismViT
from prism_vfm.teachers import build_teacher
from prism_vfm.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from prism_vfm.train.distributed import (
    DistEnv,
    all_reduce_sum,
    barrier,
    full_state,
    gradient_sync,
    init_distributed,
    load_optimizer_state,
    to_local_scalar,
    wrap_model,
)
from prism_vfm.train.logging import RunLogger
from prism_vfm.train.precision import autocast
from prism_vfm.train.schedule import warmup_cosine

logger = logging.getLogger(__name__)


def param_groups(model: PrismViT, lr: float, pretrained_scale: float, weight_decay: float) -> list[dict]:
    """AdamW groups: new vs pretrained learning rate × decay on ≥2-D parameters only (SPEC §6)."""
    groups = []
    for origin, params in model.parameter_groups().items():
        scale = 1.0 if origin == "new" else pretrained_scale
        for decay in (True, False):
            chosen = [p for p in params if p.requires_grad and (p.ndim >= 2) == decay]
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


def _assign(cfg: Stage1Config, batch: int, n_teachers: int, step: int, shard: int) -> Tensor:
    g = torch.Generator().manual_seed(mix_seed(cfg.seed, step, shard, 0))
    if cfg.teachers.assignment == "single":
        return single_teacher(batch, n_teachers, g)
    return balanced_teacher_split(batch, n_teachers, g)


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
) -> tuple[Tensor, dict[str, Tensor], dict[str, Any]]:
    """One Stage-1 forward: the student (``net``, ``model`` or its DDP/FSDP wrapper) on teacher contexts
    ``ctx`` (on the host, where they are checked), its projections, the frozen teachers on their own
    samples, and the loss.

    Returns the loss, its terms (detached, ``"aux"`` included) and the student's routing statistics
    (:meth:`PrismViT.routing_stats`, on the device).
    """
    out = net(x, ctx, return_routing=True)
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


def train_stage1(cfg: Stage1Config, resume: bool = False) -> Path:
    """Run Stage 1 as configured; returns the run directory. Launch under torchrun for several processes."""
    env: DistEnv = init_distributed()
    run_dir = Path(cfg.out)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
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

    start_step, saved = 0, None
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise FileNotFoundError(
                f"--resume: {run_dir} has no checkpoint (looked for {run_dir}/checkpoints/latest)"
            )
        weights, saved = load_checkpoint(ckpt)
        model.load_state_dict(weights, strict=True)
        start_step = int(saved["step"])
        if env.is_main:
            logger.info("resuming %s at step %d", ckpt, start_step)
    units = [
        *model.blocks,
        *(head for heads in (model.projectors or []) for head in cast(nn.ModuleList, heads)),
    ]
    net = wrap_model(model, env, cfg.fsdp, units)

    # optimiser and per-iteration schedule (built after sharding: FSDP replaces the parameters)
    lr = min(cfg.optim.lr * global_batch / cfg.optim.lr_reference_batch, cfg.optim.max_lr)
    groups = param_groups(model, lr, cfg.optim.pretrained_lr_scale, cfg.optim.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=cfg.optim.betas)
    warmup = int(cfg.optim.warmup_epochs * steps_per_epoch)
    o = cfg.optim

    def factor(step: int) -> float:
        return warmup_cosine(step, total_steps, warmup, lr, o.warmup_start_lr, o.min_lr) / lr

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if saved is not None:
        load_optimizer_state(model, optimizer, saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])

    sampler = ShardedBatchSampler(
        len(images), cfg.batch_size, end_step, cfg.seed, env.rank, env.world_size, cfg.accum, start_step
    )
    loader = DataLoader(
        SeededAugmentation(images, stage1_train_transform(img_size), cfg.seed),
        batch_sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=env.device.type == "cuda",
        persistent_workers=cfg.workers > 0,
    )
    criterion = build_criterion(cfg)
    log = RunLogger(run_dir, enabled=env.is_main)
    batches = iter(loader)
    bar = tqdm(
        total=end_step,
        initial=start_step,
        desc="stage 1",
        unit="step",
        disable=not env.is_main,
        dynamic_ncols=True,
    )
    tic, seen = time.perf_counter(), 0
    for step in range(start_step, end_step):
        terms_sum: dict[str, Tensor] = {}
        for micro in range(cfg.accum):
            x = next(batches).to(env.device, non_blocking=True)
            shard = sampler.shard(micro)
            ctx = _assign(cfg, x.shape[0], len(teachers), step, shard)
            # The student's own randomness (expert dropout, router noise) is tied to (step, shard) too.
            torch.manual_seed(mix_seed(cfg.seed, step, shard, 1))
            with gradient_sync(net, micro == cfg.accum - 1):
                with autocast(cfg.amp, env.device):
                    loss, terms, routing = distill_loss(
                        net, model, teachers, criterion, x, ctx, cfg.loss.lb_weight
                    )
                (loss / cfg.accum).backward()
            for k, v in terms.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + v.detach() / cfg.accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seen += global_batch
        done = step + 1
        bar.update(1)

        if done % cfg.log_every == 0 or done == end_step:
            rate = seen / (time.perf_counter() - tic)
            scalars = {f"loss/{k}": float(all_reduce_sum(v) / env.world_size) for k, v in terms_sum.items()}
            scalars.update(
                {
                    "lr": cast(float, scheduler.get_last_lr()[0]),  # lr given as a float
                    "images_per_s": rate,
                    "grad_norm": to_local_scalar(grad_norm),
                    "data/skipped_images": float(all_reduce_sum(torch.tensor(images.skipped))),
                }
            )
            scalars.update(_routing_scalars(routing, model.moe_config.num_experts, list(cfg.teachers.names)))
            log.scalars(done, scalars)
            bar.set_postfix(
                loss=f"{scalars['loss/total']:.4f}", lr=f"{scalars['lr']:.2e}", img_s=f"{rate:.1f}"
            )
            tic, seen = time.perf_counter(), 0
        epoch_end = done % steps_per_epoch == 0
        if done % cfg.ckpt_every == 0 or epoch_end or done == end_step:
            weights, optim_state = full_state(model, optimizer)  # collective under FSDP
            if env.is_main:
                state = {
                    "optimizer": optim_state,
                    "scheduler": scheduler.state_dict(),
                    "step": done,
                    "epoch": done / steps_per_epoch,
                }
                config = cast("dict[str, Any] | None", model._hub_mixin_config)  # init kwargs: a dict
                save_checkpoint(run_dir, done, weights, state, cfg.keep_last, config)
    bar.close()
    log.close()
    barrier()  # the last checkpoint is on disk before any rank returns
    if env.is_main and images.skipped:
        logger.warning("%d unreadable images were replaced by their next readable neighbour", images.skipped)
    return run_dir


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
