r"""Low-rank solutions of the L-DUFM that beat deep neural collapse (docs/lowrank.md).

The strongly-regular-graph (SRG) construction, derived here, for ``K = C(r, 2)`` classes. Class ``c``
is an edge ``{i, j}`` of the complete graph on ``r`` vertices; ``B`` (r x K) is its incidence matrix
(``B e_c = e_i + e_j``, ``B B^T = (r-2) I + J``) and ``J`` an all-ones matrix. Every map commutes with
the vertex permutations, so the class means of layers 1..L-1 live in ``R^r`` and the solution has
``2L + 3`` free scales ``θ``:

.. math::

    M_1 = a_1 B + b_1 J_{r×K},\qquad W_l = a_{l+1} I_r + b_{l+1} J_{r×r}\ (l = 1..L-2),

    W_{L-1} = u B^T + v J_{K×r},\qquad W_L = x_0 I_K + x_1 A_1 + x_2 A_0 ,

with ``A_1`` (``A_0``) the adjacency of edges sharing one (no) vertex: the triangular graph T(r) and the
Kneser graph K(r, 2), both strongly regular. Before the last ReLU the class means
``\tilde M_L = W_{L-1} M_{L-1}`` have rank ``<= r`` (about ``√(2K)``); their entry for class ``{i,j}`` at
unit ``{k,l}`` is affine in ``|{i,j} ∩ {k,l}|``, so the ReLU keeps a union of the classes
``I, A_1, A_0`` and ``M_L`` has rank K. At the reference point ``b = 0, v = -u/2`` the entry is
``a u (|{i,j} ∩ {k,l}| - 1)``: the ReLU keeps exactly the diagonal (``M_L = a u I_K``, an orthogonal
frame as under DNC). With the L+1 penalty terms balanced (AM-GM) the reference point has the closed form

.. math::

    \mathcal L_{ref} = \min_s \tfrac12(1-s)^2 + \tfrac{L+1}2\,κ\, s^{2/(L+1)},\qquad
    κ = \Bigl(2Knλ_{H_1} \prod_{l=1}^{L-2} rλ_{W_l} \cdot \tfrac{Kr}4 λ_{W_{L-1}} \cdot Kλ_{W_L}\Bigr)^{1/(L+1)},

:func:`deepcollapse.theory.dnc_objective` with ``K C`` replaced by ``κ``. For equal λ,
``(κ/KC)^{L+1} = 2^{L-3} r/(r-1)^{L-2}``: below 1 (so ``L_ref < L_DNC``) for ``L >= 4, r >= 4``.

``L_SRG`` is the minimum found of the DUFM loss over all ``2L+3`` scales: ``W_L`` is eliminated by its ridge
optimum ``W_L = M_L^T (M_L M_L^T + Kλ_{W_L} I)^{-1}`` (it lies in the algebra of ``I, A_1, A_0``), the
other ``2L`` scales are found by Adam from a batch of non-zero starts (the reference point, its Kneser
variant, perturbed and random points; past the reference's zero threshold, where its ``s`` is 0, the
reference point at ``s = (L-1)/L``), then by the batched L-BFGS of :mod:`deepcollapse.dufm.multistart` from
the three best. Near or past that threshold (``κ > κ^*/2``) a continuation in λ adds a candidate: the
search at all λ's scaled down to ``κ = κ^*/2``, followed back to the given λ's in four geometric steps.
The result is reported as the DUFM :func:`~deepcollapse.dufm.objective` at explicit parameters
(:func:`srg_parameters`), never above the reference point, and is an upper bound on the DUFM optimum.
The optimizer often prefers the Kneser pattern (the ReLU keeps the disjoint edges) and earlier ReLUs that
clip exactly to ``B``. Where ``L_SRG < L_DNC`` is shown (by ``deepcollapse lowrank table``, tested in
``tests/test_lowrank.py``) for n = 5, all λ = 0.004: L = 3 for r = 5, 6, 7 (K = 10, 15, 21); L = 4 and 5 for
r = 4..7 (K = 6..21). At L = 3, r = 4 (K = 6) it stays above ``L_DNC``. Past the DNC family's zero threshold
the family still goes below 1/2 (K = 10, L = 4, n = 5 at 1.05 times it: 0.4245). For r = 3 (K = r) nothing is
low rank. Searches over the whole DUFM (:mod:`deepcollapse.experiments.atlas`) find more settings below
``L_DNC``; docs/atlas.md lists them with their commands.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from deepcollapse._validate import DeepCollapseError, check_nonneg, check_positive_int, per_layer
from deepcollapse.dufm.model import DUFMConfig, forward, label_matrix, labels_from_counts, objective
from deepcollapse.dufm.multistart import LBFGSOptions, lbfgs
from deepcollapse.theory.closed_form import dnc_loss, dnc_objective, optimal_scale, zero_threshold

__all__ = [
    "SRGSolution",
    "edges",
    "incidence_matrix",
    "reference_kappa",
    "reference_theta",
    "srg_loss",
    "srg_means_objective",
    "srg_order",
    "srg_parameters",
    "srg_solution",
    "srg_table",
]

F64 = torch.float64


def srg_order(num_classes: int) -> int | None:
    """``r`` with ``K = r(r-1)/2`` (``r >= 3``), or ``None`` when K is not such a number."""
    r = round((1 + math.sqrt(1 + 8 * num_classes)) / 2)
    return r if r >= 3 and r * (r - 1) // 2 == num_classes else None


def edges(r: int) -> list[tuple[int, int]]:
    """The classes: edges ``{i, j}``, ``i < j``, of the complete graph on ``r`` vertices, in lexicographic order."""
    return list(itertools.combinations(range(check_positive_int("r", r, minimum=3)), 2))


def incidence_matrix(r: int) -> Tensor:
    """``B`` (r x K): ``B[i, c] = 1`` when vertex ``i`` lies on edge ``c``. ``B B^T = (r-2) I + J``."""
    es = edges(r)
    b = torch.zeros(r, len(es), dtype=F64)
    for c, (i, j) in enumerate(es):
        b[i, c] = b[j, c] = 1.0
    return b


def _association(r: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(B, A_1, A_0)``: incidence, and adjacency of edges sharing one vertex / no vertex."""
    b = incidence_matrix(r)
    g = b.T @ b  # 2 on the diagonal, 1 for a shared vertex, 0 for disjoint edges
    return b, (g == 1).to(F64), (g == 0).to(F64)


