"""The benchmark scripts run end to end (``--quick``: tiny sizes, two rounds) and print their ratio lines."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from prism_vfm.data.synthetic import write_tiny_image_folder
from tests.conftest import REPO_ROOT

EXPECTED = {
    "bench_dual_stream.py": [
        "ratio train [loop, auto] (b)/(a) FFN vs timm Mlp:",
        "ratio train [loop, auto] (b)/(c) dispatch overhead:",
        "ratio train [padded] (b)/(c) dispatch overhead:",
        "ratio train [loop, kept gradient memory] (b)/(c) dispatch overhead:",
        "ratio eval [loop, auto] (b)/(a) FFN vs timm Mlp:",
        "ratio train (c)/(a) floor vs timm Mlp:",
        "ratio train [loop, auto] (b)/(d) dispatch over the expert floor:",
        "ratio train (d)/(c) separate experts vs the floor:",
        "ratio eval (d)/(c) separate experts vs the floor:",
    ],
    "bench_boundary.py": [
        "ratio speed-up of the fast matcher:",
        "PASCAL-Context test (5105 images) on 16 cores:",
    ],
    "bench_stage1.py": [
        "throughput:",
        "teacher share of the step:",
        "data loader (0 workers):",
    ],
    "bench_stage2.py": [
        "ratio eval batch 1 speed-up per task / shared:",
        "ratio eval batch 2 speed-up per task / shared:",
        "ratio train batch 2 speed-up per pass / shared:",
    ],
    "bench_vidprism_model.py": [
        "ratio head share of the training step (head / step):",
        "eval throughput:",
    ],
    "bench_student.py": [
        "ratio train student / dense:",
        "ratio train student + projectors / dense:",
        "ratio train checkpointed / student + projectors:",
        "ratio eval student / dense:",
    ],
    "bench_vidprism_step.py": [
        "FLOPs per clip: model",
        "throughput vidprism step batch 2:",
        "largest batch that fitted: 2",
    ],
    "bench_video_data.py": [
        "rate training step",
        "ratio loader/step h264 pyav decode+augment vs the step on this CPU:",
    ],
    "demo_edge_ceiling.py": [
        "odsF ceiling 64 px (tolerance 0.68 px) boundaries:",
        "odsF ceiling 64 px (tolerance 0.68 px) training label:",
        "odsF ceiling 64 px (tolerance 0.68 px) head grid (16x16):",
    ],
    "bench_vidprism_head.py": [
        "agreement: max |logits(head) - logits(reference)|",
        "ratio train released loops / head (speed-up):",
        "ratio eval released loops / head (speed-up):",
    ],
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_benchmark_quick_run_prints_its_ratios(script, tmp_path):
    extra = ["--kept-grad-memory"] if script == "bench_dual_stream.py" else []
    if script == "bench_stage1.py":  # the data-loader measurement too, on a generated image folder
        write_tiny_image_folder(tmp_path / "images")
        extra = ["--data", str(tmp_path / "images"), "--workers", "0", "--loader-batches", "2"]
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / script), "--quick", *extra],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for line in EXPECTED[script]:
        assert line in result.stdout, f"{script} did not print {line!r}:\n{result.stdout}"
    assert "method:" in result.stdout
    if script == "bench_dual_stream.py":  # the expert floor does the same matrix products as the FFN and (c)
        flop_ratios = {
            label: float(v)
            for label, v in re.findall(r"^ratio ([^:]+): .*\| FLOP ratio ([.0-9]+)", result.stdout, re.M)
        }
        for label in (
            "train [loop, auto] (b)/(d) dispatch over the expert floor",
            "train (d)/(c) separate experts vs the floor",
        ):
            assert abs(flop_ratios[label] - 1) < 0.01, (label, flop_ratios[label])
    if script == "demo_edge_ceiling.py":  # each stand-in loses to the one it approximates, the grid most
        values = dict(
            re.findall(
                r"^odsF ceiling 64 px \(tolerance 0.68 px\) ([a-z ]+)[^:]*: ([.0-9]+)$", result.stdout, re.M
            )
        )
        scores = {kind.strip(): float(v) for kind, v in values.items()}
        assert scores["boundaries"] > scores["training label"] > scores["head grid"] > 0, scores
    if script == "bench_stage2.py":  # the shared passes compute what the per-task passes compute
        gaps = [float(v) for v in re.findall(r"max \|shared - per task\| ([-+.e0-9]+)\)", result.stdout)]
        assert len(gaps) == 2 and max(gaps) < 1e-4, result.stdout


@pytest.mark.timeout(180)
def test_processes_option_summarises_every_ratio_across_fresh_processes():
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "benchmarks" / "bench_dual_stream.py"),
            "--quick",
            "--processes",
            "2",
            "--backends",
            "loop",
            "--modes",
            "train",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("===== process ") == 2
    label = "train [loop, auto] (b)/(c) dispatch overhead"
    runs = [float(v) for v in re.findall(rf"^ratio {re.escape(label)}: ([.0-9]+)", result.stdout, re.M)]
    summary = re.search(
        rf"^across 2 processes {re.escape(label)}: ([.0-9]+) \| range ([.0-9]+)–([.0-9]+)",
        result.stdout,
        re.M,
    )
    assert len(runs) == 2 and summary, result.stdout
    median, low, high = (float(v) for v in summary.groups())
    assert abs(median - sum(runs) / 2) < 2e-3 and (low, high) == (round(min(runs), 3), round(max(runs), 3))


def test_ratio_lines_parse_back_with_their_target():
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import harness
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    text = (
        "ratio eval batch 1 speed-up per task / shared: 1.560 | quiet calls 1.540 | per-round 1.550 | "
        "minimums 1.500 | FLOP ratio 1.098 | target >= 1.12: all calls met\n"
        "not a ratio line\n"
        "ratio train (c)/(a) floor vs timm Mlp: 5.278 | per-round 5.330 | minimums 5.221"
    )
    parsed = harness.parse_ratios(text)
    assert parsed == {
        "eval batch 1 speed-up per task / shared": {"value": 1.56, "per-round": 1.55, "target": (">=", 1.12)},
        "train (c)/(a) floor vs timm Mlp": {"value": 5.278, "per-round": 5.33},
    }


@pytest.mark.timeout(300)
def test_run_all_keeps_every_output_and_collects_the_ratios(tmp_path):
    out = tmp_path / "results"
    script = REPO_ROOT / "benchmarks" / "run_all.py"
    command = [sys.executable, str(script), "--quick", "--out", str(out), "--only", "dual_stream,boundary"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["boundary.txt", "dual_stream.txt", "summary.txt"]
    assert "ratio train [loop, auto] (b)/(c) dispatch overhead:" in (out / "dual_stream.txt").read_text()
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("dual_stream: exit 0")
    assert "  ratio train [loop, auto] (b)/(c) dispatch overhead:" in summary
    assert "boundary: exit 0" in summary
    bad = subprocess.run(
        [sys.executable, str(script), "--out", str(out), "--only", "nope"], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "unknown run(s) ['nope']" in bad.stderr


def test_run_all_plans_the_gpu_settings_of_the_readme():
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import run_all
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    runs = dict(run_all.plan("cuda", quick=False))
    assert list(runs)[0] == "cuda_tests"
    stage1 = ["--device", "cuda", "--dtype", "bf16", "--preset", "LB", "--img-size", "384", "--batch", "64"]
    assert runs["stage1"][2:] == stage1
    assert runs["stage2"][2:] == ["--device", "cuda", "--dtype", "bf16", "--img-size", "512"]
    assert runs["vidprism_head"][2:] == ["--device", "cuda", "--dtype", "bf16"]
    assert runs["vidprism_model"][2:] == ["--device", "cuda", "--dtype", "bf16"]
    assert "boundary" not in runs


def test_edge_ceiling_head_grid_puts_edge_maxima_only_at_cell_centres():
    """A bilinear upsampling peaks at its cells' centres: a vertical edge anywhere in a 4-pixel cell comes
    out on the cell's middle columns (1 or 2 of 0-3), which is why the 64-pixel demo cannot hit most
    boundary pixels exactly."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import demo_edge_ceiling
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    for column in range(16, 20):  # every offset in the fifth cell
        label = np.zeros((32, 32), dtype=bool)
        label[:, column] = True
        edge = demo_edge_ceiling.head_grid(label)
        peak = int(edge[16].argmax())
        assert peak // 4 == 4 and peak % 4 in (1, 2), (column, edge[16])
        assert edge[16, peak] == edge[16].max() and edge[16, 18 if peak == 17 else 17] == edge[16, peak]
