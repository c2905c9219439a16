"""The PRISM student: construction, presets, forward semantics, saving and loading, bad input."""

from __future__ import annotations

import json
import logging

import pytest
import timm
import torch

from prism_vfm import STUDENT_PRESETS, PrismOutput, PrismViT, create_student, export_official, load_official
from prism_vfm.compat.official import OfficialCheckpointError, ours_to_official
from prism_vfm.utils.io import CheckpointReadError
from tests.tiny import tiny_dense_vit, tiny_student


def _ids(*ids):
    return torch.tensor(ids, dtype=torch.long)


def test_registered_with_timm_at_any_image_size():
    assert {
        "prism_vit_tiny_patch16_384",
        "prism_vit_small_patch16_384",
        "prism_vit_base_patch16_384",
        "prism_vit_large_patch16_384",
    } <= set(timm.list_models("prism_vit_*"))
    with torch.device("meta"):
        base = timm.create_model("prism_vit_base_patch16_384", pretrained=False, img_size=224)
        large = timm.create_model("prism_vit_large_patch16_384", pretrained=False)
        wide = timm.create_model("prism_vit_small_patch16_384", pretrained=False, img_size=(448, 576))
    assert isinstance(base, PrismViT) and base.pos_embed.shape == (1, 197, 768)
    assert base.moe_layers == base.tap_layers == (2, 5, 8, 11)
    assert large.moe_layers == (5, 11, 17, 23) and large.pos_embed.shape == (1, 577, 1024)
    assert wide.patch_embed.grid_size == (28, 36)


@pytest.mark.parametrize("preset", sorted(STUDENT_PRESETS))
def test_presets_follow_spec_table(preset):
    with torch.device("meta"):
        model = create_student(preset, img_size=224)
    width = {"BB": 768, "BS": 384, "LB": 768, "LL": 1024}[preset]
    teacher = {"BB": 768, "BS": 768, "LB": 1024, "LL": 1024}[preset]
    assert model.embed_dim == width
    assert model.teacher_dims == (teacher,) * 3
    assert [head[2].out_features for head in model.projectors[0]] == [teacher] * 4


def test_forward_returns_normed_taps_and_aux_in_training():
    model = tiny_student().train()
    x = torch.randn(3, 3, 32, 32)
    out = model(x, _ids(0, 1, 2))
    assert isinstance(out, PrismOutput) and out.routing is None  # routing only when asked
    taps, aux = out.taps, out.aux_loss
    assert len(taps) == 2 and all(t.shape == (3, 17, 32) for t in taps)
    # Every tap has passed through the final LayerNorm (unit weight at init): zero mean per token.
    assert taps[0].mean(-1).abs().max() < 1e-5
    assert aux.ndim == 0 and aux > 0


def test_non_square_inputs_and_dynamic_size():
    model = tiny_student(img_size=(32, 48)).eval()
    taps = model(torch.randn(2, 3, 32, 48), 0).taps
    assert taps[0].shape == (2, 1 + 4 * 6, 32)
    dyn = tiny_student(dynamic_img_size=True).eval()
    assert dyn(torch.randn(1, 3, 48, 64), 1).taps[0].shape == (1, 1 + 6 * 8, 32)


def test_initialisation_options_scale_the_context_tables_and_are_saved_with_the_model(tmp_path):
    torch.manual_seed(0)
    released = tiny_student(num_tasks=2)
    assert released.teacher_embed.weight.detach().std().item() == pytest.approx(0.02, rel=0.3)
    wide = tiny_student(num_tasks=2, context_init_std=0.5, expert_init="random")
    for table in (wide.teacher_embed, wide.task_embed):
        assert table.weight.detach().std().item() == pytest.approx(0.5, rel=0.3)
    wide.save_pretrained(tmp_path)
    # Stage 2 builds its fresh task table from the saved arguments.
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["context_init_std"] == 0.5 and saved["expert_init"] == "random"


