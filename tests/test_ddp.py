"""The student trains under DDP without ``find_unused_parameters`` (every parameter gets a gradient)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

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
    dist.destroy_process_group()


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
