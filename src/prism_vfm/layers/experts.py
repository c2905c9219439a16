"""Routed experts stored stacked, and the dropless sort-by-expert dispatch with interchangeable backends.

Dispatch: the (token, slot) pairs chosen by the router are sorted by expert, the tokens are gathered
into one contiguous buffer in that order, every expert's MLP runs on its contiguous segment, and the
results are put back in (token, slot) order and summed over the k slots. No token is ever dropped.

Backends for the per-segment MLP (all compute the same function, see ``tests/test_moe_dispatch.py``):

* ``grouped`` — ``torch.nn.functional.grouped_mm`` over the segments: no host synchronisation, the
  default on CUDA where the installed PyTorch supports it for the tensors' dtype.
* ``padded`` — segments scattered into an (E, capacity, D) buffer and two batched matmuls; the
  capacity is the largest segment (one host synchronisation) unless given.
* ``loop`` — one matmul per expert on its segment, with a hand-written backward; the CPU default.

On the CPU the ``loop`` backend can keep the memory of the stacked weight gradients from one backward
pass to the next (opt-in, see :class:`GradMemory` and :func:`keep_grad_memory`): they are too large for
the C allocator to recycle, and writing fresh pages makes the experts' weight-gradient products slower.
It is off by default: it relies on a private PyTorch function and holds 2 x 141 MB per ViT-B block
between steps, for a few per cent of a CPU training step.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prism_vfm.layers.net2net import resize_mlp_param

BACKENDS = ("auto", "grouped", "padded", "loop")


class GroupedExperts(nn.Module):
    """``num_experts`` MLPs D → H → D with exact GELU, weights stacked as (E, D, H) and (E, H, D)."""

    bias_parameters = ("b1", "b2")  # stacked biases: 2-D, yet biases (no weight decay)

    def __init__(
        self, num_experts: int, dim: int, hidden: int, backend: str = "auto", keep_grad_memory: bool = False
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown expert backend {backend!r}; expected one of {BACKENDS}")
        self.num_experts = num_experts
        self.backend = backend
        # CPU, loop backend, opt-in: reuse the weight gradients' memory between backward passes
        # (GradMemory); it stays allocated between steps.
        self.keep_grad_memory = keep_grad_memory
        self.grad_memory = GradMemory()
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The initialisation of ``nn.Linear`` applied to every expert."""
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    @torch.no_grad()
    def copy_from_mlp(self, fc1: nn.Linear, fc2: nn.Linear) -> None:
        """Make every expert a copy of a dense MLP (``fc1``, ``fc2`` in ``nn.Linear`` layout).

        Experts of another hidden width get the MLP resized by :func:`resize_mlp_param`.
        """
        hidden = self.w1.shape[-1]
        names = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
        params = (fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        w1, b1, w2, b2 = (resize_mlp_param(n, p, hidden) for n, p in zip(names, params, strict=True))
        self.w1.copy_(w1.t().unsqueeze(0).expand_as(self.w1))
        self.b1.copy_(b1.unsqueeze(0).expand_as(self.b1))
        self.w2.copy_(w2.t().unsqueeze(0).expand_as(self.w2))
        self.b2.copy_(b2.unsqueeze(0).expand_as(self.b2))

    def forward(self, x: Tensor, expert_ids: Tensor, counts: Tensor) -> Tensor:
        """Run each expert on its contiguous segment of ``x``.

        Args:
            x: (M, D) rows sorted by expert.
            expert_ids: (M,) the expert of every row (non-decreasing).
            counts: (E,) int64 number of rows per expert, on ``x``'s device.
        """
        backend = self.backend if self.backend != "auto" else default_backend(x, self.w1)
        if backend == "grouped":
            return self._grouped(x, expert_ids, counts)
        if backend == "padded":
            return self._padded(x, expert_ids, counts)
        return self._loop(x, counts)

    def _grouped(self, x: Tensor, expert_ids: Tensor, counts: Tensor) -> Tensor:
        offs = torch.cumsum(counts, 0).to(torch.int32)
        w1: Tensor = self.w1
        w2: Tensor = self.w2
        if torch.is_autocast_enabled(x.device.type):
            # grouped_mm is not on autocast's op list: cast explicitly to the autocast dtype.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w1, w2 = x.to(dtype), w1.to(dtype), w2.to(dtype)
        h = F.grouped_mm(x, w1, offs=offs) + self.b1.to(x.dtype).index_select(0, expert_ids)
        h = F.gelu(h)
        return F.grouped_mm(h, w2, offs=offs) + self.b2.to(x.dtype).index_select(0, expert_ids)

    def _padded(self, x: Tensor, expert_ids: Tensor, counts: Tensor, capacity: int | None = None) -> Tensor:
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(x.shape[0], device=x.device) - starts.index_select(0, expert_ids)
        cap = int(counts.max()) if capacity is None else capacity
        buf = x.new_zeros(self.num_experts, cap, x.shape[1])
        buf = buf.index_put((expert_ids, slot), x)
        h = F.gelu(torch.baddbmm(self.b1.unsqueeze(1).to(x.dtype), buf, self.w1.to(x.dtype)))
        y = torch.baddbmm(self.b2.unsqueeze(1).to(x.dtype), h, self.w2.to(x.dtype))
        return y[expert_ids, slot]

    def _loop(self, x: Tensor, counts: Tensor) -> Tensor:
        # Tensors, not Parameters: under autocast they are rebound to cast copies.
        w1: Tensor
        b1: Tensor
        w2: Tensor
        b2: Tensor
        w1, b1, w2, b2 = self.w1, self.b1, self.w2, self.b2
        if torch.is_autocast_enabled(x.device.type):
            # A custom autograd function bypasses autocast: cast explicitly, as autocast would for addmm.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w1, b1, w2, b2 = (t.to(dtype) for t in (x, w1, b1, w2, b2))
        # Without a backward to come, each expert's hidden activations are freed as soon as it is done.
        keep = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, b1, w2, b2))
        memory = self.grad_memory if self.keep_grad_memory else None
        return _SegmentMLP.apply(x, w1, b1, w2, b2, counts.tolist(), keep, memory)


