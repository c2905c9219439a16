"""A few Stage-1 steps of a tiny student against three tiny frozen teachers, on random images.

It checks an installation end to end on a CPU in seconds: routing by teacher context, the distillation
and decorrelation losses, load balancing, backward, and ``save_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from prism_vfm.distill.assignment import balanced_teacher_split
from prism_vfm.losses.decorrelation import DecorrelationLoss
from prism_vfm.losses.distill import DistillLoss
from prism_vfm.models.prism_vit import PrismViT


def _tiny_teacher(seed: int, width: int) -> nn.ModuleList:
    """A frozen random convnet with two taps on an 8x8 grid (stride 4), like a ViT at a finer patch."""
    g = torch.Generator().manual_seed(seed)
    net = nn.ModuleList([nn.Conv2d(3, width, 4, stride=4), nn.Conv2d(width, width, 3, padding=1)])
    for p in net.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    return net.eval().requires_grad_(False)


def _teacher_taps(net: nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
    first = torch.tanh(net[0](x))
    return [first, torch.tanh(net[1](first))]


def run_smoke(steps: int = 30, out_dir: Path | None = None, seed: int = 0, batch: int = 6) -> dict[str, Any]:
    """Train for ``steps`` and return a summary (first/last loss, λ and expert use per teacher)."""
    torch.manual_seed(seed)
    widths = (16, 24, 16)
    model = PrismViT(
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=4,
        num_heads=3,
        moe_layers=(1, 3),
        teacher_dims=widths,
        num_experts=6,
        top_k=2,
    ).train()
    teachers = [_tiny_teacher(seed + 1 + t, w) for t, w in enumerate(widths)]
    criterion = DistillLoss("cos+l1+decorrelation", decorrelation=DecorrelationLoss())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    images = torch.randn(4 * batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    losses = []
    for step in (bar := tqdm(range(steps), desc="smoke", unit="step")):
        x = images[(step % 4) * batch : (step % 4 + 1) * batch]
        ctx = balanced_teacher_split(batch, len(teachers))
        out = model(x, ctx)
        taps, aux = out.taps, out.aux_loss
        student = model.project_by_teacher(taps, ctx, model.grid_size(x))
        with torch.no_grad():
            target = {t: _teacher_taps(teachers[t], x[ctx == t]) for t in student}
        terms = criterion(student, target)
        loss = terms["total"] + 0.1 * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", aux=f"{float(aux.detach()):.4f}")
    model.eval()
    with torch.no_grad():
        out = model(images[:batch], balanced_teacher_split(batch, len(teachers)), return_routing=True)
    stats = model.routing_stats(out)
    summary = {
        "steps": steps,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "lambda_mean_per_layer_and_teacher": [v.tolist() for v in stats["lambda_mean"]],
        "expert_share_per_layer_and_teacher": [
            (c / c.sum(1, keepdim=True).clamp_min(1)).round(decimals=3).tolist()
            for c in stats["expert_counts"]
        ],
    }
    if out_dir is not None:
        model.save_pretrained(out_dir)
        summary["saved_to"] = str(out_dir)
    return summary
