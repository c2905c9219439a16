"""What every analysis shares: the student behind a model, context ids and names, eval-mode passes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from prism_vfm.models.multitask import PrismMultiTask
from prism_vfm.models.outputs import PrismOutput
from prism_vfm.models.prism_vit import ContextKind, PrismViT

# Teacher ids of the released checkpoints (SPEC §4).
OFFICIAL_TEACHER_NAMES = ("DINOv2", "CLIP", "SAM")


def student_of(model: nn.Module) -> PrismViT:
    """The :class:`PrismViT` of a student or of a multi-task model."""
    if isinstance(model, PrismMultiTask):
        return model.student
    if isinstance(model, PrismViT):
        return model
    raise TypeError(f"expected a PrismViT or a PrismMultiTask, got {type(model).__name__}")


def check_contexts(student: PrismViT, contexts: Sequence[int], kind: ContextKind) -> list[int]:
    """Context ids as ints, each checked against the model's table of ``kind``."""
    table = student.context_table(kind)
    ids = [int(c) for c in contexts]
    if not ids:
        raise ValueError(f"no {kind} contexts given; this model has {kind} ids 0..{table.num_embeddings - 1}")
    bad = [c for c in ids if not 0 <= c < table.num_embeddings]
    if bad:
        raise ValueError(
            f"unknown {kind} context id(s) {bad}: this model has {kind} ids 0..{table.num_embeddings - 1}"
        )
    if len(set(ids)) != len(ids):
        raise ValueError(f"{kind} context ids repeat: {ids}")
    return ids


def moe_block_indices(student: PrismViT) -> list[int]:
    """Indices of the dual-stream blocks the forward runs (:attr:`PrismViT.routed_layers`); an error when
    there are none (nothing is routed)."""
    layers = list(student.routed_layers)
    if not layers:
        raise ValueError(
            "this model runs no dual-stream (MoE) block (none up to its last feature tap): there is no "
            "routing to analyse"
        )
    return layers


def default_context_names(model: nn.Module, contexts: Sequence[int], kind: ContextKind) -> list[str]:
    """Task names for a multi-task model's task contexts, otherwise ``"<kind> <id>"``."""
    if kind == "task" and isinstance(model, PrismMultiTask):
        return [model.task_names[c] for c in contexts]
    return [f"{kind} {c}" for c in contexts]


def resolve_names(
    model: nn.Module, contexts: Sequence[int], kind: ContextKind, names: Sequence[str] | None
) -> list[str]:
    """``names`` (one per context) or the defaults of :func:`default_context_names`; repeated names get
    their context id appended so that every context keeps its own label."""
    if names is None:
        return default_context_names(model, contexts, kind)
    names = [str(n) for n in names]
    if len(names) != len(contexts):
        raise ValueError(f"{len(names)} context names {names} for {len(contexts)} contexts {list(contexts)}")
    if len(set(names)) < len(names):
        names = [f"{n} ({c})" if names.count(n) > 1 else n for n, c in zip(names, contexts, strict=True)]
    return names


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation mode (clean routing: no expert dropout, no router noise), restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def context_passes(
    student: PrismViT, batches: Iterable[Tensor], contexts: Sequence[int], kind: ContextKind, device: str
) -> Iterator[tuple[int, PrismOutput]]:
    """Run every batch once under every context (one batched pass) in eval mode, without gradients.

    Yields ``(batch size, output)`` after each pass; the output's ``routing`` holds the routing and λ of
    every dual-stream block the forward ran (see :attr:`PrismViT.routed_layers`), batched context-major
    (C·B, N, ·). Blocks after the last feature tap are not run by the model's forward and are not reported.
    """
    moe_block_indices(student)  # an error when nothing is routed
    with eval_mode(student), torch.no_grad():
        for x in batches:
            if not isinstance(x, Tensor) or x.ndim != 4:
                raise ValueError(
                    "batches must yield image tensors of shape (B, 3, H, W), got "
                    f"{type(x).__name__} {tuple(x.shape) if isinstance(x, Tensor) else ''}"
                )
            yield x.shape[0], student.forward_contexts(x.to(device), contexts, kind, return_routing=True)
