"""Stage 2: fine-tune a distilled student for multi-task dense prediction, top to bottom in one function.

environment → data (train minus a held-out part; never the test split) → model from a Stage-1 checkpoint →
teachers (distillation kept on with weight α) → AdamW + poly schedule → steps → validation → checkpoints.
The last checkpoint is the reported one. Batches and random draws depend only on (seed, step, shard), as in
Stage 1, so ``--resume`` continues exactly.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from prism_vfm.compat.official import infer_config, official_to_ours, read_official
from prism_vfm.config import save_yaml
from prism_vfm.data.dense_transforms import DenseTestTransform, DenseTrainTransform
from prism_vfm.data.registry import dataset_tasks, get_dataset
from prism_vfm.data.sampling import SeededAugmentation, ShardedBatchSampler, mix_seed
from prism_vfm.distill.assignment import balanced_teacher_split
from prism_vfm.finetune.config import Stage2Config, resolved
from prism_vfm.losses.distill import distillation_criterion
from prism_vfm.losses.tasks import MultiTaskLoss
from prism_vfm.metrics.multitask import MultiTaskMeter
from prism_vfm.models.multitask import PrismMultiTask
from prism_vfm.models.prism_vit import ContextKind
from prism_vfm.teachers import build_teacher
from prism_vfm.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from prism_vfm.train.distributed import (
    all_reduce_sum,
    average_floating_buffers,
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
        self, x: Tensor, teacher_ids: Tensor | None
    ) -> tuple[dict[str, Tensor], dict[int, list[Tensor]] | None, Tensor, Tensor]:
        model, student = self.model, self.model.student
        tasks = model.task_names
        passes: list[tuple[ContextKind, Tensor | int]] = [("task", model.task_id(t)) for t in tasks]
        if teacher_ids is not None:
            passes.append(("teacher", teacher_ids.to(x.device)))
        taps, aux = student.forward_passes(x, passes)
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

    The task table starts fresh (or with the official DINOv2-row copy); projector heads are kept when the
    teacher widths match and distillation is on; the position embedding is resampled to ``cfg.img_size``.
    """
    path = Path(cfg.init)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json: expected a save_pretrained or checkpoint folder"
            )
        args = json.loads((path / "config.json").read_text())
        args = args.get("student_args", args)
        state = load_file(path / "model.safetensors")
        state = {k.removeprefix("student."): v for k, v in state.items() if not k.startswith("heads.")}
    elif path.is_file():
        official = read_official(path)
        args, state = infer_config(official.student), official_to_ours(official.student)
    else:
        raise FileNotFoundError(f"Stage-2 init {path} does not exist (a Stage-1 folder or official .pth)")
    args = {k: v for k, v in args.items() if k != "num_tasks"}
    args.update(
        img_size=tuple(cfg.img_size),
        teacher_dims=teacher_dims or args.get("teacher_dims", ()),
        projectors=cfg.distill.alpha > 0,
    )
    channels = dataset_tasks(cfg.dataset)
    model = PrismMultiTask(args, {t: channels[t] for t in cfg.tasks})
    own = model.student.state_dict()
    kept = {k: v for k, v in state.items() if k in own and (v.shape == own[k].shape or k == "pos_embed")}
    kept.pop("task_embed.weight", None)
    result = model.student.load_state_dict_resampled(kept, strict=False)
    lost = [k for k in result.missing_keys if not k.startswith(("projectors.", "task_embed."))]
    if lost:
        raise ValueError(f"Stage-2 init {path} lacks backbone entries, e.g. {lost[:5]}")
    if cfg.task_table_init == "copy_dinov2" and len(cfg.tasks) > 3:
        with torch.no_grad():
            task_embed = cast(nn.Embedding, model.student.task_embed)  # num_tasks = len(cfg.tasks) > 3
            task_embed.weight[3] = model.student.teacher_embed.weight[0]
    return model


