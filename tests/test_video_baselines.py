"""Baseline heads, the homogeneous-expert control, and training a head alone on cached frame features."""

from __future__ import annotations

import json

import pytest
import torch

from prism_vfm.config import ConfigError
from prism_vfm.models.load import load
from prism_vfm.video.config import HeadConfig
from prism_vfm.video.data.features import write_feature_set
from prism_vfm.video.feature_model import FeatureClassifier
from prism_vfm.video.train import train_video
from prism_vfm.video.train_config import VideoDataConfig, VideoModelConfig, VideoTrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

T, D, C = 32, 32, 4


def _head(kind, **options):
    torch.manual_seed(0)
    return FeatureClassifier(kind, HeadConfig(dim=D, num_classes=C, **options), num_frames=T).eval()


def test_the_head_without_dbi_gives_the_same_logits_for_time_reversed_clips():
    x = torch.randn(4, T, D)
    model = _head("vidprism", dbi=False)
    with torch.no_grad():
        forward, backward = model(x).logits, model(x.flip(1)).logits
    assert torch.allclose(forward, backward, rtol=0, atol=1e-6)
    assert torch.equal(forward.argmax(1), backward.argmax(1))


@pytest.mark.parametrize("kind", ["vidprism", "temporal_transformer"])
def test_heads_that_read_order_change_their_logits_for_time_reversed_clips(kind):
    x = torch.randn(4, T, D)
    model = _head(kind)
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, model(x.flip(1)).logits, atol=1e-3)


def test_mean_pooling_sees_only_the_mean_frame():
    x = torch.randn(3, T, D)
    model = _head("mean_pool")
    shuffled = x[:, torch.randperm(T)]
    with torch.no_grad():
        out = model(x)
        assert torch.allclose(out.logits, model(shuffled).logits, atol=1e-6)
        assert torch.allclose(out.logits, model(x.mean(1, keepdim=True)).logits, atol=1e-6)
    assert out.gates.shape == (3, 1) and out.aux_losses["rank"] == 0


def test_the_homogeneous_control_feeds_every_expert_the_same_stream():
    x = torch.randn(2, T, D)
    with torch.no_grad():
        out = _head("vidprism", shared_stream=0)(x)
        own = _head("vidprism")(x)
    assert [e.shape[1] for e in out.expert_outputs] == [16] * 4
    assert [e.shape[1] for e in own.expert_outputs] == [16, 8, 4, 2]
    assert torch.allclose(out.gates.sum(1), torch.ones(2))
    with pytest.raises(ValueError, match="shared_stream"):
        HeadConfig(dim=D, shared_stream=4)


def _features(root, n, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % C
    ramp = torch.linspace(-1, 1, T)[:, None]
    base = torch.randn(2, D, generator=torch.Generator().manual_seed(0))
    x = torch.randn(n, T, D, generator=g) * 0.3
    x += base[labels % 2][:, None] + torch.where(labels < 2, 1.0, -1.0)[:, None, None] * ramp * base[0]
    return x, labels


def _config(tmp_path, head, **model):
    feats = tmp_path / "features"
    if not feats.exists():
        feats.mkdir()
        write_feature_set(feats / "train.safetensors", *_features(feats, 32, 1))
        write_feature_set(feats / "val.safetensors", *_features(feats, 16, 2))
        (feats / "labels.csv").write_text("id,name\n0,a\n1,b\n2,c\n3,d\n")
    return VideoTrainConfig(
        out=str(tmp_path / f"run_{head}"),
        data=VideoDataConfig(dataset="ucf101", features=str(feats), workers=0),
        model=VideoModelConfig(
            **{"tower": "tiny", "pretrained": False, "text_loss": False, "head": head, **model}
        ),
        epochs=3,
        warmup_epochs=0,
        batch_size=8,
        lr=1e-3,
        lr_every=1,
        amp="fp32",
        seed=0,
        keep_last=1,
    )


@pytest.mark.parametrize("head", ["mean_pool", "temporal_transformer", "vidprism"])
def test_the_trainer_trains_a_head_alone_on_cached_features_and_the_loader_reads_it_back(tmp_path, head):
    run = train_video(_config(tmp_path, head))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and 0 <= summary["validation"]["top1"] <= 100
    model, report = load(run)
    assert isinstance(model, FeatureClassifier) and model.kind == head and not report.fresh


def test_head_options_other_than_vidprism_need_cached_features(tmp_path):
    cfg = _config(tmp_path, "mean_pool")
    cfg.data.features = ""
    cfg.data.root = str(tmp_path)
    with pytest.raises(ConfigError, match="model.head"):
        train_video(cfg)
    cfg = _config(tmp_path, "vidprism", text_loss=True)
    with pytest.raises(ConfigError, match="class_text"):
        train_video(cfg)


def test_a_malformed_feature_file_is_an_error_naming_the_file_and_the_clip(tmp_path):
    from prism_vfm.video.data.features import read_feature_set

    path = write_feature_set(tmp_path / "train.safetensors", torch.zeros(3, T, D), torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match=r"train.safetensors: label 5 of clip 1 is outside \[0, 3\]"):
        read_feature_set(path, C)
    with pytest.raises(ValueError, match="features must be"):
        write_feature_set(tmp_path / "x.safetensors", torch.zeros(3, D), torch.tensor([0, 1, 2]))


def test_clip_weights_give_the_tower_its_weights_from_a_file(tmp_path):
    from safetensors.torch import save_file

    from prism_vfm.video.backbone import FrameEncoder, released_tower_state_dict
    from prism_vfm.video.train import build_model
    from prism_vfm.video.train_config import TINY_TOWER

    torch.manual_seed(3)
    source = FrameEncoder(TINY_TOWER)
    save_file(released_tower_state_dict(source), tmp_path / "clip.safetensors")
    cfg = VideoTrainConfig(
        model=VideoModelConfig(
            tower="tiny", pretrained=False, clip_weights=str(tmp_path / "clip.safetensors")
        ),
        data=VideoDataConfig(size=32),
    )
    model = build_model(cfg, num_classes=3)
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key


def test_a_dry_run_on_cached_features_describes_the_head_alone(tmp_path):
    from prism_vfm.video.train import check_video_train

    text = check_video_train(_config(tmp_path, "temporal_transformer"))
    assert "32 training clips of cached features (32, 32)" in text and "temporal_transformer head" in text
