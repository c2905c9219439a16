"""The per-task decoder head of Stage 2 (SPEC §7)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HEAD_DOWN_RATIO = 4
"""The fused maps and the last convolution of ``DenseHead`` run at 1 / ``HEAD_DOWN_RATIO`` of the input size
(released); the logits are then upsampled bilinearly to the input size."""

HEAD_OUTPUTS = ("bilinear", "subpixel")
"""How ``DenseHead`` brings its logits from 1 / ``down_ratio`` to the input size: ``"bilinear"`` (released)
interpolates them; ``"subpixel"`` has the last convolution predict every pixel of each ``down_ratio`` ×
``down_ratio`` cell and rearranges them (``pixel_shuffle``), so an edge can sit on any pixel."""


class DenseHead(nn.Module):
    """Multi-level linear decoder: per tap Linear(D→D/4) on patch tokens, upsample to 1/4 of the input,
    concatenate, Conv3×3 → BatchNorm → GELU → Conv1×1, upsample to the input size (bilinear throughout).

    ``output="subpixel"`` (not released) replaces the last bilinear upsampling: the Conv1×1 gives
    ``out_channels × down_ratio²`` channels, one per pixel of each output cell, rearranged with
    ``pixel_shuffle``. The released bilinear upsampling peaks at the cell centres, which at small inputs
    keeps thin structures (boundaries) off most pixels. The input size must then be a multiple of
    ``down_ratio``.

    Parameter names follow the released checkpoints (``linears``, ``linear_fuse.{0,1}``, ``last_conv``).
    BatchNorm becomes SyncBatchNorm under DDP through ``nn.SyncBatchNorm.convert_sync_batchnorm``.
    """

    def __init__(
        self,
        dim: int,
        out_channels: int,
        num_levels: int = 4,
        down_ratio: int = HEAD_DOWN_RATIO,
        output: str = "bilinear",
    ) -> None:
        super().__init__()
        if output not in HEAD_OUTPUTS:
            raise ValueError(f"unknown head output {output!r}; expected one of {HEAD_OUTPUTS}")
        reduced = dim // 4
        self.down_ratio = down_ratio
        self.output = output
        self.linears = nn.ModuleList(nn.Linear(dim, reduced) for _ in range(num_levels))
        fused = reduced * num_levels
        self.linear_fuse = nn.Sequential(nn.Conv2d(fused, dim, 3, padding=1), nn.BatchNorm2d(dim))
        self.act = nn.GELU()
        per_cell = down_ratio**2 if output == "subpixel" else 1
        self.last_conv = nn.Conv2d(dim, out_channels * per_cell, 1)

    def forward(self, patch_maps: Sequence[Tensor], out_size: tuple[int, int]) -> Tensor:
        """Per-tap (B, D, h, w) patch maps → (B, C, H, W) at ``out_size``."""
        size = (out_size[0] // self.down_ratio, out_size[1] // self.down_ratio)
        if self.output == "subpixel" and (out_size[0] % self.down_ratio or out_size[1] % self.down_ratio):
            raise ValueError(
                f"a subpixel head needs an input size divisible by {self.down_ratio}, got {tuple(out_size)}"
            )
        levels = []
        for linear, m in zip(self.linears, patch_maps, strict=True):
            y = linear(m.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(m.shape[0], -1, *m.shape[-2:])
            levels.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        y = self.last_conv(self.act(self.linear_fuse(torch.cat(levels, dim=1))))
        if self.output == "subpixel":
            return F.pixel_shuffle(y, self.down_ratio)
        return F.interpolate(y, size=tuple(out_size), mode="bilinear", align_corners=False)