def _split(n: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = max(1, round(holdout * n)) if holdout > 0 else 0
    return sorted(order[k:]), sorted(order[:k])


def train_stage2(cfg: Stage2Config, resume: bool = False) -> Path:
    """Run Stage 2 as configured; returns the run directory."""
    cfg = resolved(cfg)
    env = init_distributed()
    run_dir = Path(cfg.out)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.seed)
    img_size = cast("tuple[int, int]", cfg.img_size)  # (H, W) after resolved()

    dataset_cls = get_dataset(cfg.dataset).reader_class()
    full = dataset_cls(cfg.data, "train", cfg.tasks, transform=None)
    train_ids, val_ids = _split(len(full), cfg.holdout, cfg.seed)
    train_set = Subset(full, train_ids)
    val_set = Subset(dataset_cls(cfg.data, "train", cfg.tasks, DenseTestTransform(img_size)), val_ids)

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
    step_module = MultiTaskStep(model)
    net = wrap_model(step_module, env, fsdp=False)

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: poly(s, cfg.iters, 1.0, cfg.poly_power)
    )
    if saved is not None:
        load_optimizer_state(model, optimizer, saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])

    end_step = min(cfg.iters, cfg.max_steps) if cfg.max_steps > 0 else cfg.iters
    sampler = ShardedBatchSampler(
        len(train_set), cfg.batch_size, end_step, cfg.seed, env.rank, env.world_size, cfg.accum, start_step
    )
    loader = DataLoader(
        SeededAugmentation(train_set, DenseTrainTransform(img_size), cfg.seed),
        batch_sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=env.device.type == "cuda",
        persistent_workers=cfg.workers > 0,
    )
    task_loss = MultiTaskLoss(cfg.dataset, cfg.tasks)
    distill = distillation_criterion(
        cfg.distill.decorrelation, decorrelation_taps=cfg.distill.decorrelation_taps
    )
    log = RunLogger(run_dir, enabled=env.is_main)
    batches = iter(loader)
    bar = tqdm(total=end_step, initial=start_step, desc="stage 2", unit="step", disable=not env.is_main)
    tic, seen = time.perf_counter(), 0
    for step in range(start_step, end_step):
        sums: dict[str, Tensor] = {}
        for micro in range(cfg.accum):
            batch = next(batches)
            x = batch["image"].to(env.device, non_blocking=True)
            labels = {t: batch[t].to(env.device, non_blocking=True) for t in cfg.tasks}
            shard = sampler.shard(micro)
            ids = None
            if teachers:
                g = torch.Generator().manual_seed(mix_seed(cfg.seed, step, shard, 0))
                ids = balanced_teacher_split(x.shape[0], len(teachers), g)
            torch.manual_seed(mix_seed(cfg.seed, step, shard, 1))
            with gradient_sync(net, micro == cfg.accum - 1), autocast(cfg.amp, env.device):
                outputs, projections, aux_tasks, aux_teacher = net(x, ids)
                tasks = task_loss({t: o.float() for t, o in outputs.items()}, labels)
                terms = {f"task/{t}": v for t, v in tasks.weighted.items()}
                loss = tasks.total
                if projections is not None:
                    with torch.no_grad():
                        targets = {t: teachers[t](x[(ids == t).to(x.device)]) for t in projections}
                    d = distill(projections, targets)
                    reg = d["total"] + cfg.distill.lb_weight * (aux_teacher + aux_tasks)
                    loss = loss + alpha * reg
                    if isinstance(net, DDP):  # heads of absent teachers join with zero weight
                        loss = loss + model.student.absent_heads_term(projections)
                    terms["distill"] = d["total"]
                terms["aux_tasks"], terms["total"] = aux_tasks, loss
                (loss / cfg.accum).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach() / cfg.accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seen += cfg.batch_size * env.world_size * cfg.accum
        done = step + 1
        bar.update(1)
        if done % cfg.log_every == 0 or done == end_step:
            scalars = {f"loss/{k}": float(all_reduce_sum(v) / env.world_size) for k, v in sums.items()}
            scalars.update(
                lr=cast(float, scheduler.get_last_lr()[0]),  # lr given as a float
                grad_norm=to_local_scalar(grad_norm),
                images_per_s=seen / (time.perf_counter() - tic),
            )
            log.scalars(done, scalars)
            bar.set_postfix(loss=f"{scalars['loss/total']:.4f}", lr=f"{scalars['lr']:.2e}")
            tic, seen = time.perf_counter(), 0
        if val_ids and (done % cfg.val_every == 0 or done == end_step):
            log.scalars(done, {f"val/{k}": v for k, v in validate(model, val_set, cfg, env.device).items()})
        if done % cfg.ckpt_every == 0 or done == end_step:
            if cpu_processes:
                average_floating_buffers(model)
            weights, optim_state = full_state(model, optimizer)
            if env.is_main:
                state = {"optimizer": optim_state, "scheduler": scheduler.state_dict(), "step": done}
                config = cast("dict[str, Any] | None", model._hub_mixin_config)  # init kwargs: a dict
                save_checkpoint(run_dir, done, weights, state, cfg.keep_last, config)
    bar.close()
    log.close()
    barrier()  # the last checkpoint is on disk before any rank returns
    return run_dir


@torch.no_grad()
def validate(
    model: PrismMultiTask, dataset: Any, cfg: Stage2Config, device: torch.device
) -> dict[str, float]:
    """Pixel metrics of every task on the held-out split (boundaries report the official edge loss here)."""
    was_training = model.training
    model.eval()
    meter = MultiTaskMeter(cfg.dataset, cfg.tasks)
    for batch in DataLoader(dataset, batch_size=cfg.batch_size, num_workers=0):
        with autocast(cfg.amp, device):
            outputs = model(batch["image"].to(device))
        meter.update({t: o.float() for t, o in outputs.items()}, {t: batch[t].to(device) for t in cfg.tasks})
    model.train(was_training)
    flat: dict[str, float] = {}
    for task, scores in meter.compute().items():
        for name, value in scores.items() if isinstance(scores, dict) else [("score", scores)]:
            flat[f"{task}/{name}"] = float(value)
    return flat
