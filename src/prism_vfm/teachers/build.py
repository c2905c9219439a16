"""Building a frozen teacher with its weights from the Hugging Face Hub, a local file, or none."""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

from torch import Tensor, nn

from prism_vfm.teachers.frozen import FrozenTeacher
from prism_vfm.teachers.registry import get_teacher_spec
from prism_vfm.teachers.spec import ImgSize, TeacherSpec
from prism_vfm.utils.io import CheckpointReadError, read_safetensors_file, read_torch_file
from prism_vfm.utils.state_dict import check_keys


def build_teacher(
    teacher: TeacherSpec | str,
    img_size: ImgSize,
    weights: str | os.PathLike[str] = "hub",
    *,
    bf16: bool = False,
    crop_padding: bool = False,
) -> FrozenTeacher:
    """A :class:`FrozenTeacher` for a student input of ``img_size``.

    Args:
        teacher: a spec or a registered name (``"dinov2_l"``, ``"clip_b"``, ``"sam_l"``, ...).
        img_size: the student's input size, a side or (H, W).
        weights: ``"hub"`` — timm's pretrained weights of the spec's tagged model, from the Hugging Face
            Hub; ``"none"`` — random initialisation (tests, speed benchmarks); a directory — the teacher's
            official file (``spec.files``) in it; a file — that file. Local files are read with
            ``torch.load(weights_only=True)``, or safetensors for ``.safetensors``, and converted to the
            model's keys by ``spec.checkpoint_filter`` (timm's own, which maps the original DINOv2, SAM and
            OpenAI CLIP layouts and resamples position embeddings).
        bf16, crop_padding: see :class:`FrozenTeacher`.

    Build under ``with torch.device("meta"):`` with ``weights="none"`` to get the geometry without memory.

    Raises:
        FileNotFoundError: no weight file in the directory; the message names the file, the directory and
            where to get it.
        ValueError: the file's keys or shapes do not match the model; the message lists some of them.
    """
    spec = get_teacher_spec(teacher) if isinstance(teacher, str) else teacher
    local = (
        None if isinstance(weights, str) and weights in ("hub", "none") else find_weights_file(spec, weights)
    )
    model = spec.builder(spec.model_img_size(img_size), weights == "hub")
    full_keys = set(model.state_dict())
    frozen = FrozenTeacher(spec, model, img_size, bf16=bf16, crop_padding=crop_padding)
    if local is not None:
        pruned = full_keys - set(frozen.model.state_dict())
        load_teacher_weights(frozen.model, local, spec, ignore=pruned)
    return frozen


def find_weights_file(spec: TeacherSpec, location: str | os.PathLike[str]) -> Path:
    """The weight file for ``spec``: ``location`` if it is a file, else the first of ``spec.files`` in it."""
    location = Path(location)
    if location.is_file():
        return location
    if not location.is_dir():
        raise FileNotFoundError(
            f"teacher {spec.name!r}: weights location {location} is neither a directory nor a file "
            "(weights must be 'hub', 'none', a directory or a file)"
        )
    if not spec.files:
        raise FileNotFoundError(
            f"teacher {spec.name!r} names no local weight file to look for in {location.resolve()}; "
            "pass the file itself, or weights='hub'"
        )
    for name in spec.files:
        if (location / name).is_file():
            return location / name
    raise FileNotFoundError(
        f"teacher {spec.name!r}: weight file {' or '.join(spec.files)} not found in directory "
        f"{location.resolve()}; to get it: {spec.source or 'the teacher spec gives no source'}"
    )


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Tensors of a checkpoint file (safetensors, or a torch pickle read with ``weights_only=True``).

    A training checkpoint's ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper is removed.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors_file(path)
    state = read_torch_file(path)
    if not isinstance(state, dict):
        raise CheckpointReadError(f"{path} holds a {type(state).__name__}, not a state dict")
    for wrapper in ("model", "state_dict"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return state


def load_teacher_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    spec: TeacherSpec,
    ignore: Collection[str] = (),
) -> None:
    """Load ``path`` into ``model`` through ``spec.checkpoint_filter``, requiring an exact key match.

    ``ignore`` names converted keys to drop first: those of the blocks, norm, neck and head that pruning
    removed, which a full checkpoint carries and the pruned model no longer has.
    """
    state = read_state_dict(path)
    if spec.checkpoint_filter is not None:
        state = spec.checkpoint_filter(state, model)
    state = {k: v for k, v in state.items() if k not in ignore}
    check_keys(model.state_dict(), state, f"teacher {spec.name!r}: {path} after key conversion")
    model.load_state_dict(state)
