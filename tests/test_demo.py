"""prism demo: the quick run leaves every artefact; the tiny teachers are cached and registered."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from prism_vfm.cli import main
from prism_vfm.data.registry import dataset_tasks
from prism_vfm.demo.pipeline import demo_config, run_demo
from prism_vfm.demo.teachers import DEMO_TEACHERS, DemoTeacherConfig, prepare_teachers
from prism_vfm.teachers import build_teacher

FIGURES = (
    "routing_teachers",
    "routing_tasks",
    "lambda_teachers",
    "lambda_tasks",
    "lambda_by_depth",
    "predictions",
    "metrics",
)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    return run_demo(root / "run", quick=True, seed=0, cache_dir=root / "cache", workers=2)


@pytest.mark.timeout(600)
def test_quick_demo_writes_metrics_of_every_task_with_delta_m(quick):
    saved = json.loads((quick.out / "eval" / "metrics.json").read_text())
    tasks = dataset_tasks("pascalcontext")
    assert set(saved["scores"]) == set(tasks)
    assert {"odsF", "oisF", "AP"} <= set(saved["scores"]["edge"])
    assert set(saved["baselines"]) == set(tasks)  # Δm against the single-task runs, not the paper's
    assert math.isfinite(saved["delta_m"]) and saved["delta_m"] == pytest.approx(quick.metrics["delta_m"])
    for task in tasks:
        assert (quick.out / "single_task" / task / "eval" / "metrics.json").is_file()
    summary = json.loads((quick.out / "summary.json").read_text())
    assert summary["timings_s"]["total"] > 0 and set(summary["single_task"]) == set(tasks)


def test_quick_demo_trainings_in_two_workers_equal_those_run_one_after_another(quick, tmp_path):
    """The fixture trained in two worker processes; the same runs (all but the multi-task one, the longest)
    rerun here one after another give bit-identical checkpoints."""
    from safetensors.torch import load_file

    from prism_vfm.demo.pipeline import training_jobs
    from prism_vfm.train.checkpoint import latest_checkpoint
    from prism_vfm.utils.parallel import run_jobs

    summary = json.loads((quick.out / "summary.json").read_text())
    assert summary["parallel"]["workers"] == 2 and summary["parallel"]["critical_path_cpu_s"] > 0
    multi_cpu = summary["parallel"]["runs"]["stage2"]["cpu_s"]  # the workers' CPU time is reported per stage
    assert multi_cpu > 0 and summary["cpu_s"]["stage 2 (multi-task)"] == multi_cpu
    assert "| – stage 2 (multi-task) |" in quick.report.read_text()
    cfg, data = demo_config(quick=True), quick.out / "data"
    jobs = training_jobs(
        cfg,
        data / "images",
        data / "PASCALContext",
        tmp_path,
        quick.out.parent / "cache",
        quick.out.parent / "cache",
        0,
    )
    names = ["stage1/seed0", "stage1/seed1_shuffled", "stage2_routing/seed1_shuffled", "single_task/edge"]
    assert set(names) < set(summary["parallel"]["runs"])
    run_jobs([j for j in jobs if j.name in names], workers=1, log=None)
    for name in names:
        ours, theirs = (
            load_file(latest_checkpoint(root / name) / "model.safetensors") for root in (tmp_path, quick.out)
        )
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_quick_demo_figures_are_valid_pngs(quick):
    assert set(FIGURES) <= set(quick.figures)
    for name in FIGURES:
        path = quick.out / "figures" / f"{name}.png"
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 50, name


def test_quick_demo_report_shows_analysis_and_states_its_limits(quick):
    report = quick.report.read_text()
    for needle in (
        "Δm",
        "odsF",
        "not vision foundation",
        "Stage 1: do experts specialise by teacher",
        "λ per layer",
    ):
        assert needle in report, needle
    for name in FIGURES:
        assert f"figures/{name}.png" in report, name
    analysis = json.loads((quick.out / "analysis.json").read_text())
    layers = demo_config(quick=True).moe_layers
    assert [int(b) for b in analysis["separation_teachers"]] == list(layers)
    assert all(0.5 <= v <= 1.0 for v in analysis["lambda_mean_tasks"].values())


def test_quick_demo_compares_expert_specialisation_with_a_shuffled_context_control(quick):
    summary = json.loads((quick.out / "summary.json").read_text())
    cfg = demo_config(quick=True)
    seeds = cfg.seeds(0)
    for kind, own in (("teacher", "assigned"), ("task", "own")):
        spec = summary["specialisation"][kind]
        assert set(spec["summary"]) == {own, "shuffled"}, kind
        for contexts in (own, "shuffled"):
            stats = spec["summary"][contexts]
            assert stats["seeds"] == seeds and stats["min"] <= stats["mean"] <= stats["max"]
            for run in spec["runs"][contexts].values():
                assert [int(b) for b in run["per_layer"]] == list(cfg.moe_layers)
                assert all(0.0 <= v <= 1.0 for v in run["per_layer"].values())
    for folder in ("stage1", "stage2_routing"):
        for seed in seeds:  # every seed trained twice: with its contexts and shuffled
            assert (quick.out / folder / f"seed{seed}").is_dir(), (folder, seed)
            assert (quick.out / folder / f"seed{seed}_shuffled").is_dir(), (folder, seed)
    report = quick.report.read_text()
    assert report.count("| shuffled (control) |") == 2 * len(seeds)
    assert "with shuffled contexts" in report


def test_quick_demo_reports_targets_on_the_classes_the_scenes_hold_as_found(quick):
    from prism_vfm.data.scenes import SCENE_CLASSES

    summary = json.loads((quick.out / "summary.json").read_text())
    saved = json.loads((quick.out / "eval" / "metrics.json").read_text())["scores"]
    semseg = summary["present_classes"]["semseg"]
    assert 0 in semseg["classes"] and set(semseg["classes"]) <= {c.voc for c in SCENE_CLASSES}
    assert semseg["mIoU"] == pytest.approx(sum(semseg["IoU"]) / len(semseg["IoU"]))
    rows = {r["task"]: r for r in summary["targets"]}
    assert set(rows) == set(dataset_tasks("pascalcontext"))
    assert rows["semseg"]["value"] == pytest.approx(semseg["mIoU"])
    assert rows["normals"]["value"] == pytest.approx(saved["normals"]["mErr"])
    assert rows["edge"]["value"] == pytest.approx(saved["edge"]["odsF"])
    for row in rows.values():
        assert row["met"] == (
            row["value"] <= row["target"] if row["task"] == "normals" else row["value"] >= row["target"]
        )
    report = quick.report.read_text()
    met = sum(r["met"] for r in rows.values())
    assert f"met {met} of {len(rows)}" in report
    # the quick model misses the boundary target: the report says what bounds it at 64 pixels
    assert not rows["edge"]["met"]
    assert "matched within 0.68 px at 64 pixels (below a pixel only exact hits count)" in report
    assert "the edge head predicts every pixel of its output cells" in report


def test_the_report_explains_a_missed_boundary_target_by_the_size_and_only_then():
    import dataclasses

    from prism_vfm.demo.report import _edge_ceiling_text

    missed = [{"task": "edge", "met": False}, {"task": "sal", "met": True}]
    released_head = dataclasses.replace(demo_config(), img_size=128, stage2_subpixel_heads=())
    text = " ".join(_edge_ceiling_text(missed, released_head))
    assert "matched within 1.36 px at 128 pixels," in text and "exact hits" not in text
    assert "from a 32×32 grid" in text and "benchmarks/demo_edge_ceiling.py" in text
    text = " ".join(_edge_ceiling_text(missed, demo_config()))
    assert (
        "the edge head predicts every pixel of its output cells" in text and "grid" not in text.split(":")[0]
    )
    assert _edge_ceiling_text([{"task": "edge", "met": True}], demo_config()) == []


def test_quick_demo_predicts_foreground_where_the_scenes_have_it(quick):
    """The quick run learns something: its saliency puts more foreground probability on the scenes' true
    foreground than on their background."""
    from prism_vfm.data.dense_transforms import DenseTestTransform
    from prism_vfm.data.pascal_context import PascalContext
    from prism_vfm.models.load import load
    from prism_vfm.train.checkpoint import latest_checkpoint

    size = (demo_config(quick=True).img_size,) * 2
    model = load(latest_checkpoint(quick.out / "stage2"), img_size=size, multitask=True)[0].eval()
    reader = PascalContext(quick.out / "data" / "PASCALContext", "val", ["sal"], DenseTestTransform(size))
    truth = torch.stack([reader[i]["sal"][0] for i in range(len(reader))])
    with torch.no_grad():
        images = torch.stack([reader[i]["image"] for i in range(len(reader))])
        foreground = model(images).predictions["sal"].softmax(1)[:, 1]
    assert foreground[truth == 1].mean() > foreground[truth == 0].mean() + 0.05


def test_teachers_are_cached_and_loaded_through_the_registry(tmp_path):
    cfg = DemoTeacherConfig(width=16, depth=2, scenes=4, steps=2, batch_size=2, img_size=32)
    weights = prepare_teachers(cfg, tmp_path, progress=False)
    files = sorted(weights.glob("*.safetensors"))
    assert [f.name for f in files] == sorted(cfg.file_name(n) for n in DEMO_TEACHERS)
    stamps = [f.stat().st_mtime_ns for f in files]
    prepare_teachers(cfg, tmp_path, progress=False)  # second call: nothing retrained
    assert [f.stat().st_mtime_ns for f in files] == stamps
    maps = [build_teacher(n, 32, weights)(torch.randn(2, 3, 32, 32)) for n in DEMO_TEACHERS]
    assert all(len(m) == 2 and m[0].shape == (2, 16, 4, 4) for m in maps)
    assert not torch.allclose(maps[0][-1], maps[1][-1])  # different objectives, different features
    other = DemoTeacherConfig(width=16, depth=2, scenes=4, steps=2, batch_size=2, img_size=32, seed=1)
    assert other.key() != cfg.key()


def test_teachers_pretrained_in_two_workers_equal_those_trained_here(tmp_path):
    from safetensors.torch import load_file

    cfg = DemoTeacherConfig(width=16, depth=2, scenes=4, steps=3, batch_size=2, img_size=32)
    here = prepare_teachers(cfg, tmp_path / "here", progress=False, workers=1)
    there = prepare_teachers(cfg, tmp_path / "there", progress=False, workers=2)
    for name in DEMO_TEACHERS:
        ours, theirs = (load_file(root / cfg.file_name(name)) for root in (here, there))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_demo_refuses_a_negative_seed(tmp_path, capsys):
    with pytest.raises(SystemExit, match="seed"):
        main(["demo", "--quick", "--seed", "-1", "--out", str(tmp_path)])


def test_demo_refuses_teachers_pretrained_on_other_framing(tmp_path):
    cfg = demo_config(quick=True)
    cfg.zoom = cfg.teachers.zoom + 0.5
    with pytest.raises(ValueError, match=f"zoom {cfg.teachers.zoom} .* zoom {cfg.zoom}"):
        run_demo(tmp_path / "run", config=cfg, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # refused before any work


def test_demo_refuses_a_folder_holding_outputs_another_program_wrote(tmp_path, capsys):
    mine = tmp_path / "data" / "measurements.csv"
    mine.parent.mkdir()
    mine.write_text("1,2,3")
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--quick", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and str(tmp_path / "data") in err and "no demo marker" in err
    assert mine.read_text() == "1,2,3" and not (tmp_path / "cache").exists()  # refused before any work


def test_a_demo_replaces_only_what_a_previous_demo_wrote(tmp_path):
    from prism_vfm.demo.pipeline import MARKER, prepare_output

    out = tmp_path / "demo"
    prepare_output(out)  # a fresh folder: created and marked
    assert (out / MARKER).is_file()
    for name in ("data", "figures", "stage1"):
        (out / name).mkdir()
        (out / name / "x").write_text("old")
    (out / "report.md").write_text("old report")
    (out / "notes.txt").write_text("the user's")
    prepare_output(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "notes.txt"])


def test_routing_settings_reach_the_student_and_both_optimisers(tmp_path):
    import dataclasses

    from prism_vfm.demo.pipeline import stage1_config, training_jobs
    from prism_vfm.distill.student import build_student

    released = dataclasses.replace(
        demo_config(),
        expert_init="copy",
        expert_dropout=0.1,
        noisy_gating=True,
        lambda_bias_init=2.0,
        router_lr_scale=1.0,
        routing_router_lr_scale=1.0,
        routing_distill=True,
    )
    s1 = stage1_config(released, tmp_path, tmp_path / "s1", tmp_path, 0)
    assert s1.optim.router_lr_scale == 1.0
    model = build_student(s1.student, teacher_dims=(8, 8, 8))
    assert model.moe_config.expert_init == "copy" and model.moe_config.noisy_gating
    jobs = {
        j.name: j.args[1]
        for j in training_jobs(released, tmp_path, tmp_path, tmp_path, tmp_path, tmp_path, 0)
    }
    assert jobs["stage2_routing/seed0"].router_lr_scale == 1.0
    assert jobs["stage2_routing/seed0"].distill.alpha == 1.0

    cfg = dataclasses.replace(demo_config(), context_init_std=0.05)  # the demo's own routing settings
    s1 = stage1_config(cfg, tmp_path, tmp_path / "s1", tmp_path, 0)
    assert s1.optim.router_lr_scale == 10.0
    model = build_student(s1.student, teacher_dims=(8, 8, 8))
    moe = model.moe_config
    assert (moe.expert_init, moe.expert_dropout, moe.noisy_gating) == ("random", 0.0, False)
    assert model.blocks[cfg.moe_layers[0]].lambda_gate.bias.detach().item() == 0.0
    jobs = {
        j.name: j.args[1] for j in training_jobs(cfg, tmp_path, tmp_path, tmp_path, tmp_path, tmp_path, 0)
    }
    assert jobs["stage2_routing/seed0"].router_lr_scale == cfg.routing_router_lr_scale == 5.0
    assert jobs["stage2_routing/seed1_shuffled"].router_lr_scale == cfg.routing_router_lr_scale == 5.0
    assert jobs["stage2_routing/seed2"].distill.alpha == 0.0
    assert jobs["stage2"].router_lr_scale == 1.0  # the multi-task run keeps the released rate


@pytest.mark.parametrize("distill", [True, False])
def test_each_kind_of_stage2_run_has_its_own_length_and_batch(tmp_path, distill):
    import dataclasses

    from prism_vfm.demo.pipeline import training_jobs

    cfg = dataclasses.replace(
        demo_config(),
        stage2_steps=7,
        stage2_batch=2,
        stage2_distill=distill,
        routing_steps=5,
        routing_batch=3,
        single_task_steps=4,
        single_task_batch=6,
    )
    jobs = {
        j.name: j.args[1] for j in training_jobs(cfg, tmp_path, tmp_path, tmp_path, tmp_path, tmp_path, 0)
    }
    assert (jobs["stage2"].iters, jobs["stage2"].batch_size) == (7, 2)
    assert jobs["stage2"].distill.alpha == (1.0 if distill else 0.0)
    assert {(c.iters, c.batch_size) for n, c in jobs.items() if n.startswith("stage2_routing/")} == {(5, 3)}
    baselines = {n: c for n, c in jobs.items() if n.startswith("single_task/")}
    assert len(baselines) == 5 and {(c.iters, c.batch_size) for c in baselines.values()} == {(4, 6)}


def test_the_scored_runs_take_the_demo_losses_for_their_own_tasks_and_the_routing_runs_the_released(tmp_path):
    import dataclasses

    from prism_vfm.demo.pipeline import training_jobs

    cfg = dataclasses.replace(
        demo_config(), stage2_loss_weights={"semseg": 3.0, "sal": 2.0}, stage2_class_balance={"semseg": 0.5}
    )
    jobs = {
        j.name: j.args[1] for j in training_jobs(cfg, tmp_path, tmp_path, tmp_path, tmp_path, tmp_path, 0)
    }
    assert jobs["stage2"].loss_weights == {"semseg": 3.0, "sal": 2.0}
    assert jobs["stage2"].class_balance == {"semseg": 0.5}
    assert (jobs["single_task/semseg"].loss_weights, jobs["single_task/semseg"].class_balance) == (
        {"semseg": 3.0},
        {"semseg": 0.5},
    )
    assert (jobs["single_task/sal"].loss_weights, jobs["single_task/sal"].class_balance) == ({"sal": 2.0}, {})
    assert jobs["single_task/normals"].loss_weights == {}
    routing = [c for n, c in jobs.items() if n.startswith("stage2_routing/")]
    assert len(routing) == 6 and all(c.loss_weights == {} and c.class_balance == {} for c in routing)
    # The boundary settings likewise: the multi-task run and the edge baseline, not the routing runs.
    assert (jobs["stage2"].subpixel_heads, jobs["stage2"].edge_label) == (("edge",), "evaluation")
    assert (jobs["single_task/edge"].subpixel_heads, jobs["single_task/edge"].edge_label) == (
        ("edge",),
        "evaluation",
    )
    assert jobs["single_task/semseg"].subpixel_heads == ()
    assert all(c.subpixel_heads == () and c.edge_label == "released" for c in routing)


def test_the_report_names_every_departure_from_the_released_recipe():
    import dataclasses

    from prism_vfm.demo.report import RELEASED, departures_text

    released = dataclasses.replace(demo_config(), **{key: value for key, value, _ in RELEASED})
    assert departures_text(released) == ""
    changed = dataclasses.replace(
        released, expert_init="random", stage2_scale_range=(0.8, 1.25), stage2_class_balance={"semseg": 0.5}
    )
    text = departures_text(changed)
    assert "expert initialisation random (released: copy)" in text
    assert "Stage-2 random rescale range 0.8–1.25 (released: 0.5–2)" in text
    assert "class-balance exponents of their cross-entropy semseg 0.5 (released: none)" in text
    heads = departures_text(dataclasses.replace(released, stage2_subpixel_heads=("edge",)))
    assert "sub-pixel decoder heads of those runs edge (released: none)" in heads
    label = departures_text(dataclasses.replace(released, stage2_edge_label="evaluation"))
    assert "their edge training label the boundaries the evaluation matches (released: the class map" in label
    assert "noisy gating" not in text


def test_the_evaluation_and_analysis_jobs_wait_for_exactly_the_runs_they_read(tmp_path):
    from prism_vfm.demo.pipeline import TRAININGS, training_jobs

    cfg = demo_config(quick=True)
    jobs = {
        j.name: j for j in training_jobs(cfg, tmp_path, tmp_path, tmp_path / "out", tmp_path, tmp_path, 0)
    }
    for task in dataset_tasks("pascalcontext"):
        job = jobs[f"evaluation/single_task/{task}"]
        assert (
            job.after == (f"single_task/{task}",) and job.args[0] == tmp_path / "out" / "single_task" / task
        )
    for kind, stage in (("teacher", "stage1"), ("task", "stage2_routing")):
        job = jobs[f"analysis/specialisation by {kind}"]
        runs = job.args[1]
        assert sorted(job.after) == sorted(n for n in jobs if n.startswith(f"{stage}/"))
        assert {f"{stage}/{path.name}" for path in runs.values()} == set(job.after)
        assert all(path.parent == tmp_path / "out" / stage for path in runs.values())
    order = list(jobs)  # a worker takes the first ready job: the analysis never delays a training
    trainings = [n for n in order if n.split("/")[0] in TRAININGS]
    assert len(trainings) == len(order) - 8  # five baselines' scores, two specialisations, the probes
    assert order[: len(trainings)] == trainings


def test_teacher_scenes_rendered_in_parts_equal_those_rendered_at_once_layout_included(tmp_path):
    """The teachers' pretraining sums follow the memory layout, so the parts must keep it (some targets are
    channels-last views)."""
    from safetensors.torch import load_file

    from prism_vfm.data.scenes import render_scene
    from prism_vfm.demo.teachers import (
        _TEACHER_STREAM,
        pretrain_from_parts,
        pretrain_teacher,
        render_targets,
        scene_targets,
    )

    cfg = DemoTeacherConfig(scenes=5, steps=2, batch_size=4, width=32, depth=1)
    parts = [render_targets(cfg, 0, 3, tmp_path / "a.pt"), render_targets(cfg, 3, 2, tmp_path / "b.pt")]
    size = (cfg.img_size, cfg.img_size)
    whole = scene_targets([render_scene(cfg.seed, i, size, _TEACHER_STREAM, cfg.zoom) for i in range(5)])
    pieces = [torch.load(p, weights_only=True) for p in parts]
    for key, value in whole.items():
        joined = torch.cat([piece[key] for piece in pieces])
        assert torch.equal(joined, value) and joined.stride() == value.stride(), key
    from_parts = pretrain_from_parts("demo_geometry", cfg, parts, tmp_path / "geometry.safetensors", False)
    expected = pretrain_teacher("demo_geometry", cfg, whole, False)
    got = load_file(from_parts)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
