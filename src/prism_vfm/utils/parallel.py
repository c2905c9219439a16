"""Run independent jobs side by side in worker processes, each on one torch thread.

Small models gain little from a second intra-op thread; two such jobs on two cores gain nearly 2×. A job is
a picklable call (a module-level function and its arguments) with a name and the names of the jobs it
needs first; ``run_jobs`` starts the jobs in list order as soon as a worker is free and their
prerequisites are done, so put the long ones first. Every job runs with ``torch.set_num_threads(1)``,
in a worker or (``workers=1``) in this process, so its result does not depend on how many run at once.

Every job also runs on ATen's own CPU kernels, with oneDNN off (``torch.backends.mkldnn.enabled``). On one
thread and small tensors, oneDNN's GELU takes twice as long as ATen's and compiles a kernel for each new
shape, and a mixture-of-experts layer hands its experts a different number of tokens every step: a demo
training needs 12–20 % less CPU time without it (benchmarks/README.md, "`prism demo`").
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Job:
    """One call to run: ``fn(*args, **kwargs)``; ``after`` names the jobs whose results it needs first
    (they must come earlier in the list). ``fn`` must be importable by name (a module-level function)."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    after: tuple[str, ...] = ()


@dataclass(frozen=True)
class JobResult:
    """What a job returned, its CPU and wall-clock seconds, and the process id that ran it."""

    name: str
    value: Any
    cpu_s: float
    wall_s: float
    worker: int


class JobError(RuntimeError):
    """A job raised; the message names the job, the original exception is the cause."""


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; ``os.cpu_count()`` where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _call(job: Job) -> JobResult:
    import torch

    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(1)
    # A settable module property, which the stubs type as its descriptor.
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]
    tic, cpu_tic = time.perf_counter(), time.process_time()
    try:
        value = job.fn(*job.args, **job.kwargs)
    finally:
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = onednn  # type: ignore[assignment]
    return JobResult(job.name, value, time.process_time() - cpu_tic, time.perf_counter() - tic, os.getpid())


def _check(jobs: Sequence[Job]) -> None:
    seen: set[str] = set()
    for job in jobs:
        if job.name in seen:
            raise ValueError(f"two jobs are named {job.name!r}")
        missing = [a for a in job.after if a not in seen]
        if missing:
            raise ValueError(f"job {job.name!r} needs {missing[0]!r}, which is not an earlier job")
        seen.add(job.name)


def run_jobs(
    jobs: Sequence[Job],
    workers: int | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, JobResult]:
    """Run ``jobs`` in ``workers`` processes (default: one per usable core, at most one per job) and return
    their results by name. ``workers=1`` runs them here, one after another in list order. Each finished
    job is passed to ``log`` as one line.

    Raises:
        ValueError: two jobs share a name, a job needs one that does not come before it, or ``workers < 1``.
        JobError: a job raised (the message names it); the jobs not yet started are cancelled.
    """
    _check(jobs)
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    workers = max(1, min(workers or usable_cores(), len(jobs)))
    done: dict[str, JobResult] = {}

    def finished(result: JobResult) -> None:
        done[result.name] = result
        if log is not None:
            r = result
            log(f"{r.name} done: {r.cpu_s:.1f} CPU s, {r.wall_s:.1f} s wall (process {r.worker})")

    if workers == 1:
        for job in jobs:
            try:
                result = _call(job)
            except Exception as exc:
                raise JobError(f"{job.name} failed: {type(exc).__name__}: {exc}") from exc
            finished(result)
        return done
    pending = list(jobs)
    running: dict[cf.Future[JobResult], Job] = {}
    with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        while pending or running:
            for job in list(pending):  # in list order: the first ready job gets the free worker
                if len(running) == workers:
                    break
                if all(name in done for name in job.after):
                    pending.remove(job)
                    running[pool.submit(_call, job)] = job
            ready, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in ready:
                job = running.pop(future)
                try:
                    result = future.result()
                except Exception as exc:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise JobError(f"{job.name} failed: {type(exc).__name__}: {exc}") from exc
                finished(result)
    return done


def critical_path(results: Mapping[str, JobResult]) -> float:
    """The largest CPU time any one worker process spent on ``results``: about the wall-clock time they
    need when every worker has a core of its own."""
    per_worker: dict[int, float] = {}
    for result in results.values():
        per_worker[result.worker] = per_worker.get(result.worker, 0.0) + result.cpu_s
    return max(per_worker.values(), default=0.0)
