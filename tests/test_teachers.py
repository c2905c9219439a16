"""Teacher registry, frozen wrapper, SAM input handling and local weight loading (SPEC §5).

Real-size teachers are built on the meta device (no memory, no download); forwards with numbers run on
tiny custom teachers. Nothing here touches the network.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models import get_pretrained_cfg, vision_transformer, vision_transformer_sam

from prism_vfm.teachers import (
    BUILTIN_TEACHERS,
    FrozenTeacher,
    TeacherSpec,
    TimmBuilder,
    build_teacher,
    get_teacher_spec,
    list_teachers,
    register_teacher,
    registry,
    sam_resize_pad,
    teacher_set,
)

TINY_VIT = TeacherSpec(
    name="tiny_vit",
    builder=TimmBuilder("vit_base_patch16_224", dict(patch_size=8, embed_dim=32, depth=3, num_heads=2)),
    taps=(0, 1),
    out_dim=32,
    patch_size=8,
    files=("tiny_vit_pretrain.pth",),
    source="made by the test",
    checkpoint_filter=vision_transformer.checkpoint_filter_fn,
)

# SAM's architecture shrunk: 64-pixel "long side" stands in for 1024, patch 8 gives an 8x8 grid.
TINY_SAM = TeacherSpec(
    name="tiny_sam",
    builder=TimmBuilder(
        "samvit_base_patch16",
        dict(
            patch_size=8,
            embed_dim=32,
            depth=3,
            num_heads=2,
            window_size=4,
            global_attn_indexes=(2,),
            neck_chans=16,
        ),
    ),
    taps=(0, 2),
    out_dim=32,
    patch_size=8,
    preprocess="sam",
    long_side=64,
    files=("tiny_sam.pth",),
    checkpoint_filter=vision_transformer_sam.checkpoint_filter_fn,
)


@pytest.fixture(autouse=True)
def _isolated_registry(monkeypatch):
    """Registrations made by a test vanish after it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def _hooked_block_outputs(model, images, taps):
    """Outputs of ``model.blocks[t]`` for each tap, captured by hooks on an unpruned model."""
    seen = {}
    handles = [
        model.blocks[t].register_forward_hook(lambda _m, _i, out, t=t: seen.__setitem__(t, out)) for t in taps
    ]
    with torch.no_grad():
        model.forward_features(images)
    for h in handles:
        h.remove()
    return [seen[t] for t in taps]


# --- built-in teachers (meta device: real geometry, no memory, no download) ---------------------------------

BUILTIN_GEOMETRY_384 = {
    "dinov2_l": ((5, 11, 17, 23), 1024, (27, 27)),
    "dinov2_b": ((2, 5, 8, 11), 768, (27, 27)),
    "clip_l": ((5, 11, 17, 23), 1024, (27, 27)),
    "clip_b": ((2, 5, 8, 11), 768, (24, 24)),
    "clip_l_openai": ((5, 11, 17, 23), 1024, (27, 27)),
    "clip_b_openai": ((2, 5, 8, 11), 768, (24, 24)),
    "sam_l": ((5, 11, 17, 23), 1024, (64, 64)),
    "sam_b": ((2, 5, 8, 11), 768, (64, 64)),
}


@pytest.mark.parametrize("name", sorted(BUILTIN_GEOMETRY_384))
def test_builtin_teacher_geometry_at_384(name):
    taps, width, grid = BUILTIN_GEOMETRY_384[name]
    with torch.device("meta"):
        teacher = build_teacher(name, 384, weights="none")
        maps = teacher(torch.empty(2, 3, 384, 384))
    assert teacher.taps == taps and teacher.out_dim == width and teacher.grid_size() == grid
    assert [tuple(m.shape) for m in maps] == [(2, width, *grid)] * len(taps)
    assert len(teacher.model.blocks) == taps[-1] + 1  # nothing after the last tap survives


def test_builtin_specs_match_the_official_table():
    expected = {
        "dinov2_l": ("vit_large_patch14_dinov2.lvd142m", "dinov2_vitl14_pretrain.bin", "resize"),
        "dinov2_b": ("vit_base_patch14_dinov2.lvd142m", "dinov2_vitb14_pretrain.pth", "resize"),
        "clip_l": (
            "vit_large_patch14_clip_336.laion2b_ft_in12k_in1k",
            "vit_large_patch16_clip_336.bin",
            "resize",
        ),
        "clip_b": (
            "vit_base_patch16_clip_384.laion2b_ft_in12k_in1k",
            "vit_base_patch16_clip_384.bin",
            "resize",
        ),
        "sam_l": ("samvit_large_patch16.sa1b", "samvit_large_patch16.bin", "sam"),
        "sam_b": ("samvit_base_patch16.sa1b", "sam_vit_b_01ec64.pth", "sam"),
    }
    for name, (model_name, file, preprocess) in expected.items():
        spec = get_teacher_spec(name)
        assert (spec.builder.model_name, spec.files[0], spec.preprocess) == (model_name, file, preprocess)
    assert all(get_teacher_spec(n).long_side == 1024 for n in ("sam_l", "sam_b"))
    assert {s.name for s in BUILTIN_TEACHERS} <= set(list_teachers())