def test_context_changes_routing_only_through_the_router():
    model = tiny_student().eval()
    with torch.no_grad():  # FiLM starts at zero; give it weight so contexts differ
        for block in model.dual_stream_blocks:
            block.moe.router.film.weight.normal_(0, 1.0)
    x = torch.randn(1, 3, 32, 32).repeat(3, 1, 1, 1)
    out = model.trace(x, _ids(0, 1, 2))
    logits = out["router_logits"][0]
    assert not torch.allclose(logits[0], logits[1])
    # λ does not depend on the context.
    torch.testing.assert_close(out["lambda"][0][0], out["lambda"][0][1])


def test_eval_is_deterministic_and_training_adds_dropout_and_noise():
    model = tiny_student()
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    a, b = model.trace(x, _ids(0, 1)), model.trace(x, _ids(0, 1))
    torch.testing.assert_close(a["taps"][-1], b["taps"][-1], rtol=0, atol=0)
    assert not torch.isinf(a["router_logits"][0]).any()
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        logits = model(x, _ids(0, 1), return_routing=True).routing[1].logits
    dropped = torch.isneginf(logits).float().mean()
    assert 0.03 < dropped < 0.2  # p = 0.1 expert dropout


def test_all_experts_dropped_falls_back_to_anchor_and_shared():
    model = tiny_student(expert_dropout=1.0).train()
    out = model(torch.randn(2, 3, 32, 32), _ids(0, 1), return_routing=True)
    assert torch.isfinite(out.taps[-1]).all() and torch.isfinite(out.aux_loss)
    assert (out.routing[1].weights == 0).all()


def test_official_aux_loss(fixture_dir):
    """The load-balancing loss of one MoE layer reproduces the official value on stored router logits."""
    from safetensors.torch import load_file

    from prism_vfm.layers.router import Routing, topk_softmax
    from tests.conftest import load_json

    folder = fixture_dir("stage1_losses")
    inputs = load_file(folder / "inputs.safetensors")
    ref = load_json(folder / "reference.json")["moe_load_balancing_aux_loss"]
    model = tiny_student(embed_dim=32, num_experts=15, top_k=3).train()
    moe = model.dual_stream_blocks[0].moe
    for case, expected in ref.items():
        logits = inputs[f"{case}.router_logits"]
        values, indices = logits.topk(3, dim=-1)
        assert torch.equal(indices, inputs[f"{case}.topk_indices"])
        hook = moe.router.register_forward_hook(
            lambda mod, args, out, z=logits, i=indices, v=values: Routing(z, i, topk_softmax(v))
        )
        _, _, aux = moe(torch.randn(2, 197, 32), torch.randn(2, 32))
        hook.remove()
        got, want = float(aux), expected["official_layer_aux_loss"]
        assert abs(got - want) <= max(1e-6, 1e-5 * abs(want)), case


def test_routing_stats_count_every_assignment_per_context():
    model = tiny_student().eval()
    with torch.no_grad():
        out = model(torch.randn(4, 3, 32, 32), _ids(0, 2, 2, 1), return_routing=True)
    stats = model.routing_stats(out)
    counts = stats["expert_counts"][0]
    assert counts.shape == (3, 5)
    assert counts.sum(1).tolist() == [17 * 2, 17 * 2, 2 * 17 * 2]
    assert stats["lambda_mean"][0].shape == (3,)
    assert ((stats["lambda_mean"][0] >= 0.5) & (stats["lambda_mean"][0] <= 1.0)).all()


def test_parameter_groups_split_new_from_pretrained():
    model = tiny_student()
    groups = model.parameter_groups()
    names = {id(p): n for n, p in model.named_parameters()}
    new = {names[id(p)] for p in groups["new"]}
    old = {names[id(p)] for p in groups["pretrained"]}
    assert "blocks.1.anchor.fc1.weight" in old and "pos_embed" in old and "blocks.0.mlp.fc1.weight" in old
    assert {
        "blocks.1.moe.experts.w1",
        "blocks.1.moe.router.film.weight",
        "blocks.1.lambda_gate.bias",
        "teacher_embed.weight",
        "projectors.0.0.0.weight",
    } <= new
    assert len(new) + len(old) == len(list(model.parameters()))


