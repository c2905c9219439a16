"""The teacher registry: the built-in DINOv2 / CLIP / SAM teachers of SPEC §5 and user-registered ones.

Built-in names, ``_l`` = ViT-L teachers (width 1024, taps [5, 11, 17, 23]), ``_b`` = ViT-B teachers (width
768, taps [2, 5, 8, 11]); timm model as ``architecture.weight_tag``, then the official local file:

- ``dinov2_l``: ``vit_large_patch14_dinov2.lvd142m``, ``dinov2_vitl14_pretrain.bin``
- ``dinov2_b``: ``vit_base_patch14_dinov2.lvd142m``, ``dinov2_vitb14_pretrain.pth``
- ``clip_l``: ``vit_large_patch14_clip_336.laion2b_ft_in12k_in1k``, ``vit_large_patch16_clip_336.bin``
- ``clip_b``: ``vit_base_patch16_clip_384.laion2b_ft_in12k_in1k``, ``vit_base_patch16_clip_384.bin``
- ``clip_l_openai``: ``vit_large_patch14_clip_quickgelu_336.openai`` (no official file)
- ``clip_b_openai``: ``vit_base_patch16_clip_quickgelu_224.openai`` (no official file)
- ``sam_l``: ``samvit_large_patch16.sa1b``, ``samvit_large_patch16.bin``
- ``sam_b``: ``samvit_base_patch16.sa1b``, ``sam_vit_b_01ec64.pth``

The official CLIP teachers are timm's *default* tag of each architecture, ``laion2b_ft_in12k_in1k`` (a
LAION-2B CLIP fine-tuned on ImageNet-12k then 1k, not OpenAI CLIP); it is pinned here so a timm upgrade
cannot swap the weights. The OpenAI options use timm's QuickGELU architectures, the activation OpenAI CLIP
was trained with (same weight files as the ``.openai`` tags of the GELU-named architectures); timm has no
raw OpenAI ViT-B/16 at 384, so ``clip_b_openai`` is the 224 model, built at the student's size with its
position embedding resampled. Every teacher receives the same ImageNet-normalised tensor, as in the
official code.
"""

from __future__ import annotations

from typing import TypedDict, cast

from timm.models import vision_transformer, vision_transformer_sam

from prism_vfm.teachers.spec import CheckpointFilter, Preprocess, TeacherSpec, TimmBuilder

TAPS = {"L": (5, 11, 17, 23), "B": (2, 5, 8, 11)}
WIDTH = {"L": 1024, "B": 768}
# Official teacher ids are positions in this order (SPEC §4): the teacher-embedding rows follow it.
TEACHER_ORDER = ("dinov2", "clip", "sam")

# timm types the ViT filter's model as its VisionTransformer; the teachers using it are built as one.
_VIT_FILTER = cast(CheckpointFilter, vision_transformer.checkpoint_filter_fn)
_SAM_FILTER = vision_transformer_sam.checkpoint_filter_fn

_REGISTRY: dict[str, TeacherSpec] = {}


def register_teacher(spec: TeacherSpec, *, overwrite: bool = False) -> TeacherSpec:
    """Add ``spec`` under ``spec.name`` and return it; re-using a name is an error unless ``overwrite``."""
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"teacher {spec.name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[spec.name] = spec
    return spec


