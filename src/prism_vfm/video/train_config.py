"""VidPrism training configuration (VIDPRISM_SPEC §3) and the released per-data-set presets.

The presets are the released configurations (§3.2) with their defects fixed (§7.2):

- ``k400_vitb16`` lacks ``sampling_rates`` in the release (the head then fails its length check): the
  head's rates are always [2, 4, 8, 16] here, as in every other released configuration;
- ``k400_vitl14``: the release's file of that name builds ViT-B/16; here it builds ViT-L/14. It also names
  a placeholder checkpoint to start from and a placeholder validation list: here it starts from CLIP, and
  the lists are the user's;
- ``hmdb51_vitb16`` trains on split 3 in the release, every other configuration on split 1: split 1 here
  (``data.split`` chooses another);
- the UCF101 / HMDB51 configurations that name a checkpoint to start from (a K400-trained VidPrism, a
  placeholder path in the release) take it as ``model.init`` (empty: start from CLIP).

``batch_size`` is per process, as released (the release launches 2 GPUs: its effective batch is twice the
batch times ``accum``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from prism_vfm.config import require
from prism_vfm.data.registry import get_video_dataset
from prism_vfm.train.precision import AMP_CHOICES
from prism_vfm.video.backbone import CLIP_TOWERS, TowerConfig
from prism_vfm.video.feature_model import HEAD_KINDS
from prism_vfm.video.text import CLIP_TEXT_TOWERS, TextTowerConfig

TINY_TOWER = TowerConfig(patch_size=8, width=32, depth=2, heads=2, output_dim=16, img_size=32)
TINY_TEXT_TOWER = TextTowerConfig(width=32, heads=2, layers=1, output_dim=16)
TOWERS: dict[str, tuple[TowerConfig, TextTowerConfig]] = {
    **{name: (CLIP_TOWERS[name], CLIP_TEXT_TOWERS[name]) for name in CLIP_TOWERS},
    "tiny": (TINY_TOWER, TINY_TEXT_TOWER),  # random weights only: tests and CPU runs
}
"""Frame and text towers by name."""


@dataclass
class VideoDataConfig:
    dataset: str = "k400"  # a video data set of the registry (prism_vfm.data.registry)
    # A folder in the README's layout: videos/, train.txt, val.txt, labels.csv. Each path below left empty
    # is taken from it.
    root: str = ""
    videos: str = ""  # folder the list paths are relative to
    train_list: str = ""  # released list: 'path label' or 'path num_frames label' per line
    val_list: str = ""
    labels: str = ""  # label CSV (id,name)
    split: int = 1  # the published split the lists were made from (recorded; UCF101 / HMDB51: 1-3)
    num_frames: int = 32
    size: int = 224
    scale_size: int = 256
    decoder: Literal["pyav", "decord"] = "pyav"
    workers: int = 8
    # Train a head alone on cached frame features of a frozen encoder instead of videos: a folder with
    # train.safetensors, labels.csv and optionally val.safetensors and class_text.safetensors
    # (prism_vfm.video.data.features). The tower options and the video paths are then unused.
    features: str = ""


@dataclass
class VideoModelConfig:
    tower: str = "ViT-B/16"  # ViT-B/16, ViT-L/14 or tiny (random weights)
    pretrained: bool = True  # OpenAI's CLIP weights from the Hub for both towers
    # A CLIP weight file (OpenAI's layout, or any layout load_tower_weights reads) for both towers instead
    # of the Hub's, e.g. a local copy or the video demo's image-text model. Empty: see pretrained.
    clip_weights: str = ""
    grad_checkpointing: bool = True
    # A previous VidPrism to start from (transfer): a run folder (its latest checkpoint), a checkpoint or
    # save_pretrained folder, or a released training checkpoint (.pt). Entries whose name and shape match
    # are loaded; the classifier starts fresh when the class count differs. Empty: CLIP.
    init: str = ""
    dbi_update: Literal["last", "sum"] = "last"  # "last" as released (see HeadConfig)
    diversity: Literal["released", "inter_expert"] = "released"
    text_loss: bool = True  # the released L_con against the class prompts' text embeddings
    text_scale: float = 1.0  # temperature of L_con's cosine logits (released: 1)
    # On cached features (data.features) the head may be a baseline instead of VidPrism's:
    # "mean_pool" or "temporal_transformer" (prism_vfm.video.baselines).
    head: Literal["vidprism", "mean_pool", "temporal_transformer"] = "vidprism"
    dbi: bool = True  # False: no DBI (the head is then blind to the order of frames)
    shared_stream: int = -1  # >= 0: every expert reads that stream (the homogeneous-expert control)


@dataclass
class VideoTrainConfig:
    out: str = "runs/video"
    data: VideoDataConfig = field(default_factory=VideoDataConfig)
    model: VideoModelConfig = field(default_factory=VideoModelConfig)
    epochs: int = 30
    warmup_epochs: float = 5.0
    batch_size: int = 32  # per process and accumulation step
    accum: int = 1
    lr: float = 5e-5  # the head's; the tower's is lr x clip_ratio
    clip_ratio: float = 0.06
    weight_decay: float = 0.2
    # "all" decays every parameter, biases and norms included, as released; "weights" only the weights
    # (prism_vfm.train.optim, by role).
    decay: Literal["all", "weights"] = "all"
    # The released schedule is set every 10 iterations (piecewise constant; the first 9 steps at lr 0);
    # 1: every iteration.
    lr_every: int = 10
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: from the device (train/precision.py)
    clip_grad: float = 0.0  # global gradient-norm clip (0: none, as released)
    seed: int = 1024
    # Several processes: DDP (every process holds the whole model, as released) or FSDP2 (the frame
    # tower's blocks sharded over the processes, the rest replicated: ViT-L/14 on smaller GPUs).
    fsdp: bool = False
    val_every: int = 1  # epochs between validations (0: only at the end)
    # The validation score whose best value names checkpoints/best (kept through pruning), as the release
    # keeps its best checkpoint by top-1; '' keeps none.
    best_metric: Literal["top1", "top5", ""] = "top1"
    ckpt_every: int = 0  # steps between checkpoints besides every epoch end (0: none)
    keep_last: int = 3
    log_every: int = 20
    max_steps: int = 0  # stop early (0: the whole schedule)


def _released(
    dataset: str,
    tower: str,
    batch: int,
    accum: int,
    epochs: int,
    warmup: float,
    lr: float,
    ratio: float,
    wd: float,
) -> VideoTrainConfig:
    return VideoTrainConfig(
        out=f"runs/{dataset}_{tower.replace('/', '').replace('-', '').lower()}",
        data=VideoDataConfig(dataset=dataset),
        model=VideoModelConfig(tower=tower),
        epochs=epochs,
        warmup_epochs=warmup,
        batch_size=batch,
        accum=accum,
        lr=lr,
        clip_ratio=ratio,
        weight_decay=wd,
    )


PRESETS: dict[str, VideoTrainConfig] = {
    "k400_vitb16": _released("k400", "ViT-B/16", 32, 1, 40, 10, 1e-4, 0.07, 0.2),
    "k400_vitl14": _released("k400", "ViT-L/14", 32, 2, 40, 10, 1e-4, 0.06, 0.2),
    "ucf101_vitb16": _released("ucf101", "ViT-B/16", 32, 1, 30, 5, 5e-5, 0.06, 0.2),
    "ucf101_vitl14": _released("ucf101", "ViT-L/14", 16, 1, 30, 5, 5e-5, 0.06, 0.2),
    "hmdb51_vitb16": _released("hmdb51", "ViT-B/16", 32, 1, 30, 5, 5e-5, 0.06, 0.1),
    "hmdb51_vitl14": _released("hmdb51", "ViT-L/14", 32, 2, 30, 10, 5e-5, 0.06, 0.1),
    # Seconds on a CPU: a random tiny tower on a tiny generated data set (synthetic.write_tiny_video_dataset),
    # 8 frames of 32², the schedule set every step; the random tower learns at the head's rate.
    "tiny": VideoTrainConfig(
        out="runs/video_tiny",
        data=VideoDataConfig(dataset="ucf101", num_frames=8, size=32, scale_size=36, workers=0),
        model=VideoModelConfig(tower="tiny", pretrained=False, grad_checkpointing=False),
        epochs=15,
        warmup_epochs=1,
        batch_size=3,
        lr=3e-3,
        clip_ratio=1.0,
        weight_decay=0.01,
        lr_every=1,
        amp="fp32",
        seed=0,
        log_every=1,
        keep_last=0,
    ),
}


def preset(name: str) -> VideoTrainConfig:
    """A fresh copy of a VidPrism training preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown VidPrism training preset {name!r}; expected one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def resolved(cfg: VideoTrainConfig) -> VideoTrainConfig:
    """The data paths left empty, taken from ``data.root`` (videos/, train.txt, val.txt, labels.csv)."""
    d = cfg.data
    if not d.root:
        return cfg
    root = Path(d.root)
    data = dataclasses.replace(
        d,
        videos=d.videos or str(root / "videos"),
        train_list=d.train_list or str(root / "train.txt"),
        val_list=d.val_list or str(root / "val.txt"),
        labels=d.labels or str(root / "labels.csv"),
    )
    return dataclasses.replace(cfg, data=data)


