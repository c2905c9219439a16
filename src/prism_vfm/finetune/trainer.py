"""Stage 2: fine-tune a distilled student for multi-task dense prediction, top to bottom in one function.

environment → data (train minus a held-out part; never the test split) → model from a Stage-1 checkpoint →
teachers (distillation kept on with weight α) → AdamW + poly schedule → the step function, handed to the
training loop (:func:`prism_vfm.train.loop.fit`) with validation and checkpoints.
The last checkpoint is the reported one. Batches and random draws depend only on (seed, step, shard), as in
Stage 1, so ``--resume`` continues exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset

from prism_vfm.data.dense_transforms import DenseTestTransform, DenseTrainTransform
from prism_vfm.data.labels import class_pixel_counts
from prism_vfm.data.registry import dataset_tasks, get_dataset
from prism_vfm.data.sampling import SeededAugmentation, ShardedBatchSampler, mix_seed
from prism_vfm.distill.assignment import balanced_teacher_split
from prism_vfm.finetune.config import Stage2Config, resolved, validate_stage2
from prism_vfm.losses.distill import distillation_criterion
from prism_vfm.losses.tasks import MultiTaskLoss, class_balance_weights
from prism_vfm.metrics.multitask import MultiTaskMeter
from prism_vfm.models.load import load_into, student_args
from prism_vfm.models.multitask import PrismMultiTask
from prism_vfm.models.prism_vit import Context, ContextKind
from prism_vfm.teachers import build_teacher
from prism_vfm.train.distributed import (
    all_reduce_sums,
    average_floating_buffers,
    shard_indices,
    wrap_model,
)
from prism_vfm.train.loop import Loop, fit
from prism_vfm.train.optim import scale_lr, weight_decay_groups
from prism_vfm.train.precision import autocast
from prism_vfm.train.run import start_run
from prism_vfm.train.schedule import poly

logger = logging.getLogger(__name__)


class MultiTaskStep(nn.Module):
    """One training forward for DDP: every task pass with its head, plus the teacher-context pass.

    All passes run batched through ``PrismViT.forward_passes``: the blocks before the first dual-stream
    block, and that block's context-free part, run once for the T task passes and the teacher pass.
    """

    def __init__(self, model: PrismMultiTask) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        x: Tensor,
        teacher_ids: Tensor | Sequence[int] | None,
        task_ids: Sequence[Sequence[int]] | None = None,
    ) -> tuple[dict[str, Tensor], dict[int, list[Tensor]] | None, Tensor, Tensor]:
        """``teacher_ids`` best on the host (a list stays there under DDP): they are checked there, and
        grouping the projections by teacher then reads nothing back from the device. ``task_ids``: per task
        pass, the task id of each sample its router is given (default: the task's own id)."""
        model, student = self.model, self.model.student
        tasks = model.task_names
        passes: list[tuple[ContextKind, Context]] = (
            [("task", model.task_id(t)) for t in tasks]
            if task_ids is None
            else [("task", list(ids)) for ids in task_ids]
        )
        if teacher_ids is not None:
            teacher_ids = torch.as_tensor(teacher_ids)
            passes.append(("teacher", teacher_ids))
        out = student.forward_passes(x, passes)
        taps, aux = out.taps, out.aux_loss
        b, size = x.shape[0], (x.shape[-2], x.shape[-1])
        outputs = {
            t: model.decode(t, [tap[i * b : (i + 1) * b] for tap in taps], size) for i, t in enumerate(tasks)
        }
        aux_tasks = aux[: len(tasks)].mean()
        if teacher_ids is None:
            return outputs, None, aux_tasks, aux_tasks.new_zeros(())
        teacher_taps = [tap[len(tasks) * b :] for tap in taps]
        projections = student.project_by_teacher(teacher_taps, teacher_ids, student.grid_size(x))
        return outputs, projections, aux_tasks, aux[-1]


def build_multitask(cfg: Stage2Config, teacher_dims: tuple[int, ...]) -> PrismMultiTask:
    """The multi-task model initialised from ``cfg.init`` (ours or official, Stage 1 or Stage 2).

    The task table starts fresh (or with the official DINOv2-row copy); with distillation on, the projector
    heads come from the init (teachers of another width: an error unless ``cfg.init_fresh`` names
    ``"projectors.*"``); the position embedding is resampled to ``cfg.img_size``.
    """
    args = {k: v for k, v in student_args(cfg.init).items() if k != "num_tasks"}
    args.update(
        img_size=tuple(cfg.img_size),
        teacher_dims=teacher_dims or args.get("teacher_dims", ()),
        projectors=cfg.distill.alpha > 0,
    )
    channels = dataset_tasks(cfg.dataset)
    model = PrismMultiTask(args, {t: channels[t] for t in cfg.tasks}, subpixel_heads=cfg.subpixel_heads)
    # The task table is new (the Stage-1 contexts were teachers); anything else must come from the init.
    report = load_into(
        model.student, cfg.init, allow_fresh=("task_embed.*", *cfg.init_fresh), exclude=("task_embed.*",)
    )
    logger.info("init: %s", report.summary())
    if cfg.task_table_init == "copy_dinov2" and len(cfg.tasks) > 3:
        with torch.no_grad():
            task_embed = cast(nn.Embedding, model.student.task_embed)  # num_tasks = len(cfg.tasks) > 3
            task_embed.weight[3] = model.student.teacher_embed.weight[0]
    return model


def _split(n: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = max(1, round(holdout * n)) if holdout > 0 else 0
    return sorted(order[k:]), sorted(order[:k])


def train_stage2(
    cfg: Stage2Config, resume: bool = False, overwrite: bool = False, allow_config_change: bool = False
) -> Path:
    """Run Stage 2 as configured; returns the run directory.

    ``resume``, ``overwrite`` and ``allow_config_change`` are those of
    :class:`~prism_vfm.train.run.TrainingRun`.
    """
    validate_stage2(cfg)
    cfg = resolved(cfg)
    env, run = start_run(cfg, resume=resume, overwrite=overwrite, allow_config_change=allow_config_change)
    torch.manual_seed(cfg.seed)
    img_size = cast("tuple[int, int]", cfg.img_size)  # (H, W) after resolved()

    dataset_cls = get_dataset(cfg.dataset).reader_class()
    # Only PASCAL-Context draws its edge label (NYUD reads it from files); validate_stage2 checked it.
    options = {"edge_label": cfg.edge_label} if cfg.edge_label != "released" else {}
    full = dataset_cls(cfg.data, "train", cfg.tasks, transform=None, **options)
    train_ids, val_ids = _split(len(full), cfg.holdout, cfg.seed)
    train_set = Subset(full, train_ids)
    val_reader = dataset_cls(cfg.data, "train", cfg.tasks, DenseTestTransform(img_size), **options)
    val_set = Subset(val_reader, val_ids)

    alpha = cfg.distill.alpha
    teachers = (
        [
            build_teacher(
                n, img_size, cfg.distill.weights, crop_padding=cfg.distill.sam_alignment == "crop"
            ).to(env.device)
            for n in cfg.distill.teachers
        ]
        if alpha > 0
        else []
    )
    model = build_multitask(cfg, tuple(t.out_dim for t in teachers)).to(env.device).train()
    run.restore_weights(model)
    if alpha == 0:
        model.student.teacher_embed.requires_grad_(False)  # unused without the teacher pass
    # PyTorch's SyncBatchNorm runs on CUDA only.
    cpu_processes = env.world_size > 1 and env.device.type != "cuda"
    if env.world_size > 1 and not cpu_processes:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif cpu_processes and env.is_main:
        logger.warning(
            "CPU processes: BatchNorm normalises each process's batch (SyncBatchNorm needs CUDA); running "
            "statistics are averaged over the processes at every checkpoint"
        )
    net = wrap_model(MultiTaskStep(model), env, fsdp=False)

    groups = weight_decay_groups(model, cfg.weight_decay)
    if cfg.router_lr_scale != 1.0:
        groups = scale_lr(groups, model.student.routing_parameters(), cfg.router_lr_scale, cfg.lr)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: poly(s, cfg.iters, 1.0, cfg.poly_power)
    )

    end_step = min(cfg.iters, cfg.max_steps) if cfg.max_steps > 0 else cfg.iters
    start = run.start_step
    sampler = ShardedBatchSampler(
        len(train_set), cfg.batch_size, end_step, cfg.seed, env.rank, env.world_size, cfg.accum, start
    )
    loader = DataLoader(
        SeededAugmentation(
            train_set,
            DenseTrainTransform(
                img_size, (float(cfg.scale_range[0]), float(cfg.scale_range[1])), photometric=cfg.photometric
            ),
            cfg.seed,
        ),
        batch_sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=env.device.type == "cuda",
        persistent_workers=cfg.workers > 0,
    )
    task_loss = MultiTaskLoss(
        cfg.dataset,
        cfg.tasks,
        weights=cfg.loss_weights,
        class_weights={
            t: w.to(env.device) for t, w in _class_weights(cfg, dataset_cls, train_ids, env.is_main).items()
        },
    )
    distill = distillation_criterion(
        cfg.distill.decorrelation, decorrelation_taps=cfg.distill.decorrelation_taps
    )

    def forward_step(batch: dict[str, Tensor], step: int, micro: int) -> tuple[Tensor, dict[str, Tensor]]:
        x = batch["image"].to(env.device, non_blocking=True)
        labels = {t: batch[t].to(env.device, non_blocking=True) for t in cfg.tasks}
        shard = sampler.shard(micro)
        ids = None
        if teachers:
            g = torch.Generator().manual_seed(mix_seed(cfg.seed, step, shard, 0))
            ids = balanced_teacher_split(x.shape[0], len(teachers), g)
        routed = None
        if cfg.task_contexts == "shuffled":
            g = torch.Generator().manual_seed(mix_seed(cfg.seed, step, shard, 2))
            routed = torch.randint(len(cfg.tasks), (len(cfg.tasks), x.shape[0]), generator=g).tolist()
        torch.manual_seed(mix_seed(cfg.seed, step, shard, 1))
        outputs, projections, aux_tasks, aux_teacher = net(x, None if ids is None else ids.tolist(), routed)
        tasks = task_loss({t: o.float() for t, o in outputs.items()}, labels)
        terms = {f"task/{t}": v for t, v in tasks.weighted.items()}
        loss = tasks.total
        if projections is not None:
            with torch.no_grad():
                # Row indices from the CPU split: a boolean mask on the device would wait for the GPU.
                rows = {t: (ids == t).nonzero().squeeze(1).to(x.device) for t in projections}
                targets = {t: teachers[t](x.index_select(0, rows[t])) for t in projections}
            d = distill(projections, targets)
            reg = d["total"] + cfg.distill.lb_weight * (aux_teacher + aux_tasks)
            loss = loss + alpha * reg
            if isinstance(net, DDP):  # heads of absent teachers join with zero weight
                loss = loss + model.student.absent_heads_term(projections)
            terms["distill"] = d["total"]
        terms["aux_tasks"], terms["total"] = aux_tasks, loss
        return loss, {k: v.detach() for k, v in terms.items()}

    def validation(done: int) -> dict[str, float]:
        return {f"val/{k}": v for k, v in validate(model, val_set, cfg, env.device).items()}

    loop = Loop(
        end_step,
        forward_step,
        accum=cfg.accum,
        amp=cfg.amp,
        clip_grad=cfg.clip_grad,
        log_every=cfg.log_every,
        ckpt_every=cfg.ckpt_every,
        keep_last=cfg.keep_last,
        samples_per_step=cfg.batch_size * env.world_size * cfg.accum,
        desc="stage 2",
        evaluate=validation if val_ids else None,
        eval_every=cfg.val_every,
        before_save=(lambda: average_floating_buffers(model)) if cpu_processes else None,
        model_config=cast("dict[str, Any] | None", model._hub_mixin_config),  # init kwargs: a dict
    )
    fit(run, model, net, optimizer, scheduler, iter(loader), loop, env)
    return run.path


def _class_weights(cfg: Stage2Config, dataset_cls: Any, train_ids: list[int], log: bool) -> dict[str, Tensor]:
    """``cfg.class_balance``'s class weights, from the class maps of the training images (every process
    counts the same images, so they agree without a collective)."""
    if not cfg.class_balance:
        return {}
    tasks = tuple(cfg.class_balance)
    reader = dataset_cls(cfg.data, "train", tasks, transform=None)
    channels = get_dataset(cfg.dataset).tasks
    samples = (reader[i] for i in train_ids)
    counts = class_pixel_counts(samples, {t: channels[t] for t in tasks}, len(train_ids), progress=log)
    weights = {t: class_balance_weights(counts[t], p) for t, p in cfg.class_balance.items()}
    if log:
        for t, w in weights.items():
            present = (counts[t] > 0).nonzero().flatten().tolist()
            logger.info(
                "%s: class-balanced loss (exponent %g) over %d images: %s",
                t,
                cfg.class_balance[t],
                len(train_ids),
                ", ".join(f"{c}: {float(w[c]):.2f}" for c in present),
            )
    return weights


@torch.no_grad()
def validate(
    model: PrismMultiTask, dataset: Any, cfg: Stage2Config, device: torch.device
) -> dict[str, float]:
    """Pixel metrics of every task on the held-out split (boundaries report the official edge loss here).

    Under a process group every rank scores its own part of the split and the meters' counts are summed,
    so the scores are those of one process scoring it all; every rank must call it.
    """
    was_training = model.training
    model.eval()
    meter = MultiTaskMeter(cfg.dataset, cfg.tasks)
    part = Subset(dataset, shard_indices(len(dataset)))
    for batch in DataLoader(part, batch_size=cfg.batch_size, num_workers=0):
        with autocast(cfg.amp, device):
            outputs = model(batch["image"].to(device)).predictions
        meter.update({t: o.float() for t, o in outputs.items()}, {t: batch[t].to(device) for t in cfg.tasks})
    meter.load_state(all_reduce_sums(meter.state()))
    model.train(was_training)
    flat: dict[str, float] = {}
    for task, scores in meter.compute().items():
        for name, value in scores.items() if isinstance(scores, dict) else [("score", scores)]:
            flat[f"{task}/{name}"] = float(value)
    return flat
