"""What the models' forward passes return: one dataclass per model, the same fields whatever is asked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from prism_vfm.layers.dual_stream import BlockRouting

ContextKind = Literal["teacher", "task"]


@dataclass
class PrismOutput:
    """One forward of :class:`~prism_vfm.PrismViT` (one or several context passes, batched pass-major).

    ``taps``: the block outputs at ``tap_layers``, final norm applied, each (rows, N, D).
    ``aux_loss``: the load-balancing loss of the dual-stream blocks (already × ``lb_coef``; zero in eval
    mode): a scalar, or one per pass, (P,), from :meth:`~prism_vfm.PrismViT.forward_passes`.
    ``context``: the context id of every row, (rows,) int64 on the model's device.
    ``kind``: the kind of those ids, ``None`` when the passes mixed teacher and task contexts.
    ``routing``: ``None`` unless the forward was asked ``return_routing=True``; then, per dual-stream block
    the forward ran ({block index: :class:`BlockRouting`}, in block order), its router logits, selected
    experts, their weights and λ, each (rows, N, ·).
    """

    taps: list[Tensor]
    aux_loss: Tensor
    context: Tensor
    kind: ContextKind | None
    routing: dict[int, BlockRouting] | None = None


@dataclass
class MultiTaskOutput:
    """One forward of :class:`~prism_vfm.PrismMultiTask`: every asked task's pass and head.

    ``predictions``: the raw head outputs {task: (B, C_task, H, W)}.
    ``aux_loss``: the load-balancing loss averaged over the task passes (zero in eval mode).
    ``taps``: ``None`` unless asked ``return_taps=True``; then {task: the student's taps of its pass}.
    ``routing``: ``None`` unless asked ``return_routing=True``; then {task: {block index:
    :class:`BlockRouting`}} of its pass.
    """

    predictions: dict[str, Tensor]
    aux_loss: Tensor
    taps: dict[str, list[Tensor]] | None = None
    routing: dict[str, dict[int, BlockRouting]] | None = None


# Pytree nodes, so that DDP, FSDP and torch.compile see the tensors inside.
torch.export.register_dataclass(PrismOutput)
torch.export.register_dataclass(MultiTaskOutput)
