"""The deep unconstrained features model: the model and its one objective (:mod:`.model`), the solvers
(:mod:`.solve`), the batched trainer for many small DUFMs at once (:mod:`.batched`) and the stopping rules
all of them share (:mod:`.stopping`).

May use :mod:`deepcollapse.measure`; never the theory, nets, experiments or CLI.
"""

from deepcollapse.dufm.model import DUFM, DUFMConfig

__all__ = ["DUFM", "DUFMConfig"]