def _num_theta(num_layers: int) -> int:
    return 2 * num_layers + 3


def _check_setting(r: int, num_layers: int, lambda_h: float, lambda_w: Any) -> list[float]:
    check_positive_int("r", r, minimum=3)
    check_positive_int("num_layers", num_layers, minimum=2)
    check_nonneg("lambda_h", lambda_h)
    return per_layer("lambda_w", lambda_w, num_layers, check_nonneg)


def _means_chain(theta: Tensor, r: int, num_layers: int) -> tuple[Tensor, list[Tensor]]:
    """Class means ``M_1`` (..., r, K) and the weight blocks (..., out, in) for scales ``θ`` (..., 2L+3)."""
    if theta.shape[-1:] != (_num_theta(num_layers),):
        raise DeepCollapseError(f"theta must have {_num_theta(num_layers)} entries for L = {num_layers}")
    b, a1, a0 = _association(r)
    k = b.shape[1]
    t = theta.to(F64)[..., None, None]
    eye_r, ones_rk, ones_rr, ones_kr = (
        torch.eye(r, dtype=F64),
        torch.ones(r, k, dtype=F64),
        torch.ones(r, r, dtype=F64),
        torch.ones(k, r, dtype=F64),
    )
    m1 = t[..., 0, :, :] * b + t[..., 1, :, :] * ones_rk
    ws = [t[..., 2 + 2 * i, :, :] * eye_r + t[..., 3 + 2 * i, :, :] * ones_rr for i in range(num_layers - 2)]
    j = 2 * num_layers - 2
    ws.append(t[..., j, :, :] * b.T + t[..., j + 1, :, :] * ones_kr)
    ws.append(t[..., j + 2, :, :] * torch.eye(k, dtype=F64) + t[..., j + 3, :, :] * a1 + t[..., j + 4, :, :] * a0)
    return m1, ws


def _eye(k: int) -> Tensor:
    return torch.eye(k, dtype=F64)


