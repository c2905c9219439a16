"""Class text embeddings: CLIP's text tower and BPE tokenizer (open_clip), the released ensembling.

For each template the class prompts are encoded (EOT feature → ``text_projection``) and L2-normalised;
the templates are averaged and the mean L2-normalised again (VIDPRISM_SPEC §1.8). open_clip ships the
BPE vocabulary (byte-identical to the release's), so tokenising needs no download; the tower's weights
come from the Hugging Face Hub (the same ``open_clip_model.safetensors`` open_clip reads for
``pretrained="openai"``) or a local file, and are only needed once: results are cached on disk by the
weights' hash, the class names and the templates.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.pretrained import download_pretrained_from_hf
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import QuickGELU, TextTransformer
from torch import Tensor, nn

from prism_vfm.utils.state_dict import check_keys
from prism_vfm.video.backbone import HUB_TAG, read_clip_state_dict
from prism_vfm.video.cache import TensorCache, state_fingerprint, text_key
from prism_vfm.video.prompts import ENSEMBLE_28, expand


@dataclass(frozen=True)
class TextTowerConfig:
    """Geometry of a CLIP text tower; ``hub_repo`` holds OpenAI's weights for it in open_clip's layout."""

    width: int
    heads: int
    layers: int
    output_dim: int
    context_length: int = 77
    vocab_size: int = 49408
    hub_repo: str | None = None


CLIP_TEXT_TOWERS: dict[str, TextTowerConfig] = {
    "ViT-B/16": TextTowerConfig(512, 8, 12, 512, hub_repo=f"timm/vit_base_patch16_clip_224.{HUB_TAG}"),
    "ViT-L/14": TextTowerConfig(768, 12, 12, 768, hub_repo=f"timm/vit_large_patch14_clip_224.{HUB_TAG}"),
    # The VidPrism demo's CLIP stand-in (prism_vfm.video.demo.imagetext): short captions, no hub weights.
    "demo": TextTowerConfig(64, 1, 2, 64, context_length=24),
}

# Entries of an OpenAI CLIP file that are not text-tower weights.
_NOT_TEXT = ("visual.", "logit_scale", "input_resolution", "context_length", "vocab_size")


def text_tower_config(tower: str | TextTowerConfig | Mapping[str, Any]) -> TextTowerConfig:
    """A :class:`TextTowerConfig` from a preset name (``"ViT-B/16"``, ``"ViT-L/14"``), config or dict."""
    if isinstance(tower, TextTowerConfig):
        return tower
    if isinstance(tower, Mapping):
        return TextTowerConfig(**tower)
    if tower not in CLIP_TEXT_TOWERS:
        raise ValueError(f"unknown CLIP text tower {tower!r}; expected one of {sorted(CLIP_TEXT_TOWERS)}")
    return CLIP_TEXT_TOWERS[tower]


class TextEncoder(nn.Module):
    """CLIP's text tower (open_clip's ``TextTransformer``, QuickGELU, causal mask, EOT pooling).

    ``encoder(tokens)`` maps (N, 77) token ids to (N, D) projected features; :meth:`tokenize` gives the ids.
    """

    def __init__(self, tower: str | TextTowerConfig = "ViT-B/16") -> None:
        super().__init__()
        cfg = text_tower_config(tower)
        self.config = cfg
        self.tower = TextTransformer(
            context_length=cfg.context_length,
            vocab_size=cfg.vocab_size,
            width=cfg.width,
            heads=cfg.heads,
            layers=cfg.layers,
            output_dim=cfg.output_dim,
            act_layer=QuickGELU,
        )
        self.tokenizer = SimpleTokenizer(context_length=cfg.context_length)

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """(N, context_length) int64 token ids: start token, BPE of the lower-cased text, end token, zeros.

        A prompt longer than the context is an error, as in the release (never silently truncated).
        """
        room = self.config.context_length - 2
        for text in texts:
            n = len(self.tokenizer.encode(text))
            if n > room:
                raise ValueError(f"prompt {text!r} has {n} tokens; at most {room} fit the context")
        return self.tokenizer(list(texts)).long()

    def forward(self, tokens: Tensor) -> Tensor:
        return self.tower(tokens)

    def fingerprint(self) -> str:
        """SHA-256 of the weights and geometry."""
        return state_fingerprint(self.state_dict(), {"text_tower": asdict(self.config)})


def text_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The text-tower entries of a CLIP state dict (OpenAI / open_clip layout), in the encoder's keys."""
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    if any(k.startswith("tower.") for k in state):
        return {k: v for k, v in state.items() if k.startswith("tower.")}
    return {f"tower.{k}": v for k, v in state.items() if not k.startswith(_NOT_TEXT)}


def load_text_weights(
    encoder: TextEncoder,
    source: str | os.PathLike | Mapping[str, Tensor],
    *,
    allow_torchscript: bool = False,
) -> TextEncoder:
    """Load CLIP text weights from ``"hub"``, a file (``read_clip_state_dict``) or a state dict, strictly."""
    where = "the given state dict"
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        path = source
        if path == "hub":
            if encoder.config.hub_repo is None:
                raise ValueError("this text tower has no hub weights; pass a file")
            path = download_pretrained_from_hf(encoder.config.hub_repo)
        where = str(path)
        state = read_clip_state_dict(path, allow_torchscript=allow_torchscript)
    converted = text_state_dict(state)
    check_keys(encoder.state_dict(), converted, f"CLIP text weights from {where}")
    encoder.load_state_dict(converted)
    return encoder


def ensemble_class_embeddings(per_template: Tensor) -> Tensor:
    """(templates, C, D) text features → (C, D): normalise per template, average, normalise again."""
    per_template = per_template / per_template.norm(dim=-1, keepdim=True)
    mean = per_template.mean(dim=0)
    return mean / mean.norm(dim=-1, keepdim=True)


@torch.no_grad()
def class_text_embeddings(
    encoder: TextEncoder,
    class_names: Sequence[str],
    templates: Sequence[str] = ENSEMBLE_28,
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
) -> Tensor:
    """(C, D) class embeddings t_c of the prompt ensemble, float32 on the encoder's device.

    With ``cache_dir`` the result is read from / written to a cache keyed by the encoder's weights hash,
    the class names and the templates.
    """
    if not class_names:
        raise ValueError("class_names is empty")
    device = next(encoder.parameters()).device
    store = key = None
    if cache_dir is not None:
        fingerprint = encoder.fingerprint()
        store = TensorCache(
            Path(cache_dir),
            f"text-{fingerprint[:16]}",
            {"weights_sha256": fingerprint, "text_tower": asdict(encoder.config)},
        )
        key = text_key(list(class_names), list(templates))
        cached = store.get(key)
        if cached is not None:
            return cached.to(device)
    prompts = expand(templates, class_names)
    tokens = encoder.tokenize([p for row in prompts for p in row]).to(device)
    feats = torch.cat([encoder(chunk).float() for chunk in tokens.split(batch_size)])
    result = ensemble_class_embeddings(feats.view(len(templates), len(class_names), -1))
    if store is not None and key is not None:
        store.put(key, result)
    return result


def cosine_logits(embedding: Tensor, class_text: Tensor) -> Tensor:
    """cos(z, t_c): (B, D) × (C, D) → (B, C), no temperature (the release's zero-shot scores)."""
    return F.normalize(embedding, dim=-1) @ F.normalize(class_text, dim=-1).t()
