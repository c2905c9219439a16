"""torchrun environment: process group, device, rank helpers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistEnv:
    """Join the torchrun process group when launched by torchrun (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over processes (identity without a process group)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


def barrier() -> None:
    """Wait for every process (no-op without a process group).

    The trainers call it before returning so that no rank can look for a checkpoint the main
    process is still writing (e.g. a resume that starts right after a run ends).
    """
    if dist.is_initialized():
        dist.barrier()


def average_floating_buffers(module: torch.nn.Module) -> None:
    """Average every floating-point buffer (e.g. BatchNorm running statistics) over the processes, in place.

    Where SyncBatchNorm is unavailable (CPU processes), each rank's running statistics follow its own
    batches; averaging them before a checkpoint makes the saved statistics those of all the data.
    """
    if not dist.is_initialized():
        return
    world = dist.get_world_size()
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(world)


def wrap_model(
    model: torch.nn.Module, env: DistEnv, fsdp: bool, units: Iterable[torch.nn.Module] = ()
) -> torch.nn.Module:
    """DDP (no ``find_unused_parameters``) or FSDP2 sharding for several processes; the model itself for one.

    With ``fsdp``, every module of ``units`` (e.g. the transformer blocks and projector heads) becomes its own
    FSDP unit and the root holds the rest; parameters are then sharded in place, so the optimiser must be
    built after this call.
    """
    if env.world_size == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for unit in units:
            fully_shard(unit)
        fully_shard(model)
        return model
    return DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)


def gradient_sync(net: torch.nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on accumulation micro-steps (DDP ``no_sync`` / FSDP2 sync flag)."""
    if isinstance(net, DistributedDataParallel):
        return contextlib.nullcontext() if enabled else net.no_sync()
    if hasattr(net, "set_requires_gradient_sync"):
        cast(Callable[[bool], None], net.set_requires_gradient_sync)(enabled)
    return contextlib.nullcontext()


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimiser state on the CPU (a collective call under FSDP: every rank joins)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, optim: dict) -> None:
    """Load a full optimiser state from :func:`full_state`; under FSDP every rank keeps its own shard.

    Parameters that never had a gradient (e.g. the head of a teacher absent so far) have no saved state,
    exactly as before the interruption.
    """
    set_optimizer_state_dict(
        model, optimizer, optim, options=StateDictOptions(full_state_dict=True, strict=False)
    )


def to_local_scalar(value: torch.Tensor) -> float:
    """A Python float of a (possibly distributed) scalar tensor."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)