def srg_means_objective(
    theta: Tensor, *, r: int, num_layers: int, n: int, lambda_h: float, lambda_w: float | Sequence[float]
) -> Tensor:
    r"""The DUFM loss of the SRG solution with scales ``θ`` (..., 2L+3), computed on class means (differentiable).

    With every sample equal to its class mean the DUFM :func:`~deepcollapse.dufm.model.objective` equals the
    objective on the means ``M_1`` with ``Y = I_K`` and ``λ_{H_1} -> n λ_{H_1}``:
    ``\mathcal L = \frac1{2K}\|W_L σ(…σ(W_1 M_1)) - I_K\|_F^2 + \frac{n λ_{H_1}}2 \|M_1\|_F^2
    + Σ_l \frac{λ_{W_l}}2 \|W_l\|_F^2``.
    """
    lw = _check_setting(r, num_layers, lambda_h, lambda_w)
    m1, ws = _means_chain(theta, r, num_layers)
    total, _, _ = objective(m1, ws, _eye(m1.shape[-1]), n * lambda_h, lw)
    return total


def _ridge_last(h: Tensor, lam: float) -> Tensor:
    """The optimal last layer on class means ``H`` (K x K): ``W_L = H^T (H H^T + K λ_{W_L} I)^{-1}``."""
    k = h.shape[-1]
    return torch.linalg.solve(h @ h.mT + k * lam * _eye(k), h).mT  # the Gram is symmetric


def _reduced_chain(phi: Tensor, r: int, num_layers: int, lam_last: float) -> tuple[Tensor, list[Tensor]]:
    """``(M_1, [W_1..W_L])`` for ``φ`` (``θ`` without its last 3 entries), ``W_L`` the ridge optimum."""
    zeros = torch.zeros((*phi.shape[:-1], 3), dtype=F64)
    m1, ws = _means_chain(torch.cat([phi.to(F64), zeros], -1), r, num_layers)
    _, post, _ = forward(m1, ws)
    return m1, [*ws[:-1], _ridge_last(post[-1], lam_last)]


def _reduced_objective(phi: Tensor, *, r: int, num_layers: int, n: int, lambda_h: float, lw: list[float]) -> Tensor:
    """The SRG loss with ``W_L`` replaced by its ridge optimum (the DUFM objective on the means)."""
    m1, ws = _reduced_chain(phi, r, num_layers, lw[-1])
    total, _, _ = objective(m1, ws, _eye(m1.shape[-1]), n * lambda_h, lw)
    return total


def _complete_theta(phi: Tensor, *, r: int, num_layers: int, lam_last: float) -> Tensor:
    """``θ`` from ``φ``: the ridge ``W_L`` written as ``x_0 I + x_1 A_1 + x_2 A_0`` (it lies in that algebra)."""
    _, ws = _reduced_chain(phi, r, num_layers, lam_last)
    w_last = ws[-1]
    _, a1, a0 = _association(r)
    x = [w_last[0, 0], (w_last * a1).sum() / a1.sum(), (w_last * a0).sum() / a0.sum().clamp_min(1.0)]
    return torch.cat([phi.to(F64), torch.stack(x)])


def reference_kappa(*, r: int, num_layers: int, n: int, lambda_h: float, lambda_w: float | Sequence[float]) -> float:
    r"""``κ`` of the reference point (module docstring): the geometric mean of the L+1 coefficients
    ``2Knλ_{H1}, rλ_{W_1}, …, rλ_{W_{L-2}}, (Kr/4)λ_{W_{L-1}}, Kλ_{W_L}``."""
    lw = _check_setting(r, num_layers, lambda_h, lambda_w)
    coef = _coefficients(r, lw, n, lambda_h)
    if min(coef) == 0:
        return 0.0
    return math.exp(sum(math.log(c) for c in coef) / (num_layers + 1))


def _coefficients(r: int, lw: list[float], n: int, lambda_h: float) -> list[float]:
    """The L+1 penalty coefficients ``2Knλ_{H1}, rλ_{W_1}, …, rλ_{W_{L-2}}, (Kr/4)λ_{W_{L-1}}, Kλ_{W_L}``."""
    k = r * (r - 1) // 2
    return [2 * k * n * lambda_h] + [r * v for v in lw[:-2]] + [k * r / 4 * lw[-2], k * lw[-1]]


