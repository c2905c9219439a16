"""Class text embeddings: the released prompt ensembles, CLIP tokens, the text tower and the ensembling."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from prism_vfm.video.prompts import ENSEMBLE_28, SINGLE, SSV2_20, expand, templates_for
from prism_vfm.video.text import (
    CLIP_TEXT_TOWERS,
    TextEncoder,
    TextTowerConfig,
    class_text_embeddings,
    ensemble_class_embeddings,
    load_text_weights,
)
from tests.video_fixtures import folder, inputs, reference

TINY_TEXT = TextTowerConfig(width=32, heads=2, layers=2, output_dim=16)


@pytest.fixture(scope="module")
def released():
    prompts = json.loads((folder("train_utils") / "reference.json").read_text())["prompts"]
    return prompts, reference("train_utils")


@pytest.fixture(scope="module")
def tiny_text():
    torch.manual_seed(0)
    return TextEncoder(TINY_TEXT).eval()


def test_the_28_template_strings_are_the_released_ones(released):
    prompts, _ = released
    assert len(ENSEMBLE_28) == 28 and len(SSV2_20) == 20
    expanded = expand(ENSEMBLE_28, prompts["class_names"])
    assert expanded == [prompts["ensemble_28_strings"][str(i)] for i in range(28)]


@pytest.mark.parametrize(
    ("templates", "key"), [(ENSEMBLE_28, "ensemble28"), (SSV2_20, "ssv2_20"), (SINGLE, "single")]
)
def test_token_ids_are_the_released_tokenizers(released, tiny_text, templates, key):
    prompts, ref = released
    expanded = expand(templates, prompts["class_names"])
    ids = torch.stack([tiny_text.tokenize(row) for row in expanded])
    assert torch.equal(ids.squeeze(0) if key == "single" else ids, ref[f"prompt_tokens.{key}"])
    assert ids.dtype == torch.int64 and ids.shape[-1] == prompts["context_length"]


def test_ensembling_normalises_per_template_averages_and_renormalises(released):
    _, ref = released
    per_template = inputs("train_utils")["class_emb.per_template_features"]
    out = ensemble_class_embeddings(per_template)
    torch.testing.assert_close(out, ref["class_emb.result"], atol=1e-6, rtol=0)


def test_ssv2_data_sets_get_their_own_ensemble():
    assert templates_for("ssv2") is SSV2_20
    assert templates_for("SSv2-full") is SSV2_20
    assert templates_for("k400") is ENSEMBLE_28


def test_a_template_needs_one_slot_and_a_prompt_must_fit_the_context(tiny_text):
    with pytest.raises(ValueError, match="exactly one"):
        expand(["a video"], ["x"])
    with pytest.raises(ValueError, match="at most 75 fit"):
        tiny_text.tokenize(["word " * 80])


def _openai_encode_text(state: dict[str, torch.Tensor], tokens: torch.Tensor, heads: int) -> torch.Tensor:
    """CLIP's ``encode_text`` written out from OpenAI's layout: the oracle for the open_clip tower."""
    x = state["token_embedding.weight"][tokens] + state["positional_embedding"]
    n = tokens.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks.")})
    for i in layers:
        p = {k.split(f"resblocks.{i}.")[1]: v for k, v in state.items() if f"resblocks.{i}." in k}
        h = F.layer_norm(x, x.shape[-1:], p["ln_1.weight"], p["ln_1.bias"])
        q, k, v = F.linear(h, p["attn.in_proj_weight"], p["attn.in_proj_bias"]).chunk(3, dim=-1)
        split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
        a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (q.shape[-1] // heads) ** 0.5 + mask, -1)
        x = x + F.linear(
            (a @ split(v)).transpose(1, 2).flatten(2), p["attn.out_proj.weight"], p["attn.out_proj.bias"]
        )
        h = F.layer_norm(x, x.shape[-1:], p["ln_2.weight"], p["ln_2.bias"])
        h = F.linear(h, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"])
        x = x + F.linear(h * torch.sigmoid(1.702 * h), p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])
    x = F.layer_norm(x, x.shape[-1:], state["ln_final.weight"], state["ln_final.bias"])
    return x[torch.arange(len(tokens)), tokens.argmax(-1)] @ state["text_projection"]


def _openai_text_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """Random weights in OpenAI's CLIP layout, with the vision and bookkeeping entries a real file has."""
    g = torch.Generator().manual_seed(seed)
    shapes = {k.removeprefix("tower."): v.shape for k, v in TextEncoder(TINY_TEXT).state_dict().items()}
    state = {k: 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()}
    state.update(
        {"visual.proj": torch.zeros(4, 4), "logit_scale": torch.tensor(4.6), "vocab_size": torch.tensor(1)}
    )
    return state


