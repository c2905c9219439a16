"""Ablations and baselines (SPEC §14): every variant builds, trains, checkpoints and reloads, and has exactly
the parameters and active compute its definition implies; the iso-FLOPs wide student starts as the same
function as the dense one; the sweep writes one comparison table and never retrains a finished variant."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode

from prism_vfm import PrismViT, export_official
from prism_vfm.ablation import apply_ablation, run_sweep
from prism_vfm.ablation import sweep as sweep_module
from prism_vfm.analysis.efficiency import efficiency
from prism_vfm.cli import main
from prism_vfm.config import ConfigError, apply_overrides
from prism_vfm.data.synthetic import write_tiny_image_folder
from prism_vfm.data.tiny_dense import write_tiny_pascal
from prism_vfm.distill.config import preset
from prism_vfm.distill.student import build_student
from prism_vfm.distill.trainer import train_stage1
from prism_vfm.finetune.config import preset as stage2_preset
from prism_vfm.layers.net2net import net2net_widen
from prism_vfm.train.checkpoint import latest_checkpoint
from prism_vfm.train.logging import read_scalars
from tests.tiny import tiny_student

# The tiny Stage-1 preset: width 48, 4 blocks, 3 heads, patch 8 at 32 px (16 patches + CLS), dual-stream
# blocks and taps (1, 3), MLP ratio 4, 6 experts, top-2; teachers tiny_a/b/c of widths 32, 24, 16.
D, DEPTH, H, N, GRID, E, K = 48, 4, 192, 17, 16, 6, 2
TEACHERS = (32, 24, 16)
# wide_dense: hidden = active FFN FLOPs per token of a dual-stream block / (4D)
#   = (4DH + 2D [anchor, λ] + 2D² [fusion gate] + 2DE [logits] + K(4DH + 2D) [experts] + 4DH [shared]) / 4D
#   = 152928 / 192 = 796.5, rounded half to even.
WIDE = 796

PRISM = dict(moe=(1, 3), anchor=True, cond="film", shared=True, experts=E, k=K, expert_hidden=H)
DENSE = dict(PRISM, moe=())
# Each variant's definition, written out by hand.
SPECS: dict[str, dict] = {
    "prism": PRISM,
    "dense": DENSE,
    "wide_dense": dict(DENSE, wide=(1, 3)),
    "wo_anchor": dict(PRISM, anchor=False),
    "wo_film": dict(PRISM, cond="concat"),
    "wo_shared": dict(PRISM, shared=False),
    "vanilla_moe": dict(PRISM, anchor=False, cond="none", shared=False),
    "wo_decorrelation": PRISM,
    "decorr_taps0": PRISM,
    "top1": dict(PRISM, k=1),
    "top4": dict(PRISM, k=4),
    "experts3": dict(PRISM, experts=3),
    "experts8": dict(PRISM, experts=8),
    "lite": dict(PRISM, expert_hidden=H // 2),
    "dinov2_sam": dict(PRISM, teachers=(32, 16)),
    "wo_anchor+top1": dict(PRISM, anchor=False, k=1),
}


def mlp_params(d: int, h: int) -> int:
    return d * h + h + h * d + d


def expected_parameters(spec: dict) -> tuple[int, int]:
    """(total, active) parameters of the tiny student of a variant."""
    teachers = spec.get("teachers", TEACHERS)
    e, he = spec["experts"], spec["expert_hidden"]
    total = 3 * 64 * D + D + D + N * D + 2 * D  # patch embedding, CLS, position embedding, final norm
    total += DEPTH * (2 * D + D * 3 * D + 3 * D + D * D + D + 2 * D)  # norms and attention
    inactive = 0
    for i in range(DEPTH):
        if i in spec["moe"]:
            total += (mlp_params(D, H) + D + 1) if spec["anchor"] else 0  # anchor and λ gate
            router_in = 2 * D if spec["cond"] == "concat" else D
            total += 2 * (router_in * e + e)  # logits and noise
            total += (2 * D * D + 2 * D + D * D + D) if spec["cond"] == "film" else 0  # FiLM, fusion gate
            total += e * mlp_params(D, he) + (mlp_params(D, he) if spec["shared"] else 0)
            inactive += (e - spec["k"]) * mlp_params(D, he)
        else:
            total += mlp_params(D, WIDE if i in spec.get("wide", ()) else H)
    total += len(teachers) * D  # teacher table
    total += sum(2 * (D * D + D + D * c + c) for c in teachers)  # projector heads, 2 taps each
    return total, total - inactive


def expected_flops(spec: dict) -> int:
    """Matmul FLOPs (2 per multiply-add) of one image's inference forward; biases not counted."""
    e, he, k = spec["experts"], spec["expert_hidden"], spec["k"]
    flops = 2 * (3 * 64) * D * GRID  # patch embedding
    for i in range(DEPTH):
        flops += 2 * N * D * 3 * D + 2 * N * D * D + 2 * 2 * N * N * D  # qkv, proj, q·kᵀ and attn·v
        if i in spec["moe"]:
            flops += (4 * N * D * H + 2 * N * D) if spec["anchor"] else 0
            if spec["cond"] == "film":
                flops += 2 * D * 2 * D + 2 * N * D * D  # FiLM once per image, fusion gate per token
            flops += 2 * N * (2 * D if spec["cond"] == "concat" else D) * e  # logits
            flops += k * N * 4 * D * he + 2 * N * k * D  # k experts per token, weighted sum of k slots
            flops += 4 * N * D * he if spec["shared"] else 0
        else:
            flops += 4 * N * D * (WIDE if i in spec.get("wide", ()) else H)
    return flops


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_tiny_image_folder(root, n_classes=2, per_class=6, size=(40, 48), seed=0)
    return root


