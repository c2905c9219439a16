"""Stage-1 unlabelled images: folder discovery, robust decoding to RGB, the augmentation and the loader."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info
from torchvision import transforms

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_LAYOUTS = (
    "root/<class>/<image> (the ImageNet layout; labels are unused) or images directly in root "
    "(one level of sub-folders is searched)"
)


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image file completely and return it as 8-bit RGB.

    - L, P, 1, CMYK, YCbCr: Pillow's conversion (CMYK without ICC profiles: pure cyan becomes (0, 255, 255)).
    - RGBA, LA, transparent P: the alpha channel is dropped and the stored colour kept, the same pixels
      torchvision's and timm's folder loaders produce.
    - I;16 (16-bit) and I (32-bit integer, read as 16-bit data): clipped to [0, 65535], scaled by 1/257 and
      rounded, so 65535 becomes 255.
    - F (float): read on a unit scale (x 255) when every value is at most 1, else on Pillow's 8-bit scale;
      clipped to [0, 255], NaN as 0.

    Raises whatever Pillow raises for a missing, unreadable or truncated file.
    """
    with Image.open(path) as img:
        img.load()  # decode now, so a truncated file fails here rather than inside the transform
        return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "I" or img.mode.startswith("I;16"):
        # Pillow's own I;16 -> L conversion clips at 255 instead of rescaling, which turns most 16-bit
        # images white.
        values: np.ndarray = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        gray = ((values + 128) // 257).astype(np.uint8)
    elif img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        # Float files carry no range; unit-scale data (the usual float TIFF) would otherwise come out black.
        if values.max() <= 1.0:
            values = values * 255.0
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    else:
        if img.mode == "P" and "transparency" in img.info:
            # Through RGBA so Pillow resolves the transparency entry instead of warning about it.
            img = img.convert("RGBA")
        return img.convert("RGB")
    return Image.fromarray(gray).convert("RGB")


def _is_image(entry: os.DirEntry[str]) -> bool:
    return (
        not entry.name.startswith(".")
        and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
        and entry.is_file()
    )


def _find_images(root: Path) -> list[str]:
    """Image paths relative to ``root``: its own files plus those one sub-folder down, sorted."""
    found: list[str] = []
    with os.scandir(root) as top:
        for entry in top:
            # Hidden entries are skipped: macOS copies of ImageNet carry `._name.JPEG` resource forks.
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                with os.scandir(entry.path) as sub:
                    found.extend(f"{entry.name}/{e.name}" for e in sub if _is_image(e))
            elif _is_image(entry):
                found.append(entry.name)
    return sorted(found)


class UnlabelledImageFolder(Dataset):
    """The images under ``root``, without labels, decoded robustly to RGB.

    Accepts ``root/<class>/<image>`` (ImageNet) or images directly in ``root``, one sub-folder level deep at
    most; extensions are those of ``IMAGE_EXTENSIONS`` in any case, hidden files are ignored. Files are sorted
    by their path relative to ``root``, so an index names the same file on every machine.

    ``dataset[i]`` is ``transform(load_rgb(file_i))`` (the PIL image when ``transform`` is None). When file i
    cannot be decoded, the next readable file after it (wrapping round) is served instead: batches stay full
    and the epoch length never changes. Each such replacement adds one to ``skipped``, whose counters live in
    shared memory (one slot per DataLoader worker), so the process that owns the loader can read the total
    after an epoch; ``max_workers`` sizes that table, and a DataLoader with more workers fails on its first
    sample. Each bad file is logged once, as one warning naming it and the decoder's reason, and is not
    decoded again.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        max_workers: int = 64,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.root} does not exist or is not a directory; expected {_LAYOUTS}"
            )
        files = _find_images(self.root)
        if not files:
            raise ValueError(
                f"no images found in {self.root}; expected {_LAYOUTS}, with extensions "
                f"{', '.join(IMAGE_EXTENSIONS)} (any case)"
            )
        # One numpy byte array rather than a list of str: forked workers that touch Python objects copy
        # their pages (reference counts), which for ImageNet's 1.28M paths multiplies memory per worker.
        self._files = np.array([os.fsencode(f) for f in files])
        self._known_bad = torch.zeros(len(files), dtype=torch.bool).share_memory_()
        self._skips = torch.zeros(max_workers + 1, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self._files)

    def path(self, index: int) -> Path:
        """The file behind ``index`` (before any replacement of an unreadable file)."""
        return self.root / os.fsdecode(self._files[index])

    def __getitem__(self, index: int) -> Any:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        slot = self._skip_slot()
        for step in range(n):
            image = self._try_load((index + step) % n)
            if image is not None:
                return image if self.transform is None else self.transform(image)
            if step == 0:
                self._skips[slot] += 1
        raise RuntimeError(f"none of the {n} files under {self.root} could be decoded; see the warnings")

    def _skip_slot(self) -> int:
        info = get_worker_info()
        if info is None:
            return 0
        if info.id + 1 >= len(self._skips):
            raise RuntimeError(
                f"DataLoader worker {info.id} has no skip counter: build UnlabelledImageFolder with "
                f"max_workers >= {info.num_workers}"
            )
        return info.id + 1

    def _try_load(self, index: int) -> Image.Image | None:
        if self._known_bad[index]:
            return None
        path = self.path(index)
        try:
            return load_rgb(path)
        except Exception as err:  # any decoder failure on one file must not end a days-long run
            self._known_bad[index] = True
            logger.warning("skipping unreadable image %s (%s: %s)", path, type(err).__name__, err)
            return None

    @property
    def skipped(self) -> int:
        """Unreadable files replaced so far, summed over this process and all its DataLoader workers."""
        return int(self._skips.sum())

    @property
    def skipped_per_worker(self) -> list[int]:
        """Replacements per process: entry 0 is the loading process itself, entry w + 1 is worker w."""
        return self._skips.tolist()

    def reset_skipped(self) -> None:
        """Zero the replacement counters (e.g. at the start of an epoch)."""
        self._skips.zero_()


def stage1_train_transform(
    img_size: int | tuple[int, int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> transforms.Compose:
    """The Stage-1 augmentation (SPEC §6): RandomResizedCrop (scale 0.08-1, bilinear), horizontal flip,
    ToTensor and normalisation. ``img_size`` is a side length or an ``(height, width)`` pair."""
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(
                size, scale=(0.08, 1.0), interpolation=transforms.InterpolationMode.BILINEAR
            ),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def build_stage1_loader(
    root: str | os.PathLike[str],
    img_size: int | tuple[int, int],
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
) -> DataLoader:
    """The Stage-1 training loader over an unlabelled image folder, for one rank of ``world_size``.

    The sampler is always a ``DistributedSampler`` (shuffled, seeded with ``seed``; call
    ``loader.sampler.set_epoch(epoch)`` before each epoch); with one process it shuffles the whole folder.
    Augmentation randomness in workers comes from a generator seeded with ``seed + rank`` (PyTorch seeds
    ``torch``, ``random`` and ``numpy`` in each worker from it), so the same arguments give the same batches.
    With ``num_workers == 0`` the augmentation draws from the caller's global torch RNG instead. Workers are
    persistent; memory is pinned when CUDA is available. ``loader.dataset.skipped`` counts replaced files.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    dataset = UnlabelledImageFolder(root, stage1_train_transform(img_size), max_workers=num_workers)
    # A DistributedSampler even on one process: the order is then a function of (seed, epoch) alone, so
    # set_epoch works everywhere and a resumed run replays the uninterrupted run's order.
    sampler: DistributedSampler[int] = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=drop_last
    )
    # The rank offset keeps ranks from drawing identical crop and flip sequences.
    generator = torch.Generator().manual_seed(seed + rank)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        generator=generator,
    )
