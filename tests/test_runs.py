"""Run folders never lose data: refusal, overwrite, resume with changed settings, pruning, stale temporaries,
and every setting checked before anything is built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from prism_vfm.cli import main
from prism_vfm.config import ConfigError, apply_overrides
from prism_vfm.data.synthetic import write_tiny_image_folder
from prism_vfm.data.tiny_dense import write_tiny_pascal
from prism_vfm.distill import trainer as stage1
from prism_vfm.distill.config import preset
from prism_vfm.finetune import trainer as stage2
from prism_vfm.finetune.config import preset as stage2_preset
from prism_vfm.train.checkpoint import latest_checkpoint, save_checkpoint
from prism_vfm.train.logging import read_scalars
from prism_vfm.train.run import ConfigChangedError
from tests.tiny import tiny_student


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_tiny_image_folder(root, n_classes=3, per_class=8, size=(40, 48), seed=0)
    return root


@pytest.fixture(scope="module")
def pascal(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    write_tiny_pascal(root / "PASCALContext", n_train=6, n_val=2, size=(40, 48), seed=0)
    tiny_student(teacher_dims=(32, 24, 16)).save_pretrained(root / "stage1")
    return root


def checkpoint_steps(run: Path) -> list[int]:
    """The steps of the checkpoint folders a run holds."""
    return sorted(int(p.name.removeprefix("step_")) for p in (run / "checkpoints").glob("step_*"))


def stage1_cfg(images: Path, out: Path, *overrides):
    return apply_overrides(preset("tiny"), [("data", str(images)), ("out", str(out)), *overrides])


def stage2_cfg(pascal: Path, out: Path, *overrides):
    base = [("data", str(pascal / "PASCALContext")), ("init", str(pascal / "stage1")), ("out", str(out))]
    return apply_overrides(stage2_preset("tiny"), base + list(overrides))


@pytest.fixture
def no_teachers(monkeypatch):
    """Building a teacher fails the test: the checks under test must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a teacher was built before the run's settings and folder were checked")

    monkeypatch.setattr(stage1, "build_teacher", refuse)
    monkeypatch.setattr(stage2, "build_teacher", refuse)


