r"""Many DUFM minimizations at once: a batched L-BFGS over a leading dimension, and multi-start searches.

**Batched L-BFGS.** :func:`lbfgs` minimizes ``B`` independent functions ``f_b(x_b)`` given as one
``fn(x, rows) -> (len(rows),)`` over rows of ``x`` (B x P). Each row keeps its own curvature pairs
``(s_i, y_i)``, its own two-loop direction ``d = -H_b ∇f_b`` and its own backtracking (Armijo) line search
``f_b(x_b + t d) <= f_b(x_b) + c_1 t ∇f_b^T d``, so a row never waits for, or is steered by, another
(unlike ``torch.optim.LBFGS`` on ``Σ_b f_b``, whose one line search serves every row). Each row stops by
the shared rules of :mod:`deepcollapse.dufm.stopping` (diverged, certified gap, stationary, stalled,
budgets); a row whose line search finds no lower point even along ``-∇f_b`` has stalled. Finished rows
leave the batch.

**The DUFM on class means.** For fixed weights the DUFM loss is a sum of per-sample terms
``\frac1{2N}\|f(h) - y_c\|^2 + \frac{λ_{H_1}}2\|h\|^2``; giving every sample of class ``c`` the best
sample's features never raises it. So the minimum over collapsed features ``H_1 = M_1 ⊗ 1_n^T`` *is* the
DUFM minimum, and the search runs on ``M_1`` (d_1 x K) with the one DUFM
:func:`~deepcollapse.dufm.model.objective` at ``Y = I_K`` and ``λ_{H_1}`` replaced by ``n λ_{H_1}`` — the
same number as the objective at the expanded ``H_1`` (:func:`expand_means`). Every result is an explicit
DUFM point, so its loss is an upper bound on the DUFM optimum.

**Multi-start.** :func:`multistart` searches every configuration from several starts in one batch:
``random`` (the :class:`~deepcollapse.dufm.DUFM` initialization of the means and weights, at two scales),
``low-rank`` (every matrix a product through an inner dimension ``q < K``) and any starts the caller
passes (e.g. the SRG or DNC constructions of :mod:`deepcollapse.theory`). All starts run Adam together
(cosine-annealed learning rate); the best ``keep`` of each configuration are then polished by
:func:`lbfgs` until a stopping rule holds. The DUFM's minima often sit on ReLU kinks (pre-activations
exactly 0), where the gradient does not vanish, so a polish typically ends ``"stalled"`` rather than
``"stationary"``. :func:`continuation` re-solves each configuration from the best points of its
neighbours along λ.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from deepcollapse._validate import DeepCollapseError, check_positive_int, check_real
from deepcollapse.dufm.model import DUFMConfig, labels_from_counts, objective
from deepcollapse.dufm.stopping import DEFAULT_MAX_STEPS, STOP_REASONS, StopRules, calm_count, stop_codes

__all__ = [
    "LBFGSOptions",
    "LBFGSResult",
    "SearchOptions",
    "SearchResult",
    "Start",
    "continuation",
    "expand_means",
    "lbfgs",
    "means_objective",
    "multistart",
    "pack",
    "unpack",
]

F64 = torch.float64


@dataclass
class LBFGSOptions(StopRules):
    """Settings of :func:`lbfgs`: the shared stopping rules (:class:`~deepcollapse.dufm.stopping.StopRules`,
    checked every iteration) and the quasi-Newton details."""

    max_steps: int = DEFAULT_MAX_STEPS["lbfgs"]  # iterations per row
    history: int = 10  # curvature pairs kept per row
    max_backtracks: int = 40  # halvings of the step in one line search
    c1: float = 1e-4  # Armijo constant

    def __post_init__(self) -> None:
        super().__post_init__()
        self.max_steps = check_positive_int("max_steps", self.max_steps)
        self.history = check_positive_int("history", self.history)
        self.max_backtracks = check_positive_int("max_backtracks", self.max_backtracks)
        self.c1 = check_real("c1", self.c1, low=0.0, low_inclusive=False, high=0.5)


@dataclass
class LBFGSResult:
    """Per row: the final point, loss, gradient norm, iterations and why it stopped (a reason of
    :data:`~deepcollapse.dufm.stopping.STOP_REASONS`, or ``"screened"`` for a start that only ran Adam)."""

    x: Tensor
    loss: Tensor
    grad_norm: Tensor
    iterations: list[int]
    stop_reason: list[str]


def _value_and_grad(fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        f = fn(xg, rows)
        (g,) = torch.autograd.grad(f.sum(), xg)  # rows are independent: ∂Σf/∂x_b = ∇f_b
    return f.detach(), g


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise inner products of two (B, P) tensors."""
    return torch.linalg.vecdot(a, b)