def test_save_and_load_pretrained_round_trip(tmp_path):
    model = tiny_student(num_tasks=2).eval()
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["num_experts"] == 5 and config["teacher_dims"] == [16, 24, 16]
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    loaded = PrismViT.from_pretrained(tmp_path / "ckpt")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x, _ids(0, 1)).taps, model(x, _ids(0, 1)).taps, rtol=0, atol=0)
    # A different input size resamples the position embedding on load.
    bigger = PrismViT.from_pretrained(tmp_path / "ckpt", img_size=(48, 32))
    assert bigger.pos_embed.shape == (1, 1 + 6 * 4, 32)
    assert bigger(torch.randn(1, 3, 48, 32), 0).taps[0].shape == (1, 25, 32)


def test_from_pretrained_missing_file_is_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        PrismViT.from_pretrained(tmp_path / "empty")


def test_timm_vit_weights_initialise_every_ffn_of_a_dual_stream_block():
    from prism_vfm.models.registry import checkpoint_filter_fn

    dense = tiny_dense_vit(num_classes=7)
    model = tiny_student(img_size=48)
    model.load_state_dict(checkpoint_filter_fn(dense.state_dict(), model))
    u = torch.randn(5, 32)
    block = model.blocks[1]
    ref = dense.blocks[1].mlp(u)
    torch.testing.assert_close(block.anchor(u), ref)
    torch.testing.assert_close(block.moe.shared(u), ref)
    e = block.moe.experts
    torch.testing.assert_close(torch.nn.functional.gelu(u @ e.w1[4] + e.b1[4]) @ e.w2[4] + e.b2[4], ref)
    assert model.pos_embed.shape == (1, 37, 32)


def test_official_export_round_trip(tmp_path, caplog):
    model = tiny_student().eval()
    path = tmp_path / "prism_official.pth"
    export_official(model, path)
    with caplog.at_level(logging.INFO, logger="prism_vfm"):
        again = load_official(path, top_k=2, num_heads=2)
    assert "task_free_condition_embeddings.weight" in caplog.text and "ortho_loss_weight" in caplog.text
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again(x, _ids(2, 0)).taps, model(x, _ids(2, 0)).taps, rtol=0, atol=0)
    keys = set(ours_to_official(model))
    assert "backbone.blocks.1.moe_ffn_layer.experts.4.fc2.weight" in keys
    assert "backbone.blocks.3.standard_ffn.fc1.bias" in keys and "vfm_projection_heads.2_1.net.2.bias" in keys


def test_official_stage2_layout_is_accepted():
    model = tiny_student(num_tasks=5).eval()
    state = {"backbone." + k: v for k, v in ours_to_official(model).items()}
    state["heads.semseg.last_conv.weight"] = torch.zeros(21, 32, 1, 1)
    loaded = load_official({"model": state}, top_k=2, num_heads=2)
    assert loaded.num_tasks == 5
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(x, 3, kind="task").taps, model(x, 3, kind="task").taps, rtol=0, atol=0)


def test_load_official_resamples_to_a_new_image_size():
    model = tiny_student()
    loaded = load_official(ours_to_official(model), img_size=(48, 64), top_k=2, num_heads=2)
    assert loaded.pos_embed.shape == (1, 1 + 6 * 8, 32)


def test_load_official_rejects_bad_checkpoints(tmp_path):
    model = tiny_student()
    state = ours_to_official(model)
    path = tmp_path / "cut.pth"
    export_official(model, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointReadError, match="cut.pth.*truncated"):
        load_official(path, num_heads=2)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_official(tmp_path / "nope.pth")
    dense = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).state_dict()
    with pytest.raises(OfficialCheckpointError, match="not a PRISM checkpoint"):
        load_official(dense)
    broken = dict(state)
    del broken["backbone.blocks.1.gate_linear.bias"]
    broken["backbone.blocks.1.extra_thing"] = torch.zeros(1)
    with pytest.raises(
        OfficialCheckpointError,
        match=r"missing blocks\.1\.lambda_gate\.bias.*unexpected blocks\.1\.extra_thing",
    ):
        load_official(broken, num_heads=2)


