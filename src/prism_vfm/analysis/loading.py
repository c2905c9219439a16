"""Checkpoints and images for the analyses: any model the library saves or the authors released.

A checkpoint is one of: a run folder (its latest checkpoint, or all of them for series over training), a
checkpoint or ``save_pretrained`` folder (``config.json`` + ``model.safetensors``; Stage 1 or Stage 2),
or an official ``.pth`` (Stage 1 or Stage 2, detected from its keys). Loading goes through the library's
loader (:func:`prism_vfm.models.load.load`); this module expands run folders into checkpoints and finds
the teacher names a run recorded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision import transforms

from prism_vfm.analysis.common import OFFICIAL_TEACHER_NAMES
from prism_vfm.data.image_folder import IMAGENET_MEAN, IMAGENET_STD, UnlabelledImageFolder
from prism_vfm.models.load import LoadReport, is_released_tag, load
from prism_vfm.models.multitask import PrismMultiTask
from prism_vfm.models.prism_vit import PrismViT
from prism_vfm.train.checkpoint import checkpoint_dir, latest_checkpoint

logger = logging.getLogger(__name__)

_KINDS = (
    "a run folder, a checkpoint or save_pretrained folder (config.json + model.safetensors), "
    "an official .pth, or a released checkpoint's tag (e.g. prism_vit_base_patch16_384.prism_stage1)"
)


@dataclass
class LoadedModel:
    """A model to analyse with what is known about its contexts."""

    model: nn.Module  # PrismViT (Stage 1) or PrismMultiTask (Stage 2)
    label: str  # e.g. "step_00001000" or the file's stem
    source: Path
    teachers: list[str] | None = None  # teacher registry names a run was trained with
    teacher_weights: str | None = None  # where that run took the teachers' weights from
    report: LoadReport | None = None  # what the load took from the source

    @property
    def student(self) -> PrismViT:
        return self.model.student if isinstance(self.model, PrismMultiTask) else cast(PrismViT, self.model)

    @property
    def default_kind(self) -> str:
        return "task" if isinstance(self.model, PrismMultiTask) else "teacher"

    def context_names(self, kind: str, contexts: Sequence[int]) -> list[str]:
        """Task names, the run's teacher names, the released order (DINOv2, CLIP, SAM) for an official
        three-teacher model, else ``"<kind> <id>"``."""
        if kind == "task" and isinstance(self.model, PrismMultiTask):
            return [self.model.task_names[c] for c in contexts]
        if kind == "teacher":
            if self.teachers and len(self.teachers) == self.student.num_teachers:
                return [self.teachers[c] for c in contexts]
            official = self.source.is_file() or is_released_tag(str(self.source))
            if official and self.student.num_teachers == len(OFFICIAL_TEACHER_NAMES):
                return [OFFICIAL_TEACHER_NAMES[c] for c in contexts]
        return [f"{kind} {c}" for c in contexts]


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and checkpoint_dir(path).is_dir()


def run_checkpoints(run: Path) -> list[Path]:
    """Every complete checkpoint of a run, oldest first."""
    found = sorted(
        p for p in checkpoint_dir(run).glob("step_*") if p.is_dir() and (p / "model.safetensors").is_file()
    )
    if not found:
        raise FileNotFoundError(f"run folder {run} has no complete checkpoint under {checkpoint_dir(run)}")
    return found


def expand_checkpoints(sources: Sequence[str | os.PathLike], series: bool) -> list[Path]:
    """Paths to load: a run folder becomes all its checkpoints (``series``) or its latest one."""
    out: list[Path] = []
    for source in sources:
        path = Path(source)
        if not path.exists() and is_released_tag(str(source)):
            out.append(path)  # the loader downloads it
            continue
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist; expected {_KINDS}")
        if is_run_dir(path):
            if series:
                out += run_checkpoints(path)
            else:
                latest = latest_checkpoint(path)
                out.append(latest if latest is not None else run_checkpoints(path)[-1])
        else:
            out.append(path)
    return out


def _run_config(checkpoint: Path) -> dict[str, Any]:
    """The ``config.yaml`` of the run a checkpoint folder belongs to, if any."""
    cfg = checkpoint.parent.parent / "config.yaml"
    if checkpoint.parent.name == "checkpoints" and cfg.is_file():
        return yaml.safe_load(cfg.read_text()) or {}
    return {}


def load_for_analysis(
    source: str | os.PathLike, img_size: Sequence[int] | None = None, device: str = "cpu"
) -> LoadedModel:
    """Load any checkpoint the analyses accept (see the module notes); a run folder gives its latest.

    ``img_size`` (H, W) rebuilds the model for another input size (position embedding resampled). What
    was loaded is logged (``prism analyze`` shows it).
    """
    path = expand_checkpoints([source], series=False)[0]
    model, report = load(path, img_size=img_size)
    logger.info("%s", report.summary())
    teachers, weights = None, None
    if path.is_dir():
        run_cfg = _run_config(path)
        block = run_cfg.get("teachers") or {}
        distill = run_cfg.get("distill") or {}
        teachers = block.get("names") or distill.get("teachers")
        weights = block.get("weights") or distill.get("weights")
    label = path.name if path.is_dir() or not path.exists() else path.stem
    return LoadedModel(
        model.to(device).eval(),
        label,
        path,
        list(teachers) if teachers else None,
        str(weights) if weights else None,
        report,
    )


def analysis_transform(img_size: Sequence[int]) -> transforms.Compose:
    """Deterministic evaluation view: resize so the image covers (H, W), centre crop, ImageNet normalise."""
    h, w = (int(s) for s in img_size)
    return transforms.Compose(
        [
            transforms.Resize(max(h, w), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop((h, w)),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def image_batches(
    data: str | os.PathLike, img_size: Sequence[int], images: int = 64, batch_size: int = 8
) -> list[Tensor]:
    """The first ``images`` images of a folder (sorted order, so every checkpoint sees the same ones),
    as normalised batches at ``img_size``. Any folder of images works: an ImageNet-layout or flat folder,
    or the ``JPEGImages`` folder of a dense data set."""
    if images < 1 or batch_size < 1:
        raise ValueError(f"images and batch size must be positive, got {images} and {batch_size}")
    folder = UnlabelledImageFolder(data, analysis_transform(img_size))
    subset = torch.utils.data.Subset(folder, range(min(images, len(folder))))
    return list(DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=0))
