"""Load and export the authors' released checkpoints (SPEC §11).

Released files are torch pickles ``{"model": state_dict}``; they are read with ``weights_only=True``
so that opening one never executes code. Stage-1 files hold the student; Stage-2 files prefix it with
``backbone.`` and add the decoder heads under ``heads.<task>.``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prism_vfm.data.registry import DATASETS
from prism_vfm.models.multitask import PrismMultiTask
from prism_vfm.models.prism_vit import PrismViT
from prism_vfm.utils.io import atomic_torch_save, read_torch_file

logger = logging.getLogger(__name__)

# Width → heads of the standard ViT sizes (head width 64); the checkpoint does not store the head count.
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}

# Official entries that no forward pass reads; accepted on load and reported once.
UNUSED_SUFFIXES = ("moe_ffn_layer.ortho_loss_weight", "moe_ffn_layer.variance_loss_weight")
UNUSED_KEYS = ("task_free_condition_embeddings.weight", "task_composer_weights")

# Renames inside a dual-stream block: official → ours.
_BLOCK_RENAMES = (
    ("standard_ffn.", "anchor."),
    ("gate_linear.", "lambda_gate."),
    ("moe_ffn_layer.router.film_layer.to_gamma_beta.", "moe.router.film."),
    ("moe_ffn_layer.router.W_gate_stage1.", "moe.router.input_gate."),
    ("moe_ffn_layer.router.W_g_base.", "moe.router.gate."),
    ("moe_ffn_layer.router.W_noise.", "moe.router.noise."),
    ("moe_ffn_layer.shared_expert.", "moe.shared."),
)
_EXPERT_KEY = re.compile(r"^blocks\.(\d+)\.moe_ffn_layer\.experts\.(\d+)\.(fc[12])\.(weight|bias)$")
_PROJ_KEY = re.compile(r"^vfm_projection_heads\.(\d+)_(\d+)\.net\.([02])\.(weight|bias)$")


class OfficialCheckpointError(ValueError):
    """An official checkpoint that does not have the expected layout."""


@dataclass
class OfficialCheckpoint:
    """A released state dict split into its parts."""

    stage: int
    student: dict[str, Tensor]  # official student keys without the Stage-2 ``backbone.`` prefix
    heads: dict[str, Tensor] = field(default_factory=dict)  # ``heads.<task>....`` entries (Stage 2)
    unused: dict[str, Tensor] = field(default_factory=dict)


def read_official(source: str | os.PathLike | Mapping[str, Any]) -> OfficialCheckpoint:
    """Read an official checkpoint (path or state dict, optionally wrapped in ``{"model": ...}``)."""
    if isinstance(source, Mapping):
        state = source
        where = "the given state dict"
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"official checkpoint {path} does not exist")
        state = read_torch_file(path)
    if not isinstance(state, Mapping):
        raise OfficialCheckpointError(f"{where} holds a {type(state).__name__}, not a state dict")
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    if not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise OfficialCheckpointError(
            f"{where} is not a state dict of tensors (or a {{'model': state_dict}})"
        )
    state = dict(state)
    stage2 = any(k.startswith("backbone.backbone.") for k in state)
    prefix = "backbone." if stage2 else ""
    if not any(k.startswith(prefix + "backbone.pos_embed") for k in state):
        raise OfficialCheckpointError(
            f"{where} is not a PRISM checkpoint: no '{prefix}backbone.pos_embed' entry "
            f"(first keys: {sorted(state)[:5]})"
        )
    ckpt = OfficialCheckpoint(stage=2 if stage2 else 1, student={})
    for key, value in state.items():
        if stage2 and key.startswith("heads."):
            ckpt.heads[key] = value
            continue
        if stage2:
            if not key.startswith(prefix):
                raise OfficialCheckpointError(f"unexpected entry {key!r} in Stage-2 checkpoint {where}")
            key = key[len(prefix) :]
        if key in UNUSED_KEYS or key.endswith(UNUSED_SUFFIXES):
            ckpt.unused[key] = value
        else:
            ckpt.student[key] = value
    return ckpt


def infer_config(
    student: Mapping[str, Tensor], img_size: tuple[int, int] | None = None, num_heads: int | None = None
) -> dict[str, Any]:
    """Constructor arguments of :class:`PrismViT` that reproduce an official student's architecture.

    The head count is not stored in a checkpoint: it follows the standard ViT sizes unless given.
    """
    try:
        pos = student["backbone.pos_embed"]
        proj = student["backbone.patch_embed.proj.weight"]
    except KeyError as exc:
        raise OfficialCheckpointError(f"official student is missing {exc.args[0]!r}") from None
    dim, patch = proj.shape[0], proj.shape[-1]
    blocks = {int(m.group(1)) for k in student if (m := re.match(r"backbone\.blocks\.(\d+)\.", k))}
    moe_layers = sorted(
        {int(m.group(1)) for k in student if (m := re.match(r"backbone\.blocks\.(\d+)\.moe_ffn", k))}
    )
    if not moe_layers:
        raise OfficialCheckpointError(
            "official student has no dual-stream block (no 'moe_ffn_layer' entries)"
        )
    first = moe_layers[0]
    experts = {int(m.group(2)) for k in student if (m := _EXPERT_KEY.match(k.removeprefix("backbone.")))}
    fc1 = student[f"backbone.blocks.{first}.moe_ffn_layer.experts.0.fc1.weight"]
    mlp = student.get(
        "backbone.blocks.0.mlp.fc1.weight", student[f"backbone.blocks.{first}.standard_ffn.fc1.weight"]
    )
    teachers = student.get("vfm_condition_embeddings.weight")
    tasks = student.get("task_condition_embeddings.weight")
    proj_dims: dict[int, int] = {}
    for k, v in student.items():
        m = _PROJ_KEY.match(k)
        if m and m.group(3) == "2" and m.group(4) == "weight":
            proj_dims[int(m.group(1))] = v.shape[0]
    n_teachers = teachers.shape[0] if teachers is not None else len(proj_dims)
    if proj_dims and sorted(proj_dims) != list(range(n_teachers)):
        raise OfficialCheckpointError(
            f"projector heads cover teachers {sorted(proj_dims)}, expected 0..{n_teachers - 1}"
        )
    if img_size is None:
        side = int(round((pos.shape[1] - 1) ** 0.5)) * patch
        img_size = (side, side)
    if num_heads is None and dim not in HEADS_BY_WIDTH:
        raise OfficialCheckpointError(
            f"ViT width {dim} is not a standard size: pass num_heads= to say how many attention heads it has"
        )
    return dict(
        img_size=tuple(img_size),
        patch_size=patch,
        embed_dim=dim,
        depth=max(blocks) + 1,
        num_heads=num_heads or HEADS_BY_WIDTH[dim],
        mlp_ratio=mlp.shape[0] / dim,
        moe_layers=tuple(moe_layers),
        teacher_dims=tuple(proj_dims[t] for t in range(n_teachers)) if proj_dims else (dim,) * n_teachers,
        projectors=bool(proj_dims),
        num_tasks=tasks.shape[0] if tasks is not None else 0,  # 0 rows in Stage-1 files
        num_experts=len(experts),
        expert_mlp_ratio=fc1.shape[0] / dim,
        shared_expert=f"backbone.blocks.{first}.moe_ffn_layer.shared_expert.fc1.weight" in student,
        noisy_gating=f"backbone.blocks.{first}.moe_ffn_layer.router.W_noise.weight" in student,
    )


def official_to_ours(student: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename and restack an official student state dict into :class:`PrismViT` keys."""
    out: dict[str, Tensor] = {}
    experts: dict[tuple[int, str, str], dict[int, Tensor]] = {}
    for key, value in student.items():
        if key == "vfm_condition_embeddings.weight":
            out["teacher_embed.weight"] = value
        elif key == "task_condition_embeddings.weight":
            if value.numel():  # Stage-1 files carry an empty (0, D) task table
                out["task_embed.weight"] = value
        elif m := _PROJ_KEY.match(key):
            out[f"projectors.{m.group(1)}.{m.group(2)}.{m.group(3)}.{m.group(4)}"] = value
        elif key.startswith("backbone."):
            k = key[len("backbone.") :]
            if m := _EXPERT_KEY.match(k):
                experts.setdefault((int(m.group(1)), m.group(3), m.group(4)), {})[int(m.group(2))] = value
                continue
            for old, new in _BLOCK_RENAMES:
                k = re.sub(rf"^(blocks\.\d+\.){re.escape(old)}", rf"\g<1>{new}", k)
            out[k] = value
        else:
            out[key] = value  # reported as unexpected by the strict load
    for (block, fc, kind), per_expert in experts.items():
        if sorted(per_expert) != list(range(len(per_expert))):
            raise OfficialCheckpointError(
                f"block {block}: experts {sorted(per_expert)} are not numbered 0..E-1"
            )
        stacked = torch.stack([per_expert[e] for e in range(len(per_expert))])
        name = {"fc1": "1", "fc2": "2"}[fc]
        # nn.Linear stores (out, in); our stacked experts are (E, in, out).
        out[f"blocks.{block}.moe.experts.{'w' if kind == 'weight' else 'b'}{name}"] = (
            stacked.transpose(1, 2).contiguous() if kind == "weight" else stacked
        )
    return out


