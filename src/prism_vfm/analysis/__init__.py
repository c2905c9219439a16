"""The analyses of how the experts self-organise (SPEC §13), each a function returning numbers and a plot.

::

    from prism_vfm.analysis import routing_affinity, plot_affinity

    aff = routing_affinity(model, batches, contexts=[0, 1, 2], kind="teacher")
    aff.probs[2]        # (3, E): P(expert selected | teacher) in block 2, rows sum to top_k
    aff.separation[2]   # normalised mutual information between teacher and selected expert
    plot_affinity(aff, "affinity.png")

``prism analyze routing|coactivation|gradients|seeds|gates|efficiency`` runs them from the command line.
"""

from prism_vfm.analysis.gates import Gates, gate_statistics, gate_trajectory, plot_gate_trajectory, plot_gates
from prism_vfm.analysis.routing import (
    Affinity,
    normalized_mutual_information,
    plot_affinity,
    routing_affinity,
)

__all__ = [
    "Affinity",
    "Gates",
    "gate_statistics",
    "gate_trajectory",
    "normalized_mutual_information",
    "plot_affinity",
    "plot_gate_trajectory",
    "plot_gates",
    "routing_affinity",
]
