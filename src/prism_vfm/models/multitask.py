"""The Stage-2 multi-task model: the student routed by task id, and one decoder head per task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from prism_vfm.layers.dual_stream import BlockRouting
from prism_vfm.models.dense_head import DenseHead
from prism_vfm.models.hub import HubMixin
from prism_vfm.models.outputs import MultiTaskOutput
from prism_vfm.models.prism_vit import PrismViT, resample_pos_embed


class PrismMultiTask(
    nn.Module,
    HubMixin,
    library_name="prism-vfm",
    tags=["prism", "dense-prediction"],
    license="mit",
):
    """``model(x)`` → :class:`MultiTaskOutput`: one backbone pass per task (task context), then its head,
    giving ``predictions`` {task: (B, C_task, H, W)}.

    ``student`` holds the backbone, the context tables and (optionally, for the distillation regulariser)
    the projector heads; ``tasks`` maps task names, in task-id order, to their output channels (a dict or
    a sequence of (name, channels) pairs; ``config.json`` stores the pairs, as JSON objects lose their order).
    ``subpixel_heads`` names the tasks whose head predicts every pixel of its output cells instead of
    upsampling bilinearly (``DenseHead``'s ``output="subpixel"``; not released, default none).
    """

    def __init__(
        self,
        student_args: dict[str, Any],
        tasks: dict[str, int] | Sequence[Sequence[Any]],
        subpixel_heads: Sequence[str] = (),
    ) -> None:
        super().__init__()
        pairs = list(tasks.items()) if isinstance(tasks, dict) else [(str(t), int(c)) for t, c in tasks]
        self.tasks = dict(pairs)
        if len(self.tasks) != len(pairs):
            raise ValueError(f"task names must be unique, got {[t for t, _ in pairs]}")
        config = getattr(self, "_hub_mixin_config", None)
        if isinstance(config, dict) and "tasks" in config:
            # huggingface_hub writes config.json with sorted keys: keep the task-id order as a list.
            config["tasks"] = [[t, c] for t, c in pairs]
        unknown = sorted(set(subpixel_heads) - set(self.tasks))
        if unknown:
            raise ValueError(
                f"subpixel_heads names tasks this model lacks: {unknown}; it has {list(self.tasks)}"
            )
        self.subpixel_heads = tuple(t for t in self.tasks if t in subpixel_heads)
        self.student = PrismViT(**{**student_args, "num_tasks": len(self.tasks)})
        n_levels = len(self.student.tap_layers)
        self.heads = nn.ModuleDict(
            {
                t: DenseHead(
                    self.student.embed_dim,
                    c,
                    num_levels=n_levels,
                    output="subpixel" if t in self.subpixel_heads else "bilinear",
                )
                for t, c in self.tasks.items()
            }
        )

    def load_state_dict_resampled(
        self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False
    ) -> Any:
        """``load_state_dict`` that first resamples the student's ``pos_embed`` to this model's patch grid."""
        state_dict = dict(state_dict)
        pos = state_dict.get("student.pos_embed")
        # Never None here: the student is built with timm's default learned position embedding.
        if pos is not None and pos.shape != cast(nn.Parameter, self.student.pos_embed).shape:
            state_dict["student.pos_embed"] = resample_pos_embed(pos, self.student.patch_embed.grid_size)
        return self.load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def task_id(self, task: str) -> int:
        try:
            return self.task_names.index(task)
        except ValueError:
            raise ValueError(f"unknown task {task!r}; this model has {self.task_names}") from None

    def decode(self, task: str, taps: Sequence[Tensor], out_size: tuple[int, int]) -> Tensor:
        """Apply ``task``'s head to a pass's taps (B, N, D)."""
        grid = self.student.grid_size(out_size)
        return self.heads[task]([self.student.to_maps(t, grid) for t in taps], out_size)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the student's blocks (timm's switch)."""
        self.student.set_grad_checkpointing(enable)

    def forward(
        self,
        x: Tensor,
        tasks: Sequence[str] | None = None,
        *,
        return_taps: bool = False,
        return_routing: bool = False,
    ) -> MultiTaskOutput:
        """Every task's (or the given ones') pass and head; the passes run batched
        (:meth:`PrismViT.forward_contexts`). ``return_taps`` / ``return_routing`` add each pass's taps /
        routing and λ."""
        tasks = self.task_names if tasks is None else list(tasks)
        out = self.student.forward_contexts(
            x, [self.task_id(t) for t in tasks], kind="task", return_routing=return_routing
        )
        b, size = x.shape[0], cast("tuple[int, int]", tuple(x.shape[-2:]))
        rows = {t: slice(i * b, (i + 1) * b) for i, t in enumerate(tasks)}
        taps = {t: [tap[r] for tap in out.taps] for t, r in rows.items()}
        routing = None
        if out.routing is not None:
            routing = {t: {i: br.rows(r) for i, br in out.routing.items()} for t, r in rows.items()}
        return MultiTaskOutput(
            predictions={t: self.decode(t, taps[t], size) for t in tasks},
            aux_loss=out.aux_loss,
            taps=taps if return_taps else None,
            routing=routing,
        )

    @torch.no_grad()
    def trace(self, x: Tensor) -> dict[str, Any]:
        """Task outputs under ``"tasks"`` plus, per task, the taps, selected experts and λ of its pass."""
        out = self(x, return_taps=True, return_routing=True)
        routing = cast("dict[str, dict[int, BlockRouting]]", out.routing)
        return {
            "tasks": out.predictions,
            "taps": out.taps,
            "topk": {t: [r.indices for r in per_block.values()] for t, per_block in routing.items()},
            "lambda": {t: [r.lam for r in per_block.values()] for t, per_block in routing.items()},
        }
