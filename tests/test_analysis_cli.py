"""``prism analyze``: every analysis from the command line on our run folders, Stage-2 folders and official
``.pth`` files, writing figures, JSON and Markdown with the numbers the functions compute."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prism_vfm import PrismMultiTask, export_official
from prism_vfm.analysis.loading import load_for_analysis
from prism_vfm.cli import main
from prism_vfm.config import apply_overrides, save_yaml
from prism_vfm.data.synthetic import write_tiny_image_folder
from prism_vfm.distill.config import preset
from prism_vfm.distill.trainer import train_stage1
from prism_vfm.train.checkpoint import save_checkpoint
from tests.analysis_models import ANALYSIS_TINY, analysis_student, route_by_context, set_lambda
from tests.tiny import TINY

DISJOINT = [[0, 1], [2, 3], [4, 5]]
SAME = [[0, 1], [0, 1], [0, 1]]
CHAIN = [[0, 1], [1, 2], [2, 3]]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_tiny_image_folder(root, n_classes=2, per_class=3, size=(40, 48), seed=0, odd_formats=False)
    return root


def hand_run(root, steps):
    """A run folder whose checkpoints hold hand-routed students, as the Stage-1 trainer lays them out."""
    cfg = preset("tiny")  # records the teacher names tiny_a, tiny_b, tiny_c
    root.mkdir(parents=True)
    save_yaml(cfg, root / "config.yaml")
    for step, (patterns, lam) in steps.items():
        model = set_lambda(route_by_context(analysis_student(), patterns), lam)
        save_checkpoint(
            root, step, model.state_dict(), {"step": step}, keep_last=10, config=model._hub_mixin_config
        )
    return root


def cli(*args):
    """``prism <args>``, each argument as its string."""
    main([str(a) for a in args])


def read(out, name):
    return json.loads((out / f"{name}.json").read_text())


def test_routing_gates_and_coactivation_follow_a_run_folder(images, tmp_path, capsys):
    run = hand_run(
        tmp_path / "run",
        {10: ({1: SAME, 3: SAME}, {1: 0.9, 3: 0.9}), 20: ({1: DISJOINT, 3: CHAIN}, {1: 0.6, 3: 0.7})},
    )
    out = tmp_path / "out"
    cli("analyze", "routing", "--checkpoint", run, "--data", images, "--out", out, "--images", "4")
    routing = read(out, "routing")["checkpoints"]["step_00000020"]  # the latest checkpoint
    assert routing["context_names"] == ["tiny_a", "tiny_b", "tiny_c"]
    assert routing["layers"]["1"]["separation"] == pytest.approx(1.0)
    assert np.array(routing["layers"]["3"]["probs"])[1].tolist() == [0, 1, 1, 0, 0, 0]
    assert (out / "routing.png").is_file() and "block 3" in (out / "routing.md").read_text()
    assert str(out / "routing.png") in capsys.readouterr().out

    cli("analyze", "gates", "--checkpoint", run, "--data", images, "--out", out, "--images", "2")
    traj = read(out, "gates")["trajectory"]
    assert traj["labels"] == ["step_00000010", "step_00000020"]
    assert traj["layers"]["1"]["tiny_b"] == pytest.approx([0.9, 0.6], abs=1e-5)
    assert (out / "gates.png").is_file() and (out / "gates_trajectory.png").is_file()

    cli("analyze", "coactivation", "--checkpoint", run, "--data", images, "--out", out, "--images", "2")
    series = read(out, "coactivation")["series"]
    assert series["labels"] == ["step_00000010", "step_00000020"]
    assert series["layers"]["3"] == {
        "tiny_a–tiny_b": [2, 1],
        "tiny_a–tiny_c": [2, 0],
        "tiny_b–tiny_c": [2, 1],
    }
    assert (out / "coactivation.png").is_file() and (out / "coactivation_series.png").is_file()


def test_seeds_on_two_runs_and_task_routing_of_a_stage2_folder(images, tmp_path):
    perm = [3, 5, 0, 4, 1, 2]
    a = hand_run(tmp_path / "seed0", {5: ({1: DISJOINT, 3: CHAIN}, {1: 0.8, 3: 0.8})})
    moved = {b: [[perm[e] for e in x] for x in p] for b, p in {1: DISJOINT, 3: CHAIN}.items()}
    b = hand_run(tmp_path / "seed1", {5: (moved, {1: 0.8, 3: 0.8})})
    out = tmp_path / "seeds"
    cli("analyze", "seeds", "--checkpoint", a, b, "--data", images, "--out", out, "--images", "2")
    seeds = read(out, "seeds")
    assert seeds["reference"] == "seed0" and seeds["runs"] == ["seed1"]
    assert seeds["layers"]["1"]["agreement"] == [pytest.approx(1.0)]
    assert seeds["layers"]["1"]["permutation"] == [perm]
    assert (out / "seeds.png").is_file()

    mt = PrismMultiTask({**TINY, **ANALYSIS_TINY}, {"semseg": 3, "normals": 3}).eval()
    route_by_context(mt.student, {1: [[4, 5], [0, 1]], 3: [[2, 3], [2, 3]]}, kind="task")
    # as the Stage-2 trainer saves it (save_pretrained's config.json sorts the task dict's keys)
    ckpt = save_checkpoint(tmp_path / "stage2", 7, mt.state_dict(), {"step": 7}, config=mt._hub_mixin_config)
    out = tmp_path / "tasks"
    cli("analyze", "routing", "--checkpoint", ckpt, "--data", images, "--out", out)  # a checkpoint folder
    routing = read(out, "routing")["checkpoints"]["step_00000007"]
    assert routing["kind"] == "task" and routing["context_names"] == ["semseg", "normals"]
    assert routing["layers"]["1"]["probs"][0] == [0, 0, 0, 0, 1, 1]
    assert routing["layers"]["3"]["separation"] == pytest.approx(0.0, abs=1e-9)


def test_official_checkpoints_load_with_the_released_teacher_names(images, tmp_path):
    # released files do not record top-k (the loader uses the released 3)
    student = analysis_student(embed_dim=192, num_heads=3, num_experts=7, top_k=3)
    model = route_by_context(
        student, {1: [[0, 1, 2], [3, 4, 5], [6, 0, 1]], 3: [[0, 1, 2], [1, 2, 3], [2, 3, 4]]}
    )
    export_official(model, tmp_path / "prism_stage1.pth")
    loaded = load_for_analysis(tmp_path / "prism_stage1.pth")
    assert loaded.label == "prism_stage1" and loaded.default_kind == "teacher"
    assert loaded.context_names("teacher", [0, 2]) == ["DINOv2", "SAM"]
    torch.testing.assert_close(
        loaded.student.blocks[1].moe.router.gate.weight, model.blocks[1].moe.router.gate.weight
    )
    out = tmp_path / "official"
    cli("analyze", "routing", "--checkpoint", tmp_path / "prism_stage1.pth", "--data", images, "--out", out)
    routing = read(out, "routing")["checkpoints"]["prism_stage1"]
    assert routing["context_names"] == ["DINOv2", "CLIP", "SAM"]
    assert routing["top_k"] == 3 and routing["layers"]["1"]["probs"][2] == [1, 1, 0, 0, 0, 0, 1]
    assert routing["layers"]["3"]["probs"][1] == [0, 1, 1, 1, 0, 0, 0]


def test_gradients_and_efficiency_on_a_trained_tiny_run(images, tmp_path):
    cfg = apply_overrides(
        preset("tiny"),
        [("data", str(images)), ("out", str(tmp_path / "run")), ("max_steps", 2), ("batch_size", 3)],
    )
    run = train_stage1(cfg)
    out = tmp_path / "grad"
    cli("analyze", "gradients", "--checkpoint", run, "--data", images, "--out", out, "--images", "3")
    grads = read(out, "gradients")
    assert grads["teachers"] == ["tiny_a", "tiny_b", "tiny_c"]  # from the run's configuration
    assert set(grads["by_kind"]) == {"routed", "shared", "anchor", "dense"}
    assert set(grads["effective_teachers_per_layer"]) == {"0", "1", "2", "3"}
    assert (out / "gradients.png").is_file()

    out = tmp_path / "eff"
    cli(
        "analyze",
        "efficiency",
        "--checkpoint",
        run,
        "prism_vit_small_patch16_384",
        "--out",
        out,
        "--no-latency",
    )
    rows = read(out, "efficiency")["models"]
    assert rows["prism_vit_small_patch16_384"]["gflops"] > 10 * rows["step_00000002"]["gflops"]
    assert "| step_00000002 |" in (out / "efficiency.md").read_text()


def test_clear_errors(images, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli("analyze", "routing", "--checkpoint", tmp_path / "missing", "--data", images)
    assert "does not exist" in capsys.readouterr().err
    analysis_student().save_pretrained(tmp_path / "m")
    with pytest.raises(SystemExit, match="needs images"):
        cli("analyze", "routing", "--checkpoint", tmp_path / "m")
    with pytest.raises(SystemExit, match="unknown teacher context"):
        cli("analyze", "routing", "--checkpoint", tmp_path / "m", "--data", images, "--contexts", "7")
    with pytest.raises(SystemExit, match="two or more runs"):
        cli("analyze", "seeds", "--checkpoint", tmp_path / "m", "--data", images)
    with pytest.raises(SystemExit, match="--teachers"):
        cli("analyze", "gradients", "--checkpoint", tmp_path / "m", "--data", images)


def test_analyze_splits_options_into_the_probe_and_the_runners_own(monkeypatch, tmp_path):
    from prism_vfm.analysis import report

    seen = {}

    def fake(name):
        def run(checkpoints, out, probe, **extra):
            seen[name] = (probe, extra)
            return {}

        return run

    for name in ("routing", "gradients", "coactivation"):
        monkeypatch.setattr(report, f"run_{name}", fake(name))
    report.analyze("routing", ["a"], tmp_path, data="imgs", kind="task", contexts=[1, 0], device="cpu")
    report.analyze("gradients", ["a"], tmp_path, data="imgs", teachers=["dinov2_l"])
    report.analyze("coactivation", ["a"], tmp_path, images=5, threshold=0.2)
    assert seen["routing"] == (report.Probe(data="imgs", kind="task", contexts=[1, 0]), {})
    # gradient conflict keeps its smaller default batches unless told otherwise
    assert seen["gradients"] == (
        report.Probe(data="imgs", images=16, batch_size=4),
        {"teachers": ["dinov2_l"]},
    )
    assert seen["coactivation"] == (report.Probe(images=5), {"threshold": 0.2})
    with pytest.raises(ValueError, match="unknown analysis"):
        report.analyze("routes", ["a"], tmp_path)