def test_the_text_tower_computes_clips_encode_text():
    state = _openai_text_state()
    encoder = load_text_weights(TextEncoder(TINY_TEXT), state).eval()
    tokens = encoder.tokenize(["a video of brush hair.", "a person doing Apply Eye Makeup."])
    with torch.no_grad():
        torch.testing.assert_close(
            encoder(tokens), _openai_encode_text(state, tokens, 2), atol=1e-5, rtol=1e-5
        )


def test_text_weights_of_another_shape_are_refused_with_the_keys():
    state = _openai_text_state()
    state["text_projection"] = torch.zeros(32, 8)
    del state["ln_final.bias"]
    with pytest.raises(
        ValueError, match=r"missing: tower.ln_final.bias; .*wrong shape: tower.text_projection"
    ):
        load_text_weights(TextEncoder(TINY_TEXT), state)


def test_class_embeddings_are_the_ensemble_of_the_encoded_prompts(tiny_text):
    names = ["brush hair", "Apply Eye Makeup", "riding mechanical bull"]
    out = class_text_embeddings(tiny_text, names)
    tokens = torch.stack([tiny_text.tokenize(row) for row in expand(ENSEMBLE_28, names)])
    with torch.no_grad():
        per_template = tiny_text(tokens.flatten(0, 1)).view(28, 3, -1)
    torch.testing.assert_close(out, ensemble_class_embeddings(per_template), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))


def test_class_embeddings_are_cached_by_weights_names_and_templates(tmp_path, tiny_text, monkeypatch):
    names = ["brush hair", "kiss"]
    first = class_text_embeddings(tiny_text, names, cache_dir=tmp_path)
    calls = []
    original = TextEncoder.forward
    monkeypatch.setattr(TextEncoder, "forward", lambda self, t: calls.append(1) or original(self, t))
    again = class_text_embeddings(tiny_text, names, cache_dir=tmp_path)
    assert torch.equal(again, first) and not calls
    class_text_embeddings(tiny_text, names[::-1], cache_dir=tmp_path)
    assert calls  # other class order: computed again
    calls.clear()
    other = class_text_embeddings(tiny_text, names, SSV2_20, cache_dir=tmp_path)
    assert calls and not torch.equal(other, first)
    calls.clear()
    reloaded = load_text_weights(TextEncoder(TINY_TEXT), _openai_text_state(seed=2))
    class_text_embeddings(reloaded, names, cache_dir=tmp_path)
    assert calls  # other weights: another namespace
    assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize(("name", "open_clip_name"), [("ViT-B/16", "ViT-B-16"), ("ViT-L/14", "ViT-L-14")])
def test_text_hub_weights_are_the_file_open_clip_reads_for_openai(name, open_clip_name):
    hub = open_clip.get_pretrained_cfg(open_clip_name, "openai")["hf_hub"]
    assert hub.rstrip("/") == CLIP_TEXT_TOWERS[name].hub_repo
    text_cfg = open_clip.get_model_config(open_clip_name)["text_cfg"]
    ours = CLIP_TEXT_TOWERS[name]
    assert (ours.width, ours.heads, ours.layers) == (text_cfg["width"], text_cfg["heads"], text_cfg["layers"])