class GradMemory:
    """Memory for gradients that is handed out again once nothing else refers to it.

    A CPU process has no caching allocator: the C allocator returns blocks above a few tens of
    megabytes to the system when they are freed, so the experts' stacked weight gradients (141 MB per
    layer for ViT-B) are fresh pages in every backward pass, and the first write to each page costs a
    page fault and the kernel zeroing it. :meth:`empty_like` instead hands out the storage it gave
    last time whenever that storage is no longer used by anyone else: after ``zero_grad()`` (which
    drops ``.grad``) the memory is reused; while a ``.grad``, an optimiser or the caller still holds
    the previous gradient, new memory is taken (and kept for next time), so nothing ever sees its
    values overwritten. The price is that this memory stays allocated between steps.

    Only CPU tensors are served from it; CUDA has its own caching allocator. Not copied or pickled
    with the module (a copy starts empty).
    """

    def __init__(self) -> None:
        self._storages: dict[str, torch.UntypedStorage] = {}

    def empty_like(self, key: str, like: Tensor) -> Tensor:
        """An uninitialised tensor shaped like ``like``, on memory kept under ``key``."""
        if like.device.type != "cpu" or _storage_use_count is None:
            return torch.empty_like(like, memory_format=torch.contiguous_format)
        nbytes = like.numel() * like.element_size()
        storage = self._storages.get(key)
        if storage is None or storage.nbytes() != nbytes or _storage_use_count(storage._cdata) != 1:
            storage = torch.UntypedStorage(nbytes, device=like.device)
            self._storages[key] = storage
        # The stub lacks the (source, offset, size) overload; the stride defaults to contiguous.
        return like.new_empty(0).set_(storage, 0, like.shape)  # type: ignore[call-overload]

    def clear(self) -> None:
        """Give the kept memory back (it is freed once no gradient refers to it any more)."""
        self._storages.clear()

    def __deepcopy__(self, memo: dict) -> GradMemory:
        return GradMemory()

    def __getstate__(self) -> dict:
        return {"_storages": {}}


def keep_grad_memory(model: nn.Module, enabled: bool = True) -> None:
    """Opt in (or out) of :class:`GradMemory` for every :class:`GroupedExperts` in ``model``.

    On: the CPU ``loop`` backend reuses the memory of the experts' weight gradients between backward
    passes, a few per cent faster per training step, at the price of keeping that memory (2 x 141 MB per
    ViT-B block) allocated between steps. Off (the default, and when ``enabled`` is False) the kept
    memory is given back.
    """
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            module.keep_grad_memory = enabled
            if not enabled:
                module.grad_memory.clear()


def release_grad_memory(model: nn.Module) -> None:
    """Give back the gradient memory every :class:`GroupedExperts` in ``model`` keeps between steps."""
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            module.grad_memory.clear()


