"""The VidPrism reference fixtures kept in the repository (``tests/fixtures/vidprism_official``).

They hold reference tensors computed by the released VidPrism code and the recipe that regenerates its
weights (no weights are shipped); see the README of that folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from prism_vfm.video import VidPrismHead, load_official_head
from prism_vfm.video.official import to_head_key
from tests.official_helpers import official_state_dict, sha256

VIDEO_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "vidprism_official"


def folder(name: str) -> Path:
    path = VIDEO_FIXTURES / name
    assert path.is_dir(), f"fixture folder {path} is missing"
    return path


def manifest(name: str) -> dict:
    return json.loads((folder(name) / "manifest.json").read_text())


def reference(name: str) -> dict[str, torch.Tensor]:
    """Every stored tensor of a fixture, checked against its SHA-256 in the manifest."""
    tensors = load_file(str(folder(name) / "reference.safetensors"))
    for key, entry in manifest(name)["tensors"].items():
        if entry["file"] == "reference.safetensors":
            assert sha256(tensors[key]) == entry["sha256"], f"{name}/{key} does not match its SHA-256"
    return tensors


def released_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The released-name state dict the fixture generator loaded (recipe values, hashes checked)."""
    return official_state_dict(folder(name))


def released_head(name: str) -> VidPrismHead:
    """The head of a fixture, built and loaded by :func:`load_official_head` (eval mode)."""
    return load_official_head(released_state_dict(name))


def dbi_case_state_dict(case: str) -> dict[str, torch.Tensor]:
    """The DBI module's weights of one ``dbi_threshold_cases`` case, under our head's key names."""
    base = released_state_dict("dbi_threshold_cases")
    overrides = manifest("dbi_threshold_cases")["info"]["cases"][case]["overrides"]
    for key, spec in overrides.items():
        text = spec["value"]
        if (
            full := re.fullmatch(r"torch\.full\(\(1,\), (-?[\d.]+), dtype=torch\.float32\)", text)
        ) is not None:
            value = torch.full((1,), float(full.group(1)), dtype=torch.float32)
        else:
            factor = re.fullmatch(r"([\d.]+) \* recipe value", text)
            assert factor is not None, f"unknown override {text!r}"
            value = float(factor.group(1)) * base[key]
        assert sha256(value) == spec["sha256"], f"override of {key} in {case} does not match its SHA-256"
        base[key] = value
    ours = {}
    for key, value in base.items():
        mapped = to_head_key("dynamic_interaction." + key)
        assert mapped is not None and mapped.startswith("dbi."), key
        ours[mapped[len("dbi.") :]] = value
    return ours
