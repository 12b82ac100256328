"""deepcollapse: deep neural collapse in the deep unconstrained features model and in real networks.

Layout (imports flow downward only; nothing imports :mod:`deepcollapse.cli`):

* :mod:`deepcollapse.measure` -- DNC metrics, streaming accumulators, probes, feature readers
* :mod:`deepcollapse.dufm` -- the DUFM, its objective and solvers (may use ``measure``)
* :mod:`deepcollapse.theory` -- closed forms, low-rank constructions, solution analysis (uses ``dufm``)
* :mod:`deepcollapse.nets` -- data, backbones with a DUFM head, real-network training
* :mod:`deepcollapse.experiments` -- runs, sweeps, follow-up experiments
* :mod:`deepcollapse.cli` -- the ``deepcollapse`` command (parse, call, print, write)

``deepcollapse.metrics`` and ``deepcollapse.analysis`` are kept as short names for
:mod:`deepcollapse.measure.metrics` and :mod:`deepcollapse.theory.analysis`.
"""

import sys as _sys

from deepcollapse import theory
from deepcollapse._validate import DeepCollapseError, DivergenceError
from deepcollapse.dufm.model import DUFM, DUFMConfig
from deepcollapse.measure import metrics
from deepcollapse.measure.probe import DNCProbe
from deepcollapse.theory import analysis

_sys.modules[__name__ + ".metrics"] = metrics
_sys.modules[__name__ + ".analysis"] = analysis

__version__ = "0.1.0"

__all__ = [
    "DUFM",
    "DNCProbe",
    "DUFMConfig",
    "DeepCollapseError",
    "DivergenceError",
    "__version__",
    "analysis",
    "metrics",
    "theory",
]
