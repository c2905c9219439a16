"""The released augmentation and test views (SPEC §3.3, §3.5), the same for every frame of a clip.

A clip is one ``(T, C, H, W)`` uint8 tensor; torchvision's ``transforms.v2`` functionals act on all of
its frames at once, so the random parameters are drawn once per clip and no frame is handled on its own.
Random draws come from the caller's ``random.Random`` (seeded per sample by the loader), in the release's
order: crop (area, aspect, swap, position, up to 10 tries), then flip, then grayscale.

Resizing uses torchvision's antialiased resampling of the tensor, where the release resized PIL images;
the two differ by rounding (at most a few grey levels), not by geometry.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEST_CROPS = (1, 3, 5, 10)

_BICUBIC = v2.InterpolationMode.BICUBIC
_BILINEAR = v2.InterpolationMode.BILINEAR


def normalize(clip: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., 3, H, W)`` → float, divided by 255 and normalised with the CLIP mean and std.

    Computed as ``(x − 255·mean) · 1/(255·std)`` in place on one float copy: the same values to float
    rounding (≤ 1e-6), in a third of the time of four passes.
    """
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(CLIP_STD).view(3, 1, 1) * 255.0)
    return clip.float().sub_(mean).mul_(inv_std)


def random_sized_crop_box(
    height: int, width: int, rng: random.Random, tries: int = 10
) -> tuple[int, int, int, int] | None:
    """The release's GroupRandomSizedCrop box ``(top, left, h, w)``, or None when all tries fail.

    Area fraction U(0.08, 1), aspect ratio U(3/4, 4/3) (linear, not log-uniform as torchvision's
    RandomResizedCrop), width and height swapped with probability 0.5.
    """
    area = height * width
    for _ in range(tries):
        target_area = rng.uniform(0.08, 1.0) * area
        aspect = rng.uniform(3.0 / 4, 4.0 / 3)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if rng.random() < 0.5:
            w, h = h, w
        if w <= width and h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return top, left, h, w
    return None


class TrainAugment:
    """Shorter side to ``scale_size`` (bicubic), random-sized crop to ``size`` (bilinear), flip, grayscale.

    ``flip_label_pairs`` are classes a flip turns into each other (SSv2); ``grayscale_p`` 0 turns grayscale
    off (the release does for SSv2).
    """

    def __init__(
        self,
        size: int = 224,
        scale_size: int = 256,
        grayscale_p: float = 0.2,
        flip_label_pairs: Sequence[tuple[int, int]] = (),
    ) -> None:
        self.size = size
        self.scale_size = scale_size
        self.grayscale_p = grayscale_p
        self.swap = {a: b for p in flip_label_pairs for a, b in (p, p[::-1])}

    def __call__(self, clip: torch.Tensor, label: int, rng: random.Random) -> tuple[torch.Tensor, int]:
        """Augment a uint8 ``(T, 3, H, W)`` clip; returns the normalised float clip and its label."""
        video = tv_tensors.Video(clip)
        video = F.resize(video, [self.scale_size], interpolation=_BICUBIC, antialias=True)
        height, width = video.shape[-2:]
        box = random_sized_crop_box(height, width, rng)
        if box is not None:
            video = F.resized_crop(video, *box, size=[self.size, self.size], interpolation=_BILINEAR)
        else:  # the release's fallback: scale the shorter side to the crop size, then a random crop
            video = F.resize(video, [self.size], interpolation=_BILINEAR, antialias=True)
            height, width = video.shape[-2:]
            top, left = rng.randint(0, height - self.size), rng.randint(0, width - self.size)
            video = F.crop(video, top, left, self.size, self.size)
        if rng.random() < 0.5:
            video = F.horizontal_flip(video)
            label = self.swap.get(label, label)
        frames = video.as_subclass(torch.Tensor)
        if rng.random() < self.grayscale_p:  # the kernel takes (..., 3, H, W): all frames in one call
            frames = F.rgb_to_grayscale(frames, num_output_channels=3)
        return normalize(frames), label


def crop_offsets(height: int, width: int, size: int, num_crops: int) -> list[tuple[int, int, bool]]:
    """``(top, left, flipped)`` of the release's 1/3/5/10 test crops of a ``height × width`` frame.

    1: centre. 3: left, right, centre (steps of a quarter of the spare length). 5: the four corners, then
    the centre. 10: each of the five followed by its mirror image.
    """
    if num_crops not in TEST_CROPS:
        raise ValueError(f"test crops must be one of {TEST_CROPS}, got {num_crops}")
    if num_crops == 1:
        return [(int(round((height - size) / 2.0)), int(round((width - size) / 2.0)), False)]
    hs, ws = (height - size) // 4, (width - size) // 4
    if num_crops == 3:
        return [(0, 0, False), (0, 4 * ws, False), (2 * hs, 2 * ws, False)]
    five = [(0, 0), (0, 4 * ws), (4 * hs, 0), (4 * hs, 4 * ws), (2 * hs, 2 * ws)]
    if num_crops == 5:
        return [(t, left, False) for t, left in five]
    return [(t, left, flip) for t, left in five for flip in (False, True)]


class EvalViews:
    """Shorter side to ``size`` (bicubic), then ``num_crops`` crops of ``size × size`` of every clip."""

    def __init__(self, size: int = 224, num_crops: int = 1) -> None:
        crop_offsets(size, size, size, num_crops)  # validates num_crops
        self.size = size
        self.num_crops = num_crops

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        """uint8 ``(K, T, 3, H, W)`` clips → float views ``(crops·K, T, 3, size, size)``, crop-major."""
        k, t = clips.shape[:2]
        video = tv_tensors.Video(clips.flatten(0, 1))
        video = F.resize(video, [self.size], interpolation=_BICUBIC, antialias=True)
        height, width = video.shape[-2:]
        views = []
        for top, left, flip in crop_offsets(height, width, self.size, self.num_crops):
            view = F.crop(video, top, left, self.size, self.size)
            views.append(F.horizontal_flip(view) if flip else view)
        out = torch.stack([v.as_subclass(torch.Tensor) for v in views])  # (crops, K*T, 3, s, s)
        return normalize(out.reshape(len(views) * k, t, *out.shape[-3:]))