def _direction(g: Tensor, s: Tensor, y: Tensor, rho: Tensor, gamma: Tensor, order: list[int]) -> Tensor:
    """The two-loop recursion, row by row: ``-H g`` from the pairs ``(s_i, y_i)`` taken oldest to newest in
    ``order`` (``ρ_i = 0`` marks a row without that pair)."""
    q = g.clone()
    alpha = []
    for i in reversed(order):
        a = rho[i] * _dot(s[i], q)
        q -= a[:, None] * y[i]
        alpha.append(a)
    r = gamma[:, None] * q
    for i, a in zip(order, reversed(alpha), strict=True):
        b = rho[i] * _dot(y[i], r)
        r += (a - b)[:, None] * s[i]
    return -r


@dataclass
class _Rows:
    """The state of the rows still running (compacted as rows finish)."""

    idx: Tensor
    x: Tensor
    f: Tensor
    g: Tensor
    s: Tensor  # (m, B, P)
    y: Tensor
    rho: Tensor  # (m, B)
    gamma: Tensor
    calm: Tensor
    fresh: Tensor  # no curvature pair yet (the step is then scaled by 1/||g||_1)

    def keep(self, mask: Tensor) -> _Rows:
        return _Rows(
            self.idx[mask], self.x[mask], self.f[mask], self.g[mask], self.s[:, mask], self.y[:, mask],
            self.rho[:, mask], self.gamma[mask], self.calm[mask], self.fresh[mask],
        )  # fmt: skip


