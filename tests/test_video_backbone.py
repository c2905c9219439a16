"""The VidPrism frame encoder: the official CLIP vision tower through timm, weights, frozen-feature cache.

Real-size towers are built on the meta device (no memory, no download); numbers come from the tiny
official tower of the ``videoclip_tiny_t8`` fixture (width 128, 3 blocks, 96×96 frames, D = 64).
"""

from __future__ import annotations

from functools import partial

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import LayerNorm
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from prism_vfm.video.backbone import (
    CLIP_TOWERS,
    FrameEncoder,
    FrameFeatureCache,
    TorchScriptRefused,
    TowerConfig,
    load_tower_weights,
    released_tower_state_dict,
)
from tests.video_fixtures import reference, released_state_dicts, videoclip_frames

TINY = TowerConfig(patch_size=16, width=128, depth=3, heads=2, output_dim=64, img_size=96)
SMALL = TowerConfig(patch_size=8, width=32, depth=2, heads=2, output_dim=16, img_size=32)


@pytest.fixture(scope="module")
def official():
    return released_state_dicts("videoclip_tiny_t8")["model"], reference("videoclip_tiny_t8")


def tiny_official_encoder(official) -> FrameEncoder:
    return load_tower_weights(FrameEncoder(TINY), official[0]).eval()


def test_tower_reproduces_official_tokens_blocks_and_frame_embeddings(official):
    """Every stage of the released tower (ln_pre tokens, each block, ln_post class token, projection)."""
    encoder = tiny_official_encoder(official)
    ref = official[1]
    seen = {}
    tower = encoder.tower
    tower.norm_pre.register_forward_hook(lambda m, i, o: seen.__setitem__("ln_pre", o))
    for k, block in enumerate(tower.blocks):
        block.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(f"block.{k}", o))
    tower.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("ln_post", o[:, 0]))
    with torch.no_grad():
        emb = encoder(videoclip_frames().view(2, 8, 3, 96, 96))
    assert emb.shape == (2, 8, 64)
    torch.testing.assert_close(seen["ln_pre"], ref["visual.tokens_after_ln_pre"], atol=1e-4, rtol=0)
    for k in range(3):
        torch.testing.assert_close(seen[f"block.{k}"], ref[f"visual.block.{k}"], atol=1e-4, rtol=0)
    torch.testing.assert_close(seen["ln_post"], ref["visual.cls_after_ln_post"], atol=1e-4, rtol=0)
    torch.testing.assert_close(emb, ref["frame_embeddings"], atol=1e-4, rtol=0)


def test_exact_gelu_does_not_reproduce_the_tower(official):
    """The trap the QuickGELU architecture avoids: the same weights under exact GELU move the output."""
    encoder = tiny_official_encoder(official)
    gelu = VisionTransformer(
        img_size=96,
        patch_size=16,
        embed_dim=128,
        depth=3,
        num_heads=2,
        num_classes=64,
        pre_norm=True,
        norm_layer=partial(LayerNorm, eps=1e-5),
    )
    state = {k.removeprefix("tower."): v for k, v in encoder.state_dict().items()}
    state["head.bias"] = torch.zeros(64)
    gelu.load_state_dict(state)
    frames = videoclip_frames()
    with torch.no_grad():
        diff = (gelu.eval()(frames) - encoder.encode_frames(frames)).abs().max()
    assert diff > 1e-4


@pytest.mark.parametrize(("name", "params"), [("ViT-B/16", 86_192_640), ("ViT-L/14", 303_966_208)])
def test_presets_are_timms_quickgelu_towers_with_the_release_parameter_count(name, params):
    """Same keys and shapes as timm's ``..._clip_quickgelu_224`` (hub weights load into it), no proj bias."""
    with torch.device("meta"):
        encoder = FrameEncoder(name)
        ref = timm.create_model(CLIP_TOWERS[name].timm_name, pretrained=False, num_classes=encoder.output_dim)
    ours = {k.removeprefix("tower."): tuple(v.shape) for k, v in encoder.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert theirs.pop("head.bias") == (encoder.output_dim,)
    assert ours == theirs
    assert sum(p.numel() for p in encoder.parameters()) == params
    act = encoder.tower.blocks[0].mlp.act
    x = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(act.to("cpu")(x), x * torch.sigmoid(1.702 * x))


def test_frames_of_any_count_are_encoded_in_one_batch_like_one_by_one(official):
    encoder = tiny_official_encoder(official)
    frames = videoclip_frames()[:15].view(3, 5, 3, 96, 96)
    with torch.no_grad():
        batched = encoder(frames)
        single = torch.stack([encoder.encode_frames(frames[b]) for b in range(3)])
    assert batched.shape == (3, 5, 64)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


def test_activation_checkpointing_leaves_outputs_and_gradients_unchanged():
    torch.manual_seed(0)
    encoder = FrameEncoder(SMALL)
    frames = torch.randn(2, 3, 3, 32, 32)
    grads = []
    for enable in (False, True):
        encoder.zero_grad()
        encoder.set_grad_checkpointing(enable)
        assert encoder.tower.grad_checkpointing is enable
        encoder(frames).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in encoder.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_frames_of_the_wrong_shape_are_rejected():
    encoder = FrameEncoder(SMALL)
    with pytest.raises(ValueError, match=r"\(B, T, 3, H, W\)"):
        encoder(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="built for 32x32"):
        encoder(torch.zeros(1, 2, 3, 48, 48))


def test_freeze_stops_every_gradient():
    encoder = FrameEncoder(SMALL).train().freeze()
    assert not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())