# How many owners a storage has (the only way to tell that no tensor uses it any more); private in
# PyTorch, so without it every gradient gets fresh memory.
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


class _SegmentMLP(torch.autograd.Function):
    """Expert ``e``'s MLP on the ``e``-th contiguous segment of rows, one matmul per expert and layer.

    Written by hand for the CPU, where it makes the routed experts about 15% faster than autograd:
    autograd through ``w[e]`` (or ``unbind``) assembles the stacked (E, D, H) weight gradients by
    zero-filling or stacking copies, while here each expert's gradient is written straight into its
    slice; and the hidden activations stay one small tensor per expert, which the allocator recycles,
    where (rows, H) buffers for all experts would be fresh pages every step. Empty segments still get
    their (zero) gradients, so every parameter takes part in every step (DDP needs that).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        w1: Tensor,
        b1: Tensor,
        w2: Tensor,
        b2: Tensor,
        splits: list[int],
        keep_hidden: bool,
        memory: GradMemory | None = None,
    ) -> Tensor:
        y = torch.empty_like(x)
        segments = _segments(splits)
        hidden: list[Tensor] = []
        for e, s in segments:
            pre = torch.addmm(b1[e], x[s], w1[e])
            h = F.gelu(pre)
            torch.addmm(b2[e], h, w2[e], out=y[s])
            if keep_hidden:
                hidden += [pre, h]
        ctx.save_for_backward(x, w1, w2, *hidden)
        ctx.segments = segments
        ctx.memory = memory
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, w1, w2, *hidden = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        grad_y = grad_y.contiguous()
        grad_x = torch.empty_like(x) if need_x else None
        memory: GradMemory | None = ctx.memory
        grad_w1 = _empty_grad(memory, "w1", w1) if need_w1 else None
        grad_b1 = w1.new_empty(w1.shape[:1] + w1.shape[2:]) if need_b1 else None
        grad_w2 = _empty_grad(memory, "w2", w2) if need_w2 else None
        grad_b2 = w2.new_empty(w2.shape[:1] + w2.shape[2:]) if need_b2 else None
        for (e, s), pre, h in zip(ctx.segments, hidden[0::2], hidden[1::2], strict=True):
            g = grad_y[s]
            if need_w2:
                torch.mm(h.t(), g, out=cast(Tensor, grad_w2)[e])
            if need_b2:
                torch.sum(g, 0, out=cast(Tensor, grad_b2)[e])
            grad_pre = torch.ops.aten.gelu_backward(g @ w2[e].t(), pre)
            if need_w1:
                torch.mm(x[s].t(), grad_pre, out=cast(Tensor, grad_w1)[e])
            if need_b1:
                torch.sum(grad_pre, 0, out=cast(Tensor, grad_b1)[e])
            if need_x:
                torch.mm(grad_pre, w1[e].t(), out=cast(Tensor, grad_x)[s])
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None, None, None


def _empty_grad(memory: GradMemory | None, key: str, like: Tensor) -> Tensor:
    return torch.empty_like(like) if memory is None else memory.empty_like(key, like)


def _segments(splits: list[int]) -> list[tuple[int, slice]]:
    """(expert, row slice) of every expert's contiguous segment."""
    ends = list(itertools.accumulate(splits))
    return [(e, slice(end - n, end)) for e, (n, end) in enumerate(zip(splits, ends, strict=True))]


def grouped_mm_supported(x: Tensor, w: Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` runs for these operands on this PyTorch build."""
    if not hasattr(F, "grouped_mm"):
        return False
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if x.device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(x.device)
        return dtype == torch.bfloat16 and major >= 8
    # The CPU kernel needs 16-byte aligned row strides.
    itemsize = torch.empty((), dtype=dtype).element_size()
    return all(s * itemsize % 16 == 0 for s in (w.shape[1], w.shape[2]))


def default_backend(x: Tensor, w: Tensor) -> str:
    """``loop`` on the CPU; ``grouped`` on accelerators where supported, else ``padded``."""
    if x.device.type == "cpu":
        return "loop"
    return "grouped" if grouped_mm_supported(x, w) else "padded"


def sort_by_expert(indices: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Order of the flattened (token, slot) pairs by expert, the sorted expert ids and per-expert counts.

    Uses no host synchronisation (``bincount`` would, to size its output).
    """
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return order, flat.index_select(0, order), counts
