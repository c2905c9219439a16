"""VidPrism training, top to bottom in one function (VIDPRISM_SPEC §3).

environment → data (released lists, TSN sampling and augmentation) → model (CLIP tower + head, or a
previous VidPrism with a new classifier) → class text embeddings for the released L_con → AdamW in two
learning-rate groups (the tower at ``lr × clip_ratio``) with the released warm-up + cosine by fractional
epoch → the step function, handed to the training loop (:func:`prism_vfm.train.loop.fit`) with validation
every epoch and a checkpoint at every epoch end.

Batches, frames and augmentations depend only on (seed, epoch, index) and the step, so ``--resume`` and the
number of processes do not change the data. Broken input (a video that does not open, a frame that does
not decode) is counted: logged as ``data/bad_videos`` / ``data/bad_frames``, kept in every checkpoint so
a resumed run goes on counting, and written to the run's ``summary.json``.

Several processes train with DDP, or with ``fsdp`` the frame tower sharded over them (FSDP2, a unit per
block; the head replicated, see :class:`~prism_vfm.train.distributed.PartlySharded`); the
checkpoints hold full state dicts either way, so a run resumes under the other, or in one process. The
checkpoint of the best validation top-1 so far is kept as ``checkpoints/best``
(``prism_vfm.load(run, step="best")``) and recorded in ``summary.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

import prism_vfm.video.load  # noqa: F401  (registers VidPrism's checkpoints with the loader)
from prism_vfm.data.sampling import ShardedBatchSampler, mix_seed
from prism_vfm.models.load import LoadReport, fill_from_state, load
from prism_vfm.train.distributed import (
    all_gather_objects,
    all_reduce_sum,
    all_reduce_sums,
    process_rank,
    shard_indices,
    wrap_model,
)
from prism_vfm.train.loop import Loop, fit
from prism_vfm.train.optim import decay_split
from prism_vfm.train.precision import autocast
from prism_vfm.train.run import start_run
from prism_vfm.train.schedule import warmup_cosine_epochs
from prism_vfm.utils.io import read_safetensors_file
from prism_vfm.video.backbone import load_tower_weights
from prism_vfm.video.config import HeadConfig
from prism_vfm.video.data.dataset import DataIssues, VideoDataset
from prism_vfm.video.data.features import FeatureDataset, read_feature_set
from prism_vfm.video.data.lists import read_label_csv, read_video_list
from prism_vfm.video.feature_model import FeatureClassifier
from prism_vfm.video.losses import released_loss
from prism_vfm.video.metrics import ClassificationMeter, average_views
from prism_vfm.video.model import VidPrism
from prism_vfm.video.prompts import ENSEMBLE_28
from prism_vfm.video.text import TextEncoder, class_text_embeddings, load_text_weights
from prism_vfm.video.train_config import TOWERS, VideoTrainConfig, resolved, validate_video_train

logger = logging.getLogger(__name__)

INPUT_KEY: dict[type, str] = {VidPrism: "video", FeatureClassifier: "features"}
"""The batch entry each model reads: clips for VidPrism, frame features for a head alone."""


def released_step_epoch(step: int, steps_per_epoch: int, every: int = 10) -> float:
    """The fractional epoch the released schedule is set to for optimiser step ``step``.

    The release sets the schedule to ``epoch + i / iterations_per_epoch`` at iteration ``i = 0`` of an
    epoch and whenever ``(i + 1) % every == 0``; a step uses the value set last at or before it. ``every=1``
    sets it at every step. Iterations are optimiser steps here: with gradient accumulation the release
    counts loader iterations (``accum`` per step), which would make the schedule depend on how a global
    batch is split between processes and accumulation; counting steps keeps a run the same whatever the
    split, and equals the release without accumulation.
    """
    epoch, j = divmod(step, steps_per_epoch)
    i = 0 if j + 1 < every else (j + 1) // every * every - 1
    return epoch + i / steps_per_epoch


class _EpochIndexed(Dataset):
    """``self[(index, epoch)]``: the sample of ``index`` with epoch ``epoch``'s random choices."""

    def __init__(self, base: VideoDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, epoch = key
        self.base.set_epoch(epoch)
        return self.base[index]


def build_model(cfg: VideoTrainConfig, num_classes: int) -> VidPrism:
    """The CLIP tower (``model.clip_weights``, else OpenAI's unless ``model.pretrained`` is false) and a
    fresh head; then, with
    ``model.init``, every entry of a previous VidPrism whose name and shape match (the classifier starts
    fresh when the class count differs)."""
    m = cfg.model
    tower, _ = TOWERS[m.tower]
    head = HeadConfig(
        dim=tower.output_dim,
        num_classes=num_classes,
        dbi=m.dbi,
        dbi_update=m.dbi_update,
        diversity=m.diversity,
        shared_stream=m.shared_stream,
    )
    model = VidPrism(
        tower,
        head,
        img_size=cfg.data.size,
        grad_checkpointing=m.grad_checkpointing,
        pretrained=m.pretrained and not m.clip_weights,
    )
    if m.clip_weights:
        load_tower_weights(model.backbone, m.clip_weights)
    if m.init:
        logger.info("init: %s", transfer_init(model, m.init).summary())
    return model


def build_feature_model(
    cfg: VideoTrainConfig, num_classes: int, dim: int, num_frames: int
) -> FeatureClassifier:
    """A head alone on cached frame features (``data.features``): VidPrism's head as configured by
    ``model.*``, or a baseline (``model.head``); then ``model.init`` as for :func:`build_model`."""
    m = cfg.model
    head = HeadConfig(
        dim=dim,
        num_classes=num_classes,
        dbi=m.dbi,
        dbi_update=m.dbi_update,
        diversity=m.diversity,
        shared_stream=m.shared_stream,
    )
    model = FeatureClassifier(m.head, head, num_frames=num_frames)
    if m.init:
        donor, found = load(m.init)
        report = fill_from_state(
            model, donor.state_dict(), m.init, f"{found.kind}, transfer", allow_fresh=("head.classifier.*",)
        )
        logger.info("init: %s", report.summary())
    return model


def read_class_text(path: Path, num_classes: int) -> Tensor:
    """The ``class_text`` (C, D) entry of a features folder's ``class_text.safetensors``."""
    text = read_safetensors_file(path).get("class_text")
    if text is None or text.dim() != 2 or text.shape[0] != num_classes:
        shape = None if text is None else tuple(text.shape)
        raise ValueError(f"{path}: expected an entry 'class_text' of shape ({num_classes}, D), found {shape}")
    return text.float()


def transfer_init(model: VidPrism, source: str | Path) -> LoadReport:
    """Fill ``model`` from a previous VidPrism read by the project's one loader (a run folder, a checkpoint
    or ``save_pretrained`` folder, or a released training checkpoint). Entries are taken by name where
    the shapes agree; only the classifier may stay fresh (a new class count), anything else missing is a
    :class:`~prism_vfm.models.load.LoadError` listing it."""
    donor, found = load(source)
    kind = f"{found.kind}, transfer"
    return fill_from_state(model, donor.state_dict(), str(source), kind, allow_fresh=("head.classifier.*",))


def text_embeddings(cfg: VideoTrainConfig, class_names: list[str], device: torch.device) -> Tensor:
    """(C, D) class embeddings of the 28-template prompt ensemble through CLIP's text tower (computed once;
    the tower is dropped afterwards)."""
    _, text_tower = TOWERS[cfg.model.tower]
    encoder = TextEncoder(text_tower)
    if cfg.model.clip_weights:
        load_text_weights(encoder, cfg.model.clip_weights)
    elif cfg.model.pretrained:
        load_text_weights(encoder, "hub")
    encoder.requires_grad_(False).eval()
    return class_text_embeddings(encoder, class_names, ENSEMBLE_28).to(device)


def check_video_train(cfg: VideoTrainConfig) -> str:
    """Check ``cfg`` and read its label CSV and video lists (every listed video must exist) without building
    or writing anything; a one-paragraph description of the run it would start. Errors name the key, or
    the file and line."""
    cfg = resolved(cfg)
    validate_video_train(cfg)
    d = cfg.data
    if d.features:
        folder = Path(d.features)
        names = read_label_csv(folder / "labels.csv")
        x, _ = read_feature_set(folder / "train.safetensors", len(names))
        n_val = (
            len(read_feature_set(folder / "val.safetensors", len(names))[1])
            if (folder / "val.safetensors").is_file()
            else 0
        )
        return (
            f"{len(names)} classes, {len(x)} training clips of cached features {tuple(x.shape[1:])} "
            f"({folder}), {n_val} validation clips; the {cfg.model.head} head alone; {cfg.epochs} epochs "
            f"of batch {cfg.batch_size} per process × accum {cfg.accum}; run folder {cfg.out}"
        )
    names = read_label_csv(d.labels)
    train = read_video_list(d.train_list, len(names), root=d.videos, drop_short=True)
    val = read_video_list(d.val_list, len(names), root=d.videos) if d.val_list else []
    engine = "FSDP (the tower's blocks sharded)" if cfg.fsdp else "DDP"
    return (
        f"{d.dataset}: {len(names)} classes, {len(train)} training videos ({d.train_list}), {len(val)} "
        f"validation videos ({d.val_list or 'none'}); {cfg.model.tower} "
        f"({'CLIP weights' if cfg.model.pretrained else 'random weights'}"
        f"{', from ' + cfg.model.init if cfg.model.init else ''}), {d.num_frames} frames of {d.size}²; "
        f"{cfg.epochs} epochs of batch {cfg.batch_size} per process × accum {cfg.accum}; several processes: "
        f"{engine}; run folder {cfg.out}"
    )


def train_video(
    cfg: VideoTrainConfig, resume: bool = False, overwrite: bool = False, allow_config_change: bool = False
) -> Path:
    """Train VidPrism as configured; returns the run folder.

    ``resume``, ``overwrite`` and ``allow_config_change`` are those of
    :class:`~prism_vfm.train.run.TrainingRun`.
    """
    cfg = resolved(cfg)
    validate_video_train(cfg)
    env, run = start_run(
        cfg, resume=resume, overwrite=overwrite, allow_config_change=allow_config_change, sharded=cfg.fsdp
    )
    sharded = cfg.fsdp and env.world_size > 1
    torch.manual_seed(cfg.seed)
    d = cfg.data

    # data: videos as released, or cached frame features of a frozen encoder (a head trained alone)
    train_set: Dataset
    val_set: Dataset | None = None
    if d.features:
        class_names = read_label_csv(Path(d.features) / "labels.csv")
        train_set = FeatureDataset(
            *read_feature_set(Path(d.features) / "train.safetensors", len(class_names))
        )
        if (Path(d.features) / "val.safetensors").is_file():
            val_set = FeatureDataset(
                *read_feature_set(Path(d.features) / "val.safetensors", len(class_names))
            )
    else:
        class_names = read_label_csv(d.labels)
        train_samples = read_video_list(d.train_list, len(class_names), root=d.videos, drop_short=True)
        train_set = _EpochIndexed(
            VideoDataset(
                d.videos,
                train_samples,
                "train",
                d.num_frames,
                d.size,
                d.scale_size,
                decoder=d.decoder,
                seed=cfg.seed,
                dataset=d.dataset,
            )
        )
        if d.val_list:
            val_samples = read_video_list(d.val_list, len(class_names), root=d.videos)
            val_set = VideoDataset(
                d.videos,
                val_samples,
                "val",
                d.num_frames,
                d.size,
                d.scale_size,
                decoder=d.decoder,
                seed=cfg.seed,
                dataset=d.dataset,
            )
    global_batch = cfg.batch_size * env.world_size * cfg.accum
    train_size = len(train_set)  # type: ignore[arg-type]
    steps_per_epoch = train_size // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"{d.features or d.train_list}: {train_size} clips, fewer than one global batch of "
            f"{global_batch} "
            f"(batch_size {cfg.batch_size} × {env.world_size} processes × accum {cfg.accum})"
        )
    total_steps = cfg.epochs * steps_per_epoch
    end_step = min(total_steps, cfg.max_steps) if cfg.max_steps > 0 else total_steps

    # model and the class prompts' text embeddings
    model: VidPrism | FeatureClassifier
    class_text: Tensor | None = None
    if d.features:
        sample = train_set[(0, 0)]["features"]
        model = build_feature_model(cfg, len(class_names), sample.shape[-1], sample.shape[0])
        if cfg.model.text_loss:
            class_text = read_class_text(Path(d.features) / "class_text.safetensors", len(class_names))
            class_text = class_text.to(env.device)
    else:
        model = build_model(cfg, len(class_names))
        if cfg.model.text_loss:
            class_text = text_embeddings(cfg, class_names, env.device)
    model.to(env.device).train()
    run.restore_weights(model)
    # Some head parameters take no gradient in a step, depending on the input (DBI's filter, §8).
    if isinstance(model, VidPrism):
        net = wrap_model(
            model,
            env,
            cfg.fsdp,
            units=model.backbone.tower.blocks,
            find_unused=True,
            shard_root=model.backbone,
        )
    else:  # a head alone: nothing to shard (data.features refuses fsdp)
        net = wrap_model(model, env, False, find_unused=True)

    # optimiser: the tower at lr × clip_ratio, the head at lr; decay on all parameters as released
    groups = []
    tower = list(model.backbone.parameters()) if isinstance(model, VidPrism) else []
    for name, params, lr in (
        ("backbone", tower, cfg.lr * cfg.clip_ratio),
        ("head", list(model.head.parameters()), cfg.lr),
    ):
        split = decay_split(model, params)
        parts = [(True, split[True] + split[False])] if cfg.decay == "all" else list(split.items())
        for decayed, chosen in parts:
            if chosen:
                wd = cfg.weight_decay if decayed else 0.0
                groups.append({"params": chosen, "lr": lr, "weight_decay": wd, "name": name})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)

    def factor(step: int) -> float:
        epoch = released_step_epoch(step, steps_per_epoch, cfg.lr_every)
        return warmup_cosine_epochs(epoch, cfg.warmup_epochs, cfg.epochs)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    sampler = ShardedBatchSampler(
        train_size,
        cfg.batch_size,
        end_step,
        cfg.seed,
        env.rank,
        env.world_size,
        cfg.accum,
        run.start_step,
    )
    loader = DataLoader(
        train_set,
        batch_sampler=sampler,
        num_workers=d.workers,
        pin_memory=env.device.type == "cuda",
        persistent_workers=d.workers > 0,
    )
    issues = DataIssues()
    saved_issues: list[dict[str, int]] = []

    def forward_step(batch: dict[str, Any], step: int, micro: int) -> tuple[Tensor, dict[str, Tensor]]:
        issues.update(batch)
        clips = batch[INPUT_KEY[type(model)]].to(env.device, non_blocking=True)
        labels = batch["label"].to(env.device, non_blocking=True)
        torch.manual_seed(mix_seed(cfg.seed, step, sampler.shard(micro), 1))
        out = net(clips)
        loss = released_loss(out, labels, class_text, text_scale=cfg.model.text_scale)
        terms = {**loss.terms, "total": loss.total}
        return loss.total, {k: v.detach().float() for k, v in terms.items()}

    def issue_totals() -> dict[str, float]:
        counts = torch.tensor([issues.bad_videos, issues.bad_frames, issues.samples], dtype=torch.long)
        total = all_reduce_sum(counts).cpu()
        return {
            "data/bad_videos": float(total[0]),
            "data/bad_frames": float(total[1]),
            "data/samples": float(total[2]),
        }

    def gather_issues() -> None:
        saved_issues[:] = all_gather_objects(issues.as_dict())  # every rank joins

    def restore(state: dict[str, Any]) -> None:
        per_rank = state.get("data_issues", [])
        if len(per_rank) == env.world_size:
            issues.load(per_rank[env.rank])
        elif per_rank and env.is_main:  # another process count: the totals go on on the main process
            issues.load({k: sum(r[k] for r in per_rank) for k in per_rank[0]})

    validation = None
    last_val: dict[str, float] = {}
    if val_set is not None:

        def validation(done: int) -> dict[str, float]:
            last_val.update(validate(model, val_set, cfg, env.device, sharded=sharded))
            return {f"val/{k}": v for k, v in last_val.items()}

    loop = Loop(
        end_step,
        forward_step,
        accum=cfg.accum,
        amp=cfg.amp,
        sharded=sharded,
        clip_grad=cfg.clip_grad or None,
        log_every=cfg.log_every,
        ckpt_every=cfg.ckpt_every,
        keep_last=cfg.keep_last,
        samples_per_step=global_batch,
        sample_name="clips",
        desc="vidprism",
        scalars=lambda done: issue_totals(),
        evaluate=validation,
        eval_every=cfg.val_every * steps_per_epoch,
        best_metric=f"val/{cfg.best_metric}" if cfg.best_metric else "",
        checkpoint_at=lambda done: done % steps_per_epoch == 0,
        extra_state=lambda done: {"epoch": done / steps_per_epoch, "data_issues": list(saved_issues)},
        restore_state=restore,
        before_save=gather_issues,
        model_config=cast("dict[str, Any] | None", model._hub_mixin_config),  # init kwargs: a dict
    )
    best = fit(run, model, net, optimizer, scheduler, iter(loader), loop, env)

    totals = issue_totals()
    if env.is_main:
        summary = {
            "steps": end_step,
            "epochs": end_step / steps_per_epoch,
            "data_issues": {k.removeprefix("data/"): int(v) for k, v in totals.items()},
            "validation": last_val,
            "best": best,
        }
        (run.path / "summary.json").write_text(json.dumps(summary, indent=2))
        if totals["data/bad_videos"] or totals["data/bad_frames"]:
            logger.warning(
                "%d videos could not be opened and were replaced; %d frames did not decode and were "
                "replaced by a neighbour (see %s)",
                totals["data/bad_videos"],
                totals["data/bad_frames"],
                run.path / "summary.json",
            )
    return run.path


