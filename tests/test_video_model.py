"""The whole VidPrism model: the official pipeline end to end, checkpoints, the test-time blend, helpers."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from prism_vfm.video import HeadConfig, released_loss
from prism_vfm.video.backbone import FrameEncoder, TowerConfig, released_tower_state_dict
from prism_vfm.video.model import VidPrism, blend, infer_tower_config
from prism_vfm.video.text import TextEncoder, TextTowerConfig, cosine_logits
from tests.video_fixtures import inputs, reference, released_state_dicts, videoclip_frames

TINY_TOWER = TowerConfig(patch_size=8, width=32, depth=2, heads=2, output_dim=16, img_size=32)
TINY_TEXT = TextTowerConfig(width=32, heads=2, layers=1, output_dim=16)


@pytest.fixture(scope="module")
def official():
    return released_state_dicts("videoclip_tiny_t8"), reference("videoclip_tiny_t8")


def released_dict(official) -> dict:
    sd, _ = official
    return {"model_state_dict": sd["model"], "fusion_model_state_dict": sd["fusion_model"], "epoch": 3}


def tiny_model(**kwargs) -> VidPrism:
    torch.manual_seed(0)
    return VidPrism(TINY_TOWER, HeadConfig(dim=16, num_classes=5), **kwargs)


def clips(b: int = 2, t: int = 8) -> torch.Tensor:
    return torch.randn(b, t, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def test_the_official_pipeline_is_reproduced_from_a_released_checkpoint(tmp_path, official):
    """Frames → tower → head of ``videoclip_tiny_t8``, loaded from a torch.save'd released checkpoint."""
    torch.save(released_dict(official), tmp_path / "best.pt")
    model = VidPrism.from_released_checkpoint(tmp_path / "best.pt")
    assert not model.training
    assert model.backbone.config == TowerConfig(16, 128, 3, 2, 64, img_size=96)
    ref = official[1]
    with torch.no_grad():
        features = model.backbone(videoclip_frames().view(2, 8, 3, 96, 96))
        out = model.head(features)
    torch.testing.assert_close(features, ref["frame_embeddings"], atol=1e-4, rtol=0)
    for mine, theirs in (
        (out.logits, "head.logits"),
        (out.gates, "head.gating_weights"),
        (out.embedding, "head.z"),
        (out.fused, "head.f"),
        (out.expert_summaries, "head.E_bnd"),
    ):
        torch.testing.assert_close(mine, ref[theirs], atol=1e-4, rtol=0)
    for r, stream in enumerate(out.streams):  # near ties (gap 4.7e-4) between noise frames: still identical
        assert torch.equal(stream.kept_index, ref[f"head.rgsta.{r}.kept_index"]), r
        torch.testing.assert_close(out.expert_outputs[r], ref[f"head.expert.{r}.out"], atol=1e-4, rtol=0)
    assert out.dbi is not None and torch.equal(out.dbi.last_writer, ref["head.dbi.last_writer"])
    with torch.no_grad():
        whole = model(videoclip_frames().view(2, 8, 3, 96, 96))
    torch.testing.assert_close(whole.logits, ref["head.logits"], atol=1e-4, rtol=0)


def test_a_released_checkpoint_takes_named_head_options_and_text_weights(official):
    text_state = {f"tower.{k}": v for k, v in _text_weights().items()}
    model = VidPrism.from_released_checkpoint(
        released_dict(official), text_tower=TINY_TEXT, text_weights=text_state, dbi_update="sum"
    )
    assert model.head.cfg.dbi_update == "sum"
    assert model.text is not None
    for key, value in text_state.items():
        assert torch.equal(model.text.state_dict()[key], value), key


def _text_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    shapes = {k.removeprefix("tower."): v.shape for k, v in TextEncoder(TINY_TEXT).state_dict().items()}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def test_the_released_layout_is_written_back_key_for_key(tmp_path, official):
    model = VidPrism.from_released_checkpoint(released_dict(official))
    path = model.save_released_checkpoint(tmp_path / "out" / "model_best.pt")
    written = torch.load(path, weights_only=True)
    assert set(written) == {"model_state_dict", "fusion_model_state_dict"}
    for part, module in (("model_state_dict", "model"), ("fusion_model_state_dict", "fusion_model")):
        assert written[part].keys() == official[0][module].keys()
        for key, value in official[0][module].items():
            assert torch.equal(written[part][key], value), key


