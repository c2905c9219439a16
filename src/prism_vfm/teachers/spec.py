"""What a teacher is: its architecture, taps, width, input geometry and where its weights live (SPEC §5)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import timm
from timm.layers import to_2tuple
from torch import Tensor, nn

Preprocess = Literal["resize", "sam"]
ImgSize = int | tuple[int, int]
CheckpointFilter = Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]]


@dataclass(frozen=True)
class TimmBuilder:
    """A teacher builder: ``timm.create_model(model_name, pretrained=..., img_size=..., **kwargs)``.

    ``model_name`` carries the weight tag (``arch.tag``), so the hub weights are stated, not implied.
    """

    model_name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __call__(self, img_size: tuple[int, int], pretrained: bool) -> nn.Module:
        """Build the model for ``img_size`` (H, W); timm resamples position embeddings when ``pretrained``."""
        return timm.create_model(self.model_name, pretrained=pretrained, img_size=img_size, **self.kwargs)


@dataclass(frozen=True)
class TeacherSpec:
    """One frozen teacher.

    Attributes:
        name: registry key, e.g. ``"dinov2_l"``.
        builder: ``builder(img_size, pretrained) -> nn.Module``; the module must offer timm's
            ``forward_intermediates`` and ``prune_intermediate_layers`` (every timm ViT does).
        taps: 0-based block indices whose raw outputs are the distillation targets, increasing.
        out_dim: channel width of every tap.
        patch_size: side of one patch in model-input pixels.
        preprocess: ``"resize"``: the model is built at the student's input size (timm resamples its
            position embedding) and sees the image as is. ``"sam"``: the image is bicubically resized so its
            longest side is ``long_side``, zero-padded bottom/right to ``long_side``², and the model is built
            at ``long_side`` — SAM's own input handling.
        files: official local weight file names, tried in order in a weights directory.
        source: how to obtain those files (URL or hub id), quoted when one is missing.
        checkpoint_filter: ``filter(state_dict, model) -> state_dict`` mapping a file's key layout to the
            model's (timm's own ``checkpoint_filter_fn`` for timm models); None loads keys as they are.
        long_side: the square input side for ``preprocess="sam"`` (1024 for SAM); unused otherwise.
    """

    name: str
    builder: Callable[[tuple[int, int], bool], nn.Module]
    taps: tuple[int, ...]
    out_dim: int
    patch_size: int
    preprocess: Preprocess = "resize"
    files: tuple[str, ...] = ()
    source: str = ""
    checkpoint_filter: CheckpointFilter | None = None
    long_side: int = 1024

    def __post_init__(self) -> None:
        # Frozen dataclass: lists given by callers are normalised to tuples so specs stay hashable.
        object.__setattr__(self, "taps", tuple(int(t) for t in self.taps))
        object.__setattr__(self, "files", tuple(self.files))
        if not self.name:
            raise ValueError("a teacher needs a non-empty name")
        if not self.taps or self.taps[0] < 0 or any(b <= a for a, b in itertools.pairwise(self.taps)):
            raise ValueError(
                f"teacher {self.name!r}: taps must be non-negative and increasing, got {self.taps}"
            )
        if self.out_dim < 1 or self.patch_size < 1 or self.long_side < 1:
            raise ValueError(f"teacher {self.name!r}: out_dim, patch_size and long_side must be positive")
        if self.preprocess not in ("resize", "sam"):
            raise ValueError(
                f"teacher {self.name!r}: preprocess must be 'resize' or 'sam', got {self.preprocess!r}"
            )

    def model_img_size(self, img_size: ImgSize) -> tuple[int, int]:
        """The (H, W) the model is built at for a student input of ``img_size``."""
        return (self.long_side, self.long_side) if self.preprocess == "sam" else to_2tuple(img_size)

    def grid_size(self, img_size: ImgSize) -> tuple[int, int]:
        """The (H, W) patch grid of every tap for a student input of ``img_size``.

        A side that is not a multiple of the patch drops its remainder, as the patch convolution does
        (DINOv2-L/14 at 384 → 27×27).
        """
        h, w = self.model_img_size(img_size)
        return h // self.patch_size, w // self.patch_size

    def content_grid_size(self, img_size: ImgSize) -> tuple[int, int]:
        """The top-left part of the grid that covers image content rather than SAM's zero padding.

        Cells holding any content count. Equals :meth:`grid_size` for ``"resize"`` teachers and for square
        inputs.
        """
        if self.preprocess == "resize":
            return self.grid_size(img_size)
        h, w = resize_longest_side(to_2tuple(img_size), self.long_side)
        return math.ceil(h / self.patch_size), math.ceil(w / self.patch_size)


def resize_longest_side(size: tuple[int, int], long_side: int) -> tuple[int, int]:
    """(H, W) scaled so the longer side becomes ``long_side``, rounded half up as SAM's ResizeLongestSide."""
    h, w = size
    scale = long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)
