"""``save_pretrained`` / ``from_pretrained`` (``config.json`` + ``model.safetensors``) for the models."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.constants import SAFETENSORS_SINGLE_FILE
from safetensors.torch import load_file
from torch import nn


class HubMixin(PyTorchModelHubMixin):
    """huggingface_hub's mixin, loading strictly and through ``load_state_dict_resampled``.

    The mixin's own loader is non-strict; ours fails on any missing or unexpected entry, and lets the
    caller pass another ``img_size`` than the saved one (the position embedding is resampled).
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
        if os.path.isdir(model_id):
            path = os.path.join(model_id, SAFETENSORS_SINGLE_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{model_id} has no {SAFETENSORS_SINGLE_FILE}; expected a save_pretrained folder"
                )
        else:
            path = hf_hub_download(
                repo_id=model_id,
                filename=SAFETENSORS_SINGLE_FILE,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
        model = cls(**model_kwargs)
        model.load_state_dict_resampled(load_file(path, device=str(map_location)), strict=strict)
        # Every class using the mixin is an nn.Module.
        return cast(nn.Module, model).eval()
