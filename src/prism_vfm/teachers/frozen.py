"""A teacher as the trainer sees it: frozen, always in eval mode, returning its tapped patch-token maps."""

from __future__ import annotations

import contextlib
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple
from torch import Tensor, nn

from prism_vfm.teachers.spec import ImgSize, TeacherSpec, resize_longest_side


def sam_resize_pad(images: Tensor, long_side: int = 1024) -> Tensor:
    """SAM's input handling on a normalised batch (B, C, H, W): bicubic resize so the longer side is
    ``long_side``, then zero padding at the bottom and right to ``long_side``².

    The padding is zero in normalised space (the mean colour), as SAM pads after normalising.
    """
    in_h, in_w = images.shape[-2:]
    h, w = resize_longest_side((in_h, in_w), long_side)
    if (h, w) != tuple(images.shape[-2:]):
        images = F.interpolate(images, size=(h, w), mode="bicubic", align_corners=False)
    return F.pad(images, (0, long_side - w, 0, long_side - h))


class _FeatureModel(Protocol):
    """timm's feature-extraction interface, which every teacher model offers (checked at construction)."""

    def forward_intermediates(
        self, x: Tensor, *, indices: list[int], norm: bool, output_fmt: str, intermediates_only: bool
    ) -> list[Tensor]: ...

    def prune_intermediate_layers(
        self, indices: list[int], *, prune_norm: bool, prune_head: bool
    ) -> object: ...


class FrozenTeacher(nn.Module):
    """A frozen teacher: eval mode for good, no gradients, only the tapped blocks kept.

    ``forward(images)`` takes the ImageNet-normalised batch the student sees and returns one map per tap,
    (B, ``out_dim``, *``grid_size()``), float32: the raw block outputs (no final norm, no SAM neck) with
    CLS/register tokens dropped. Blocks after the last tap, the final norm, the neck and the head are
    removed at construction, so they cost neither memory nor time.

    Args:
        spec: what the teacher is.
        model: the network ``spec.builder`` made; pruned in place.
        img_size: the student's input size (H, W) or side; ``"resize"`` teachers accept only that size.
        bf16: run under bf16 autocast when the input is on CUDA.
        crop_padding: for ``"sam"`` teachers, return only the grid cells covering image content (the fix
            for teacher maps misaligned with non-square inputs, SPEC §12); the official code keeps the
            whole 64×64 grid, padding included (the default).
    """

    def __init__(
        self,
        spec: TeacherSpec,
        model: nn.Module,
        img_size: ImgSize,
        *,
        bf16: bool = False,
        crop_padding: bool = False,
    ) -> None:
        super().__init__()
        for method in ("forward_intermediates", "prune_intermediate_layers"):
            if not callable(getattr(model, method, None)):
                raise TypeError(
                    f"teacher {spec.name!r}: its model ({type(model).__name__}) has no {method}(); teachers "
                    "must follow timm's feature-extraction interface"
                )
        _check_geometry(spec, model)
        features = cast(_FeatureModel, model)
        features.prune_intermediate_layers(list(spec.taps), prune_norm=True, prune_head=True)
        self.model = model.requires_grad_(False)
        self.spec = spec
        self.img_size = to_2tuple(img_size)
        self.bf16 = bf16
        self.crop_padding = crop_padding
        self.train(False)

    @property
    def out_dim(self) -> int:
        """Channel width of every tap."""
        return self.spec.out_dim

    @property
    def taps(self) -> tuple[int, ...]:
        """Block indices of the returned maps."""
        return self.spec.taps

    def grid_size(self, img_size: ImgSize | None = None) -> tuple[int, int]:
        """The (H, W) of every returned map for a student input of ``img_size`` (default: the built size)."""
        img_size = self.img_size if img_size is None else img_size
        if self.crop_padding:
            return self.spec.content_grid_size(img_size)
        return self.spec.grid_size(img_size)

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Stay in eval mode whatever ``mode`` says: a teacher is a fixed target (no dropout or drop-path)."""
        return super().train(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        """The tapped maps for a normalised batch (B, 3, H, W)."""
        size = tuple(images.shape[-2:])
        if self.spec.preprocess == "resize" and size != self.img_size:
            raise ValueError(
                f"teacher {self.spec.name!r} was built for {self.img_size[0]}×{self.img_size[1]} inputs, "
                f"got {size[0]}×{size[1]}; rebuild it with img_size={size}"
            )
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.bf16 and images.is_cuda
            else contextlib.nullcontext()
        )
        with torch.no_grad(), autocast:
            if self.spec.preprocess == "sam":
                images = sam_resize_pad(images, self.spec.long_side)
            maps = cast(_FeatureModel, self.model).forward_intermediates(
                images, indices=list(self.spec.taps), norm=False, output_fmt="NCHW", intermediates_only=True
            )
        if self.crop_padding:
            h, w = self.spec.content_grid_size((size[0], size[1]))
            maps = [m[..., :h, :w] for m in maps]
        return [m.float() for m in maps]

    def extra_repr(self) -> str:
        return f"name={self.spec.name!r}, taps={self.spec.taps}, img_size={self.img_size}, bf16={self.bf16}"


def _check_geometry(spec: TeacherSpec, model: nn.Module) -> None:
    """Fail at build time, naming the spec, when its declared width or patch disagrees with the model."""
    width = getattr(model, "embed_dim", None)
    if width is not None and width != spec.out_dim:
        raise ValueError(
            f"teacher {spec.name!r} declares out_dim={spec.out_dim} but its model is {width} wide"
        )
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None and tuple(to_2tuple(patch)) != (spec.patch_size, spec.patch_size):
        raise ValueError(
            f"teacher {spec.name!r} declares patch_size={spec.patch_size} but its model uses {patch}"
        )
