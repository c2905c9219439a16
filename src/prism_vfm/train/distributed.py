"""torchrun environment: process group, device, rank helpers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

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
    """Join the torchrun process group when launched by torchrun (NCCL on GPUs, gloo on CPUs).

    The group is made for a single torchrun process too, so that a one-GPU run goes through the same
    collectives as a run on many.

    The group has one backend, and every collective goes through the helpers below, which hand it tensors
    on :func:`collective_device`. A mixed ``cpu:gloo,cuda:nccl`` group would also accept CPU tensors, but it
    needs gloo's TCP transport to work on every GPU cluster's network as well (GLOO_SOCKET_IFNAME and
    friends) and would hide the host copies it makes; the states reduced here (loss terms, metric meters,
    BatchNorm buffers) already live on the device, so reducing them there costs nothing.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    launched = world > 1 or "TORCHELASTIC_RUN_ID" in os.environ  # torchrun sets it
    if launched and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device)


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) without a process group."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Whether this process writes the files of a command (rank 0, or the only process)."""
    return process_rank()[0] == 0


def collective_device() -> torch.device:
    """The device whose tensors the process group reduces: this process's GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_collective_tensor(value: torch.Tensor, what: str) -> None:
    """Raise, naming ``what``, unless ``value`` lies on :func:`collective_device`.

    NCCL reduces CUDA tensors only; without this check a CPU tensor handed to it fails deep inside the
    collective, on every rank at once, possibly hours into a run.
    """
    expected = collective_device()
    if value.device.type != expected.type:
        backend = dist.get_backend() if dist.is_initialized() else "none"
        raise RuntimeError(
            f"{what}: a tensor on {value.device} handed to a collective of the {backend} process group, "
            f"which reduces tensors on {expected.type} only"
        )


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over processes of a copy of ``value`` on :func:`collective_device` (``value`` itself without a
    process group). Any tensor may be given (e.g. a CPU count); convert the result with ``float()``."""
    if not dist.is_initialized():
        return value
    total = value.detach().to(collective_device(), copy=True)
    check_collective_tensor(total, "all_reduce_sum")
    dist.all_reduce(total)
    return total


def all_reduce_sums(values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`all_reduce_sum` of every entry (e.g. a metric meter's counts), in one collective per dtype."""
    if not dist.is_initialized():
        return dict(values)
    device = collective_device()
    out: dict[str, torch.Tensor] = {}
    for dtype in dict.fromkeys(v.dtype for v in values.values()):
        keys = [k for k, v in values.items() if v.dtype == dtype]
        flat = torch.cat([values[k].detach().reshape(-1).to(device) for k in keys])
        check_collective_tensor(flat, "all_reduce_sums")
        dist.all_reduce(flat)
        for key, part in zip(keys, flat.split([values[k].numel() for k in keys]), strict=True):
            out[key] = part.view(values[key].shape)
    return {k: out[k] for k in values}


def all_gather_objects(value: Any) -> list[Any]:
    """Every process's ``value`` (picklable), in rank order; ``[value]`` without a process group."""
    if not dist.is_initialized():
        return [value]
    # all_gather_object moves its byte tensors to the current CUDA device under NCCL itself.
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def shard_indices(n: int) -> list[int]:
    """This process's part of ``range(n)`` (every world-size-th index from its rank), for sharded evaluation;
    the parts of all processes are disjoint and cover ``range(n)``."""
    rank, world = process_rank()
    return list(range(rank, n, world))


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
    for name, buffer in module.named_buffers():
        if buffer.is_floating_point():
            check_collective_tensor(buffer, f"buffer {name}")
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
