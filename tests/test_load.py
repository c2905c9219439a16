"""One loader for every kind of source, with a report of what it loaded and what would start fresh."""

from __future__ import annotations

import json
import os

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

import prism_vfm
from prism_vfm import PrismMultiTask, PrismViT, export_official, load_official
from prism_vfm.cli import main
from prism_vfm.compat.official import official_to_ours, ours_to_official, read_official
from prism_vfm.data.registry import dataset_tasks
from prism_vfm.distill.config import StudentConfig
from prism_vfm.distill.student import build_student
from prism_vfm.models.load import DENSE_VIT_FRESH, LoadError, load, load_into
from prism_vfm.train.checkpoint import save_checkpoint
from prism_vfm.utils.io import CheckpointReadError, UnsafePickleError
from prism_vfm.video import HeadConfig, VidPrism
from prism_vfm.video.backbone import TowerConfig
from prism_vfm.video.text import TextTowerConfig
from tests.official_helpers import official_state_dict
from tests.tiny import TINY, tiny_dense_vit, tiny_student

# Official files record neither the head count nor top-k: a standard width (192: 3 heads) and top-3.
OFFICIAL_TINY = dict(TINY, embed_dim=192, num_heads=3, top_k=3)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def _write_run(run, models: dict[int, PrismViT]) -> None:
    for step, model in models.items():
        config = dict(model._hub_mixin_config)
        save_checkpoint(run, step, model.state_dict(), {"step": step}, keep_last=5, config=config)


def test_a_run_folder_gives_its_latest_checkpoint_or_a_named_step(tmp_path):
    first, second = tiny_student(), tiny_student()
    _write_run(tmp_path / "run", {10: first, 20: second})
    latest, report = load(tmp_path / "run")
    _same(latest, second)
    assert report.kind == "run checkpoint step_00000020" and not report.fresh and not report.ignored
    named, _ = load(tmp_path / "run", step=10)
    _same(named, first)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 15 .*step_00000010"):
        load(tmp_path / "run", step=15)
    target = tiny_student()
    load_into(target, tmp_path / "run", step=10)
    _same(target, first)


def test_a_non_square_model_the_library_saved_reloads_at_another_size(tmp_path):
    model = tiny_student(img_size=(32, 48)).eval()
    model.save_pretrained(tmp_path / "ns")
    x = torch.randn(1, 3, 32, 48)
    again, report = load(tmp_path / "ns")
    torch.testing.assert_close(again(x, 0).taps, model(x, 0).taps, rtol=0, atol=0)
    # 6x4 holds as many positions as the saved 4x6 grid: still resampled, not reused as it is.
    transposed = resample_abs_pos_embed(model.pos_embed, new_size=[6, 4], old_size=[4, 6])
    taller = resample_abs_pos_embed(model.pos_embed, new_size=[8, 6], old_size=[4, 6])
    for size, expected in (((48, 32), transposed), ((64, 48), taller)):
        for reloaded in (
            PrismViT.from_pretrained(tmp_path / "ns", img_size=size),
            load(tmp_path / "ns", img_size=size)[0],
        ):
            torch.testing.assert_close(reloaded.pos_embed, expected)
            assert reloaded(torch.randn(1, 3, *size), 0).taps[0].shape == expected.shape
    back = PrismViT(**{**TINY, "img_size": (32, 48)})
    load_into(back, tmp_path / "ns")
    torch.testing.assert_close(back.pos_embed, model.pos_embed)
    multi = PrismMultiTask({**TINY, "img_size": (32, 48)}, dataset_tasks("nyud")).eval()
    multi.save_pretrained(tmp_path / "mt")
    bigger, report = load(tmp_path / "mt", img_size=(64, 48))
    assert isinstance(bigger, PrismMultiTask) and report.resampled == ["student.pos_embed"]
    assert bigger.student.pos_embed.shape == (1, 1 + 8 * 6, 32)
    again_mt = PrismMultiTask.from_pretrained(tmp_path / "mt", student_args={**TINY, "img_size": (64, 48)})
    torch.testing.assert_close(again_mt.student.pos_embed, bigger.student.pos_embed)


