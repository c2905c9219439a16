"""The VidPrism demo's image-text model: it learns what a frame shows, is cached by configuration and seed,
and loads through the CLIP towers' own loading paths."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from prism_vfm.demo.pipeline import default_cache_dir
from prism_vfm.video.backbone import FrameEncoder, load_tower_weights, read_clip_state_dict
from prism_vfm.video.data.dataset import VideoDataset
from prism_vfm.video.data.lists import read_video_list
from prism_vfm.video.demo import imagetext
from prism_vfm.video.demo.clips import FRAME_SIZE, NUM_FRAMES, write_demo_dataset
from prism_vfm.video.demo.imagetext import (
    ImageTextConfig,
    class_embeddings,
    clip_features,
    clip_loss,
    frame_probe,
    imagetext_config,
    load_imagetext,
    prepare_imagetext,
    train_imagetext,
)
from prism_vfm.video.model import VidPrism
from prism_vfm.video.text import TextEncoder, load_text_weights

TINY = ImageTextConfig(clips=16, frames_per_clip=2, steps=2, batch_size=8)
SHORT = ImageTextConfig(clips=96, frames_per_clip=8, steps=60, lr=3e-3)
"""Shorter than the quick setting (which trains 150 steps at the same learning rate), to keep the suite
fast."""


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    """A briefly trained model, trained once for the module (and cached in a temporary folder)."""
    path = prepare_imagetext(SHORT, tmp_path_factory.mktemp("cache"), progress=False)
    return path, load_imagetext(path)


def test_a_briefly_trained_model_retrieves_the_colour_of_a_frame_well_above_chance(short_model):
    """Colour is what the CLIP loss teaches first; shape and position take the full setting's steps."""
    _, (image, text) = short_model
    scores = frame_probe(image, text, frames=128)
    assert scores["colour"] > 0.6  # chance 1/4


def test_an_untrained_model_does_not_pass_the_probe():
    """The probe's bar is learning, not something random towers clear."""
    image, text = FrameEncoder("demo").freeze(), TextEncoder("demo").eval()
    scores = frame_probe(image, text, frames=128)
    assert scores["colour"] < 0.5


def test_frames_with_the_same_caption_are_positives_of_each_other():
    """Swapping the images of two pairs whose captions are the same text leaves the loss unchanged: neither
    is the other's negative. Without captions the plain CLIP loss sees the swap."""
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    captions = ["a red star", "a blue bar", "a red star", "a ring", "a red star"]
    swapped = image[[2, 1, 0, 3, 4]]
    scale = torch.tensor(2.0)
    same = clip_loss(image, text, scale, captions)
    torch.testing.assert_close(same, clip_loss(swapped, text, scale, captions))
    assert not torch.isclose(clip_loss(image, text, scale), clip_loss(swapped, text, scale))
    # All captions distinct: the plain CLIP loss.
    distinct = [f"caption {i}" for i in range(5)]
    torch.testing.assert_close(clip_loss(image, text, scale, distinct), clip_loss(image, text, scale))


def test_the_quick_setting_is_a_shorter_run_of_the_same_model():
    quick, full = imagetext_config(quick=True), imagetext_config()
    assert quick.steps < full.steps and quick.clips < full.clips and quick.key() != full.key()
    assert imagetext_config(seed=3).seed == 3 and imagetext_config(seed=3).key() != full.key()


def test_training_is_deterministic_for_a_seed():
    a, b = train_imagetext(TINY, progress=False), train_imagetext(TINY, progress=False)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = train_imagetext(dataclasses.replace(TINY, seed=1), progress=False)
    assert not torch.equal(a["visual.proj"], c["visual.proj"])


