"""Three tiny teachers that know different things about the demo scenes, like DINOv2, CLIP and SAM do.

Each is a small timm ViT pretrained for a short while on its own objective over rendered scenes:

- ``demo_appearance`` (stands in for DINOv2, teacher id 0): the surface texture pattern and albedo colour;
- ``demo_semantic`` (CLIP, id 1): the class of every pixel and which classes the image holds;
- ``demo_geometry`` (SAM, id 2): depth, surface normals and the boundaries between surfaces.

Their features therefore disagree the way the real teachers' do: texture, category and geometry. The
weights are cached as safetensors named by the teacher, a hash of its configuration and the seed, and the
teachers go through the ordinary registry (``build_teacher(name, img_size, weights=cache_dir)``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from timm.models import vision_transformer
from torch import Tensor, nn
from tqdm import tqdm

from prism_vfm.data.image_folder import IMAGENET_MEAN, IMAGENET_STD
from prism_vfm.data.scenes import BACKGROUND_CLASSES, SCENE_CLASSES, TEXTURES, Scene, render_scene
from prism_vfm.data.tiny_dense import boundaries
from prism_vfm.teachers.registry import register_teacher
from prism_vfm.teachers.spec import CheckpointFilter, TeacherSpec, TimmBuilder
from prism_vfm.utils.io import atomic_save_safetensors, atomic_torch_save, read_torch_file
from prism_vfm.utils.parallel import Job, run_jobs, usable_cores

logger = logging.getLogger(__name__)

DEMO_TEACHERS = ("demo_appearance", "demo_semantic", "demo_geometry")
"""Names in teacher-id order: the roles of DINOv2, CLIP and SAM (SPEC §4)."""

ROLES = {"demo_appearance": "DINOv2", "demo_semantic": "CLIP", "demo_geometry": "SAM"}

# Output channels of each teacher's pretraining head, per pixel.
_HEAD_CHANNELS = {
    "demo_appearance": len(TEXTURES) + 3,  # texture logits, albedo RGB
    "demo_semantic": len(SCENE_CLASSES),  # class logits
    "demo_geometry": 1 + 3 + 1,  # log depth, normal, boundary logit
}
_TEACHER_STREAM = 3  # scene stream of the pretraining images (the data sets use 0-2)


@dataclass(frozen=True)
class DemoTeacherConfig:
    """Architecture and pretraining of the tiny teachers; the cache key hashes all of it."""

    img_size: int = 64
    patch_size: int = 8
    width: int = 64
    depth: int = 3
    heads: int = 2
    scenes: int = 768
    steps: int = 500
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    # Framing of the pretraining scenes (``render_scene``): the demo's own, so the teachers see what the
    # student is distilled and fine-tuned on.
    zoom: float = 1.6

    def key(self) -> str:
        """A short hash of the configuration (cache file names)."""
        return config_key(self)

    def file_name(self, name: str) -> str:
        """The cached weight file of teacher ``name``."""
        return f"{name}-{self.key()}.safetensors"


def config_key(cfg: Any) -> str:
    """A short hash of a dataclass configuration: what names a demo model's file in the cache."""
    blob = json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def save_cached(path: Path, state: dict[str, Tensor], cfg: Any, **metadata: str) -> Path:
    """Write a demo model's weights into the cache as safetensors, with its configuration as metadata;
    atomically, so an interrupted run never leaves a half-written file under the cached name."""
    meta = {"config": json.dumps(dataclasses.asdict(cfg)), **metadata}
    return atomic_save_safetensors(state, path, metadata=meta)


def teacher_spec(name: str, cfg: DemoTeacherConfig) -> TeacherSpec:
    """The registry entry of demo teacher ``name``: every block tapped, the cached file as its weights."""
    if name not in DEMO_TEACHERS:
        raise ValueError(f"unknown demo teacher {name!r}; expected one of {DEMO_TEACHERS}")
    builder = TimmBuilder(
        "vit_tiny_patch16_224",
        dict(patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.heads),
    )
    return TeacherSpec(
        name,
        builder,
        taps=tuple(range(cfg.depth)),
        out_dim=cfg.width,
        patch_size=cfg.patch_size,
        files=(cfg.file_name(name),),
        source="`prism demo` pretrains it on rendered scenes and caches it",
        # timm types the filter's model as its VisionTransformer, which the builder makes.
        checkpoint_filter=cast(CheckpointFilter, vision_transformer.checkpoint_filter_fn),
    )


def scene_targets(scenes: list[Scene]) -> dict[str, Tensor]:
    """Images (ImageNet-normalised) and every per-pixel pretraining target of a list of scenes."""
    image = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]

    def stack(key: str) -> Tensor:
        return torch.from_numpy(np.stack([getattr(s, key) for s in scenes]))

    # Boundaries between surfaces: a change of class, object or planar face (the segments SAM delineates).
    segments = [(s.labels * 1000 + s.instance) * 10000 + s.surface + 1 for s in scenes]
    return {
        "image": (image - mean) / std,
        "texture": stack("texture").long(),
        "albedo": stack("albedo").permute(0, 3, 1, 2),
        "labels": stack("labels").long(),
        "depth": stack("depth").log()[:, None],
        "normals": stack("normals").permute(0, 3, 1, 2),
        "edges": torch.from_numpy(np.stack([boundaries(s) for s in segments])).float()[:, None],
    }


