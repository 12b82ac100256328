r"""Closed forms for the DNC solution of the L-DUFM (docs/theory.md).

For K classes, n samples per class and L >= 1 layers, the deep-neural-collapse configuration (orthogonal
frames, balanced scales) has loss

.. math::

    \mathcal L_{DNC} = \min_{s\in[0,1]} \tfrac12 (1-s)^2 + \tfrac K2 (L+1)\, C\, s^{2/(L+1)},
    \qquad C = \Bigl(n\, λ_{H_1} \prod_{l=1}^L λ_{W_l}\Bigr)^{1/(L+1)},

where ``s`` is the output scale (output = ``s Y``). Stationarity reads ``(1-s) s^{(L-1)/(L+1)} = K C``.
For L = 1, ``s = max(0, 1 - K C)``. For L >= 2 the penalty is concave in ``s``, so ``s = 0`` is always a
local minimum of ``f``; it becomes the minimum of ``f`` -- zero is then the best DNC configuration -- when
``K C`` passes the DNC family's threshold

.. math::

    (K C)^* = \frac1L \Bigl(\frac{L-1}{L}\Bigr)^{(L-1)/(L+1)}, \qquad s^* = \frac{L-1}L ,

(solve ``f(s) = f(0)`` and ``f'(s) = 0`` together: since ``(L-1)/(L+1) + 2/(L+1) = 1`` the two give
``(L-1)s = L s²``). ``L_DNC`` is the global optimum of the DUFM where that is proven: K = 2 at any depth
(the paper's theorem) and L = 1 (the plain UFM). For K > 2 and L >= 2 it is the loss of the best DNC
configuration, not a proven optimum: lower-rank solutions can beat it (the follow-up, see ``lowrank``),
also past the threshold, where they can beat zero.

At the optimum the L+1 factors are balanced (AM-GM):
``n λ_{H1} t² = λ_{W_1}(q_2/t)² = … = λ_{W_L}(s/q_L)² = C s^{2/(L+1)}``, with ``t`` the norm of an
H1 class mean and ``q_l`` that of a (post-ReLU) layer-l class mean; :func:`optimal_parameters` builds the
parameters from these scales.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from deepcollapse._validate import DeepCollapseError, check_nonneg, check_positive_int, per_layer
from deepcollapse.dufm.model import DUFMConfig, forward, label_matrix, labels_from_counts, objective
from deepcollapse.dufm.stopping import relative_gap
from deepcollapse.measure import metrics as M

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


def _lambdas(num_layers: int, lambda_h: float, lambda_w: float | Sequence[float]) -> list[float]:
    check_nonneg("lambda_h", lambda_h)
    return per_layer("lambda_w", lambda_w, num_layers, check_nonneg)


def dnc_constant(num_layers: int, n: int, lambda_h: float, lambda_w: float | Sequence[float]) -> float:
    """``C = (n λ_H1 Π_l λ_Wl)^{1/(L+1)}`` (computed in logs, so tiny λ's do not underflow)."""
    L = check_positive_int("num_layers", num_layers)
    n = check_positive_int("n", n)
    lw = _lambdas(L, lambda_h, lambda_w)
    if lambda_h == 0 or any(v == 0 for v in lw):
        return 0.0
    logs = math.log(n) + math.log(lambda_h) + sum(math.log(v) for v in lw)
    try:
        return math.exp(logs / (L + 1))
    except OverflowError:
        raise DeepCollapseError(
            f"lambda_h and lambda_w are too large: C overflows a float (log C = {logs / (L + 1):.6g})"
        ) from None


def dnc_objective(s: float, *, num_classes: int, num_layers: int, c: float) -> float:
    """``f(s) = ½(1-s)² + (K/2)(L+1) C s^{2/(L+1)}``: the DNC loss at output scale ``s``."""
    L = num_layers
    penalty = c * s ** (2 / (L + 1))  # first, so that s = 0 gives 0 even for a C near the float range
    return 0.5 * (1 - s) ** 2 + 0.5 * num_classes * (L + 1) * penalty


def _critical_kc(num_layers: int) -> float:
    """``(K C)^* = (1/L) ((L-1)/L)^{(L-1)/(L+1)}`` (1 for L = 1): the zero threshold of ``K C``."""
    L = num_layers
    return (1 / L) * ((L - 1) / L) ** ((L - 1) / (L + 1))


def optimal_scale(kc: float, num_layers: int) -> float:
    """The global minimizer over ``s ∈ [0, 1]`` of ``f(s) = ½(1-s)² + ½(L+1)·kc·s^{2/(L+1)}``.

    ``kc = K·C`` for DNC; other constructions with the same balanced form (the low-rank SRG family) pass
    their own constant. 0 from the threshold ``kc >= (K C)^*`` on (at it, ``f(s^*) = f(0) = ½`` and the zero
    solution is returned); below it, the root of ``(1-s) s^{(L-1)/(L+1)} = kc`` in ``(s^*, 1]``, where the
    left side falls from ``(K C)^*`` to 0: ``1 - kc`` for L = 1; for L >= 2 bisection to the last bit, down to the
    first float at which the left side is ``<= kc`` (an exact float root is returned exactly).
    """
    L = check_positive_int("num_layers", num_layers)
    if kc != math.inf:  # K C past the float range (K times a C near it) is past the threshold too
        kc = check_nonneg("kc", kc)
    if kc >= _critical_kc(L):
        return 0.0
    if L == 1:
        return 1.0 - kc  # exact; bisection would lose the relative precision of a root near 0
    e = (L - 1) / (L + 1)
    lo, hi = (L - 1) / L, 1.0
    while True:
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:
            return hi  # the first float at which (1-s) s^e <= kc
        if (1 - mid) * mid**e > kc:
            lo = mid
        else:
            hi = mid


def _scale_from_c(num_classes: int, num_layers: int, c: float) -> float:
    return optimal_scale(num_classes * c, num_layers)


def dnc_scale(
    *,
    num_classes: int,
    num_layers: int,
    n: int,
    lambda_h: float,
    lambda_w: float | Sequence[float],
) -> float:
    """The optimal output scale ``s`` of the DNC configuration (0 for the zero solution)."""
    K = check_positive_int("num_classes", num_classes, minimum=2)
    c = dnc_constant(num_layers, n, lambda_h, lambda_w)
    return _scale_from_c(K, num_layers, c)


def dnc_loss(
    *,
    num_classes: int,
    num_layers: int,
    n: int,
    lambda_h: float,
    lambda_w: float | Sequence[float],
) -> float:
    """``L_DNC``: the loss of the best DNC configuration (the DUFM's global optimum for K = 2 or L = 1)."""
    s = dnc_scale(num_classes=num_classes, num_layers=num_layers, n=n, lambda_h=lambda_h, lambda_w=lambda_w)
    c = dnc_constant(num_layers, n, lambda_h, lambda_w)
    return dnc_objective(s, num_classes=num_classes, num_layers=num_layers, c=c)


@dataclass(frozen=True)
class ZeroThreshold:
    """The DNC family's zero threshold: past it, all-zero parameters beat every DNC configuration.

    ``kc``: critical ``K C``; ``c``: critical ``C``; ``s``: the output scale of the non-zero optimum at the
    threshold (``(L-1)/L``; for L = 1 it shrinks continuously to 0); ``lambda_equal``: the critical common
    λ when ``λ_H1 = λ_W1 = … = λ_WL``; ``scale``: the factor by which all the given λ's can be multiplied
    before the threshold is reached (``inf`` if some λ is 0); ``zero_is_optimal``: whether the given λ's
    are past it, i.e. zero is the best DNC configuration; ``zero_is_global_optimum``: ``True`` past the
    threshold where ``L_DNC`` is proven global (K = 2, or L = 1), ``False`` before it (a DNC configuration
    beats zero), ``None`` past it for K > 2 and L >= 2, where it is not known (a low-rank solution can beat
    zero there: K = 10, L = 4, n = 5 at 1.05 times the threshold λ).
    """

    kc: float
    c: float
    s: float
    lambda_equal: float
    scale: float
    zero_is_optimal: bool
    zero_is_global_optimum: bool | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def zero_threshold(
    *,
    num_classes: int,
    num_layers: int,
    n: int,
    lambda_h: float = 0.0,
    lambda_w: float | Sequence[float] = 0.0,
) -> ZeroThreshold:
    """The DNC family's zero threshold (:class:`ZeroThreshold`): the critical regularization above which
    all-zero parameters beat every DNC configuration (and are the global optimum for K = 2 or L = 1).

    ``(K C)^* = (1/L) ((L-1)/L)^{(L-1)/(L+1)}`` (1 for L = 1). ``C`` is homogeneous of degree one in the
    λ's, so multiplying every λ by ``scale = C^*/C`` reaches the threshold.
    """
    K = check_positive_int("num_classes", num_classes, minimum=2)
    L = check_positive_int("num_layers", num_layers)
    n = check_positive_int("n", n)
    kc = _critical_kc(L)
    c_star = kc / K
    c = dnc_constant(L, n, lambda_h, lambda_w)
    scale = math.inf if c == 0 else c_star / c
    return ZeroThreshold(
        kc=kc,
        c=c_star,
        s=(L - 1) / L,
        lambda_equal=c_star / n ** (1 / (L + 1)),
        scale=scale,
        zero_is_optimal=c >= c_star,
        zero_is_global_optimum=(True if K == 2 or L == 1 else None) if c >= c_star else False,
    )


_NOT_UNIQUE = "the optimal scales are not unique when some λ is 0; give every λ a positive value"


def balanced_scales(
    *,
    num_classes: int,
    num_layers: int,
    n: int,
    lambda_h: float,
    lambda_w: float | Sequence[float],
) -> tuple[float, float, list[float]]:
    """``(s, t, [q_2, …, q_L])``: output scale, H1 class-mean norm, post-ReLU class-mean norms."""
    sol = dnc_solution(num_classes=num_classes, num_layers=num_layers, n=n, lambda_h=lambda_h, lambda_w=lambda_w)
    if sol.c == 0.0:
        raise DeepCollapseError(_NOT_UNIQUE)
    return sol.s, sol.t, sol.q


@dataclass(frozen=True)
class DNCSolution:
    """The theory's prediction for one DUFM configuration (balanced classes)."""

    num_classes: int
    num_layers: int
    n: int
    dnc_loss: float
    s: float
    c: float
    t: float  # norm of an H1 class mean
    q: list[float]  # norms of the post-ReLU class means, layers 2..L
    weight_norms: list[float]  # ||W_l||_F, l = 1..L
    zero_threshold: ZeroThreshold

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # recursive: zero_threshold becomes a dict too


def dnc_solution(
    *,
    num_classes: int,
    num_layers: int,
    n: int,
    lambda_h: float,
    lambda_w: float | Sequence[float],
) -> DNCSolution:
    """All closed-form quantities of the DNC optimum: loss, s, C, per-layer norms, threshold.

    The L+1 balanced factors all equal ``a = C s^{2/(L+1)}``, so ``t = √(a/(n λ_H1))`` and each ``W_l`` has
    K equal singular values ``q_{l+1}/q_l = √(a/λ_Wl)`` (``q_1 = t``, ``q_{L+1} = s``): ``||W_l||_F =
    √K √(a/λ_Wl)``. All are 0 past the threshold (``s = 0``) and undetermined (nan) when some λ is 0.
    """
    zt = zero_threshold(num_classes=num_classes, num_layers=num_layers, n=n, lambda_h=lambda_h, lambda_w=lambda_w)
    K, L = int(num_classes), int(num_layers)  # checked by zero_threshold
    lw = _lambdas(L, lambda_h, lambda_w)
    c = dnc_constant(L, n, lambda_h, lw)
    s = _scale_from_c(K, L, c)
    if c == 0.0:
        t, q, wn = math.nan, [math.nan] * (L - 1), [math.nan] * L
    else:
        a = c * s ** (2 / (L + 1))
        t = math.sqrt(a / (n * lambda_h))
        ratios = [math.sqrt(a / lam) for lam in lw]  # q_{l+1} / q_l
        q = [t * math.prod(ratios[:i]) for i in range(1, L)]
        wn = [math.sqrt(K) * r for r in ratios]
    return DNCSolution(
        num_classes=K,
        num_layers=L,
        n=n,
        dnc_loss=dnc_objective(s, num_classes=K, num_layers=L, c=c),
        s=s,
        c=c,
        t=t,
        q=q,
        weight_norms=wn,
        zero_threshold=zt,
    )


def _orthonormal(rows: int, cols: int, generator: torch.Generator | None) -> Tensor:
    """A (rows x cols) matrix with orthonormal columns: identity-like, or the Q factor of a standard normal
    matrix drawn from ``generator`` when one is given."""
    if generator is None:
        return torch.eye(rows, cols, dtype=torch.float64)
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64)).Q


