"""Stage-2 sample transforms: the SPEC §8 training augmentation and the test-time padding.

A sample is the dict the Stage-2 readers produce: ``image`` ``(3, H, W)`` float RGB on the 0..255 scale,
one ``(C, H, W)`` float label per task (keys ``semseg``, ``human_parts``, ``sal``, ``edge``, ``normals``,
``depth``) and an optional ``meta`` dict. Every step returns a new dict and leaves its input untouched.

Random draws come from the ``generator`` passed in, or from the global torch RNG when it is None, so a
sampler that seeds per sample (``SeededAugmentation``) makes the augmentation reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from prism_vfm.data.image_folder import IMAGENET_MEAN, IMAGENET_STD
from prism_vfm.data.labels import IGNORE_INDEX, add_ignore_regions
from prism_vfm.data.registry import get_dataset

Sample = dict[str, Any]


PAD_FILL: dict[str, float] = {
    "semseg": IGNORE_INDEX,
    "human_parts": IGNORE_INDEX,
    "sal": IGNORE_INDEX,
    "edge": IGNORE_INDEX,
    "normals": 0.0,
    "depth": 0.0,
}
"""What padding writes into each label; zero normals and zero depth become 255 in the ignore-region step."""


def _labels(sample: Sample) -> list[str]:
    unknown = [k for k in sample if k not in PAD_FILL and k not in ("image", "meta")]
    if unknown:
        raise ValueError(
            f"sample entries {unknown} are neither 'image', 'meta' nor a task of {list(PAD_FILL)}"
        )
    return [k for k in sample if k in PAD_FILL]


def _map(
    sample: Sample, image_fn: Callable[[Tensor], Tensor], label_fn: Callable[[str, Tensor], Tensor]
) -> Sample:
    """A new sample with ``image_fn(image)`` and ``label_fn(task, label)`` for each label."""
    out: Sample = {"image": image_fn(sample["image"])}
    out.update({task: label_fn(task, sample[task]) for task in _labels(sample)})
    if "meta" in sample:
        out["meta"] = dict(sample["meta"])
    return out


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """An integer in ``[low, high)``."""
    return int(torch.randint(low, high, (), generator=generator))


def _coin(p: float, generator: torch.Generator | None) -> bool:
    return float(torch.rand((), generator=generator)) < p


def rescale(sample: Sample, scale: float) -> Sample:
    """Resize by ``scale`` to ``(round(H s), round(W s))``: the image bilinearly (rounded back to the 8-bit
    grid an 8-bit pipeline keeps), every label by nearest neighbour, and depth divided by ``scale`` (an
    enlarged image looks like one taken closer)."""
    height, width = sample["image"].shape[-2:]
    size = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))

    def image_fn(image: Tensor) -> Tensor:
        resized = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        return resized.round().clamp(0, 255)

    def label_fn(task: str, label: Tensor) -> Tensor:
        resized = F.interpolate(label[None], size=size, mode="nearest")[0]
        return resized / scale if task == "depth" else resized

    return _map(sample, image_fn, label_fn)


def crop(sample: Sample, top: int, left: int, height: int, width: int) -> Sample:
    """The window ``[top, top + height) x [left, left + width)`` of the image and every label."""

    def window(x: Tensor) -> Tensor:
        return x[..., top : top + height, left : left + width]

    return _map(sample, window, lambda _, label: window(label))


def _is_balanced(semseg: Tensor, cat_max_ratio: float) -> bool:
    """More than one class among the valid pixels, and the largest below ``cat_max_ratio`` of them."""
    counts = torch.unique(semseg[semseg != IGNORE_INDEX], return_counts=True)[1]
    return len(counts) > 1 and int(counts.max()) < cat_max_ratio * int(counts.sum())


def random_crop(
    sample: Sample,
    size: tuple[int, int],
    generator: torch.Generator | None = None,
    cat_max_ratio: float = 0.75,
    redraws: int = 10,
) -> Sample:
    """A random crop of ``size`` (smaller where the image is smaller; padding comes later).

    While the ``semseg`` crop is not balanced (more than one class, the largest under ``cat_max_ratio`` of
    the valid pixels) the window is drawn again, at most ``redraws`` times; the last draw is kept either way.
    Samples without ``semseg`` keep the first draw.
    """
    height, width = sample["image"].shape[-2:]
    crop_h, crop_w = min(size[0], height), min(size[1], width)

    def draw() -> tuple[int, int]:
        return _randint(0, height - crop_h + 1, generator), _randint(0, width - crop_w + 1, generator)

    top, left = draw()
    if "semseg" in sample:
        for _ in range(redraws):
            window = sample["semseg"][..., top : top + crop_h, left : left + crop_w]
            if _is_balanced(window, cat_max_ratio):
                break
            top, left = draw()
    return crop(sample, top, left, crop_h, crop_w)


def horizontal_flip(sample: Sample) -> Sample:
    """Mirror the image and every label left-right; the normals' x component changes sign with it."""

    def label_fn(task: str, label: Tensor) -> Tensor:
        flipped = label.flip(-1)
        if task == "normals":
            flipped = flipped * torch.tensor([-1.0, 1.0, 1.0], dtype=label.dtype)[:, None, None]
        return flipped

    return _map(sample, lambda image: image.flip(-1), label_fn)