def _line_search(
    fn: Callable[[Tensor, Tensor], Tensor], st: _Rows, d: Tensor, t: Tensor, opts: LBFGSOptions
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backtracking per row: ``(x_new, f_new, g_new, accepted)``; rows without an Armijo step keep x."""
    gd = (st.g * d).sum(1)
    x_new, f_new, g_new = st.x.clone(), st.f.clone(), st.g.clone()
    done = torch.zeros_like(st.f, dtype=torch.bool)
    for _ in range(opts.max_backtracks):
        todo = (~done).nonzero().flatten()
        trial = st.x[todo] + t[todo, None] * d[todo]
        ft, gt = _value_and_grad(fn, trial, st.idx[todo])
        ok = torch.isfinite(ft) & (ft <= st.f[todo] + opts.c1 * t[todo] * gd[todo])
        hit = todo[ok]
        x_new[hit], f_new[hit], g_new[hit] = trial[ok], ft[ok], gt[ok]
        done[hit] = True
        if bool(done.all()):
            break
        t = torch.where(done, t, 0.5 * t)
    return x_new, f_new, g_new, done


def _remember(st: _Rows, x_new: Tensor, g_new: Tensor, slot: int) -> None:
    """Store every row's newest curvature pair in ring ``slot`` (as ``ρ = 0`` when ``s^T y`` is not > 0)."""
    s, y = x_new - st.x, g_new - st.g
    sy, yy = _dot(s, y), _dot(y, y)
    good = sy > 1e-12 * s.norm(dim=1) * y.norm(dim=1)
    st.s[slot], st.y[slot] = s, y
    st.rho[slot] = torch.where(good, 1.0 / sy.clamp_min(1e-300), 0.0)
    st.gamma = torch.where(good, sy / yy.clamp_min(1e-300), st.gamma)
    st.fresh = st.fresh & ~good


def lbfgs(
    fn: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    options: LBFGSOptions | None = None,
    *,
    lower_bound: Tensor | None = None,
) -> LBFGSResult:
    """Minimize ``B`` independent functions at once (module docstring); ``fn(x, rows)`` gives ``f_rows(x)``.

    ``x0`` is (B, P); ``rows`` are the indices (into ``x0``) of the rows passed. ``lower_bound`` (B,), NaN
    where unknown, holds proven lower bounds for the ``"gap"`` rule. A row whose line search finds no
    lower point even along ``-∇f`` has stalled. Returns one result per row.
    """
    opts = options or LBFGSOptions()
    if x0.ndim != 2:
        raise DeepCollapseError(f"x0 must be (batch, parameters), got shape {tuple(x0.shape)}")
    b, p = x0.shape
    f, g = _value_and_grad(fn, x0.detach().clone(), torch.arange(b))
    z = torch.zeros(opts.history, b, p, dtype=x0.dtype)
    st = _Rows(torch.arange(b), x0.detach().clone(), f, g, z, z.clone(), torch.zeros(opts.history, b, dtype=x0.dtype),
               torch.ones(b, dtype=x0.dtype), torch.zeros(b, dtype=torch.int64),
               torch.ones(b, dtype=torch.bool))  # fmt: skip
    out = LBFGSResult(x0.detach().clone(), f.clone(), g.norm(dim=1), [opts.max_steps] * b, ["max_steps"] * b)
    start = time.perf_counter()
    for it in range(opts.max_steps + 1):
        gn = st.g.norm(dim=1)
        codes = stop_codes(opts, loss=st.f, grad_norm=gn, param_norm=st.x.norm(dim=1), calm=st.calm, step=it,
                           max_steps=opts.max_steps, seconds=time.perf_counter() - start,
                           lower_bound=None if lower_bound is None else lower_bound[st.idx])  # fmt: skip
        _finish(out, st, codes > 0, gn, it, [STOP_REASONS[int(c) - 1] for c in codes.tolist()])
        st = st.keep(codes == 0)
        if st.idx.numel() == 0:
            break
        m = opts.history
        order = [(it - j) % m for j in range(min(it, m), 0, -1)]  # the slots written, oldest first
        d = _direction(st.g, st.s, st.y, st.rho, st.gamma, order)
        steepest = st.fresh | ((st.g * d).sum(1) >= 0)  # no memory, or not a descent direction
        d = torch.where(steepest[:, None], -st.g, d)
        t = torch.where(steepest, 1.0 / st.g.abs().sum(1).clamp_min(1.0), torch.ones_like(st.f))
        x_new, f_new, g_new, ok = _line_search(fn, st, d, t, opts)
        reset = ~ok & ~steepest  # a failed quasi-Newton step: forget the pairs, retry along -∇f
        st.rho[:, reset], st.fresh = 0.0, st.fresh | reset
        stuck = ~ok & steepest  # not even a steepest-descent step lowers f
        _finish(out, st, stuck, st.g.norm(dim=1), it, ["stalled"] * len(stuck))
        st.calm = calm_count(st.calm, f_new, st.f, opts.tol_rel)
        _remember(st, x_new, g_new, it % opts.history)
        st.x, st.f, st.g = x_new, f_new, g_new
        st = st.keep(~stuck)
    return out


def _finish(out: LBFGSResult, st: _Rows, mask: Tensor, gn: Tensor, it: int, reasons: list[str]) -> None:
    """Record the rows in ``mask`` as finished at iteration ``it``."""
    for k in mask.nonzero().flatten().tolist():
        i = int(st.idx[k])
        out.x[i], out.loss[i], out.grad_norm[i] = st.x[k], st.f[k], gn[k]
        out.iterations[i], out.stop_reason[i] = it, reasons[k]


# ---------------------------------------------------------------------------------------------------------
# The DUFM on class means


def _dims(config: DUFMConfig) -> list[int]:
    return [*config.widths, config.num_classes]


def _shapes(config: DUFMConfig) -> list[tuple[int, int]]:
    dims = _dims(config)
    return [(dims[0], config.num_classes)] + [(o, i) for i, o in zip(dims[:-1], dims[1:], strict=True)]


def pack(m1: Tensor, weights: Sequence[Tensor]) -> Tensor:
    """Flatten ``(M_1, [W_l])`` (each with leading batch dims) into one (..., P) vector."""
    lead = m1.shape[:-2]
    return torch.cat([m1.reshape(*lead, -1), *[w.reshape(*lead, -1) for w in weights]], -1)


def unpack(x: Tensor, config: DUFMConfig) -> tuple[Tensor, list[Tensor]]:
    """Inverse of :func:`pack` for ``config``'s shapes: ``(M_1 (..., d_1, K), [W_l (..., d_{l+1}, d_l)])``."""
    mats, at = [], 0
    for rows, cols in _shapes(config):
        mats.append(x[..., at : at + rows * cols].reshape(*x.shape[:-1], rows, cols))
        at += rows * cols
    if at != x.shape[-1]:
        raise DeepCollapseError(f"x has {x.shape[-1]} entries, the config's parameters {at}")
    return mats[0], mats[1:]


def means_objective(x: Tensor, config: DUFMConfig, lambda_h: Tensor, lambdas_w: Tensor) -> Tensor:
    """The DUFM loss at collapsed features, per row of ``x`` (B, P): the DUFM objective of ``(M_1, W)``
    at ``Y = I_K`` with ``λ_{H_1} -> n λ_{H_1}`` (``lambda_h`` (B,), ``lambdas_w`` (B, L) per row)."""
    m1, ws = unpack(x, config)
    y = torch.eye(config.num_classes, dtype=x.dtype, device=x.device)
    total, _, _ = objective(m1, ws, y, config.n * lambda_h, lambdas_w)
    return total


def expand_means(m1: Tensor, config: DUFMConfig) -> Tensor:
    """``H_1 = M_1 ⊗ 1_n^T``: every sample equal to its class mean (samples grouped by class)."""
    return m1[..., labels_from_counts(config.counts, device=m1.device)]


@dataclass(frozen=True)
class Start:
    """A named starting point for one configuration: class means ``M_1`` (d_1 x K) and weights."""

    source: str
    m1: Tensor
    weights: tuple[Tensor, ...]
    polish_only: bool = False  # a point already near a minimum (a closed form): L-BFGS only, no Adam


@dataclass
class SearchResult:
    """The best point found for one configuration, and the end of every start (``starts``)."""

    config: DUFMConfig
    loss: float
    source: str
    m1: Tensor
    weights: list[Tensor]
    grad_norm: float
    stop_reason: str
    starts: list[dict] = field(default_factory=list)  # {source, loss, grad_norm, iterations, stop_reason}

    @property
    def h1(self) -> Tensor:
        """The full DUFM features ``M_1 ⊗ 1_n^T``."""
        return expand_means(self.m1, self.config)


def _random_start(config: DUFMConfig, gen: torch.Generator, scale: float) -> Start:
    """The DUFM initialization (entries ``N(0, 1)`` for ``M_1``, ``N(0, 1/d_in)`` for ``W_l``), times ``scale``."""
    shapes = _shapes(config)
    mats = [torch.randn(*shapes[0], generator=gen, dtype=F64) * scale]
    mats += [torch.randn(o, i, generator=gen, dtype=F64) * (scale / math.sqrt(i)) for o, i in shapes[1:]]
    return Start(f"random(x{scale:g})", mats[0], tuple(mats[1:]))


def _low_rank_start(config: DUFMConfig, gen: torch.Generator, rank: int) -> Start:
    """Every matrix a product ``A B`` through an inner dimension ``rank`` (< K), at the DUFM init's scale."""
    mats = []
    for o, i in _shapes(config):
        q = min(rank, o, i)
        a = torch.randn(o, q, generator=gen, dtype=F64) / math.sqrt(q)
        b = torch.randn(q, i, generator=gen, dtype=F64)
        mats.append(a @ b / (1.0 if not mats else math.sqrt(i)))
    return Start(f"low-rank(q={rank})", mats[0], tuple(mats[1:]))


def default_starts(config: DUFMConfig, *, random: int, low_rank: int, seed: int) -> list[Start]:
    """``random`` DUFM-like starts (scales 1 and 1/2 alternating) and ``low_rank`` starts with inner
    dimensions cycling through ``2..K-1`` (``1`` for K = 2)."""
    gen = torch.Generator().manual_seed(seed)
    out = [_random_start(config, gen, 1.0 if i % 2 == 0 else 0.5) for i in range(random)]
    ranks = list(range(2, config.num_classes)) or [1]
    out += [_low_rank_start(config, gen, ranks[i % len(ranks)]) for i in range(low_rank)]
    return out


def _check_batchable(configs: Sequence[DUFMConfig]) -> None:
    if not configs:
        raise DeepCollapseError("configs is empty")
    shapes = {(c.num_classes, c.num_layers, tuple(c.widths), tuple(c.counts)) for c in configs}
    if len(shapes) > 1:
        raise DeepCollapseError("configurations searched together must share K, L, n and the widths")
    if not configs[0].balanced:
        raise DeepCollapseError("the multi-start search is for balanced classes (one n_per_class)")


@dataclass(frozen=True)
class SearchOptions:
    """How :func:`multistart` spends its budget: Adam on every start, then L-BFGS on the best ones."""

    adam_steps: int = 3000  # Adam steps on every start (cosine-annealed learning rate)
    adam_lr: float = 0.01
    keep: int = 2  # starts per configuration polished by L-BFGS after Adam (besides the polish-only ones)
    polish: LBFGSOptions = field(default_factory=lambda: LBFGSOptions(max_steps=300, tol_rel=1e-10, patience=10))

    def __post_init__(self) -> None:
        check_positive_int("adam_steps", self.adam_steps, minimum=0)
        check_real("adam_lr", self.adam_lr, low=0.0, low_inclusive=False)
        check_positive_int("keep", self.keep)


def _adam(fn: Callable[[Tensor, Tensor], Tensor], x0: Tensor, *, steps: int, lr: float) -> Tensor:
    """Adam on every row at once (Adam is elementwise, so each row follows its own path), cosine-annealed."""
    x = x0.detach().clone().requires_grad_(True)
    if steps == 0:
        return x.detach()
    rows = torch.arange(x.shape[0])
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=False)
            fn(x, rows).sum().backward()
            opt.step()
            sched.step()
    return x.detach()