def reference_theta(
    *,
    r: int,
    num_layers: int,
    n: int,
    lambda_h: float,
    lambda_w: float | Sequence[float],
    scale: float | None = None,
) -> tuple[Tensor, float, float]:
    r"""The balanced reference point: ``(θ, s, L_ref)``.

    Each of the L+1 penalty terms ``c_i v_i^2`` equals ``T = κ s^{2/(L+1)}`` (AM-GM), so ``v_i = √(T/c_i)``
    and the output is ``s I_K``. ``s`` minimizes ``½(1-s)² + (L+1)/2 · κ s^{2/(L+1)}``, or is ``scale`` when
    given (a non-zero start past the threshold, where the minimizing ``s`` is 0); ``L_ref`` is the loss there.
    """
    lw = _check_setting(r, num_layers, lambda_h, lambda_w)
    L = num_layers
    kappa = reference_kappa(r=r, num_layers=L, n=n, lambda_h=lambda_h, lambda_w=lw)
    if kappa == 0:
        raise DeepCollapseError("the SRG construction needs every λ > 0")
    s = optimal_scale(kappa, L) if scale is None else float(scale)
    loss = dnc_objective(s, num_classes=1, num_layers=L, c=kappa)
    t = kappa * s ** (2 / (L + 1))
    v = [math.sqrt(t / c) for c in _coefficients(r, lw, n, lambda_h)]
    theta = [v[0], 0.0]
    for x in v[1:-2]:
        theta += [x, 0.0]
    theta += [v[-2], -0.5 * v[-2], v[-1], 0.0, 0.0]
    return torch.tensor(theta, dtype=F64), s, loss


def _adam(phi: Tensor, fn: Any, *, steps: int, lr: float) -> Tensor:
    """Adam on a batch of independent starts (elementwise, so each start follows its own path); the step
    is ``lr`` times the starts' mean absolute entry (never 0: every start is non-zero)."""
    th = phi.clone().requires_grad_(True)
    opt = torch.optim.Adam([th], lr=lr * float(phi.abs().mean()))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        fn(th).sum().backward()
        opt.step()
        sched.step()
    return th.detach()


def _kneser(theta: Tensor, num_layers: int) -> Tensor:
    """The variant whose last ReLU keeps the disjoint edges (the Kneser graph): ``u -> -u, v -> u/2``."""
    j = 2 * num_layers - 2
    out = theta.clone()
    out[..., j], out[..., j + 1] = -theta[..., j], 0.5 * theta[..., j]
    return out


def _starts(theta0: Tensor, num_layers: int, restarts: int, seed: int) -> Tensor:
    """Start points (all non-zero): the reference point, its Kneser variant, and ``restarts`` perturbed
    (half of them) or random points at the reference point's scale."""
    gen = torch.Generator().manual_seed(seed)
    rows = [theta0, _kneser(theta0, num_layers)]
    scale = float(theta0.abs().mean())
    for i in range(restarts):
        noise = torch.randn(theta0.shape, generator=gen, dtype=F64)
        rows.append(rows[i % 2] * (1 + 0.3 * noise) if i % 4 < 2 else scale * noise)
    return torch.stack(rows)


def _descend(phis: Tensor, reduced: Any, *, adam_steps: int, keep: int) -> tuple[Tensor, list[float]]:
    """Adam on every start, then the batched L-BFGS of :mod:`deepcollapse.dufm.multistart` on the ``keep``
    lowest: the polished points and their losses, best first."""
    if adam_steps:
        phis = _adam(phis, reduced, steps=adam_steps, lr=0.02)
    with torch.no_grad():
        losses = reduced(phis)
    losses = torch.where(torch.isfinite(losses), losses, torch.inf)
    best = phis[losses.argsort()[:keep]]
    opts = LBFGSOptions(max_steps=300, tol_grad=1e-12, tol_rel=1e-12, patience=5, max_backtracks=20)
    res = lbfgs(lambda x, rows: reduced(x), best, opts)
    order = res.loss.argsort().tolist()
    return res.x[order], [float(res.loss[i]) for i in order]


def _continuation(phi: Tensor, reduced_at: Any, factor: float, num_layers: int, *, steps: int = 4) -> Tensor:
    """Follow a solution from λ's scaled by ``factor`` (< 1, where the family is away from zero) to the
    given λ's in ``steps`` geometric steps, warm-starting each solve from the last (and its Kneser variant)."""
    for j in range(1, steps + 1):
        f = factor ** (1 - j / steps)
        both = torch.stack([phi, _kneser(phi, num_layers)])  # φ holds u, v: its last two entries
        phi = _descend(both, reduced_at(f), adam_steps=100, keep=2)[0][0]
    return phi