def _to_8bit(image: Tensor) -> Tensor:
    """Clip to [0, 255] and truncate, as an 8-bit pipeline does after each photometric step."""
    return image.clamp(0, 255).floor()


def _rgb_to_hsv(rgb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """RGB on 0..255 to hue on OpenCV's 0..180 scale (2 degrees a unit), saturation and value on 0..255."""
    r, g, b = rgb.unbind(0)
    value = rgb.amax(0)
    chroma = value - rgb.amin(0)
    safe = chroma.clamp_min(1e-12)
    sector = torch.where(
        value == r, ((g - b) / safe) % 6, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    hue = torch.where(chroma > 0, sector * 30.0, 0.0)
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-12) * 255.0, 0.0)
    return hue, saturation, value


def _hsv_to_rgb(hue: Tensor, saturation: Tensor, value: Tensor) -> Tensor:
    """Inverse of ``_rgb_to_hsv``; the result is rounded to the 8-bit grid."""
    sector = hue / 30.0
    scaled = value * saturation / 255.0
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (n + sector) % 6
        channels.append(value - scaled * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(channels).round().clamp(0, 255)


def scale_saturation(image: Tensor, factor: float) -> Tensor:
    """Multiply the HSV saturation of an RGB image on 0..255 by ``factor`` (clipped to the 8-bit range)."""
    hue, saturation, value = _rgb_to_hsv(image)
    return _hsv_to_rgb(hue, _to_8bit(saturation * factor), value)


def shift_hue(image: Tensor, delta: int) -> Tensor:
    """Add ``delta`` to the hue of an RGB image on 0..255, modulo 180 on OpenCV's 0..180 hue scale
    (2 degrees a unit: ``delta = 60`` turns red into green)."""
    hue, saturation, value = _rgb_to_hsv(image)
    return _hsv_to_rgb((hue + delta) % 180, saturation, value)


def photometric_distortion(image: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The SPEC §8 colour jitter of an RGB image on 0..255, each step applied with probability 0.5:
    brightness ``+ U(-32, 32)``; contrast ``x U(0.5, 1.5)``, either before or after (probability 0.5) the
    HSV steps; saturation ``x U(0.5, 1.5)``; hue ``+ d mod 180`` with d an integer in [-18, 17], on
    OpenCV's 0..180 hue scale. Each step clips to [0, 255] and keeps the image on the 8-bit grid."""

    def contrast(x: Tensor) -> Tensor:
        return _to_8bit(x * _uniform(0.5, 1.5, generator)) if _coin(0.5, generator) else x

    if _coin(0.5, generator):
        image = _to_8bit(image + _uniform(-32.0, 32.0, generator))
    contrast_first = _coin(0.5, generator)
    if contrast_first:
        image = contrast(image)
    if _coin(0.5, generator):
        image = scale_saturation(image, _uniform(0.5, 1.5, generator))
    if _coin(0.5, generator):
        image = shift_hue(image, _randint(-18, 18, generator))
    if not contrast_first:
        image = contrast(image)
    return image


def normalize(
    image: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Tensor:
    """An RGB image on 0..255 to ``(x / 255 - mean) / std`` per channel."""
    mean_t = torch.tensor(mean, dtype=image.dtype)[:, None, None]
    std_t = torch.tensor(std, dtype=image.dtype)[:, None, None]
    return (image / 255.0 - mean_t) / std_t


def pad_centred(sample: Sample, size: tuple[int, int]) -> Sample:
    """Pad to ``size`` with the content centred (an odd margin puts the extra row / column at the bottom /
    right): the image with 0, each label with its ``PAD_FILL``. ``meta["pad"]`` records
    ``(top, bottom, left, right)`` so predictions can be cropped back. ValueError if the sample is larger."""
    height, width = sample["image"].shape[-2:]
    if height > size[0] or width > size[1]:
        raise ValueError(f"sample of size {(height, width)} does not fit the input size {tuple(size)}")
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    bottom, right = size[0] - height - top, size[1] - width - left
    pads = (left, right, top, bottom)
    out = _map(
        sample,
        lambda image: F.pad(image, pads, value=0.0),
        lambda task, label: F.pad(label, pads, value=float(PAD_FILL[task])),
    )
    out.setdefault("meta", {})["pad"] = (top, bottom, left, right)
    return out


def ignore_regions(sample: Sample) -> Sample:
    """``add_ignore_regions`` applied to every label of the sample (the last step of both pipelines)."""
    return _map(sample, lambda image: image, add_ignore_regions)


class DenseTrainTransform:
    """The SPEC §8 training pipeline: random scale ``s ~ U[scale_range)`` → random crop to ``input_size``
    (balanced-semseg re-draws) → horizontal flip (p ``flip_prob``) → photometric distortion (when
    ``photometric``) → normalisation → centred padding to ``input_size`` → ignore regions.

    ``transform(sample, generator=None)``: draws come from ``generator``, or the global torch RNG.
    """

    def __init__(
        self,
        input_size: tuple[int, int],
        scale_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        crop_redraws: int = 10,
        flip_prob: float = 0.5,
        photometric: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.scale_range = scale_range
        self.cat_max_ratio = cat_max_ratio
        self.crop_redraws = crop_redraws
        self.flip_prob = flip_prob
        self.photometric = photometric
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        """The augmented, normalised, padded sample."""
        sample = rescale(sample, _uniform(*self.scale_range, generator))
        sample = random_crop(sample, self.input_size, generator, self.cat_max_ratio, self.crop_redraws)
        if _coin(self.flip_prob, generator):
            sample = horizontal_flip(sample)
        if self.photometric:
            sample = {**sample, "image": photometric_distortion(sample["image"], generator)}
        sample = {**sample, "image": normalize(sample["image"], self.mean, self.std)}
        return ignore_regions(pad_centred(sample, self.input_size))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_size={self.input_size}, scale_range={self.scale_range}, "
            f"cat_max_ratio={self.cat_max_ratio}, crop_redraws={self.crop_redraws}, "
            f"flip_prob={self.flip_prob}, photometric={self.photometric})"
        )


class DenseTestTransform:
    """The SPEC §8 test pipeline: normalisation → centred padding to ``input_size`` → ignore regions.
    Nothing is resized; a sample larger than ``input_size`` is an error."""

    def __init__(
        self,
        input_size: tuple[int, int],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, sample: Sample) -> Sample:
        """The normalised, padded sample."""
        sample = {**sample, "image": normalize(sample["image"], self.mean, self.std)}
        return ignore_regions(pad_centred(sample, self.input_size))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(input_size={self.input_size})"


def build_dense_transform(
    dataset: str, train: bool, input_size: tuple[int, int] | None = None
) -> DenseTrainTransform | DenseTestTransform:
    """The training or test transform of ``dataset`` (``"pascalcontext"`` or ``"nyud"``), at
    ``input_size`` or the data set's (``get_dataset(dataset).input_size``)."""
    size = get_dataset(dataset).input_size if input_size is None else input_size
    return DenseTrainTransform(size) if train else DenseTestTransform(size)
