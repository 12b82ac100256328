"""Theory: the DNC closed forms (:mod:`.closed_form`), the low-rank SRG construction (:mod:`.lowrank`) and
the analysis of a solution against both (:mod:`.analysis`).

``deepcollapse.theory.dnc_loss`` and the other closed forms are re-exported here.
"""

from deepcollapse.theory.closed_form import (
    DNCSolution,
    ZeroThreshold,
    balanced_scales,
    check,
    dnc_constant,
    dnc_loss,
    dnc_objective,
    dnc_scale,
    dnc_solution,
    optimal_parameters,
    optimal_scale,
    zero_threshold,
)

__all__ = [
    "DNCSolution",
    "ZeroThreshold",
    "balanced_scales",
    "check",
    "dnc_constant",
    "dnc_loss",
    "dnc_objective",
    "dnc_scale",
    "dnc_solution",
    "optimal_parameters",
    "optimal_scale",
    "zero_threshold",
]
