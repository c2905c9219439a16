"""Three tiny teachers (random-init timm ViTs of different patch sizes and widths) for CPU runs and tests.

They exercise every geometry the real teachers have: a finer grid than the student's (student projection
upsampled), the same grid, and a coarser one (teacher map upsampled).
"""

from __future__ import annotations

from prism_vfm.teachers.registry import register_teacher
from prism_vfm.teachers.spec import TeacherSpec, TimmBuilder


def _tiny(name: str, patch: int, width: int) -> TeacherSpec:
    builder = TimmBuilder(
        "vit_tiny_patch16_224", dict(patch_size=patch, embed_dim=width, depth=2, num_heads=2)
    )
    return TeacherSpec(
        name,
        builder,
        taps=(0, 1),
        out_dim=width,
        patch_size=patch,
        source="random initialisation only (no weights exist)",
    )


TINY_TEACHERS = tuple(
    register_teacher(_tiny(name, patch, width), overwrite=True)
    for name, patch, width in (("tiny_a", 4, 32), ("tiny_b", 8, 24), ("tiny_c", 16, 16))
)
