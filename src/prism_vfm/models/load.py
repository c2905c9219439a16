"""One loader for every kind of weights the library reads, with a report of what was loaded.

``load(source)`` builds the model a source describes and fills it; ``load_into(model, source)`` fills a
model built elsewhere (a student initialised from a checkpoint). A source is any of:

- a training run folder (``checkpoints/`` inside): its latest checkpoint, ``step=N``, or ``step="best"``
  (the checkpoint of its best validation score);
- a checkpoint or ``save_pretrained`` folder (``config.json`` + ``model.safetensors``; Stage 1 or 2);
- an official PRISM ``.pth`` (Stage 1 or 2, told apart by its keys);
- a registered ``prism_vit_*`` name: alone, the architecture without weights (on the meta device);
  with a pretrained tag (``.augreg_in21k``, or a released PRISM checkpoint), the tag's weights;
- a weight file without an architecture (``.safetensors``, or a timm ViT ``.pth``): the architecture
  is given as ``model=`` (a registered name) or by the model handed to :func:`load_into`;
- a kind another model family registers with :func:`register_source_kind`: VidPrism
  (``prism_vfm.video.load``) registers its ``save_pretrained`` folders and released training checkpoints.

Every load compares the source's entries with the model's and returns a :class:`LoadReport`: entries
loaded, model entries the source lacks (missing) or holds in another shape (mismatched), and source
entries the model does not use (ignored). A missing or mismatched entry would leave part of the model at
its random initialisation, so the load raises :class:`LoadError` listing them unless the caller names
them in ``allow_fresh`` (patterns such as ``"projectors.*"``). The modules a plain ViT lacks (router, λ
gate, context tables, projectors) start fresh by design when a plain ViT initialises a student.
Files are read without executing code (safetensors, or ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import timm
import torch
from huggingface_hub import hf_hub_download
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from prism_vfm.compat.official import (
    infer_config,
    load_official,
    load_official_multitask,
    official_to_ours,
    read_official,
)
from prism_vfm.layers.net2net import resize_mlp_param
from prism_vfm.models.hub import saved_grid
from prism_vfm.models.multitask import PrismMultiTask
from prism_vfm.models.prism_vit import PrismViT
from prism_vfm.train.checkpoint import best_checkpoint, checkpoint_dir, latest_checkpoint
from prism_vfm.utils.io import read_safetensors_file, read_torch_file

# Modules a plain (dense) ViT does not have: they start fresh when one initialises a PRISM student.
DENSE_VIT_FRESH = (
    "blocks.*.lambda_gate.*",
    "blocks.*.moe.router.*",
    "teacher_embed.*",
    "task_embed.*",
    "projectors.*",
)
# The classifier of a timm ViT: a student has none.
_VIT_CLASSIFIER = ("head.*", "fc_norm.*", "head_drop.*")

# The authors' released checkpoints (Hugging Face Hub, robotyingtang/PRISM-VFM, folder checkpoints/) as
# pretrained tags of the registered students: tag → (file, input size it was trained at, what it holds).
RELEASE_REPO = "robotyingtang/PRISM-VFM"
RELEASED: dict[str, dict[str, tuple[str, tuple[int, int], str]]] = {
    "prism_vit_base_patch16_384": {
        "prism_stage1": ("checkpoints/prism_stage1_vit_b.pth", (384, 384), "Stage 1 (preset LB)"),
        "prism_stage2_pascal": (
            "checkpoints/prism_stage2_pascal_vit_b.pth",
            (512, 512),
            "Stage 2, PASCAL-Context",
        ),
        "prism_stage2_nyud": ("checkpoints/prism_stage2_nyud_vit_b.pth", (448, 576), "Stage 2, NYUD-v2"),
    },
    "prism_vit_large_patch16_384": {
        "prism_stage1": ("checkpoints/prism_stage1_vit_l.pth", (384, 384), "Stage 1 (preset LL)"),
        "prism_stage2_pascal": (
            "checkpoints/prism_stage2_pascal_vit_l.pth",
            (512, 512),
            "Stage 2, PASCAL-Context",
        ),
    },
}

_KINDS = (
    "a run folder (checkpoints/), a checkpoint or save_pretrained folder (config.json + "
    "model.safetensors), an official PRISM .pth or released VidPrism checkpoint, a registered prism_vit_* "
    "name (optionally with a pretrained tag), or a weight file with model= naming its architecture"
)


@dataclass(frozen=True)
class SourceKind:
    """A kind of checkpoint of another model family, which that family teaches :func:`load`.

    ``describes_folder(config)`` tells whether a folder's ``config.json`` is of this kind, and
    ``load_folder(folder, config, kind, allow_fresh, overrides)`` builds and fills the model;
    ``describes_file(contents)`` and ``load_file(contents, where, allow_fresh, overrides)`` do the same
    for what ``torch.load(weights_only=True)`` read from a file. Both loads return the model (eval mode)
    and its :class:`LoadReport`, and raise :class:`LoadError` as :func:`load` does (see
    :func:`fill_from_state`).
    """

    name: str
    describes_folder: Callable[[Mapping[str, Any]], bool]
    load_folder: Callable[
        [Path, dict[str, Any], str, Sequence[str], dict[str, Any]], tuple[nn.Module, LoadReport]
    ]
    describes_file: Callable[[Mapping[str, Any]], bool]
    load_file: Callable[[Mapping[str, Any], str, Sequence[str], dict[str, Any]], tuple[nn.Module, LoadReport]]


SOURCE_KINDS: dict[str, SourceKind] = {}


def register_source_kind(kind: SourceKind) -> SourceKind:
    """Teach :func:`load` a kind of checkpoint (the family's package registers it when imported)."""
    if kind.name in SOURCE_KINDS:
        raise ValueError(f"a source kind named {kind.name!r} is already registered")
    SOURCE_KINDS[kind.name] = kind
    return kind


class LoadError(ValueError):
    """A load that would leave model entries at their random initialisation; ``report`` says which."""

    def __init__(self, message: str, report: LoadReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class LoadReport:
    """What a load took from its source."""

    source: str
    kind: str  # "run checkpoint", "folder", "official Stage-1 .pth", "timm ViT", ...
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model entries the source lacks
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # source entries the model does not use
    resampled: list[str] = field(default_factory=list)  # position embeddings resampled to the model's grid
    by_design: list[str] = field(default_factory=list)  # fresh because the source kind never has them

    @property
    def fresh(self) -> list[str]:
        """Model entries that keep their initialisation (missing or mismatched)."""
        return sorted([*self.missing, *self.mismatched])

    def check(self, allow_fresh: Sequence[str] = ()) -> LoadReport:
        """Raise :class:`LoadError` unless every fresh entry is by design or matches ``allow_fresh``."""
        allowed = (*allow_fresh, *self.by_design)
        bad = [k for k in self.fresh if not any(fnmatch.fnmatchcase(k, p) for p in allowed)]
        if bad:
            parts = []
            missing = [k for k in bad if k in self.missing]
            if missing:
                parts.append(f"missing {_short(missing, 24)}")
            wrong = [k for k in bad if k in self.mismatched]
            if wrong:
                shapes = [f"{k} {self.mismatched[k][0]} (model: {self.mismatched[k][1]})" for k in wrong]
                parts.append(f"of another shape {_short(shapes, 24)}")
            raise LoadError(
                f"{self.source} ({self.kind}) does not fill the model: {'; '.join(parts)}. Name the entries "
                "that may start from their random initialisation in allow_fresh (e.g. 'projectors.*'; "
                "student.init_fresh / init_fresh in a training config)",
                self,
            )
        return self

    def summary(self) -> str:
        """One line for logs and the command line."""
        text = f"loaded {len(self.loaded)} entries from {self.source} ({self.kind})"
        if self.resampled:
            text += f"; resampled {', '.join(self.resampled)}"
        if self.fresh:
            text += f"; starting fresh: {_short(_group(self.fresh))}"
        if self.ignored:
            text += f"; not used by the model: {_short(self.ignored, 12)}"
        return text


def load(
    source: str | os.PathLike,
    *,
    step: int | str | None = None,
    model: str | None = None,
    img_size: int | Sequence[int] | None = None,
    multitask: bool | None = None,
    allow_fresh: Sequence[str] = (),
    **overrides: Any,
) -> tuple[nn.Module, LoadReport]:
    """The model a source describes, with its weights, and the :class:`LoadReport`.

    Args:
        source: see the module notes for the kinds.
        step: for a run folder, the checkpoint of that step, or ``"best"`` (default: the latest).
        model: the registered architecture of a bare weight file (``.safetensors``, timm ViT ``.pth``).
        img_size: build for this input size (H, W); position embeddings are resampled from the saved grid.
        multitask: ``None`` returns what the source holds (:class:`PrismMultiTask` for Stage 2, else
            :class:`PrismViT`); ``False`` the student alone (decoder heads reported as not used);
            ``True`` requires decoder heads.
        allow_fresh: patterns of model entries that may keep their initialisation.
        overrides: further :class:`PrismViT` arguments (e.g. ``top_k``, ``dispatch``); for a VidPrism
            source, further ``VidPrism`` arguments (e.g. ``text_tower``, ``frozen_backbone``).

    Returned in eval mode, on the CPU (a bare architecture name: on the meta device).
    """
    size = _size(img_size)
    extra: dict[str, Any] = {**overrides, **({"img_size": size} if size else {})}
    text = os.fspath(source)
    path = Path(text)
    if not path.exists():
        name, _, tag = text.partition(".")
        if name not in timm.list_models("prism_vit_*"):
            raise FileNotFoundError(f"{text} does not exist; expected {_KINDS}")
        return _load_registered(name, tag, multitask=multitask, allow_fresh=allow_fresh, **extra)
    if path.is_dir():
        folder, kind = _checkpoint_folder(path, step)
        config = _read_config(folder)
        for other in SOURCE_KINDS.values():
            if other.describes_folder(config):
                _no_decoder_heads(folder, other.name, multitask)
                return other.load_folder(folder, config, kind, allow_fresh, extra)
        return _load_folder(folder, config, kind, multitask, allow_fresh, extra)
    if path.suffix != ".safetensors":
        contents = read_torch_file(path)
        if isinstance(contents, Mapping):
            for other in SOURCE_KINDS.values():
                if other.describes_file(contents):
                    _no_decoder_heads(path, other.name, multitask)
                    return other.load_file(contents, str(path), allow_fresh, extra)
        state = _unwrap(contents)
        if _is_official(state):
            return _load_official(state, str(path), multitask, extra)
    else:
        state = read_safetensors_file(path)
    if model is None:
        raise ValueError(
            f"{path} holds weights without an architecture: pass model= a registered prism_vit_* name "
            "(or give a save_pretrained folder, which carries its config.json)"
        )
    if multitask:
        raise ValueError(f"{path} is a single weight file: it has no decoder heads for a multi-task model")
    build = partial(timm.create_model, model, pretrained=False, **extra)
    return _build_and_fill(build, state, str(path), "weight file", allow_fresh)


def load_into(
    model: PrismViT,
    source: str | os.PathLike,
    *,
    step: int | str | None = None,
    allow_fresh: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> LoadReport:
    """Fill ``model`` (a student built elsewhere) from any source that holds a student's weights.

    Official PRISM files, our folders and run checkpoints (Stage 1 or 2: the student part), and plain timm
    ViT weights (every FFN of a dual-stream block starts as the ViT's MLP) all convert to the model's
    entries; position embeddings are resampled. Raises :class:`LoadError` when an entry would stay at its
    initialisation and is not named in ``allow_fresh``. Entries matching ``exclude`` are not taken from
    the source (they keep the model's initialisation and are reported as not used).
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected {_KINDS}")
    grid = None
    if path.is_dir():
        folder, kind = _checkpoint_folder(path, step)
        config = _student_config(folder)
        grid = saved_grid(config.get("student_args", config))
        state = read_safetensors_file(folder / "model.safetensors")
        path = folder
    elif path.suffix == ".safetensors":
        state, kind = read_safetensors_file(path), "safetensors file"
    else:
        state, kind = _unwrap(read_torch_file(path)), "torch file"
        if _is_official(state):
            kind = f"official Stage-{read_official(state).stage} .pth"
    return _fill(model, state, str(path), kind, allow_fresh, grid, exclude)


def student_args(source: str | os.PathLike, step: int | str | None = None) -> dict[str, Any]:
    """The :class:`PrismViT` arguments of the student a folder, run or official ``.pth`` holds."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected {_KINDS}")
    if path.is_dir():
        config = _student_config(_checkpoint_folder(path, step)[0])
        if "student_args" in config:
            return {**config["student_args"], "num_tasks": len(config["tasks"])}
        return config
    state = _unwrap(read_torch_file(path))
    if not _is_official(state):
        raise ValueError(f"{path} is not an official PRISM checkpoint: it does not describe its architecture")
    return infer_config(read_official(state).student)


def adapt_state_dict(
    state_dict: Mapping[str, Tensor], model: PrismViT
) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Turn a student's state dict of any layout into ``model``'s entries.

    Returns the converted entries, the source entries that found no place in ``model`` (classifier head,
    decoder heads, unused official entries, dual-stream modules of blocks that are dense in ``model``), and
    the model entries that start fresh by design (the modules a plain ViT lacks, when the source is one).

    Layouts: ours (Stage 1, or Stage 2 with ``student.`` prefixes), official (Stage 1 or 2), plain timm ViT.
    A plain ViT's MLP in a dual-stream block is copied into the anchor, the shared expert and every routed
    expert (resized where their width differs); in a widened block it is Net2Net-tiled. A PRISM
    checkpoint's anchors initialise the MLPs of a student whose blocks there are dense or wide.
    """
    state = dict(_unwrap(dict(state_dict)))
    ignored: list[str] = []
    if _is_official(state):
        ckpt = read_official(state)
        ignored += sorted(ckpt.unused) + sorted(ckpt.heads)
        state = official_to_ours(ckpt.student)
    elif any(k.startswith("student.") for k in state):
        ignored += sorted(k for k in state if not k.startswith("student."))
        state = {k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")}
    dense_source = not any(re.match(r"^blocks\.\d+\.(anchor|moe)\.", k) for k in state)
    if not dense_source and all(i in model.moe_layers for i in _dual_stream_indices(state)):
        own = set(model.state_dict())
        return state, ignored + sorted(k for k in state if k not in own), []
    state = _anchors_as_mlps(state, model)
    own_state = model.state_dict()
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = re.match(r"^blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$", key)
        if m and int(m.group(1)) in model.moe_layers:
            block, fc, kind = int(m.group(1)), m.group(2), m.group(3)
            if f"blocks.{block}.anchor.{fc}.{kind}" in own_state:
                out[f"blocks.{block}.anchor.{fc}.{kind}"] = value
            hidden = own_state[f"blocks.{block}.moe.experts.w1"].shape[-1]
            value = resize_mlp_param(f"{fc}.{kind}", value, hidden)
            if f"blocks.{block}.moe.shared.{fc}.{kind}" in own_state:
                out[f"blocks.{block}.moe.shared.{fc}.{kind}"] = value
            name = f"blocks.{block}.moe.experts.{'w' if kind == 'weight' else 'b'}{fc[-1]}"
            value = value.t() if kind == "weight" else value
            out[name] = value.unsqueeze(0).expand_as(own_state[name]).clone()
        elif m and int(m.group(1)) in model.wide_layers:
            out[key] = resize_mlp_param(f"{m.group(2)}.{m.group(3)}", value, model.wide_hidden)
        elif key in own_state:
            out[key] = value
        else:
            ignored.append(key)
    by_design = [k for k in own_state if _matches(k, DENSE_VIT_FRESH)] if dense_source else []
    return out, ignored, by_design


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: PrismViT) -> dict[str, Tensor]:
    """timm's ``pretrained_filter_fn``: :func:`adapt_state_dict`, then the fresh-by-design modules filled
    with ``model``'s own initialisation; any other entry the source lacks is a :class:`LoadError`."""
    entries, report = _match(model, state_dict, "pretrained weights", "timm pretrained", None)
    report.check()
    full = dict(entries)
    own = model.state_dict()
    for key in report.fresh:
        full[key] = own[key]
    return full


# ---------------------------------------------------------------------------------------------- internals
def _load_registered(
    name: str, tag: str, *, multitask: bool | None, allow_fresh: Sequence[str], **kwargs: Any
) -> tuple[nn.Module, LoadReport]:
    if not tag:
        with torch.device("meta"):  # an architecture: parameter counts need no storage
            model = timm.create_model(name, pretrained=False, **kwargs)
        return model, LoadReport(name, "architecture without weights")
    if tag in RELEASED.get(name, {}):
        release = release_file(timm.models.get_pretrained_cfg(f"{name}.{tag}"))
        loaded, report = load(release, multitask=multitask, allow_fresh=allow_fresh, **kwargs)
        report.source = f"{name}.{tag} ({report.source})"
        return loaded, report
    model = timm.create_model(f"{name}.{tag}", pretrained=True, **kwargs)
    # checkpoint_filter_fn let only the modules a plain ViT lacks start fresh.
    fresh = [k for k in model.state_dict() if _matches(k, DENSE_VIT_FRESH)]
    taken = [k for k in model.state_dict() if k not in fresh]
    report = LoadReport(f"{name}.{tag}", "timm pretrained", loaded=taken, missing=fresh, by_design=fresh)
    return model.eval(), report


def _checkpoint_folder(path: Path, step: int | str | None) -> tuple[Path, str]:
    """The checkpoint folder a folder source names, and its kind."""
    if isinstance(step, str) and step != "best":
        raise ValueError(f"step={step!r}: expected a step number or 'best'")
    if checkpoint_dir(path).is_dir():
        if step == "best":
            best = best_checkpoint(path)
            if best is None:
                raise FileNotFoundError(
                    f"run {path} keeps no best checkpoint ({checkpoint_dir(path)}/best is missing: the run "
                    "had no validation, or no best_metric)"
                )
            return best, f"best run checkpoint {best.name}"
        if isinstance(step, int):
            folder = checkpoint_dir(path) / f"step_{step:08d}"
            if not (folder / "model.safetensors").is_file():
                found = sorted(p.name for p in checkpoint_dir(path).glob("step_*") if p.is_dir())
                raise FileNotFoundError(f"run {path} has no checkpoint of step {step} (it has {found})")
            return folder, f"run checkpoint {folder.name}"
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"run folder {path} has no complete checkpoint ({checkpoint_dir(path)})")
        return latest, f"run checkpoint {latest.name}"
    if step is not None:
        raise ValueError(f"step={step} names a checkpoint of a run, but {path} is not a run folder")
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json and model.safetensors; expected {_KINDS}")
    return path, "folder"


def _read_config(folder: Path) -> dict[str, Any]:
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json (not a checkpoint or save_pretrained folder)")
    try:
        return cast("dict[str, Any]", json.loads(file.read_text()))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None


def _student_config(folder: Path) -> dict[str, Any]:
    """The ``config.json`` of a folder that must hold a PRISM student (Stage 1 or 2)."""
    config = _read_config(folder)
    for other in SOURCE_KINDS.values():
        if other.describes_folder(config):
            raise ValueError(f"{folder} holds a {other.name} model, not a PRISM student")
    return config


def _no_decoder_heads(where: Path, family: str, multitask: bool | None) -> None:
    if multitask:
        raise ValueError(f"{where} holds a {family} model: it has no PRISM decoder heads (multitask=True)")


def _load_folder(
    folder: Path,
    config: dict[str, Any],
    kind: str,
    multitask: bool | None,
    allow_fresh: Sequence[str],
    extra: dict[str, Any],
) -> tuple[nn.Module, LoadReport]:
    state = read_safetensors_file(folder / "model.safetensors")
    build: Callable[[], nn.Module]
    if "student_args" in config:
        grid = saved_grid(config["student_args"])
        if multitask is False:
            args = {**config["student_args"], "num_tasks": len(config["tasks"]), **extra}
            build = partial(PrismViT, **args)
        else:
            build = partial(
                PrismMultiTask,
                {**config["student_args"], **extra},
                config["tasks"],
                subpixel_heads=config.get("subpixel_heads", ()),
            )
    else:
        if multitask:
            raise ValueError(f"{folder} holds a Stage-1 student, not a multi-task model (no decoder heads)")
        grid = saved_grid(config)
        build = partial(PrismViT, **{**config, **extra})
    return _build_and_fill(build, state, str(folder), kind, allow_fresh, grid)


def _build_and_fill(
    build: Callable[[], nn.Module],
    state: Mapping[str, Tensor],
    where: str,
    kind: str,
    allow_fresh: Sequence[str],
    grid: tuple[int, int] | None = None,
) -> tuple[nn.Module, LoadReport]:
    """``build()`` filled from ``state``: built on the meta device when the source fills every entry (no
    random initialisation to waste), else built for real and the allowed fresh entries keep their init."""
    with torch.device("meta"):
        model = build()
    entries, report = _match(model, state, where, kind, grid)
    if not report.fresh and report.loaded:
        model.load_state_dict(entries, strict=True, assign=True)
        return model.eval(), report
    model = build()
    return model.eval(), _fill(model, state, where, kind, allow_fresh, grid)


def _load_official(
    state: dict[str, Any], where: str, multitask: bool | None, extra: dict[str, Any]
) -> tuple[nn.Module, LoadReport]:
    ckpt = read_official(state)
    kind = f"official Stage-{ckpt.stage} .pth"
    ignored = sorted(ckpt.unused)
    if ckpt.stage == 2 and multitask is not False:
        model: nn.Module = load_official_multitask(state, **extra)
    elif multitask:
        raise ValueError(f"{where} is an official Stage-1 checkpoint: it has no decoder heads")
    else:
        model = load_official(state, **extra)
        ignored += sorted(ckpt.heads)
    # The official loaders are strict: every model entry came from the file.
    report = LoadReport(where, kind, loaded=list(model.state_dict()), ignored=ignored)
    if cast(PrismViT, getattr(model, "student", model)).patch_embed.grid_size != _square_grid(state):
        report.resampled.append("pos_embed")
    return model, report


def _square_grid(state: Mapping[str, Tensor]) -> tuple[int, int]:
    key = next(k for k in state if k.endswith("backbone.pos_embed"))
    side = int(round((state[key].shape[1] - 1) ** 0.5))
    return side, side


def fill_from_state(
    model: nn.Module, state: Mapping[str, Tensor], where: str, kind: str, allow_fresh: Sequence[str] = ()
) -> LoadReport:
    """Fill ``model`` from ``state`` (entries already in the model's names) and report what was loaded.

    Raises :class:`LoadError` when no entry fits, or when a model entry would keep its initialisation
    (missing from ``state`` or of another shape) and is not named in ``allow_fresh``. PRISM students
    (:class:`PrismViT`, :class:`PrismMultiTask`) also take any student layout :func:`adapt_state_dict` reads.
    """
    return _fill(model, state, where, kind, allow_fresh)


def _fill(
    model: nn.Module,
    state: Mapping[str, Tensor],
    where: str,
    kind: str,
    allow_fresh: Sequence[str],
    grid: tuple[int, int] | None = None,
    exclude: Sequence[str] = (),
) -> LoadReport:
    entries, report = _match(model, state, where, kind, grid, exclude)
    if not report.loaded:
        what = "ViT / PRISM" if isinstance(model, (PrismViT, PrismMultiTask)) else type(model).__name__
        raise LoadError(
            f"{where} is not a {what} state dict for this model: none of its entries fits "
            f"(its first keys: {_short(sorted(state), 5)})",
            report,
        )
    report.check(allow_fresh)
    model.load_state_dict(entries, strict=False)
    return report


def _match(
    model: nn.Module,
    state: Mapping[str, Tensor],
    where: str,
    kind: str,
    grid: tuple[int, int] | None,
    exclude: Sequence[str] = (),
) -> tuple[dict[str, Tensor], LoadReport]:
    """Entries of ``state`` that fit ``model`` (converted, position embeddings resampled) and the report."""
    state = _unwrap(dict(state))
    student: PrismViT | None
    if isinstance(model, PrismMultiTask):
        student_state = {k: v for k, v in state.items() if not k.startswith("heads.")}
        converted, ignored, by_design = adapt_state_dict(student_state, model.student)
        converted = {f"student.{k}": v for k, v in converted.items()}
        converted.update({k: v for k, v in state.items() if k.startswith("heads.")})
        by_design = [f"student.{k}" for k in by_design]
        student = model.student
        pos_key = "student.pos_embed"
    elif isinstance(model, PrismViT):
        student = model
        converted, ignored, by_design = adapt_state_dict(state, student)
        pos_key = "pos_embed"
    else:  # another family's model: the state is in its names already, resampled by its loader
        student, pos_key = None, ""
        converted, ignored, by_design = dict(state), [], []
    own = model.state_dict()
    report = LoadReport(where, kind, ignored=sorted(ignored), by_design=by_design)
    out: dict[str, Tensor] = {}
    for key, value in converted.items():
        target = own.get(key)
        if target is None or _matches(key, exclude):
            report.ignored.append(key)
            continue
        if key == pos_key and student is not None and _resamples(value, target, student, grid):
            value = _resample(value, student, grid)
            report.resampled.append(key)
        if value.shape != target.shape:
            report.mismatched[key] = (tuple(value.shape), tuple(target.shape))
            continue
        out[key] = value
        report.loaded.append(key)
    report.missing = sorted(k for k in own if k not in out and k not in report.mismatched)
    return out, report


def _resamples(value: Tensor, target: Tensor, student: PrismViT, grid: tuple[int, int] | None) -> bool:
    """Whether a saved position embedding needs resampling to ``student``'s grid."""
    # Compare grids, not only shapes: a 4x6 grid and a 6x4 one hold as many positions.
    regrid = grid is not None and grid != tuple(student.patch_embed.grid_size)
    return (value.shape != target.shape or regrid) and value.shape[-1] == target.shape[-1]


def _resample(pos: Tensor, model: PrismViT, grid: tuple[int, int] | None) -> Tensor:
    """``pos`` (1, prefix + h·w, D) resampled (timm's bicubic) to ``model``'s patch grid; the saved grid is
    ``grid`` when the source records it (our folders), else square (official files, timm ViTs)."""
    n = pos.shape[1] - model.num_prefix_tokens
    if grid is None or grid[0] * grid[1] != n:
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"cannot tell the patch grid of a position embedding with {n} positions")
        grid = (side, side)
    return resample_abs_pos_embed(
        pos,
        new_size=list(model.patch_embed.grid_size),
        old_size=list(grid),
        num_prefix_tokens=model.num_prefix_tokens,
    )