def _search_rows(
    configs: Sequence[DUFMConfig], owner: list[int], starts: list[Start], opts: SearchOptions
) -> tuple[LBFGSResult, set[int]]:
    """Adam on every (configuration, start) row in one batch, then L-BFGS on each configuration's
    ``keep`` best rows; returns every row's end (the polished rows' ends from L-BFGS) and the polished rows."""
    cfg0 = configs[0]
    lam_h = torch.tensor([configs[o].lambda_h for o in owner], dtype=F64)
    lam_w = torch.tensor([configs[o].lambdas_w for o in owner], dtype=F64)
    x0 = torch.stack([pack(s.m1.to(F64), [w.to(F64) for w in s.weights]) for s in starts])

    def fn(x: Tensor, rows: Tensor) -> Tensor:
        return means_objective(x, cfg0, lam_h[rows], lam_w[rows])

    explore = torch.tensor([r for r, st in enumerate(starts) if not st.polish_only], dtype=torch.int64)
    x = x0.clone()
    if explore.numel():
        x[explore] = _adam(lambda z, rows: fn(z, explore[rows]), x0[explore], steps=opts.adam_steps, lr=opts.adam_lr)
    with torch.no_grad():
        f = fn(x, torch.arange(len(starts)))
    chosen: list[int] = []
    for i in range(len(configs)):
        rows = [r for r, o in enumerate(owner) if o == i and math.isfinite(float(f[r]))]
        chosen += sorted((r for r in rows if not starts[r].polish_only), key=lambda r: float(f[r]))[: opts.keep]
        chosen += [r for r in rows if starts[r].polish_only]
    ends = LBFGSResult(x, f, torch.full_like(f, math.nan), [opts.adam_steps] * len(starts), ["screened"] * len(starts))
    for r in range(len(starts)):
        if not math.isfinite(float(f[r])):
            ends.stop_reason[r] = "diverged"
    if chosen:
        sel = torch.tensor(chosen)
        pol = lbfgs(lambda z, rows: fn(z, sel[rows]), x[sel], opts.polish)
        for k, r in enumerate(chosen):
            ends.x[r], ends.loss[r], ends.grad_norm[r] = pol.x[k], pol.loss[k], pol.grad_norm[k]
            ends.iterations[r] += pol.iterations[k]
            ends.stop_reason[r] = pol.stop_reason[k]
    return ends, set(chosen)


