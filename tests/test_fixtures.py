"""The official fixtures shipped in the repository: small, and every stored value an official one.

The slimmed copy (``tests/fixtures/prism_official``, written by ``tests/fixtures/slim_prism.py``) keeps every
tensor the full set has: whole tensors byte for byte (their SHA-256 is the official manifest's), large maps
as a recorded selection of tokens or pixels.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT, SLIM_FIXTURES, load_json

FOLDERS = ("stage1_vitb_224", "stage2_pascal_vitb_128", "stage1_losses", "task_losses_and_metrics")
MAX_BYTES = 15_000_000


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _stored(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in ("reference.safetensors", "inputs.safetensors"):
        if (folder / name).exists():
            out.update(load_file(folder / name))
    return out


def test_slimmed_fixtures_fit_the_repository_budget():
    size = sum(f.stat().st_size for f in SLIM_FIXTURES.rglob("*") if f.is_file())
    assert size <= MAX_BYTES, f"tests/fixtures/prism_official holds {size / 1e6:.1f} MB"
    assert "Slimmed copy" in (SLIM_FIXTURES / "README.md").read_text()


@pytest.mark.parametrize("name", FOLDERS)
def test_every_official_tensor_is_kept_whole_or_as_a_recorded_selection(name):
    folder = SLIM_FIXTURES / name
    manifest, slim = load_json(folder / "manifest.json"), load_json(folder / "slim.json")
    stored, selections = _stored(folder), slim["selections"]
    regenerated = set(slim["regenerated_inputs"])
    assert set(stored) | regenerated == set(manifest["tensors"])
    for key, meta in manifest["tensors"].items():
        if key in regenerated:
            continue
        t = stored[key]
        if key not in selections:
            assert list(t.shape) == meta["shape"] and _sha256(t) == meta["sha256"], key
            continue
        sel = selections[key]
        assert sel["full_shape"] == meta["shape"], key
        expected = list(meta["shape"])
        for dim, index in sel["index"].items():
            assert index == sorted(set(index)) and index[-1] < meta["shape"][int(dim)], key
            expected[int(dim)] = len(index)
        assert list(t.shape) == expected and _sha256(t) == sel["sha256"], key


def test_routing_checks_keep_every_token():
    """Top-k indices, router logits and lambda gates of every layer (and task) are never slimmed."""
    for name in ("stage1_vitb_224", "stage2_pascal_vitb_128"):
        selected = load_json(SLIM_FIXTURES / name / "slim.json")["selections"]
        assert not [k for k in selected if k.startswith(("topk_indices", "router_logits", "lambda_gate"))]
        assert not [k for k in selected if k in ("input", "ctx_ids")]


def _full_set() -> Path | None:
    env = os.environ.get("PRISM_FIXTURES")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "fixtures" / "prism_official")
    return next((c for c in candidates if (c / "stage1_vitb_224").is_dir() and c != SLIM_FIXTURES), None)


def test_slim_script_reproduces_the_committed_copy(tmp_path):
    """Running the slim script on the full set gives the committed files (the full set is not in the repo)."""
    full = _full_set()
    if full is None:
        pytest.skip("the full official fixtures are not available (PRISM_FIXTURES or ../shared)")
    spec = importlib.util.spec_from_file_location("slim_prism", REPO_ROOT / "tests/fixtures/slim_prism.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.slim(full, tmp_path)
    committed = sorted(p.relative_to(SLIM_FIXTURES) for p in SLIM_FIXTURES.rglob("*") if p.is_file())
    assert committed == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for rel in committed:
        if rel.suffix == ".safetensors":  # the file bytes depend on safetensors' version; the values do not
            a, b = load_file(SLIM_FIXTURES / rel), load_file(tmp_path / rel)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
        else:
            assert (SLIM_FIXTURES / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
