"""Stage-2 configuration (SPEC §7) and its presets."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from prism_vfm.config import require, require_weights
from prism_vfm.data.pascal_context import EDGE_LABELS
from prism_vfm.data.registry import dataset_tasks, get_dataset
from prism_vfm.losses.tasks import CLASS_MAP_TASKS
from prism_vfm.models.dense_head import HEAD_DOWN_RATIO
from prism_vfm.teachers import list_teachers


@dataclass
class DistillConfig:
    alpha: float = 1.0  # weight of the distillation regulariser (the official PASCAL launch script uses 0.5)
    teachers: tuple[str, ...] = ("dinov2_l", "clip_l", "sam_l")
    weights: str = "hub"  # "hub", "none" or a folder with the official teacher files
    decorrelation: Literal["official", "paper", "none"] = "official"
    decorrelation_taps: tuple[int, ...] = (0, 1)
    lb_weight: float = 0.1
    # SAM pads non-square inputs (NYUD's 448x576) to a square: "crop" keeps only the teacher cells that cover
    # the image, aligned with the student's grid; "official" keeps the padded grid (the released code's
    # misalignment, SPEC §12). Other teachers and square inputs are unaffected.
    sam_alignment: Literal["crop", "official"] = "crop"


@dataclass
class Stage2Config:
    dataset: Literal["pascalcontext", "nyud"] = "pascalcontext"
    data: str = ""  # the PASCALContext/ or NYUDv2/ folder
    init: str = ""  # Stage-1 checkpoint: a run, checkpoint or save_pretrained folder, or an official .pth
    # Entries the init may leave at their random initialisation besides the new task table (patterns, e.g.
    # "projectors.*" when the teachers' widths differ from Stage 1's); any other is an error.
    init_fresh: tuple[str, ...] = ()
    out: str = "runs/stage2"
    tasks: tuple[str, ...] = ()  # empty: every task of the data set, in the released order
    img_size: tuple[int, ...] = ()  # empty: 512x512 (PASCAL) / 448x576 (NYUD)
    iters: int = 40000
    batch_size: int = 3  # per process and accumulation step
    accum: int = 1
    workers: int = 4
    seed: int = 42
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: from the device (train/precision.py)
    lr: float = 2e-5
    # Routers (FiLM included) and context tables learn at lr·router_lr_scale: the task table starts fresh,
    # and a short run at the backbone's rate barely moves it.
    router_lr_scale: float = 1.0
    # Training augmentation (SPEC §8): random rescale by s ~ U[scale_range) before the crop, and photometric
    # distortion. Released: (0.5, 2.0) and on; a short run on small images learns faster with less of both.
    scale_range: tuple[float, float] = (0.5, 2.0)
    photometric: bool = True
    # Per-task loss weights overriding the data set's (empty: the released ones, the registry's loss_weights).
    loss_weights: dict[str, float] = field(default_factory=dict)
    # Class-balanced cross-entropy (not released: {}), per class-map task an exponent p: each class's term is
    # weighted by its share of the training split's labelled pixels to the power -p (0.5: inverse square root,
    # 1: inverse frequency), scaled to a pixel-weighted mean of 1 (``losses.tasks.class_balance_weights``).
    class_balance: dict[str, float] = field(default_factory=dict)
    # Tasks whose decoder head predicts every pixel of its quarter-size output cells (``DenseHead``'s
    # "subpixel" output) instead of upsampling its logits bilinearly (released: none). Small inputs need it
    # for boundaries: the bilinear upsampling keeps an edge near the cell centres.
    subpixel_heads: tuple[str, ...] = ()
    # PASCAL-Context's edge training label (``data.pascal_context.EDGE_LABELS``): "released" (the Laplacian
    # of the class map) or "evaluation" (the boundaries the evaluation matches against, one pixel over).
    edge_label: Literal["released", "evaluation"] = "released"
    weight_decay: float = 1e-6
    poly_power: float = 0.9
    clip_grad: float = 10.0
    # Official quirk: row 3 of the fresh task table is a copy of the DINOv2 teacher embedding.
    task_table_init: Literal["fresh", "copy_dinov2"] = "fresh"
    # "shuffled": each task pass routes every sample under a random task id (its head still learns its own
    # task), so the id says nothing about the task — the control run for expert specialisation by task.
    task_contexts: Literal["own", "shuffled"] = "own"
    holdout: float = 0.05  # fraction of train held out for validation (never the test split)
    val_every: int = 2000  # steps between validations (0: only at the end)
    ckpt_every: int = 2000  # steps between checkpoints (0: only at the end)
    keep_last: int = 3  # checkpoints kept, the newest (0: all)
    log_every: int = 20
    max_steps: int = 0
    distill: DistillConfig = field(default_factory=DistillConfig)


PRESETS: dict[str, Stage2Config] = {
    "pascal": Stage2Config(dataset="pascalcontext", batch_size=3),
    "nyud": Stage2Config(dataset="nyud", batch_size=6),
    # Seconds on a CPU on a tiny generated data set, tiny random teachers.
    "tiny": Stage2Config(
        dataset="pascalcontext",
        img_size=(48, 64),
        iters=6,
        batch_size=2,
        workers=0,
        holdout=0.25,
        val_every=3,
        ckpt_every=3,
        log_every=1,
        lr=1e-3,
        distill=DistillConfig(teachers=("tiny_a", "tiny_b", "tiny_c"), weights="none"),
    ),
}


def preset(name: str) -> Stage2Config:
    """A fresh copy of a Stage-2 preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown Stage-2 preset {name!r}; expected one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def resolved(cfg: Stage2Config) -> Stage2Config:
    """Fill the data-set-dependent defaults (tasks, input size)."""
    info = get_dataset(cfg.dataset)
    tasks = cfg.tasks or tuple(info.tasks)
    size = cfg.img_size or info.input_size
    return dataclasses.replace(cfg, tasks=tuple(tasks), img_size=tuple(size))


def validate_stage2(cfg: Stage2Config) -> None:
    """Check every value of ``cfg`` before anything is built; a :class:`ConfigError` names the key."""
    require(bool(cfg.data) and Path(cfg.data).is_dir(), "data", "an existing data set folder", cfg.data)
    require(
        bool(cfg.init) and Path(cfg.init).exists(),
        "init",
        "an existing Stage-1 checkpoint folder or official .pth",
        cfg.init,
    )
    require(bool(cfg.out), "out", "a run folder", cfg.out)
    known = list(dataset_tasks(cfg.dataset))
    for i, task in enumerate(cfg.tasks):
        require(task in known, f"tasks[{i}]", f"a task of {cfg.dataset} ({', '.join(known)})", task)
    require(len(set(cfg.tasks)) == len(cfg.tasks), "tasks", "distinct tasks", cfg.tasks)
    require(
        len(cfg.img_size) in (0, 2) and all(v >= 1 for v in cfg.img_size),
        "img_size",
        "[] (the data set's size) or [H, W] of integers >= 1",
        list(cfg.img_size),
    )
    for key in ("iters", "batch_size", "accum", "log_every"):
        require(getattr(cfg, key) >= 1, key, "an integer >= 1", getattr(cfg, key))
    for key in ("workers", "seed", "max_steps", "val_every", "ckpt_every", "keep_last"):
        require(getattr(cfg, key) >= 0, key, "an integer >= 0", getattr(cfg, key))
    require(
        len(cfg.scale_range) == 2 and 0 < cfg.scale_range[0] <= cfg.scale_range[1],
        "scale_range",
        "[low, high] with 0 < low <= high",
        list(cfg.scale_range),
    )
    require(cfg.router_lr_scale >= 0, "router_lr_scale", "a number >= 0", cfg.router_lr_scale)
    for key in ("lr", "poly_power", "clip_grad"):
        require(getattr(cfg, key) > 0, key, "a number > 0", getattr(cfg, key))
    require(cfg.weight_decay >= 0, "weight_decay", "a number >= 0", cfg.weight_decay)
    trained = list(cfg.tasks or known)
    for task, weight in cfg.loss_weights.items():
        require(task in trained, f"loss_weights.{task}", f"a trained task ({', '.join(trained)})", task)
        require(
            isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight >= 0,
            f"loss_weights.{task}",
            "a number >= 0",
            weight,
        )
    for task, exponent in cfg.class_balance.items():
        balanced = [t for t in trained if t in CLASS_MAP_TASKS]
        expected = f"a trained class-map task ({', '.join(balanced) or 'none trained'})"
        require(task in balanced, f"class_balance.{task}", expected, task)
        require(
            isinstance(exponent, (int, float)) and not isinstance(exponent, bool) and exponent >= 0,
            f"class_balance.{task}",
            "an exponent >= 0",
            exponent,
        )
    for i, task in enumerate(cfg.subpixel_heads):
        require(task in trained, f"subpixel_heads[{i}]", f"a trained task ({', '.join(trained)})", task)
    if cfg.subpixel_heads:
        require(
            all(v % HEAD_DOWN_RATIO == 0 for v in cfg.img_size),
            "img_size",
            f"[H, W] divisible by {HEAD_DOWN_RATIO} when subpixel_heads are set",
            list(cfg.img_size),
        )
    edge_labels = EDGE_LABELS if cfg.dataset == "pascalcontext" else ("released",)
    expected = " or ".join(repr(k) for k in edge_labels) + f" for {cfg.dataset}"
    require(cfg.edge_label in edge_labels, "edge_label", expected, cfg.edge_label)
    require(0 <= cfg.holdout < 1, "holdout", "a fraction in [0, 1)", cfg.holdout)
    d = cfg.distill
    require(d.alpha >= 0, "distill.alpha", "a number >= 0 (0: no distillation)", d.alpha)
    require(d.lb_weight >= 0, "distill.lb_weight", "a number >= 0", d.lb_weight)
    for i, tap in enumerate(d.decorrelation_taps):
        require(tap >= 0, f"distill.decorrelation_taps[{i}]", "a tap index >= 0", tap)
    if d.alpha > 0:
        teachers = list_teachers()
        require(len(d.teachers) >= 1, "distill.teachers", "at least one teacher when alpha > 0", d.teachers)
        for i, name in enumerate(d.teachers):
            expected = f"a registered teacher ({', '.join(teachers)})"
            require(name in teachers, f"distill.teachers[{i}]", expected, name)
        require_weights("distill.weights", d.weights)