def multistart(
    configs: Sequence[DUFMConfig],
    *,
    random: int = 6,
    low_rank: int = 6,
    extra: Sequence[Sequence[Start]] | None = None,
    seed: int = 0,
    options: SearchOptions | None = None,
) -> list[SearchResult]:
    """The best of many runs for every configuration (same K, L, n and widths; any λ's), in one batch.

    Each configuration gets ``random`` and ``low_rank`` starts (:func:`default_starts`, seeded by ``seed``
    and its position) plus ``extra[i]``. All starts run Adam together; the ``keep`` lowest of each
    configuration are then polished by :func:`lbfgs` until stationary (or another of its stopping rules).
    The best polished point is the result; diverged starts are ignored.
    """
    _check_batchable(configs)
    extra = list(extra) if extra is not None else [[] for _ in configs]
    if len(extra) != len(configs):
        raise DeepCollapseError(f"extra has {len(extra)} entries for {len(configs)} configurations")
    owner, starts = [], []
    for i, cfg in enumerate(configs):
        for s in [*default_starts(cfg, random=random, low_rank=low_rank, seed=seed + 7919 * i), *extra[i]]:
            owner.append(i)
            starts.append(s)
    if not starts:
        raise DeepCollapseError("no starts: give random, low_rank or extra starts")
    ends, polished = _search_rows(configs, owner, starts, options or SearchOptions())
    return _collect(configs, owner, starts, ends, polished)


