"""The benchmark scripts run end to end (``--quick``: tiny sizes, two rounds) and print their ratio lines."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from prism_vfm.data.synthetic import write_tiny_image_folder
from tests.conftest import REPO_ROOT

EXPECTED = {
    "bench_dual_stream.py": [
        "ratio train [loop, auto] (b)/(a) FFN vs timm Mlp:",
        "ratio train [loop, auto] (b)/(c) dispatch overhead:",
        "ratio train [padded] (b)/(c) dispatch overhead:",
        "ratio train [loop, fresh gradient memory] (b)/(c) dispatch overhead:",
        "ratio eval [loop, auto] (b)/(a) FFN vs timm Mlp:",
        "ratio train (c)/(a) floor vs timm Mlp:",
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
    "bench_student.py": [
        "ratio train student / dense:",
        "ratio train student + projectors / dense:",
        "ratio eval student / dense:",
    ],
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_benchmark_quick_run_prints_its_ratios(script, tmp_path):
    extra = ["--fresh-grad-memory"] if script == "bench_dual_stream.py" else []
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
    if script == "bench_stage2.py":  # the shared passes compute what the per-task passes compute
        gaps = [float(v) for v in re.findall(r"max \|shared - per task\| ([-+.e0-9]+)\)", result.stdout)]
        assert len(gaps) == 2 and max(gaps) < 1e-4, result.stdout
