"""The ``prism`` command: smoke run, info and checkpoint conversion."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from prism_vfm import PrismViT, export_official
from prism_vfm.cli import main
from prism_vfm.distill.assignment import balanced_teacher_split, single_teacher
from prism_vfm.smoke import run_smoke
from tests.tiny import tiny_student


def test_smoke_run_learns_and_saves(tmp_path):
    summary = run_smoke(steps=12, out_dir=tmp_path / "run")
    assert summary["last_loss"] < summary["first_loss"]
    model = PrismViT.from_pretrained(summary["saved_to"])
    assert model.moe_layers == (1, 3)
    assert len(summary["lambda_mean_per_layer_and_teacher"]) == 2


def test_console_script_is_installed_and_prints_info(tmp_path):
    tiny_student().save_pretrained(tmp_path / "m")
    out = subprocess.run(
        [sys.executable, "-m", "prism_vfm.cli", "info", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    info = json.loads(out)
    assert info["dual_stream_blocks"] == [1, 3] and info["experts"] == 5


def test_convert_official_to_folder_and_back(tmp_path, capsys):
    model = tiny_student(embed_dim=192, num_heads=3).eval()
    export_official(model, tmp_path / "official.pth")
    main(["convert", str(tmp_path / "official.pth"), str(tmp_path / "ours")])
    main(["convert", str(tmp_path / "ours"), str(tmp_path / "again.pth")])
    back = torch.load(tmp_path / "again.pth", weights_only=True)["model"]
    first = torch.load(tmp_path / "official.pth", weights_only=True)["model"]
    assert back.keys() == first.keys()
    for k in first:
        torch.testing.assert_close(back[k], first[k], rtol=0, atol=0)


def test_balanced_split_gives_remainder_to_first_teachers():
    ids = balanced_teacher_split(8, 3, torch.Generator().manual_seed(0))
    assert torch.bincount(ids, minlength=3).tolist() == [3, 3, 2]
    again = balanced_teacher_split(8, 3, torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)
    one = single_teacher(5, 3, torch.Generator().manual_seed(1))
    assert len(set(one.tolist())) == 1


def test_evaluate_command_passes_the_boundary_matcher_down(monkeypatch, capsys):
    import prism_vfm.evaluate

    seen = []

    def fake_evaluate(*args, **kwargs):
        seen.append(kwargs["matcher"])
        return {"scores": {}, "delta_m": 0.0, "loaded": "nothing"}

    monkeypatch.setattr(prism_vfm.evaluate, "evaluate", fake_evaluate)
    common = ["evaluate", "--checkpoint", "ckpt", "--dataset", "pascal", "--data", "data"]
    main(common)
    main([*common, "--matcher", "bsds"])
    main([*common, "--matcher", "maximum"])
    assert seen == ["fast", "bsds", "maximum"]  # the fast BSDS assignment is the default
    try:
        main([*common, "--matcher", "hungarian"])
    except SystemExit as exit_:
        assert exit_.code == 2
    else:
        raise AssertionError("an unknown matcher was accepted")
    assert "invalid choice: 'hungarian'" in capsys.readouterr().err
