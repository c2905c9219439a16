"""Net2Net widening of a two-layer MLP: a wider MLP that computes exactly the same function.

Hidden unit ``j`` of the wide MLP is a copy of unit ``j mod H`` of the narrow one (tiling); each outgoing
weight is divided by the number of copies of its unit, so the copies' contributions add up to the original
unit's. The wide MLP is the iso-FLOPs dense baseline's FFN, initialised from the pretrained one.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
from timm.layers import Mlp
from torch import Tensor, nn


def tiling(hidden: int, wide: int) -> tuple[Tensor, Tensor]:
    """Source unit of every wide hidden unit (``j mod hidden``) and each wide unit's copy count."""
    if wide < hidden:
        raise ValueError(f"a Net2Net-widened MLP needs at least the {hidden} original units, got {wide}")
    mapping = torch.arange(wide) % hidden
    counts = torch.bincount(mapping, minlength=hidden)
    return mapping, counts.index_select(0, mapping)


def widen_mlp_param(name: str, value: Tensor, wide: int) -> Tensor:
    """One parameter of a narrow MLP (``fc1.weight``, ``fc1.bias``, ``fc2.weight`` or ``fc2.bias``, in
    ``nn.Linear`` layout) turned into its Net2Net-widened counterpart with ``wide`` hidden units."""
    if name == "fc2.bias":
        return value.clone()
    hidden = value.shape[0] if name.startswith("fc1") else value.shape[1]
    mapping, copies = tiling(hidden, wide)
    mapping = mapping.to(value.device)
    if name in ("fc1.weight", "fc1.bias"):
        return value.index_select(0, mapping).clone()
    if name == "fc2.weight":
        return value.index_select(1, mapping) / copies.to(value)
    raise ValueError(f"not a parameter of a two-layer MLP: {name!r}")


def resize_mlp_param(name: str, value: Tensor, hidden: int) -> Tensor:
    """A narrow MLP's parameter for an MLP with ``hidden`` hidden units: the same tensor when the widths
    agree, Net2Net-widened when ``hidden`` is larger (same function), the first ``hidden`` units when it
    is smaller (PRISM-lite experts keep part of the pretrained MLP; no longer the same function)."""
    own = value.shape[1] if name == "fc2.weight" else value.shape[0] if name.startswith("fc1") else hidden
    if hidden == own:
        return value.clone()
    if hidden > own:
        return widen_mlp_param(name, value, hidden)
    if name == "fc2.weight":
        return value[:, :hidden].clone()
    return value[:hidden].clone()


@torch.no_grad()
def net2net_widen(mlp: Mlp, wide: int) -> Mlp:
    """A copy of ``mlp`` with ``wide`` hidden units that computes the same function (up to rounding)."""
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise ValueError("Net2Net widening of an MLP with a normalisation between its layers is not exact")
    out = copy.deepcopy(mlp)
    # timm types the layers as Conv2d | Linear; a token MLP (use_conv=False) has nn.Linear ones.
    fc1, fc2 = cast(nn.Linear, mlp.fc1), cast(nn.Linear, mlp.fc2)
    out.fc1 = nn.Linear(fc1.in_features, wide, bias=fc1.bias is not None)
    out.fc2 = nn.Linear(wide, fc2.out_features, bias=fc2.bias is not None)
    out.fc1.to(fc1.weight)
    out.fc2.to(fc2.weight)
    for layer, src, prefix in ((out.fc1, fc1, "fc1"), (out.fc2, fc2, "fc2")):
        layer.weight.copy_(widen_mlp_param(f"{prefix}.weight", src.weight, wide))
        if src.bias is not None:
            layer.bias.copy_(widen_mlp_param(f"{prefix}.bias", src.bias, wide))
    return out