def test_ddp_prefixed_checkpoints_load(official):
    wrapped = {
        name: {f"module.{k}": v for k, v in part.items()}
        for name, part in released_dict(official).items()
        if name != "epoch"
    }
    model = VidPrism.from_released_checkpoint(wrapped)
    assert torch.equal(
        released_tower_state_dict(model.backbone)["visual.proj"], official[0]["model"]["visual.proj"]
    )


def test_checkpoints_that_are_not_released_vidprism_ones_are_refused_clearly(tmp_path, official):
    with pytest.raises(FileNotFoundError, match=rf"'nope.pt' not found in {tmp_path}"):
        VidPrism.from_released_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match=r"expected the entries .*found \['model'\]"):
        VidPrism.from_released_checkpoint({"model": {}})
    no_tower = released_dict(official)
    no_tower["model_state_dict"] = {"logit_scale": torch.tensor(1.0)}
    with pytest.raises(ValueError, match="no CLIP vision tower entry 'visual.conv1.weight'"):
        VidPrism.from_released_checkpoint(no_tower)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a released VidPrism checkpoint"):
        VidPrism.from_released_checkpoint(tmp_path / "list.pt")


def test_tower_geometry_is_read_from_the_keys(official):
    assert infer_tower_config(official[0]["model"]) == TowerConfig(16, 128, 3, 2, 64, img_size=96)
    with torch.device("meta"):
        vit_b = released_tower_state_dict(FrameEncoder("ViT-B/16"))
    assert infer_tower_config(vit_b).timm_name == "vit_base_patch16_clip_quickgelu_224"


def test_save_pretrained_round_trips_the_whole_model(tmp_path):
    model = tiny_model(text_tower=TINY_TEXT).eval()
    model.save_pretrained(tmp_path / "vidprism")
    config = json.loads((tmp_path / "vidprism" / "config.json").read_text())
    assert config["head"]["num_classes"] == 5 and config["tower"]["width"] == 32
    loaded = VidPrism.from_pretrained(tmp_path / "vidprism")
    assert loaded.head.cfg == model.head.cfg and loaded.text is not None
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(loaded(clips()).logits, model(clips()).logits, atol=0, rtol=0)


def test_config_json_names_the_architecture_and_loads_at_another_frame_size(tmp_path):
    model = VidPrism(TINY_TOWER, text_tower=None, pretrained=False)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "pretrained" not in config  # loading a saved model never fetches hub weights
    assert config["head"]["dim"] == 16 and config["head"]["num_classes"] == 400
    bigger = VidPrism.from_pretrained(tmp_path / "m", img_size=48)
    assert bigger.backbone.tower.pos_embed.shape == (1, 37, 32)
    with torch.no_grad():
        assert bigger(torch.randn(1, 4, 3, 48, 48)).logits.shape == (1, 400)


def test_a_head_of_another_width_is_refused():
    with pytest.raises(ValueError, match="head dim 32 does not match the frame encoder's output dim 16"):
        VidPrism(TINY_TOWER, HeadConfig(dim=32, num_classes=5))


# ------------------------------------------------------------------------------------------ the blend
def test_the_blend_is_the_released_expression_bit_for_bit():
    given = inputs("train_utils")
    ref = reference("train_utils")
    for name in ("a", "b"):
        out = blend(given[f"patch.{name}.finetuned"], given[f"patch.{name}.clip"], 0.99)
        assert torch.equal(out, ref[f"patch.{name}.result"])


