"""torchrun environment: process group, device, rank helpers."""

from __future__ import annotations

import contextlib
import gc
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
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
from torch.distributed.tensor import DTensor
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

    The ``prism`` commands leave the group when they finish; a script that trains through the Python API
    under torchrun ends with :func:`shutdown_distributed`.
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


def shutdown_distributed() -> None:
    """Leave the process group at the end of a command that ran under it (no-op without one).

    The processes first wait for each other (gloo aborts a process whose peer tears down while it still
    talks), then the objects that FSDP2 keeps in reference cycles (sharded modules, their device meshes)
    are collected, so that none of them outlives the group into interpreter shutdown, where their gloo
    threads can end a finished run with ``terminate called without an active exception`` (SIGABRT).
    """
    if not dist.is_initialized():
        return
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


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


class PartlySharded(torch.nn.Module):
    """FSDP2 units for some modules (e.g. the transformer blocks), the model's other parameters replicated.

    For a model some of whose parameters take a gradient on one process and not on another (VidPrism's DBI
    acts on a pair only when its batch-mean score passes, §8): a sharded unit reduce-scatters the gradients
    its parameters have on each rank, which must then be the same set everywhere, so such parameters stay
    replicated here, and their gradients are averaged after the last micro-step's backward as DDP with
    ``find_unused_parameters`` does: a parameter without a gradient on some rank counts as zero there, one
    without a gradient on every rank keeps none (AdamW leaves it untouched, as in one process). Every
    parameter of ``units`` (and of ``root``, a module holding them whose other parameters are sharded with
    it) must take a gradient in every step on every rank, or on none.
    """

    def __init__(
        self, module: torch.nn.Module, units: Iterable[torch.nn.Module], root: torch.nn.Module | None = None
    ) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        super().__init__()
        self.module = module
        self._units: list[FSDPModule] = [cast(FSDPModule, fully_shard(unit)) for unit in units]
        if root is not None:  # one FSDP root over the units (their gathers prefetched in turn) and its rest
            self._units.append(cast(FSDPModule, fully_shard(root)))
        self._replicated = [p for p in module.parameters() if not isinstance(p, DTensor)]
        self._sync = True
        for p in self._replicated:  # rank 0's values everywhere, as DDP makes them at construction
            check_collective_tensor(p.data, "replicated parameter")
            dist.broadcast(p.data, src=0)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def set_requires_gradient_sync(self, enabled: bool) -> None:
        """Whether this micro-step's backward reduces the gradients (off on accumulation micro-steps)."""
        self._sync = enabled
        for unit in self._units:
            unit.set_requires_gradient_sync(enabled)

    def average_replicated_gradients(self) -> None:
        """Average the replicated parameters' gradients over the processes (see the class notes)."""
        params = [p for p in self._replicated if p.requires_grad]
        if not params or not self._sync:
            return
        device = collective_device()
        present = torch.tensor([float(p.grad is not None) for p in params], device=device)
        dist.all_reduce(present)
        counts = present.tolist()  # ranks that have each gradient (one host synchronisation)
        world = dist.get_world_size()
        for dtype in dict.fromkeys(p.dtype for p in params):
            chosen = [(p, n) for p, n in zip(params, counts, strict=True) if p.dtype == dtype]
            flat = torch.cat(
                [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p, _ in chosen]
            )
            check_collective_tensor(flat, "replicated gradients")
            dist.all_reduce(flat)
            flat.div_(world)
            for (p, n), part in zip(chosen, flat.split([p.numel() for p, _ in chosen]), strict=True):
                p.grad = part.view_as(p) if n > 0 else None


def wrap_model(
    model: torch.nn.Module,
    env: DistEnv,
    fsdp: bool,
    units: Iterable[torch.nn.Module] = (),
    find_unused: bool = False,
    shard_root: torch.nn.Module | None = None,
) -> torch.nn.Module:
    """DDP or FSDP2 sharding for several processes; the model itself for one.

    DDP runs without ``find_unused_parameters`` unless ``find_unused`` (a model some of whose parameters
    take no gradient in a step, depending on its input: their gradients then stay unset, as in one process).

    With ``fsdp``, every module of ``units`` (e.g. the transformer blocks and projector heads) becomes its own
    FSDP unit and the root holds the rest; with ``find_unused`` as well, only ``shard_root`` (a module holding
    the units, e.g. the frame tower) is sharded with them and the rest stays replicated
    (:class:`PartlySharded`). Parameters are sharded in place, so the optimiser must be built after this call.
    """
    if env.world_size == 1:
        return model
    if fsdp and find_unused:
        return PartlySharded(model, units, shard_root)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for unit in units:
            fully_shard(unit)
        fully_shard(model)
        return model
    return DistributedDataParallel(
        model,
        device_ids=[env.local_rank] if env.device.type == "cuda" else None,
        find_unused_parameters=find_unused,
    )


@contextlib.contextmanager
def gradient_sync(net: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Around a micro-step's forward and backward: skip the gradient reduction on accumulation micro-steps
    (DDP ``no_sync`` / FSDP2 sync flag); after the last one, average :class:`PartlySharded`'s replicated
    gradients."""
    if isinstance(net, DistributedDataParallel):
        with contextlib.nullcontext() if enabled else net.no_sync():
            yield
        return
    if hasattr(net, "set_requires_gradient_sync"):
        cast(Callable[[bool], None], net.set_requires_gradient_sync)(enabled)
    yield
    if enabled and isinstance(net, PartlySharded):
        net.average_replicated_gradients()


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for parameters that may be part sharded (DTensor), part not
    (:class:`PartlySharded`): the norm over all of them; returns it before clipping."""
    params = [p for p in parameters if p.grad is not None]
    sharded = [p for p in params if isinstance(p.grad, DTensor)]
    if not sharded or len(sharded) == len(params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    plain = [p for p in params if not isinstance(p.grad, DTensor)]
    parts = torch.nn.utils.get_total_norm([p.grad for p in sharded])  # type: ignore[misc]
    rest = torch.nn.utils.get_total_norm([p.grad for p in plain])  # type: ignore[misc]
    total = torch.linalg.vector_norm(torch.stack([cast(DTensor, parts).full_tensor(), rest.to(parts.device)]))
    if math.isfinite(max_norm):
        coef = min(1.0, max_norm / (float(total) + 1e-6))
        if coef < 1.0:
            for p in params:
                cast(torch.Tensor, p.grad).mul_(coef)
    return total


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
