"""``prism demo``: the whole method on rendered scenes on a CPU, with tiny teachers that differ.

::

    from prism_vfm.demo import run_demo

    result = run_demo("runs/demo", quick=True)   # data → teachers → Stage 1 → Stage 2 → evaluation → report
    print(result.report, result.metrics["delta_m"])
"""

from prism_vfm.demo.pipeline import DemoConfig, DemoResult, demo_config, run_demo
from prism_vfm.demo.teachers import DEMO_TEACHERS, DemoTeacherConfig, prepare_teachers

__all__ = [
    "DEMO_TEACHERS",
    "DemoConfig",
    "DemoResult",
    "DemoTeacherConfig",
    "demo_config",
    "prepare_teachers",
    "run_demo",
]