def test_official_clip_tag_is_timms_default():
    # The official runs used timm's default tag; a timm release that changed it must not change our weights
    # silently, so the pinned tag is checked against the installed timm.
    assert get_pretrained_cfg("vit_large_patch14_clip_336").tag == "laion2b_ft_in12k_in1k"
    assert get_pretrained_cfg("vit_base_patch16_clip_384").tag == "laion2b_ft_in12k_in1k"


def test_teacher_set_is_in_official_id_order():
    assert [s.name for s in teacher_set("L")] == ["dinov2_l", "clip_l", "sam_l"]
    assert [s.name for s in teacher_set("B")] == ["dinov2_b", "clip_b", "sam_b"]
    assert [s.name for s in teacher_set("b", openai_clip=True)] == ["dinov2_b", "clip_b_openai", "sam_b"]
    with pytest.raises(ValueError, match="'L' or 'B'"):
        teacher_set("S")


# --- registry -----------------------------------------------------------------------------------------------


def test_register_custom_teacher_runs_frozen_and_pruned():
    register_teacher(TINY_VIT)
    teacher = build_teacher("tiny_vit", 32, weights="none")
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    maps = teacher(images)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 4)] * 2
    assert all(m.dtype == torch.float32 and not m.requires_grad for m in maps)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert len(teacher.model.blocks) == 2  # block 2 follows the last tap
    assert isinstance(teacher.model.norm, torch.nn.Identity) and isinstance(
        teacher.model.head, torch.nn.Identity
    )


def test_taps_are_raw_block_outputs_without_prefix_tokens():
    full = TINY_VIT.builder((32, 32), False).eval()
    teacher = FrozenTeacher(TINY_VIT, copy.deepcopy(full), 32)
    images = torch.randn(2, 3, 32, 32)
    for got, block_out in zip(
        teacher(images), _hooked_block_outputs(full, images, TINY_VIT.taps), strict=True
    ):
        tokens = block_out[:, full.num_prefix_tokens :]  # CLS dropped, no final norm applied
        assert torch.equal(got, tokens.transpose(1, 2).reshape(2, 32, 4, 4))


def test_registering_a_taken_name_needs_overwrite():
    register_teacher(TINY_VIT)
    with pytest.raises(ValueError, match="already registered"):
        register_teacher(TINY_VIT)
    replacement = TeacherSpec(**{**TINY_VIT.__dict__, "taps": (1, 2)})
    register_teacher(replacement, overwrite=True)
    assert get_teacher_spec("tiny_vit").taps == (1, 2)
    with pytest.raises(ValueError, match="already registered"):
        register_teacher(TeacherSpec(**{**get_teacher_spec("sam_b").__dict__}))


def test_unknown_teacher_lists_the_registered_ones():
    with pytest.raises(KeyError, match="dinov2_l"):
        get_teacher_spec("dinov3_l")


@pytest.mark.parametrize(
    ("change", "message"),
    [({"taps": (2, 1)}, "increasing"), ({"taps": ()}, "increasing"), ({"preprocess": "crop"}, "preprocess")],
)
def test_invalid_specs_are_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        TeacherSpec(**{**TINY_VIT.__dict__, **change})


def test_spec_disagreeing_with_its_model_fails_at_build():
    with pytest.raises(ValueError, match="out_dim=64"):
        build_teacher(TeacherSpec(**{**TINY_VIT.__dict__, "out_dim": 64}), 32, weights="none")
    with pytest.raises(ValueError, match="patch_size=16"):
        build_teacher(TeacherSpec(**{**TINY_VIT.__dict__, "patch_size": 16}), 32, weights="none")


def test_resize_teacher_rejects_another_input_size():
    teacher = build_teacher(TINY_VIT, 32, weights="none")
    with pytest.raises(ValueError, match="built for 32×32"):
        teacher(torch.randn(1, 3, 48, 48))


# --- SAM input handling -------------------------------------------------------------------------------------


def test_sam_resize_pad_puts_content_top_left_and_zero_pads():
    images = torch.randn(2, 3, 40, 24)
    out = sam_resize_pad(images, 64)
    assert out.shape == (2, 3, 64, 64)
    # 40x24 -> longest side 64 -> 64 x round(38.4) = 64x38
    resized = F.interpolate(images, size=(64, 38), mode="bicubic", align_corners=False)
    assert torch.equal(out[..., :, :38], resized)
    assert not out[..., :, 38:].any()
    wide = sam_resize_pad(torch.randn(1, 3, 24, 40), 64)
    assert not wide[..., 38:, :].any() and wide[..., :38, :].abs().sum() > 0