def test_a_new_run_in_a_non_empty_folder_is_refused_before_anything_is_built(
    images, pascal, tmp_path, no_teachers
):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(
        FileExistsError, match=r"mine is not empty \(holds notes.txt\).*--resume.*--overwrite"
    ):
        stage1.train_stage1(stage1_cfg(images, tmp_path / "mine"))
    with pytest.raises(FileExistsError, match="not empty"):
        stage2.train_stage2(stage2_cfg(pascal, tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_cli_refusal_is_one_line_and_overwrite_refuses_foreign_files(images, tmp_path, capsys, no_teachers):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "data.csv").write_text("a user's file")
    argv = ["distill", "--preset", "tiny", "--data", str(images), "--out", str(run)]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "is not empty" in err
    with pytest.raises(SystemExit):
        main([*argv, "--overwrite"])
    err = capsys.readouterr().err
    assert "--overwrite removes only a run's own files" in err and "data.csv" in err
    assert (run / "checkpoints").is_dir() and (run / "data.csv").is_file()  # nothing was removed
    with pytest.raises(SystemExit):  # argparse: the two modes exclude each other
        main([*argv, "--overwrite", "--resume"])


def test_overwrite_replaces_the_run_and_only_the_run(images, tmp_path):
    run = tmp_path / "run"
    stage1.train_stage1(stage1_cfg(images, run, ("max_steps", 3), ("ckpt_every", 1), ("keep_last", 0)))
    assert checkpoint_steps(run) == [1, 2, 3]
    stage1.train_stage1(stage1_cfg(images, run, ("max_steps", 1)), overwrite=True)
    assert checkpoint_steps(run) == [1]
    assert yaml.safe_load((run / "config.yaml").read_text())["max_steps"] == 1
    assert [r["step"] for r in read_scalars(run)] == [1]


def test_resume_with_changed_settings_stops_with_the_differences_unless_allowed(
    images, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    stage1.train_stage1(stage1_cfg(images, run, ("max_steps", 2), ("ckpt_every", 2)))
    saved = (run / "config.yaml").read_text()
    changed_settings = (("max_steps", 3), ("optim.lr", 5e-4), ("loss.lb_weight", 0.2))
    changed = stage1_cfg(images, run, *changed_settings)
    real = stage1.build_teacher
    monkeypatch.setattr(stage1, "build_teacher", lambda *a, **k: pytest.fail("built before the check"))
    with pytest.raises(ConfigError, match=r"loss.lb_weight: 0.1 → 0.2; optim.lr: 0.001 → 0.0005 \(") as err:
        stage1.train_stage1(changed, resume=True)
    assert "max_steps" not in str(err.value)  # how far a run goes may change on resume
    monkeypatch.setattr(stage1, "build_teacher", real)
    stage1.train_stage1(changed, resume=True, allow_config_change=True)
    assert latest_checkpoint(run).name == "step_00000003"
    fresh = stage1.train_stage1(stage1_cfg(images, tmp_path / "fresh", *changed_settings))
    resumed_lr, fresh_lr = read_scalars(run)[-1]["lr"], read_scalars(fresh)[-1]["lr"]
    assert resumed_lr == fresh_lr  # the new learning rate took effect at the resumed step
    assert (run / "config.yaml").read_text() == saved  # the run's record keeps what it started with
    (record,) = yaml.safe_load((run / "config_changes.yaml").read_text())
    assert record["resumed_at_step"] == 2
    assert record["changes"]["optim.lr"] == {"old": 1e-3, "new": 5e-4}
    assert record["changes"]["max_steps"] == {"old": 2, "new": 3}


def test_stale_temporaries_of_a_killed_save_are_removed_at_start(images, tmp_path):
    run = tmp_path / "run"
    stage1.train_stage1(stage1_cfg(images, run, ("max_steps", 1)))
    stale_dir = run / "checkpoints" / ".step_00000002.x1y2"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"half")
    stale_file = run / "checkpoints" / ".latest.abc.tmp"
    stale_file.write_text("step_00000002")
    stage1.train_stage1(stage1_cfg(images, run, ("max_steps", 2)), resume=True)
    assert not stale_dir.exists() and not stale_file.exists()
    assert latest_checkpoint(run).name == "step_00000002"


def test_pruning_touches_only_steps_this_run_reached_and_latest_always_exists(tmp_path):
    weights = {"w": torch.zeros(2)}
    save_checkpoint(tmp_path, 100, weights, {"step": 100}, keep_last=1)  # another run's, later step
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, weights, {"step": step}, keep_last=2)
        assert latest_checkpoint(tmp_path).name == f"step_{step:08d}"
    assert checkpoint_steps(tmp_path) == [2, 3, 100]
    save_checkpoint(tmp_path, 4, weights, {"step": 4}, keep_last=0)  # 0 keeps every checkpoint
    assert checkpoint_steps(tmp_path) == [2, 3, 4, 100]
    with pytest.raises(ValueError, match="keep_last must be >= 0"):
        save_checkpoint(tmp_path, 5, weights, {"step": 5}, keep_last=-1)