def get_teacher_spec(name: str) -> TeacherSpec:
    """The registered teacher called ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown teacher {name!r}; registered: {', '.join(list_teachers())}") from None


def list_teachers() -> list[str]:
    """Names of all registered teachers, sorted."""
    return sorted(_REGISTRY)


def teacher_set(size: str, *, openai_clip: bool = False) -> tuple[TeacherSpec, ...]:
    """The three teachers of a preset in official id order (0 DINOv2, 1 CLIP, 2 SAM).

    ``size`` is ``"L"`` (presets LB, LL) or ``"B"`` (BB, BS); ``openai_clip`` swaps in OpenAI CLIP weights.
    """
    if size.upper() not in TAPS:
        raise ValueError(f"teacher set size must be 'L' or 'B', got {size!r}")
    s = size.lower()
    clip = f"clip_{s}_openai" if openai_clip else f"clip_{s}"
    return tuple(get_teacher_spec(name) for name in (f"dinov2_{s}", clip, f"sam_{s}"))


def _hub_file(model_name: str, file: str = "pytorch_model.bin") -> str:
    return f"{file} of hf-hub:timm/{model_name}, saved under this name (weights='hub' fetches it instead)"


def _meta(url: str) -> str:
    return f"Meta's original {url}"


class _Width(TypedDict):
    taps: tuple[int, ...]
    out_dim: int


class _SamInput(TypedDict):
    patch_size: int
    preprocess: Preprocess
    long_side: int
    checkpoint_filter: CheckpointFilter


_L, _B = _Width(taps=TAPS["L"], out_dim=WIDTH["L"]), _Width(taps=TAPS["B"], out_dim=WIDTH["B"])
_SAM = _SamInput(patch_size=16, preprocess="sam", long_side=1024, checkpoint_filter=_SAM_FILTER)
_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{0}14/dinov2_vit{0}14_pretrain.pth"
_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/{}"

BUILTIN_TEACHERS = (
    TeacherSpec(
        name="dinov2_l",
        builder=TimmBuilder("vit_large_patch14_dinov2.lvd142m"),
        patch_size=14,
        files=("dinov2_vitl14_pretrain.bin",),
        source=f"{_meta(_DINOV2_URL.format('l'))}, or {_hub_file('vit_large_patch14_dinov2.lvd142m')}",
        checkpoint_filter=_VIT_FILTER,
        **_L,
    ),
    TeacherSpec(
        name="dinov2_b",
        builder=TimmBuilder("vit_base_patch14_dinov2.lvd142m"),
        patch_size=14,
        files=("dinov2_vitb14_pretrain.pth",),
        source=f"{_meta(_DINOV2_URL.format('b'))}, or {_hub_file('vit_base_patch14_dinov2.lvd142m')}",
        checkpoint_filter=_VIT_FILTER,
        **_B,
    ),
    TeacherSpec(
        name="clip_l",
        builder=TimmBuilder("vit_large_patch14_clip_336.laion2b_ft_in12k_in1k"),
        patch_size=14,
        files=("vit_large_patch16_clip_336.bin",),  # the official name says patch16; the model is patch 14
        source=_hub_file("vit_large_patch14_clip_336.laion2b_ft_in12k_in1k"),
        checkpoint_filter=_VIT_FILTER,
        **_L,
    ),
    TeacherSpec(
        name="clip_b",
        builder=TimmBuilder("vit_base_patch16_clip_384.laion2b_ft_in12k_in1k"),
        patch_size=16,
        files=("vit_base_patch16_clip_384.bin",),
        source=_hub_file("vit_base_patch16_clip_384.laion2b_ft_in12k_in1k"),
        checkpoint_filter=_VIT_FILTER,
        **_B,
    ),
    TeacherSpec(
        name="clip_l_openai",
        builder=TimmBuilder("vit_large_patch14_clip_quickgelu_336.openai"),
        patch_size=14,
        files=("vit_large_patch14_clip_336.openai.safetensors",),
        source=_hub_file("vit_large_patch14_clip_336.openai", "model.safetensors"),
        checkpoint_filter=_VIT_FILTER,
        **_L,
    ),
    TeacherSpec(
        name="clip_b_openai",
        builder=TimmBuilder("vit_base_patch16_clip_quickgelu_224.openai"),
        patch_size=16,
        files=("vit_base_patch16_clip_224.openai.safetensors",),
        source=_hub_file("vit_base_patch16_clip_224.openai", "model.safetensors"),
        checkpoint_filter=_VIT_FILTER,
        **_B,
    ),
    TeacherSpec(
        name="sam_l",
        builder=TimmBuilder("samvit_large_patch16.sa1b"),
        files=("samvit_large_patch16.bin",),
        source=f"{_hub_file('samvit_large_patch16.sa1b')}, or "
        f"{_meta(_SAM_URL.format('sam_vit_l_0b3195.pth'))}",
        **_SAM,
        **_L,
    ),
    TeacherSpec(
        name="sam_b",
        builder=TimmBuilder("samvit_base_patch16.sa1b"),
        files=("sam_vit_b_01ec64.pth",),
        source=f"{_meta(_SAM_URL.format('sam_vit_b_01ec64.pth'))}, or "
        f"{_hub_file('samvit_base_patch16.sa1b')}",
        **_SAM,
        **_B,
    ),
)

for _spec in BUILTIN_TEACHERS:
    register_teacher(_spec)