def test_sam_teacher_resizes_and_pads_inside_the_wrapper():
    full = TINY_SAM.builder((64, 64), False).eval()
    teacher = FrozenTeacher(TINY_SAM, copy.deepcopy(full), (40, 24))
    seen = []
    teacher.model.patch_embed.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    images = torch.randn(2, 3, 40, 24)
    maps = teacher(images)
    assert torch.equal(seen[0], sam_resize_pad(images, 64))
    assert teacher.grid_size() == (8, 8)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 8, 8)] * 2
    assert isinstance(teacher.model.neck, torch.nn.Identity)
    reference = _hooked_block_outputs(full, sam_resize_pad(images, 64), TINY_SAM.taps)
    for got, nhwc in zip(maps, reference, strict=True):
        assert torch.equal(got, nhwc.permute(0, 3, 1, 2))  # before the neck, made NCHW


def test_sam_crop_padding_keeps_only_content_cells():
    teacher = FrozenTeacher(TINY_SAM, TINY_SAM.builder((64, 64), False), (40, 24), crop_padding=True)
    # content is 64x38 pixels: 8 rows, ceil(38/8) = 5 columns of 8-pixel cells
    assert teacher.grid_size() == (8, 5)
    assert [tuple(m.shape) for m in teacher(torch.randn(1, 3, 40, 24))] == [(1, 32, 8, 5)] * 2
    assert teacher.grid_size((32, 32)) == (8, 8)


# --- local weights ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_directory_weights_load_the_official_file(tmp_path, suffix):
    spec = TeacherSpec(**{**TINY_VIT.__dict__, "files": (f"tiny_vit_pretrain{suffix}",)})
    source = spec.builder((32, 32), False)
    state = source.state_dict()  # a full checkpoint: pruned block, final norm and head included
    if suffix == ".pth":
        torch.save(state, tmp_path / spec.files[0])
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / spec.files[0])
    loaded = build_teacher(spec, 32, weights=tmp_path)
    reference = FrozenTeacher(spec, source, 32)
    images = torch.randn(2, 3, 32, 32)
    for a, b in zip(loaded(images), reference(images), strict=True):
        assert torch.equal(a, b)


def test_original_dinov2_layout_is_converted_by_timms_filter(tmp_path):
    # Meta's DINOv2 files carry a mask_token and a position embedding for another grid.
    source = TINY_VIT.builder((48, 48), False)
    state = {**source.state_dict(), "mask_token": torch.zeros(1, 32)}
    torch.save({"model": state}, tmp_path / TINY_VIT.files[0])
    loaded = build_teacher(TINY_VIT, 32, weights=tmp_path).model
    assert loaded.pos_embed.shape == (1, 1 + 4 * 4, 32)
    assert torch.equal(loaded.pos_embed[:, 0], state["pos_embed"][:, 0])  # the CLS slot is not resampled
    assert torch.equal(loaded.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])


def test_original_sam_layout_is_converted_by_timms_filter(tmp_path):
    source = TINY_SAM.builder((64, 64), False)
    state = {f"image_encoder.{k}".replace("mlp.fc", "mlp.lin"): v for k, v in source.state_dict().items()}
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 16)  # SAM's decoder, not part of the teacher
    torch.save(state, tmp_path / TINY_SAM.files[0])
    loaded = build_teacher(TINY_SAM, 64, weights=tmp_path).model
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_missing_file_names_file_directory_and_source(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        build_teacher("sam_b", 384, weights=tmp_path)
    message = str(err.value)
    assert "sam_vit_b_01ec64.pth" in message and str(tmp_path.resolve()) in message
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in message
    with pytest.raises(FileNotFoundError, match="vit_large_patch16_clip_336.bin.*laion2b_ft_in12k_in1k"):
        build_teacher("clip_l", 384, weights=tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a directory nor a file"):
        build_teacher("clip_l", 384, weights=tmp_path / "nowhere")


def test_file_with_wrong_keys_lists_them(tmp_path):
    state = TINY_VIT.builder((32, 32), False).state_dict()
    del state["blocks.0.attn.qkv.weight"]
    state["blocks.0.attn.qkv_typo.weight"] = torch.zeros(1)
    state["cls_token"] = torch.zeros(1, 1, 16)
    torch.save(state, tmp_path / TINY_VIT.files[0])
    with pytest.raises(ValueError) as err:
        build_teacher(TINY_VIT, 32, weights=tmp_path)
    message = str(err.value)
    assert "missing: blocks.0.attn.qkv.weight" in message
    assert "unexpected: blocks.0.attn.qkv_typo.weight" in message
    assert "cls_token (file (1, 1, 16), model (1, 1, 32))" in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast applies to CUDA inputs only")
def test_bf16_autocast_on_cuda_returns_float32_close_to_fp32():
    teacher = build_teacher(TINY_VIT, 32, weights="none").cuda()
    images = torch.randn(2, 3, 32, 32, device="cuda")
    exact = teacher(images)
    teacher.bf16 = True
    for fast, ref in zip(teacher(images), exact, strict=True):
        assert fast.dtype == torch.float32
        torch.testing.assert_close(fast, ref, atol=0.1, rtol=0.05)