def test_blend_backbone_patches_every_tower_tensor_and_leaves_the_head(tmp_path):
    model = tiny_model()
    original = FrameEncoder(TINY_TOWER)
    with torch.no_grad():
        for p in original.parameters():
            p.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.blend_backbone(released_tower_state_dict(original))  # the release's layout is accepted
    for key, value in model.backbone.state_dict().items():
        expected = blend(before[f"backbone.{key}"], original.state_dict()[key], 0.99)
        assert torch.equal(value, expected), key
        assert not torch.equal(value, before[f"backbone.{key}"]), key
    for key, value in model.head.state_dict().items():
        assert torch.equal(value, before[f"head.{key}"]), key
    save_file(released_tower_state_dict(original), tmp_path / "clip.safetensors")
    from_file = tiny_model().blend_backbone(tmp_path / "clip.safetensors")
    for key, value in from_file.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


# ------------------------------------------------------------------------------------ frozen backbone
def test_a_frozen_backbone_takes_no_gradient_and_its_features_are_cached(tmp_path):
    model = tiny_model(frozen_backbone=True).train()
    assert not model.backbone.training and model.head.training
    x = clips()
    out = model(x)
    released_loss(out, torch.tensor([1, 3])).total.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert any(p.grad is not None for p in model.head.parameters())

    cache = model.feature_cache(tmp_path)
    feats = cache.features(["v0", "v1"], x)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.head(feats).logits, model(x).logits, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="frozen backbone"):
        tiny_model().feature_cache(tmp_path)


def test_param_groups_put_the_tower_at_the_reduced_rate():
    model = tiny_model()
    tower, head = model.param_groups(1e-4, 0.07)
    assert tower["lr"] == pytest.approx(7e-6) and head["lr"] == 1e-4
    assert len(tower["params"]) + len(head["params"]) == len(list(model.parameters()))
    assert len(tiny_model(frozen_backbone=True).param_groups(1e-4, 0.07)) == 1


# -------------------------------------------------------------------------------------- conveniences
def test_classify_averages_logits_over_views_then_softmaxes():
    model = tiny_model().eval()
    views = torch.randn(2, 3, 8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    probs = model.classify(views)
    with torch.no_grad():
        logits = model(views.flatten(0, 1)).logits.view(2, 3, -1)
    torch.testing.assert_close(probs, logits.mean(1).softmax(-1))
    torch.testing.assert_close(model.classify(views[:, 0]), logits[:, 0].softmax(-1))


def test_zero_shot_scores_clips_by_cosine_to_the_class_prompts(tmp_path):
    model = tiny_model(text_tower=TINY_TEXT).eval()
    names = ["brush hair", "kiss", "ride bike"]
    probs = model.zero_shot(clips(), names, cache_dir=tmp_path)
    text = model.class_text_embeddings(names)
    with torch.no_grad():
        z = model(clips()).embedding
    torch.testing.assert_close(probs, cosine_logits(z, text).softmax(-1))
    assert probs.shape == (2, 3)
    with pytest.raises(ValueError, match="no text tower"):
        tiny_model().zero_shot(clips(), names)


def test_zero_shot_with_the_text_variant_uses_the_heads_own_cosine_logits():
    torch.manual_seed(0)
    model = VidPrism(TINY_TOWER, HeadConfig(dim=16, num_classes=5, variant="text")).eval()
    text = F.normalize(torch.randn(4, 16), dim=-1)
    probs = model.zero_shot(clips(), class_text=text)
    with torch.no_grad():
        logits = model(clips(), text).logits
    torch.testing.assert_close(probs, logits.softmax(-1))
    assert logits.abs().max() <= 1 + 1e-6  # cosines, no temperature


def test_the_unused_logit_scale_round_trips(official):
    model = VidPrism.from_released_checkpoint(released_dict(official))
    assert model.released_logit_scale == pytest.approx(math.log(1 / 0.07))
    assert model.released_checkpoint()["model_state_dict"]["logit_scale"].dtype == torch.float32


def test_a_truncated_released_checkpoint_is_an_error_naming_the_file(tmp_path):
    from prism_vfm.utils.io import CheckpointReadError

    torch.save(tiny_model().released_checkpoint(), tmp_path / "best.pt")
    data = (tmp_path / "best.pt").read_bytes()
    (tmp_path / "best.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointReadError, match=r"best\.pt is not a readable PyTorch checkpoint"):
        VidPrism.from_released_checkpoint(tmp_path / "best.pt")
