"""Stage-1 feature distillation loss (SPEC §5): student projections against frozen teacher features.

Per teacher and tap the two NCHW maps are brought to a common grid (:func:`align_maps`) and compared with
``0.9 * (1 - cos) + 0.1 * SmoothL1`` (:func:`feature_distill_loss`); :class:`DistillLoss` sums that over
the taps of every teacher present in the batch and optionally adds the decorrelation term of
:mod:`prism_vfm.losses.decorrelation`, returning every term by name as the official code logs them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prism_vfm.losses.decorrelation import DecorrelationLoss

TeacherId = str | int
LossType = Literal["cos+l1", "cos+l1+decorrelation"]


def align_maps(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Bring two ``(B, C, h, w)`` maps to one grid: the map with fewer positions is resized to the other.

    Bilinear with ``align_corners=False``. A larger teacher grid upsamples the student projection (the
    usual case: 14x14 student against 16x16 DINOv2 or 64x64 SAM); otherwise the teacher map is resized
    to the student grid. Maps of equal size are returned unchanged.
    """
    s_hw, t_hw = tuple(student.shape[-2:]), tuple(teacher.shape[-2:])
    if s_hw == t_hw:
        return student, teacher
    if t_hw[0] * t_hw[1] > s_hw[0] * s_hw[1]:
        student = F.interpolate(student, size=t_hw, mode="bilinear", align_corners=False)
    else:
        teacher = F.interpolate(teacher, size=s_hw, mode="bilinear", align_corners=False)
    return student, teacher


def feature_distill_loss(
    student: Tensor, teacher: Tensor, cos_weight: float = 0.9, l1_weight: float = 0.1
) -> Tensor:
    """Distillation loss of one ``(B, C, h, w)`` student projection against its teacher map.

    ``cos_weight * mean_b(1 - cos(vec(S_b), vec(T_b))) + l1_weight * SmoothL1_{beta=1}(S, T)`` after
    :func:`align_maps`, where ``vec`` flattens one image's whole ``C x H x W`` map (one cosine per image)
    and the smooth-L1 term is a mean over all elements.

    Raises:
        ValueError: if a map is not 4-D or the batch sizes or channel counts differ.
    """
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(
            f"expected (B, C, h, w) maps, got student {tuple(student.shape)} "
            f"and teacher {tuple(teacher.shape)}"
        )
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"student (B, C) = {tuple(student.shape[:2])} does not match teacher (B, C) = "
            f"{tuple(teacher.shape[:2])}"
        )
    student, teacher = align_maps(student, teacher)
    # cosine_embedding_loss (target 1) is mean(1 - cos) with one dot product over the unnormalised vectors;
    # F.cosine_similarity normalises first and drifts by ~3e-6 on 64x64x64 maps, past the fixture tolerance.
    same = student.new_ones(student.shape[0])
    cos_term = F.cosine_embedding_loss(student.flatten(1), teacher.flatten(1), same)
    return cos_weight * cos_term + l1_weight * F.smooth_l1_loss(student, teacher, beta=1.0)


