"""A tiny image-text model that stands in for CLIP in the VidPrism demo.

It is the project's own CLIP towers at the ``"demo"`` preset (``CLIP_TOWERS["demo"]``, a 32-pixel
QuickGELU ViT, and ``CLIP_TEXT_TOWERS["demo"]``, a small text transformer over CLIP's BPE vocabulary),
trained for a few minutes on a CPU with the CLIP loss on single rendered frames and captions that describe
what *that frame* shows ("a faint small red star moving left in the east", attributes dropped at random so
that short class names such as "a star moving left" are in-distribution). Without the frame's position,
size and brightness in its caption the image tower has no reason to keep them, and every video head
built on it then fails on direction. A batch of such captions repeats many of them word for word; the
loss (:func:`clip_loss` with the captions) counts the frames of one caption as positives of each other
rather than pushing them apart.

:func:`frame_probe` measures what the frames' embeddings tell. At the full setting (1000 steps of 64) the
model learns colour perfectly (1.00) but shape (0.23, chance 1/8) and position (0.19, chance 1/9)
barely: a ViT this small learns rotated shapes slowly (a small CNN learns them in a few hundred steps),
and neither quieter backgrounds, trainable token embeddings nor a softer initial temperature lift
position within this budget.

The weights are cached beside the PRISM demo's teachers (:func:`prism_vfm.demo.teachers.save_cached`,
file ``demo_imagetext-<config hash>.safetensors``) in OpenAI's CLIP layout (``visual.*``, text tower,
``logit_scale``), so they load through the same paths as a real CLIP file:
``load_tower_weights(FrameEncoder("demo"), path)`` and ``load_text_weights(TextEncoder("demo"), path)``,
or ``VidPrism(tower="demo", text_tower="demo")`` followed by those two calls.

API (stable): :class:`ImageTextConfig`, :func:`imagetext_config`, :func:`prepare_imagetext`,
:func:`load_imagetext`, :func:`train_imagetext`, :func:`clip_features`, :func:`class_embeddings`,
:func:`frame_probe`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from prism_vfm.demo.pipeline import default_cache_dir
from prism_vfm.demo.teachers import config_key, save_cached
from prism_vfm.video.backbone import (
    FrameEncoder,
    load_tower_weights,
    released_tower_state_dict,
    tower_config,
)
from prism_vfm.video.data.transforms import normalize
from prism_vfm.video.demo.clips import (
    ALL_MOTIONS,
    CAPTION_ATTRIBUTES,
    COLOURS,
    RENDERER_VERSION,
    SHAPES,
    FrameState,
    clip_seed,
    position_word,
    render_clip,
)
from prism_vfm.video.text import (
    TextEncoder,
    class_text_embeddings,
    load_text_weights,
    text_tower_config,
)

logger = logging.getLogger(__name__)

TOWER = "demo"
"""The CLIP_TOWERS / CLIP_TEXT_TOWERS preset the model is built with."""
NAME = "demo_imagetext"
CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature
KEEP_P = 0.7
"""Chance that a caption says each attribute (the shape is always said)."""
POSITIONS = tuple(
    position_word(x, y) for y in (5.0, 16.0, 27.0) for x in (5.0, 16.0, 27.0)
)  # the 9 position words, row by row


@dataclass(frozen=True)
class ImageTextConfig:
    """Pretraining of the demo image-text model; the cache key hashes all of it and the towers' geometry.

    Frames come from ``clips`` rendered clips (every shape, colour and motion, the control motion
    included), ``frames_per_clip`` of each.
    """

    clips: int = 1664
    frames_per_clip: int = 8
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    seed: int = 0

    def key(self) -> str:
        """A short hash of the configuration and the preset towers (cache file names)."""
        return config_key(_Keyed(self, _tower_geometry(), _frame_source()))

    def file_name(self) -> str:
        """The cached weight file."""
        return f"{NAME}-{self.key()}.safetensors"


@dataclass(frozen=True)
class _Keyed:
    config: ImageTextConfig
    towers: dict
    frames: dict


def _frame_source() -> dict:
    # What the training frames and captions depend on beyond the configuration: a renderer or caption
    # change must not reuse a model cached before it.
    return {"renderer": RENDERER_VERSION, "keep_p": KEEP_P}


def _tower_geometry() -> dict:
    return {
        "image": dataclasses.asdict(tower_config(TOWER)),
        "text": dataclasses.asdict(text_tower_config(TOWER)),
    }


def imagetext_config(quick: bool = False, seed: int = 0) -> ImageTextConfig:
    """The full setting (a few minutes on a laptop CPU) or ``quick`` (well under a minute)."""
    if quick:
        # A short run learns colour sooner at a higher learning rate; a full one learns shape better at 1e-3.
        return ImageTextConfig(clips=208, frames_per_clip=8, steps=150, lr=3e-3, seed=seed)
    return ImageTextConfig(seed=seed)


# ----------------------------------------------------------------------------------------- training data
def caption_frames(cfg: ImageTextConfig, split: str = "imagetext") -> tuple[Tensor, list[FrameState]]:
    """``(N, 3, H, W)`` uint8 frames and their :class:`~prism_vfm.video.demo.clips.FrameState` s, drawn
    from ``cfg.clips`` clips cycling through every shape × colour × motion (seeds of ``split``; the video
    data set's splits use others)."""
    rng = np.random.default_rng([cfg.seed, 7])
    colours = list(COLOURS)
    combos = [(s, c, m) for s in SHAPES for c in colours for m in ALL_MOTIONS]
    order = rng.permutation(len(combos))
    frames, states = [], []
    for i in range(cfg.clips):
        shape, colour, motion = combos[order[i % len(combos)]]
        clip = render_clip(shape, motion, colour, clip_seed(cfg.seed, split, shape, motion, i))
        for k in rng.choice(len(clip.frames), cfg.frames_per_clip, replace=False):
            frames.append(clip.frames[k])
            states.append(clip.states[k])
    images = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()
    return images, states


def _captions(states: Sequence[FrameState], rng: np.random.Generator) -> list[str]:
    keep = rng.random((len(states), len(CAPTION_ATTRIBUTES))) < KEEP_P
    return [
        s.caption([a for a, k in zip(CAPTION_ATTRIBUTES, row, strict=True) if k])
        for s, row in zip(states, keep, strict=True)
    ]


def clip_loss(
    image: Tensor, text: Tensor, logit_scale: Tensor, captions: Sequence[str] | None = None
) -> Tensor:
    """CLIP's symmetric cross-entropy over a batch of matching (image, text) embedding pairs.

    With ``captions``, pairs whose captions are the same text are all positives of each other (the target
    spreads evenly over them): a batch of the demo's few-word captions repeats many of them, and the plain
    loss would push apart frames that their captions do not tell apart.
    """
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * image @ text.t()
    if captions is None:
        target = torch.arange(len(image), device=image.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    index = torch.tensor([ids[c] for c in captions], device=image.device)
    same = (index[:, None] == index[None]).float()
    soft = same / same.sum(1, keepdim=True)  # symmetric matrix: rows and columns sum alike
    return (F.cross_entropy(logits, soft) + F.cross_entropy(logits.t(), soft)) / 2


def train_imagetext(cfg: ImageTextConfig, progress: bool = True) -> dict[str, Tensor]:
    """Pretrain the two towers with the CLIP loss on captioned frames; returns the weights in OpenAI's CLIP
    layout (``visual.*``, the text tower's open_clip names, ``logit_scale``)."""
    torch.manual_seed(cfg.seed)
    images, states = caption_frames(cfg)
    image_tower, text_tower = FrameEncoder(TOWER).train(), TextEncoder(TOWER).train()
    # Captions use a few dozen of the 49,408 BPE tokens: their random embeddings serve as they are, and
    # not updating the whole table saves most of the optimiser's work.
    text_tower.tower.token_embedding.requires_grad_(False)
    logit_scale = torch.nn.Parameter(torch.tensor(CLIP_INIT_LOGIT_SCALE))
    params = [p for p in (*image_tower.parameters(), *text_tower.parameters()) if p.requires_grad]
    params.append(logit_scale)
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 8])
    bar = tqdm(total=cfg.steps, desc="image-text model", unit="step", disable=not progress, leave=False)
    for _ in range(cfg.steps):
        idx = torch.randint(len(images), (cfg.batch_size,), generator=g)
        captions = _captions([states[i] for i in idx.tolist()], rng)
        text = text_tower(text_tower.tokenize(captions))
        loss = clip_loss(image_tower.encode_frames(normalize(images[idx])), text, logit_scale, captions)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    state = released_tower_state_dict(image_tower)
    state.update({k.removeprefix("tower."): v.detach().clone() for k, v in text_tower.state_dict().items()})
    state["logit_scale"] = logit_scale.detach().clone()
    return state


