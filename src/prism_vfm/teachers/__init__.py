"""Frozen teachers for Stage-1 distillation (SPEC §5): specs, the registry, loading, the frozen wrapper.

::

    from prism_vfm.teachers import build_teacher, teacher_set

    teachers = [build_teacher(spec, 384, weights="/data/teachers") for spec in teacher_set("L")]
    maps = teachers[0](images)  # 4 tensors (B, 1024, 27, 27): DINOv2-L/14 taps 5, 11, 17, 23

A custom teacher is registered without touching the library::

    register_teacher(TeacherSpec("my_vit", TimmBuilder("vit_small_patch16_224.augreg_in21k"),
                                 taps=(3, 7, 11), out_dim=384, patch_size=16))
"""

from prism_vfm.teachers.build import build_teacher, find_weights_file, load_teacher_weights, read_state_dict
from prism_vfm.teachers.frozen import FrozenTeacher, sam_resize_pad
from prism_vfm.teachers.registry import (
    BUILTIN_TEACHERS,
    TEACHER_ORDER,
    get_teacher_spec,
    list_teachers,
    register_teacher,
    teacher_set,
)
from prism_vfm.teachers.spec import TeacherSpec, TimmBuilder, resize_longest_side
from prism_vfm.teachers.tiny import TINY_TEACHERS

__all__ = [
    "BUILTIN_TEACHERS",
    "TEACHER_ORDER",
    "TINY_TEACHERS",
    "FrozenTeacher",
    "TeacherSpec",
    "TimmBuilder",
    "build_teacher",
    "find_weights_file",
    "get_teacher_spec",
    "list_teachers",
    "load_teacher_weights",
    "read_state_dict",
    "register_teacher",
    "resize_longest_side",
    "sam_resize_pad",
    "teacher_set",
]