# ------------------------------------------------------------------------------------------- weights
def test_released_layout_round_trips(official):
    encoder = tiny_official_encoder(official)
    written = released_tower_state_dict(encoder)
    assert written.keys() == {k for k in official[0] if k.startswith("visual.")}
    for key, value in written.items():
        assert torch.equal(value, official[0][key]), key


def test_weights_load_from_safetensors_and_from_a_weights_only_pickle(tmp_path, official):
    ref = tiny_official_encoder(official)
    state = {k: v.half() for k, v in official[0].items()}  # OpenAI files are fp16
    save_file(state, tmp_path / "clip.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in official[0].items()}}, tmp_path / "clip.pth")
    from_st = load_tower_weights(FrameEncoder(TINY), tmp_path / "clip.safetensors")
    from_pt = load_tower_weights(FrameEncoder(TINY), tmp_path / "clip.pth")
    for key, value in ref.state_dict().items():
        assert from_st.state_dict()[key].dtype == torch.float32
        torch.testing.assert_close(from_st.state_dict()[key], value.half().float())
        assert torch.equal(from_pt.state_dict()[key], value), key


def _torchscript_archive(state: dict[str, torch.Tensor], path) -> None:
    """A TorchScript file whose state dict is ``state`` (OpenAI's ``.pt`` format)."""

    class Holder(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Holder()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, nn.Parameter(value.half(), requires_grad=False))
    torch.jit.script(root).save(str(path))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript_archives_load_only_behind_the_opt_in(tmp_path, official):
    path = tmp_path / "ViT-tiny.pt"
    _torchscript_archive(official[0], path)
    with pytest.raises(TorchScriptRefused, match="allow_torchscript=True"):
        load_tower_weights(FrameEncoder(TINY), path)
    loaded = load_tower_weights(FrameEncoder(TINY), path, allow_torchscript=True)
    ref = tiny_official_encoder(official)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value.half().float())


def test_a_missing_weight_file_names_the_file_and_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"'ViT-B-16.pt' not found in {tmp_path}"):
        load_tower_weights(FrameEncoder(TINY), tmp_path / "ViT-B-16.pt")


def test_weights_of_another_tower_are_refused_with_the_keys(official):
    with pytest.raises(ValueError, match=r"missing: tower.blocks.2.*wrong shape"):
        load_tower_weights(
            FrameEncoder(TowerConfig(16, 128, 3, 2, 32, img_size=96)),
            {k: v for k, v in official[0].items() if ".resblocks.2." not in k},
        )


def test_weights_at_another_resolution_resample_the_positional_table(official):
    encoder = load_tower_weights(FrameEncoder(TINY, img_size=64), official[0])
    assert encoder.tower.pos_embed.shape == (1, 17, 128)
    assert encoder(torch.zeros(1, 2, 3, 64, 64)).shape == (1, 2, 64)


# ------------------------------------------------------------------------------------ frozen features
def test_frozen_features_are_computed_once_and_keyed_by_weights(tmp_path):
    torch.manual_seed(0)
    encoder = FrameEncoder(SMALL).freeze()
    clips = torch.randn(3, 4, 3, 32, 32)
    asked = []

    def source(positions):
        asked.append(list(positions))
        return clips[positions]

    cache = FrameFeatureCache(tmp_path, encoder)
    first = cache.features(["a", "b", "c"], source)
    with torch.no_grad():
        torch.testing.assert_close(first, encoder(clips))
    again = cache.features(["c", "a"], source)
    assert asked == [[0, 1, 2]]  # nothing decoded or encoded the second time
    assert torch.equal(again, first[[2, 0]])
    mixed = cache.features(["b", "d"], lambda pos: clips[[0]])
    assert torch.equal(mixed[0], first[1])

    other = FrameEncoder(SMALL).freeze()  # other weights: other namespace, the old entries stay
    FrameFeatureCache(tmp_path, other).features(["a"], clips[:1])
    namespaces = sorted(p.name for p in tmp_path.iterdir())
    assert len(namespaces) == 2 and all(n.startswith("frames-") for n in namespaces)
    assert torch.equal(cache.features(["a"], source), first[:1])


@pytest.mark.parametrize("name", sorted(n for n, t in CLIP_TOWERS.items() if t.timm_name is not None))
def test_hub_weights_are_timms_openai_tag_of_the_quickgelu_architecture(name):
    cfg = timm.models.get_pretrained_cfg(f"{CLIP_TOWERS[name].timm_name}.openai")
    assert cfg is not None and cfg.hf_hub_id.endswith("_clip_224.openai")
    assert cfg.num_classes == CLIP_TOWERS[name].output_dim
    assert cfg.mean == (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation, as the release's


def test_a_projection_with_a_bias_is_refused_naming_the_file(tmp_path):
    """CLIP's projection has no bias: weights whose projection has one are another model."""
    state = {k: v.clone() for k, v in FrameEncoder(SMALL).state_dict().items()}
    state["tower.head.bias"] = torch.ones(SMALL.output_dim)
    save_file(state, tmp_path / "biased.safetensors")
    with pytest.raises(ValueError, match=r"biased\.safetensors: the projection has a non-zero bias"):
        load_tower_weights(FrameEncoder(SMALL), tmp_path / "biased.safetensors")
