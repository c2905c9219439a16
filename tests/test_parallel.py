"""run_jobs: jobs run side by side in one-thread worker processes, in dependency order, and a failing
job is named."""

from __future__ import annotations

import math
import operator
import os

import pytest
import torch

from prism_vfm.utils.parallel import Job, JobError, JobResult, critical_path, run_jobs


def test_jobs_run_in_worker_processes_on_one_thread_each():
    jobs = [
        Job("root", math.sqrt, (16.0,)),
        Job("threads", torch.get_num_threads),
        Job("onednn", torch._C._get_mkldnn_enabled),
        Job("sum", operator.add, (2, 3), after=("root",)),
    ]
    lines: list[str] = []
    results = run_jobs(jobs, workers=2, log=lines.append)
    values = {n: r.value for n, r in results.items()}
    assert values == {"root": 4.0, "threads": 1, "onednn": False, "sum": 5}
    assert all(r.worker != os.getpid() and r.cpu_s >= 0 and r.wall_s > 0 for r in results.values())
    logged = sorted(line.split()[0] for line in lines)
    assert logged == ["onednn", "root", "sum", "threads"]  # each finished job logged


def test_one_worker_runs_the_jobs_here_on_one_thread_and_restores_the_threads():
    torch.set_num_threads(2)
    try:
        jobs = [Job("threads", torch.get_num_threads), Job("onednn", torch._C._get_mkldnn_enabled)]
        results = run_jobs(jobs, workers=1, log=None)
        assert results["threads"].value == 1 and results["threads"].worker == os.getpid()
        assert results["onednn"].value is False  # the jobs run on ATen's own kernels
        assert torch.get_num_threads() == 2 and torch.backends.mkldnn.enabled  # both restored
    finally:
        torch.set_num_threads(1)


def test_a_failing_job_still_restores_onednn():
    with pytest.raises(JobError):
        run_jobs([Job("bad", math.sqrt, (-1.0,))], workers=1, log=None)
    assert torch.backends.mkldnn.enabled


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_job_is_named_with_its_error(workers):
    jobs = [Job("fine", math.sqrt, (4.0,)), Job("stage1/seed3", math.sqrt, (-1.0,), after=("fine",))]
    with pytest.raises(JobError, match=r"stage1/seed3 failed: ValueError: math domain error") as error:
        run_jobs(jobs, workers=workers, log=None)
    assert error.value.__cause__ is not None


def test_bad_job_lists_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match="two jobs are named 'a'"):
        run_jobs([Job("a", math.sqrt, (1.0,)), Job("a", math.sqrt, (1.0,))])
    with pytest.raises(ValueError, match="job 'b' needs 'c', which is not an earlier job"):
        run_jobs([Job("b", math.sqrt, (1.0,), after=("c",)), Job("c", math.sqrt, (1.0,))])
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        run_jobs([Job("a", math.sqrt, (1.0,))], workers=0)


def test_critical_path_is_the_busiest_workers_cpu_time():
    results = {
        "long": JobResult("long", None, 10.0, 11.0, worker=1),
        "a": JobResult("a", None, 4.0, 5.0, worker=2),
        "b": JobResult("b", None, 3.0, 3.0, worker=2),
        "c": JobResult("c", None, 2.5, 3.0, worker=1),
    }
    assert critical_path(results) == 12.5
    assert critical_path({}) == 0.0
