"""benchmarks/gpu_check.py: its plan, the commands it builds, its time budget, and a CPU rehearsal."""

from __future__ import annotations

import json
import sys
import time

import pytest

from prism_vfm.cli import build_parser
from prism_vfm.config import apply_overrides, parse_override
from prism_vfm.distill.config import preset
from prism_vfm.finetune.config import preset as stage2_preset
from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
try:
    import gpu_check
finally:
    sys.path.remove(str(REPO_ROOT / "benchmarks"))


def cli_args(step: gpu_check.Step, resolved: dict[str, str] | None = None) -> list[str]:
    """The arguments a torchrun step hands ``prism`` (placeholders resolved to ``resolved``)."""
    command = [a.describe if isinstance(a, gpu_check.Later) else a for a in step.command]
    command = [(resolved or {}).get(a, a) for a in command]
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    return command[command.index("prism_vfm.cli") + 1 :]


def test_the_smoke_steps_are_valid_prism_commands_with_nccl_grouped_dispatch_and_bf16(tmp_path):
    steps = {s.name: s for s in gpu_check.plan(tmp_path / "out")}
    assert list(steps)[:8] == [
        "environment",
        "data",
        "stage1",
        "stage2",
        "evaluate",
        "video_train",
        "cuda_tests",
        "vidprism_step",
    ]
    parser = build_parser()
    args = parser.parse_args(cli_args(steps["stage1"]))
    cfg = apply_overrides(preset(args.preset), [parse_override(o) for o in args.set])
    assert cfg.amp == "bf16" and cfg.student.overrides["dispatch"] == "grouped"
    assert {k: v for k, v in cfg.student.overrides.items() if k != "dispatch"} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in preset("tiny").student.overrides.items()
    }
    stage1_ckpt = str(tmp_path / "out" / "stage1" / "checkpoints" / "step_00000004")
    args = parser.parse_args(
        cli_args(steps["stage2"], {f"<latest checkpoint of {tmp_path / 'out' / 'stage1'}>": stage1_ckpt})
    )
    assert args.init == stage1_ckpt and args.out == str(tmp_path / "out" / "stage2")
    assert apply_overrides(stage2_preset(args.preset), [parse_override(o) for o in args.set]).amp == "bf16"
    args = parser.parse_args(cli_args(steps["evaluate"]))
    assert args.device == "cuda" and args.img_size == [48, 64] and args.save_edges
    assert "tests/test_cuda_paths.py" in steps["cuda_tests"].command
    benches = [s for s in steps.values() if s.name.startswith("bench_")]
    assert [s.name for s in benches] == [
        "bench_dual_stream",
        "bench_student",
        "bench_stage2",
        "bench_vidprism_head",
        "bench_stage1",
        "bench_vidprism_model",
    ]
    assert all("--device" in s.command and "bf16" in s.command and s.cap is None for s in benches)


def test_the_stage2_checkpoint_is_read_when_its_step_starts(tmp_path):
    stage2 = next(s for s in gpu_check.plan(tmp_path) if s.name == "stage2")
    with pytest.raises(FileNotFoundError, match="has no checkpoint: its step failed"):
        stage2.resolved()
    (tmp_path / "stage1" / "checkpoints").mkdir(parents=True)
    (tmp_path / "stage1" / "checkpoints" / "latest").write_text("step_00000004\n")
    assert str(tmp_path / "stage1" / "checkpoints" / "step_00000004") in stage2.resolved()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "check"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    for name in (
        "environment",
        "data",
        "stage1",
        "stage2",
        "evaluate",
        "video_train",
        "cuda_tests",
        "vidprism_step",
    ):
        assert f"\n{name} (" in "\n" + printed, name
    assert "<latest checkpoint of" in printed and "budget: 360 s in all" in printed
    assert not (tmp_path / "check").exists()