def ours_to_official(model: PrismViT) -> dict[str, Tensor]:
    """The official Stage-1 student state dict of ``model`` (inverse of :func:`official_to_ours`)."""
    unsupported = {
        "moe_layers": () if not model.moe_layers else None,
        "wide_layers": model.wide_layers or None,
        "anchor": False if any(b.anchor is None for b in model.dual_stream_blocks) else None,
        "conditioning": model.moe_config.conditioning if model.moe_config.conditioning != "film" else None,
    }
    unsupported = {k: v for k, v in unsupported.items() if v is not None}
    if unsupported:
        raise ValueError(
            "the official layout holds dual-stream blocks with an anchor and a FiLM router only; this model "
            f"has {', '.join(f'{k}={v!r}' for k, v in unsupported.items())} (keep it in our format)"
        )
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key == "teacher_embed.weight":
            out["vfm_condition_embeddings.weight"] = value
        elif key == "task_embed.weight":
            out["task_condition_embeddings.weight"] = value
        elif m := re.match(r"^projectors\.(\d+)\.(\d+)\.([02])\.(weight|bias)$", key):
            out[f"vfm_projection_heads.{m.group(1)}_{m.group(2)}.net.{m.group(3)}.{m.group(4)}"] = value
        elif m := re.match(r"^blocks\.(\d+)\.moe\.experts\.([wb])([12])$", key):
            block, kind, fc = m.groups()
            for e, v in enumerate(value):
                suffix = "weight" if kind == "w" else "bias"
                out[f"backbone.blocks.{block}.moe_ffn_layer.experts.{e}.fc{fc}.{suffix}"] = (
                    v.t().contiguous() if kind == "w" else v.clone()
                )
        else:
            k = key
            for old, new in _BLOCK_RENAMES:
                k = re.sub(rf"^(blocks\.\d+\.){re.escape(new)}", rf"\g<1>{old}", k)
            out["backbone." + k] = value
    for i in model.moe_layers:
        out[f"backbone.blocks.{i}.moe_ffn_layer.ortho_loss_weight"] = torch.tensor(0.01)
        out[f"backbone.blocks.{i}.moe_ffn_layer.variance_loss_weight"] = torch.tensor(1.0)
    out.setdefault("task_condition_embeddings.weight", torch.zeros(0, model.embed_dim))
    out["task_free_condition_embeddings.weight"] = torch.zeros(1, model.embed_dim)
    out["task_composer_weights"] = torch.zeros(model.num_tasks, 3)
    return out


