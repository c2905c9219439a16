"""Every benchmark in one go, each in its own process with a time limit, outputs kept, ratios collected.

Made for a machine one has for a limited time (a GPU lent for minutes): one command runs the device's
tests and every benchmark with the settings of ``benchmarks/README.md``, writes each one's full output
to ``<out>/<name>.txt`` as it finishes (so what ran survives a cut-off), and ends with every ratio line
in ``<out>/summary.txt``. On a GPU (``--device cuda``) the benchmarks run in bf16 and the tests that need
CUDA run first; ``--quick`` makes every benchmark a smoke run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def plan(device: str, quick: bool) -> list[tuple[str, list[str]]]:
    """(name, command) of every run, in order; GPU settings follow benchmarks/README.md."""
    py = sys.executable
    gpu = device != "cpu"
    full_gpu = gpu and not quick
    common = ["--device", device] + (["--dtype", "bf16"] if gpu else []) + (["--quick"] if quick else [])
    stage2 = ["--img-size", "512"] if full_gpu else []  # PASCAL-Context's size
    runs: list[tuple[str, list[str]]] = []
    if gpu:
        cuda_tests = [
            "tests/test_moe_dispatch.py",
            "tests/test_teachers.py",
            "tests/test_metrics.py",
            "tests/test_video_head.py::test_head_on_cuda_agrees_with_the_cpu",
        ]
        runs.append(("cuda_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *cuda_tests]))
    runs += [
        ("dual_stream", [py, str(HERE / "bench_dual_stream.py"), *common]),
        ("student", [py, str(HERE / "bench_student.py"), *common]),
        ("stage2", [py, str(HERE / "bench_stage2.py"), *common, *stage2]),
        ("vidprism_head", [py, str(HERE / "bench_vidprism_head.py"), *common]),
    ]
    stage1 = ["--preset", "LB", "--img-size", "384", "--batch", "64"] if full_gpu else []
    runs.append(("stage1", [py, str(HERE / "bench_stage1.py"), *common, *stage1]))
    runs.append(("vidprism_model", [py, str(HERE / "bench_vidprism_model.py"), *common]))
    if not gpu:  # CPU work (the video loader's is CPU work on any host): not worth a lent GPU's minutes
        runs.append(("video_data", [py, str(HERE / "bench_video_data.py"), *(["--quick"] if quick else [])]))
        runs.append(("boundary", [py, str(HERE / "bench_boundary.py"), *(["--quick"] if quick else [])]))
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: bf16 and the CUDA tests)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the outputs")
    parser.add_argument("--timeout", type=float, default=600, help="seconds each run may take (default 600)")
    parser.add_argument("--only", default="", help="comma-separated run names to keep (default: all)")
    parser.add_argument("--quick", action="store_true", help="smoke runs: tiny sizes, not results")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(args.device, args.quick)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {name for name, _ in runs}
        if unknown:
            raise SystemExit(f"unknown run(s) {sorted(unknown)}; this plan has {[n for n, _ in runs]}")
        runs = [(n, c) for n, c in runs if n in wanted]
    summary: list[str] = []
    failed = []
    for name, cmd in runs:
        print(f"==> {name}: {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        try:
            done = subprocess.run(
                cmd, cwd=HERE.parent, capture_output=True, text=True, timeout=args.timeout, check=False
            )
            text, status = done.stdout + done.stderr, f"exit {done.returncode}"
            ok = done.returncode == 0
        except subprocess.TimeoutExpired as exc:
            text = _text(exc.stdout) + _text(exc.stderr)
            status, ok = f"stopped after {args.timeout:g} s", False
        (out / f"{name}.txt").write_text(text)
        line = f"{name}: {status} in {time.perf_counter() - start:.0f} s"
        print(line, flush=True)
        summary += [line, *(f"  {x}" for x in text.splitlines() if x.startswith(("ratio ", "throughput")))]
        if not ok:
            failed.append(name)
    (out / "summary.txt").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    if failed:
        raise SystemExit(f"runs that did not finish: {failed} (outputs in {out})")


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


if __name__ == "__main__":
    main()