def _collect(
    configs: Sequence[DUFMConfig], owner: list[int], starts: list[Start], res: LBFGSResult, polished: set[int]
) -> list[SearchResult]:
    """The best polished row of every configuration, with a record of every start's end."""
    out: list[SearchResult] = []
    for i, cfg in enumerate(configs):
        rows = [r for r, o in enumerate(owner) if o == i]
        ends = [
            {"source": starts[r].source, "loss": float(res.loss[r]), "grad_norm": float(res.grad_norm[r]),
             "iterations": res.iterations[r], "stop_reason": res.stop_reason[r], "polished": r in polished}
            for r in rows
        ]  # fmt: skip
        ok = [r for r in rows if r in polished and math.isfinite(float(res.loss[r]))]
        if not ok:
            raise DeepCollapseError(f"every start diverged for configuration {i} (K = {cfg.num_classes})")
        best = min(ok, key=lambda r: float(res.loss[r]))
        m1, ws = unpack(res.x[best], cfg)
        out.append(
            SearchResult(
                config=cfg, loss=float(res.loss[best]), source=starts[best].source, m1=m1.clone(),
                weights=[w.clone() for w in ws], grad_norm=float(res.grad_norm[best]),
                stop_reason=res.stop_reason[best], starts=ends,
            )
        )  # fmt: skip
    return out


def continuation(results: Sequence[SearchResult], *, options: SearchOptions | None = None) -> list[SearchResult]:
    """Re-solve each configuration from its neighbours' best points along λ (sorted by ``λ_{H_1}``).

    The best point at one λ starts the search at the next and at the previous λ (source
    ``"continuation(λ=...)"``), with a quarter of the Adam steps at a third of the learning rate; the
    better of the old and the new best is kept, and every start's end is recorded.
    """
    res = list(results)
    configs = [r.config for r in res]
    _check_batchable(configs)
    order = sorted(range(len(res)), key=lambda i: (configs[i].lambda_h, configs[i].lambdas_w))
    owner, starts = [], []
    for pos, i in enumerate(order):
        for nb in (pos - 1, pos + 1):
            if 0 <= nb < len(order):
                j = order[nb]
                owner.append(i)
                starts.append(Start(f"continuation(λ={configs[j].lambda_h:g})", res[j].m1, tuple(res[j].weights)))
    if not starts:
        return res
    opts = options or SearchOptions()
    opts = replace(opts, adam_steps=opts.adam_steps // 4, adam_lr=opts.adam_lr / 3)
    present = sorted(set(owner))
    ends, polished = _search_rows(configs, owner, starts, opts)
    sub = _collect([configs[i] for i in present], [present.index(o) for o in owner], starts, ends, polished)
    for i, cand in zip(present, sub, strict=True):
        history = [*res[i].starts, *cand.starts]
        res[i] = cand if cand.loss < res[i].loss else res[i]
        res[i].starts = history
    return res
