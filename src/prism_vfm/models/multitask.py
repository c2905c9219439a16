"""The Stage-2 multi-task model: the student routed by task id, and one decoder head per task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from prism_vfm.layers.router import Routing
from prism_vfm.models.dense_head import DenseHead
from prism_vfm.models.hub import HubMixin
from prism_vfm.models.prism_vit import PrismViT, resample_pos_embed


class PrismMultiTask(
    nn.Module,
    HubMixin,
    library_name="prism-vfm",
    tags=["prism", "dense-prediction"],
    license="mit",
):
    """``model(x)`` → {task: (B, C_task, H, W)}: one backbone pass per task (task context), then its head.

    ``student`` holds the backbone, the context tables and (optionally, for the distillation regulariser)
    the projector heads; ``tasks`` maps task names, in task-id order, to their output channels (a dict or
    a sequence of (name, channels) pairs; ``config.json`` stores the pairs, as JSON objects lose their order).
    """

    def __init__(
        self, student_args: dict[str, Any], tasks: dict[str, int] | Sequence[Sequence[Any]]
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
        self.student = PrismViT(**{**student_args, "num_tasks": len(self.tasks)})
        n_levels = len(self.student.tap_layers)
        self.heads = nn.ModuleDict(
            {t: DenseHead(self.student.embed_dim, c, num_levels=n_levels) for t, c in self.tasks.items()}
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

    def forward_task_taps(
        self, x: Tensor, tasks: Sequence[str] | None = None
    ) -> tuple[dict[str, list[Tensor]], Tensor]:
        """Taps of every task pass and the mean load-balancing loss over the passes."""
        tasks = self.task_names if tasks is None else list(tasks)
        taps, aux = self.student.forward_contexts(x, [self.task_id(t) for t in tasks], kind="task")
        b = x.shape[0]
        return {t: [tap[i * b : (i + 1) * b] for tap in taps] for i, t in enumerate(tasks)}, aux

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Raw head outputs {task: (B, C, H, W)} for every task (or the given ones)."""
        per_task, _ = self.forward_task_taps(x, tasks)
        size = cast("tuple[int, int]", tuple(x.shape[-2:]))
        return {t: self.decode(t, taps, size) for t, taps in per_task.items()}

    @torch.no_grad()
    def trace(self, x: Tensor) -> dict[str, Any]:
        """Task outputs under ``"tasks"`` plus, per task, the taps, selected experts and λ of its pass."""
        tasks = self.task_names
        per_task, _ = self.forward_task_taps(x, tasks)
        size = cast("tuple[int, int]", tuple(x.shape[-2:]))
        b = x.shape[0]
        blocks = self.student.routed_blocks
        # The task passes just ran every one of these blocks, so each has kept its routing and λ.
        return {
            "tasks": {t: self.decode(t, per_task[t], size) for t in tasks},
            "taps": per_task,
            "topk": {
                t: [cast(Routing, blk.last_routing).indices[i * b : (i + 1) * b] for blk in blocks]
                for i, t in enumerate(tasks)
            },
            "lambda": {
                t: [cast(Tensor, blk.last_lambda)[i * b : (i + 1) * b] for blk in blocks]
                for i, t in enumerate(tasks)
            },
        }
