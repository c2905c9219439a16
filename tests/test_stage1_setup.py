"""Stage-1 set-up: presets of SPEC §6, learning-rate groups and schedule, student initialisation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prism_vfm import export_official
from prism_vfm.distill.config import StudentConfig, preset
from prism_vfm.distill.student import build_student
from prism_vfm.distill.trainer import param_groups
from prism_vfm.models.load import LoadError
from prism_vfm.train.schedule import poly, warmup_cosine
from tests.tiny import TINY, tiny_dense_vit, tiny_student


@pytest.mark.parametrize(
    "name, model, teachers, batch, decorrelation",
    [
        ("BB", "prism_vit_base_patch16_384", ("dinov2_b", "clip_b", "sam_b"), 20, "official"),
        ("BS", "prism_vit_small_patch16_384", ("dinov2_b", "clip_b", "sam_b"), 64, "none"),
        ("LB", "prism_vit_base_patch16_384", ("dinov2_l", "clip_l", "sam_l"), 20, "official"),
        ("LL", "prism_vit_large_patch16_384", ("dinov2_l", "clip_l", "sam_l"), 64, "official"),
    ],
)
def test_presets_match_the_published_recipe(name, model, teachers, batch, decorrelation):
    cfg = preset(name)
    assert (cfg.student.model, cfg.teachers.names, cfg.batch_size, cfg.loss.decorrelation) == (
        model,
        teachers,
        batch,
        decorrelation,
    )
    assert cfg.student.img_size == 384 and cfg.epochs == 30 and cfg.seed == 42
    o = cfg.optim
    assert (
        o.lr,
        o.max_lr,
        o.pretrained_lr_scale,
        o.weight_decay,
        o.warmup_epochs,
        o.warmup_start_lr,
        o.min_lr,
        o.clip_grad,
    ) == (1e-3, 1e-3, 0.01, 0.01, 2.0, 1e-7, 1e-6, 1.0)
    assert cfg.teachers.assignment == "balanced" and cfg.loss.lb_weight == 0.1


def _biases_and_norms(model: nn.Module) -> set[str]:
    """Every bias (the experts' stacked b1, b2 included) and every normalisation-layer parameter."""
    names = set()
    for name, _ in model.named_parameters():
        owner = model.get_submodule(name.rpartition(".")[0])
        if name.endswith((".bias", ".b1", ".b2")) or isinstance(owner, (nn.LayerNorm, nn.BatchNorm2d)):
            names.add(name)
    return names


def test_param_groups_give_pretrained_modules_a_hundredth_and_decay_to_weights_only():
    model = tiny_student()
    groups = {g["name"]: g for g in param_groups(model, 1e-3, 0.01, 0.01)}
    assert groups["new"]["lr"] == 1e-3 and groups["pretrained"]["lr"] == pytest.approx(1e-5)
    assert groups["new_no_decay"]["weight_decay"] == 0 and groups["pretrained"]["weight_decay"] == 0.01
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for g in groups.values() if g["weight_decay"] == 0 for p in g["params"]}
    decayed = {names[id(p)] for g in groups.values() if g["weight_decay"] > 0 for p in g["params"]}
    assert undecayed == _biases_and_norms(model)
    assert {"blocks.1.moe.experts.b1", "blocks.1.moe.experts.b2", "blocks.0.norm1.weight"} <= undecayed
    assert {"blocks.1.moe.experts.w1", "blocks.0.attn.qkv.weight", "projectors.0.0.0.weight"} <= decayed
    assert len(decayed) + len(undecayed) == len(names)
    anchor = model.blocks[1].anchor.fc1.weight
    assert any(p is anchor for p in groups["pretrained"]["params"])


def test_router_lr_scale_moves_only_the_routers_and_context_tables_to_a_faster_group():
    from prism_vfm import PrismMultiTask
    from prism_vfm.train.optim import scale_lr, weight_decay_groups

    model = PrismMultiTask(dict(TINY), {"semseg": 21, "normals": 3})
    names = {id(p): n for n, p in model.named_parameters()}
    routing = {names[id(p)] for p in model.student.routing_parameters()}
    assert {"student.task_embed.weight", "student.blocks.1.moe.router.film.weight"} <= routing
    assert {"student.teacher_embed.weight", "student.blocks.3.moe.router.gate.bias"} <= routing
    assert not any(".experts." in n or "lambda_gate" in n or "projectors" in n for n in routing)
    for groups in (
        weight_decay_groups(model, 1e-6),  # Stage 2: the groups take the optimiser's rate, 1e-3 here
        param_groups(model.student, 1e-3, 0.01, 1e-6),  # Stage 1: each group has its own rate
    ):
        before = {g["name"]: g for g in groups}
        after = {g["name"]: g for g in scale_lr(groups, model.student.routing_parameters(), 10.0, 1e-3)}
        moved = {names[id(p)] for n, g in after.items() if n.endswith("_scaled") for p in g["params"]}
        assert moved == routing
        for name, group in after.items():
            if name.endswith("_scaled"):
                source = before[name.removesuffix("_scaled")]
                assert group["lr"] == pytest.approx(10 * source.get("lr", 1e-3))
                assert group["weight_decay"] == source["weight_decay"]
        assert sum(len(g["params"]) for g in after.values()) == sum(len(g["params"]) for g in groups)


