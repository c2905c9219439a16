"""Which parameters take weight decay, decided by their role rather than their shape.

The recipe decays weights only: no bias and no normalisation parameter. Shape cannot tell them apart — the
routed experts' biases are stacked into 2-D tensors — so a parameter is a bias when it is named ``bias`` or
its module lists it in ``bias_parameters`` (e.g. the experts' ``b1``, ``b2``), and a normalisation
parameter when its module is a normalisation layer. Any other 1-D parameter is left undecayed too (SPEC §6).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

NORM_LAYERS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, _BatchNorm, _InstanceNorm)


def undecayed_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the biases, normalisation and other 1-D parameters."""
    names = set()
    for prefix, module in model.named_modules():
        declared = set(getattr(module, "bias_parameters", ()))
        for local, p in module.named_parameters(recurse=False):
            if isinstance(module, NORM_LAYERS) or local == "bias" or local in declared or p.ndim <= 1:
                names.add(f"{prefix}.{local}" if prefix else local)
    return names


def decay_split(
    model: nn.Module, params: Iterable[nn.Parameter] | None = None
) -> dict[bool, list[nn.Parameter]]:
    """``{True: decayed, False: undecayed}``: the trainable parameters of ``model`` (or ``params``)."""
    undecayed = undecayed_names(model)
    skip = {id(p) for name, p in model.named_parameters() if name in undecayed}
    chosen = list(model.parameters()) if params is None else list(params)
    out: dict[bool, list[nn.Parameter]] = {True: [], False: []}
    for p in chosen:
        if p.requires_grad:
            out[id(p) not in skip].append(p)
    return out


def weight_decay_groups(model: nn.Module, weight_decay: float, **extra: Any) -> list[dict[str, Any]]:
    """Two optimiser groups of ``model``'s trainable parameters: ``decay`` and ``no_decay``."""
    split = decay_split(model)
    return [
        {"params": split[decay], "weight_decay": weight_decay if decay else 0.0, "name": name, **extra}
        for decay, name in ((True, "decay"), (False, "no_decay"))
        if split[decay]
    ]


def scale_lr(
    groups: list[dict[str, Any]], params: Iterable[nn.Parameter], scale: float, lr: float
) -> list[dict]:
    """``groups`` with ``params`` moved to groups of their own (named ``<name>_scaled``) whose learning rate
    is ``lr·scale`` (``lr``: the rate of groups that name none)."""
    chosen = {id(p) for p in params}
    out = []
    for group in groups:
        kept = [p for p in group["params"] if id(p) not in chosen]
        moved = [p for p in group["params"] if id(p) in chosen]
        if kept:
            out.append({**group, "params": kept})
        if moved:
            rate = group.get("lr", lr) * scale
            out.append({**group, "params": moved, "lr": rate, "name": f"{group.get('name', 'group')}_scaled"})
    return out
