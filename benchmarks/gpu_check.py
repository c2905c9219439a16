"""The GPU check: everything a lent GPU must confirm, in one command and a fixed time budget.

In order, each in its own process with what is left of the budget, its full output kept in
``<out>/<step>.txt`` as soon as it ends (so whatever ran survives a cut-off):

1. ``environment``: PyTorch, the GPU, its compute capability and the precision ``amp=auto`` picks there;
2. ``data``: a tiny generated image folder and PASCAL-Context;
3. ``stage1`` / ``stage2`` / ``evaluate``: the library's commands under ``torchrun --nproc_per_node=N``
   (a NCCL process group even for one GPU), the ``grouped`` expert dispatch and bf16: a few Stage-1 steps,
   Stage 2 from that run's last checkpoint (sharded validation included), and the sharded evaluation;
4. ``video_train`` (and ``video_fsdp`` on several GPUs): ``prism video train`` on the tiny preset and a tiny
   generated video data set under the same torchrun, bf16 (``--fsdp``: the frame tower's blocks sharded);
5. ``cuda_tests``: the tests with CUDA paths;
6. ``vidprism_step``: VidPrism's whole training step at the released size (ViT-B/16, 32 frames of 224²,
   bf16, activation checkpointing) for batches 8 to 32 per GPU: clips/s, MFU, peak memory;
7. the GPU benchmarks of ``run_all.py`` (bf16, the README's settings; ``--quick-benchmarks``: smoke sizes).

``<out>/summary.txt`` lists every step's status and time, then the benchmarks' ratio lines; the command
exits non-zero when a step failed or was cut. ``--dry-run`` prints the plan and runs nothing.

    python benchmarks/gpu_check.py --out gpu_check          # about 6 minutes at most
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import run_all  # noqa: E402  (the benchmarks' plan, beside this file)

DEFAULT_BUDGET = 360.0
"""Seconds for the whole check: 6 minutes, within the time a lent GPU is planned for."""

CUDA_TESTS = (
    "tests/test_cuda_paths.py",
    "tests/test_moe_dispatch.py",
    "tests/test_teachers.py",
    "tests/test_metrics.py",
    "tests/test_precision.py",
    "tests/test_video_head.py::test_head_on_cuda_agrees_with_the_cpu",
)

ENVIRONMENT = """
import torch
from prism_vfm.train.precision import choose_precision
print("torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    d = torch.device("cuda", 0)
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
    print("native bf16", torch.cuda.is_bf16_supported(including_emulation=False))
    print("nccl", torch.distributed.is_nccl_available(), torch.cuda.nccl.version())
    print("amp=auto trains in", choose_precision("auto", d))
else:
    print("no CUDA device")
"""

DATA = """
import sys
from pathlib import Path
from prism_vfm.data.synthetic import write_tiny_image_folder
from prism_vfm.data.tiny_dense import write_tiny_pascal
from prism_vfm.video.data.synthetic import write_tiny_video_dataset
root = Path(sys.argv[1])
write_tiny_video_dataset(root / "video", "ucf101", n_classes=3, per_class=5)
write_tiny_image_folder(root / "images", n_classes=3, per_class=8, size=(40, 48), seed=0)
write_tiny_pascal(root / "PASCALContext", n_train=8, n_val=3, size=(40, 48), seed=0)
# The tiny backbone has no published single-task scores: placeholders, so that Δm is computed.
tasks = ("semseg", "human_parts", "normals", "edge", "sal")
(root / "baselines.json").write_text("{" + ", ".join(f'"{t}": 50.0' for t in tasks) + "}")
print("written", root)
"""


class Later:
    """A command argument known only when its step starts (e.g. the checkpoint an earlier step wrote)."""

    def __init__(self, describe: str, resolve: Callable[[], str]) -> None:
        self.describe = describe
        self.resolve = resolve


@dataclass
class Step:
    name: str
    command: Sequence[str | Later]
    cap: float | None  # seconds at most, within what is left; None: an equal share with the later None steps

    def shown(self) -> str:
        def show(a: str | Later) -> str:
            if isinstance(a, Later):
                return a.describe
            return f"<inline Python: {a.strip().splitlines()[0]} …>" if "\n" in a else a

        return " ".join(show(a) for a in self.command)

    def resolved(self) -> list[str]:
        return [a.resolve() if isinstance(a, Later) else a for a in self.command]


def _latest(run: Path) -> Later:
    def resolve() -> str:
        pointer = run / "checkpoints" / "latest"
        if not pointer.is_file():
            raise FileNotFoundError(f"{run} has no checkpoint: its step failed")
        return str(run / "checkpoints" / pointer.read_text().strip())

    return Later(f"<latest checkpoint of {run}>", resolve)


def plan(
    out: Path, device: str = "cuda", nproc: int = 1, quick_benchmarks: bool = False, amp: str = "bf16"
) -> list[Step]:
    """Every step of the check, in order (the commands of ``--dry-run``)."""
    py = sys.executable
    data = out / "data"
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    prism = [*torchrun, "-m", "prism_vfm.cli"]
    student = {
        "patch_size": 8,
        "embed_dim": 48,
        "depth": 4,
        "num_heads": 3,
        "moe_layers": [1, 3],
        "num_experts": 6,
        "top_k": 2,
        "dispatch": "grouped",
    }
    stage1 = [
        *prism,
        "distill",
        "--preset",
        "tiny",
        "--data",
        str(data / "images"),
        "--out",
        str(out / "stage1"),
        "--set",
        f"amp={amp}",
        "--set",
        "max_steps=4",
        "--set",
        "ckpt_every=2",
        "--set",
        f"student.overrides={json.dumps(student)}",
    ]
    stage2 = [
        *prism,
        "finetune",
        "--preset",
        "tiny",
        "--data",
        str(data / "PASCALContext"),
        "--init",
        _latest(out / "stage1"),
        "--out",
        str(out / "stage2"),
        "--set",
        f"amp={amp}",
        "--set",
        "max_steps=4",
        "--set",
        "val_every=2",
    ]
    evaluate = [
        *prism,
        "evaluate",
        "--checkpoint",
        _latest(out / "stage2"),
        "--dataset",
        "pascal",
        "--data",
        str(data / "PASCALContext"),
        "--out",
        str(out / "eval"),
        "--device",
        device,
        "--workers",
        "2",
        "--save-edges",
        "--baselines",
        str(data / "baselines.json"),
        "--img-size",
        "48",
        "64",  # the tiny preset's size
    ]
    video = [
        *prism,
        "video",
        "train",
        "--preset",
        "tiny",
        "--data",
        str(data / "video"),
        "--set",
        f"amp={amp}",
        "--set",
        "epochs=2",
    ]
    tests = [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *CUDA_TESTS]
    # The released size on a GPU; a tiny tower on the CPU (a rehearsal of the script, not a measurement).
    sizes = ["--dtype", "bf16", "--budget", "80"] if device == "cuda" else ["--quick"]
    vidprism_step = [py, str(HERE / "bench_vidprism_step.py"), "--device", device, *sizes]
    steps = [
        Step("environment", [py, "-c", ENVIRONMENT], 60),
        Step("data", [py, "-c", DATA, str(data)], 60),
        Step("stage1", stage1, 90),
        Step("stage2", stage2, 90),
        Step("evaluate", evaluate, 60),
        Step("video_train", [*video, "--out", str(out / "video")], 60),
    ]
    if nproc > 1:  # one process has nothing to shard
        steps.append(Step("video_fsdp", [*video, "--fsdp", "--out", str(out / "video_fsdp")], 60))
    steps += [Step("cuda_tests", tests, 120), Step("vidprism_step", vidprism_step, 100)]
    # Fewer rounds than the README's runs, so that every benchmark fits: real sizes, wider spreads.
    rounds = [] if quick_benchmarks else ["--repeats", "3", "--warmup", "1"]
    for name, command in run_all.plan(device, quick_benchmarks):
        if name != "cuda_tests":  # run above, with the tests of the multi-process path
            steps.append(Step(f"bench_{name}", [*command, *rounds], None))
    return steps


def run(steps: Sequence[Step], out: Path, budget: float, minimum: float = 5.0) -> tuple[list[str], list[str]]:
    """Run ``steps`` within ``budget`` seconds in all; returns the summary lines (also in summary.txt) and
    the names of the steps that failed, were stopped or did not start.

    A step gets ``min(cap, what is left)`` (without a cap: what is left shared equally with the later steps
    without one); once less than ``minimum`` seconds are left, the remaining
    steps are not started. A step that runs out of time is stopped with its whole process group (torchrun
    and its workers, pytest and its workers).
    """
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
    deadline = time.monotonic() + budget
    lines: list[str] = []
    ratios: list[str] = []
    failed: list[str] = []
    for i, step in enumerate(steps):
        left = deadline - time.monotonic()
        if left < minimum:
            lines.append(f"{step.name}: not started (budget of {budget:g} s spent)")
            failed.append(step.name)
            continue
        sharing = sum(1 for later in steps[i:] if later.cap is None)
        limit = min(step.cap, left) if step.cap is not None else left / sharing
        start = time.monotonic()
        try:
            command = step.resolved()
        except FileNotFoundError as exc:
            lines.append(f"{step.name}: not started ({exc})")
            failed.append(step.name)
            continue
        print(f"==> {step.name} (at most {limit:.0f} s): {' '.join(command)}", flush=True)
        text, status = _run(command, env, limit)
        if status != "exit 0":
            failed.append(step.name)
        (out / f"{step.name}.txt").write_text(f"$ {' '.join(command)}\n{text}")
        lines.append(f"{step.name}: {status} in {time.monotonic() - start:.0f} s")
        print(lines[-1], flush=True)
        ratios += [f"  {step.name} {x}" for x in text.splitlines() if x.startswith(("ratio ", "throughput"))]
    summary = lines + (["", "benchmark ratios:", *ratios] if ratios else [])
    (out / "summary.txt").write_text("\n".join(summary) + "\n")
    return summary, failed


def _run(command: Sequence[str], env: dict[str, str], limit: float) -> tuple[str, str]:
    """Output and status of ``command`` stopped after ``limit`` seconds (its whole process group)."""
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=limit)
        return output.decode(errors="replace"), f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return output.decode(errors="replace"), f"stopped after {limit:.0f} s"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for every output (new or empty)")
    parser.add_argument(
        "--budget", type=float, default=DEFAULT_BUDGET, help=f"seconds in all (default {DEFAULT_BUDGET:g})"
    )
    parser.add_argument("--nproc", type=int, default=1, help="GPUs for the torchrun steps (default 1)")
    parser.add_argument("--quick-benchmarks", action="store_true", help="benchmarks at smoke sizes")
    parser.add_argument(
        "--only", default="", help="comma-separated step names to keep (default: all; see --dry-run)"
    )
    parser.add_argument(
        "--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the same steps in fp32 (a rehearsal)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the steps and their commands, run nothing"
    )
    args = parser.parse_args(argv)
    if args.budget <= 0 or args.nproc < 1:
        parser.error("--budget must be positive and --nproc at least 1")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        parser.error(f"--out {out} exists and is not an empty folder: give a new one")
    amp = "bf16" if args.device == "cuda" else "fp32"
    steps = plan(out, args.device, args.nproc, args.quick_benchmarks, amp)
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {s.name for s in steps})
        if unknown:
            parser.error(f"unknown step(s) {unknown}; the steps are {[s.name for s in steps]}")
        steps = [s for s in steps if s.name in wanted]
    if args.dry_run:
        for step in steps:
            cap = f"at most {step.cap:g} s" if step.cap is not None else "a share of what is left"
            print(f"{step.name} ({cap}): {step.shown()}")
        print(f"budget: {args.budget:g} s in all; outputs in {out}")
        return 0
    summary, failed = run(steps, out, args.budget)
    print("\n".join(summary))
    if failed:
        print(f"steps that failed or did not finish: {failed} (outputs in {out})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