class DistillLoss(nn.Module):
    """Stage-1 distillation objective over all teachers and taps, returned term by term.

    Called with two dicts keyed by teacher id (same keys), each value the list of per-tap maps
    ``(B_t, C_t, h, w)`` of that teacher's samples: the student projections and the teacher features.
    Returns ``{"<t>_level<l+1>": ..., ["decorrelation_loss": ...,] "total": ...}`` with ``total`` the sum of
    all other entries, as the official loss reports them.

    Args:
        loss_type: ``"cos+l1"`` (BS presets) or ``"cos+l1+decorrelation"`` (LB/BB/LL presets, Stage 2).
        cos_weight, l1_weight: mix of the cosine and smooth-L1 parts of every per-tap term.
        teacher_weights: multiplier of every per-tap term of a teacher, keyed by teacher id; absent ids
            weigh 1 (the official schedule for teacher 2 runs from 1.0 to 1.0, so all weights are 1).
        decorrelation: the decorrelation module; default ``DecorrelationLoss()`` (official form) when
            ``loss_type`` asks for the term. Giving one with ``loss_type="cos+l1"`` is an error.
        decorrelation_taps: taps (0-based) of the decorrelated teacher whose terms are summed.
        decorrelation_weight: factor on that sum.
        decorrelation_teacher: whose student projections (before any resizing) are decorrelated. ``None``
            is the official rule, the first key of the student dict, which is DINOv2 (id 0) whenever it is
            in the batch because the student emits teacher groups in ascending id order. An explicit id
            that is absent from a batch gives a zero term.
    """

    def __init__(
        self,
        loss_type: LossType = "cos+l1",
        *,
        cos_weight: float = 0.9,
        l1_weight: float = 0.1,
        teacher_weights: Mapping[TeacherId, float] | None = None,
        decorrelation: DecorrelationLoss | None = None,
        decorrelation_taps: Sequence[int] = (0, 1),
        decorrelation_weight: float = 0.5,
        decorrelation_teacher: TeacherId | None = None,
    ) -> None:
        super().__init__()
        if loss_type not in ("cos+l1", "cos+l1+decorrelation"):
            raise ValueError(f"unknown loss_type {loss_type!r}; expected 'cos+l1' or 'cos+l1+decorrelation'")
        if loss_type == "cos+l1" and decorrelation is not None:
            raise ValueError(
                "a decorrelation module was given but loss_type 'cos+l1' has no decorrelation term"
            )
        if not decorrelation_taps or any(tap < 0 for tap in decorrelation_taps):
            raise ValueError(
                f"decorrelation_taps must be non-empty and non-negative, got {tuple(decorrelation_taps)}"
            )
        self.loss_type = loss_type
        self.cos_weight = cos_weight
        self.l1_weight = l1_weight
        self.teacher_weights = {str(t): float(w) for t, w in (teacher_weights or {}).items()}
        self.decorrelation = (
            (decorrelation or DecorrelationLoss()) if loss_type == "cos+l1+decorrelation" else None
        )
        self.decorrelation_taps = tuple(decorrelation_taps)
        self.decorrelation_weight = decorrelation_weight
        self.decorrelation_teacher = None if decorrelation_teacher is None else str(decorrelation_teacher)

    def forward(
        self,
        student: Mapping[TeacherId, Sequence[Tensor]],
        teacher: Mapping[TeacherId, Sequence[Tensor]],
    ) -> dict[str, Tensor]:
        """Named loss terms and their ``total`` for one batch.

        Raises:
            ValueError: naming the teacher (and tap) when the dicts' keys differ, a tap is missing on one
                side, or a student/teacher pair has mismatched shapes.
        """
        if not student:
            raise ValueError("no teacher groups: the student projection dict is empty")
        if set(student) != set(teacher):
            raise ValueError(
                f"student and teacher dicts hold different teachers: student {list(student)}, "
                f"teacher {list(teacher)}"
            )
        out: dict[str, Tensor] = {}
        for t, s_maps in student.items():
            t_maps = teacher[t]
            if len(s_maps) != len(t_maps):
                side = "student" if len(s_maps) < len(t_maps) else "teacher"
                raise ValueError(
                    f"teacher {str(t)!r}, tap {min(len(s_maps), len(t_maps))}: missing on the {side} side "
                    f"(student has {len(s_maps)} taps, teacher has {len(t_maps)})"
                )
            weight = self.teacher_weights.get(str(t), 1.0)
            for tap, (s_map, t_map) in enumerate(zip(s_maps, t_maps, strict=True)):
                try:
                    term = feature_distill_loss(s_map, t_map, self.cos_weight, self.l1_weight)
                except ValueError as err:
                    raise ValueError(f"teacher {str(t)!r}, tap {tap}: {err}") from err
                out[f"{t}_level{tap + 1}"] = weight * term
        if self.decorrelation is not None:
            out["decorrelation_loss"] = self._decorrelation_term(self.decorrelation, student)
        out["total"] = torch.stack(list(out.values())).sum()
        return out

    def _decorrelation_term(
        self, decorrelation: DecorrelationLoss, student: Mapping[TeacherId, Sequence[Tensor]]
    ) -> Tensor:
        wanted = self.decorrelation_teacher
        key = next(iter(student)) if wanted is None else next((t for t in student if str(t) == wanted), None)
        if key is None:
            reference = next(iter(student.values()))[0]
            return reference.new_zeros(())
        maps = student[key]
        terms = []
        for tap in self.decorrelation_taps:
            if tap >= len(maps):
                raise ValueError(
                    f"teacher {str(key)!r}, tap {tap}: decorrelation tap missing "
                    f"(student has {len(maps)} taps)"
                )
            terms.append(decorrelation(maps[tap]))
        return self.decorrelation_weight * torch.stack(terms).sum()


def distillation_criterion(
    decorrelation: Literal["official", "paper", "none"] = "official",
    *,
    decorrelation_taps: Sequence[int] = (0, 1),
    decorrelation_weight: float = 0.5,
    cos_weight: float = 0.9,
    l1_weight: float = 0.1,
) -> DistillLoss:
    """The distillation objective as the configurations name it: cosine + smooth-L1 on every tap, plus
    the decorrelation term in its ``"official"`` or ``"paper"`` form, or without it (``"none"``)."""
    if decorrelation not in ("official", "paper", "none"):
        raise ValueError(f"decorrelation must be 'official', 'paper' or 'none', got {decorrelation!r}")
    term = None if decorrelation == "none" else DecorrelationLoss(form=decorrelation)
    return DistillLoss(
        "cos+l1" if term is None else "cos+l1+decorrelation",
        cos_weight=cos_weight,
        l1_weight=l1_weight,
        decorrelation=term,
        decorrelation_taps=decorrelation_taps,
        decorrelation_weight=decorrelation_weight,
    )
