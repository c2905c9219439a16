"""Stage-1 configuration and the published presets (SPEC §6), plus a tiny one for CPUs."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm

from prism_vfm.config import require, require_weights
from prism_vfm.teachers import list_teachers


@dataclass
class StudentConfig:
    model: str = "prism_vit_base_patch16_384"  # a registered prism_vit_* name
    img_size: int = 384
    # "timm" = the AugReg ViT weights of the same size (hub), "none" = random, or a path: a timm ViT file,
    # one of our save_pretrained folders, or an official PRISM .pth.
    init: str = "timm"
    # Entries the init checkpoint may leave at their random initialisation (patterns, e.g. "projectors.*"
    # for teachers of another width); any other entry it does not fill is an error.
    init_fresh: tuple[str, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)  # further PrismViT arguments


@dataclass
class TeacherConfig:
    names: tuple[str, ...] = ("dinov2_l", "clip_l", "sam_l")  # teacher ids follow this order
    weights: str = "hub"  # "hub", "none" (random: tests, speed runs) or a folder with the official files
    assignment: Literal["balanced", "single"] = (
        "balanced"  # per-sample split (official) / one per step (paper)
    )
    # "shuffled": the router is given a random teacher id per sample, drawn apart from the teacher the sample
    # is distilled toward, so the id says nothing about it — the control run for expert specialisation.
    router_contexts: Literal["assigned", "shuffled"] = "assigned"


@dataclass
class LossConfig:
    cos_weight: float = 0.9
    l1_weight: float = 0.1
    decorrelation: Literal["official", "paper", "none"] = "official"
    decorrelation_taps: tuple[int, ...] = (0, 1)
    decorrelation_weight: float = 0.5
    lb_weight: float = 0.1


@dataclass
class OptimConfig:
    lr: float = 1e-3  # at a global batch of lr_reference_batch; scaled linearly, capped at max_lr
    lr_reference_batch: int = 128
    max_lr: float = 1e-3
    pretrained_lr_scale: float = 0.01  # patch/pos embedding, attention, norms, dense MLPs and anchors
    # Routers (FiLM included) and context tables learn at lr·router_lr_scale: a short run from random
    # weights otherwise leaves the context nearly without effect on the routing (FiLM starts at zero).
    router_lr_scale: float = 1.0
    weight_decay: float = 0.01  # on ≥2-D parameters only
    warmup_epochs: float = 2.0
    warmup_start_lr: float = 1e-7
    min_lr: float = 1e-6
    clip_grad: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Stage1Config:
    preset: str = "LB"
    data: str = ""  # image folder (ImageNet train layout or flat)
    out: str = "runs/stage1"
    epochs: float = 30.0
    batch_size: int = 20  # per process and accumulation step
    accum: int = 1
    workers: int = 8
    seed: int = 42
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: from the device (train/precision.py)
    ckpt_every: int = 1000  # steps (0: none); a checkpoint is also written at every epoch end and at the end
    keep_last: int = 3  # checkpoints kept, the newest (0: all)
    log_every: int = 20
    max_steps: int = 0  # >0 stops early (smoke runs); the schedule still spans the full epochs
    fsdp: bool = (
        False  # shard parameters, gradients and optimiser state (FSDP2) instead of DDP: ViT-L students
    )
    student: StudentConfig = field(default_factory=StudentConfig)
    teachers: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


def _preset(model: str, teachers: tuple[str, ...], batch: int, decorrelation: str) -> Stage1Config:
    return Stage1Config(
        batch_size=batch,
        student=StudentConfig(model=model),
        teachers=TeacherConfig(names=teachers),
        loss=LossConfig(decorrelation=decorrelation),  # type: ignore[arg-type]
    )


_L_TEACHERS = ("dinov2_l", "clip_l", "sam_l")
_B_TEACHERS = ("dinov2_b", "clip_b", "sam_b")

PRESETS: dict[str, Stage1Config] = {
    "BB": _preset("prism_vit_base_patch16_384", _B_TEACHERS, 20, "official"),
    "BS": _preset("prism_vit_small_patch16_384", _B_TEACHERS, 64, "none"),
    "LB": _preset("prism_vit_base_patch16_384", _L_TEACHERS, 20, "official"),
    "LL": _preset("prism_vit_large_patch16_384", _L_TEACHERS, 64, "official"),
    # Seconds on a CPU: a 4-block width-48 student and three tiny random-init teachers at 32 px.
    "tiny": Stage1Config(
        epochs=2,
        batch_size=6,
        workers=0,
        ckpt_every=4,
        log_every=1,
        student=StudentConfig(
            model="prism_vit_tiny_patch16_384",
            img_size=32,
            init="none",
            overrides=dict(
                patch_size=8, embed_dim=48, depth=4, num_heads=3, moe_layers=(1, 3), num_experts=6, top_k=2
            ),
        ),
        teachers=TeacherConfig(names=("tiny_a", "tiny_b", "tiny_c"), weights="none"),
        optim=OptimConfig(warmup_epochs=0.5, lr=1e-3, lr_reference_batch=6),
    ),
}


def preset(name: str) -> Stage1Config:
    """A fresh copy of a preset's configuration."""
    if name not in PRESETS:
        raise ValueError(f"unknown Stage-1 preset {name!r}; expected one of {sorted(PRESETS)}")
    return dataclasses.replace(copy.deepcopy(PRESETS[name]), preset=name)