def tiny_stage1(name: str, images, out, *overrides):
    base = apply_overrides(preset("tiny"), [("data", str(images)), ("out", str(out)), *overrides])
    return apply_ablation(base, name)


def measured_flops(model: PrismViT, batch: int = 2) -> int:
    for block in model.blocks:
        block.attn.fused_attn = False  # the counter sees the attention products only as plain matmuls
    x = torch.randn(batch, 3, 32, 32)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x, torch.arange(batch) % model.num_teachers)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_variant_has_the_size_and_compute_its_definition_implies(name, images, tmp_path):
    spec = SPECS[name]
    cfg = tiny_stage1(name, images, tmp_path)
    model = build_student(cfg.student, spec.get("teachers", TEACHERS))
    total, active = expected_parameters(spec)
    assert model.count_parameters() == total
    assert model.count_parameters(active=True) == active
    assert measured_flops(model) == 2 * expected_flops(spec)
    assert model.moe_layers == spec["moe"] and model.tap_layers == (1, 3)
    for block in model.dual_stream_blocks:
        assert (block.anchor is not None) == (block.lambda_gate is not None) == spec["anchor"]
        assert block.moe.router.conditioning == spec["cond"]
        assert (block.moe.shared is not None) == spec["shared"]
        assert block.moe.experts.w1.shape == (spec["experts"], D, spec["expert_hidden"])
    cost = efficiency(model, 32, latency=False)
    assert cost["params_active"] == model.count_parameters(active=True, backbone_only=True)
    assert cost["gflops"] * 1e9 == pytest.approx(expected_flops(spec) / 2, rel=1e-9)  # multiply-adds