def test_stage2_weight_decay_spares_every_bias_and_norm_parameter():
    from prism_vfm import PrismMultiTask
    from prism_vfm.train.optim import weight_decay_groups

    model = PrismMultiTask(dict(TINY), {"semseg": 21, "normals": 3})
    groups = {g["name"]: g for g in weight_decay_groups(model, 1e-6)}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in groups["no_decay"]["params"]} == _biases_and_norms(model)
    assert groups["no_decay"]["weight_decay"] == 0 and groups["decay"]["weight_decay"] == 1e-6
    decayed = {names[id(p)] for p in groups["decay"]["params"]}
    assert "heads.semseg.linear_fuse.0.weight" in decayed and "student.blocks.1.moe.experts.w2" in decayed


def test_schedules():
    assert warmup_cosine(0, 100, 10, 1e-3, 1e-7, 1e-6) == pytest.approx(1e-7)
    assert warmup_cosine(10, 100, 10, 1e-3, 1e-7, 1e-6) == pytest.approx(1e-3)
    assert warmup_cosine(55, 100, 10, 1e-3, 1e-7, 1e-6) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))
    assert warmup_cosine(100, 100, 10, 1e-3, 1e-7, 1e-6) == pytest.approx(1e-6)
    assert poly(50, 100, 2e-5) == pytest.approx(2e-5 * 0.5**0.9) and poly(150, 100, 2e-5) == 0.0
    assert not math.isnan(warmup_cosine(5, 5, 0, 1.0, 0.0, 0.0))


def _cfg(init: str) -> StudentConfig:
    arch = {k: v for k, v in TINY.items() if k not in ("img_size", "teacher_dims")}
    return StudentConfig(model="prism_vit_tiny_patch16_384", img_size=32, init=init, overrides=arch)


def test_student_initialises_from_our_folder_an_official_file_and_a_timm_vit(tmp_path):
    source = tiny_student(teacher_dims=(16, 24, 16)).eval()
    x = torch.randn(1, 3, 32, 32)
    source.save_pretrained(tmp_path / "ours")
    export_official(source, tmp_path / "official.pth")
    for init in (tmp_path / "ours", tmp_path / "official.pth"):
        model = build_student(_cfg(str(init)), teacher_dims=(16, 24, 16)).eval()
        torch.testing.assert_close(model(x, 1).taps, source(x, 1).taps, rtol=0, atol=0)
    # Other teachers: an error naming the projector heads and the teacher table of another shape, unless
    # they are allowed to start fresh.
    shapes = r"ours \(folder\) does not fill.*teacher_embed\.weight \(3, 32\) \(model: \(2, 32\)\)"
    with pytest.raises(LoadError, match=shapes):
        build_student(_cfg(str(tmp_path / "ours")), teacher_dims=(8, 8))
    cfg = _cfg(str(tmp_path / "ours"))
    cfg.init_fresh = ("projectors.*",)
    with pytest.raises(LoadError, match="teacher_embed"):
        build_student(cfg, teacher_dims=(8, 8))
    cfg.init_fresh = ("projectors.*", "teacher_embed.*")
    other = build_student(cfg, teacher_dims=(8, 8)).eval()
    torch.testing.assert_close(other.pos_embed, source.pos_embed)
    torch.testing.assert_close(other.blocks[1].moe.experts.w1, source.blocks[1].moe.experts.w1)
    dense = tiny_dense_vit()
    torch.save(dense.state_dict(), tmp_path / "vit.pth")
    model = build_student(_cfg(str(tmp_path / "vit.pth")), teacher_dims=(16,))
    torch.testing.assert_close(model.blocks[3].anchor.fc1.weight, dense.blocks[3].mlp.fc1.weight)
    torch.save({"something": torch.zeros(1)}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="junk.pth is not a ViT"):
        build_student(_cfg(str(tmp_path / "junk.pth")), teacher_dims=(16,))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_student(_cfg(str(tmp_path / "missing.pth")), teacher_dims=(16,))