def validate_stage1(cfg: Stage1Config) -> None:
    """Check every value of ``cfg`` before anything is built; a :class:`ConfigError` names the key."""
    require(bool(cfg.data) and Path(cfg.data).is_dir(), "data", "an existing image folder", cfg.data)
    require(bool(cfg.out), "out", "a run folder", cfg.out)
    require(cfg.epochs > 0, "epochs", "a number > 0", cfg.epochs)
    for key in ("batch_size", "accum", "log_every"):
        require(getattr(cfg, key) >= 1, key, "an integer >= 1", getattr(cfg, key))
    for key in ("workers", "seed", "max_steps"):
        require(getattr(cfg, key) >= 0, key, "an integer >= 0", getattr(cfg, key))
    require(cfg.ckpt_every >= 0, "ckpt_every", "an integer >= 0 (0: epoch ends and the end)", cfg.ckpt_every)
    require(cfg.keep_last >= 0, "keep_last", "an integer >= 0 (0: keep every checkpoint)", cfg.keep_last)
    s = cfg.student
    students = timm.list_models("prism_vit_*")
    require(s.model in students, "student.model", f"a registered student ({', '.join(students)})", s.model)
    require(s.img_size >= 1, "student.img_size", "an integer >= 1", s.img_size)
    require(
        s.init in ("timm", "none") or Path(s.init).exists(),
        "student.init",
        "'timm', 'none' or an existing file or folder",
        s.init,
    )
    t = cfg.teachers
    known = list_teachers()
    require(len(t.names) >= 1, "teachers.names", "at least one teacher", t.names)
    require(len(set(t.names)) == len(t.names), "teachers.names", "distinct names", t.names)
    for i, name in enumerate(t.names):
        require(name in known, f"teachers.names[{i}]", f"a registered teacher ({', '.join(known)})", name)
    require_weights("teachers.weights", t.weights)
    loss = cfg.loss
    for key in ("cos_weight", "l1_weight", "decorrelation_weight", "lb_weight"):
        require(getattr(loss, key) >= 0, f"loss.{key}", "a number >= 0", getattr(loss, key))
    for i, tap in enumerate(loss.decorrelation_taps):
        require(tap >= 0, f"loss.decorrelation_taps[{i}]", "a tap index >= 0", tap)
    o = cfg.optim
    for key in ("lr", "max_lr", "clip_grad"):
        require(getattr(o, key) > 0, f"optim.{key}", "a number > 0", getattr(o, key))
    for key in (
        "pretrained_lr_scale",
        "router_lr_scale",
        "weight_decay",
        "warmup_epochs",
        "warmup_start_lr",
        "min_lr",
    ):
        require(getattr(o, key) >= 0, f"optim.{key}", "a number >= 0", getattr(o, key))
    require(o.lr_reference_batch >= 1, "optim.lr_reference_batch", "an integer >= 1", o.lr_reference_batch)
    for i, beta in enumerate(o.betas):
        require(0 <= beta < 1, f"optim.betas[{i}]", "a number in [0, 1)", beta)
