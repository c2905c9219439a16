"""``save_pretrained`` / ``from_pretrained`` (``config.json`` + ``model.safetensors``) for the models."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.constants import CONFIG_NAME, SAFETENSORS_SINGLE_FILE
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from prism_vfm.utils.io import read_safetensors_file


class HubMixin(PyTorchModelHubMixin):
    """huggingface_hub's mixin, loading strictly and through ``load_state_dict_resampled``.

    The mixin's own loader is non-strict; ours fails on any missing or unexpected entry, and lets the
    caller pass another ``img_size`` than the saved one (the position embedding is resampled from the saved
    grid, square or not). ``prism_vfm.models.load.load`` reads these folders too, with a load report.
    """

    def load_state_dict_resampled(self, state_dict: dict, strict: bool = True, assign: bool = False) -> Any:
        raise NotImplementedError

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs: Any,
    ) -> Any:
        def fetch(filename: str) -> str:
            if os.path.isdir(model_id):
                path = os.path.join(model_id, filename)
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{model_id} has no {filename} (not a save_pretrained folder)")
                return path
            return hf_hub_download(
                repo_id=model_id,
                filename=filename,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )

        config_file = os.path.join(model_id, CONFIG_NAME) if os.path.isdir(model_id) else fetch(CONFIG_NAME)
        saved = json.loads(Path(config_file).read_text()) if os.path.isfile(config_file) else {}
        state = read_safetensors_file(fetch(SAFETENSORS_SINGLE_FILE))
        model = cls(**model_kwargs)
        _resample_saved_grid(cast(nn.Module, model), state, saved.get("student_args", saved))
        model.load_state_dict_resampled({k: v.to(map_location) for k, v in state.items()}, strict=strict)
        # Every class using the mixin is an nn.Module.
        return cast(nn.Module, model).eval()


def _resample_saved_grid(model: nn.Module, state: dict[str, Tensor], saved: dict[str, Any]) -> None:
    """Resample the position embedding from the grid the saved config records (which may be non-square)
    to ``model``'s, in place."""
    student = cast(Any, getattr(model, "student", model))  # a PrismViT (timm VisionTransformer)
    key = "student.pos_embed" if student is not model else "pos_embed"
    pos, own = state.get(key), getattr(student, "pos_embed", None)
    if pos is None or own is None:  # no position embedding to resample (e.g. a VidPrism model)
        return
    grid = saved_grid(saved)
    # Compare grids, not shapes: 4x6 and 6x4 hold as many positions.
    if grid == tuple(student.patch_embed.grid_size):
        return
    state[key] = resample_abs_pos_embed(
        pos,
        new_size=list(student.patch_embed.grid_size),
        old_size=list(grid),
        num_prefix_tokens=student.num_prefix_tokens,
    )


def saved_grid(args: dict[str, Any]) -> tuple[int, int]:
    """The patch grid (rows, columns) of the position embedding that saved model arguments describe."""
    size, patch = args.get("img_size", 384), args.get("patch_size", 16)
    h, w = (size, size) if isinstance(size, int) else size
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    return int(h) // int(ph), int(w) // int(pw)
