"""Analytic GFLOPs equal a traced count on every block configuration; parameters, latency and the table."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from prism_vfm import PrismMultiTask, PrismViT
from prism_vfm.analysis import analytic_macs, efficiency, efficiency_table
from tests.tiny import TINY, tiny_student


def traced_macs(model: PrismViT, batch: int = 2) -> float:
    """Multiply-accumulates per image counted by PyTorch on a real eval forward (loop dispatch, whose
    per-expert matmuls the counter sees; unfused attention so its products are counted too)."""
    model.eval()
    for block in model.blocks:
        block.attn.fused_attn = False
    h, w = model.patch_embed.img_size
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(batch, 3, h, w), 0)
    return counter.get_total_flops() / 2 / batch


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"shared_expert": False},
        {"top_k": 3, "num_experts": 7, "expert_mlp_ratio": 2.0},
        {"top_k": 1, "num_experts": 3, "noisy_gating": False},
        {"moe_layers": (0, 1, 2, 3), "mlp_ratio": 2.0},
        {"moe_layers": (), "tap_layers": (3,)},
        {"img_size": (32, 48), "moe_layers": (2,)},
        {"anchor": False},
        {"anchor": False, "conditioning": "none", "shared_expert": False},
        {"conditioning": "concat"},
        {"moe_layers": (), "tap_layers": (3,), "wide_layers": (1, 3), "wide_hidden": 200},
    ],
    ids=[
        "default",
        "no-shared",
        "top3-e7-narrow",
        "top1-no-noise",
        "all-moe-mlp2",
        "dense",
        "rectangular",
        "no-anchor",
        "vanilla-moe",
        "concat-router",
        "iso-flops-wide-dense",
    ],
)
def test_analytic_gflops_equal_the_traced_count(config):
    model = tiny_student(dispatch="loop", **config)
    assert sum(analytic_macs(model, model.patch_embed.img_size).values()) == traced_macs(model)


def test_dense_vit_b_at_224_is_the_published_17_6_gflops():
    with torch.device("meta"):
        model = PrismViT(img_size=224, moe_layers=(), tap_layers=(11,))
    assert efficiency(model, latency=False)["gflops"] == pytest.approx(17.56, abs=0.01)


def test_parameters_total_backbone_and_active():
    model = tiny_student(num_experts=5, top_k=2)
    out = efficiency(model, latency=False)
    d, h = TINY["embed_dim"], 4 * TINY["embed_dim"]
    per_expert = d * h + h + h * d + d
    assert out["params_total"] == sum(p.numel() for p in model.parameters())
    assert out["params_backbone"] == model.count_parameters(backbone_only=True) < out["params_total"]
    assert out["params_active"] == out["params_backbone"] - 2 * (5 - 2) * per_expert  # two MoE layers
    by_part = out["gflops_by_part"]
    assert by_part["routed experts"] == pytest.approx(2 * 17 * 2 * (2 * d * h + d) / 1e9)
    assert set(by_part) >= {"attention", "anchor", "shared expert", "router", "dense FFN", "patch embedding"}


def test_gflops_at_another_size_and_of_a_multitask_backbone():
    model = tiny_student()
    small = efficiency(model, img_size=32, latency=False)["gflops"]
    large = efficiency(model, img_size=(64, 64), latency=False)["gflops"]
    assert large > 4 * small  # 4x the tokens, and attention grows faster
    mt = PrismMultiTask({**TINY}, {"semseg": 3, "depth": 1})
    out = efficiency(mt, latency=False)
    assert out["gflops"] == pytest.approx(small)
    assert out["params_total"] > out["params_backbone"]  # decoder heads counted in the total only


def test_latency_is_measured_at_the_model_size_only():
    model = tiny_student()
    out = efficiency(model, batch=2, repeats=2)
    assert out["latency_ms"] > 0 and out["images_per_s"] == pytest.approx(2e3 / out["latency_ms"])
    with pytest.raises(ValueError, match="latency at 64x64 needs a model built for that size"):
        efficiency(model, img_size=64)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        efficiency(model, img_size=36, latency=False)


def test_markdown_table_has_one_row_per_model():
    rows = {
        "PRISM-B": {
            "params_total": 411_756_412,
            "params_backbone": 395_216_764,
            "params_active": 168_540_028,
            "gflops": 36.123,
            "latency_ms": 12.34,
        },
        "ViT-B": {
            "params_total": 85_798_656,
            "params_backbone": 85_798_656,
            "params_active": 85_798_656,
            "gflops": 17.56,
        },
    }
    table = efficiency_table(rows).splitlines()
    assert table[0].startswith("| model | params (M)")
    assert table[2] == "| PRISM-B | 411.8 | 395.2 | 168.5 | 36.12 | 12.3 |"
    assert table[3] == "| ViT-B | 85.8 | 85.8 | 85.8 | 17.56 | – |"