@dataclass(frozen=True)
class SRGSolution:
    """The optimized SRG construction for one setting.

    ``loss`` is ``L_SRG`` (the DUFM objective at :func:`srg_parameters` of ``theta``), ``reference_loss``
    the closed form of the balanced reference point, ``s`` the mean diagonal of the output on class means,
    ``rank_pre``: rank of the class means before the last ReLU (r), ``rank_post``: after it.
    """

    r: int
    num_classes: int
    num_layers: int
    n: int
    lambda_h: float
    lambda_w: list[float]
    loss: float
    reference_loss: float
    dnc_loss: float
    ratio: float  # loss / dnc_loss
    s: float
    rank_pre: int
    rank_post: int
    theta: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.lru_cache(maxsize=256)
def _solve_cached(
    r: int, num_layers: int, n: int, lambda_h: float, lw: tuple[float, ...], restarts: int, seed: int
) -> SRGSolution:
    from deepcollapse.measure import metrics as M

    L, k = num_layers, r * (r - 1) // 2
    kw = {"r": r, "num_layers": L, "n": n, "lambda_h": lambda_h, "lambda_w": list(lw)}
    theta_ref, s_ref, ref = reference_theta(**kw)
    theta0 = theta_ref if s_ref > 0 else reference_theta(**kw, scale=(L - 1) / L)[0]  # never start at 0

    def reduced_at(f: float) -> Any:
        lws = [f * v for v in lw]
        return lambda phi: _reduced_objective(phi, r=r, num_layers=L, n=n, lambda_h=f * lambda_h, lw=lws)

    reduced = reduced_at(1.0)
    phis, losses = _descend(_starts(theta0, L, restarts, seed)[:, :-3], reduced, adam_steps=250, keep=3)
    cands = [(loss, phi) for loss, phi in zip(losses, phis, strict=True)]
    kc = zero_threshold(num_classes=2, num_layers=L, n=1).kc  # the family's κ past which s_ref = 0
    kappa = reference_kappa(**kw)
    if kappa > 0.5 * kc:  # near or past the reference's zero threshold: continuation in λ
        factor = 0.5 * kc / kappa  # κ is homogeneous of degree 1 in the λ's
        start = _starts(
            reference_theta(**{**kw, "lambda_h": factor * lambda_h, "lambda_w": [factor * v for v in lw]})[0],
            L,
            restarts,
            seed,
        )[:, :-3]
        low = reduced_at(factor)
        phi_low = _descend(start, low, adam_steps=500, keep=2)[0][0]
        phi = _continuation(phi_low, reduced_at, factor, L)
        cands.append((float(reduced(phi[None])[0]), phi))
    phi = min(cands, key=lambda c: c[0])[1]
    theta = _complete_theta(phi, r=r, num_layers=L, lam_last=lw[-1])
    loss = float(srg_means_objective(theta, **kw))
    if ref < loss:  # never worse than the closed-form reference point
        theta, loss = theta_ref, ref
    m1, ws = _means_chain(theta, r, L)
    pre, _, out = forward(m1, ws)
    dnc = dnc_loss(num_classes=k, num_layers=L, n=n, lambda_h=lambda_h, lambda_w=list(lw))
    return SRGSolution(
        r=r,
        num_classes=k,
        num_layers=L,
        n=n,
        lambda_h=lambda_h,
        lambda_w=list(lw),
        loss=loss,
        reference_loss=ref,
        dnc_loss=dnc,
        ratio=loss / dnc if dnc > 0 else math.nan,
        s=float(torch.diagonal(out).mean()),
        rank_pre=M.numerical_rank(torch.linalg.svdvals(pre[-1]), rtol=1e-8),
        rank_post=M.numerical_rank(torch.linalg.svdvals(torch.relu(pre[-1])), rtol=1e-8),
        theta=theta.tolist(),
    )


def srg_solution(
    *,
    r: int,
    num_layers: int,
    n: int,
    lambda_h: float,
    lambda_w: float | Sequence[float],
    restarts: int = 14,
    seed: int = 0,
) -> SRGSolution:
    """Minimize the DUFM loss over the SRG family's ``2L+3`` scales (cached per setting).

    L-BFGS (float64, strong Wolfe) from the balanced reference point, then from ``restarts`` perturbed
    or random points (``seed``); the best is kept, never worse than the reference closed form.
    """
    lw = _check_setting(r, num_layers, lambda_h, lambda_w)
    n = check_positive_int("n", n)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only add synchronization
    try:
        with torch.enable_grad():  # callers may sit inside no_grad (e.g. a trainer's callback)
            return _solve_cached(r, num_layers, n, float(lambda_h), tuple(lw), int(restarts), int(seed))
    finally:
        torch.set_num_threads(threads)


