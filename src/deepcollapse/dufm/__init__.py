"""The deep unconstrained features model: the model and its one objective (:mod:`.model`), the solvers
(:mod:`.solve`) and the batched trainer for many small DUFMs at once (:mod:`.batched`).

May use :mod:`deepcollapse.measure`; never the theory, nets, experiments or CLI.
"""

from deepcollapse.dufm.model import DUFM, DUFMConfig

__all__ = ["DUFM", "DUFMConfig"]
