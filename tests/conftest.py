"""Shared test helpers: where the official conformance fixtures live, and small loaders for them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
SLIM_FIXTURES = REPO_ROOT / "tests" / "fixtures" / "prism_official"


def fixtures_root() -> Path:
    """The official fixtures: ``$PRISM_FIXTURES`` (e.g. the full set) or the slimmed copy in the repo."""
    env = os.environ.get("PRISM_FIXTURES")
    root = Path(env) if env else SLIM_FIXTURES
    if not root.is_dir():
        raise FileNotFoundError(
            f"official fixtures not found at {root}; PRISM_FIXTURES must name a `prism_official` folder"
        )
    return root


class OfficialReference:
    """A fixture's ``reference.safetensors``, full or slimmed (``slim.json`` names the kept indices).

    ``ref[name]`` is the stored official tensor; ``ref.pick(name, ours)`` selects from our full-size
    result the same tokens / pixels the stored tensor keeps, so one comparison serves both sets.
    """

    def __init__(self, folder: Path) -> None:
        self.tensors = load_file(folder / "reference.safetensors")
        slim = folder / "slim.json"
        self.selections = load_json(slim)["selections"] if slim.exists() else {}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def pick(self, name: str, ours: torch.Tensor) -> torch.Tensor:
        sel = self.selections.get(name)
        if sel is None:
            return ours
        assert list(ours.shape) == sel["full_shape"], (name, list(ours.shape), sel["full_shape"])
        for dim, index in sel["index"].items():
            ours = ours.index_select(int(dim), torch.tensor(index, device=ours.device))
        return ours


@pytest.fixture(scope="session")
def fixture_dir():
    """Return a function mapping a fixture name (e.g. ``stage1_vitb_224``) to its folder."""
    root = fixtures_root()
    return lambda name: root / name


def load_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, so that reductions sum in one fixed order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield
