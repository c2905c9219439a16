"""What the benchmarks share: command-line options, interleaved timing, peak memory and the report.

Method (printed by every script): each case is warmed up, then the cases are run one after another
in a rotating order (A B C, B C A, C A B, ...) for several rounds, so that whatever else the machine
is doing falls on all of them alike. Each case reports the median and the minimum wall time of its
calls; a ratio is the ratio of the medians. On a shared Linux machine each call is also marked
*quiet* when other processes used less than ``QUIET_SHARE`` of the CPU time available while it ran
(from ``/proc/stat`` less this process's own time), and the medians over quiet calls are reported
beside those over all calls: on two cores, a neighbour that takes one core stalls every
two-thread parallel region until its thread is scheduled again, which penalises code made of many
small operations far more than code made of few large ones. On CUDA the device is synchronised
before and after every timed call.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from prism_vfm.layers.experts import release_grad_memory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUIET_SHARE = 0.05
ALLOCATOR_ENV = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE", "PYTORCH_")

METHOD = (
    "method: {warmup} warm-up call(s) per case, then {repeats} rounds over all cases in rotating order "
    "(interleaved, so background load hits every case alike); per case the median and minimum wall "
    "time, over all calls and over quiet calls (other processes took < {quiet:.0%} of the CPU time "
    "while the call ran); a ratio is the ratio of medians, also given over quiet calls, as the median of "
    "the per-round ratios and as the ratio of minimums. Peak memory, in one further untimed call per "
    "case: {memory}."
)
CUDA_MEMORY = "torch.cuda.max_memory_allocated during the call, minus what was allocated before it"
CPU_MEMORY = (
    "peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs before the call) minus "
    "the resident size before it, after malloc_trim: what the call newly touches, allocator slack and "
    "fragmentation included, so an upper bound on its tensors' peak; gradient memory the experts keep "
    "between steps is given back before the call, so it counts here"
)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Options every benchmark takes."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="bf16 runs under autocast")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on the CPU (default 2)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds over all cases (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per case first (default 2)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, one thread, 2 rounds: a smoke run, not a result"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run the whole measurement this many times, each in a fresh process, one after another, and "
        "summarise every ratio across them (a machine's speed can drift between processes by more than "
        "it does within one run; default 1)",
    )


def in_processes(args: argparse.Namespace, argv: Sequence[str] | None) -> bool:
    """With ``--processes N`` (N > 1): run this script N times in fresh processes, print each run, then
    every ratio summarised across them (median, range; the target judged on the median). Returns whether
    it did, in which case the caller has nothing left to do."""
    if args.processes <= 1:
        return False
    rest = list(sys.argv[1:] if argv is None else argv)
    runs: list[dict[str, dict[str, Any]]] = []
    for i in range(args.processes):
        print(f"===== process {i + 1} of {args.processes}", flush=True)
        child = subprocess.run(
            [sys.executable, sys.argv[0], *_without_processes(rest), "--processes", "1"],
            capture_output=True,
            text=True,
            check=False,
        )
        print(child.stdout, end="", flush=True)
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            raise SystemExit(f"process {i + 1} of {args.processes} failed (exit status {child.returncode})")
        runs.append(parse_ratios(child.stdout))
    print(f"\n===== every ratio across {args.processes} processes (median, then range)")
    for label in dict.fromkeys(k for run in runs for k in run):
        seen = [run[label] for run in runs if label in run]
        value = statistics.median(r["value"] for r in seen)
        parts = [f"across {len(seen)} processes {label}: {value:.3f}"]
        parts.append(f"range {min(r['value'] for r in seen):.3f}–{max(r['value'] for r in seen):.3f}")
        paired = [r["per-round"] for r in seen if "per-round" in r]
        if paired:
            parts.append(f"per-round {statistics.median(paired):.3f} ({min(paired):.3f}–{max(paired):.3f})")
        target = seen[0].get("target")
        if target is not None:
            op, bound = target
            met = value >= bound if op == ">=" else value <= bound
            parts.append(f"target {op} {bound:g}: median {'met' if met else 'NOT met'}")
        print(" | ".join(parts))
    return True


def parse_ratios(text: str) -> dict[str, dict[str, Any]]:
    """The ``ratio ...`` lines :func:`ratio` printed: {label: {"value", "per-round", "target": (op, x)}}."""
    out: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        if not line.startswith("ratio "):
            continue
        head, *parts = line.split(" | ")
        label, _, value = head[len("ratio ") :].rpartition(": ")
        entry: dict[str, Any] = {"value": float(value)}
        for part in parts:
            if part.startswith("per-round "):
                entry["per-round"] = float(part.split()[1])
            elif part.startswith("target "):
                op, bound = part.split(":")[0].split()[1:3]
                entry["target"] = (op, float(bound))
        out[label] = entry
    return out


def _without_processes(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--processes":
            skip = True
        elif not a.startswith("--processes="):
            out.append(a)
    return out


def setup(args: argparse.Namespace) -> torch.device:
    """Apply the thread count and seed; the device to run on."""
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 2), min(args.warmup, 1)
        # One thread: tiny operations on two threads mostly measure scheduling on a busy machine.
        args.threads = 1
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return device


def autocast(args: argparse.Namespace, device: torch.device) -> AbstractContextManager:
    """bf16 means mixed precision as in training (fp32 weights, autocast), not a bf16 copy of the model."""
    if args.dtype == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[args.dtype])


def train_call(loss: Callable[[], torch.Tensor], amp: AbstractContextManager) -> Callable[[], None]:
    """A timed call: ``loss()`` under ``amp``, then its backward."""

    def run() -> None:
        with amp:
            value = loss()
        value.backward()

    return run


def inference_call(fn: Callable[[], object], amp: AbstractContextManager) -> Callable[[], None]:
    """A timed call: ``fn()`` under ``amp`` without gradients."""

    def run() -> None:
        with torch.no_grad(), amp:
            fn()

    return run


@dataclass
class Case:
    """One thing to time: ``run`` is the timed work; ``reset`` runs, untimed, before every call."""

    name: str
    run: Callable[[], object]
    reset: Callable[[], None] = lambda: None


@dataclass
class Result:
    """The wall times of one case's calls, which of them were quiet, and its peak memory."""

    times: list[float] = field(default_factory=list)
    quiet: list[bool] = field(default_factory=list)
    peak_bytes: int | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def quiet_times(self) -> list[float]:
        return [t for t, q in zip(self.times, self.quiet, strict=True) if q]


