"""Which teacher supervises which sample (SPEC §5 "Teacher assignment")."""

from __future__ import annotations

import torch
from torch import Tensor


def balanced_teacher_split(batch: int, num_teachers: int, generator: torch.Generator | None = None) -> Tensor:
    """Official assignment: ⌊batch/n⌋ samples per teacher, the remainder to the first teachers, shuffled.

    Returns a LongTensor (batch,) of teacher ids; every teacher appears when ``batch >= num_teachers``.
    """
    if batch < 1 or num_teachers < 1:
        raise ValueError(
            f"need a positive batch and teacher count, got batch={batch}, teachers={num_teachers}"
        )
    ids = torch.arange(batch) % num_teachers
    ids = ids.sort(stable=True).values  # remainder goes to the lowest ids, as in the released code
    return ids[torch.randperm(batch, generator=generator)]


def single_teacher(batch: int, num_teachers: int, generator: torch.Generator | None = None) -> Tensor:
    """Paper assignment: one random teacher for the whole batch."""
    t = int(torch.randint(num_teachers, (1,), generator=generator))
    return torch.full((batch,), t, dtype=torch.long)
