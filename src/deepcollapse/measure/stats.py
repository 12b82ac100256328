r"""Sufficient statistics of labelled features (:class:`ClassStats`) and the precision cutoff of their rank
decisions.

Precision cutoff (derivation in ``docs/conventions.md``). Features given in a floating type with machine
epsilon ``ε`` (float16 ``9.8e-4``, bfloat16 ``7.8e-3``, float32 ``1.2e-7``, float64 ``2.2e-16``) are known only
up to their rounding: a feature vector ``h_i`` carries an error ``δ_i`` with ``||δ_i|| <= ε ||h_i||``. A class
mean then carries ``||E_c|| <= ε sqrt(mean_{i∈c} ||h_i||²)`` (Jensen), the float64 class sums add at most
``n_c ε_64`` relative, and the centred means ``M̄ = A M`` (``A = I - 1 w^T``) carry ``A E`` with

.. math::

    ||A E||_2 \le ||A||_2 \, ||E||_F \le ε_{\rm eff}\, ||A||_2\, R, \qquad
    R = \Big(\sum_c \frac{1}{n_c}\sum_{i \in c} ||h_i||^2\Big)^{1/2}
      = \Big(\sum_c ||μ_c||^2 + \mathrm{Var}_c\Big)^{1/2},

``ε_eff = ε + max_c n_c · ε_64``. By Weyl's inequality no singular value of ``M̄`` below that bound can be told
from zero, so every pseudo-inverse and rank in the package keeps only singular values above
``τ = rtol · ||A||_2 · R`` with ``rtol = RTOL_FACTOR · ε_eff`` by default (``R`` without ``A`` for the
uncentred means). ``τ`` is absolute: features far from the origin round on the scale of their offset,
which ``R`` includes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from deepcollapse._validate import DeepCollapseError

__all__ = [
    "F64",
    "RTOL_FACTOR",
    "ClassStats",
    "Weighting",
    "centring_norm",
    "check_rtol",
    "class_weights",
    "default_rtol",
    "dtype_eps",
    "feature_scale",
    "singular_cutoff",
]

Weighting = Literal["samples", "classes"]
F64 = torch.float64
EPS64 = torch.finfo(F64).eps
RTOL_FACTOR = 2.0  # the cutoff allows two roundings of each feature (see the module docstring)


@dataclass(frozen=True)
class ClassStats:
    """Sufficient statistics of labelled features, in float64.

    Attributes
    ----------
    counts : (K,) int64, samples per class ``n_c``.
    means : (K, D) class means ``M``.
    within_trace : (K,) per-class variance ``Var_c = 1/n_c Σ_{i in c} ||h_i - μ_c||²``.
    means_sigma_w : (K, K) ``M_r Σ_W M_r^T`` with ``M_r = M - 1r^T`` (``r`` = ``centre``), or ``None`` (the
        covariance path at large K does not keep it). Enough for NC1 under any weighting, since
        ``M̄ = A M = A M_r`` for the centring matrix ``A = I - 1w^T`` (``A1 = 0``).
    sigma_w : (D, D) ``Σ_W`` or ``None`` (the Gram path does not keep it).
    ncc_correct : (K,) per class, samples whose nearest class mean is their own, or ``None``.
    centre : (D,) the reference point ``r`` of ``means_sigma_w``; ``None`` means the origin.
    eps : machine epsilon of the coarsest dtype the features were given in (float64's for integers).
    classes : (K,) the original labels of the K rows, or ``None`` for ``0..K-1``.
    nc4_disagree : (K,) per class, samples whose classifier prediction differs from the nearest class
        centre (Papyan et al.'s NC4), or ``None`` when no predictions were given.
    """

    counts: Tensor
    means: Tensor
    within_trace: Tensor
    means_sigma_w: Tensor | None
    sigma_w: Tensor | None = None
    ncc_correct: Tensor | None = None
    centre: Tensor | None = None
    eps: float = EPS64
    classes: Tensor | None = None
    nc4_disagree: Tensor | None = None

    @property
    def num_classes(self) -> int:
        return int(self.counts.numel())

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def class_ids(self) -> list[int]:
        """The original label of each row (``0..K-1`` unless a subset was measured)."""
        return list(range(self.num_classes)) if self.classes is None else [int(c) for c in self.classes]

    def to(self, device: torch.device | str) -> ClassStats:
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        names = ("counts", "means", "within_trace", "means_sigma_w", "sigma_w", "ncc_correct", "centre")
        return replace(self, **{n: mv(getattr(self, n)) for n in (*names, "classes", "nc4_disagree")})


def dtype_eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a feature dtype; integers and bools convert exactly, so float64's."""
    return float(torch.finfo(dtype).eps) if dtype.is_floating_point else EPS64


def default_rtol(stats: ClassStats) -> float:
    """``RTOL_FACTOR · (ε_input + max_c n_c · ε_64)``: the relative precision of the class means."""
    n_max = float(stats.counts.max()) if stats.counts.numel() else 1.0
    return RTOL_FACTOR * (stats.eps + n_max * EPS64)


def check_rtol(rtol: float | None, stats: ClassStats) -> float:
    """``rtol`` as a float in (0, 1), or the default for ``stats`` when ``None``."""
    if rtol is None:
        return default_rtol(stats)
    if isinstance(rtol, bool) or not isinstance(rtol, int | float) or not 0.0 < float(rtol) < 1.0:
        raise DeepCollapseError(f"rtol must be a number in (0, 1), got {rtol!r}")
    return float(rtol)


def class_weights(stats: ClassStats, weighting: Weighting) -> Tensor:
    """``w_c = n_c/N`` (``"samples"``) or ``1/K`` (``"classes"``): the weights of the global mean."""
    if weighting == "samples":
        return stats.counts.to(device=stats.means.device, dtype=F64) / stats.total
    if weighting == "classes":
        return torch.full((stats.num_classes,), 1.0 / stats.num_classes, dtype=F64, device=stats.means.device)
    raise DeepCollapseError(f"weighting must be 'samples' or 'classes', got {weighting!r}")


def centring_norm(w: Tensor) -> float:
    """Spectral norm of ``A = I - 1 w^T`` in closed form (O(K)).

    ``A^T A = I + U C U^T`` with ``U = [1, w]``, ``C = [[0, -1], [-1, K]]``; its non-unit eigenvalues are those of
    the 2 x 2 matrix ``C U^T U``, so ``||A||_2² = 1 + max(0, λ_max(C U^T U))``.
    """
    k = float(w.numel())
    s1, sw, ww = float(w.sum()), float(w.sum()), float(w @ w)
    gram = torch.tensor([[k, s1], [sw, ww]], dtype=F64)
    c = torch.tensor([[0.0, -1.0], [-1.0, k]], dtype=F64)
    lam = torch.linalg.eigvals(c @ gram).real.max()
    return math.sqrt(1.0 + max(0.0, float(lam)))


def feature_scale(stats: ClassStats) -> float:
    """``R = sqrt(Σ_c (||μ_c||² + Var_c))``: the root of the summed per-class mean squared feature norm."""
    return math.sqrt(float((stats.means.pow(2).sum(1) + stats.within_trace).sum()))


def singular_cutoff(stats: ClassStats, *, weighting: Weighting | None = "samples", rtol: float | None = None) -> float:
    """The absolute singular-value cutoff ``τ = rtol · ||A||_2 · R`` for the centred means (``weighting``) or,
    with ``weighting=None``, ``rtol · R`` for the uncentred means."""
    a_norm = 1.0 if weighting is None else centring_norm(class_weights(stats, weighting))
    return check_rtol(rtol, stats) * a_norm * feature_scale(stats)