def test_ckpt_every_zero_saves_only_at_epoch_ends_and_the_end(images, tmp_path):
    run = stage1.train_stage1(stage1_cfg(images, tmp_path / "run", ("ckpt_every", 0), ("keep_last", 0)))
    per_epoch = sum(1 for p in images.rglob("*") if p.is_file()) // 6  # the tiny preset: batch 6, 2 epochs
    assert checkpoint_steps(run) == [per_epoch, 2 * per_epoch]


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("batch_size", 0, "batch_size: expected an integer >= 1, got 0"),
        ("keep_last", -1, "keep_last: expected an integer >= 0"),
        ("ckpt_every", -5, "ckpt_every: expected an integer >= 0"),
        ("log_every", 0, "log_every: expected an integer >= 1"),
        ("epochs", 0.0, "epochs: expected a number > 0"),
        ("optim.lr", -1e-3, "optim.lr: expected a number > 0"),
        ("optim.betas", [0.9, 1.5], r"optim.betas\[1\]: expected a number in \[0, 1\)"),
        ("teachers.names", ["tiny_a", "nope"], r"teachers.names\[1\]: expected a registered teacher"),
        (
            "teachers.weights",
            "/no/such/folder",
            "teachers.weights: expected 'hub', 'none' or an existing path",
        ),
        ("student.init", "/no/such/file.pth", "student.init: expected 'timm', 'none' or an existing"),
        ("data", "/no/such/images", "data: expected an existing image folder"),
        ("loss.lb_weight", -0.1, "loss.lb_weight: expected a number >= 0"),
        ("student.model", "vit_base", "student.model: expected a registered student"),
    ],
)
def test_every_stage1_setting_is_checked_up_front(images, tmp_path, no_teachers, key, value, match):
    with pytest.raises(ConfigError, match=match):
        stage1.train_stage1(stage1_cfg(images, tmp_path / "run", (key, value)))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("iters", 0, "iters: expected an integer >= 1"),
        ("keep_last", -1, "keep_last: expected an integer >= 0"),
        ("ckpt_every", -1, "ckpt_every: expected an integer >= 0"),
        ("holdout", 1.0, r"holdout: expected a fraction in \[0, 1\)"),
        ("tasks", ["semseg", "depth"], r"tasks\[1\]: expected a task of pascalcontext"),
        ("img_size", [48], r"img_size: expected \[\] \(the data set's size\) or \[H, W\]"),
        ("lr", 0.0, "lr: expected a number > 0"),
        ("loss_weights", {"depth": 1.0}, r"loss_weights.depth: expected a trained task \(semseg, "),
        ("loss_weights", {"sal": -1.0}, "loss_weights.sal: expected a number >= 0"),
        ("loss_weights", [1.0], "loss_weights: expected a mapping"),
        (
            "class_balance",
            {"sal": 0.5},
            r"class_balance.sal: expected a trained class-map task \(semseg, human",
        ),
        ("class_balance", {"semseg": -0.5}, "class_balance.semseg: expected an exponent >= 0"),
        ("subpixel_heads", ["depth"], r"subpixel_heads\[0\]: expected a trained task \(semseg, "),
        ("edge_label", "sobel", r"edge_label: 'sobel' is not one of \['released', 'evaluation'\]"),
        ("scale_range", [2.0, 0.5], r"scale_range: expected \[low, high\] with 0 < low <= high"),
        ("scale_range", [0.0, 1.0], r"scale_range: expected \[low, high\] with 0 < low <= high"),
        ("init", "/no/such/stage1", "init: expected an existing Stage-1 checkpoint"),
        ("distill.alpha", -1.0, "distill.alpha: expected a number >= 0"),
        ("distill.teachers", ["tiny_a", "nope"], r"distill.teachers\[1\]: expected a registered teacher"),
    ],
)
def test_every_stage2_setting_is_checked_up_front(pascal, tmp_path, no_teachers, key, value, match):
    with pytest.raises(ConfigError, match=match):
        stage2.train_stage2(stage2_cfg(pascal, tmp_path / "run", (key, value)))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            [("subpixel_heads", ["edge"]), ("img_size", [50, 64])],
            r"img_size: expected \[H, W\] divisible by 4",
        ),
        (
            [("dataset", "nyud"), ("tasks", []), ("edge_label", "evaluation")],
            "edge_label: expected 'released' for nyud",
        ),
    ],
)
def test_stage2_settings_that_depend_on_each_other_are_checked_up_front(pascal, tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        stage2.train_stage2(stage2_cfg(pascal, tmp_path / "run", *overrides))
    assert not (tmp_path / "run").exists()


def test_cli_resume_with_a_changed_setting_needs_allow_config_change(pascal, tmp_path, capsys):
    run = tmp_path / "run"
    stage2.train_stage2(stage2_cfg(pascal, run, ("max_steps", 1), ("holdout", 0.0)))
    argv = [
        *("finetune", "--preset", "tiny", "--data", str(pascal / "PASCALContext")),
        *("--init", str(pascal / "stage1"), "--out", str(run), "--resume"),
        *("--set", "holdout=0.0", "--set", "max_steps=2", "--set", "lr=5e-4"),
    ]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "lr: 0.001 → 0.0005" in err and "--allow-config-change" in err
    assert latest_checkpoint(run).name == "step_00000001"
    main([*argv, "--allow-config-change"])
    assert latest_checkpoint(run).name == "step_00000002"
    (record,) = yaml.safe_load((run / "config_changes.yaml").read_text())
    assert record["changes"]["lr"] == {"old": 1e-3, "new": 5e-4}


def test_a_run_started_before_a_setting_existed_resumes_while_the_setting_keeps_its_default(pascal, tmp_path):
    run = tmp_path / "run"
    stage2.train_stage2(stage2_cfg(pascal, run, ("max_steps", 1), ("holdout", 0.0)))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    for key in ("subpixel_heads", "edge_label", "class_balance"):  # settings an older version did not have
        del saved[key]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigChangedError, match=r"subpixel_heads: None → \['edge'\]"):
        stage2.train_stage2(
            stage2_cfg(pascal, run, ("max_steps", 2), ("holdout", 0.0), ("subpixel_heads", ["edge"])),
            resume=True,
        )
    stage2.train_stage2(stage2_cfg(pascal, run, ("max_steps", 2), ("holdout", 0.0)), resume=True)
    assert latest_checkpoint(run).name == "step_00000002"
    assert (
        not (run / "config_changes.yaml").exists()
        or "subpixel" not in (run / "config_changes.yaml").read_text()
    )