def validate_video_train(cfg: VideoTrainConfig) -> None:
    """Check every value of ``cfg`` (after :func:`resolved`) before anything is built; errors name the key."""
    d, m = cfg.data, cfg.model
    try:
        get_video_dataset(d.dataset)
    except ValueError as exc:
        require(False, "data.dataset", f"a registered video data set ({exc})", d.dataset)
    require(m.head in HEAD_KINDS, "model.head", f"one of {', '.join(HEAD_KINDS)}", m.head)
    require(m.shared_stream >= -1, "model.shared_stream", "-1 or a stream index", m.shared_stream)
    if d.features:
        require(not cfg.fsdp, "fsdp", "false with data.features (a head alone has no tower to shard)", True)
        folder = Path(d.features)
        for name in ("train.safetensors", "labels.csv"):
            require((folder / name).is_file(), "data.features", f"a folder holding {name}", d.features)
        require(
            not m.text_loss or (folder / "class_text.safetensors").is_file(),
            "model.text_loss",
            f"false, or class_text.safetensors in data.features ({d.features})",
            m.text_loss,
        )
    else:
        require(m.head == "vidprism", "model.head", "vidprism when training on videos", m.head)
        require(
            bool(d.videos) and Path(d.videos).is_dir(),
            "data.videos",
            "an existing folder of videos",
            d.videos,
        )
        for key in ("train_list", "labels"):
            value = getattr(d, key)
            require(bool(value) and Path(value).is_file(), f"data.{key}", "an existing file", value)
        require(
            not d.val_list or Path(d.val_list).is_file(),
            "data.val_list",
            "an existing file or ''",
            d.val_list,
        )
    require(d.split in (1, 2, 3), "data.split", "1, 2 or 3", d.split)
    for key in ("num_frames", "size", "scale_size"):
        require(getattr(d, key) >= 1, f"data.{key}", "an integer >= 1", getattr(d, key))
    require(d.scale_size >= d.size, "data.scale_size", f"a side >= data.size ({d.size})", d.scale_size)
    require(d.workers >= 0, "data.workers", "an integer >= 0", d.workers)
    require(m.tower in TOWERS, "model.tower", f"one of {', '.join(TOWERS)}", m.tower)
    require(not (m.tower == "tiny" and m.pretrained), "model.pretrained", "false for the tiny tower", True)
    require(
        not m.clip_weights or Path(m.clip_weights).is_file(),
        "model.clip_weights",
        "'' or an existing CLIP weight file",
        m.clip_weights,
    )
    require(not m.init or Path(m.init).exists(), "model.init", "'' or an existing run, folder or .pt", m.init)
    require(m.text_scale > 0, "model.text_scale", "a number > 0", m.text_scale)
    for key in ("epochs", "batch_size", "accum", "log_every", "lr_every"):
        require(getattr(cfg, key) >= 1, key, "an integer >= 1", getattr(cfg, key))
    for key in ("seed", "val_every", "ckpt_every", "keep_last", "max_steps"):
        require(getattr(cfg, key) >= 0, key, "an integer >= 0", getattr(cfg, key))
    require(
        0 <= cfg.warmup_epochs <= cfg.epochs,
        "warmup_epochs",
        f"a number in [0, epochs={cfg.epochs}]",
        cfg.warmup_epochs,
    )
    require(cfg.lr > 0, "lr", "a number > 0", cfg.lr)
    require(cfg.clip_ratio >= 0, "clip_ratio", "a number >= 0 (0: the tower is not trained)", cfg.clip_ratio)
    require(cfg.weight_decay >= 0, "weight_decay", "a number >= 0", cfg.weight_decay)
    require(cfg.clip_grad >= 0, "clip_grad", "a number >= 0 (0: not clipped)", cfg.clip_grad)
    require(cfg.amp in AMP_CHOICES, "amp", f"one of {AMP_CHOICES}", cfg.amp)
    require(
        not (cfg.fsdp and cfg.amp == "fp16"), "amp", "bf16, fp32 or auto with fsdp (no fp16 scaling)", cfg.amp
    )
    require(cfg.best_metric in ("top1", "top5", ""), "best_metric", "top1, top5 or ''", cfg.best_metric)
