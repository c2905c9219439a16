"""The frame encoder: CLIP's vision tower (timm) on every frame of a clip, (B, T, 3, H, W) → (B, T, D).

The tower is timm's ViT in the OpenAI-CLIP configuration — patch conv without bias, class token, learned
positional table, ln_pre, pre-LN blocks with **QuickGELU** MLPs, ln_post on the class token, bias-free
projection to D (VIDPRISM_SPEC §1.2). QuickGELU is what OpenAI trained with; timm's plain
``vit_base_patch16_clip_224`` uses exact GELU and differs from the released tower by ~1e-3 already at a
tiny size, so the ``..._clip_quickgelu_...`` architectures are the ones used here.

Weights come from the Hugging Face Hub (``pretrained=True``, timm's ``.openai`` tags) or a local file
(:func:`load_tower_weights`): safetensors, a torch pickle read with ``weights_only=True``, or — only when
``allow_torchscript=True`` — OpenAI's own TorchScript ``.pt`` archive, which ``torch.load`` refuses.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import timm
import torch
from timm.layers import LayerNorm
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from prism_vfm.teachers.build import read_state_dict
from prism_vfm.utils.state_dict import check_keys
from prism_vfm.video.cache import TensorCache, state_fingerprint

HUB_TAG = "openai"  # timm's pretrained tag of OpenAI's CLIP weights


@dataclass(frozen=True)
class TowerConfig:
    """Geometry of a CLIP vision tower; ``timm_name`` is the timm architecture with hub weights for it."""

    patch_size: int
    width: int
    depth: int
    heads: int
    output_dim: int
    img_size: int = 224
    timm_name: str | None = None


CLIP_TOWERS: dict[str, TowerConfig] = {
    "ViT-B/16": TowerConfig(16, 768, 12, 12, 512, timm_name="vit_base_patch16_clip_quickgelu_224"),
    "ViT-L/14": TowerConfig(14, 1024, 24, 16, 768, timm_name="vit_large_patch14_clip_quickgelu_224"),
    # The VidPrism demo's CLIP stand-in (prism_vfm.video.demo.imagetext): 32-pixel frames, no hub weights.
    "demo": TowerConfig(4, 64, 2, 1, 64, img_size=32),  # one head per 64 channels, as CLIP's
}


def tower_config(tower: str | TowerConfig | Mapping[str, Any]) -> TowerConfig:
    """A :class:`TowerConfig` from a preset name (``"ViT-B/16"``, ``"ViT-L/14"``), a config or its dict."""
    if isinstance(tower, TowerConfig):
        return tower
    if isinstance(tower, Mapping):
        return TowerConfig(**tower)
    if tower not in CLIP_TOWERS:
        raise ValueError(
            f"unknown CLIP tower {tower!r}; expected one of {sorted(CLIP_TOWERS)} or a TowerConfig"
        )
    return CLIP_TOWERS[tower]


class FrameEncoder(nn.Module):
    """CLIP's vision tower applied to all B·T frames in one batch: (B, T, 3, H, W) → (B, T, D).

    Args:
        tower: ``"ViT-B/16"`` (D = 512), ``"ViT-L/14"`` (D = 768), or a :class:`TowerConfig`.
        img_size: frame side; defaults to the tower's (224). Other sizes resample the hub's positional
            table (timm's bicubic resampling).
        pretrained: load OpenAI's weights from the Hugging Face Hub (timm's ``<arch>.openai``).
        grad_checkpointing: recompute each block in the backward pass (timm's non-reentrant checkpoint),
            as the release does for every residual block.
    """

    def __init__(
        self,
        tower: str | TowerConfig = "ViT-B/16",
        *,
        img_size: int | None = None,
        pretrained: bool = False,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        cfg = tower_config(tower)
        if img_size is not None:
            cfg = TowerConfig(**{**asdict(cfg), "img_size": img_size})
        self.config = cfg
        geometry: dict[str, Any] = dict(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.width,
            depth=cfg.depth,
            num_heads=cfg.heads,
            num_classes=cfg.output_dim,
        )
        if pretrained:
            if cfg.timm_name is None:
                raise ValueError("pretrained=True needs a tower with hub weights (ViT-B/16 or ViT-L/14)")
            vit = cast(
                VisionTransformer,
                timm.create_model(f"{cfg.timm_name}.{HUB_TAG}", pretrained=True, **geometry),
            )
        else:
            # The keyword set of timm's ``vit_*_clip_quickgelu_224`` definitions.
            vit = VisionTransformer(
                **geometry,
                pre_norm=True,
                norm_layer=partial(LayerNorm, eps=1e-5),
                act_layer="quick_gelu",
            )
        # OpenAI's projection has no bias; timm's head does (zeros). A bias-free head keeps the parameter
        # count and the fine-tuned parameters those of the release.
        head = nn.Linear(cfg.width, cfg.output_dim, bias=False)
        with torch.no_grad():
            head.weight.copy_(cast(nn.Linear, vit.head).weight)
        vit.head = head
        self.tower: VisionTransformer = vit
        self.set_grad_checkpointing(grad_checkpointing)

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of keeping its activations."""
        self.tower.set_grad_checkpointing(enable)

    def freeze(self) -> FrameEncoder:
        """Frozen-backbone mode: no parameter takes a gradient and the tower runs in eval mode."""
        self.requires_grad_(False)
        return self.eval()

    def encode_frames(self, frames: Tensor) -> Tensor:
        """(N, 3, H, W) frames → (N, D) embeddings (class token → ln_post → projection)."""
        return self.tower(frames)

    def forward(self, frames: Tensor) -> Tensor:
        """(B, T, 3, H, W) clips → (B, T, D) per-frame embeddings; any T."""
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise ValueError(f"expected frames of shape (B, T, 3, H, W), got {tuple(frames.shape)}")
        side = self.config.img_size
        if tuple(frames.shape[-2:]) != (side, side):
            raise ValueError(
                f"frames are {frames.shape[-2]}x{frames.shape[-1]}, this encoder is built for {side}x{side} "
                "(build it with img_size=... to change)"
            )
        b, t = frames.shape[:2]
        return self.encode_frames(frames.flatten(0, 1)).view(b, t, -1)

    def fingerprint(self) -> str:
        """SHA-256 of the weights and geometry: identifies the features these weights compute."""
        return state_fingerprint(self.state_dict(), {"tower": asdict(self.config)})


# ---------------------------------------------------------------------------------------------- weights
class TorchScriptRefused(ValueError):
    """A TorchScript archive was given without ``allow_torchscript=True``."""


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a TorchScript zip (OpenAI's ``.pt`` release format): it holds compiled code."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def read_clip_state_dict(path: str | os.PathLike, *, allow_torchscript: bool = False) -> dict[str, Tensor]:
    """Tensors of a CLIP weight file, as float32.

    safetensors and torch pickles (``weights_only=True``) are read without executing anything. OpenAI's
    ``.pt`` files are TorchScript archives; reading one runs code stored in it, so it is done only with
    ``allow_torchscript=True`` (via ``torch.jit.load(...).state_dict()``).

    Raises:
        FileNotFoundError: the file does not exist (the message names the file and the folder looked in).
        TorchScriptRefused: a TorchScript archive without the opt-in.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP weight file {path.name!r} not found in {path.parent.resolve()} "
            "(pass an existing .safetensors/.pt file, or use the hub weights)"
        )
    if path.suffix != ".safetensors" and is_torchscript_archive(path):
        if not allow_torchscript:
            raise TorchScriptRefused(
                f"{path} is a TorchScript archive (OpenAI's release format); torch.load(weights_only=True) "
                "cannot read it and loading it executes code stored in the file. Pass "
                "allow_torchscript=True if you trust the file, or use the hub weights / a safetensors copy"
            )
        with warnings.catch_warnings():  # TorchScript's deprecation notice; reading its weights is the point
            warnings.simplefilter("ignore", FutureWarning)
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        state = read_state_dict(path)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def tower_state_dict(
    state: Mapping[str, Tensor], encoder: FrameEncoder, where: str = "the given state dict"
) -> dict[str, Tensor]:
    """``state`` in the encoder's own keys (``tower.*``).

    Accepts an OpenAI/open_clip CLIP state dict or a released ``model_state_dict`` (``visual.*`` or
    ``module.visual.*``; text entries and ``logit_scale`` are ignored), a timm state dict, or the encoder's
    own. The positional table is resampled when the file was trained at another size.
    """
    state = dict(state)
    if any(k.startswith("tower.") for k in state):
        state = {k[len("tower.") :]: v for k, v in state.items() if k.startswith("tower.")}
    converted = checkpoint_filter_fn(state, encoder.tower)
    bias = converted.pop("head.bias", None)
    if bias is not None and bool(bias.any()):
        raise ValueError(
            f"{where}: the projection has a non-zero bias (head.bias); the CLIP tower's projection has none"
        )
    return {f"tower.{k}": v for k, v in converted.items()}


def load_tower_weights(
    encoder: FrameEncoder,
    source: str | os.PathLike | Mapping[str, Tensor],
    *,
    allow_torchscript: bool = False,
) -> FrameEncoder:
    """Load CLIP vision weights (a file or a state dict, see :func:`tower_state_dict`) strictly."""
    state = (
        read_clip_state_dict(source, allow_torchscript=allow_torchscript)
        if isinstance(source, (str, os.PathLike))
        else dict(source)
    )
    where = str(source) if isinstance(source, (str, os.PathLike)) else "the given state dict"
    converted = tower_state_dict(state, encoder, where)
    check_keys(encoder.state_dict(), converted, f"CLIP vision weights from {where}")
    encoder.load_state_dict(converted)
    return encoder


def released_tower_state_dict(encoder: FrameEncoder) -> dict[str, Tensor]:
    """The encoder's weights in OpenAI's layout (``visual.*``), as in a released ``model_state_dict``."""
    renames = (
        ("patch_embed.proj", "conv1"),
        ("norm_pre", "ln_pre"),
        ("blocks.", "transformer.resblocks."),
        (".norm1", ".ln_1"),
        (".norm2", ".ln_2"),
        ("attn.qkv.", "attn.in_proj_"),
        ("attn.proj", "attn.out_proj"),
        ("mlp.fc1", "mlp.c_fc"),
        ("mlp.fc2", "mlp.c_proj"),
    )
    out: dict[str, Tensor] = {}
    for key, value in encoder.tower.state_dict().items():
        if key == "cls_token":
            key, value = "class_embedding", value.reshape(-1)
        elif key == "pos_embed":
            key, value = "positional_embedding", value[0]
        elif key == "head.weight":
            key, value = "proj", value.t()
        elif key.startswith("norm."):
            key = "ln_post." + key[len("norm.") :]
        else:
            for old, new in renames:
                key = key.replace(old, new)
        out[f"visual.{key}"] = value.detach().clone().contiguous()
    return out


# ------------------------------------------------------------------------------------ frozen features
FrameSource = Tensor | Callable[[list[int]], Tensor]


class FrameFeatureCache:
    """Frame features of a frozen encoder, computed once per clip and kept on disk (safetensors).

    Entries are keyed by the clip's identity (a string the caller chooses: file, frame indices, crop...)
    under a namespace of the encoder's weights fingerprint and the autocast precision, so other weights
    or another precision never read stale features. ``features`` encodes only the clips not yet cached;
    pass ``frames`` as a callable ``(positions) -> (n, T, 3, H, W)`` to decode only those clips.
    """

    def __init__(self, root: str | os.PathLike, encoder: FrameEncoder) -> None:
        self.root = Path(root)
        self.encoder = encoder
        self._fingerprint = encoder.fingerprint()
        self._stores: dict[str, TensorCache] = {}

    def _store(self, device: torch.device) -> TensorCache:
        precision = (
            str(torch.get_autocast_dtype(device.type)).replace("torch.", "")
            if torch.is_autocast_enabled(device.type)
            else "float32"
        )
        if precision not in self._stores:
            self._stores[precision] = TensorCache(
                self.root,
                f"frames-{self._fingerprint[:16]}-{precision}",
                {
                    "weights_sha256": self._fingerprint,
                    "tower": asdict(self.encoder.config),
                    "precision": precision,
                },
            )
        return self._stores[precision]

    def features(self, clip_ids: Sequence[str], frames: FrameSource) -> Tensor:
        """(B, T, D) features of the clips ``clip_ids``, from the cache or encoded now (and then cached)."""
        device = next(self.encoder.parameters()).device
        store = self._store(device)
        found = [store.get(c) for c in clip_ids]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            clips = frames(missing) if callable(frames) else frames[missing]
            if clips.shape[0] != len(missing):
                raise ValueError(f"the frame source gave {clips.shape[0]} clips for {len(missing)} positions")
            with torch.no_grad():
                encoded = self.encoder(clips.to(device)).float()
            for i, feats in zip(missing, encoded, strict=True):
                store.put(clip_ids[i], feats)
                found[i] = feats.cpu()
        return torch.stack([f for f in found if f is not None]).to(device)