def test_the_cache_is_hit_the_second_time_and_keyed_by_config_and_seed(tmp_path, monkeypatch):
    calls = []
    real = imagetext.train_imagetext

    def counting(cfg, progress=True):
        calls.append(cfg)
        return real(cfg, progress)

    monkeypatch.setattr(imagetext, "train_imagetext", counting)
    first = prepare_imagetext(TINY, tmp_path, progress=False)
    stamp = first.stat().st_mtime_ns
    assert prepare_imagetext(TINY, tmp_path, progress=False) == first
    assert len(calls) == 1 and first.stat().st_mtime_ns == stamp  # found, not retrained or rewritten
    other_seed = prepare_imagetext(dataclasses.replace(TINY, seed=5), tmp_path, progress=False)
    other_steps = prepare_imagetext(dataclasses.replace(TINY, steps=3), tmp_path, progress=False)
    assert len(calls) == 3 and len({first, other_seed, other_steps}) == 3
    assert first.name == TINY.file_name() and first.name.startswith("demo_imagetext-")
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in (first, other_seed, other_steps))  # no temporary files left
    with safe_open(first, "pt") as f:  # a safetensors file that records its configuration
        assert json.loads(f.metadata()["config"]) == TINY.__dict__


def test_the_default_cache_is_the_demo_teachers_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = prepare_imagetext(TINY, progress=False)
    assert path.parent == default_cache_dir() == tmp_path / "prism_vfm" / "demo_teachers"


def test_saved_weights_load_through_the_clip_towers_loading_paths(short_model):
    path, (image, text) = short_model
    state = read_clip_state_dict(path)  # the CLIP file reader: safetensors, nothing executed
    assert any(k.startswith("visual.") for k in state) and "logit_scale" in state
    assert "token_embedding.weight" in state and "text_projection" in state
    model = VidPrism(tower="demo", head={"dim": 64, "num_classes": 3}, text_tower="demo")
    load_tower_weights(model.backbone, path)
    load_text_weights(model.text, path)
    frames = torch.randn(2, 4, 3, FRAME_SIZE, FRAME_SIZE)
    with torch.no_grad():
        assert torch.equal(model.encode_frames(frames), image(frames))
        names = ["a star moving left", "a red circle"]
        assert torch.equal(model.class_text_embeddings(names, ["{}"]), class_embeddings(text, names))
    # The loaded towers are what was trained: they differ from fresh ones.
    fresh = FrameEncoder("demo")
    assert not torch.equal(fresh.state_dict()["tower.head.weight"], image.state_dict()["tower.head.weight"])


def test_clip_features_are_the_frozen_towers_per_frame_features_in_order(short_model, tmp_path):
    _, (image, text) = short_model
    data = write_demo_dataset(tmp_path, train_per_class=0, val_per_class=1, test_per_class=0,
                              zeroshot_per_class=0)  # fmt: skip
    samples = read_video_list(data.lists["val"])[:6]
    dataset = VideoDataset(data.video_root, samples, mode="val", num_frames=NUM_FRAMES,
                           size=FRAME_SIZE, scale_size=FRAME_SIZE)  # fmt: skip
    features, labels = clip_features(image, dataset, batch_size=4)
    assert features.shape == (6, NUM_FRAMES, 64) and labels.tolist() == [s.label for s in samples]
    with torch.no_grad():
        one = image(dataset[3]["video"][None])[0]
    torch.testing.assert_close(features[3], one)
    embeddings = class_embeddings(text, data.class_names)
    assert embeddings.shape == (48, 64)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(48))
    gaps = (embeddings[:, None] - embeddings[None]).abs().amax(-1) + torch.eye(48)
    assert gaps.min() > 0  # every class its own text embedding


def test_the_cache_key_changes_with_the_renderer_and_the_caption_sampling(monkeypatch):
    from prism_vfm.video.demo import imagetext

    cfg = imagetext_config(quick=True)
    before = cfg.key()
    monkeypatch.setattr(imagetext, "RENDERER_VERSION", imagetext.RENDERER_VERSION + 1)
    assert cfg.key() != before
    monkeypatch.undo()
    monkeypatch.setattr(imagetext, "KEEP_P", 0.9)
    assert cfg.key() != before
