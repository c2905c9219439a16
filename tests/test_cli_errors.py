"""Bad command-line input ends in one line naming what is wrong and a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from prism_vfm.cli import error_line, main
from tests.conftest import REPO_ROOT


def _fails(argv: list[str], capsys) -> str:
    """Run ``prism argv``; assert exit status 2 and return the single line it printed on stderr."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["distill", "--preset", "nope"], "unknown Stage-1 preset 'nope'"),
        (["finetune", "--preset", "nope"], "unknown Stage-2 preset 'nope'"),
        (["sweep", "--variants", "prism", "--out", "s", "--preset", "nope"], "unknown Stage-1 preset 'nope'"),
    ],
)
def test_unknown_preset_is_one_line(argv, expected, capsys):
    err = _fails(argv, capsys)
    assert err.startswith("prism: error: ") and expected in err


def test_output_folder_that_is_a_file_is_refused_before_any_work(a_file, tmp_path, capsys, monkeypatch):
    import prism_vfm.smoke

    monkeypatch.setattr(prism_vfm.smoke, "run_smoke", lambda **_: pytest.fail("the smoke run started"))
    assert f"--out {a_file} is a file, not a folder" in _fails(["smoke", "--out", str(a_file)], capsys)
    below = a_file / "run"
    assert "which is a file" in _fails(["smoke", "--out", str(below)], capsys)
    images = tmp_path / "images"
    images.mkdir()
    argv = ["distill", "--preset", "tiny", "--data", str(images), "--out", str(a_file)]
    assert f"run folder (out) {a_file} is a file" in _fails(argv, capsys)
    argv = ["evaluate", "--checkpoint", "x", "--dataset", "pascal", "--data", "y", "--out", str(a_file)]
    assert "is a file, not a folder" in _fails(argv, capsys)
    assert "is a file, not a folder" in _fails(
        ["analyze", "routing", "--checkpoint", "x", "--out", str(a_file)], capsys
    )


def test_bad_values_and_files_are_one_line(a_file, tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("optim: [1,\n")
    images = tmp_path / "images"
    images.mkdir()
    base = ["distill", "--preset", "tiny", "--data", str(images), "--out", str(tmp_path / "run")]
    assert "optim.lr: expected a number, got 'abc'" in _fails([*base, "--set", "optim.lr=abc"], capsys)
    assert "unknown configuration key nokey" in _fails([*base, "--set", "nokey=1"], capsys)
    assert "not of the form key=value" in _fails([*base, "--set", "optim.lr"], capsys)
    assert "missing.yaml does not exist" in _fails(
        [*base, "--config", str(tmp_path / "missing.yaml")], capsys
    )
    assert "is not valid YAML" in _fails([*base, "--config", str(bad_yaml)], capsys)
    assert "Is a directory" in _fails([*base, "--config", str(images)], capsys)
    assert "does not exist" in _fails(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "o")], capsys)
    baselines = tmp_path / "baselines.json"
    baselines.write_text('{"semseg": "high"}')
    argv = ["evaluate", "--checkpoint", str(a_file), "--dataset", "pascal", "--data", str(images)]
    assert "must hold an object {task: single-task score}" in _fails(
        [*argv, "--baselines", str(baselines)], capsys
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["smoke", "--steps", "0"],
        ["smoke", "--steps", "many"],
        ["evaluate", "--checkpoint", "c", "--dataset", "pascal", "--data", "d", "--batch-size", "0"],
        ["evaluate", "--checkpoint", "c", "--dataset", "pascal", "--data", "d", "--workers", "-1"],
        ["info", "m", "--img-size", "0", "224"],
        ["distill", "--no-such-flag"],
    ],
)
def test_usage_errors_are_one_line(argv, capsys):
    err = _fails(argv, capsys)
    assert err.startswith("prism") and ": error: argument" in err or "unrecognized arguments" in err
    assert err.endswith("--help)")


def test_debug_variable_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("PRISM_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown Stage-1 preset"):
        main(["distill", "--preset", "nope"])


def test_error_line_is_one_line_without_quotes_or_errno():
    assert error_line(KeyError("no task 'x'")) == "no task 'x'"
    assert error_line(FileExistsError(17, "File exists", "out")) == "out: File exists"
    assert error_line(ValueError("first\n  second")) == "first second"
    assert error_line(ValueError()) == "ValueError"


def test_missing_eval_extra_is_named_before_any_work():
    """Without pyEdgeEval, evaluation modules still import; the boundary meter names the extra at once."""
    code = (
        "import sys; sys.modules['pyEdgeEval'] = None\n"
        "import prism_vfm.evaluate\n"
        "from prism_vfm.errors import MissingExtraError\n"
        "from prism_vfm.metrics.boundary import BoundaryMeter\n"
        "try:\n    BoundaryMeter('pascal')\nexcept MissingExtraError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    ).stdout
    assert "pip install 'prism-vfm[eval]'" in out and "pyEdgeEval" in out


def test_sweep_without_baselines_for_its_backbone_stops_before_training(tmp_path, capsys, monkeypatch):
    import prism_vfm.ablation

    monkeypatch.setattr(prism_vfm.ablation, "run_sweep", lambda *a, **k: pytest.fail("the sweep started"))
    for name in ("images", "PASCALContext"):
        (tmp_path / name).mkdir()
    argv = ["sweep", "--variants", "prism", "--out", str(tmp_path / "s"), "--preset", "tiny"]
    argv += ["--data", str(tmp_path / "images"), "--dataset", "pascal", "--stage2-preset", "tiny"]
    argv += ["--stage2-data", str(tmp_path / "PASCALContext")]
    err = _fails(argv, capsys)
    assert "PASCAL-Context has no single-task baselines for a ViT of width" in err
    assert not (tmp_path / "s").exists()
