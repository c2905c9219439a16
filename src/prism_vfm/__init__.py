"""prism-vfm: PRISM multi-teacher distillation into a dual-stream conditioned-MoE ViT."""

from prism_vfm.compat.official import export_official, load_official, load_official_multitask, read_official
from prism_vfm.models.load import LoadError, LoadReport, load, load_into
from prism_vfm.models.multitask import PrismMultiTask
from prism_vfm.models.outputs import MultiTaskOutput, PrismOutput
from prism_vfm.models.prism_vit import PrismViT
from prism_vfm.models.registry import STUDENT_PRESETS, create_student

# Registers VidPrism's checkpoints with ``load``: one loader for both model families.
from prism_vfm.video import load as _video_load  # noqa: F401  (import for its registration)

__version__ = "0.1.0"

__all__ = [
    "STUDENT_PRESETS",
    "LoadError",
    "LoadReport",
    "MultiTaskOutput",
    "PrismMultiTask",
    "PrismOutput",
    "PrismViT",
    "create_student",
    "export_official",
    "load",
    "load_into",
    "load_official",
    "load_official_multitask",
    "read_official",
    "__version__",
]