class _PretrainNet(nn.Module):
    """The teacher ViT plus a pixel head: each patch token predicts its patch's pixels (pixel shuffle)."""

    def __init__(
        self, vit: vision_transformer.VisionTransformer, channels: int, patch: int, classes: int
    ) -> None:
        super().__init__()
        self.vit, self.patch = vit, patch
        self.pixels = nn.Linear(vit.embed_dim, channels * patch * patch)
        self.presence = nn.Linear(vit.embed_dim, classes)  # from CLS: which classes the image holds

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        tokens = self.vit.forward_features(x)
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        patches = self.pixels(tokens[:, 1:]).transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return F.pixel_shuffle(patches, self.patch), self.presence(tokens[:, 0])


def _loss(name: str, out: Tensor, presence: Tensor, batch: dict[str, Tensor], class_weight: Tensor) -> Tensor:
    if name == "demo_appearance":
        texture = F.cross_entropy(out[:, : len(TEXTURES)], batch["texture"])
        return texture + 5.0 * F.l1_loss(out[:, len(TEXTURES) :], batch["albedo"])
    if name == "demo_semantic":
        present = F.one_hot(batch["labels"], len(SCENE_CLASSES)).amax(dim=(1, 2)).float()
        pixels = F.cross_entropy(out, batch["labels"], weight=class_weight)
        return pixels + F.binary_cross_entropy_with_logits(presence, present)
    depth = F.l1_loss(out[:, :1], batch["depth"])
    normals = (1 - F.cosine_similarity(out[:, 1:4], batch["normals"], dim=1)).mean()
    edges = F.binary_cross_entropy_with_logits(out[:, 4:], batch["edges"], pos_weight=torch.tensor(5.0))
    return depth + normals + edges


