"""The analyses of how the experts self-organise (SPEC §13), each a function returning numbers and a plot.

::

    from prism_vfm.analysis import routing_affinity, plot_affinity

    aff = routing_affinity(model, batches, contexts=[0, 1, 2], kind="teacher")
    aff.probs[2]        # (3, E): P(expert selected | teacher) in block 2, rows sum to top_k
    aff.separation[2]   # normalised mutual information between teacher and selected expert
    plot_affinity(aff, "affinity.png")

``prism analyze routing|coactivation|gradients|seeds|gates|efficiency`` runs them from the command line.
"""

from prism_vfm.analysis.coactivation import (
    Coactivation,
    coactivation,
    coactivation_series,
    plot_coactivation,
    plot_coactivation_series,
)
from prism_vfm.analysis.efficiency import analytic_macs, efficiency, efficiency_table, measure_latency
from prism_vfm.analysis.gates import Gates, gate_statistics, gate_trajectory, plot_gate_trajectory, plot_gates
from prism_vfm.analysis.gradients import GradientConflict, gradient_conflict, plot_gradient_conflict
from prism_vfm.analysis.routing import (
    Affinity,
    normalized_mutual_information,
    plot_affinity,
    routing_affinity,
)
from prism_vfm.analysis.seeds import (
    SeedAlignment,
    affinity_agreement,
    align_affinities,
    match_experts,
    plot_seed_alignment,
)

__all__ = [
    "Affinity",
    "Coactivation",
    "Gates",
    "GradientConflict",
    "SeedAlignment",
    "affinity_agreement",
    "align_affinities",
    "analytic_macs",
    "coactivation",
    "coactivation_series",
    "efficiency",
    "efficiency_table",
    "gate_statistics",
    "gate_trajectory",
    "gradient_conflict",
    "match_experts",
    "measure_latency",
    "normalized_mutual_information",
    "plot_affinity",
    "plot_coactivation",
    "plot_coactivation_series",
    "plot_gate_trajectory",
    "plot_gates",
    "plot_gradient_conflict",
    "plot_seed_alignment",
    "routing_affinity",
]
