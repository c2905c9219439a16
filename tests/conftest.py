"""Shared test helpers: where the official conformance fixtures live, and small loaders for them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def fixtures_root() -> Path:
    """The official fixtures: ``$PRISM_FIXTURES`` or ``../shared/fixtures/prism_official`` beside the repo."""
    env = os.environ.get("PRISM_FIXTURES")
    root = Path(env) if env else REPO_ROOT.parent / "shared" / "fixtures" / "prism_official"
    if not root.is_dir():
        raise FileNotFoundError(
            f"official fixtures not found at {root}; check out `shared/` beside the repository "
            "or point PRISM_FIXTURES at the `prism_official` folder"
        )
    return root


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