def pretrain_teacher(
    name: str, cfg: DemoTeacherConfig, data: dict[str, Tensor], progress: bool = True
) -> dict:
    """Train teacher ``name`` on ``data`` (``scene_targets``) and return the timm model's state dict."""
    torch.manual_seed(cfg.seed + DEMO_TEACHERS.index(name))
    builder = teacher_spec(name, cfg).builder
    vit = cast(vision_transformer.VisionTransformer, builder((cfg.img_size, cfg.img_size), False))
    net = _PretrainNet(vit, _HEAD_CHANNELS[name], cfg.patch_size, len(SCENE_CLASSES)).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(cfg.seed)
    n = len(data["image"])
    # Floor and walls cover most pixels; weighting classes by 1/sqrt(frequency) makes the objects count.
    frequency = torch.bincount(data["labels"].flatten(), minlength=len(SCENE_CLASSES)).float()
    class_weight = (frequency / frequency.sum() + 1e-3).rsqrt()
    class_weight /= class_weight.mean()
    bar = tqdm(range(cfg.steps), desc=f"teacher {name}", unit="step", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randint(n, (cfg.batch_size,), generator=g)
        batch = {k: v[idx] for k, v in data.items()}
        out, presence = net(batch["image"])
        loss = _loss(name, out, presence, batch, class_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return {k: v.detach().contiguous() for k, v in vit.state_dict().items()}


def pretrain_cached(
    name: str, cfg: DemoTeacherConfig, data: dict[str, Tensor], path: Path, progress: bool
) -> Path:
    """Pretrain teacher ``name`` (``pretrain_teacher``) and write it to ``path`` in the cache."""
    return save_cached(path, pretrain_teacher(name, cfg, data, progress), cfg, teacher=name)


def render_targets(cfg: DemoTeacherConfig, first: int, count: int, path: Path) -> Path:
    """``scene_targets`` of the pretraining scenes ``first`` … ``first + count - 1``, written to ``path``
    with ``torch.save``, which keeps each tensor's memory layout (some are channels-last views, and the
    pretraining's sums follow the layout); returns ``path``."""
    size = (cfg.img_size, cfg.img_size)
    scenes = [render_scene(cfg.seed, i, size, _TEACHER_STREAM, cfg.zoom) for i in range(first, first + count)]
    return atomic_torch_save(scene_targets(scenes), path)


def pretrain_from_parts(
    name: str, cfg: DemoTeacherConfig, parts: list[Path], path: Path, progress: bool
) -> Path:
    """``pretrain_cached`` on the pretraining scenes that ``render_targets`` wrote to ``parts``, in order."""
    pieces = [read_torch_file(p) for p in parts]
    data = {key: torch.cat([piece[key] for piece in pieces]) for key in pieces[0]}
    return pretrain_cached(name, cfg, data, path, progress)


def teacher_jobs(
    cfg: DemoTeacherConfig, cache_dir: str | Path, scratch: Path, chunks: int = 2, progress: bool = False
) -> list[Job]:
    """Register the three demo teachers and return the jobs that pretrain the ones missing from
    ``cache_dir``: ``chunks`` jobs rendering the pretraining scenes into ``scratch`` (a folder the caller
    removes afterwards), then one job per missing teacher after them (``pretrain_from_parts``; each seeded
    by its name, so its weights do not depend on where or beside what it runs). No job when none is
    missing."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    for name in DEMO_TEACHERS:
        register_teacher(teacher_spec(name, cfg), overwrite=True)
    missing = [n for n in DEMO_TEACHERS if not (cache / cfg.file_name(n)).is_file()]
    if not missing:
        logger.info("demo teachers found in %s", cache)
        return []
    bounds = np.linspace(0, cfg.scenes, max(1, min(chunks, cfg.scenes)) + 1).round().astype(int)
    renders = [
        Job(
            f"teacher scenes {a}-{b - 1}",
            render_targets,
            (cfg, int(a), int(b - a), scratch / f"scenes_{a}.pt"),
        )
        for a, b in itertools.pairwise(bounds)
    ]
    parts = [job.args[3] for job in renders]
    after = tuple(job.name for job in renders)
    return renders + [
        Job(
            f"teacher {n}",
            pretrain_from_parts,
            (n, cfg, parts, cache / cfg.file_name(n), progress),
            after=after,
        )
        for n in missing
    ]


def prepare_teachers(
    cfg: DemoTeacherConfig, cache_dir: str | Path, progress: bool = True, workers: int | None = 1
) -> Path:
    """Register the three demo teachers and make sure their weights are in ``cache_dir``, pretraining the
    missing ones (``teacher_jobs``) side by side in ``workers`` one-thread processes (default one per
    usable core; ``1``: here, one after another); returns the folder to pass as the teachers' ``weights``."""
    with tempfile.TemporaryDirectory(prefix="prism_demo_scenes_") as scratch:
        jobs = teacher_jobs(
            cfg, cache_dir, Path(scratch), workers or usable_cores(), progress and workers == 1
        )
        if jobs:
            log = (lambda line: print(f"[demo] {line}", flush=True)) if progress else None
            run_jobs(jobs, workers, log=log)
    return Path(cache_dir)


def teacher_probe(
    cfg: DemoTeacherConfig, cache_dir: str | Path, scenes: int = 64
) -> dict[str, dict[str, float]]:
    """What each teacher's last tap knows: linear probes (least squares on half of ``scenes`` held-out
    scenes, scored on the other half) per 8×8 patch — object class and texture accuracy on object patches,
    R² of the albedo colour and of the log depth. Shows that the teachers differ."""
    from prism_vfm.teachers import build_teacher

    prepare_teachers(cfg, cache_dir, progress=False)
    size = (cfg.img_size, cfg.img_size)
    data = scene_targets(
        [render_scene(cfg.seed, i, size, _TEACHER_STREAM + 1, cfg.zoom) for i in range(scenes)]
    )
    grid = cfg.img_size // cfg.patch_size

    def per_patch(x: Tensor) -> Tensor:  # (B, C, H, W) → (B·h·w, C) patch means
        return F.adaptive_avg_pool2d(x.float(), grid).permute(0, 2, 3, 1).reshape(-1, x.shape[1])

    labels = per_patch(F.one_hot(data["labels"], len(SCENE_CLASSES)).permute(0, 3, 1, 2))
    texture = per_patch(F.one_hot(data["texture"], len(TEXTURES)).permute(0, 3, 1, 2))
    targets = {"albedo": per_patch(data["albedo"]), "depth": per_patch(data["depth"])}
    objects = ~torch.isin(labels.argmax(1), torch.tensor(sorted(BACKGROUND_CLASSES)))
    result = {}
    for name in DEMO_TEACHERS:
        teacher = build_teacher(name, cfg.img_size, cache_dir)
        feats = teacher(data["image"])[-1].permute(0, 2, 3, 1).reshape(-1, cfg.width)
        feats = torch.cat([feats, torch.ones(len(feats), 1)], 1)
        fit = torch.arange(len(feats)) < len(feats) // 2
        scores = {}
        for kind, y in (("object class", labels), ("object texture", texture)):
            w = torch.linalg.lstsq(feats[fit & objects], y[fit & objects]).solution
            test = ~fit & objects
            scores[f"{kind} accuracy"] = float(
                ((feats[test] @ w).argmax(1) == y[test].argmax(1)).float().mean()
            )
        for kind, y in targets.items():
            w = torch.linalg.lstsq(feats[fit], y[fit]).solution
            residual = (feats[~fit] @ w - y[~fit]).pow(2).sum()
            scores[f"{kind} R²"] = float(1 - residual / (y[~fit] - y[~fit].mean(0)).pow(2).sum())
        result[name] = scores
    return result
