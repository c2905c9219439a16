"""Stage-2 configuration (SPEC §7) and its presets."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from prism_vfm.data.registry import get_dataset


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
    init: str = ""  # Stage-1 checkpoint: our save_pretrained/checkpoint folder or an official .pth
    out: str = "runs/stage2"
    tasks: tuple[str, ...] = ()  # empty: every task of the data set, in the released order
    img_size: tuple[int, ...] = ()  # empty: 512x512 (PASCAL) / 448x576 (NYUD)
    iters: int = 40000
    batch_size: int = 3  # per process and accumulation step
    accum: int = 1
    workers: int = 4
    seed: int = 42
    amp: Literal["auto", "bf16", "fp32"] = "auto"
    lr: float = 2e-5
    weight_decay: float = 1e-6
    poly_power: float = 0.9
    clip_grad: float = 10.0
    # Official quirk: row 3 of the fresh task table is a copy of the DINOv2 teacher embedding.
    task_table_init: Literal["fresh", "copy_dinov2"] = "fresh"
    holdout: float = 0.05  # fraction of train held out for validation (never the test split)
    val_every: int = 2000
    ckpt_every: int = 2000
    keep_last: int = 3
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