def test_bad_options_are_refused_before_anything_runs(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("a user's file")
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path / "full")])
    assert "exists and is not an empty folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path / "new"), "--only", "stage3"])
    assert "unknown step(s) ['stage3']" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_the_budget_stops_a_step_with_its_children_and_skips_the_rest(tmp_path):
    py = sys.executable
    marker = tmp_path / "child_survived"
    # The step starts a child that would write a file after 6 s: stopping the step must stop it too.
    child = f"import time, pathlib; time.sleep(6); pathlib.Path({str(marker)!r}).write_text('')"
    slow = (
        f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"
    )
    steps = [
        gpu_check.Step("quick", [py, "-c", "print('ratio a/b: 1.5')"], 30),
        gpu_check.Step("slow", [py, "-c", slow], None),
        gpu_check.Step("after", [py, "-c", "print(1)"], 30),
    ]
    start = time.monotonic()
    summary, failed = gpu_check.run(steps, tmp_path / "out", budget=4.0, minimum=1.0)
    assert time.monotonic() - start < 10
    assert summary[0].startswith("quick: exit 0")
    assert summary[1].startswith("slow: stopped after") and summary[2].startswith("after: not started")
    assert failed == ["slow", "after"]
    assert "  quick ratio a/b: 1.5" in (tmp_path / "out" / "summary.txt").read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["quick.txt", "slow.txt", "summary.txt"]
    time.sleep(7)
    assert not marker.exists()


def test_the_video_steps_train_vidprism_under_torchrun_in_bf16_with_fsdp_on_several_gpus(tmp_path):
    from prism_vfm.video.train_config import VideoTrainConfig
    from prism_vfm.video.train_config import preset as video_preset

    steps = {s.name: s for s in gpu_check.plan(tmp_path / "out")}
    assert "video_fsdp" not in steps  # one process has nothing to shard
    args = build_parser().parse_args(cli_args(steps["video_train"]))
    assert (args.video_command, args.preset, args.fsdp) == ("train", "tiny", False)
    assert args.data == str(tmp_path / "out" / "data" / "video")
    cfg = apply_overrides(video_preset(args.preset), [parse_override(o) for o in args.set])
    assert isinstance(cfg, VideoTrainConfig) and cfg.amp == "bf16" and cfg.epochs == 2
    two = {s.name: s for s in gpu_check.plan(tmp_path / "out", nproc=2)}
    command = two["video_fsdp"].command
    assert "--nproc_per_node=2" in command and "--fsdp" in command
    assert build_parser().parse_args(command[command.index("prism_vfm.cli") + 1 :]).fsdp


def test_the_vidprism_step_runs_the_released_size_in_bf16_on_a_gpu(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import bench_vidprism_step
        import harness
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    step = next(s for s in gpu_check.plan(tmp_path) if s.name == "vidprism_step")
    args = bench_vidprism_step.build_parser().parse_args(step.command[2:])
    assert (args.device, args.dtype, args.tower, args.frames, args.quick) == (
        "cuda",
        "bf16",
        "ViT-B/16",
        32,
        False,
    )
    assert args.batches == "8,16,24,32" and step.cap is not None and args.budget < step.cap
    cpu = next(s for s in gpu_check.plan(tmp_path, device="cpu") if s.name == "vidprism_step")
    assert "--quick" in cpu.command
    assert harness.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert harness.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert harness.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert harness.peak_bf16_tflops("NVIDIA L40S") == 362.0 and harness.peak_bf16_tflops("NVIDIA L4") == 121.0
    assert harness.peak_bf16_tflops("Tesla V100-SXM2-16GB") is None


@pytest.mark.timeout(300)
def test_cpu_rehearsal_of_the_vidprism_steps(tmp_path):
    out = tmp_path / "check"
    code = gpu_check.main(["--out", str(out), "--device", "cpu", "--only", "data,video_train,vidprism_step"])
    summary = (out / "summary.txt").read_text()
    assert code == 0, summary + "".join(
        (out / f"{s}.txt").read_text()[-3000:] for s in ("video_train", "vidprism_step")
    )
    assert json.loads((out / "video" / "summary.json").read_text())["steps"] == 8
    assert "  vidprism_step throughput vidprism step batch 2:" in summary


@pytest.mark.timeout(300)
def test_cpu_rehearsal_runs_both_stages_and_the_evaluation_under_torchrun(tmp_path):
    out = tmp_path / "check"
    code = gpu_check.main(
        ["--out", str(out), "--device", "cpu", "--only", "data,stage1,stage2,evaluate", "--budget", "280"]
    )
    summary = (out / "summary.txt").read_text()
    assert code == 0, summary + "".join((out / f"{s}.txt").read_text()[-3000:] for s in ("stage1", "stage2"))
    assert [line.split(":")[1].split(" in ")[0] for line in summary.splitlines()] == [" exit 0"] * 4
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["images"] == 3 and len(list((out / "eval" / "edge").glob("*.png"))) == 3
