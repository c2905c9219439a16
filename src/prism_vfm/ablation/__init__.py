"""Ablations and baselines of the paper as named configuration variants, and a sweep runner over them.

::

    from prism_vfm.ablation import apply_ablation, run_sweep
    from prism_vfm.distill.config import preset

    cfg = apply_ablation(preset("LB"), "wo_anchor")          # one variant, for prism distill
    run_sweep(["prism", "dense", "wo_film", "top1"], preset("tiny"), "runs/sweep")

``prism distill|finetune --ablation NAME`` and ``prism sweep --variants a,b,c`` do the same from the
command line; :mod:`prism_vfm.ablation.variants` lists every variant and its switches.
"""

from prism_vfm.ablation.sweep import comparison_table, run_sweep
from prism_vfm.ablation.variants import (
    VARIANTS,
    Variant,
    apply_ablation,
    describe,
    dual_stream_active_flops,
    iso_flops_hidden,
    variant,
)

__all__ = [
    "VARIANTS",
    "Variant",
    "apply_ablation",
    "comparison_table",
    "describe",
    "dual_stream_active_flops",
    "iso_flops_hidden",
    "run_sweep",
    "variant",
]