def load_official(
    source: str | os.PathLike | Mapping[str, Any],
    img_size: int | tuple[int, int] | None = None,
    **overrides: Any,
) -> PrismViT:
    """Build a :class:`PrismViT` from an official PRISM checkpoint with identical behaviour.

    Args:
        source: path to a released ``.pth`` (read with ``weights_only=True``), or its state dict, Stage-1
            or Stage-2 layout (detected from the keys), optionally wrapped as ``{"model": ...}``.
        img_size: input size (H, W) to build for; the position embedding is resampled bicubically when it
            differs from the checkpoint's. Default: the checkpoint's own (square) size.
        overrides: further :class:`PrismViT` arguments, e.g. ``top_k`` or ``dispatch`` (the checkpoint does
            not record top-k; the released models use 3).

    Stage-2 decoder heads are not part of the student; :func:`read_official` returns them separately.
    """
    ckpt = read_official(source)
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    config = infer_config(ckpt.student, img_size, overrides.pop("num_heads", None))
    config.update(overrides)
    # Built on the meta device: every value comes from the checkpoint, so random init would be wasted work.
    with torch.device("meta"):
        model = PrismViT(**config)
    state = official_to_ours(ckpt.student)
    targets = model.state_dict()
    expected = set(targets)
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise OfficialCheckpointError(
            "official checkpoint does not match the PRISM student it describes: "
            f"missing {_short(missing)}; unexpected {_short(unexpected)}"
        )
    for key, value in state.items():
        target = targets[key]
        if key != "pos_embed" and value.shape != target.shape:
            raise OfficialCheckpointError(
                f"{key}: shape {tuple(value.shape)} does not match {tuple(target.shape)}"
            )
    model.load_state_dict_resampled(state, strict=True, assign=True)
    ignored = sorted(ckpt.unused)
    if ckpt.heads:
        ignored.append(f"heads of tasks {sorted({k.split('.')[1] for k in ckpt.heads})}")
    logger.info(
        "loaded official Stage-%d checkpoint; entries not used by the student: %s", ckpt.stage, ignored
    )
    return model.eval()