@pytest.mark.parametrize(
    "x, ctx, kind, match",
    [
        (torch.randn(2, 3, 48, 32), _ids(0, 1), "teacher", "expected 32x32 images"),
        (torch.randn(2, 1, 32, 32), _ids(0, 1), "teacher", "expected 3 input channels"),
        (torch.randn(2, 3, 32, 32), _ids(0, 3), "teacher", r"teacher context ids must be in \[0, 3\)"),
        (torch.randn(2, 3, 32, 32), _ids(0), "teacher", r"shape \(2,\)"),
        (torch.randn(2, 3, 32, 32), torch.zeros(2), "teacher", "integer tensor"),
        (torch.randn(2, 3, 32, 32), _ids(0, 1), "task", "no task contexts"),
        (torch.randn(2, 3, 32, 32), _ids(0, 1), "other", "'teacher' or 'task'"),
        (torch.randn(3, 32, 32), _ids(0, 1), "teacher", r"\(B, C, H, W\)"),
    ],
)
def test_bad_input_is_a_clear_error(x, ctx, kind, match):
    with pytest.raises(ValueError, match=match):
        tiny_student()(x, ctx, kind=kind)


def test_bad_construction_is_a_clear_error():
    with pytest.raises(ValueError, match="outside the 4 blocks"):
        tiny_student(moe_layers=(1, 4))
    with pytest.raises(ValueError, match="top_k"):
        tiny_student(top_k=6)
    with pytest.raises(ValueError, match="unknown expert backend"):
        tiny_student(dispatch="fast")
    with pytest.raises(ValueError, match="unknown preset"):
        create_student("XL")


def test_from_pretrained_fetches_from_the_hub_when_not_a_folder(tmp_path, monkeypatch):
    import prism_vfm.models.hub as hub

    model = tiny_student().eval()
    model.save_pretrained(tmp_path / "snapshot")
    asked = {}

    def fake_download(repo_id, filename, **kwargs):
        asked.update(repo_id=repo_id, filename=filename)
        return str(tmp_path / "snapshot" / filename)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    # The mixin reads config.json through its own hub download, so hand it the local config too.
    import huggingface_hub.hub_mixin as hub_mixin

    monkeypatch.setattr(hub_mixin, "hf_hub_download", fake_download)
    loaded = PrismViT.from_pretrained("someone/prism-tiny")
    assert asked == {"repo_id": "someone/prism-tiny", "filename": "model.safetensors"}
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(x, 0).taps, model(x, 0).taps, rtol=0, atol=0)


def test_statistics_and_trace_cover_only_the_dual_stream_blocks_the_forward_runs():
    # Block 3 is a dual-stream block after the last tap (2): the forward never runs it.
    model = tiny_student(tap_layers=(1, 2)).eval()
    assert model.routed_layers == (1,)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x, _ids(0, 1), return_routing=True)
    assert list(out.routing) == [1]
    stats = model.routing_stats(out)
    assert stats["layers"] == [1] and len(stats["expert_counts"]) == len(stats["lambda_mean"]) == 1
    assert stats["expert_counts"][0].sum().item() == 2 * 17 * 2
    trace = model.trace(x, _ids(0, 1))
    assert trace["layers"] == [1]
    assert all(len(trace[key]) == 1 for key in ("router_logits", "topk", "topk_weights", "lambda"))


def test_absent_heads_term_is_zero_and_reaches_exactly_the_absent_heads():
    model = tiny_student()
    term = model.absent_heads_term([1])
    assert term.item() == 0.0
    term.backward()
    for t, heads in enumerate(model.projectors):
        grads = [p.grad for p in heads.parameters()]
        if t == 1:  # present: left to the loss
            assert all(g is None for g in grads)
        else:
            assert all(g is not None and not g.any() for g in grads)
    with pytest.raises(RuntimeError, match="projectors=False"):
        tiny_student(projectors=False).absent_heads_term([0])