def optimal_parameters(
    config: DUFMConfig,
    *,
    h1: Literal["orthogonal", "antipodal", "etf"] = "orthogonal",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Explicit DNC parameters ``(H1, [W_1, …, W_L])`` whose DUFM loss is ``L_DNC``.

    They are a global optimum of the DUFM where that is proven (K = 2 at any depth, L = 1), and the best DNC
    configuration otherwise. Construction (orthonormal ``E``'s; ``e_c`` the standard basis, so ReLUs act as
    the identity from layer 2 on): ``W_l = (q_{l+1}/q_l) P_K`` (``P_K`` keeps the first K coordinates),
    ``W_L = (s/q_L) [I_K 0]``, and the H1 class means of norm ``t`` in one of three geometries, all with the
    same loss (the angle between H1's class means is not fixed by the theory):

    - ``"orthogonal"``: ``H1 = t E_1 ⊗ 1_n^T``, ``W_1 = (q_2/t) [e_1..e_K] E_1^T``;
    - ``"antipodal"`` (K = 2, L >= 2): means ``±t u``, ``W_1 = (q_2/t)(e_1 - e_2) u^T``;
    - ``"etf"`` (L >= 2): a simplex ETF, means ``t √(K/(K-1)) E_1 P`` (``P = I - 11^T/K``) with
      ``W_1 = (q_2/t) √(K/(K-1)) [e_1..e_K] P E_1^T``: the layer-2 pre-activations are
      ``q_2 (K/(K-1)) P``, whose negative entries the ReLU removes; ``||W_1||_F = √K q_2/t`` as for the
      orthogonal H1. For K = 2 it is the antipodal optimum.

    A ``generator`` rotates H1 randomly. Needs balanced classes and every width ``d_l >= K`` (``d_1 >= 1``
    for antipodal).
    """
    K, L = config.num_classes, config.num_layers
    if not config.balanced:
        raise DeepCollapseError("the closed-form optimum is for balanced classes (one n_per_class)")
    widths = config.widths
    low = [(i + 1, d) for i, d in enumerate(widths) if d < K and not (h1 == "antipodal" and i == 0)]
    if low:
        raise DeepCollapseError(
            f"the DNC optimum needs every width >= K = {K}; layer(s) {[i for i, _ in low]} have "
            f"width(s) {[d for _, d in low]}"
        )
    if h1 not in ("orthogonal", "antipodal", "etf"):
        raise DeepCollapseError(f"h1 must be 'orthogonal', 'antipodal' or 'etf', got {h1!r}")
    if h1 == "antipodal" and (K != 2 or L < 2):
        raise DeepCollapseError("h1='antipodal' is optimal for K = 2 and L >= 2 only")
    if h1 == "etf" and L < 2:
        raise DeepCollapseError("h1='etf' needs a ReLU after H1 (L >= 2)")
    sol = dnc_solution(num_classes=K, num_layers=L, n=config.n, lambda_h=config.lambda_h, lambda_w=config.lambdas_w)
    if sol.c == 0.0:
        raise DeepCollapseError(_NOT_UNIQUE)
    dims = [*widths, K]
    ratios = [v / math.sqrt(K) for v in sol.weight_norms]  # q_{l+1} / q_l: all 0 for the zero solution
    means, first = _h1_geometry(h1, K, dims[0], dims[1], generator)
    ws = [first * ratios[0]]
    for i in range(1, L):
        p_k = torch.eye(dims[i + 1], K, dtype=torch.float64) @ torch.eye(K, dims[i], dtype=torch.float64)
        ws.append(p_k * ratios[i])
    h = (means * sol.t)[:, labels_from_counts(config.counts)]
    h, *ws = (x.to(device=config.device, dtype=config.torch_dtype) for x in (h, *ws))
    return h, ws


def _h1_geometry(
    kind: str, num_classes: int, d1: int, d2: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Unit-norm H1 class means (d1 x K) of one optimal geometry, and ``W_1`` up to the factor ``q_2/t``:
    ``W_1 M`` has the ReLU image ``[e_1..e_K]`` (see :func:`optimal_parameters`)."""
    K = num_classes
    if kind == "antipodal":
        u = _orthonormal(d1, 1, generator).flatten()
        first = torch.zeros(d2, d1, dtype=torch.float64)
        first[0], first[1] = u, -u
        return torch.stack([u, -u], dim=1), first
    e1 = _orthonormal(d1, K, generator)
    if kind == "etf":
        p = torch.eye(K, dtype=torch.float64) - 1.0 / K
        a = math.sqrt(K / (K - 1))
        return e1 @ p * a, torch.eye(d2, K, dtype=torch.float64) @ p @ e1.T * a
    return e1, torch.eye(d2, K, dtype=torch.float64) @ e1.T


def check(h1: Tensor, weights: Sequence[Tensor], config: DUFMConfig) -> dict[str, Any]:
    """Compare a DUFM solution, layer by layer, with the quantities the theory fixes (no verdict).

    This is the per-layer part of :func:`deepcollapse.theory.analysis.analyze_solution`, which adds ranks,
    spectra and the one verdict. Returns a JSON-ready dict: ``loss``, ``fit``, ``reg``, ``dnc_loss``,
    ``gap`` (``(loss - L_DNC)/L_DNC``, :func:`deepcollapse.dufm.stopping.relative_gap`), the output scale
    ``s`` (mean diagonal of the output class means) against ``s_theory``, ``s_rel_err``, ``h1_cos`` (pairwise
    cosines of the H1 class means: not fixed by the theory, any value of the free H1 angle is optimal),
    ``zero_threshold``, and ``layers``: per layer ``l = 1..L`` the class-mean norms (``mean_norm``, their
    average; ``mean_norm_rel_err``, the largest relative deviation of one class-mean norm from the theory's
    ``t`` or ``q_l``), ``||W_l||_F`` against the theory (``weight_norm_rel_err``), ``nc1``, and for
    ``l >= 2`` the orthogonal-frame distance ``nc2_orth`` (:func:`deepcollapse.metrics.nc2_orth`) of the
    post-ReLU class means. For unbalanced classes the theory's entries are ``None``. A relative error
    against a predicted 0 (the zero solution) or an undetermined (nan) one is the measured value itself.
    Computed in float64 on the CPU, whatever the parameters' dtype and device.
    """
    K, L = config.num_classes, config.num_layers
    labels, y = labels_from_counts(config.counts), label_matrix(config.counts)
    h1d, *wd = (x.detach().to("cpu", torch.float64) for x in (h1, *weights))  # in float64, on the CPU
    with torch.no_grad():
        total, fit, reg = objective(h1d, wd, y, config.lambda_h, config.lambdas_w)
        _, post, out = forward(h1d, wd)
    sol = None
    if config.balanced:
        sol = dnc_solution(num_classes=K, num_layers=L, n=config.n, lambda_h=config.lambda_h, lambda_w=config.lambdas_w)
    loss = float(total)
    stats = [M.class_stats(f.T, labels) for f in (h1d, *post)]
    s_meas = float(((out * y).sum(1) / y.sum(1)).mean())  # the mean of the class means' own output coordinate
    return {
        "loss": loss,
        "fit": float(fit),
        "reg": float(reg),
        "dnc_loss": None if sol is None else sol.dnc_loss,
        "gap": None if sol is None else float(relative_gap(loss, sol.dnc_loss)),
        "s": s_meas,
        "s_theory": None if sol is None else sol.s,
        "s_rel_err": None if sol is None else _rel_err(s_meas, sol.s),
        "h1_cos": _pairwise_cosines(stats[0].means),
        "layers": [_layer_check(l, stats[l - 1], wd[l - 1], sol) for l in range(1, L + 1)],
        "zero_threshold": None if sol is None else sol.zero_threshold.to_dict(),
    }


def _rel_err(measured: Tensor | float, predicted: float) -> float:
    """``max |measured - predicted| / predicted`` (``max |measured|`` when ``predicted`` is 0 or nan)."""
    m = torch.as_tensor(measured, dtype=torch.float64)
    if predicted == 0 or math.isnan(predicted):
        return float(m.abs().max())
    return float(((m - predicted).abs() / predicted).max())


def _pairwise_cosines(means: Tensor) -> list[float]:
    unit = means / means.norm(dim=1, keepdim=True).clamp_min(1e-300)
    iu = torch.triu_indices(len(means), len(means), 1)
    return [float(v) for v in (unit @ unit.T)[iu[0], iu[1]]]


def _layer_check(layer: int, stats: M.ClassStats, weight: Tensor, sol: DNCSolution | None) -> dict[str, Any]:
    norms = stats.means.norm(dim=1)
    mean_norm = float(norms.mean())
    wnorm = float(torch.linalg.matrix_norm(weight))
    q = None if sol is None else [sol.t, *sol.q][layer - 1]
    w_theory = None if sol is None else sol.weight_norms[layer - 1]
    return {
        "layer": layer,
        "mean_norm": mean_norm,
        "mean_norm_theory": q,
        "mean_norm_rel_err": None if q is None else _rel_err(norms, q),
        "weight_norm": wnorm,
        "weight_norm_theory": w_theory,
        "weight_norm_rel_err": None if w_theory is None else _rel_err(wnorm, w_theory),
        "nc1": M.nc1(stats),
        "nc2_orth": None if layer == 1 or mean_norm == 0.0 else M.nc2_orth(stats),
    }
