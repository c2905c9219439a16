"""Rebuild official state dicts from the fixtures' deterministic weight recipe (no weights are shipped)."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch

from tests.conftest import load_json

_KEEP = {
    "num_batches_tracked": torch.tensor(0),
    "ortho_loss_weight": torch.tensor(0.01),
    "variance_loss_weight": torch.tensor(1.0),
}


def _recipe_module(folder: Path):
    spec = importlib.util.spec_from_file_location(f"recipe_{folder.name}", folder / "recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def recipe_entries(folder: Path, check_hashes: bool = True) -> list[tuple[dict, torch.Tensor]]:
    """Each entry of a fixture's ``state_dict_keys.json`` with the value its weight recipe gives it.

    An entry the recipe keeps holds the official initialisation: its ``keep_value`` where the fixture
    records one, else the known constant of its kind (``_KEEP``), else zeros.
    """
    recipe = _recipe_module(folder)
    out = []
    for e in load_json(folder / "state_dict_keys.json")["entries"]:
        key, shape = e["key"], tuple(e["shape"])
        dtype = torch.int64 if e["dtype"] == "int64" else torch.float32
        if "keep_value" in e:
            own = torch.full(shape, float(e["keep_value"]), dtype=dtype)
        else:
            own = next((v for s, v in _KEEP.items() if key.endswith(s)), None)
            own = torch.zeros(shape, dtype=dtype) if own is None else own.to(dtype)
        value = recipe.recipe_value(key, shape, own)
        if check_hashes:
            assert sha256(value) == e["sha256"], f"recipe value of {key} does not match the fixture hash"
        out.append((e, value))
    return out


def official_state_dict(folder: Path, check_hashes: bool = True) -> dict[str, torch.Tensor]:
    """The exact state dict the fixture generator loaded into the official model."""
    return {e["key"]: value for e, value in recipe_entries(folder, check_hashes)}
