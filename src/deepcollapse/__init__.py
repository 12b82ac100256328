"""deepcollapse: deep neural collapse in the deep unconstrained features model and in real networks."""

from . import metrics, theory
from .dufm import DUFM, DUFMConfig
from .probe import DNCProbe as DNCProbe
from .validate import DeepCollapseError, DivergenceError

__version__ = "0.1.0"

__all__ = [
    "DUFM",
    "DUFMConfig",
    "DeepCollapseError",
    "DivergenceError",
    "__version__",
    "metrics",
    "theory",
]