def test_info_works_on_a_stage2_folder_and_a_run(tmp_path, capsys):
    PrismMultiTask(TINY, dataset_tasks("pascalcontext")).save_pretrained(tmp_path / "stage2")
    main(["info", str(tmp_path / "stage2")])
    out = capsys.readouterr()
    info = json.loads(out.out)
    assert info["tasks"] == list(dataset_tasks("pascalcontext"))
    assert info["dual_stream_blocks"] == [1, 3] and info["decoder_head_parameters"] > 0
    assert "loaded" in out.err and "stage2 (folder)" in out.err
    alone, report = load(tmp_path / "stage2", multitask=False)
    assert isinstance(alone, PrismViT) and alone.num_tasks == 5
    assert "heads.semseg.last_conv.weight" in report.ignored and not report.fresh
    _write_run(tmp_path / "run", {5: tiny_student(), 7: tiny_student()})
    main(["info", str(tmp_path / "run"), "--step", "5"])
    out = capsys.readouterr()
    assert json.loads(out.out)["experts"] == 5 and "run checkpoint step_00000005" in out.err


def test_the_command_line_shows_the_unused_official_entries(tmp_path, capsys):
    path = tmp_path / "official.pth"
    export_official(PrismViT(**OFFICIAL_TINY), path)
    main(["info", str(path)])
    err = capsys.readouterr().err
    assert "official Stage-1 .pth" in err and "not used by the model" in err
    assert "task_free_condition_embeddings" in err and "moe_ffn_layer.ortho_loss_weight" in err
    main(["convert", str(path), str(tmp_path / "ours")])
    assert "task_composer_weights" in capsys.readouterr().err
    assert (tmp_path / "ours" / "model.safetensors").is_file()