def srg_loss(
    *, num_classes: int, num_layers: int, n: int, lambda_h: float, lambda_w: float | Sequence[float], **kw: Any
) -> float | None:
    """``L_SRG`` for ``K = C(r, 2)`` classes, ``None`` when K is not of that form or ``L < 2``."""
    r = srg_order(num_classes)
    if r is None or num_layers < 2:
        return None
    return srg_solution(r=r, num_layers=num_layers, n=n, lambda_h=lambda_h, lambda_w=lambda_w, **kw).loss


def srg_parameters(config: DUFMConfig, theta: Sequence[float] | Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
    """Explicit DUFM parameters ``(H1, [W_1..W_L])`` of the SRG solution for ``config``.

    The r-dimensional blocks of :func:`srg_means_objective` sit in the first r (or K) coordinates of each
    layer; every sample equals its class mean. ``theta`` defaults to the optimized scales for the config's
    n and λ's. Needs balanced classes, ``K = C(r,2)``, ``L >= 2``, widths ``d_1..d_{L-1} >= r`` and
    ``d_L >= K``.
    """
    K, L = config.num_classes, config.num_layers
    r = srg_order(K)
    if r is None:
        raise DeepCollapseError(f"the SRG construction needs K = r(r-1)/2 classes (3, 6, 10, 15, ...), got K = {K}")
    if L < 2:
        raise DeepCollapseError("the SRG construction needs num_layers >= 2 (a ReLU)")
    if not config.balanced:
        raise DeepCollapseError("the SRG construction is for balanced classes (one n_per_class)")
    widths = config.widths
    need = [r] * (L - 1) + [K]
    low = [i + 1 for i, (d, m) in enumerate(zip(widths, need, strict=True)) if d < m]
    if low:
        raise DeepCollapseError(
            f"the SRG construction needs widths >= {need} (r = {r}, K = {K}); layer(s) {low} are narrower"
        )
    if theta is None:
        theta = srg_solution(r=r, num_layers=L, n=config.n, lambda_h=config.lambda_h, lambda_w=config.lambdas_w).theta
    m1, blocks = _means_chain(torch.as_tensor(theta, dtype=F64), r, L)
    dims = [*widths, K]
    h1 = torch.zeros(dims[0], K, dtype=F64)
    h1[:r] = m1
    h1 = h1[:, labels_from_counts(config.counts)]
    ws = []
    for i, blk in enumerate(blocks):
        w = torch.zeros(dims[i + 1], dims[i], dtype=F64)
        w[: blk.shape[0], : blk.shape[1]] = blk
        ws.append(w)
    dev, dt = torch.device(config.device), config.torch_dtype
    return h1.to(device=dev, dtype=dt), [w.to(device=dev, dtype=dt) for w in ws]


def srg_dufm_loss(config: DUFMConfig, theta: Sequence[float] | Tensor | None = None) -> float:
    """The DUFM :func:`~deepcollapse.dufm.objective` at :func:`srg_parameters` (float64)."""
    h1, ws = srg_parameters(config, theta)
    y = label_matrix(config.counts, dtype=F64)
    total, _, _ = objective(h1.to(F64), [w.to(F64) for w in ws], y, config.lambda_h, config.lambdas_w)
    return float(total)


def srg_table(
    *,
    rs: Sequence[int] = (4, 5, 6, 7, 8),
    layers: Sequence[int] = (3, 4, 5),
    n: int = 5,
    lambda_h: float = 0.004,
    lambda_w: float = 0.004,
    restarts: int = 14,
) -> list[dict[str, Any]]:
    """Rows ``{L, r, K, dnc_loss, srg_loss, ratio, reference_ratio, s, rank_pre, rank_post}``."""
    rows = []
    for L in layers:
        for r in rs:
            sol = srg_solution(r=r, num_layers=L, n=n, lambda_h=lambda_h, lambda_w=lambda_w, restarts=restarts)
            rows.append(
                {
                    "L": L,
                    "r": r,
                    "K": sol.num_classes,
                    "dnc_loss": sol.dnc_loss,
                    "srg_loss": sol.loss,
                    "ratio": sol.ratio,
                    "reference_ratio": sol.reference_loss / sol.dnc_loss if sol.dnc_loss > 0 else math.nan,
                    "s": sol.s,
                    "rank_pre": sol.rank_pre,
                    "rank_post": sol.rank_post,
                }
            )
    return rows