@torch.no_grad()
def validate(
    model: VidPrism | FeatureClassifier,
    dataset: Dataset,
    cfg: VideoTrainConfig,
    device: torch.device,
    sharded: bool = False,
) -> dict[str, float]:
    """Top-1 / top-5 of one centre view per video (the release's validation), summed over processes:
    every process scores its part of the list; every process must call it.

    ``sharded``: the model's blocks are sharded (FSDP), so every forward gathers them from every process:
    a process whose part is a batch shorter repeats its last batch (its scores not counted), so that all
    run the same number of forwards.
    """
    was_training = model.training
    model.eval()
    meter = ClassificationMeter(model.head.cfg.num_classes)
    size = len(dataset)  # type: ignore[arg-type]
    part = Subset(dataset, shard_indices(size))
    rounds = None
    if sharded:
        longest = -(-size // process_rank()[1])  # rank 0's part
        rounds = -(-longest // cfg.batch_size)
    batch: dict[str, Any] | None = None
    done = 0
    workers = 0 if isinstance(model, FeatureClassifier) else cfg.data.workers
    for batch in DataLoader(part, batch_size=cfg.batch_size, num_workers=workers):
        with autocast(cfg.amp, device):
            logits = model(batch[INPUT_KEY[type(model)]].to(device)).logits
        meter.update(average_views(logits[:, None]), batch["label"])
        done += 1
    if rounds is not None:
        clips = batch["video"] if batch is not None else dataset[0]["video"][None]
        for _ in range(rounds - done):
            with autocast(cfg.amp, device):
                model(clips.to(device))
    meter.load_state(all_reduce_sums(meter.state()))
    model.train(was_training)
    scores = meter.scores()
    return {"top1": scores["top1"], "top5": scores["top5"]}
