"""prism sweep keeps each variant's settings, refuses a variant run with others, writes on rank 0 only."""

from __future__ import annotations

import json

import pytest

from prism_vfm.ablation import run_sweep
from prism_vfm.ablation import sweep as sweep_module
from prism_vfm.config import ConfigError, apply_overrides
from prism_vfm.data.synthetic import write_tiny_image_folder
from prism_vfm.distill.config import preset


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_images")
    write_tiny_image_folder(root, n_classes=3, per_class=8, size=(40, 48), seed=0)
    return root


def stage1(images, *overrides):
    return apply_overrides(preset("tiny"), [("data", str(images)), ("max_steps", 1), *overrides])


def no_training(*args, **kwargs):
    raise AssertionError("a variant was trained")


def test_a_variant_run_with_other_settings_is_refused_with_the_differences(images, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    rows = run_sweep(["dense"], stage1(images), out)
    saved = json.loads((out / "dense" / "settings.json").read_text())
    assert (
        saved["stage1"]["max_steps"] == 1 and saved["stage1"]["student"]["overrides"]["moe_layers"] == []
    )  # after ablation
    monkeypatch.setattr(sweep_module, "_train", no_training)
    # What cannot change a result is not compared: the finished variant is reused.
    assert run_sweep(["dense"], stage1(images, ("workers", 1), ("log_every", 7)), out) == rows
    with pytest.raises(
        ConfigError, match=r"sweep variant dense .* other settings \(stage1\.max_steps: 1 → 2\)"
    ):
        run_sweep(["dense"], stage1(images, ("max_steps", 2)), out)
    # Checked for every variant before any trains, an unfinished one included.
    (out / "dense" / "result.json").unlink()
    with pytest.raises(ConfigError, match=r"stage1\.optim\.lr: 0\.\d+ → 0\.5; stage1\.seed: 42 → 3"):
        run_sweep(["top1", "dense"], stage1(images, ("seed", 3), ("optim.lr", 0.5)), out)
    assert not (out / "top1").exists()


def test_a_variant_folder_without_settings_is_refused(images, tmp_path, monkeypatch):
    (tmp_path / "sweep" / "dense" / "stage1").mkdir(parents=True)
    monkeypatch.setattr(sweep_module, "_train", no_training)
    with pytest.raises(ConfigError, match=r"holds files but no settings\.json"):
        run_sweep(["dense"], stage1(images), tmp_path / "sweep")


def test_processes_other_than_rank_0_write_none_of_the_sweeps_files(images, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_module, "is_main_process", lambda: False)
    out = tmp_path / "sweep"
    out.mkdir()
    rows = run_sweep(["dense"], stage1(images), out)
    assert rows[0]["variant"] == "dense"
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    # Only the trainer's own files (written by its rank 0, this process) are there.
    assert written and all(p.startswith("dense/stage1/") for p in written), written
    assert not (out / "dense" / "stage1" / "finished").exists()
