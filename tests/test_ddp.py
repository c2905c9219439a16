"""The student trains under DDP without ``find_unused_parameters`` (every parameter gets a gradient)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from prism_vfm.train.distributed import (
    DistEnv,
    clip_grad_norm,
    gradient_sync,
    shutdown_distributed,
    wrap_model,
)
from tests.tiny import tiny_student


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DDP(tiny_student(), find_unused_parameters=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        g = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(3, 3, 32, 32, generator=g)
        # Step 1 lacks teachers 1 and 2: their heads join through the zero-weight term.
        ctx = torch.tensor([0, 0, 0]) if step == 1 else torch.tensor([0, 1, 2])
        student = model(x, ctx, return_routing=True)  # a pytree: DDP finds the tensors inside
        proj = model.module.project_by_teacher(student.taps, ctx, model.module.grid_size(x))
        loss = student.aux_loss + sum(m.square().mean() for maps in proj.values() for m in maps)
        loss = loss + model.module.absent_heads_term(proj)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({k: v.detach() for k, v in model.module.state_dict().items()}, f"{out}/rank{rank}.pt")
    shutdown_distributed()


def test_ddp_trains_without_find_unused_parameters(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    torch.manual_seed(0)
    start = tiny_student().state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # The experts and router really were trained (their gradients were reduced, not skipped).
    assert not torch.equal(a["blocks.1.moe.experts.w1"], start["blocks.1.moe.experts.w1"])
    assert not torch.equal(a["blocks.3.moe.router.gate.weight"], start["blocks.3.moe.router.gate.weight"])


class _Toy(torch.nn.Module):
    """``a`` sharded (a unit for ``a.0`` under one for ``a``); ``b`` used only when asked (on one rank),
    ``c`` never, ``d`` always."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        self.b, self.c, self.d = (torch.nn.Linear(4, 4) for _ in range(3))

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        h = self.a(x)
        return self.d(h + self.b(h) if use_b else h)


def _toy_batch(rank: int) -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(rank))


def _partly_sharded_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    _partly_sharded_steps(rank, out)
    shutdown_distributed()


def _partly_sharded_steps(rank: int, out: str) -> None:
    torch.manual_seed(0)
    model = _Toy()
    env = DistEnv(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
    net = wrap_model(model, env, fsdp=True, units=[model.a[0]], find_unused=True, shard_root=model.a)
    for micro, sync in enumerate((False, True)):  # two accumulation micro-steps
        with gradient_sync(net, sync):
            (net(_toy_batch(2 * micro + rank), use_b=rank == 0).square().mean() / 2).backward()
    norm = clip_grad_norm(model.parameters(), 0.05)
    grads = {
        n: None if p.grad is None else p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        for n, p in model.named_parameters()
    }
    if rank == 0:
        torch.save(
            {"grads": grads, "norm": norm, "sharded": [type(m.weight).__name__ for m in (*model.a, model.b)]},
            f"{out}/grads.pt",
        )


def test_partly_sharded_units_average_gradients_as_ddp_does_with_unused_parameters(tmp_path):
    """FSDP2 for ``a``, ``b`` (a gradient on one rank), ``c`` (none anywhere) and ``d`` replicated: the
    gradients are the one-process gradients of the four micro-batches (``b``'s counted as zero where it is
    unused), ``c`` keeps none, and the clipped norm spans sharded and replicated parameters alike."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_partly_sharded_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    saved = torch.load(tmp_path / "grads.pt", weights_only=True)
    assert saved["sharded"] == ["DTensor", "DTensor", "Parameter"]
    torch.manual_seed(0)
    model = _Toy()
    for micro in range(2):
        for rank in range(2):
            (model(_toy_batch(2 * micro + rank), use_b=rank == 0).square().mean() / 4).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    assert norm > 0.05  # the gradients were clipped
    torch.testing.assert_close(saved["norm"], norm)
    for name, p in model.named_parameters():
        if name.startswith("c."):
            assert saved["grads"][name] is None and p.grad is None
        else:
            torch.testing.assert_close(saved["grads"][name], p.grad, msg=name)


def _one_process_group(tmp_path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)


@pytest.fixture
def no_group_left():
    """A group the code under test fails to leave is not handed on to the tests after it."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_leaving_the_group_frees_what_fsdp_keeps_in_reference_cycles_first(tmp_path, no_group_left):
    """A sharded module lives in reference cycles after its last reference goes; left to interpreter shutdown
    it outlives the process group, and gloo can abort a finished process there."""
    import weakref

    from torch.distributed.fsdp import fully_shard

    _one_process_group(tmp_path)
    module = torch.nn.Sequential(torch.nn.Linear(4, 4))
    fully_shard(module)
    module(torch.randn(2, 4)).sum().backward()
    alive = weakref.ref(module)
    del module
    assert alive() is not None  # the cycles the helper has to collect
    shutdown_distributed()
    assert alive() is None and not dist.is_initialized()
    shutdown_distributed()  # without a group: nothing to do


def test_a_command_run_under_torchrun_leaves_its_process_group(tmp_path, monkeypatch, no_group_left):
    import argparse

    from prism_vfm import cli

    ran = []

    def command(args: argparse.Namespace) -> None:
        _one_process_group(tmp_path)
        ran.append(args.command)

    class Parser:
        def parse_args(self, argv):
            return argparse.Namespace(command="evaluate", func=command)

    monkeypatch.setattr(cli, "build_parser", Parser)
    cli.main([])
    assert ran == ["evaluate"] and not dist.is_initialized()