@pytest.mark.parametrize("name", sorted(SPECS))
def test_variant_trains_a_step_and_its_checkpoint_reloads(name, images, tmp_path):
    spec = SPECS[name]
    run = train_stage1(tiny_stage1(name, images, tmp_path / "run", ("max_steps", 1)))
    (record,) = read_scalars(run)
    assert math.isfinite(record["loss/total"]) and record["grad_norm"] > 0
    assert ("loss/decorrelation_loss" in record) == (name != "wo_decorrelation")
    teachers = len(spec.get("teachers", TEACHERS))
    assert {k.split("_")[0] for k in record if k.startswith("loss/") and "_level" in k} == {
        f"loss/{t}" for t in range(teachers)
    }
    ckpt = latest_checkpoint(run)
    model = PrismViT.from_pretrained(ckpt)
    assert model.count_parameters() == expected_parameters(spec)[0]
    saved = load_file(ckpt / "model.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    if not model.uses_context:  # nothing reads the context tables: they stay frozen and unchanged
        assert not model.teacher_embed.weight.requires_grad


def test_net2net_widening_computes_the_same_function():
    torch.manual_seed(0)
    narrow = tiny_student().blocks[0].mlp
    x = torch.randn(5, 7, 32)
    for wide in (128, 256, 300):  # same width, an integer multiple, and an uneven tiling
        widened = net2net_widen(narrow, wide)
        assert widened.fc1.out_features == wide
        torch.testing.assert_close(widened(x), narrow(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="at least the 128 original units"):
        net2net_widen(narrow, 100)


def test_wide_dense_student_starts_as_the_pretrained_dense_function(images, tmp_path):
    dense = build_student(tiny_stage1("dense", images, tmp_path).student, TEACHERS).eval()
    with torch.no_grad():
        for block in dense.blocks:  # distinct MLP units, so a wrong tiling cannot go unnoticed
            block.mlp.fc2.weight.normal_(0, 0.3)
    save_file(dense.state_dict(), tmp_path / "dense.safetensors")  # a plain ViT state dict
    cfg = tiny_stage1("wide_dense", images, tmp_path, ("student.init", str(tmp_path / "dense.safetensors")))
    wide = build_student(cfg.student, TEACHERS).eval()
    assert wide.blocks[1].mlp.fc1.out_features == WIDE and wide.blocks[0].mlp.fc1.out_features == H
    x = torch.randn(2, 3, 32, 32)
    for a, b in zip(wide(x, 0).taps, dense(x, 0).taps, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_dense_variants_start_from_a_prism_checkpoints_anchors(images, tmp_path):
    prism = build_student(tiny_stage1("prism", images, tmp_path).student, TEACHERS)
    prism.save_pretrained(tmp_path / "prism")
    over = ("student.init", str(tmp_path / "prism"))
    dense = build_student(tiny_stage1("dense", images, tmp_path, over).student, TEACHERS)
    wide = build_student(tiny_stage1("wide_dense", images, tmp_path, over).student, TEACHERS)
    u = torch.randn(3, N, D)
    for i in (1, 3):
        torch.testing.assert_close(dense.blocks[i].mlp.fc1.weight, prism.blocks[i].anchor.fc1.weight)
        torch.testing.assert_close(wide.blocks[i].mlp(u), prism.blocks[i].anchor(u), rtol=0, atol=1e-5)


def test_switches_change_what_the_router_reads():
    x = torch.randn(2, 3, 32, 32)
    for conditioning, depends in (("film", True), ("concat", True), ("none", False)):
        model = tiny_student(conditioning=conditioning).eval()
        with torch.no_grad():
            if model.blocks[1].moe.router.film is not None:
                model.blocks[1].moe.router.film.weight.normal_(0, 1.0)
            a = model.trace(x, 0)["router_logits"][0]
            b = model.trace(x, 1)["router_logits"][0]
        assert (not torch.allclose(a, b)) == depends, conditioning
    no_anchor = tiny_student(anchor=False).eval()
    assert not any(".anchor." in k or "lambda_gate" in k for k in no_anchor.state_dict())
    assert all(float(lam.abs().max()) == 0 for lam in no_anchor.trace(x, 0)["lambda"])


def test_impossible_switches_are_errors_naming_the_key(images, tmp_path):
    with pytest.raises(ValueError, match="needs tap_layers"):
        tiny_student(moe_layers=())
    with pytest.raises(ValueError, match=r"wide_layers and moe_layers both name blocks \[1\]"):
        tiny_student(wide_layers=(1,), wide_hidden=256)
    with pytest.raises(ValueError, match="wide_hidden=64 must be at least"):
        tiny_student(moe_layers=(3,), wide_layers=(1,), wide_hidden=64)
    with pytest.raises(ValueError, match="conditioning must be one of"):
        tiny_student(conditioning="sum")
    bad = {
        "top7": r"student.overrides.top_k=7 must be in \[1, num_experts=6\]",
        "decorr_taps012": r"loss.decorrelation_taps=\[0, 1, 2\] names a tap the student lacks",
        "teachers05": r"teachers.names=.* lacks distinct teachers at positions \[0, 5\]",
        "dense+wide_dense": "no dual-stream blocks",
        "wo_anchorr": "unknown ablation 'wo_anchorr'",
    }
    for name, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            tiny_stage1(name, images, tmp_path)
    assert main_exit_code(["distill", "--preset", "tiny", "--data", str(images), "--ablation", "top9"]) == 2


def test_official_export_refuses_what_its_layout_cannot_hold():
    export_official(tiny_student(shared_expert=False, top_k=1))  # expressible: no error
    for switches, named in (
        (dict(anchor=False), "anchor=False"),
        (dict(conditioning="concat"), "conditioning='concat'"),
        (dict(moe_layers=(), tap_layers=(1, 3)), "moe_layers=()"),
    ):
        with pytest.raises(ValueError, match=re.escape(named)):
            export_official(tiny_student(**switches))


def main_exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code


BASELINES = {"semseg": 50.0, "human_parts": 50.0, "normals": 30.0, "edge": 50.0, "sal": 50.0}


def test_stage2_variant_changes_only_its_loss_and_teachers():
    base = stage2_preset("tiny")
    cfg = apply_ablation(base, "wo_decorrelation+dinov2_sam")
    assert cfg.distill.decorrelation == "none" and cfg.distill.teachers == ("tiny_a", "tiny_c")
    assert apply_ablation(base, "decorr_taps0").distill.decorrelation_taps == (0,)
    assert apply_ablation(base, "wo_anchor") == base


def test_sweep_writes_one_table_and_never_retrains_a_finished_variant(images, tmp_path, monkeypatch, capsys):
    write_tiny_pascal(tmp_path / "PASCALContext", n_train=4, n_val=2, size=(40, 48), seed=0)
    stage1 = apply_overrides(preset("tiny"), [("data", str(images)), ("max_steps", 2)])
    stage2 = apply_overrides(
        stage2_preset("tiny"), [("data", str(tmp_path / "PASCALContext")), ("max_steps", 2), ("val_every", 2)]
    )
    out = tmp_path / "sweep"
    rows = run_sweep(["dense", "vanilla_moe"], stage1, out, stage2, eval_workers=1, baselines=BASELINES)
    table = json.loads((out / "comparison.json").read_text())
    assert [r["variant"] for r in table["rows"]] == ["dense", "vanilla_moe"] and table["rows"] == rows
    assert table["settings"]["stage1"]["max_steps"] == 2
    tasks = {"semseg", "human_parts", "normals", "edge", "sal"}
    for row, name in zip(rows, ("dense", "vanilla_moe"), strict=True):
        assert set(row["scores"]) == tasks and math.isfinite(row["delta_m"])
        model = PrismViT.from_pretrained(row["stage1"])
        assert row["params"] == model.count_parameters(backbone_only=True)
        assert row["active_params"] == model.count_parameters(active=True, backbone_only=True)
        assert (out / name / "stage2" / "finished").is_file()
    assert rows[0]["params"] == rows[0]["active_params"] < rows[1]["active_params"] < rows[1]["params"]
    markdown = (out / "comparison.md").read_text()
    assert "| dense |" in markdown and "Δm" in markdown and "semseg (mIoU)" in markdown

    def no_training(*args, **kwargs):
        raise AssertionError("a finished variant was trained again")

    monkeypatch.setattr(sweep_module, "_train", no_training)
    again = run_sweep(["dense", "vanilla_moe"], stage1, out, stage2, eval_workers=1, baselines=BASELINES)
    assert again == rows
    with pytest.raises(ConfigError, match="unknown ablation 'nope'"):  # checked before anything trains
        run_sweep(["dense", "nope"], stage1, out, stage2, baselines=BASELINES)
    main(["sweep", "--list"])
    listed = capsys.readouterr().out
    assert "wo_film" in listed and "vanilla_moe" in listed and "teachers<positions>" in listed