def _unwrap(state: Any) -> dict[str, Any]:
    """A state dict out of ``{"model": ...}`` / ``{"state_dict": ...}`` wrappers (training checkpoints)."""
    if not isinstance(state, Mapping):
        raise ValueError(f"expected a state dict, got a {type(state).__name__}")
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), Mapping):
            return dict(state[key])
    return dict(state)


def _is_official(state: Mapping[str, Any]) -> bool:
    return any(k.startswith(("backbone.pos_embed", "backbone.backbone.")) for k in state)


def _dual_stream_indices(state: Mapping[str, Tensor]) -> set[int]:
    return {int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.anchor\.", k))}


def _anchors_as_mlps(state: Mapping[str, Tensor], model: PrismViT) -> dict[str, Tensor]:
    """``blocks.{i}.anchor.*`` renamed ``blocks.{i}.mlp.*`` where ``model``'s block ``i`` is dense."""
    out = {}
    for key, value in state.items():
        m = re.match(r"^blocks\.(\d+)\.anchor\.(.*)$", key)
        if m is not None and int(m.group(1)) not in model.moe_layers:
            out[f"blocks.{m.group(1)}.mlp.{m.group(2)}"] = value
        else:
            out[key] = value
    return out


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _group(keys: Sequence[str]) -> list[str]:
    """Keys with their parameter name dropped, deduplicated: ``projectors.0.1.*`` for its four tensors."""
    out: dict[str, None] = {}
    for key in keys:
        head, _, _ = key.rpartition(".")
        out[f"{head}.*" if head else key] = None
    return list(out)


def _short(keys: Sequence[str], limit: int = 8) -> str:
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _size(img_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if img_size is None:
        return None
    if isinstance(img_size, int):
        return img_size, img_size
    h, w = (int(s) for s in img_size)
    return h, w


def is_released_tag(name: str) -> bool:
    """Whether ``name`` is a registered student with the tag of a released checkpoint."""
    model, _, tag = name.partition(".")
    return tag in RELEASED.get(model, {})


def release_file(cfg: Any, cache_dir: str | os.PathLike | None = None) -> Path:
    """The weight file a pretrained tag's configuration (timm ``PretrainedCfg``) names: its ``file``
    (e.g. set with ``pretrained_cfg_overlay=dict(file=...)``), else its Hub file, downloaded once."""
    if cfg.file:
        return Path(cfg.file)
    if not cfg.hf_hub_id or not cfg.hf_hub_filename:
        raise ValueError(f"pretrained tag {cfg.architecture}.{cfg.tag} names no file and no Hub file")
    cache = Path(cache_dir) if cache_dir is not None else None
    return Path(hf_hub_download(repo_id=cfg.hf_hub_id, filename=cfg.hf_hub_filename, cache_dir=cache))