def export_official(model: PrismViT, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The official Stage-1 layout ``{"model": state_dict}`` of ``model``; written atomically if ``path``."""
    checkpoint = {"model": ours_to_official(model)}
    if path is not None:
        atomic_torch_save(checkpoint, path)
    return checkpoint


def _short(keys: list[str], limit: int = 12) -> str:
    if not keys:
        return "none"
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_official_multitask(
    source: str | os.PathLike | Mapping[str, Any],
    img_size: int | tuple[int, int] | None = None,
    tasks: Sequence[str] | None = None,
    **overrides: Any,
) -> PrismMultiTask:
    """Build a :class:`PrismMultiTask` from an official Stage-2 checkpoint (student and decoder heads).

    Task ids are positions in ``tasks``; by default the released order of the data set whose task names
    the heads match (PASCAL: semseg, human_parts, normals, edge, sal; NYUD: semseg, normals, edge, depth).
    """
    ckpt = read_official(source)
    if ckpt.stage != 2:
        raise OfficialCheckpointError("a Stage-1 checkpoint has no decoder heads: use load_official() for it")
    found = list(dict.fromkeys(k.split(".")[1] for k in ckpt.heads))
    if tasks is None:
        known = [list(d.tasks) for d in DATASETS.values() if sorted(d.tasks) == sorted(found)]
        tasks = known[0] if known else found
    if sorted(tasks) != sorted(found):
        raise OfficialCheckpointError(f"checkpoint has heads for {found}, not for tasks {list(tasks)}")
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    config = infer_config(ckpt.student, img_size, overrides.pop("num_heads", None))
    config.update(overrides)
    config.pop("num_tasks")
    channels = {t: ckpt.heads[f"heads.{t}.last_conv.weight"].shape[0] for t in tasks}
    with torch.device("meta"):
        model = PrismMultiTask(config, channels)
    state = {f"student.{k}": v for k, v in official_to_ours(ckpt.student).items()}
    state.update(ckpt.heads)
    targets = model.state_dict()
    missing, unexpected = sorted(set(targets) - set(state)), sorted(set(state) - set(targets))
    if missing or unexpected:
        raise OfficialCheckpointError(
            f"official Stage-2 checkpoint does not match its model: missing {_short(missing)}; "
            f"unexpected {_short(unexpected)}"
        )
    model.load_state_dict_resampled(state, strict=True, assign=True)
    logger.info(
        "loaded official Stage-2 checkpoint (tasks %s); unused entries: %s", list(tasks), sorted(ckpt.unused)
    )
    return model.eval()