# ------------------------------------------------------------------------------------------------ cache
def prepare_imagetext(
    cfg: ImageTextConfig, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """The cached weight file of ``cfg``, pretraining it first if the cache (default: the demo teachers'
    folder, :func:`~prism_vfm.demo.pipeline.default_cache_dir`) does not hold it."""
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / cfg.file_name()
    if path.is_file():
        logger.info("demo image-text model found at %s", path)
        return path
    return save_cached(path, train_imagetext(cfg, progress), cfg, model=NAME)


def load_imagetext(path: str | os.PathLike) -> tuple[FrameEncoder, TextEncoder]:
    """The frozen image and text towers of a saved demo image-text model, through the CLIP loaders."""
    image = load_tower_weights(FrameEncoder(TOWER), path).freeze()
    text = load_text_weights(TextEncoder(TOWER), path).requires_grad_(False).eval()
    return image, text


# -------------------------------------------------------------------------------------- frozen features
@torch.no_grad()
def clip_features(
    encoder: FrameEncoder, dataset: Dataset, batch_size: int = 64, workers: int = 0
) -> tuple[Tensor, Tensor]:
    """Frozen per-frame features of every sample of a video data set (a ``VideoDataset``), in order.

    Returns ``(N, T, D)`` features — ``(N, V, T, D)`` for a test-mode set of V views per video — and the
    ``(N,)`` labels, both on the CPU: what a head trains on when the backbone is frozen.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    device = next(encoder.parameters()).device
    encoder.eval()
    features, labels = [], []
    for batch in loader:
        video = batch["video"].to(device)
        views = video.shape[:-4]  # (B,) or (B, V)
        feats = encoder(video.reshape(-1, *video.shape[-4:])).float()
        features.append(feats.reshape(*views, *feats.shape[-2:]).cpu())
        labels.append(torch.as_tensor(batch["label"]))
    return torch.cat(features), torch.cat(labels)


def class_embeddings(
    text: TextEncoder, class_names: Sequence[str], templates: Sequence[str] = ("{}",)
) -> Tensor:
    """(C, D) unit text embeddings of class names (the demo's names are whole phrases: one template)."""
    return class_text_embeddings(text, class_names, templates)


# ----------------------------------------------------------------------------------------- frame probe
@torch.no_grad()
def frame_probe(image: FrameEncoder, text: TextEncoder, frames: int = 512, seed: int = 1) -> dict[str, float]:
    """Zero-shot single-frame retrieval on freshly rendered frames (visible shapes only): accuracy of
    picking the frame's shape, its colour and both among the 32 prompts "a <colour> <shape>", and its
    position among the 9 prompts "a <shape> <position>" of its own shape. Chance: 1/8, 1/4, 1/32, 1/9."""
    cfg = ImageTextConfig(clips=frames, frames_per_clip=1, seed=seed)
    images, states = caption_frames(cfg, split="probe")
    visible = [i for i, s in enumerate(states) if s.alpha > 0.9]
    images, states = images[visible], [states[i] for i in visible]
    emb = F.normalize(image.encode_frames(normalize(images)), dim=-1)
    colours = list(COLOURS)
    pairs = [(c, s) for s in SHAPES for c in colours]
    joint = class_embeddings(text, [f"a {c} {s}" for c, s in pairs])
    pick = (emb @ joint.t()).argmax(1).tolist()
    shape_ok = [pairs[p][1] == st.shape for p, st in zip(pick, states, strict=True)]
    colour_ok = [pairs[p][0] == st.colour for p, st in zip(pick, states, strict=True)]
    position_ok = []
    for shape in SHAPES:
        rows = [i for i, st in enumerate(states) if st.shape == shape]
        prompts = class_embeddings(text, [f"a {shape} {p}" for p in POSITIONS])
        best = (emb[rows] @ prompts.t()).argmax(1).tolist()
        position_ok += [POSITIONS[b] == states[i].position for b, i in zip(best, rows, strict=True)]
    return {
        "shape": float(np.mean(shape_ok)),
        "colour": float(np.mean(colour_ok)),
        "shape and colour": float(np.mean(np.logical_and(shape_ok, colour_ok))),
        "position": float(np.mean(position_ok)),
        "frames": float(len(states)),
    }
