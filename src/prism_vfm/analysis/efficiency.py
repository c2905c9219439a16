"""Efficiency: total and active parameters, analytic GFLOPs and latency of a student (the paper's Table 6).

Generic FLOP counters trace one forward and miss or mis-count the MoE (grouped matmuls are invisible to
them; padded dispatch counts the padding), so the count here is analytic, read from the modules the model
actually holds: every ``nn.Linear`` applied to every token, FiLM once per image, each token's ``top_k``
routed experts, the attention products. GFLOPs are multiply-accumulates per image (the convention of
fvcore and of ViT papers: ViT-B/16 at 224² is 17.6), for the backbone without projector or decoder heads,
in inference (no router noise).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from prism_vfm.analysis.common import eval_mode, student_of
from prism_vfm.layers.dual_stream import DualStreamBlock
from prism_vfm.layers.experts import GroupedExperts
from prism_vfm.models.prism_vit import PrismViT

# Parts of a block, by the first matching name prefix, for the breakdown.
_PARTS = (
    ("attn.", "attention"),
    ("anchor.", "anchor"),
    ("mlp.", "dense FFN"),
    ("moe.shared.", "shared expert"),
    ("moe.router.", "router"),
    ("lambda_gate", "router"),
)


def _size(img_size: int | Sequence[int]) -> tuple[int, int]:
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"img_size must be a side or (H, W) of positive ints, got {img_size!r}")
    return size


def analytic_macs(model: nn.Module, img_size: int | Sequence[int]) -> dict[str, int]:
    """Multiply-accumulates per image of the backbone, by part, for an ``img_size`` input.

    Read from the modules present, so any configuration counts right: anchor or shared expert absent,
    any ``num_experts`` / ``top_k`` / expert width, dense blocks, widened MLPs.
    """
    student = student_of(model)
    h, w = _size(img_size)
    p = student.patch_embed.patch_size
    if h % p[0] or w % p[1]:
        raise ValueError(f"img_size {h}x{w} is not a multiple of the patch size {tuple(p)}")
    grid = (h // p[0]) * (w // p[1])
    n = grid + student.num_prefix_tokens
    proj = student.patch_embed.proj
    parts: dict[str, int] = {"patch embedding": grid * proj.weight[0].numel() * proj.out_channels}
    for i, block in enumerate(student.blocks):
        if i > student.tap_layers[-1]:
            break  # blocks past the last tap are not run by the student's forward
        for name, mod in block.named_modules():
            if isinstance(mod, nn.Linear):
                if name.endswith("router.noise"):
                    continue  # noisy gating runs in training only
                per = 1 if name.endswith("router.film") else n  # FiLM: once per image, not per token
                part = next((label for pre, label in _PARTS if name.startswith(pre)), "other")
                parts[part] = parts.get(part, 0) + per * mod.weight.numel()
            elif isinstance(mod, GroupedExperts):
                k = _top_k(block)
                per_token = mod.w1[0].numel() + mod.w2[0].numel() + mod.w2.shape[-1]  # + the slot sum
                parts["routed experts"] = parts.get("routed experts", 0) + n * k * per_token
        qkv = cast(nn.Linear, cast(nn.Module, block.attn).qkv)
        attn_dim = qkv.out_features // 3
        parts["attention"] = parts.get("attention", 0) + 2 * n * n * attn_dim  # q·kᵀ and attn·v
    head = getattr(student, "head", None)
    if isinstance(head, nn.Linear):
        parts["other"] = parts.get("other", 0) + head.weight.numel()
    return parts


def _top_k(block: nn.Module) -> int:
    if isinstance(block, DualStreamBlock):
        return int(block.moe.router.top_k)
    raise TypeError(f"routed experts outside a dual-stream block ({type(block).__name__}) are not supported")


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    img_size: int | Sequence[int],
    batch: int = 1,
    device: str = "cpu",
    warmup: int = 2,
    repeats: int = 5,
) -> float:
    """Median wall time (ms) of one eval forward of the backbone on ``batch`` images (teacher context 0)."""
    student = student_of(model).to(device)
    h, w = _size(img_size)
    if not student.dynamic_img_size and (h, w) != tuple(student.patch_embed.img_size):
        mh, mw = student.patch_embed.img_size
        raise ValueError(
            f"latency at {h}x{w} needs a model built for that size (this one takes {mh}x{mw}); load it "
            "with that img_size or pass latency=False"
        )
    x = torch.randn(batch, 3, h, w, device=device)
    times = []
    with eval_mode(student):
        for i in range(warmup + repeats):
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            tic = time.perf_counter()
            student(x, 0)
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - tic) * 1e3)
    return statistics.median(times)


def efficiency(
    model: nn.Module,
    img_size: int | Sequence[int] | None = None,
    batch: int = 1,
    latency: bool = True,
    device: str = "cpu",
    repeats: int = 5,
) -> dict[str, Any]:
    """Parameters, analytic GFLOPs and (optionally) latency of a student or a multi-task model's backbone.

    Returns ``params_total`` (the whole model), ``params_backbone`` (without projector heads and context
    tables), ``params_active`` (backbone parameters one token runs through: top-k of the routed experts),
    ``gflops`` (multiply-accumulates per image, analytic, see the module notes) with ``gflops_by_part``,
    and ``latency_ms`` (median per batch of ``batch``) with ``images_per_s`` when ``latency``.
    ``img_size`` defaults to the model's own.
    """
    student: PrismViT = student_of(model)
    size = _size(img_size) if img_size is not None else tuple(student.patch_embed.img_size)
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    parts = analytic_macs(student, size)
    out: dict[str, Any] = {
        "img_size": list(size),
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_backbone": student.count_parameters(backbone_only=True),
        "params_active": student.count_parameters(active=True, backbone_only=True),
        "gflops": sum(parts.values()) / 1e9,
        "gflops_by_part": {k: v / 1e9 for k, v in sorted(parts.items())},
        "moe_layers": list(student.moe_layers),
        "num_experts": student.moe_config.num_experts,
        "top_k": student.moe_config.top_k,
    }
    if latency:
        ms = measure_latency(student, size, batch, device, repeats=repeats)
        out.update(latency_ms=ms, batch=batch, images_per_s=batch * 1e3 / ms, device=str(device))
    return out


def efficiency_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table, one row per model name: parameters (M), active (M), GFLOPs, latency (ms)."""
    if not rows:
        raise ValueError("an efficiency table needs at least one model")
    lines = [
        "| model | params (M) | backbone (M) | active (M) | GFLOPs | latency (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lat = f"{r['latency_ms']:.1f}" if r.get("latency_ms") is not None else "–"
        lines.append(
            f"| {name} | {r['params_total'] / 1e6:.1f} | {r['params_backbone'] / 1e6:.1f} | "
            f"{r['params_active'] / 1e6:.1f} | {r['gflops']:.2f} | {lat} |"
        )
    return "\n".join(lines) + "\n"