class OtherLoad:
    """Share of the machine's CPU time that other processes used between ``start`` and ``share``.

    Linux only (``/proc``); elsewhere ``share`` is None and no call is marked quiet.
    """

    def __init__(self) -> None:
        self.available = os.path.exists("/proc/stat") and os.path.exists("/proc/self/stat")
        self._start = (0, 0, 0)

    def start(self) -> None:
        if self.available:
            self._start = self._read()

    def share(self) -> float | None:
        if not self.available:
            return None
        busy, total, own = (b - a for a, b in zip(self._start, self._read(), strict=True))
        return max(busy - own, 0) / total if total else 0.0

    @staticmethod
    def _read() -> tuple[int, int, int]:
        with open("/proc/stat") as f:
            # user nice system idle iowait irq softirq steal, in clock ticks
            ticks = [int(v) for v in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        own = int(fields[11]) + int(fields[12])  # utime + stime of all this process's threads
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks), own


class PeakMemory:
    """Peak memory of one call: CUDA allocator statistics, or the process's resident-set high-water mark."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        libc = ctypes.util.find_library("c") if platform.system() == "Linux" else None
        self._libc = ctypes.CDLL(libc) if libc else None
        self.available = device.type == "cuda" or self._can_reset_rss()
        self._base = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.available:
            if self._libc is not None:
                # Hand freed heap pages back first, or memory kept from earlier calls would hide in the base.
                self._libc.malloc_trim(0)
            _reset_rss_peak()
            self._base = _status_kib("VmRSS") * 1024

    def stop(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self._base
        if self.available:
            return _status_kib("VmHWM") * 1024 - self._base
        return None

    @staticmethod
    def _can_reset_rss() -> bool:
        try:
            _reset_rss_peak()
            return _status_kib("VmHWM") > 0
        except (OSError, KeyError):
            return False


def _reset_rss_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_interleaved(
    cases: Sequence[Case], repeats: int, warmup: int, device: torch.device
) -> dict[str, Result]:
    """Time every case ``repeats`` times, interleaved in rotating order after ``warmup`` calls each."""
    results = {case.name: Result() for case in cases}
    for _ in range(warmup):
        for case in cases:
            case.reset()
            case.run()
    load = OtherLoad()
    for r in range(repeats):
        shift = r % len(cases)
        for case in [*cases[shift:], *cases[:shift]]:
            case.reset()
            _sync(device)
            load.start()
            t0 = time.perf_counter()
            case.run()
            _sync(device)
            elapsed = time.perf_counter() - t0
            share = load.share()
            results[case.name].times.append(elapsed)
            results[case.name].quiet.append(share is not None and share < QUIET_SHARE)
    return results


def measure_memory(
    cases: Sequence[Case],
    results: dict[str, Result],
    device: torch.device,
    models: Sequence[torch.nn.Module] = (),
) -> None:
    """One more, untimed, call per case for its peak memory (kept apart: resetting the meter costs time).

    The gradient memory the ``models``' experts keep between steps on the CPU is given back before each
    call, so that it counts in the peak of the call that uses it rather than hiding in the baseline.
    """
    meter = PeakMemory(device)
    for case in cases:
        case.reset()
        for model in models:
            release_grad_memory(model)
        meter.start()
        case.run()
        results[case.name].peak_bytes = meter.stop()


def describe(args: argparse.Namespace, device: torch.device, memory: bool = False) -> None:
    """Print the machine, the versions and the method."""
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
        memory_text = CUDA_MEMORY
    else:
        where = f"{_cpu_name()}, {os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()}"
        memory_text = CPU_MEMORY
    print(f"machine: {where}; torch {torch.__version__}; dtype {args.dtype}")
    # Allocator settings change CPU timings a lot (fresh pages for every large gradient): say which ran.
    allocator = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(ALLOCATOR_ENV)]
    print(f"allocator environment: {' '.join(allocator) or 'default'}")
    print(f"load average before: {_loadavg()}")
    print(
        METHOD.format(
            warmup=args.warmup,
            repeats=args.repeats,
            quiet=QUIET_SHARE,
            memory=memory_text if memory else "not measured",
        )
    )


def report(title: str, results: dict[str, Result]) -> None:
    """One table row per case: median and minimum over all calls, median over quiet calls, peak memory."""
    print(f"\n{title}")
    print(f"  {'case':<36} {'median ms':>10} {'min ms':>9} {'quiet median ms':>18} {'peak MiB':>9}")
    for name, res in results.items():
        peak = "-" if res.peak_bytes is None else f"{res.peak_bytes / 2**20:.0f}"
        quiet = res.quiet_times
        quiet_text = f"{statistics.median(quiet) * 1e3:.1f} ({len(quiet)}/{len(res.times)})" if quiet else "-"
        print(
            f"  {name:<36} {res.median * 1e3:>10.1f} {min(res.times) * 1e3:>9.1f} {quiet_text:>18} {peak:>9}"
        )


def ratio(
    label: str,
    num: Result,
    den: Result,
    target: float | None = None,
    flops: float | None = None,
    at_least: bool = False,
) -> None:
    """Print ``ratio <label>: x`` (of medians over all calls), then of medians over quiet calls, the
    median of the per-round ratios, the ratio of minimums, the FLOP ratio and the target (an upper
    bound, or a lower bound with ``at_least``, e.g. for a speed-up)."""
    value = num.median / den.median
    parts = [f"ratio {label}: {value:.3f}"]
    quiet_num, quiet_den = num.quiet_times, den.quiet_times
    quiet_value = None
    if quiet_num and quiet_den:
        quiet_value = statistics.median(quiet_num) / statistics.median(quiet_den)
        parts.append(f"quiet calls {quiet_value:.3f}")
    # Both cases run once per round, close in time: the per-round ratio cancels slow drifts in speed.
    paired = statistics.median(a / b for a, b in zip(num.times, den.times, strict=True))
    parts.append(f"per-round {paired:.3f}")
    parts.append(f"minimums {min(num.times) / min(den.times):.3f}")
    if flops is not None:
        parts.append(f"FLOP ratio {flops:.3f}")
    if target is not None:

        def met(x: float) -> str:
            return "met" if (x >= target if at_least else x <= target) else "NOT met"

        verdict = f"all calls {met(value)}"
        if quiet_value is not None:
            verdict += f", quiet calls {met(quiet_value)}"
        parts.append(f"target {'>=' if at_least else '<='} {target}: {verdict}")
    print(" | ".join(parts))


def finish() -> None:
    print(f"\nload average after: {_loadavg()}")


PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    # Dense bf16 tensor-core peaks of the vendors' data sheets (no sparsity), matched in this order
    # against torch.cuda.get_device_name (a more specific name first).
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
)
"""Device-name fragments and their dense bf16 peak in TFLOP/s (for MFU); any other device: unknown."""


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named ``device_name`` (:data:`PEAK_BF16_TFLOPS`), or None if unknown."""
    for fragment, peak in PEAK_BF16_TFLOPS:
        if fragment in device_name:
            return peak
    return None


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matrix products and attention ``fn`` dispatches (torch.utils.flop_counter)."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    # flop_counter has formulas for the GPU attention kernels only; the CPU one does the same products.
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: (
            flop_counter.sdpa_flop_count(q, k, v)
        ),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda g, q, k, v, *_, **__: (
            flop_counter.sdpa_backward_flop_count(g, q, k, v)
        ),
    }
    with flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        fn()
    return counter.get_total_flops()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"