def test_init_from_a_checkpoint_of_another_shape_is_an_error_unless_allowed(tmp_path):
    source = tiny_student(num_experts=4)
    source.save_pretrained(tmp_path / "e4")
    target = tiny_student()  # 5 experts
    before = target.blocks[1].moe.experts.w1.clone()
    with pytest.raises(LoadError, match=r"e4 \(folder\).*blocks\.1\.moe\.experts\.w1 \(4, 32, 128\)") as err:
        load_into(target, tmp_path / "e4")
    assert err.value.report.mismatched["blocks.1.moe.router.gate.weight"] == ((4, 32), (5, 32))
    torch.testing.assert_close(target.blocks[1].moe.experts.w1, before)  # nothing loaded
    report = load_into(target, tmp_path / "e4", allow_fresh=("blocks.*.moe.*",))
    torch.testing.assert_close(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert "blocks.1.moe.experts.w1" in report.fresh and "blocks.0.attn.qkv.weight" in report.loaded
    # A source that lacks entries (no projector heads) is as much an error.
    tiny_student(projectors=False).save_pretrained(tmp_path / "noproj")
    with pytest.raises(LoadError, match=r"missing projectors\.0\.0\.0\.bias"):
        load_into(tiny_student(), tmp_path / "noproj")


def test_a_plain_vit_starts_the_dual_stream_modules_fresh_by_design(tmp_path):
    dense = tiny_dense_vit()
    torch.save(dense.state_dict(), tmp_path / "vit.pth")
    model = tiny_student()
    report = load_into(model, tmp_path / "vit.pth")
    assert report.fresh and all(any(_fn(k, p) for p in DENSE_VIT_FRESH) for k in report.fresh)
    assert "head.weight" in report.ignored and "blocks.1.anchor.fc1.weight" in report.loaded
    torch.testing.assert_close(model.blocks[1].moe.shared.fc1.weight, dense.blocks[1].mlp.fc1.weight)


def test_timm_pretrained_weights_may_leave_only_the_dual_stream_modules_fresh():
    from prism_vfm.models.registry import checkpoint_filter_fn

    dense = tiny_dense_vit().state_dict()
    model = tiny_student()
    assert checkpoint_filter_fn(dense, model).keys() == model.state_dict().keys()
    del dense["blocks.2.attn.qkv.weight"]
    with pytest.raises(LoadError, match=r"missing blocks\.2\.attn\.qkv\.weight"):
        checkpoint_filter_fn(dense, model)


def _fn(key: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatchcase(key, pattern)


def test_a_truncated_safetensors_file_is_a_one_line_error_naming_the_file(tmp_path):
    tiny_student().save_pretrained(tmp_path / "cut")
    file = tmp_path / "cut" / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    for attempt in (
        lambda: load(tmp_path / "cut"),
        lambda: load_into(tiny_student(), tmp_path / "cut"),
        lambda: PrismViT.from_pretrained(tmp_path / "cut"),
    ):
        with pytest.raises(
            CheckpointReadError, match=r"cut/model\.safetensors is not a readable safetensors"
        ) as e:
            attempt()
        assert "\n" not in str(e.value) and "truncated" in str(e.value)


class _RunsCode:
    """Pickles as a call to os.makedirs: loading it with plain pickle would create ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_a_pickle_that_holds_code_is_reported_as_unsafe_and_not_executed(tmp_path):
    marker = tmp_path / "executed"
    state = {"model": ours_to_official(PrismViT(**OFFICIAL_TINY)), "extra": _RunsCode(str(marker))}
    path = tmp_path / "evil.pth"
    torch.save(state, path)
    cfg = StudentConfig(model="prism_vit_tiny_patch16_384", img_size=32, init=str(path))
    for attempt in (
        lambda: load(path),
        lambda: load_official(path),
        lambda: build_student(cfg, teacher_dims=(16,)),
    ):
        with pytest.raises(
            UnsafePickleError, match=r"evil\.pth is an unsafe pickle.*makedirs.*nothing in it was executed"
        ):
            attempt()
    assert not marker.exists()
    # A damaged (not malicious) file still says so.
    torch.save({"model": {"a": torch.zeros(1000)}}, tmp_path / "ok.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "ok.pth").read_bytes()[:500])
    with pytest.raises(
        CheckpointReadError, match="cut.pth is not a readable PyTorch checkpoint; it may be truncated"
    ):
        load(tmp_path / "cut.pth")


def test_a_bare_weight_file_needs_its_architecture(tmp_path):
    from safetensors.torch import save_file

    model = tiny_student(num_tasks=2).eval()
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=r"w\.safetensors holds weights without an architecture"):
        load(tmp_path / "w.safetensors")
    arch = {k: v for k, v in TINY.items() if k != "teacher_dims"}
    again, report = load(
        tmp_path / "w.safetensors",
        model="prism_vit_tiny_patch16_384",
        teacher_dims=(16, 24, 16),
        num_tasks=2,
        **arch,
    )
    _same(again, model)
    assert report.kind == "weight file"
    with pytest.raises(FileNotFoundError, match="nothing_here does not exist"):
        load(tmp_path / "nothing_here")


def test_official_files_load_as_what_they_hold(tmp_path):
    student = PrismViT(**{**OFFICIAL_TINY, "num_tasks": 5}).eval()
    multi = PrismMultiTask(dict(OFFICIAL_TINY), dataset_tasks("pascalcontext")).eval()
    multi.student.load_state_dict(student.state_dict())
    state = {"backbone." + k: v for k, v in ours_to_official(student).items()}
    state.update({f"heads.{k}": v for k, v in multi.heads.state_dict().items()})
    torch.save({"model": state}, tmp_path / "s2.pth")
    whole, report = load(tmp_path / "s2.pth")
    assert isinstance(whole, PrismMultiTask) and report.kind == "official Stage-2 .pth"
    _same(whole, multi)
    alone, report = load(tmp_path / "s2.pth", multitask=False)
    _same(alone, student)
    assert "heads.semseg.last_conv.weight" in report.ignored
    with pytest.raises(ValueError, match="no decoder heads"):
        export_official(student, tmp_path / "s1.pth")
        load(tmp_path / "s1.pth", multitask=True)


@pytest.fixture(scope="module")
def released_stand_in(tmp_path_factory, fixture_dir):
    """A file in the released Stage-1 ViT-B format, rebuilt from the fixture recipe."""
    state = official_state_dict(fixture_dir("stage1_vitb_224"), check_hashes=False)
    path = tmp_path_factory.mktemp("release") / "prism_stage1_vit_b.pth"
    torch.save({"model": state}, path)
    return path, state


def test_released_weights_are_pretrained_tags_of_the_registered_models(released_stand_in, monkeypatch):
    path, state = released_stand_in
    expected = official_to_ours(read_official(state).student)
    model = timm.create_model(
        "prism_vit_base_patch16_384.prism_stage1",
        pretrained=True,
        img_size=224,
        pretrained_cfg_overlay=dict(file=str(path)),
    )
    own = model.state_dict()
    assert own.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(own[key], value), key
    assert model.pretrained_cfg["tag"] == "prism_stage1" and "state_dict" not in model.pretrained_cfg
    assert model.teacher_dims == (1024, 1024, 1024)
    # The tag is separate from the AugReg initialisation, which stays the default pretrained tag.
    assert timm.create_model("prism_vit_base_patch16_384", pretrained=False).pretrained_cfg["tag"] == (
        "augreg_in21k"
    )
    with pytest.raises(ValueError, match="embed_dim=768, not the 1024 of prism_vit_large_patch16_384"):
        timm.create_model(
            "prism_vit_large_patch16_384.prism_stage1",
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(path)),
        )
    # The library's loader reads the tag from the Hub (here: the stand-in handed out by a fake download).
    import prism_vfm.models.load as loader

    asked = {}

    def fake_download(repo_id, filename, **kwargs):
        asked.update(repo_id=repo_id, filename=filename)
        return str(path)

    monkeypatch.setattr(loader, "hf_hub_download", fake_download)
    del model
    loaded, report = load("prism_vit_base_patch16_384.prism_stage1", img_size=224)
    assert asked == {"repo_id": "robotyingtang/PRISM-VFM", "filename": "checkpoints/prism_stage1_vit_b.pth"}
    assert report.kind == "official Stage-1 .pth" and "task_composer_weights" in report.ignored
    assert torch.equal(loaded.state_dict()["blocks.2.moe.experts.w1"], expected["blocks.2.moe.experts.w1"])


def test_a_released_tag_builds_a_features_only_backbone(released_stand_in):
    path, state = released_stand_in
    kwargs = dict(pretrained=True, img_size=224, pretrained_cfg_overlay=dict(file=str(path)))
    backbone = timm.create_model("prism_vit_base_patch16_384.prism_stage1", features_only=True, **kwargs)
    assert backbone.feature_info.module_name() == [f"blocks.{i}" for i in (2, 5, 8, 11)]
    expected = official_to_ours(read_official(state).student)
    own = backbone.model.state_dict()
    for key in ("blocks.2.moe.experts.w1", "teacher_embed.weight", "pos_embed"):
        assert torch.equal(own[key], expected[key]), key
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        maps = backbone.eval()(x, 1)
    assert [m.shape for m in maps] == [(1, 768, 14, 14)] * 4


# ------------------------------------------------------------------------------------------ VidPrism
def test_step_best_gives_the_checkpoint_the_best_pointer_names(tmp_path, capsys):
    first, second, third = tiny_student(), tiny_student(), tiny_student()
    with pytest.raises(FileNotFoundError, match="keeps no best checkpoint"):
        _write_run(tmp_path / "run", {10: first})
        load(tmp_path / "run", step="best")
    config = dict(second._hub_mixin_config)
    save_checkpoint(
        tmp_path / "run", 20, second.state_dict(), {"step": 20}, keep_last=1, config=config, best=True
    )
    save_checkpoint(tmp_path / "run", 30, third.state_dict(), {"step": 30}, keep_last=1, config=config)
    best, report = load(tmp_path / "run", step="best")
    _same(best, second)  # kept though keep_last=1 pruned step 10
    assert report.kind == "best run checkpoint step_00000020"
    _same(load(tmp_path / "run")[0], third)
    with pytest.raises(ValueError, match="expected a step number or 'best'"):
        load(tmp_path / "run", step="last")
    main(["info", str(tmp_path / "run"), "--step", "best"])
    assert "best run checkpoint step_00000020" in capsys.readouterr().err


def _tiny_vidprism(**kwargs) -> VidPrism:
    torch.manual_seed(0)
    # 64 wide, one head: a released checkpoint records no head count, read back as width / 64.
    tower = TowerConfig(patch_size=8, width=64, depth=2, heads=1, output_dim=16, img_size=32)
    return VidPrism(tower, HeadConfig(dim=16, num_classes=5), **kwargs).eval()


def test_a_vidprism_folder_and_run_load_through_the_one_loader(tmp_path):
    saved = _tiny_vidprism()
    saved.save_pretrained(tmp_path / "folder")
    config = dict(saved._hub_mixin_config)
    save_checkpoint(tmp_path / "run", 3, saved.state_dict(), {"step": 3}, keep_last=5, config=config)
    for source in (tmp_path / "folder", tmp_path / "run"):
        model, report = prism_vfm.load(source)
        assert isinstance(model, VidPrism) and not model.training
        _same(model, saved)
        assert "VidPrism" in report.kind
        assert sorted(report.loaded) == sorted(saved.state_dict())
        assert not report.fresh and not report.ignored
        clips = torch.randn(1, 8, 3, 32, 32)
        torch.testing.assert_close(model(clips).logits, saved(clips).logits, rtol=0, atol=0)


def test_a_vidprism_folder_at_another_frame_size_resamples_the_positional_table(tmp_path):
    _tiny_vidprism().save_pretrained(tmp_path)
    model, report = load(tmp_path, img_size=48)
    assert report.resampled == ["backbone.tower.pos_embed"]
    assert model.backbone.tower.pos_embed.shape[1] == 1 + 6 * 6
    with pytest.raises(ValueError, match="square"):
        load(tmp_path, img_size=(48, 64))


def test_a_vidprism_folder_missing_an_entry_is_an_error_unless_allowed(tmp_path):
    from safetensors.torch import load_file, save_file

    _tiny_vidprism().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["head.classifier.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(LoadError, match=r"head\.classifier\.weight") as info:
        load(tmp_path)
    assert info.value.report.missing == ["head.classifier.weight"]
    _, report = load(tmp_path, allow_fresh=["head.classifier.*"])
    assert report.fresh == ["head.classifier.weight"]
    with pytest.raises(ValueError, match="no PRISM decoder heads"):
        load(tmp_path, multitask=True)


def test_a_released_vidprism_checkpoint_loads_as_from_released_checkpoint_builds_it(tmp_path):
    ckpt = _tiny_vidprism().released_checkpoint()
    ckpt["model_state_dict"]["logit_scale"] = torch.tensor(2.5)
    ckpt["model_state_dict"]["token_embedding.weight"] = torch.zeros(3, 16)  # CLIP's text tower
    ckpt["epoch"] = 7
    torch.save(ckpt, tmp_path / "best.pt")
    model, report = load(tmp_path / "best.pt")
    expected = VidPrism.from_released_checkpoint(tmp_path / "best.pt")
    assert isinstance(model, VidPrism)
    _same(model, expected)
    assert model.released_logit_scale == expected.released_logit_scale == 2.5
    assert report.kind == "released VidPrism checkpoint"
    assert sorted(report.loaded) == sorted(expected.state_dict())
    assert report.ignored == ["token_embedding.weight"]
    # A text tower the checkpoint does not hold would start at its random initialisation.
    text = TextTowerConfig(width=32, heads=2, layers=1, output_dim=16)
    with pytest.raises(LoadError, match=r"text\."):
        load(tmp_path / "best.pt", text_tower=text)
    _, report = load(tmp_path / "best.pt", text_tower=text, allow_fresh=["text.*"])
    assert report.fresh and all(k.startswith("text.") for k in report.fresh)


def test_info_and_convert_on_vidprism_sources(tmp_path, capsys):
    model = _tiny_vidprism()
    model.save_pretrained(tmp_path / "folder")
    main(["info", str(tmp_path / "folder")])
    out = capsys.readouterr()
    info = json.loads(out.out)
    assert info["model"] == "VidPrism" and info["head"]["num_classes"] == 5
    assert info["tower_parameters"] == sum(p.numel() for p in model.backbone.parameters())
    assert "VidPrism folder" in out.err
    # A released checkpoint converts to our folder; our folder has no official PRISM layout.
    model.save_released_checkpoint(tmp_path / "best.pt")
    main(["convert", str(tmp_path / "best.pt"), str(tmp_path / "converted")])
    _same(load(tmp_path / "converted")[0], model)
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "folder"), str(tmp_path / "official.pth")])
    assert "holds a VidPrism" in capsys.readouterr().err
    assert not (tmp_path / "official.pth").exists()


def test_a_vidprism_folder_is_no_student_to_initialise_from(tmp_path):
    _tiny_vidprism().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a VidPrism model, not a PRISM student"):
        load_into(tiny_student(), tmp_path)
